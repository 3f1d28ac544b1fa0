"""The command line in-process: exit codes, one-line errors, --json purity, confirmation rules."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from gpurun import __version__
from gpurun.cli import main
from tests.helpers import gpurun


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
        (["agent", "--watch", "/tmp", "--to", "ftp://x"], "use s3://bucket/prefix or file:///absolute/path"),
        (["agent", "--watch", "/tmp", "--to", "file:///tmp/s", "--bogus"], "unrecognized arguments: --bogus"),
        (["agent", "--watch", "/tmp"], "--watch needs --to URL"),
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
    assert set(view) >= {
        "run",
        "provider",
        "state",
        "exit_code",
        "created_at",
        "store",
        "last_checkpoint",
        "instances",
        "cost_usd",
    }
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


def test_launch_json_follow_keeps_stdout_one_document(spec: Path) -> None:
    (spec.parent / "code/train.py").write_text("print('job output line')\n")
    done = gpurun("launch", str(spec), "--json", "--follow", timeout=60)
    result = json.loads(done.stdout)
    assert result["run"].startswith("demo-") and "job output line" not in done.stdout
    assert "job output line" in done.stderr and "the job exited with status 0" in done.stderr
    gpurun("teardown", result["run"], "--yes")


@pytest.mark.parametrize("args", [["status", "--debug"], ["--debug", "status"]])
def test_debug_is_accepted_anywhere(capsys, args: list[str]) -> None:
    code, out, err = run_cli(capsys, *args)
    assert code == 0 and "no runs yet" in out + err


def test_debug_after_the_command_shows_the_traceback(capsys) -> None:
    code, out, err = run_cli(capsys, "logs", "nosuchrun", "--debug")
    assert code == 2 and out == ""
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("error: unknown run 'nosuchrun'")


@pytest.mark.parametrize(
    "args, expected",
    [
        (["run-x", "--store", "file:///tmp/s"], "--store goes with --list or --download"),
        (["run-x", "--to", "file:///tmp/s"], "--to goes with --watch DIR"),
        (["run-x", "--list", "--every", "5m"], "--every goes with --watch DIR"),
        (["run-x", "--keep", "3", "--to", "file:///tmp/s"], "--to, --keep go with --watch DIR"),
        (["run-x", "--list", "--seq", "2"], "--seq goes with --download DIR"),
        (["run-x", "--seq", "2"], "--seq goes with --download DIR"),
        (["run-x", "--list", "--download", "/tmp/never-made"], "--list and --download DIR: one at a time"),
        (["run-x", "--list", "--store", "file://relative/store"], "a file store needs an absolute path"),
    ],
)
def test_checkpoint_sync_rejects_options_it_would_drop(capsys, args: list[str], expected: str) -> None:
    code, out, err = run_cli(capsys, "checkpoint-sync", *args)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], err


def test_logs_of_a_torn_down_local_run_come_from_the_store_or_say_why_not(
    capsys, spec: Path, gpurun_home: Path
) -> None:
    code, out, _ = run_cli(capsys, "launch", str(spec), "--json")
    run = json.loads(out)["run"]
    code, _, _ = run_cli(capsys, "teardown", run, "--yes")
    assert code == 0
    code, out, err = run_cli(capsys, "logs", run)
    assert code == 0 and "[gpurun] run: python train.py" in out, err
    shutil.rmtree(gpurun_home / "store" / run / "logs")
    code, out, err = run_cli(capsys, "logs", run)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and f"run {run} has ended" in lines[0] and "removed at teardown" in lines[0], err


def test_the_agent_has_one_command_line(tmp_path: Path) -> None:
    """`gpurun agent`, `python -m gpurun.agent` and `checkpoint-sync --watch` share one parser and one code path."""
    module_help = subprocess.run(
        [sys.executable, "-m", "gpurun.agent", "--help"], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert gpurun("agent", "--help").stdout == module_help
    for option in ("--watch", "--to", "--every", "--keep", "--once", "--region", "--job", "--restore-from"):
        assert option in module_help
    checkpoints = tmp_path / "ckpt"
    checkpoints.mkdir()
    (checkpoints / "w.bin").write_bytes(b"w" * 100)
    store = f"file://{tmp_path / 'store'}"
    gpurun("agent", "--watch", str(checkpoints), "--to", store, "--run", "one-abc123", "--once")
    assert (tmp_path / "store/one-abc123/LATEST").exists()
