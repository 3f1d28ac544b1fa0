"""The training templates, end to end: real torch and keras on CPU, run as the
job gpurun starts (a subprocess with GPURUN_CHECKPOINT_DIR / GPURUN_RESUME_FROM).

Runs are tiny (tens of steps) and single-threaded, so each takes a few seconds,
mostly interpreter and framework start-up.  Nothing waits a fixed time: tests
watch the job's output for the line they need and then signal it.  Every check
holds wherever the signal lands, and a resumed run is compared bit for bit
with an uninterrupted run of the same length.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 240  # seconds for one run; generous for a loaded 2-core machine

# torch and keras come with the test extras: a missing one fails here, it is never skipped.
pytestmark = [pytest.mark.slow]


@dataclass(frozen=True)
class Template:
    name: str
    script: Path
    steps_per_epoch: int
    save_every: int  # for the SIGKILL test: saves that fall inside an epoch
    flags: tuple[str, ...]

    def cmd(self, *args: str) -> list[str]:
        return [sys.executable, str(self.script), *self.flags, *args]

    def resumed_from(self, source: Path) -> str:
        """What the 'resumed from' line names for a checkpoint in `source`."""
        if self.name == "pytorch":
            return str(source / "last.pt")
        return str(source)  # keras: GPURUN_RESUME_FROM itself, or <ckpt>/backup

    def saved(self, ckpt_dir: Path) -> dict:
        """Position and optimizer step count of the checkpoint in ckpt_dir."""
        if self.name == "pytorch":
            import torch

            ckpt = torch.load(ckpt_dir / "last.pt", map_location="cpu", weights_only=True)
            adam_steps = {int(s["step"]) for s in ckpt["optimizer"]["state"].values()}
            assert len(adam_steps) == 1
            return {"epoch": ckpt["epoch"], "step": ckpt["step"], "optimizer_steps": adam_steps.pop()}
        import h5py

        with h5py.File(ckpt_dir / "backup" / "latest.weights.h5", "r") as f:
            meta = json.loads(f.attrs["gpurun_position"])  # the position the template resumes from
            iterations = int(f["optimizer/vars/0"][()])  # Keras 3 Adam: vars/0 is `iterations`
        return {"epoch": meta["epoch"], "step": meta["step"], "optimizer_steps": iterations}

    def files(self, ckpt_dir: Path) -> set[str]:
        return {str(p.relative_to(ckpt_dir)) for p in ckpt_dir.rglob("*") if p.is_file()}


SMALL = ("--batch-size", "16", "--hidden", "32", "--layers", "1", "--seq-len", "64", "--val-batches", "2")
PYTORCH = Template("pytorch", ROOT / "templates" / "pytorch" / "train.py", 40, 15, ("--steps-per-epoch", "40", *SMALL))
KERAS = Template("keras", ROOT / "templates" / "keras" / "train.py", 20, 7, ("--steps-per-epoch", "20", *SMALL))


def _keras_param():
    return pytest.param(KERAS, id="keras")


TEMPLATES = [pytest.param(PYTORCH, id="pytorch"), _keras_param()]


@pytest.fixture(scope="module")
def base_env(tmp_path_factory) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("GPURUN_") and k not in {"WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"}
    }
    env.update(
        {
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "CUDA_VISIBLE_DEVICES": "",  # CPU everywhere: float32 and bit-reproducible
            "KERAS_BACKEND": "torch",
            "KERAS_HOME": str(tmp_path_factory.mktemp("keras-home")),
        }
    )
    return env


def job_env(base: dict[str, str], ckpt_dir: Path, resume_from: Path | None = None) -> dict[str, str]:
    env = dict(base, GPURUN_CHECKPOINT_DIR=str(ckpt_dir))
    if resume_from is not None:
        env["GPURUN_RESUME_FROM"] = str(resume_from)
    return env


class Job:
    """A running template whose output lines can be waited for."""

    def __init__(self, cmd: list[str], env: dict[str, str], cwd: Path) -> None:
        self.proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self.ended = False
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self.ended = True
            self._cond.notify_all()

    @property
    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = TIMEOUT) -> re.Match:
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    if m := rx.search(line):
                        return m
                seen = len(self.lines)
                if self.ended:
                    pytest.fail(f"job ended before printing {pattern!r}:\n{self.output}")
                left = deadline - time.monotonic()
                if left <= 0:
                    pytest.fail(f"no {pattern!r} within {timeout}s:\n{self.output}")
                self._cond.wait(left)

    def finish(self, timeout: float = TIMEOUT) -> int:
        rc = self.proc.wait(timeout)
        self._reader.join(timeout)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def jobs():
    started: list[Job] = []

    def start(cmd: list[str], env: dict[str, str], cwd: Path) -> Job:
        job = Job(cmd, env, cwd)
        started.append(job)
        return job

    yield start
    for job in started:  # never leave a trainer running after a failed test
        job.kill()


def run(cmd: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT)


def ok(result: subprocess.CompletedProcess) -> str:
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "Traceback" not in out, out
    return result.stdout


def final_sha(output: str) -> str:
    shas = re.findall(r"^final weights sha256: ([0-9a-f]{64})$", output, re.M)
    assert len(shas) == 1, output
    return shas[0]


def step_losses(output: str) -> list[tuple[int, float]]:
    return [(int(s), float(v)) for s, v in re.findall(r"^  step (\d+) loss (\S+)", output, re.M)]


def metrics(ckpt_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (ckpt_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(base_env, tmp_path_factory):
    """Uninterrupted runs, one per (template, epochs), shared by the tests."""
    cache: dict[tuple[str, int], dict] = {}

    def get(template: Template, epochs: int) -> dict:
        key = (template.name, epochs)
        if key not in cache:
            work = tmp_path_factory.mktemp(f"ref-{template.name}-{epochs}")
            ckpt = work / "ckpt"
            out = ok(run(template.cmd("--epochs", str(epochs), "--log-every", "1"), job_env(base_env, ckpt), work))
            cache[key] = {"output": out, "ckpt": ckpt, "sha": final_sha(out), "first_loss": step_losses(out)[0][1]}
        return cache[key]

    return get


def check_resumed_run(template: Template, out: str, ckpt_dir: Path, saved: dict, epochs: int, reference: dict) -> None:
    spe = template.steps_per_epoch
    steps = [s for s, _ in step_losses(out)]
    # the step count goes on from the checkpoint, one by one, to the end
    assert steps == list(range(saved["step"] + 1, epochs * spe + 1)), out
    assert f"done: epoch {epochs} step {epochs * spe} " in out
    # the first step after resuming trains a model that had already learned
    first_loss = step_losses(out)[0][1]
    assert first_loss < 0.5 * reference["first_loss"], (first_loss, reference["first_loss"])
    # optimizer state came along: Adam's step count ends where the run's does
    end = template.saved(ckpt_dir)
    assert end == {"epoch": epochs, "step": epochs * spe, "optimizer_steps": epochs * spe}
    # and the whole thing is the uninterrupted run, bit for bit
    assert final_sha(out) == reference["sha"]
    # metrics.jsonl: one line per epoch, none twice, none lost
    lines = metrics(ckpt_dir)
    assert [m["epoch"] for m in lines] == list(range(1, epochs + 1))
    assert [m["step"] for m in lines] == [e * spe for e in range(1, epochs + 1)]


# ---------------------------------------------------------------------------- tests


@pytest.mark.parametrize("template", TEMPLATES)
def test_trains_two_epochs_and_checkpoints(template, reference):
    ref = reference(template, 2)
    out, ckpt, spe = ref["output"], ref["ckpt"], template.steps_per_epoch
    epoch_lines = re.findall(r"^epoch (\d+) step (\d+) loss (\S+) val_loss (\S+)", out, re.M)
    assert [(int(e), int(s)) for e, s, _, _ in epoch_lines] == [(1, spe), (2, 2 * spe)]
    assert "resumed from" not in out
    assert re.search(rf"^done: epoch 2 step {2 * spe} loss \d+\.\d+$", out, re.M)
    # it learns: the second epoch's loss is well below the first step's
    assert float(epoch_lines[1][2]) < 0.5 * ref["first_loss"]
    lines = metrics(ckpt)
    assert [(m["epoch"], m["step"]) for m in lines] == [(1, spe), (2, 2 * spe)]
    assert all(m["val_loss"] > 0 for m in lines)
    assert template.saved(ckpt) == {"epoch": 2, "step": 2 * spe, "optimizer_steps": 2 * spe}
    if template.name == "pytorch":
        assert template.files(ckpt) == {"last.pt", "metrics.jsonl"}  # no ckpt.pt.tmp left
    else:
        assert template.files(ckpt) == {
            "model.keras",
            "metrics.jsonl",
            "backup/latest.weights.h5",
            "backup/training_metadata.json",
        }


@pytest.mark.parametrize("template", TEMPLATES)
def test_sigterm_saves_and_resume_continues_mid_epoch(template, reference, base_env, tmp_path, jobs):
    spe = template.steps_per_epoch
    ckpt = tmp_path / "ckpt"
    # --epochs 4: far from finishing when the signal comes, whatever the machine's load
    job = jobs(template.cmd("--epochs", "4", "--log-every", "1"), job_env(base_env, ckpt), tmp_path)
    target = spe + spe // 4  # a quarter into the second epoch
    job.wait_for(rf"^  step {target} ")
    job.proc.send_signal(signal.SIGTERM)
    assert job.finish() == 0, job.output
    assert "Traceback" not in job.output
    m = re.search(r"^SIGTERM: saved checkpoint at epoch (\d+) step (\d+)$", job.output, re.M)
    assert m, job.output
    epoch, step = int(m[1]), int(m[2])
    assert step >= target and epoch == step // spe, job.output
    saved = template.saved(ckpt)
    assert saved == {"epoch": epoch, "step": step, "optimizer_steps": step}

    epochs = epoch + 1  # finish the epoch it stopped in
    result = run(template.cmd("--epochs", str(epochs), "--log-every", "1"), job_env(base_env, ckpt), tmp_path)
    out = ok(result)
    resume_source = ckpt / "last.pt" if template.name == "pytorch" else ckpt / "backup"
    assert f"resumed from {resume_source} at epoch {epoch} step {step}\n" in out
    check_resumed_run(template, out, ckpt, saved, epochs, reference(template, epochs))


@pytest.mark.parametrize("template", TEMPLATES)
def test_sigkill_then_resume_from_restored_snapshot(template, reference, base_env, tmp_path, jobs):
    spe, every = template.steps_per_epoch, template.save_every
    ckpt = tmp_path / "ckpt"
    cmd = template.cmd("--epochs", "4", "--save-every-steps", str(every), "--log-every", "1")
    job = jobs(cmd, job_env(base_env, ckpt), tmp_path)
    first_save_in_epoch_2 = (spe // every + 1) * every
    job.wait_for(rf"^checkpoint saved at epoch 1 step {first_save_in_epoch_2}$")
    job.proc.send_signal(signal.SIGKILL)
    assert job.finish() == -signal.SIGKILL
    saved = template.saved(ckpt)
    assert saved["step"] >= first_save_in_epoch_2
    assert saved["step"] % every == 0 or saved["step"] % spe == 0
    assert saved["optimizer_steps"] == saved["step"]

    # What gpurun does on a new machine: restore the snapshot somewhere, point
    # GPURUN_RESUME_FROM at it, and give the job an empty checkpoint directory.
    snapshot = tmp_path / "snapshot"
    shutil.copytree(ckpt, snapshot)
    fresh = tmp_path / "ckpt-new"
    epochs = saved["epoch"] + 1
    result = run(
        template.cmd("--epochs", str(epochs), "--save-every-steps", str(every), "--log-every", "1"),
        job_env(base_env, fresh, resume_from=snapshot),
        tmp_path,
    )
    out = ok(result)
    assert f"resumed from {template.resumed_from(snapshot)} at epoch {saved['epoch']} step {saved['step']}\n" in out
    # Every save after the restore is where it should be and says the right epoch,
    # also inside the first epoch after the restore (where Keras 3.15's own
    # BackupAndRestore records epoch 0).
    saves = [(int(e), int(s)) for e, s in re.findall(r"^checkpoint saved at epoch (\d+) step (\d+)$", out, re.M)]
    expected = [s for s in range(saved["step"] + 1, epochs * spe + 1) if s % every == 0 or s % spe == 0]
    assert saves == [(s // spe, s) for s in expected], out
    check_resumed_run(template, out, fresh, saved, epochs, reference(template, epochs))


def test_keras_resumes_from_the_position_inside_its_weights_file(base_env, tmp_path):
    spe, every = KERAS.steps_per_epoch, KERAS.save_every
    ckpt = tmp_path / "ckpt"
    ok(run(KERAS.cmd("--epochs", "1", "--save-every-steps", str(every)), job_env(base_env, ckpt), tmp_path))
    saved = KERAS.saved(ckpt)
    assert (saved["epoch"], saved["step"], saved["optimizer_steps"]) == (1, spe, spe)
    # A kill between the weights' rename and the JSON's leaves the JSON one save behind.
    metadata = ckpt / "backup" / "training_metadata.json"
    stale = json.loads(metadata.read_text())
    stale.update(epoch=0, batch=spe - spe % every, step=spe - spe % every)
    metadata.write_text(json.dumps(stale))
    out = ok(run(KERAS.cmd("--epochs", "2", "--save-every-steps", str(every)), job_env(base_env, ckpt), tmp_path))
    assert f"at epoch 1 step {spe}\n" in out, out
    assert KERAS.saved(ckpt)["optimizer_steps"] == 2 * spe


@pytest.mark.parametrize("template", TEMPLATES)
def test_unwritable_checkpoint_dir_is_one_clear_line(template, base_env, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the checkpoint directory's parent should be\n")
    target = blocker / "ckpt"  # unwritable even for root
    result = run(template.cmd("--epochs", "1"), job_env(base_env, target), tmp_path)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    message = f"cannot write checkpoint directory {target}: Not a directory"
    errors = result.stderr.strip().splitlines()
    assert errors[-1:] == [message] and result.stderr.count("cannot write") == 1, result.stderr
    assert not target.exists()


def test_pytorch_ddp_two_processes_on_cpu_and_resume(base_env, tmp_path):
    ckpt = tmp_path / "ckpt"
    spe = 10

    def torchrun(epochs: int) -> str:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1"]
        flags = f"--epochs {epochs} --steps-per-epoch {spe} --batch-size 8 --hidden 16 --layers 1 --seq-len 32"
        flags += " --val-batches 1 --log-every 0"
        cmd = [*launcher, "--nproc-per-node", "2", str(PYTORCH.script), *flags.split()]
        result = run(cmd, job_env(base_env, ckpt), tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
        out = result.stdout
        assert sorted(re.findall(r"^rank (\d+) world_size (\d+)$", out, re.M)) == [("0", "2"), ("1", "2")]
        shas = re.findall(r"^final weights sha256: ([0-9a-f]{64})$", out, re.M)
        assert len(shas) == 2 and shas[0] == shas[1], out  # the ranks stayed in step
        assert out.count(f"done: epoch {epochs} step {epochs * spe} ") == 2
        # only rank 0 writes: one checkpoint, one metrics line per epoch, one line per save
        assert PYTORCH.files(ckpt) == {"last.pt", "metrics.jsonl"}
        assert [m["step"] for m in metrics(ckpt)] == [e * spe for e in range(1, epochs + 1)]
        assert out.count("checkpoint saved at epoch") == 1
        return out

    assert "resumed from" not in torchrun(1)
    import torch

    saved = torch.load(ckpt / "last.pt", map_location="cpu", weights_only=True)
    assert saved["world_size"] == 2 and saved["step"] == spe
    assert len(saved["ranks"]) == 2  # both ranks' RNG states, for an exact resume
    # Rank 0 reads the checkpoint and sends it to rank 1.  Had rank 1 kept a fresh
    # optimizer, its Adam state would differ and the weights would drift apart.
    out = torchrun(2)
    assert out.count(f"resumed from {ckpt / 'last.pt'} at epoch 1 step {spe}\n") == 1
