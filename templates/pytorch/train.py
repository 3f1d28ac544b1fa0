#!/usr/bin/env python3
"""gpurun PyTorch template: an LSTM that predicts the next sample of synthetic waveforms.

Everything a job needs to survive spot interruptions and restarts under gpurun:

* checkpoints go to ``$GPURUN_CHECKPOINT_DIR`` (default ``./checkpoints``): one
  ``last.pt`` (model, optimizer, LR scheduler, GradScaler, epoch, global step,
  RNG states), written atomically, plus ``metrics.jsonl`` (one line per epoch);
* on start it resumes from ``$GPURUN_RESUME_FROM/last.pt`` (the snapshot gpurun
  restored) if set, else from ``last.pt`` in the checkpoint directory, and
  continues mid-epoch at the saved step;
* SIGTERM (spot interruption, ``gpurun teardown``) saves at the next step and
  exits 0;
* ``WORLD_SIZE > 1`` (torchrun) trains with DistributedDataParallel; only rank 0
  writes checkpoints and metrics.

To train your own model, replace ``Waveforms``, ``WaveLSTM`` and ``loss_fn``;
the checkpoint and resume machinery below them needs no change.

    python train.py --epochs 20
    torchrun --nproc-per-node gpu train.py --epochs 20
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

CKPT_NAME = "last.pt"
TMP_NAME = "ckpt.pt.tmp"
METRICS_NAME = "metrics.jsonl"
CKPT_FORMAT = 1


# --------------------------------------------------------------------------- data


class Waveforms(Dataset):
    """Audio-like clips generated on the fly: 1 to 4 sines with random frequency,
    phase and amplitude, plus noise.  The task: from the noisy clip up to time t,
    predict the clean sample at t+1.

    Item ``i`` is a pure function of (seed, split, epoch, i), so every epoch sees
    fresh clips and a resumed run sees exactly the clips it would have seen.
    """

    def __init__(self, size: int, seq_len: int, seed: int, split: int) -> None:
        self.size = size
        self.seq_len = seq_len
        self.seed = seed
        self.split = split  # 0 train, 1 validation
        self.epoch = 0

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.split, self.epoch, i])
        k = int(rng.integers(1, 5))
        t = np.arange(self.seq_len + 1, dtype=np.float64)
        freq = rng.uniform(0.005, 0.08, size=(k, 1))  # cycles per sample
        phase = rng.uniform(0.0, 2.0 * math.pi, size=(k, 1))
        amp = rng.uniform(0.3, 1.0, size=(k, 1))
        clean = (amp * np.sin(2.0 * math.pi * freq * t + phase)).sum(axis=0) / math.sqrt(k)
        noisy = clean + rng.normal(0.0, 0.05, size=clean.shape)
        x = torch.from_numpy(noisy[:-1, None].astype(np.float32))
        y = torch.from_numpy(clean[1:, None].astype(np.float32))
        return x, y


# -------------------------------------------------------------------------- model


class WaveLSTM(nn.Module):
    def __init__(self, hidden: int, layers: int, dropout: float) -> None:
        super().__init__()
        self.lstm = nn.LSTM(
            1,
            hidden,
            num_layers=layers,
            batch_first=True,
            dropout=dropout if layers > 1 else 0.0,
        )
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.lstm(x)
        return self.head(self.drop(out))


def loss_fn(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(pred.float(), target)


def lr_factor(step: int, warmup: int, steps_per_epoch: int) -> float:
    """Linear warmup, then x0.9 per epoch.  A function of the global step only,
    so a resumed run follows the same schedule whatever --epochs says."""
    return min(1.0, (step + 1) / warmup) * 0.9 ** (step // steps_per_epoch)


# ------------------------------------------------------------------ infrastructure


def fail(message: str) -> None:
    sys.stderr.write(f"{message}\n")
    sys.stderr.flush()
    sys.exit(1)


def log(message: str) -> None:
    # One write per line: lines from several ranks sharing a pipe never interleave.
    sys.stdout.write(f"{message}\n")
    sys.stdout.flush()


class SigtermFlag:
    """SIGTERM only sets a flag; the training loop saves and exits at the next step."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame) -> None:
        self.requested = True


def ignore_sigterm_in_worker(worker_id: int) -> None:
    # DataLoader workers must outlive a SIGTERM sent to the whole process group,
    # so that the main process can still finish its step and save.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def check_writable(ckpt_dir: Path) -> None:
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        probe = ckpt_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
        (ckpt_dir / TMP_NAME).unlink(missing_ok=True)  # left over from a kill mid-save
    except OSError as e:
        fail(f"cannot write checkpoint directory {ckpt_dir}: {e.strerror or e}")


def setup_distributed() -> tuple[int, int, int]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return rank, world, local_rank


class StopTraining(Exception):
    """SIGTERM was handled and the checkpoint saved: leave train() so its objects are freed."""


def shutdown_distributed() -> None:
    # DDP's reducer holds the process group: once train() has returned and its
    # objects are collected, the group (and gloo's worker threads) ends here, in
    # the main thread, not while the interpreter shuts down, where gloo can abort.
    gc.collect()
    if dist.is_initialized():
        dist.barrier()  # no rank tears down its connections while another still uses them
        dist.destroy_process_group()


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def save_checkpoint(state: dict, ckpt_dir: Path) -> Path:
    """Write to ckpt.pt.tmp, fsync, then rename over last.pt: a reader (or the
    gpurun checkpoint agent) sees the old file or the new one, never half of one."""
    tmp = ckpt_dir / TMP_NAME
    final = ckpt_dir / CKPT_NAME
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        dir_fd = os.open(ckpt_dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError as e:
        fail(f"cannot write checkpoint directory {ckpt_dir}: {e.strerror or e}")
    return final


def checkpoint_step(path: Path) -> int:
    try:  # mmap: reads the few bytes needed, not the whole model
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["step"])
    except Exception:
        return -1


def find_resume(ckpt_dir: Path) -> Path | None:
    """$GPURUN_RESUME_FROM/last.pt if set, else last.pt in the checkpoint directory;
    but never go back: if the checkpoint directory is further along (the job was
    restarted with the same environment), continue from there."""
    local = ckpt_dir / CKPT_NAME
    src = os.environ.get("GPURUN_RESUME_FROM")
    if src:
        snapshot = Path(src) / CKPT_NAME
        if snapshot.is_file():
            if local.is_file() and local.resolve() != snapshot.resolve():
                here, there = checkpoint_step(local), checkpoint_step(snapshot)
                if here > there:
                    print(
                        f"note: {local} (step {here}) is newer than {snapshot} (step {there}); using it",
                        file=sys.stderr,
                        flush=True,
                    )
                    return local
            return snapshot
        print(f"warning: GPURUN_RESUME_FROM={src} holds no {CKPT_NAME}", file=sys.stderr, flush=True)
    return local if local.is_file() else None


def carry_metrics(ckpt_dir: Path, source: Path, step: int) -> None:
    """Keep metrics.jsonl in step with the checkpoint: bring it along from the
    restored snapshot, and drop lines written after the checkpoint we resume from."""
    metrics = ckpt_dir / METRICS_NAME
    snapshot_metrics = source.parent / METRICS_NAME
    try:
        if not metrics.exists() and snapshot_metrics.is_file():
            shutil.copyfile(snapshot_metrics, metrics)
        if metrics.is_file():
            lines = metrics.read_text().splitlines()
            kept = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= step]
            if len(kept) != len(lines):
                metrics.write_text("".join(ln + "\n" for ln in kept))
    except (OSError, ValueError) as e:
        print(f"warning: could not carry over {METRICS_NAME}: {e}", file=sys.stderr, flush=True)


def append_metrics(ckpt_dir: Path, record: dict) -> None:
    try:
        with open(ckpt_dir / METRICS_NAME, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        fail(f"cannot write checkpoint directory {ckpt_dir}: {e.strerror or e}")


def weights_sha256(model: nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--steps-per-epoch", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32, help="per process")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup-steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--save-every-steps", type=int, default=0, help="also save every N global steps (0: only at epoch end)"
    )
    p.add_argument("--val-batches", type=int, default=4)
    p.add_argument("--log-every", type=int, default=50, help="print the loss every N steps (0: off)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    args = p.parse_args(argv)
    for name in ("steps_per_epoch", "batch_size", "hidden", "layers", "seq_len", "warmup_steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    try:
        train(argv)
    except StopTraining:
        pass
    shutdown_distributed()


def train(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    sigterm = SigtermFlag()
    ckpt_dir = Path(os.environ.get("GPURUN_CHECKPOINT_DIR", "checkpoints")).absolute()

    if int(os.environ.get("RANK", "0")) == 0:  # only global rank 0 writes
        check_writable(ckpt_dir)
    rank, world, local_rank = setup_distributed()
    is_main = rank == 0
    log(f"rank {rank} world_size {world}")

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    use_amp = cuda  # float16 autocast + GradScaler on GPU, plain float32 on CPU

    # Every rank builds the same model; DDP also broadcasts rank 0's weights.
    seed_everything(args.seed)
    raw_model = WaveLSTM(args.hidden, args.layers, args.dropout).to(device)
    optimizer = torch.optim.Adam(raw_model.parameters(), lr=args.lr)
    spe = args.steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, args.warmup_steps, spe))
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

    # ---- resume: rank 0 reads the checkpoint, every rank gets the same copy
    start_epoch, epoch_step, global_step, last_loss = 0, 0, 0, float("nan")
    partial_loss = (0.0, 0)  # a resumed epoch's mean loss includes the steps done before
    payload: list = [None, None]
    if is_main:
        source = find_resume(ckpt_dir)
        if source is not None:
            try:
                payload = [str(source), torch.load(source, map_location="cpu", weights_only=True)]
            except Exception as e:  # a truncated or foreign file: say which, don't guess
                fail(f"cannot load checkpoint {source}: {e}")
    if world > 1:
        dist.broadcast_object_list(payload, src=0)
    source_name, ckpt = payload
    if ckpt is not None:
        raw_model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt["scaler"]:
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch, epoch_step, global_step = ckpt["epoch"], ckpt["epoch_step"], ckpt["step"]
        last_loss = ckpt["loss"]
        if ckpt["steps_per_epoch"] != spe:
            print(
                f"warning: checkpoint has --steps-per-epoch {ckpt['steps_per_epoch']}, now {spe}; "
                "continuing at global step",
                file=sys.stderr,
                flush=True,
            )
            start_epoch, epoch_step = divmod(global_step, spe)
        if is_main:
            carry_metrics(ckpt_dir, Path(source_name), global_step)
            log(f"resumed from {source_name} at epoch {start_epoch} step {global_step}")
    # Restore RNG last, after model construction consumed its share, so the
    # resumed run draws exactly the numbers the uninterrupted one would have.
    if ckpt is not None and len(ckpt["ranks"]) == world:
        set_rng_state(ckpt["ranks"][rank]["rng"])
        if ckpt["steps_per_epoch"] == spe:
            partial_loss = tuple(ckpt["ranks"][rank]["partial_loss"])
    else:
        seed_everything(args.seed * 1000 + rank + global_step)

    model: nn.Module = raw_model
    if world > 1:
        model = DistributedDataParallel(raw_model, device_ids=[local_rank] if cuda else None)

    train_set = Waveforms(spe * args.batch_size * world, args.seq_len, args.seed, split=0)
    val_set = Waveforms(args.val_batches * args.batch_size * world, args.seq_len, args.seed, split=1)
    loader_rng = torch.Generator().manual_seed(args.seed)  # keep DataLoader off the global RNG
    loader_opts = dict(
        batch_size=args.batch_size,
        num_workers=args.workers,
        pin_memory=cuda,
        generator=loader_rng,
        worker_init_fn=ignore_sigterm_in_worker,
    )

    def checkpoint(epoch: int, step_in_epoch: int, loss: float, partial: tuple[float, int] = (0.0, 0)) -> None:
        """Collective: every rank calls it; rank 0 writes last.pt with every rank's RNG."""
        mine = {"rng": rng_state(), "partial_loss": partial}
        per_rank = [mine]
        if world > 1:
            per_rank = [None] * world
            dist.all_gather_object(per_rank, mine)
        if not is_main:
            return
        save_checkpoint(
            {
                "format": CKPT_FORMAT,
                "model": raw_model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(),
                "epoch": epoch,  # completed epochs
                "epoch_step": step_in_epoch,  # steps done in the epoch after those
                "step": global_step,  # optimizer steps done in total
                "steps_per_epoch": spe,
                "world_size": world,
                "loss": loss,  # last finished epoch's mean training loss
                "ranks": per_rank,  # RNG states, (loss sum, steps) of the unfinished epoch
                "args": vars(args),
            },
            ckpt_dir,
        )
        log(f"checkpoint saved at epoch {epoch} step {global_step}")

    def stop_requested() -> bool:
        if world == 1:
            return sigterm.requested
        flag = torch.tensor([1.0 if sigterm.requested else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank stops at the same step
        return bool(flag.item())

    def stop(epoch: int, step_in_epoch: int, loss: float, partial: tuple[float, int]) -> None:
        checkpoint(epoch, step_in_epoch, loss, partial)
        if is_main:
            log(f"SIGTERM: saved checkpoint at epoch {epoch} step {global_step}")
        raise StopTraining

    @torch.no_grad()
    def evaluate() -> float:
        raw_model.eval()
        total = torch.zeros(2, device=device)
        sampler = DistributedSampler(val_set, num_replicas=world, rank=rank, shuffle=False)
        for x, y in DataLoader(val_set, sampler=sampler, **loader_opts):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                pred = raw_model(x)
            total += torch.stack([loss_fn(pred, y) * len(x), torch.tensor(float(len(x)), device=device)])
        if world > 1:
            dist.all_reduce(total)
        return (total[0] / total[1]).item()

    for epoch in range(start_epoch, args.epochs):
        train_set.epoch = epoch
        indices = list(DistributedSampler(train_set, num_replicas=world, rank=rank, shuffle=False))
        indices = indices[epoch_step * args.batch_size :]  # skip the steps a resumed epoch already did
        loader = DataLoader(train_set, sampler=indices, drop_last=True, **loader_opts)
        model.train()
        started = time.time()
        loss_sum = torch.tensor(partial_loss[0], device=device)
        n_steps = partial_loss[1]
        partial_loss = (0.0, 0)
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.float16, enabled=use_amp):
                pred = model(x)
            loss = loss_fn(pred, y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(raw_model.parameters(), 1.0)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            global_step += 1
            epoch_step += 1
            n_steps += 1
            loss_sum += loss.detach()
            if is_main and args.log_every and global_step % args.log_every == 0:
                log(f"  step {global_step} loss {loss.item():.4f} lr {scheduler.get_last_lr()[0]:.2e}")
            if epoch_step < spe:  # the last step of an epoch is handled at the epoch end
                if stop_requested():
                    stop(epoch, epoch_step, last_loss, (loss_sum.item(), n_steps))
                if args.save_every_steps and global_step % args.save_every_steps == 0:
                    checkpoint(epoch, epoch_step, last_loss, (loss_sum.item(), n_steps))

        train = torch.stack([loss_sum, torch.tensor(float(n_steps), device=device)])
        if world > 1:
            dist.all_reduce(train)
        last_loss = (train[0] / train[1]).item() if train[1] > 0 else float("nan")
        val_loss = evaluate()
        epoch_step = 0
        record = {
            "epoch": epoch + 1,
            "step": global_step,
            "loss": round(last_loss, 6),
            "val_loss": round(val_loss, 6),
            "lr": scheduler.get_last_lr()[0],
            "seconds": round(time.time() - started, 3),
            "time": round(time.time(), 3),
        }
        if is_main:
            log(
                f"epoch {epoch + 1} step {global_step} loss {last_loss:.4f} val_loss {val_loss:.4f} "
                f"lr {record['lr']:.2e} ({record['seconds']:.1f}s)"
            )
            append_metrics(ckpt_dir, record)
        checkpoint(epoch + 1, 0, last_loss)
        if stop_requested():
            if is_main:
                log(f"SIGTERM: saved checkpoint at epoch {epoch + 1} step {global_step}")
            raise StopTraining

    log(f"done: epoch {max(start_epoch, args.epochs)} step {global_step} loss {last_loss:.4f}")
    log(f"final weights sha256: {weights_sha256(raw_model)}")


if __name__ == "__main__":
    main()
