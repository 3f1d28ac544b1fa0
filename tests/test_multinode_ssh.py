"""Two nodes over SSH (both the loopback sshd), running the PyTorch template under torchrun with gloo."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, gpurun, gpurun_json, process_alive, wait_until


@pytest.mark.slow
def test_two_ssh_nodes_train_together_with_torchrun(sshd, ssh_client_home: Path, tmp_path: Path) -> None:
    shutil.copytree(REPO / "templates/pytorch", tmp_path / "code")
    train = "--epochs 2 --steps-per-epoch 6 --batch-size 8 --seq-len 32 --hidden 16 --val-batches 1 --log-every 0"
    torchrun = (
        f"{sys.executable} -m torch.distributed.run --nnodes $GPURUN_NUM_NODES --node-rank $GPURUN_NODE_RANK"
        " --master-addr $GPURUN_MASTER_ADDR --master-port $GPURUN_MASTER_PORT --nproc-per-node 1"
    )
    spec = tmp_path / "ddp.yaml"
    spec.write_text(
        "name: ddp\nprovider: ssh\nworkdir: code\n"
        f"run: {torchrun} train.py {train}\n"
        "env: {GLOO_SOCKET_IFNAME: lo, OMP_NUM_THREADS: '1'}\n"
        "ssh: {hosts: [testbox, testbox]}\n"
        f"checkpoint: {{dir: checkpoints, every: 1h, store: 'file://{tmp_path / 'store'}', resume: never}}\n"
    )
    launched = gpurun_json("launch", str(spec))
    run = launched["run"]
    try:
        _check_run(run, sshd)
    finally:
        gpurun("teardown", run, "--yes", "--no-final-sync", check=False)


def _check_run(run: str, sshd) -> None:
    node0 = sshd.home / "gpurun" / run
    node1 = sshd.home / "gpurun" / f"{run}-node1"
    assert (node0 / "work/train.py").exists() and (node1 / "work/train.py").exists(), "separate run directories"
    assert (node0 / "agent.pid").exists() and not (node1 / "agent.pid").exists(), "the agent runs on rank 0"

    status = wait_until(
        lambda: (s := gpurun_json("status", run)[0])["state"] != "running" and s, timeout=240, what="DDP job"
    )
    logs = [gpurun("logs", run, "--node", str(rank)).stdout for rank in (0, 1)]
    assert status["state"] == "succeeded", logs
    for log in logs:
        assert "world_size 2" in log
    merged = gpurun("logs", run).stdout
    assert "[node 0] rank 0 world_size 2" in merged and "[node 1] rank 1 world_size 2" in merged
    hashes = [re.search(r"final weights sha256: (\w+)", log).group(1) for log in logs]
    assert hashes[0] == hashes[1], "both ranks end with identical weights"
    assert (node0 / "work/checkpoints/last.pt").exists()
    assert not (node1 / "work/checkpoints/last.pt").exists(), "only rank 0 saves"

    job_pids = [int((node / "job.pid").read_text()) for node in (node0, node1)]
    down = gpurun_json("teardown", run, "--yes")["runs"][0]
    assert down["final_checkpoint"]["seq"] >= 1
    assert sum(item.startswith("job on") for item in down["removed"]) == 2
    assert not any(process_alive(pid) for pid in job_pids)
    assert not node0.exists() and not node1.exists()


@pytest.mark.slow
def test_one_node_failing_setup_rolls_back_every_node(
    sshd, ssh_client_home: Path, tmp_path: Path, gpurun_home: Path
) -> None:
    (tmp_path / "code").mkdir()
    spec = tmp_path / "half.yaml"
    spec.write_text(
        "name: half\nprovider: ssh\nworkdir: code\n"
        'setup: test "$GPURUN_NODE_RANK" = 0 || { echo "no GPU on this node"; exit 4; }\n'
        "run: sleep 600\n"
        "ssh: {hosts: [testbox, testbox]}\n"
        f"checkpoint: {{store: 'file://{tmp_path / 'store'}', resume: never}}\n"
    )
    before = set((sshd.home / "gpurun").iterdir()) if (sshd.home / "gpurun").exists() else set()
    done = gpurun("launch", str(spec), check=False)
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "setup failed on node 1 with exit status 4" in errors[0], done.stderr
    assert set((sshd.home / "gpurun").iterdir()) == before, "both nodes' run directories are removed"
    assert not list((gpurun_home / "runs").glob("*.json"))


@pytest.mark.slow
def test_checkpoint_nodes_all_keeps_one_store_prefix_per_rank(sshd, ssh_client_home: Path, tmp_path: Path) -> None:
    from gpurun.store import open_store
    from gpurun.store import snapshots as snaps

    (tmp_path / "code").mkdir()
    store = f"file://{tmp_path / 'store'}"
    spec = tmp_path / "all.yaml"
    spec.write_text(
        "name: allranks\nprovider: ssh\nworkdir: code\n"
        'run: mkdir -p "$GPURUN_CHECKPOINT_DIR" && echo "rank $GPURUN_NODE_RANK" > "$GPURUN_CHECKPOINT_DIR/state.txt"\n'
        "ssh: {hosts: [testbox, testbox]}\n"
        f"checkpoint: {{every: 1h, store: '{store}', nodes: all, resume: never}}\n"
    )
    run = gpurun_json("launch", str(spec))["run"]
    try:
        wait_until(lambda: gpurun_json("status", run)[0]["state"] == "succeeded", timeout=60, what="both ranks")
    finally:
        down = gpurun_json("teardown", run, "--yes")["runs"][0]
    assert down["final_checkpoint"] is not None
    opened = open_store(store)
    for rank, name in ((0, run), (1, f"{run}/rank-1")):
        out = tmp_path / f"restored-{rank}"
        wait_until(lambda name=name: snaps.latest(opened, name), timeout=30, what=f"rank {rank}'s snapshot")
        snaps.download_snapshot(opened, name, out)
        assert (out / "state.txt").read_text() == f"rank {rank}\n"
