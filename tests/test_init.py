"""`gpurun init`: a new project from a template, refused over existing files, launchable as written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import gpurun, gpurun_json, wait_until


def test_init_writes_a_project_and_refuses_to_overwrite(tmp_path: Path) -> None:
    project = tmp_path / "my-lstm"
    done = gpurun("init", str(project), "--template", "keras")
    assert "next: gpurun launch" in done.stderr
    assert {p.name for p in project.iterdir()} == {"train.py", "requirements.txt", "experiment.yaml", ".gpurunignore"}
    text = (project / "experiment.yaml").read_text()
    assert "name: my-lstm" in text and "provider: local" in text and "aws:" in text and "KERAS_BACKEND" in text
    again = gpurun("init", str(project), "--template", "keras", check=False)
    assert again.returncode == 2 and "not empty" in again.stderr and "--force" in again.stderr
    assert gpurun("init", str(project), "--template", "pytorch", "--force").returncode == 0


def test_unknown_template_lists_the_known_ones(tmp_path: Path) -> None:
    done = gpurun("init", str(tmp_path / "x"), "--template", "jax", check=False)
    assert done.returncode == 2
    assert done.stderr.strip() == "error: --template 'jax': unknown template; known: keras, pytorch"
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_generated_pytorch_project_launches_and_checkpoints(tmp_path: Path) -> None:
    project = tmp_path / "lstm"
    gpurun("init", str(project), "--template", "pytorch")
    fast = "python train.py --epochs 2 --steps-per-epoch 6 --batch-size 8 --seq-len 32 --hidden 16 --val-batches 1"
    run = gpurun_json(
        "launch", str(project / "experiment.yaml"), "--set", f"run={fast}", "--set", "checkpoint.every=2s"
    )["run"]
    status = wait_until(
        lambda: (s := gpurun_json("status", run)[0])["state"] != "running" and s, timeout=120, what="the job"
    )
    log = gpurun("logs", run).stdout
    assert status["state"] == "succeeded", log
    assert "done:" in log
    down = gpurun_json("teardown", run, "--yes")["runs"][0]
    assert down["final_checkpoint"] and down["final_checkpoint"]["seq"] >= 1
    listing = gpurun_json("checkpoint-sync", run, "--list")
    assert listing and listing[-1]["files"] >= 2  # last.pt and metrics.jsonl
    restored = tmp_path / "restored"
    gpurun("checkpoint-sync", run, "--download", str(restored))
    lines = (restored / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[-1])["epoch"] == 2


@pytest.mark.slow
def test_keras_project_stopped_by_teardown_resumes_through_gpurun(tmp_path: Path) -> None:
    """SIGTERM from teardown, the final snapshot, and `launch --resume`: training continues, not restarts."""
    import re

    project = tmp_path / "kproj"
    gpurun("init", str(project), "--template", "keras")
    slow = (
        "python train.py --epochs 3 --steps-per-epoch 60 --batch-size 8 --seq-len 32 --hidden 16"
        " --val-batches 1 --save-every-steps 5 --log-every 5"
    )
    spec = str(project / "experiment.yaml")
    run = gpurun_json("launch", spec, "--set", f"run={slow}", "--set", "checkpoint.every=1h")["run"]
    wait_until(lambda: "checkpoint saved" in gpurun("logs", run).stdout, timeout=120, what="a first save")
    down = gpurun_json("teardown", run, "--yes")["runs"][0]
    first_log_tail = down["final_checkpoint"]
    assert first_log_tail and first_log_tail["seq"] >= 1, "teardown's SIGTERM save reached the store"

    second = gpurun_json("launch", spec, "--set", f"run={slow}", "--resume", run)["run"]
    status = wait_until(
        lambda: (s := gpurun_json("status", second)[0])["state"] != "running" and s, timeout=240, what="resumed run"
    )
    log = gpurun("logs", second).stdout
    assert status["state"] == "succeeded", log
    resumed = re.search(r"resumed from \S+ at epoch (\d+) step (\d+)", log)
    assert resumed and int(resumed.group(2)) > 0, log
    steps = [int(s) for s in re.findall(r"step (\d+) loss", log)]
    assert steps and min(steps) > int(resumed.group(2)), "steps continue after the saved one"
    gpurun("teardown", second, "--yes")
