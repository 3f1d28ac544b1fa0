"""Recovery on ssh and local: the job's wrapper on the machine restarts a killed job from LATEST.

No laptop process is involved: the launching CLI has exited before the job is killed.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest

from gpurun.store import open_store
from gpurun.store import snapshots as snaps
from tests.helpers import gpurun, gpurun_json, wait_until

# Writes its pid next to itself, a checkpoint per step, and says where it resumed.
TRAIN = """\
import json, os, sys, time
open("train.pid.tmp", "w").write(str(os.getpid()))
os.replace("train.pid.tmp", "train.pid")
ckpt = os.environ["GPURUN_CHECKPOINT_DIR"]
os.makedirs(ckpt, exist_ok=True)
start = 0
resume = os.environ.get("GPURUN_RESUME_FROM")
if resume and os.path.exists(os.path.join(resume, "state.json")):
    start = json.load(open(os.path.join(resume, "state.json")))["step"]
    print(f"resumed at step {start}", flush=True)
for step in range(start + 1, int(sys.argv[1]) + 1):
    time.sleep(0.2)
    with open(os.path.join(ckpt, "state.json.tmp"), "w") as handle:
        json.dump({"step": step}, handle)
    os.replace(os.path.join(ckpt, "state.json.tmp"), os.path.join(ckpt, "state.json"))
    print(f"step {step}", flush=True)
"""


def _experiment(tmp_path: Path, provider: str, steps: int, recovery: str) -> Path:
    code = tmp_path / "code"
    code.mkdir()
    (code / "train.py").write_text(TRAIN)
    spec = tmp_path / "exp.yaml"
    where = "ssh: {hosts: [testbox]}\n" if provider == "ssh" else ""
    spec.write_text(
        f"name: rec\nprovider: {provider}\nworkdir: code\n"
        f"run: {sys.executable} train.py {steps}\n"
        f"{where}"
        f"checkpoint: {{dir: ckpt, every: 1h, store: 'file://{tmp_path / 'store'}', resume: never}}\n"
        f"recovery: {recovery}\n"
    )
    return spec


def _kill_job_after_a_snapshot(tmp_path: Path, run: str, work: Path, at_least: int) -> tuple[int, int]:
    """Ask for a snapshot once the job is past `at_least` steps, then SIGKILL the training process."""
    store = open_store(f"file://{tmp_path / 'store'}")
    ckpt = work / "ckpt" / "state.json"

    def past() -> bool:
        try:
            return json.loads(ckpt.read_text())["step"] >= at_least
        except (OSError, ValueError):
            return False

    wait_until(past, timeout=60, what=f"step {at_least}")
    taken = gpurun_json("checkpoint-sync", run)["seq"]
    saved = json.loads((work / "ckpt" / "state.json").read_text())["step"]
    pid = int((work / "train.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    assert snaps.latest(store, run)["seq"] >= taken
    return saved, pid


def _log(run_dir: Path) -> str:
    return (run_dir / "job.log").read_text(errors="replace")


@pytest.mark.slow
def test_ssh_job_killed_restarts_from_latest_until_the_budget_is_spent(
    sshd, ssh_client_home: Path, tmp_path: Path
) -> None:
    spec = _experiment(tmp_path, "ssh", 100_000, "{max_restarts: 1}")
    run = gpurun_json("launch", str(spec))["run"]  # the CLI has exited from here on
    run_dir = sshd.home / "gpurun" / run
    work = run_dir / "work"

    saved, killed = _kill_job_after_a_snapshot(tmp_path, run, work, 3)
    resumed = wait_until(
        lambda: [line for line in _log(run_dir).splitlines() if line.startswith("resumed at step")],
        timeout=60,
        what="the restarted job",
    )
    assert int((work / "train.pid").read_text()) != killed
    assert int(resumed[0].split()[-1]) >= saved, _log(run_dir)
    assert "restart 1 of 1 from LATEST" in _log(run_dir)
    status = gpurun_json("status", run)[0]
    assert status["state"] == "running" and status["restarts"] == {"used": 1, "max": 1}
    assert "(restart 1/1)" in gpurun("status", run).stdout

    # The budget is spent: the next kill ends the run.
    os.kill(int((work / "train.pid").read_text()), signal.SIGKILL)
    final = wait_until(
        lambda: (lambda s: s if s["state"] != "running" else None)(gpurun_json("status", run)[0]),
        timeout=60,
        what="the run to end",
    )
    assert final["state"] == "failed" and final["exit_code"] == 137, final
    assert "restart budget spent (1 of 1)" in _log(run_dir)
    assert _log(run_dir).count("resumed at step") == 1
    gpurun("teardown", run, "--yes")


@pytest.mark.slow
def test_local_job_failing_restarts_only_with_on_failure(tmp_path: Path, gpurun_home: Path) -> None:
    code_dir = tmp_path / "code"
    spec = _experiment(tmp_path, "local", 3, "{max_restarts: 2, on_failure: true}")
    # Fails after its steps: every attempt resumes past the last one's checkpoint and fails again.
    (code_dir / "train.py").write_text(TRAIN + "sys.exit(5)\n")
    spec.write_text(spec.read_text().replace("every: 1h", "every: 1h, keep: 5"))
    run = gpurun_json("launch", str(spec))["run"]
    run_dir = gpurun_home / "local" / run
    final = wait_until(
        lambda: (lambda s: s if s["state"] != "running" else None)(gpurun_json("status", run)[0]),
        timeout=90,
        what="the run to end",
    )
    log = _log(run_dir)
    assert final["state"] == "failed" and final["exit_code"] == 5, (final, log)
    assert final["restarts"] == {"used": 2, "max": 2}
    assert "restart 1 of 2 from LATEST" in log and "restart 2 of 2 from LATEST" in log
    assert "restart budget spent (2 of 2)" in log
    # Each restore moves the dead job's directory aside; only the newest copy is kept.
    assert len(list((run_dir / "work").glob("ckpt.gpurun-old-*"))) == 1
    # The agent's snapshot before each restart is what the next attempt resumed from.
    assert [line for line in log.splitlines() if line.startswith("resumed at step")] == [
        "resumed at step 3",
        "resumed at step 3",
    ], log
    gpurun("teardown", run, "--yes")


@pytest.mark.slow
def test_local_job_failing_is_not_restarted_without_on_failure(tmp_path: Path, gpurun_home: Path) -> None:
    spec = _experiment(tmp_path, "local", 2, "{max_restarts: 2}")
    (tmp_path / "code" / "train.py").write_text(TRAIN + "sys.exit(5)\n")
    run = gpurun_json("launch", str(spec))["run"]
    final = wait_until(
        lambda: (lambda s: s if s["state"] != "running" else None)(gpurun_json("status", run)[0]),
        timeout=60,
        what="the run to end",
    )
    assert final["state"] == "failed" and final["exit_code"] == 5
    assert final["restarts"] == {"used": 0, "max": 2}
    assert "restart" not in _log(gpurun_home / "local" / run)
    gpurun("teardown", run, "--yes")
