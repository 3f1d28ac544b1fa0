"""`provider: ssh` end to end through the real CLI and the real sshd on loopback.

launch -> sync -> job -> agent snapshots -> logs -f across an sshd restart
-> teardown with a final sync; plus a re-sync that sends only what changed.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import gpurun, gpurun_json, process_alive, wait_until

TRAIN = """\
import json, os, signal, sys, time
stop = False
def on_term(*_):
    global stop
    stop = True
signal.signal(signal.SIGTERM, on_term)
ckpt = os.environ["GPURUN_CHECKPOINT_DIR"]
os.makedirs(ckpt, exist_ok=True)
start = 0
resume = os.environ.get("GPURUN_RESUME_FROM")
if resume and os.path.exists(os.path.join(resume, "state.json")):
    start = json.load(open(os.path.join(resume, "state.json")))["epoch"]
    print(f"resumed at epoch {start}", flush=True)
print(f"rank {os.environ['GPURUN_NODE_RANK']} of {os.environ['GPURUN_NUM_NODES']} run {os.environ['GPURUN_RUN']}", flush=True)
for epoch in range(start + 1, int(sys.argv[1]) + 1):
    time.sleep(0.3)
    with open(os.path.join(ckpt, "state.json.tmp"), "w") as handle:
        json.dump({"epoch": epoch}, handle)
    os.replace(os.path.join(ckpt, "state.json.tmp"), os.path.join(ckpt, "state.json"))
    print(f"epoch {epoch}", flush=True)
    while epoch == 5 and len(sys.argv) > 2 and not os.path.exists(sys.argv[2]) and not stop:
        time.sleep(0.1)  # the test opens this gate once it has done what must happen mid-job
    if stop:
        print("SIGTERM: saved", flush=True)
        break
"""


@pytest.fixture
def ssh_experiment(sshd, ssh_client_home: Path, tmp_path: Path) -> Path:
    code = tmp_path / "code"
    code.mkdir()
    (code / "train.py").write_text(TRAIN)
    (code / "notes.log").write_text("ignored\n")
    (code / ".gitignore").write_text("*.log\n")
    spec = tmp_path / "box.yaml"
    spec.write_text(
        "name: box\n"
        "provider: ssh\n"
        "workdir: code\n"
        f"run: {sys.executable} train.py 40\n"
        "ssh: {hosts: [testbox]}\n"
        f"checkpoint: {{dir: ckpt, every: 1s, keep: 2, store: 'file://{tmp_path / 'store'}', resume: never}}\n"
    )
    return spec


@pytest.mark.slow
def test_ssh_provider_end_to_end(sshd, ssh_experiment: Path, tmp_path: Path) -> None:
    gate = tmp_path / "carry-on"  # the job holds at epoch 5 until the sshd restart is done, however slow
    ssh_experiment.write_text(ssh_experiment.read_text().replace("train.py 40", f"train.py 40 {gate}"))
    launched = gpurun_json("launch", str(ssh_experiment))
    run = launched["run"]
    assert launched["state"] == "running" and launched["provider"] == "ssh"
    run_dir = sshd.home / "gpurun" / run
    assert (run_dir / "work/train.py").exists()
    assert not (run_dir / "work/notes.log").exists(), ".gitignore rules apply to the sync"
    job_pid = int((run_dir / "job.pid").read_text())
    assert process_alive(job_pid), "the job outlives the SSH connection and the CLI"

    checkpoint = wait_until(lambda: gpurun_json("status", run)[0]["last_checkpoint"], timeout=60, what="snapshot")
    assert checkpoint["seq"] >= 1

    # logs -f keeps going across an sshd restart and stops when the job ends.
    follower = subprocess.Popen(
        [sys.executable, "-m", "gpurun", "logs", run, "-f"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(follower.stdout.readline, "")), daemon=True)
    reader.start()
    wait_until(lambda: any(line.startswith("epoch") for line in lines), what="the follower's first lines")
    sshd.restart()
    time.sleep(3.0)  # the follower reconnects after a 2 s pause
    snapshot = gpurun_json("checkpoint-sync", run)
    assert snapshot["seq"] >= checkpoint["seq"]
    gate.touch()

    follower.wait(timeout=60)
    reader.join(timeout=10)
    out, err = "".join(lines), follower.stderr.read()
    assert "rank 0 of 1 run " + run in out
    epochs = [int(line.split()[1]) for line in out.splitlines() if line.startswith("epoch ")]
    assert epochs == list(range(1, 41)), "no line lost or repeated across the reconnect"
    assert "connection lost" in err and "[gpurun] the job exited with status 0" in err
    assert wait_until(lambda: gpurun_json("status", run)[0]["state"] == "succeeded", what="succeeded")

    down = gpurun_json("teardown", run, "--yes")["runs"][0]

    assert down["final_checkpoint"]["seq"] >= snapshot["seq"]
    wait_until(lambda: not process_alive(job_pid), timeout=10, what="the job to stop")
    assert not run_dir.exists(), "teardown removes the run directory unless --keep-files"
    kept = gpurun("logs", run)
    assert "epoch 40" in kept.stdout, "the machine's copy is gone, the store's is not"
    restored = tmp_path / "restored"
    gpurun("checkpoint-sync", run, "--download", str(restored))
    assert '"epoch": 40' in (restored / "state.json").read_text(), "the final snapshot holds the last epoch"


@pytest.mark.slow
def test_unknown_host_alias_is_one_line_and_leaves_nothing(ssh_experiment: Path, gpurun_home: Path) -> None:
    spec = ssh_experiment.read_text().replace("hosts: [testbox]", "hosts: [nosuchhost.invalid]")
    ssh_experiment.write_text(spec)
    done = gpurun("launch", str(ssh_experiment), check=False)
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "nosuchhost.invalid" in errors[0] and "Traceback" not in done.stderr
    assert not list((gpurun_home / "runs").glob("*.json"))


def test_an_unknown_host_is_refused_when_trust_on_first_use_is_off(
    sshd, ssh_experiment: Path, ssh_client_home: Path
) -> None:
    (ssh_client_home / ".ssh" / "known_hosts").unlink()  # testbox's key is known nowhere now
    strict = ssh_experiment.read_text().replace("{hosts: [testbox]}", "{hosts: [testbox], trust_on_first_use: false}")
    ssh_experiment.write_text(strict)
    refused = gpurun("launch", str(ssh_experiment), check=False)
    assert refused.returncode != 0
    assert "host key for" in refused.stderr and "is not known" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr
    assert not list((sshd.home / "gpurun").glob("box-*")), "nothing was started on the machine"
    assert gpurun_json("status") == [], "the failed launch left no run behind"


@pytest.mark.slow
def test_logs_of_a_run_torn_down_with_keep_files_are_still_shown(sshd, ssh_experiment: Path) -> None:
    ssh_experiment.write_text(ssh_experiment.read_text().replace("train.py 40", "train.py 2"))
    run = gpurun_json("launch", str(ssh_experiment))["run"]
    wait_until(lambda: gpurun_json("status", run)[0]["state"] == "succeeded", timeout=60, what="the job to end")
    gpurun_json("teardown", run, "--yes", "--keep-files")
    shown = gpurun("logs", run)
    assert "epoch 2" in shown.stdout


@pytest.mark.slow
def test_teardown_of_an_unreachable_ssh_machine_stops_short_and_says_so(sshd, ssh_experiment: Path) -> None:
    from gpurun import runs

    run = gpurun_json("launch", str(ssh_experiment))["run"]
    job_pid = int((sshd.home / "gpurun" / run / "job.pid").read_text())
    machines = runs.load(run)["machines"]
    runs.update(run, machines=[{**m, "port": 1} for m in machines])  # the box stopped answering
    refused = gpurun("teardown", run, "--yes", check=False)
    assert refused.returncode == 1
    assert "unreachable, so its job was not stopped" in refused.stderr and f"gpurun teardown {run}" in refused.stderr
    assert gpurun_json("status", run)[0]["state"] != "ended" and process_alive(job_pid)
    runs.update(run, machines=machines)  # it answers again
    gpurun("teardown", run, "--yes")
    wait_until(lambda: not process_alive(job_pid), timeout=20, what="the job to stop")
    assert gpurun_json("status", run)[0]["state"] == "ended"
