"""The quickstart for real, through the CLI in child processes: launch, snapshot, teardown, resume."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from gpurun import paths
from tests.helpers import REPO, gpurun, gpurun_json, process_alive, wait_until


@pytest.fixture
def quickstart(tmp_path: Path) -> Path:
    shutil.copytree(REPO / "experiments/quickstart", tmp_path / "quickstart")
    spec = tmp_path / "quickstart.yaml"
    spec.write_text(
        "name: qs\n"
        "provider: local\n"
        "workdir: quickstart\n"
        "run: python train.py --epochs 15 --samples 150000 --hidden 128\n"
        "checkpoint: {dir: checkpoints, every: 1s, keep: 2, resume: never}\n"
    )
    return spec


def run_status(run: str) -> dict:
    return gpurun_json("status", run)[0]


def losses(log: str) -> list[tuple[int, float]]:
    return [(int(m.group(1)), float(m.group(2))) for m in re.finditer(r"epoch (\d+)/\d+ step \d+ loss ([\d.]+)", log)]


@pytest.mark.slow
def test_quickstart_launch_snapshot_teardown_resume(quickstart: Path, tmp_path: Path) -> None:
    first = gpurun_json("launch", str(quickstart))
    run = first["run"]
    assert first["state"] == "running" and first["provider"] == "local" and first["instances"] == []
    run_dir = paths.local_runs_dir() / run
    job_pid = int((run_dir / "job.pid").read_text())
    assert process_alive(job_pid), "the job must outlive the CLI that started it"

    checkpoint = wait_until(lambda: run_status(run)["last_checkpoint"], timeout=90, what="a snapshot")
    assert checkpoint["seq"] >= 1 and checkpoint["bytes"] > 0
    wait_until(lambda: len(losses((run_dir / "job.log").read_text())) >= 3, what="three epochs")

    down = gpurun_json("teardown", run, "--yes")["runs"][0]
    assert down["run"] == run
    final = down["final_checkpoint"]
    assert final and final["seq"] >= checkpoint["seq"]
    wait_until(lambda: not process_alive(job_pid), timeout=10, what="the job to stop")
    assert not run_dir.exists()
    assert run_status(run)["state"] == "ended"

    restored = tmp_path / "restored"
    gpurun("checkpoint-sync", run, "--download", str(restored))
    saved = json.loads((restored / "state.json").read_text())
    first_log = saved["loss_history"]

    second = gpurun_json("launch", str(quickstart), "--resume", run)
    run2 = second["run"]
    wait_until(lambda: run_status(run2)["state"] == "succeeded", timeout=120, what="the resumed run to finish")
    follow = gpurun("logs", run2, "-f")
    assert "the job exited with status 0" in follow.stderr
    log = follow.stdout
    assert f"at epoch {saved['epoch']} step {saved['step']}" in log
    resumed = losses(log)
    assert resumed[0][0] == saved["epoch"] + 1, "training must continue from the saved epoch"
    assert resumed[0][1] < first_log[0] * 0.8, "the loss must not jump back to its first value"
    assert run_status(run2)["exit_code"] == 0
    gpurun("teardown", run2, "--yes")


@pytest.mark.slow
def test_failed_setup_fails_the_launch_and_leaves_nothing(tmp_path: Path, gpurun_home: Path) -> None:
    (tmp_path / "code").mkdir()
    spec = tmp_path / "bad.yaml"
    spec.write_text("name: broken\nworkdir: code\nsetup: echo preparing; exit 7\nrun: echo never\n")
    done = gpurun("launch", str(spec), check=False)
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert (
        len(errors) == 1
        and "setup failed with exit status 7" in errors[0]
        and "everything it created was removed" in errors[0]
    )
    assert not list((gpurun_home / "runs").glob("*.json"))
    assert not (gpurun_home / "local").exists() or not list((gpurun_home / "local").iterdir())


@pytest.mark.slow
def test_auto_resume_picks_the_previous_run(quickstart: Path) -> None:
    spec = quickstart.read_text().replace("resume: never", "resume: auto").replace("--epochs 15", "--epochs 2")
    quickstart.write_text(spec)
    run = gpurun_json("launch", str(quickstart))["run"]
    wait_until(lambda: run_status(run)["state"] == "succeeded", timeout=60, what="first run")
    gpurun("teardown", run, "--yes")
    plan = gpurun_json("launch", str(quickstart), "--dry-run")
    resume_row = next(row["value"] for row in plan["plan"] if row["item"] == "resume")
    assert resume_row.startswith(f"from {run} snapshot")
