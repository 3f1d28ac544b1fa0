"""What `--follow` exits with: the job's own status, or a documented one when it did not finish by itself."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from gpurun import paths
from tests.helpers import REPO, gpurun, gpurun_json, wait_until, write_spec


@pytest.fixture
def code(tmp_path: Path) -> Path:
    (tmp_path / "code").mkdir()
    return tmp_path


def follow_in_background(run: str, output: Path) -> subprocess.Popen:
    """`gpurun logs RUN -f` in a child process, returned once it shows the job's first line."""
    follower = subprocess.Popen(
        [sys.executable, "-m", "gpurun", "logs", run, "-f"],
        stdout=output.open("w"),
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    wait_until(lambda: "started" in output.read_text() or follower.poll() is not None, what="the follower")
    assert follower.poll() is None, "the follower is following"
    return follower


def started(run: str) -> bool:
    log = paths.local_runs_dir() / run / "job.log"
    return log.exists() and "started" in log.read_text()


def test_follow_exits_with_the_jobs_own_status(code: Path) -> None:
    ok = gpurun("launch", str(write_spec(code, "name: ok\nworkdir: code\nrun: echo fine\n", "ok.yaml")), "--follow")
    assert ok.returncode == 0 and "the job exited with status 0" in ok.stderr

    spec = write_spec(code, "name: three\nworkdir: code\nrun: echo failing; exit 3\n", "three.yaml")
    failed = gpurun("launch", str(spec), "--follow", check=False)
    assert failed.returncode == 3 and "the job exited with status 3" in failed.stderr

    as_json = gpurun("launch", str(spec), "--follow", "--json", check=False)
    assert as_json.returncode == 3
    final = json.loads(as_json.stdout)
    assert final["state"] == "failed" and final["exit_code"] == 3, "the run as it ended, not as it started"
    assert final["jobs"][0]["ended_by"] == "exited" and "failing" in as_json.stderr

    again = gpurun("exec", final["run"], "--follow", "--", "exit 7", check=False)
    assert again.returncode == 7
    assert gpurun("logs", final["run"], "-f", check=False).returncode == 7


def test_follow_of_a_killed_job_exits_137(code: Path) -> None:
    spec = write_spec(code, "name: killed\nworkdir: code\nrun: echo started; sleep 300\n")
    run = gpurun_json("launch", str(spec))["run"]
    wait_until(lambda: started(run), what="the job to start")
    follower = follow_in_background(run, code / "followed.txt")
    job_pid = int((paths.local_runs_dir() / run / "job.pid").read_text())
    os.killpg(job_pid, signal.SIGKILL)  # the whole job, wrapper included: no exit status is written
    _out, err = follower.communicate(timeout=60)
    assert follower.returncode == 137, err
    assert "ended without recording an exit status (killed)" in err
    gpurun("teardown", run, "--yes", "--no-final-sync")


def test_follow_of_an_interrupted_job_exits_4(code: Path) -> None:
    spec = write_spec(code, "name: spot\nworkdir: code\nrun: echo started; sleep 300\n")
    run = gpurun_json("launch", str(spec))["run"]
    wait_until(lambda: started(run), what="the job to start")
    follower = follow_in_background(run, code / "followed.txt")
    run_dir = paths.local_runs_dir() / run
    # What the agent writes on a spot notice; then the machine's shutdown sends SIGTERM.
    (run_dir / "interrupted").write_text(json.dumps({"action": "terminate", "time": "2026-12-04T00:00:00Z"}))
    os.killpg(int((run_dir / "job.pid").read_text()), signal.SIGTERM)
    _out, err = follower.communicate(timeout=60)
    assert follower.returncode == 4, err
    assert "interrupted (spot reclaim)" in err
    gpurun("teardown", run, "--yes", "--no-final-sync")


def test_follow_of_a_run_torn_down_meanwhile_exits_5(code: Path) -> None:
    spec = write_spec(code, "name: gone\nworkdir: code\nrun: echo started; sleep 300\n")
    run = gpurun_json("launch", str(spec))["run"]
    wait_until(lambda: started(run), what="the job to start")
    follower = follow_in_background(run, code / "followed.txt")
    gpurun("teardown", run, "--yes", "--no-final-sync")
    _out, err = follower.communicate(timeout=60)
    assert follower.returncode == 5, err
    assert "torn down while following" in err
