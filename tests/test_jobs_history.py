"""A run's jobs: each one numbered, with its command, code hash, times, exit status and how it ended."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpurun import runs
from tests.helpers import gpurun, gpurun_json, wait_until, write_spec


def status_of(run: str) -> dict:
    return gpurun_json("status", run)[0]


@pytest.fixture
def code(tmp_path: Path) -> Path:
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "train.py").write_text("print('hello')\n")
    return tmp_path


def test_a_finished_job_is_recorded_with_its_exit_status(code: Path) -> None:
    spec = write_spec(code, "name: hist\nprovider: local\nworkdir: code\nrun: echo working; exit 3\n")
    launched = gpurun_json("launch", str(spec))
    run = launched["run"]
    assert [job["number"] for job in launched["jobs"]] == [1]
    assert launched["jobs"][0]["ended_by"] is None and launched["jobs"][0]["exit_code"] is None

    finished = wait_until(lambda: status_of(run)["jobs"][0]["ended_by"], what="job 1 to end") and status_of(run)
    job = finished["jobs"][0]
    assert finished["state"] == "failed" and finished["exit_code"] == 3
    assert job["ended_by"] == "exited" and job["exit_code"] == 3
    assert job["command"] == "echo working; exit 3"
    assert len(job["code"]) == 64 and job["started_at"] <= job["ended_at"]

    shown = gpurun("status", run).stderr
    assert "job 1 of 1: echo working; exit 3, exit 3" in shown
    table = gpurun("status", run, "--jobs").stdout.splitlines()
    assert table[0].split() == ["JOB", "COMMAND", "CODE", "SETUP", "STARTED", "ENDED", "OUTCOME"]
    assert table[1].startswith("1 ") and table[1].rstrip().endswith("exit 3") and job["code"][:12] in table[1]
    gpurun("teardown", run, "--yes")
    assert status_of(run)["jobs"][0]["ended_by"] == "exited", "teardown keeps how the job ended"


def test_a_job_stopped_by_teardown_was_killed(code: Path) -> None:
    spec = write_spec(code, "name: hist\nprovider: local\nworkdir: code\nrun: sleep 300\n")
    run = gpurun_json("launch", str(spec))["run"]
    gpurun("teardown", run, "--yes")
    job = status_of(run)["jobs"][0]
    assert job["ended_by"] == "killed" and job["ended_at"]


def test_status_jobs_needs_a_run() -> None:
    done = gpurun("status", "--jobs", check=False)
    assert done.returncode == 2 and "--jobs goes with a RUN" in done.stderr


def test_a_record_from_before_jobs_shows_its_one_job(gpurun_home: Path) -> None:
    record = {
        "run": "old-abc123",
        "provider": "ssh",
        "state": "succeeded",
        "exit_code": 0,
        "created_at": "2026-01-01T00:00:00+00:00",
        "ended_at": "2026-01-01T01:00:00+00:00",
        "store": "file:///nowhere",
        "spec": {"run": "python train.py"},
        "machines": [],
    }
    runs.save(record)
    shown = gpurun_json("status", "old-abc123")[0]["jobs"]
    assert shown == [
        {
            "number": 1,
            "command": "python train.py",
            "code": None,
            "setup_hash": None,
            "setup_ran": False,
            "started_at": "2026-01-01T00:00:00+00:00",
            "ended_at": "2026-01-01T01:00:00+00:00",
            "exit_code": 0,
            "ended_by": "exited",
        }
    ]


def test_an_older_copy_never_undoes_a_later_job(gpurun_home: Path) -> None:
    record = {
        "run": "r-abc123",
        "provider": "local",
        "state": "succeeded",
        "exit_code": 0,
        "created_at": runs.now_iso(),
        "store": "file:///nowhere",
        "machines": [],
        "jobs": [],
    }
    runs.add_job(record, command="a", code=None, setup_hash=None, setup_ran=False)
    runs.end_job(record, "exited", 0)
    stale = {**record, "jobs": [dict(job) for job in record["jobs"]]}
    runs.add_job(record, command="b", code=None, setup_hash=None, setup_ran=False)
    record["state"] = "running"
    assert runs.save(record)
    assert not runs.save(stale), "a status that read job 1 must not overwrite job 2's record"
    assert [job["command"] for job in runs.load("r-abc123")["jobs"]] == ["a", "b"]
