"""Jobs' output kept in the store: readable after teardown, from another GPURUN_HOME, and shipped on a spot notice."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpurun.store import open_store
from gpurun.store.logs import read_job_log, stored_jobs
from tests.helpers import gpurun, gpurun_json, wait_until, write_spec


def ended(run: str, number: int) -> bool:
    jobs = gpurun_json("status", run)[0]["jobs"]
    return len(jobs) >= number and jobs[number - 1]["ended_by"] is not None


@pytest.mark.slow
def test_logs_of_every_job_outlive_teardown_and_read_from_another_home(
    sshd, ssh_client_home: Path, tmp_path: Path
) -> None:
    (tmp_path / "code").mkdir()
    store = f"file://{tmp_path / 'store'}"
    spec = write_spec(
        tmp_path,
        "name: kept\nprovider: ssh\nworkdir: code\n"
        "setup: echo preparing the machine\n"
        "run: for i in 1 2 3; do echo job one line $i; done\n"
        "ssh: {hosts: [testbox]}\n"
        f"checkpoint: {{dir: ckpt, every: 1h, store: '{store}', resume: never}}\n",
    )
    run = gpurun_json("launch", str(spec))["run"]
    wait_until(lambda: ended(run, 1), what="job 1")
    gpurun("exec", run, "--follow", "--", "printf 'job two \\033[2J says hi\\n'; exit 3", check=False)
    wait_until(lambda: ended(run, 2), what="job 2")
    gpurun("teardown", run, "--yes")
    assert not (sshd.home / "gpurun" / run).exists(), "the machine's copy is gone"

    first = gpurun("logs", run, "--job", "1").stdout
    assert "preparing the machine" in first and "job one line 3" in first, "setup's output is kept with job 1's"
    second = gpurun("logs", run)
    assert second.stdout.strip().endswith("job two \\x1b[2J says hi"), "control characters are escaped"
    assert gpurun("logs", run, "-f", check=False).returncode == 3, "the recorded exit status of the last job"

    elsewhere = {"GPURUN_HOME": str(tmp_path / "second-home")}
    other = gpurun("logs", run, "--store", store, "--job", "1", env=elsewhere).stdout
    assert "job one line 1\njob one line 2\njob one line 3" in other
    tail = gpurun("logs", run, "--store", store, "--tail", "1", env=elsewhere).stdout
    assert tail.strip() == "job two \\x1b[2J says hi"
    missing = gpurun("logs", run, "--store", store, "--job", "9", env=elsewhere, check=False)
    assert missing.returncode == 2 and "job(s) 1, 2" in missing.stderr


def test_a_failed_setup_shows_its_last_lines_and_keeps_all_of_them(tmp_path: Path, gpurun_home: Path) -> None:
    (tmp_path / "code").mkdir()
    spec = write_spec(
        tmp_path,
        "name: broken\nworkdir: code\n"
        "setup: for i in $(seq 1 50); do echo setup line $i; done; exit 7\nrun: echo never\n",
    )
    done = gpurun("launch", str(spec), check=False)
    assert done.returncode == 1
    error = done.stderr[done.stderr.index("error:") :].splitlines()
    assert "setup failed with exit status 7 (its last 20 lines below)" in error[0]
    assert error[1:21] == [f"  | setup line {i}" for i in range(31, 51)]
    store_url = f"file://{gpurun_home / 'store'}"
    [run] = os.listdir(gpurun_home / "store")
    assert store_url + f"/{run}/logs/job-0001/" in error[0]
    kept = gpurun("logs", run, "--store", store_url).stdout
    assert [line for line in kept.splitlines() if line.startswith("setup line")] == [
        f"setup line {i}" for i in range(1, 51)
    ]


@pytest.mark.slow
def test_a_spot_notice_ships_the_log_tail(fake_imds, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    (run_dir / "work/ckpt").mkdir(parents=True)
    store_url = f"file://{tmp_path / 'store'}"
    job = subprocess.Popen(["sleep", "300"])
    (run_dir / "job.pid").write_text(str(job.pid))
    (run_dir / "job.log").write_text("epoch 1\n")
    agent = subprocess.Popen(
        [sys.executable, "-m", "gpurun.agent", "--watch", str(run_dir / "work/ckpt"), "--to", store_url]
        + ["--run", "spot-1", "--every", "1h", "--run-dir", str(run_dir), "--spot-notice", "--job", "1"]
        + ["--logs-every", "1h"],
        stdout=open(run_dir / "agent.log", "wb"),
        stderr=subprocess.STDOUT,
    )
    store = open_store(store_url)
    try:
        wait_until(lambda: (run_dir / "agent.status.json").exists(), what="agent start")
        with open(run_dir / "job.log", "a") as log:
            log.write("epoch 2: the last line before the notice\n")
        assert stored_jobs(store, "spot-1") == [], "with logs-every 1h nothing is shipped on a schedule yet"
        fake_imds.interrupt()
        wait_until(lambda: stored_jobs(store, "spot-1") == [1], timeout=30, what="the log after the notice")
        data, problems = read_job_log(store, "spot-1", 1)
        assert data == b"epoch 1\nepoch 2: the last line before the notice\n" and problems == []
    finally:
        job.kill()
        agent.kill()
        job.wait()
        agent.wait()
