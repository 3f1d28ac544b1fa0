"""The GPU at a glance (a fake nvidia-smi on PATH) and `gpurun metrics` from metrics.jsonl in the latest snapshot."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from gpurun import paths
from tests.helpers import gpurun, gpurun_json, wait_until, write_spec

FAKE_NVIDIA_SMI = """#!/bin/sh
echo "0, 87, 10240, 24576"
echo "1, 3, 512, 24576"
"""

TRAIN = """\
import json, os, pathlib
ckpt = pathlib.Path(os.environ["GPURUN_CHECKPOINT_DIR"])
ckpt.mkdir(parents=True, exist_ok=True)
with open(ckpt / "metrics.jsonl", "w") as out:
    for epoch in range(1, 9):
        out.write(json.dumps({"epoch": epoch, "loss": 1.0 / epoch, "val_loss": 1.2 / epoch, "time": 1.0}) + "\\n")
    out.write("not json\\n")
    out.write(json.dumps({"epoch": 9, "loss": 0.1, "note": "\\u001b[2J"}) + "\\n")
print("trained")
"""


@pytest.fixture
def fake_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    program = bin_dir / "nvidia-smi"
    program.write_text(FAKE_NVIDIA_SMI)
    program.chmod(program.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return program


def test_status_shows_each_nodes_gpus_from_nvidia_smi(fake_gpu: Path, tmp_path: Path) -> None:
    (tmp_path / "code").mkdir()
    spec = write_spec(tmp_path, "name: gpu\nworkdir: code\nrun: echo started; sleep 300\n")
    run = gpurun_json("launch", str(spec))["run"]
    try:
        gpus = wait_until(lambda: gpurun_json("status", run)[0]["gpus"], what="GPU figures")
        assert gpus == [
            {
                "node": 0,
                "gpus": [
                    {"index": 0, "util_pct": 87, "memory_used_mib": 10240, "memory_total_mib": 24576},
                    {"index": 1, "util_pct": 3, "memory_used_mib": 512, "memory_total_mib": 24576},
                ],
            }
        ]
        table = gpurun("status").stdout
        assert "GPU" in table.splitlines()[0] and "2 GPUs 45% 10.5/48.0 GiB" in table
        sample = paths.local_runs_dir() / run / "gpu.csv"
        assert wait_until(sample.exists, what="the agent's sample"), "the agent samples nvidia-smi"
    finally:
        gpurun("teardown", run, "--yes", "--no-final-sync")
    assert "GPU" not in gpurun("status").stdout.splitlines()[0], "no column without GPU figures"


def test_metrics_shows_last_values_and_a_sparkline(tmp_path: Path) -> None:
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "train.py").write_text(TRAIN)
    spec = write_spec(
        tmp_path,
        "name: met\nworkdir: code\nrun: python train.py\ncheckpoint: {dir: ckpt, every: 1h, resume: never}\n",
    )
    run = gpurun_json("launch", str(spec))["run"]
    wait_until(lambda: gpurun_json("checkpoint-sync", run, "--list"), what="the snapshot at the job's exit")

    shown = gpurun("metrics", run)
    rows = {line.split()[0]: line.split() for line in shown.stdout.splitlines()[1:]}
    assert rows["loss"][1] == "0.1" and rows["loss"][2] == "0.1" and rows["loss"][3] == "1"
    assert rows["loss"][4] == "█▄▃▂▂▂▁▁▁", "one bar per record, highest first"
    assert set(rows) == {"loss", "val_loss"}, "epoch, time and text are not metrics"
    assert "1 line(s) of metrics.jsonl are not JSON objects" in shown.stderr

    found = gpurun_json("metrics", run)
    assert found["records"] == 9 and found["metrics"]["val_loss"]["count"] == 8
    assert found["metrics"]["loss"]["values"][-1] == 0.1 and found["seq"] >= 1

    # The store is untrusted: a metrics file that does not match its manifest is not read.
    store = Path(gpurun_json("status", run)[0]["store"][len("file://") :])
    [stored] = list((store / run / "snapshots").glob("*/metrics.jsonl"))
    stored.chmod(0o600)
    stored.write_text(json.dumps({"loss": 99}) + "\n")
    tampered = gpurun("metrics", run, check=False)
    assert tampered.returncode == 1 and "does not match its manifest" in tampered.stderr


def test_metrics_without_metrics_jsonl_says_what_writes_it(tmp_path: Path) -> None:
    (tmp_path / "code").mkdir()
    spec = write_spec(
        tmp_path,
        "name: nomet\nworkdir: code\nrun: mkdir -p ckpt && echo w > ckpt/weights.bin\n"
        "checkpoint: {dir: ckpt, every: 1h, resume: never}\n",
    )
    run = gpurun_json("launch", str(spec))["run"]
    wait_until(lambda: gpurun_json("checkpoint-sync", run, "--list"), what="a snapshot")
    done = gpurun("metrics", run, check=False)
    assert done.returncode == 2 and "has no metrics.jsonl" in done.stderr
