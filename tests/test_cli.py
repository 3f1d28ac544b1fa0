"""The command line in-process: exit codes, one-line errors, --json purity, confirmation rules."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gpurun import __version__
from gpurun.cli import main


def run_cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exited:
        main(list(args))
    out, err = capsys.readouterr()
    return exited.value.code, out, err


@pytest.fixture
def spec(tmp_path: Path) -> Path:
    (tmp_path / "code").mkdir()
    (tmp_path / "code/train.py").write_text("print('hi')\n")
    path = tmp_path / "e.yaml"
    path.write_text("name: demo\nworkdir: code\nrun: python train.py\n")
    return path


def test_version_and_help(capsys) -> None:
    code, out, _ = run_cli(capsys, "--version")
    assert code == 0 and __version__ in out
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0 and "launch" in out and "teardown" in out


def test_status_json_is_one_document_even_when_empty(capsys) -> None:
    code, out, err = run_cli(capsys, "status", "--json")
    assert code == 0 and json.loads(out) == [] and err == ""


def test_dry_run_json_creates_nothing(capsys, spec: Path, gpurun_home: Path) -> None:
    code, out, _ = run_cli(capsys, "launch", str(spec), "--dry-run", "--json")
    assert code == 0
    plan = json.loads(out)
    assert plan["dry_run"] is True and plan["run"].startswith("demo-")
    items = {row["item"] for row in plan["plan"]}
    assert {"machine", "code", "checkpoints", "resume"} <= items
    assert not (gpurun_home / "runs").exists() or not list((gpurun_home / "runs").glob("*.json"))
    assert not (gpurun_home / "local").exists()


@pytest.mark.parametrize(
    "args, expected",
    [
        (["launch", "missing.yaml"], "missing.yaml: no such experiment file"),
        (["status", "nosuchrun"], "unknown run 'nosuchrun'"),
        (["logs", "nosuchrun"], "unknown run 'nosuchrun'"),
        (["teardown", "nosuchrun", "--yes"], "unknown run 'nosuchrun'"),
        (["checkpoint-sync", "nosuchrun"], "unknown run 'nosuchrun'"),
        (["teardown"], "teardown needs RUN names"),
        (["launch"], "Missing argument 'SPEC'"),
        (["launch", "x.yaml", "--bogus"], "No such option '--bogus'"),
        (["checkpoint-sync", "--watch", "/tmp", "--to", "ftp://x"], "use s3://bucket/prefix or file:///absolute/path"),
        (["checkpoint-sync", "--watch", "/tmp", "--to", "file:///tmp/s", "--every", "-1m"], "--every"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, args: list[str], expected: str) -> None:
    code, out, err = run_cli(capsys, *args)
    assert code == 2
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err
    assert "Traceback" not in err


def test_bad_set_and_bad_resume_are_bad_input(capsys, spec: Path) -> None:
    code, _, err = run_cli(capsys, "launch", str(spec), "--set", "aws.spto=true")
    assert code == 2 and "did you mean 'spot'" in err
    code, _, err = run_cli(capsys, "launch", str(spec), "--resume", "ghost-abcdef")
    assert code == 2 and "ghost-abcdef" in err and "no snapshot" in err


def test_teardown_without_a_terminal_needs_yes(capsys, spec: Path, monkeypatch) -> None:
    code, out, _ = run_cli(capsys, "launch", str(spec), "--json")
    run = json.loads(out)["run"]
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    code, _, err = run_cli(capsys, "teardown", run)
    assert code == 2 and "pass --yes" in err
    code, out, _ = run_cli(capsys, "teardown", run, "--yes", "--json")
    assert code == 0
    result = json.loads(out)
    assert result["runs"][0]["run"] == run and isinstance(result["runs"][0]["removed"], list)
    code, out, _ = run_cli(capsys, "status", run, "--json")
    view = json.loads(out)[0]
    assert view["state"] == "ended"
    assert set(view) >= {"run", "provider", "state", "exit_code", "created_at", "store", "last_checkpoint", "instances", "cost_usd"}
    # Teardown is idempotent.
    code, out, _ = run_cli(capsys, "teardown", run, "--yes", "--json")
    assert code == 0


def test_corrupt_record_is_named_while_others_list(capsys, spec: Path, gpurun_home: Path) -> None:
    run_cli(capsys, "launch", str(spec), "--json")
    (gpurun_home / "runs/broken-000000.json").write_text('{"run": "broken-0')
    code, out, err = run_cli(capsys, "status", "--json")
    assert code == 0
    assert len(json.loads(out)) == 1
    assert "broken-000000.json is corrupt" in err
    run_cli(capsys, "teardown", "--all", "--yes")
