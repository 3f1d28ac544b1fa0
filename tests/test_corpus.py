"""The bad-input corpus (tests/corpus/): broken and hostile specs and command lines.

Every case: exit status 2, exactly one line on stderr starting with the manifest's
expected text, nothing on stdout, no traceback, no AWS call, and the state
directory (GPURUN_HOME) exactly as it was. Most cases run in-process through
gpurun.cli.main; a handful run as real subprocesses. Then property tests:
the spec loader raises nothing but gpurun's own errors, always one line.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpurun.cli import main
from gpurun.errors import GpurunError
from gpurun.spec import apply_override, parse_yaml, validate_spec

CORPUS = Path(__file__).resolve().parent / "corpus"
MANIFEST: dict[str, Any] = yaml.safe_load((CORPUS / "expected.yaml").read_text(encoding="utf-8"))
SPEC_FILES = sorted(path.name for path in (CORPUS / "specs").glob("*.yaml"))
LONG_NAME = "x" * 5000 + ".yaml"


# ---- files the test writes itself (a repository cannot hold them as they are) -----------


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _self_link(path: Path) -> None:
    path.symlink_to(path.name)


GENERATED: dict[str, Callable[[Path], Any]] = {
    "directory.yaml": lambda p: p.mkdir(),
    "empty.yaml": lambda p: p.write_bytes(b""),
    "whitespace-only.yaml": lambda p: p.write_bytes(b"   \n\n\t\n"),
    "latin1.yaml": lambda p: p.write_bytes(b"name: caf\xe9\nrun: python train.py\n"),
    "utf16.yaml": lambda p: p.write_bytes("name: exp\nrun: python train.py\n".encode("utf-16")),
    "random-bytes.yaml": lambda p: p.write_bytes(bytes(range(256)) * 4),
    "nul-bytes.yaml": lambda p: p.write_bytes(b"name: exp\x00\nrun: python train.py\n"),
    "huge.yaml": lambda p: p.write_bytes(b"name: exp\nrun: python train.py\n" + b"# padding\n" * 200_000),
    "huge-single-line.yaml": lambda p: p.write_bytes(b"name: " + b"a" * 1_500_000 + b"\n"),
    "fifo.yaml": _fifo,
    "symlink-loop.yaml": _self_link,
    "dangling-symlink.yaml": lambda p: p.symlink_to("nowhere.yaml"),
}


# ---- running a case ------------------------------------------------------------------


def _tree(root: Path) -> list[str]:
    return sorted(str(path.relative_to(root)) for path in root.rglob("*"))


@pytest.fixture
def no_aws_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Any AWS API call is recorded (and fails): bad input must never reach AWS."""
    import botocore.client

    calls: list[str] = []

    def refuse(self, operation_name, api_params):  # noqa: ANN001
        calls.append(operation_name)
        raise AssertionError(f"AWS call {operation_name} on bad input")

    monkeypatch.setattr(botocore.client.BaseClient, "_make_api_call", refuse)
    return calls


def run_in_process(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        main(args)
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_bad_input(code: int, out: str, err: str, expected: str) -> None:
    lines = err.splitlines()
    assert code == 2, f"exit {code}; stderr: {err!r}"
    assert out == "", f"stdout must stay empty: {out!r}"
    assert "Traceback" not in err
    assert len(lines) == 1, f"one line expected on stderr: {err!r}"
    assert lines[0].startswith("error: "), lines[0]
    assert lines[0].startswith(expected), f"\n  got:      {lines[0]!r}\n  expected: {expected!r}..."
    assert len(lines[0]) < 400, lines[0]


@pytest.fixture
def state_unchanged(gpurun_home: Path, no_aws_calls: list[str]):
    before = _tree(gpurun_home)
    yield
    after = _tree(gpurun_home)
    assert after == before, f"the state directory changed: {sorted(set(after) - set(before))}"
    assert not (gpurun_home / "runs").exists() and not (gpurun_home / "local").exists()
    assert no_aws_calls == []


# ---- the manifest and the corpus agree -------------------------------------------------


def test_manifest_covers_the_corpus() -> None:
    assert sorted(MANIFEST["specs"]) == SPEC_FILES
    assert sorted(MANIFEST["generated"]) == sorted(GENERATED)
    total = len(MANIFEST["specs"]) + len(MANIFEST["generated"]) + len(MANIFEST["commands"])
    assert len(MANIFEST["specs"]) >= 60 and total >= 100, total
    for entry in MANIFEST["commands"]:
        assert set(entry) <= {"args", "error", "xfail"} and entry["error"].startswith("error: "), entry


# ---- specs ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", SPEC_FILES)
def test_spec_corpus(name: str, capsys, monkeypatch: pytest.MonkeyPatch, state_unchanged) -> None:
    monkeypatch.chdir(CORPUS)
    before = _tree(CORPUS)
    code, out, err = run_in_process(["launch", f"specs/{name}", "--dry-run"], capsys)
    assert_bad_input(code, out, err, MANIFEST["specs"][name])
    assert _tree(CORPUS) == before


@pytest.mark.parametrize("name", sorted(GENERATED))
def test_generated_corpus(name: str, tmp_path: Path, capsys, monkeypatch: pytest.MonkeyPatch, state_unchanged) -> None:
    (tmp_path / "gen").mkdir()
    GENERATED[name](tmp_path / "gen" / name)
    monkeypatch.chdir(tmp_path)
    code, out, err = run_in_process(["launch", f"gen/{name}", "--dry-run"], capsys)
    assert_bad_input(code, out, err, MANIFEST["generated"][name])
    code, out, err = run_in_process(["launch", f"gen/{name}"], capsys)  # and for real
    assert_bad_input(code, out, err, MANIFEST["generated"][name])


# ---- command lines -------------------------------------------------------------------


def _expand(args: list[str], tmp_path: Path) -> list[str]:
    return [
        arg.replace("{tmp}", str(tmp_path)).replace("{long}", LONG_NAME).replace("{bigint}", "9" * 5000) for arg in args
    ]


def _command_cases() -> list[Any]:
    cases = []
    for entry in MANIFEST["commands"]:
        marks = [pytest.mark.xfail(reason=entry["xfail"], strict=True)] if entry.get("xfail") else []
        cases.append(pytest.param(entry["args"], entry["error"], marks=marks, id=" ".join(entry["args"])[:60]))
    return cases


@pytest.mark.parametrize(("args", "expected"), _command_cases())
def test_command_corpus(args: list[str], expected: str, tmp_path: Path, capsys, monkeypatch, state_unchanged) -> None:
    monkeypatch.chdir(CORPUS)
    before = _tree(tmp_path)
    code, out, err = run_in_process(_expand(args, tmp_path), capsys)
    assert_bad_input(code, out, err, expected.replace("{tmp}", str(tmp_path)))
    assert _tree(tmp_path) == before, "a bad command created files"


# ---- a handful through a real process --------------------------------------------------

SUBPROCESS_CASES = [
    ["launch", "specs/yaml-billion-laughs.yaml"],
    ["launch", "specs/name-shell-semicolon.yaml"],
    ["launch", "specs/nodes-zero.yaml"],
    ["launch", "specs/yaml-python-object-tag.yaml", "--dry-run"],
    ["launch", "good.yaml", "--resume", "nosuchrun"],
    ["launch", "--bogus-flag"],
    ["status", "nosuchrun"],
    ["teardown", "nosuchrun", "--yes"],
]


def _expected_for(args: list[str]) -> str:
    if args[0] == "launch" and args[1].startswith("specs/"):
        return MANIFEST["specs"][args[1].removeprefix("specs/")]
    for entry in MANIFEST["commands"]:
        if entry["args"] == args or entry["args"] == [*args, "--dry-run"]:
            return entry["error"]
    raise KeyError(args)


@pytest.mark.parametrize("args", SUBPROCESS_CASES, ids=lambda args: " ".join(args))
def test_real_process(args: list[str], gpurun_home: Path) -> None:
    env = {
        **os.environ,
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
        "AWS_MAX_ATTEMPTS": "1",
    }  # any AWS call fails: exit 1
    env.pop("GPURUN_DEBUG", None)
    result = subprocess.run(
        [sys.executable, "-m", "gpurun", *args], cwd=CORPUS, env=env, capture_output=True, text=True, timeout=60
    )
    assert_bad_input(result.returncode, result.stdout, result.stderr, _expected_for(args))
    assert _tree(gpurun_home) == []
    assert not Path("/tmp/gpurun-pwned").exists()


# ---- property tests over the spec loader -----------------------------------------------

_KEYS = [
    "name",
    "run",
    "provider",
    "workdir",
    "sync",
    "exclude",
    "env",
    "setup",
    "checkpoint",
    "dir",
    "store",
    "every",
    "keep",
    "resume",
    "nodes",
    "aws",
    "region",
    "profile",
    "instance_type",
    "ami",
    "spot",
    "max_price",
    "disk_gb",
    "ssh_cidr",
    "max_runtime",
    "idle_timeout",
    "ssh",
    "user",
    "port",
    "hosts",
    "identity_file",
    "subnet_id",
    "spec_dir",
    "<<",
    "Name",
    "1",
]
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([0, -1, 2**70, 1.5, -0.0, float("inf"), float("nan"), 1e308]),
    st.text(max_size=8),
    st.sampled_from(
        [
            "5m",
            "-1s",
            "90",
            "auto",
            "s3://",
            "s3://b/x",
            "file://",
            "file:///x",
            "../x",
            ".",
            "g5.xlarge",
            "ami-12345678",
            "local",
            "ssh",
            "aws",
            "0.0.0.0/0",
            "\x00",
            "a\nb",
            "x" * 300,
            b"\xff",
        ]
    ),
)
_VALUES = st.recursive(
    _SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(st.one_of(st.sampled_from(_KEYS), _SCALARS), children, max_size=3),
    ),
    max_leaves=8,
)
_DOCUMENTS = st.dictionaries(st.one_of(st.sampled_from(_KEYS), st.text(max_size=4)), _VALUES, max_size=6)
_FIELDS = {
    "sync": ["exclude"],
    "checkpoint": ["dir", "store", "every", "keep", "resume", "nodes"],
    "aws": [
        "region",
        "profile",
        "instance_type",
        "ami",
        "spot",
        "max_price",
        "disk_gb",
        "ssh_cidr",
        "max_runtime",
        "idle_timeout",
        "nodes",
        "subnet_id",
        "vpc_id",
        "iam_instance_profile",
    ],
    "ssh": ["user", "port", "hosts", "identity_file"],
}
# Valid name and run, then sections with real field names and random values: reaches every validator.
_NEAR_VALID = st.fixed_dictionaries(
    {"name": st.just("exp"), "run": st.just("python train.py")},
    optional={
        "provider": st.sampled_from(["aws", "ssh", "local"]),
        "workdir": _SCALARS,
        "env": st.dictionaries(st.text(max_size=4), _SCALARS, max_size=3),
        "setup": _SCALARS,
        **{
            section: st.dictionaries(
                st.sampled_from(fields), st.one_of(_SCALARS, st.lists(_SCALARS, max_size=2)), max_size=4
            )
            for section, fields in _FIELDS.items()
        },
    },
)
_YAML_TOKENS = st.sampled_from(
    list("ab: -[]{}&*!|>'\"#%@`,?\n\t\\\x00\x85\u2028\ufeff")
    + [
        "name",
        "run",
        "aws",
        "  ",
        "<<",
        "!!python/object:os.system",
        "!!binary",
        "!!int",
        "!!timestamp",
        "!!bool",
        "&a ",
        "*a",
        "---",
        "...",
        "%YAML 1.1",
        "%TAG",
        "9" * 50,
        "name: x\nrun: y\n",
        "\naws:\n  ",
        "spot: ",
        "1e999",
    ]
)
_SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


def _only_own_errors(call: Callable[[], Any]) -> None:
    try:
        call()
    except GpurunError as error:
        assert error.exit_code == 2
        message = str(error)
        assert message and "\n" not in message and len(message) < 600, repr(message)


@_SETTINGS
@given(st.lists(_YAML_TOKENS, max_size=40).map("".join))
def test_yaml_text_never_escapes_as_another_error(text: str) -> None:
    _only_own_errors(lambda: validate_spec(parse_yaml("fuzz.yaml", text), source="fuzz.yaml", spec_dir="/"))


@_SETTINGS
@given(_DOCUMENTS)
def test_random_documents_never_escape_as_another_error(data: dict) -> None:
    _only_own_errors(lambda: validate_spec(data, source="fuzz.yaml", spec_dir="/"))


@_SETTINGS
@given(_NEAR_VALID)
def test_near_valid_documents_through_yaml_never_escape_as_another_error(data: dict) -> None:
    try:
        text = yaml.safe_dump(data)
    except yaml.YAMLError:
        return
    _only_own_errors(lambda: validate_spec(parse_yaml("fuzz.yaml", text), source="fuzz.yaml", spec_dir="/"))


@_SETTINGS
@given(
    st.lists(st.one_of(st.text(max_size=30), st.sampled_from(_KEYS).map(lambda k: f"aws.{k}=")), max_size=3), _SCALARS
)
def test_overrides_never_escape_as_another_error(overrides: list[str], value: Any) -> None:
    def apply() -> None:
        data: dict[str, Any] = {"name": "exp", "run": "python train.py"}
        for override in overrides:
            apply_override(data, override + (str(value) if override.endswith("=") else ""))
        validate_spec(data, source="fuzz.yaml", spec_dir="/")

    _only_own_errors(apply)
