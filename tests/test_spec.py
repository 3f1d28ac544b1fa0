"""The experiment spec through load_spec: a table of good and bad files.

Good files: the parsed values. Bad files: one SpecError line that names the file,
the field and what would be accepted.
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gpurun.durations import format_duration, parse_duration
from gpurun.errors import BadInput, SpecError
from gpurun.spec import Spec, apply_override, load_spec, parse_yaml, validate_spec

BASE = "name: exp\nrun: python train.py\n"


def write_spec(tmp_path: Path, text: str, name: str = "experiment.yaml") -> Path:
    directory = tmp_path / "project"
    directory.mkdir(exist_ok=True)
    path = directory / name
    path.write_text(textwrap.dedent(text))
    return path


# ---- good files ----------------------------------------------------------------------

GOOD: list[tuple[str, str, list[str], Callable[[Spec, Path], Any]]] = [
    (
        "defaults",
        BASE,
        [],
        lambda s, d: (
            s.provider == "local"
            and s.workdir_path == d
            and s.sync.exclude == []
            and s.env == {}
            and s.setup is None
            and s.checkpoint.dir == "checkpoints"
            and s.checkpoint.store is None
            and s.checkpoint.every == 300
            and s.checkpoint.keep == 3
            and s.checkpoint.resume == "auto"
            and s.aws.region == "us-east-1"
            and s.aws.instance_type == ["g5.xlarge"]
            and s.aws.ami == "dlami-pytorch"
            and s.aws.spot is False
            and s.aws.disk_gb == 100
            and s.aws.ssh_cidr == "auto"
            and s.aws.max_runtime == 12 * 3600
            and s.aws.idle_timeout == 1800
            and s.aws.nodes == 1
            and s.ssh.port == 22
            and s.ssh.hosts == []
            and s.num_nodes == 1
        ),
    ),
    ("duration 90s", BASE + "checkpoint: {every: 90s}\n", [], lambda s, d: s.checkpoint.every == 90),
    ("duration 5m", BASE + "checkpoint: {every: 5m}\n", [], lambda s, d: s.checkpoint.every == 300),
    ("duration 12h", BASE + "aws: {max_runtime: 12h}\n", [], lambda s, d: s.aws.max_runtime == 43200),
    ("duration 1d", BASE + "aws: {max_runtime: 1d}\n", [], lambda s, d: s.aws.max_runtime == 86400),
    ("duration in plain seconds", BASE + "checkpoint: {every: 45}\n", [], lambda s, d: s.checkpoint.every == 45),
    ("duration 1.5h", BASE + "aws: {idle_timeout: 1.5h}\n", [], lambda s, d: s.aws.idle_timeout == 5400),
    (
        "idle_timeout null turns it off",
        BASE + "aws: {idle_timeout: null}\n",
        [],
        lambda s, d: s.aws.idle_timeout is None,
    ),
    (
        "instance_type string becomes a list",
        BASE + "aws: {instance_type: g6.xlarge}\n",
        [],
        lambda s, d: s.aws.instance_type == ["g6.xlarge"],
    ),
    (
        "instance_type list keeps its order",
        BASE + "aws: {instance_type: [g5.xlarge, g6.xlarge, p4d.24xlarge]}\n",
        [],
        lambda s, d: s.aws.instance_type == ["g5.xlarge", "g6.xlarge", "p4d.24xlarge"],
    ),
    (
        "env numbers and booleans become strings",
        BASE + "env: {EPOCHS: 50, LR: 0.001, DEBUG: true, KERAS_BACKEND: torch}\n",
        [],
        lambda s, d: s.env == {"EPOCHS": "50", "LR": "0.001", "DEBUG": "true", "KERAS_BACKEND": "torch"},
    ),
    (
        "workdir relative to the spec file's directory",
        BASE + "workdir: src\n",
        [],
        lambda s, d: s.workdir_path == d / "src",
    ),
    (
        "workdir .. reaches the parent of the spec's directory",
        BASE + "workdir: ..\n",
        [],
        lambda s, d: s.workdir_path == d.parent,
    ),
    (
        "the whole design example",
        """\
        name: sine-lstm
        provider: aws
        workdir: .
        sync:
          exclude: [data/, "*.npy"]
        env: {KERAS_BACKEND: torch}
        setup: pip install -r requirements.txt
        run: python train.py --epochs 50
        checkpoint:
          dir: checkpoints
          store: s3://my-bucket/gpurun
          every: 5m
          keep: 3
          resume: auto
        aws:
          region: us-east-1
          profile: null
          instance_type: [g5.xlarge, g6.xlarge]
          ami: dlami-pytorch
          spot: true
          max_price: null
          disk_gb: 100
          ssh_cidr: auto
          max_runtime: 12h
          idle_timeout: 30m
          nodes: 1
        ssh:
          user: ubuntu
          port: 22
          hosts: []
        """,
        [],
        lambda s, d: (
            s.name == "sine-lstm"
            and s.provider == "aws"
            and s.sync.exclude == ["data/", "*.npy"]
            and s.checkpoint.store == "s3://my-bucket/gpurun"
            and s.aws.spot is True
            and s.aws.instance_type == ["g5.xlarge", "g6.xlarge"]
            and s.ssh.user == "ubuntu"
        ),
    ),
    (
        "store file:// with absolute path",
        BASE + "checkpoint: {store: 'file:///data/ckpt/'}\n",
        [],
        lambda s, d: s.checkpoint.store == "file:///data/ckpt",
    ),
    (
        "ami forms: ami-id",
        BASE + "aws: {ami: ami-0123456789abcdef0}\n",
        [],
        lambda s, d: s.aws.ami == "ami-0123456789abcdef0",
    ),
    (
        "ami forms: ssm path",
        BASE + "aws: {ami: 'ssm:/aws/service/x/ami-id'}\n",
        [],
        lambda s, d: s.aws.ami.startswith("ssm:/"),
    ),
    (
        "ami forms: name@owner",
        BASE + "aws: {ami: 'name:Deep Learning*@amazon'}\n",
        [],
        lambda s, d: s.aws.ami.startswith("name:"),
    ),
    (
        "ssh_cidr normalised",
        BASE + "aws: {ssh_cidr: 203.0.113.7/24}\n",
        [],
        lambda s, d: s.aws.ssh_cidr == "203.0.113.0/24",
    ),
    (
        "max_price 0 and disk 8",
        BASE + "aws: {max_price: 0, disk_gb: 8}\n",
        [],
        lambda s, d: s.aws.max_price == 0 and s.aws.disk_gb == 8,
    ),
    (
        "provider ssh with hosts",
        BASE + "provider: ssh\nssh: {hosts: [gpu-box, 'me@10.0.0.2:2222']}\n",
        [],
        lambda s, d: s.num_nodes == 2,
    ),
    ("aws nodes count", BASE + "provider: aws\naws: {nodes: 4}\n", [], lambda s, d: s.num_nodes == 4),
    ("--set env.X=1 works", BASE, ["env.X=1"], lambda s, d: s.env == {"X": "1"}),
    ("--set aws.spot=false works", BASE + "aws: {spot: true}\n", ["aws.spot=false"], lambda s, d: s.aws.spot is False),
    ("--set a duration", BASE, ["checkpoint.every=90s"], lambda s, d: s.checkpoint.every == 90),
    (
        "--set a list",
        BASE,
        ["aws.instance_type=[g6.xlarge, g5.xlarge]"],
        lambda s, d: s.aws.instance_type == ["g6.xlarge", "g5.xlarge"],
    ),
    (
        "--set into a section the file lacks",
        BASE,
        ["ssh.port=2222", "aws.region=eu-west-1"],
        lambda s, d: s.ssh.port == 2222 and s.aws.region == "eu-west-1",
    ),
    ("--set later wins", BASE, ["checkpoint.keep=5", "checkpoint.keep=7"], lambda s, d: s.checkpoint.keep == 7),
    ("--set a top-level field", BASE, ["run=python other.py --fast"], lambda s, d: s.run == "python other.py --fast"),
    ("--set env value with '='", BASE, ["env.OPTS=a=b"], lambda s, d: s.env == {"OPTS": "a=b"}),
    (
        "YAML merge key",
        BASE + "aws: {<<: {spot: true}, region: eu-west-1}\n",
        [],
        lambda s, d: s.aws.spot is True and s.aws.region == "eu-west-1",
    ),
    (
        "recovery: default 0 off spot",
        BASE,
        [],
        lambda s, d: s.recovery.max_restarts == 0 and s.recovery.on_failure is False,
    ),
    (
        "recovery: default 3 on an aws spot machine",
        BASE + "provider: aws\naws: {spot: true}\n",
        [],
        lambda s, d: s.recovery.max_restarts == 3,
    ),
    (
        "recovery: no default for several spot nodes",
        BASE + "provider: aws\naws: {spot: true, nodes: 2}\n",
        [],
        lambda s, d: s.recovery.max_restarts == 0,
    ),
    (
        "recovery: given",
        BASE + "recovery: {max_restarts: 5, on_failure: true}\n",
        ["recovery.max_restarts=2"],
        lambda s, d: s.recovery.max_restarts == 2 and s.recovery.on_failure is True,
    ),
    ("UTF-8 byte order mark", "\ufeff" + BASE, [], lambda s, d: s.name == "exp"),
    (
        "a multi-line run command",
        BASE.replace("run: python train.py\n", "run: |\n  set -e\n  python train.py\n"),
        [],
        lambda s, d: s.run == "set -e\npython train.py\n",
    ),
]


@pytest.mark.parametrize(("text", "overrides", "check"), [case[1:] for case in GOOD], ids=[case[0] for case in GOOD])
def test_good_specs(tmp_path: Path, text: str, overrides: list[str], check) -> None:
    (tmp_path / "project" / "src").mkdir(parents=True)
    path = write_spec(tmp_path, text)
    spec = load_spec(path, overrides)
    assert check(spec, (tmp_path / "project").resolve()), spec.model_dump()


# ---- bad files -----------------------------------------------------------------------

# (id, file text, overrides, substrings the one line must contain, in order)
BAD: list[tuple[str, str, list[str], list[str]]] = [
    ("invalid YAML with line", BASE + "aws:\n  region: [us-east-1\n", [], ["line ", "invalid YAML"]),
    ("invalid YAML: tab indentation", BASE + "aws:\n\tspot: true\n", [], ["line 4", "invalid YAML", "'\\t'"]),
    (
        "unknown key, did you mean",
        BASE + "chekpoint: {every: 5m}\n",
        [],
        ["chekpoint", "unknown key", "did you mean 'checkpoint'"],
    ),
    (
        "unknown nested key, did you mean",
        BASE + "aws: {instance_typ: g5.xlarge}\n",
        [],
        ["aws.instance_typ", "unknown key", "did you mean 'instance_type'"],
    ),
    (
        "unknown key with no near match lists the known ones",
        BASE + "zzz: 1\n",
        [],
        ["zzz", "unknown key", "known: name, provider"],
    ),
    ("missing name", "run: python train.py\n", [], ["name", "required field is missing", "name: my-experiment"]),
    ("missing run", "name: exp\n", [], ["run", "required field is missing", "run: python train.py"]),
    ("wrong type: keep", BASE + "checkpoint: {keep: many}\n", [], ["checkpoint.keep", "valid integer", "'many'"]),
    ("wrong type: spot", BASE + "aws: {spot: sometimes}\n", [], ["aws.spot", "valid boolean", "'sometimes'"]),
    ("wrong type: section is a string", BASE + "aws: us-east-1\n", [], ["aws", "mapping", "aws: {region: us-east-1}"]),
    ("wrong type: exclude a string", BASE + "sync: {exclude: data/}\n", [], ["sync.exclude", "expected a list"]),
    ("wrong type: run a list", "name: exp\nrun: [python, train.py]\n", [], ["run", "valid string"]),
    (
        "negative duration",
        BASE + "checkpoint: {every: -5m}\n",
        [],
        ["checkpoint.every", "'-5m' is not a duration", "90s, 5m, 12h, 1d"],
    ),
    ("negative number duration", BASE + "checkpoint: {every: -5}\n", [], ["checkpoint.every", "greater than zero"]),
    (
        "malformed duration",
        BASE + "aws: {max_runtime: 5 minutes}\n",
        [],
        ["aws.max_runtime", "not a duration", "like 90s"],
    ),
    ("duration too long", BASE + "aws: {max_runtime: 400d}\n", [], ["aws.max_runtime", "at most 366d"]),
    ("zero duration", BASE + "checkpoint: {every: 0s}\n", [], ["checkpoint.every", "greater than zero"]),
    (
        "unknown store scheme",
        BASE + "checkpoint: {store: 'gs://bucket/x'}\n",
        [],
        ["checkpoint.store", "not a store URL", "s3://bucket/prefix"],
    ),
    (
        "s3 URL with no bucket",
        BASE + "checkpoint: {store: 's3://'}\n",
        [],
        ["checkpoint.store", "no valid bucket", "s3://bucket/prefix"],
    ),
    (
        "s3 URL with bad bucket",
        BASE + "checkpoint: {store: 's3://My_Bucket/x'}\n",
        [],
        ["checkpoint.store", "no valid bucket"],
    ),
    (
        "file store relative",
        BASE + "checkpoint: {store: 'file://relative/x'}\n",
        [],
        ["checkpoint.store", "absolute path"],
    ),
    (
        "workdir that does not exist",
        BASE + "workdir: nowhere\n",
        [],
        ["workdir", "'nowhere' is not a directory", "relative to the experiment file"],
    ),
    ("workdir that is a file", BASE + "workdir: experiment.yaml\n", [], ["workdir", "is not a directory"]),
    ("keep < 1", BASE + "checkpoint: {keep: 0}\n", [], ["checkpoint.keep", "greater than or equal to 1", "got 0"]),
    ("nodes < 1", BASE + "aws: {nodes: 0}\n", [], ["aws.nodes", "greater than or equal to 1"]),
    (
        "bad ssh_cidr",
        BASE + "aws: {ssh_cidr: 'everyone'}\n",
        [],
        ["aws.ssh_cidr", "not a CIDR", "auto or an address block"],
    ),
    ("max_price < 0", BASE + "aws: {max_price: -0.5}\n", [], ["aws.max_price", "greater than or equal to 0"]),
    ("max_price infinite", BASE + "aws: {max_price: .inf}\n", [], ["aws.max_price", "finite number"]),
    ("disk_gb too small", BASE + "aws: {disk_gb: 4}\n", [], ["aws.disk_gb", "greater than or equal to 8"]),
    ("bad region", BASE + "aws: {region: us-east}\n", [], ["aws.region", "not an AWS region", "like us-east-1"]),
    ("bad AMI form", BASE + "aws: {ami: ubuntu-22.04}\n", [], ["aws.ami", "not an AMI", "ami-...", "dlami-base"]),
    (
        "bad instance type",
        BASE + "aws: {instance_type: [g5.xlarge, 'G5 XL']}\n",
        [],
        ["aws.instance_type", "'G5 XL'", "like g5.xlarge"],
    ),
    ("empty instance type list", BASE + "aws: {instance_type: []}\n", [], ["aws.instance_type", "at least one"]),
    ("provider ssh without hosts", BASE + "provider: ssh\n", [], ["ssh.hosts", "provider ssh needs at least one host"]),
    (
        "unknown provider",
        BASE + "provider: gcp\n",
        [],
        ["provider", "'gcp' is not accepted", "'aws', 'ssh' or 'local'"],
    ),
    ("resume value", BASE + "checkpoint: {resume: always}\n", [], ["checkpoint.resume", "'auto' or 'never'"]),
    ("bad name", "name: my experiment\nrun: x\n", [], ["name", "not a run name", "letters, digits"]),
    ("name with trailing newline", 'name: "exp\\n"\nrun: x\n', [], ["name", "'exp\\n' is not a run name"]),
    ("env bad name", BASE + "env: {'1BAD': x}\n", [], ["env", "'1BAD' is not an environment variable name"]),
    ("env nested value", BASE + "env: {A: {b: 1}}\n", [], ["env", "env.A must be a string, number or boolean"]),
    (
        "checkpoint.dir absolute",
        BASE + "checkpoint: {dir: /etc}\n",
        [],
        ["checkpoint.dir", "inside workdir", "like checkpoints"],
    ),
    ("checkpoint.dir escapes", BASE + "checkpoint: {dir: ../../x}\n", [], ["checkpoint.dir", "inside workdir"]),
    ("exclude escapes", BASE + "sync: {exclude: ['../secrets']}\n", [], ["sync.exclude", "outside workdir"]),
    ("port out of range", BASE + "ssh: {port: 70000}\n", [], ["ssh.port", "less than or equal to 65535"]),
    ("ssh user option injection", BASE + "ssh: {user: '-oProxyCommand=x'}\n", [], ["ssh.user", "not a user name"]),
    ("subnet id form", BASE + "aws: {subnet_id: 'my subnet'}\n", [], ["aws.subnet_id", "subnet-0123456789abcdef0"]),
    (
        "recovery key misspelt",
        BASE + "recovery: {max_restart: 2}\n",
        [],
        ["recovery.max_restart", "unknown key", "did you mean 'max_restarts'"],
    ),
    ("recovery negative", BASE + "recovery: {max_restarts: -1}\n", [], ["recovery.max_restarts", "greater than"]),
    ("recovery not a mapping", BASE + "recovery: 3\n", [], ["recovery", "recovery: {max_restarts: 3}"]),
    (
        "recovery with several nodes",
        BASE + "provider: aws\naws: {nodes: 2}\nrecovery: {max_restarts: 1}\n",
        [],
        ["recovery.max_restarts", "2 nodes is not supported", "recovery: {max_restarts: 0}"],
    ),
    ("duplicate key", BASE + "name: again\n", [], ["line 3", "name", "duplicate key (first on line 1)"]),
    ("a list instead of a mapping", "- name: exp\n- run: x\n", [], ["expected a mapping of fields", "got list"]),
    ("empty file", "", [], ["empty experiment file", "name and run"]),
    ("only a comment", "# nothing\n", [], ["empty experiment file"]),
    (
        "--set on an unknown path",
        BASE,
        ["aws.spto=false"],
        ["--set aws.spto=false", "aws.spto", "unknown field", "did you mean 'spot'"],
    ),
    ("--set on an unknown section", BASE, ["chekpoint.every=5m"], ["--set", "chekpoint", "did you mean 'checkpoint'"]),
    (
        "--set with a type error",
        BASE,
        ["aws.disk_gb=big"],
        ["experiment.yaml (--set aws.disk_gb=big)", "aws.disk_gb", "valid integer"],
    ),
    ("--set with no '='", BASE, ["nodot"], ["--set nodot", "FIELD=VALUE", "aws.spot=false"]),
    ("--set below a field", BASE, ["name.x=1"], ["--set name.x=1", "name is a field, not a section"]),
    ("--set env too deep", BASE, ["env.A.B=1"], ["--set env.A.B=1", "env.NAME=value"]),
    (
        "--set bad duration",
        BASE,
        ["checkpoint.every=soon"],
        ["--set checkpoint.every=soon", "checkpoint.every", "not a duration"],
    ),
]


@pytest.mark.parametrize(("text", "overrides", "expected"), [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_specs(tmp_path: Path, text: str, overrides: list[str], expected: list[str]) -> None:
    path = write_spec(tmp_path, text)
    with pytest.raises(SpecError) as excinfo:
        load_spec(path, overrides)
    message = str(excinfo.value)
    assert "\n" not in message and len(message) < 400, message
    assert excinfo.value.exit_code == 2
    if not message.startswith("--set"):
        assert message.startswith(str(path)), message  # names the file
    position = 0
    for part in expected:
        found = message.find(part, position)
        assert found >= 0, f"{part!r} not in (the rest of) {message!r}"
        position = found + len(part)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"nope\.yaml: no such experiment file$"):
        load_spec(tmp_path / "nope.yaml")


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="is a directory; give the experiment's YAML file"):
        load_spec(tmp_path)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"name: caf\xe9\nrun: x\n")
    with pytest.raises(SpecError, match=r"latin1\.yaml: line 1: not UTF-8 text \(byte 9\)"):
        load_spec(path)


def test_huge_file(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    path.write_bytes(BASE.encode() + b"#" * 1_100_000 + b"\n")
    with pytest.raises(SpecError, match="larger than 1 MB"):
        load_spec(path)


def test_fifo_is_not_read(tmp_path: Path) -> None:
    import os

    path = tmp_path / "pipe.yaml"
    os.mkfifo(path)
    with pytest.raises(SpecError, match="not a regular file"):
        load_spec(path)  # would block forever if it were opened


def test_errors_are_bad_input() -> None:
    assert issubclass(SpecError, BadInput)


def test_spec_dir_is_not_a_key(tmp_path: Path) -> None:
    path = write_spec(tmp_path, BASE + "spec_dir: /\n")
    with pytest.raises(SpecError, match="spec_dir: unknown key"):
        load_spec(path)


def test_workdir_is_resolved_from_the_spec_not_the_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "project" / "code").mkdir(parents=True)
    path = write_spec(tmp_path, BASE + "workdir: code\n")
    monkeypatch.chdir("/")
    assert load_spec(path).workdir_path == (tmp_path / "project" / "code").resolve()
    monkeypatch.chdir(tmp_path)
    assert load_spec(Path("project/experiment.yaml")).workdir_path == (tmp_path / "project" / "code").resolve()


def test_overrides_do_not_touch_the_file(tmp_path: Path) -> None:
    path = write_spec(tmp_path, BASE)
    before = path.read_bytes()
    load_spec(path, ["aws.spot=true", "env.A=b"])
    assert path.read_bytes() == before


def test_to_record_is_plain_data_with_absolute_workdir(tmp_path: Path) -> None:
    import json

    spec = load_spec(write_spec(tmp_path, BASE + "env: {A: 1}\n"))
    record = spec.to_record()
    assert json.loads(json.dumps(record)) == record
    assert record["workdir"] == str((tmp_path / "project").resolve())
    assert "spec_dir" not in record


def test_parse_yaml_and_validate_spec_directly(tmp_path: Path) -> None:
    data = parse_yaml("inline.yaml", BASE)
    apply_override(data, "checkpoint.keep=9")
    spec = validate_spec(data, source="inline.yaml", spec_dir=tmp_path)
    assert spec.checkpoint.keep == 9 and spec.workdir_path == tmp_path.resolve()


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("90s", 90), ("5m", 300), ("12h", 43200), ("1d", 86400), ("2.5m", 150), (" 7 ", 7), (30, 30), (0.5, 0.5)],
)
def test_parse_duration(text, seconds) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text",
    ["-1s", "5x", "", "1e3", "5 minutes", "0", 0, -3, True, None, [5], float("nan"), float("inf"), 10**400, "367d"],
)
def test_parse_duration_rejects(text) -> None:
    with pytest.raises(ValueError) as excinfo:
        parse_duration(text)
    assert "\n" not in str(excinfo.value) and len(str(excinfo.value)) < 200


def test_format_duration() -> None:
    assert [format_duration(s) for s in (45, 300, 330, 7800, 3 * 86400 + 7200)] == [
        "45s",
        "5m",
        "5m30s",
        "2h10m",
        "3d2h",
    ]
