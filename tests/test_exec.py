"""`gpurun exec`: the next job of a live run on the machines it has, over the real sshd on loopback."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.helpers import gpurun, gpurun_json, wait_until

TRAIN = """\
import os, pathlib
ckpt = pathlib.Path(os.environ["GPURUN_CHECKPOINT_DIR"])
ckpt.mkdir(parents=True, exist_ok=True)
version = pathlib.Path("version.txt").read_text().strip()
(ckpt / "state.json").write_text(f'{{"version": "{version}"}}')
print(f"job {os.environ['GPURUN_JOB']} rank {os.environ['GPURUN_NODE_RANK']} sees version {version}", flush=True)
"""


def status_of(run: str) -> dict:
    return gpurun_json("status", run)[0]


def wait_for_job_end(run: str, number: int, timeout: float = 90) -> dict:
    def ended() -> dict | None:
        status = status_of(run)
        jobs = status["jobs"]
        return status if len(jobs) >= number and jobs[number - 1]["ended_by"] else None

    return wait_until(ended, timeout=timeout, what=f"job {number} of {run} to end")


@pytest.fixture
def two_nodes(sshd, ssh_client_home: Path, tmp_path: Path) -> Path:
    code = tmp_path / "code"
    code.mkdir()
    (code / "train.py").write_text(TRAIN)
    (code / "version.txt").write_text("1\n")
    (code / "requirements.txt").write_text("numpy\n")
    for index in range(30):
        (code / f"data-{index}.txt").write_text("x" * 1000)
    spec = tmp_path / "iterate.yaml"
    spec.write_text(
        "name: iterate\n"
        "provider: ssh\n"
        "workdir: code\n"
        "setup: echo setup ran >> ../setup.count; cat requirements.txt\n"
        f"run: {sys.executable} train.py\n"
        "ssh: {hosts: [testbox, testbox]}\n"
        f"checkpoint: {{dir: ckpt, every: 1h, keep: 5, store: 'file://{tmp_path / 'store'}', resume: never}}\n"
    )
    return spec


@pytest.mark.slow
def test_exec_syncs_the_change_skips_setup_and_runs_job_2_on_every_node(sshd, two_nodes: Path, tmp_path: Path) -> None:
    run = gpurun_json("launch", str(two_nodes))["run"]
    run_dirs = [sshd.home / "gpurun" / run, sshd.home / "gpurun" / f"{run}-node1"]
    try:
        assert wait_for_job_end(run, 1)["exit_code"] == 0
        (tmp_path / "code" / "version.txt").write_text("2\n")

        done = gpurun("exec", run, "--follow")
        assert done.returncode == 0
        for rank in (0, 1):
            assert f"[node {rank}] synced 1 changed files (2 B)" in done.stderr, "only the changed bytes travel"
        assert "setup unchanged: not run" in done.stderr
        assert "job 2 rank 0 sees version 2" in done.stdout
        for run_dir in run_dirs:
            assert (run_dir / "setup.count").read_text().count("setup ran") == 1, "setup ran once per node"
            assert "sees version 2" in (run_dir / "job.log").read_text()

        status = wait_for_job_end(run, 2)
        assert [job["number"] for job in status["jobs"]] == [1, 2]
        assert [job["setup_ran"] for job in status["jobs"]] == [True, False]
        assert status["jobs"][0]["code"] != status["jobs"][1]["code"]
        assert status["state"] == "succeeded" and status["jobs"][1]["ended_by"] == "exited"
        assert "job 2 of 2" in gpurun("status", run).stderr

        first = gpurun("logs", run, "--job", "1").stdout
        assert "[node 0] job 1 rank 0 sees version 1" in first and "[node 1] job 1 rank 1 sees version 1" in first
        assert "sees version 2" in gpurun("logs", run, "--job", "2", "--node", "1").stdout

        # A change to a file setup names runs setup again before job 3.
        (tmp_path / "code" / "requirements.txt").write_text("numpy\ntorch\n")
        again = gpurun("exec", run, "--follow", "--", "cat", "requirements.txt")
        assert "setup runs first" in again.stderr and "torch" in again.stdout
        for run_dir in run_dirs:
            assert (run_dir / "setup.count").read_text().count("setup ran") == 2
        assert wait_for_job_end(run, 3)["jobs"][2]["command"] == "cat requirements.txt"
    finally:
        gpurun("teardown", run, "--yes", "--no-final-sync", check=False)


@pytest.mark.slow
def test_exec_refuses_a_running_job_and_replace_takes_a_final_snapshot(two_nodes: Path, tmp_path: Path) -> None:
    run = gpurun_json("launch", str(two_nodes))["run"]
    try:
        wait_for_job_end(run, 1)
        slow = "mkdir -p ckpt && echo late > ckpt/late.txt && echo started && exec sleep 300"
        gpurun("exec", run, "--", slow)
        wait_until(lambda: "started" in gpurun("logs", run).stdout, what="job 2 to start")

        refused = gpurun("exec", run, check=False)
        assert refused.returncode == 1
        assert f"job 2 of {run} is still running" in refused.stderr and "--replace" in refused.stderr

        replaced = gpurun("exec", run, "--replace", "--follow")
        assert replaced.returncode == 0, replaced.stderr
        assert "final checkpoint: snapshot" in replaced.stderr
        snapshots = gpurun_json("checkpoint-sync", run, "--list")
        restored = tmp_path / "restored"
        gpurun("checkpoint-sync", run, "--download", str(restored), "--seq", str(snapshots[-1]["seq"]))
        assert (restored / "late.txt").read_text() == "late\n", "the replaced job's checkpoint was saved first"

        jobs = wait_for_job_end(run, 3)["jobs"]
        assert jobs[1]["ended_by"] == "killed" and jobs[2]["ended_by"] == "exited"
    finally:
        gpurun("teardown", run, "--yes", "--no-final-sync", check=False)


def test_exec_bad_input_changes_nothing(tmp_path: Path, gpurun_home: Path) -> None:
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "train.py").write_text("print('ok')\n")
    spec = tmp_path / "local.yaml"
    spec.write_text("name: loc\nprovider: local\nworkdir: code\nrun: python train.py\n")
    run = gpurun_json("launch", str(spec))["run"]
    wait_for_job_end(run, 1)
    before = json.loads((gpurun_home / "runs" / f"{run}.json").read_text())

    moved = gpurun("exec", run, "--set", "checkpoint.every=1m", check=False)
    assert moved.returncode == 2 and "checkpoint: differs from run" in moved.stderr
    unknown = gpurun("exec", run, "--set", "runn=x", check=False)
    assert unknown.returncode == 2 and "unknown field" in unknown.stderr
    missing = gpurun("exec", "no-such-run", check=False)
    assert missing.returncode == 2 and "unknown run" in missing.stderr
    assert json.loads((gpurun_home / "runs" / f"{run}.json").read_text()) == before

    gpurun("teardown", run, "--yes")
    ended = gpurun("exec", run, check=False)
    assert ended.returncode == 2 and "has ended" in ended.stderr


def test_launch_on_a_run_is_exec_with_the_spec(tmp_path: Path) -> None:
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "train.py").write_text("print('first')\n")
    spec = tmp_path / "local.yaml"
    spec.write_text("name: loc\nprovider: local\nworkdir: code\nrun: python train.py\nenv: {WHO: one}\n")
    run = gpurun_json("launch", str(spec))["run"]
    try:
        wait_for_job_end(run, 1)
        spec.write_text(spec.read_text().replace("python train.py", "echo $WHO").replace("one", "two"))
        done = gpurun("launch", str(spec), "--on", run, "--follow")
        assert done.stdout.splitlines()[-1] == "two"
        assert [job["command"] for job in wait_for_job_end(run, 2)["jobs"]] == ["python train.py", "echo $WHO"]
        clash = gpurun("launch", str(spec), "--on", run, "--name", "x", check=False)
        assert clash.returncode == 2 and "not with --on RUN" in clash.stderr
    finally:
        gpurun("teardown", run, "--yes")
