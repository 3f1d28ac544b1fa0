#!/usr/bin/env python3
"""gpurun Keras 3 template: an LSTM that predicts the next sample of synthetic waveforms.

Checkpointing goes through Keras's own callbacks:

* ``BackupAndRestore`` (``$GPURUN_CHECKPOINT_DIR/backup``): weights, optimizer
  state and training position, every ``--save-every-steps`` batches and at each
  epoch end; restored automatically when the job starts again;
* ``ModelCheckpoint`` (``$GPURUN_CHECKPOINT_DIR/model.keras``): the whole model
  at each epoch end, ready for ``keras.models.load_model``;
* ``metrics.jsonl``: one line per epoch.

If gpurun restored a snapshot (``$GPURUN_RESUME_FROM``), its files are copied
into the checkpoint directory first, so the backup above picks them up.
SIGTERM (spot interruption, ``gpurun teardown``) saves a backup at the next
batch and exits 0.

To train your own model, replace ``make_clip``/``WaveBatches`` and
``build_model``; keep the callbacks.

    KERAS_BACKEND=torch python train.py --epochs 20
"""

# ruff: noqa: E402  (KERAS_BACKEND must be set before keras is imported)
from __future__ import annotations

import os

os.environ.setdefault("KERAS_BACKEND", "torch")

import argparse
import hashlib
import json
import math
import shutil
import signal
import sys
import time
from pathlib import Path

import h5py  # installed with keras: its weights files are HDF5
import keras
import numpy as np

BACKUP_DIR = "backup"
POSITION_ATTR = "gpurun_position"  # the backup's position, stored in its weights file
MODEL_NAME = "model.keras"
METRICS_NAME = "metrics.jsonl"


# --------------------------------------------------------------------------- data


def make_clip(seed: int, split: int, epoch: int, i: int, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """An audio-like clip: 1 to 4 sines with random frequency, phase and
    amplitude, plus noise.  Input: the noisy clip; target: the clean next sample.
    A pure function of its arguments, so a resumed run sees the same data."""
    rng = np.random.default_rng([seed, split, epoch, i])
    k = int(rng.integers(1, 5))
    t = np.arange(seq_len + 1, dtype=np.float64)
    freq = rng.uniform(0.005, 0.08, size=(k, 1))  # cycles per sample
    phase = rng.uniform(0.0, 2.0 * math.pi, size=(k, 1))
    amp = rng.uniform(0.3, 1.0, size=(k, 1))
    clean = (amp * np.sin(2.0 * math.pi * freq * t + phase)).sum(axis=0) / math.sqrt(k)
    noisy = clean + rng.normal(0.0, 0.05, size=clean.shape)
    return noisy[:-1, None].astype(np.float32), clean[1:, None].astype(np.float32)


class WaveBatches(keras.utils.PyDataset):
    """Batches generated on the fly; ``epoch`` is set by ``SetEpoch`` so every
    epoch sees fresh clips.  ``first_batch`` lets a resumed run start mid-epoch."""

    def __init__(self, batches: int, batch_size: int, seq_len: int, seed: int, split: int) -> None:
        super().__init__()
        self.batches = batches
        self.batch_size = batch_size
        self.seq_len = seq_len
        self.seed = seed
        self.split = split  # 0 train, 1 validation
        self.epoch = 0
        self.first_batch = 0

    def __len__(self) -> int:
        return self.batches - self.first_batch

    def __getitem__(self, idx: int) -> tuple[np.ndarray, np.ndarray]:
        b = self.first_batch + idx
        clips = [
            make_clip(self.seed, self.split, self.epoch, b * self.batch_size + j, self.seq_len)
            for j in range(self.batch_size)
        ]
        return np.stack([c[0] for c in clips]), np.stack([c[1] for c in clips])


class SetEpoch(keras.callbacks.Callback):
    def __init__(self, dataset: WaveBatches) -> None:
        super().__init__()
        self.dataset = dataset

    def on_epoch_begin(self, epoch, logs=None):
        self.dataset.epoch = epoch


# -------------------------------------------------------------------------- model


def build_model(seq_len: int, hidden: int, layers: int, dropout: float, seed: int) -> keras.Model:
    inputs = keras.Input((seq_len, 1))
    x = inputs
    for _ in range(layers):
        x = keras.layers.LSTM(hidden, return_sequences=True)(x)
    # A seeded Dropout draws from a SeedGenerator, whose state Backup saves; an
    # unseeded one (torch backend) draws from torch's global RNG, which it doesn't.
    x = keras.layers.Dropout(dropout, seed=seed)(x)
    outputs = keras.layers.Dense(1, dtype="float32")(x)  # float32 output under mixed precision
    return keras.Model(inputs, outputs, name="wave_lstm")


# ------------------------------------------------------------------ infrastructure


def fail(message: str) -> None:
    sys.stderr.write(f"{message}\n")
    sys.stderr.flush()
    sys.exit(1)


def log(message: str) -> None:
    # One write per line: lines from several ranks sharing a pipe never interleave.
    sys.stdout.write(f"{message}\n")
    sys.stdout.flush()


def write_replace(path: str, text: str) -> None:
    with open(path + ".tmp", "w") as f:
        f.write(text)
    fsync_replace(path + ".tmp", path)


def fsync_replace(tmp: str, final: str) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    dir_fd = os.open(os.path.dirname(final) or ".", os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class Backup(keras.callbacks.BackupAndRestore):
    """``keras.callbacks.BackupAndRestore`` (its restore in ``on_train_begin`` is
    used as is), saving a position a resumed run can continue from:

    * the metadata says ``epoch`` (completed epochs, what Keras restores) and
      ``batch`` (batches done in the epoch after those) and ``step``; a resumed
      run skips the batches already done instead of redoing the epoch;
    * it saves every ``save_every_steps`` global steps and at every epoch end;
    * weights and metadata are written to a temporary name and renamed, so a
      kill or the gpurun checkpoint agent never sees half a file;
    * Keras 3.15 records epoch 0 in mid-epoch backups taken in the first
      epoch after a restore; this class records the right one;
    * dropout's random state is saved too, so a resumed run trains exactly as
      an uninterrupted one would.
    """

    def __init__(self, backup_dir: str, save_every_steps: int, steps_per_epoch: int) -> None:
        super().__init__(backup_dir, save_freq=save_every_steps or "epoch", delete_checkpoint=False)
        self.save_every_steps = save_every_steps
        self.steps_per_epoch = steps_per_epoch
        self.epoch = 0  # completed epochs
        self.batches_done = 0  # in the epoch after those
        self.first_batch = 0  # set by main when a fit starts mid-epoch
        self.saved_step = -1

    @property
    def step(self) -> int:
        return self.epoch * self.steps_per_epoch + self.batches_done

    def position(self) -> dict | None:
        return read_position(self._weights_path, self._training_metadata_path)

    def on_train_begin(self, logs=None):
        # Keras's restore reads its epoch from training_metadata.json: write it
        # from the weights file first, in case a kill came between the two.
        position = self.position()
        if position is not None:
            write_replace(self._training_metadata_path, json.dumps(position))
        super().on_train_begin(logs)  # Keras restores weights, optimizer state and the epoch
        position = self.position()
        seeds = self._seed_variables()
        if position and len(position.get("seed_states", [])) == len(seeds):
            for var, state in zip(seeds, position["seed_states"], strict=True):
                var.assign(np.array(state, dtype=var.dtype))

    def _seed_variables(self) -> list:
        # Dropout's random state is a model variable that save_weights leaves out;
        # kept in the metadata, a resumed run draws the masks it would have drawn.
        return [v for v in self.model.variables if "seed_generator_state" in v.path]

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch
        self._offset = self.first_batch  # batch indices of a mid-epoch fit start at 0
        self.batches_done = self._offset

    def on_train_batch_end(self, batch, logs=None):
        self.batches_done = self._offset + batch + 1
        if (
            self.save_every_steps
            and self.step % self.save_every_steps == 0
            and self.batches_done < self.steps_per_epoch
        ):
            self.save()

    def on_epoch_end(self, epoch, logs=None):
        self.epoch, self.batches_done = epoch + 1, 0
        self.save()

    def save(self) -> None:
        try:
            os.makedirs(self.backup_dir, exist_ok=True)
            tmp = os.path.join(self.backup_dir, "incoming.weights.h5")  # save_weights wants .weights.h5
            self.model.save_weights(tmp, overwrite=True)
            meta = {
                "epoch": self.epoch,
                "batch": self.batches_done,
                "step": self.step,
                "steps_per_epoch": self.steps_per_epoch,
                "seed_states": [keras.ops.convert_to_numpy(v).tolist() for v in self._seed_variables()],
            }
            # One file, one rename: a kill or a snapshot never pairs weights with another step's position.
            with h5py.File(tmp, "a") as f:
                f.attrs[POSITION_ATTR] = json.dumps(meta)
            fsync_replace(tmp, self._weights_path)
            write_replace(self._training_metadata_path, json.dumps(meta))  # for Keras's own restore
        except OSError as e:
            fail(f"cannot write checkpoint directory {os.path.dirname(self.backup_dir)}: {e.strerror or e}")
        self.saved_step = self.step
        log(f"checkpoint saved at epoch {self.epoch} step {self.step}")


class EpochLog(keras.callbacks.Callback):
    """One line per epoch on stdout and in metrics.jsonl; the loss every N steps."""

    def __init__(self, backup: Backup, metrics_path: Path, log_every: int) -> None:
        super().__init__()
        self.backup = backup
        self.metrics_path = metrics_path
        self.log_every = log_every
        self.last_loss = float("nan")
        self.started = time.time()

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.time()

    def on_train_batch_end(self, batch, logs=None):
        step = self.backup.step
        if self.log_every and step % self.log_every == 0:
            log(f"  step {step} loss {float(logs['loss']):.4f}")

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        self.last_loss = float(logs.get("loss", float("nan")))
        record = {
            "epoch": epoch + 1,
            "step": self.backup.step,
            "loss": round(self.last_loss, 6),
            "val_loss": round(float(logs.get("val_loss", float("nan"))), 6),
            "lr": float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)),
            "optimizer_iterations": int(keras.ops.convert_to_numpy(self.model.optimizer.iterations)),
            "seconds": round(time.time() - self.started, 3),
            "time": round(time.time(), 3),
        }
        log(
            f"epoch {record['epoch']} step {record['step']} loss {record['loss']:.4f} "
            f"val_loss {record['val_loss']:.4f} lr {record['lr']:.2e} ({record['seconds']:.1f}s)"
        )
        try:
            with open(self.metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as e:
            fail(f"cannot write checkpoint directory {self.metrics_path.parent}: {e.strerror or e}")


class Preempted(Exception):
    pass


class StopOnSigterm(keras.callbacks.Callback):
    """Keras has no SIGTERM handling: the handler only sets a flag; at the next
    batch end this callback saves a backup, stops training and unwinds ``fit``
    (skipping validation and the other epoch-end work) so the job exits 0."""

    def __init__(self, backup: Backup) -> None:
        super().__init__()
        self.backup = backup
        self.requested = False
        signal.signal(signal.SIGTERM, self._handler)

    def _handler(self, signum, frame) -> None:
        self.requested = True

    def on_train_batch_end(self, batch, logs=None):
        # The last batch of an epoch is left to on_epoch_end (backup at epoch end).
        if self.requested and self.backup.batches_done < self.backup.steps_per_epoch:
            self._stop()

    def on_epoch_end(self, epoch, logs=None):
        if self.requested:
            self._stop()

    def _stop(self) -> None:
        if self.backup.saved_step != self.backup.step:
            self.backup.save()
        self.model.stop_training = True
        raise Preempted(f"SIGTERM: saved checkpoint at epoch {self.backup.epoch} step {self.backup.step}")


def check_writable(ckpt_dir: Path) -> None:
    try:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        probe = ckpt_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        fail(f"cannot write checkpoint directory {ckpt_dir}: {e.strerror or e}")


def read_position(weights_path: str | Path, metadata_path: str | Path) -> dict | None:
    """Where a backup stands: kept inside its weights file, so the two cannot disagree."""
    try:
        with h5py.File(weights_path, "r") as f:
            if POSITION_ATTR in f.attrs:
                return json.loads(f.attrs[POSITION_ATTR])
    except FileNotFoundError:
        return None
    try:  # a backup from before the position moved into the weights file
        with open(metadata_path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None


def backup_step(ckpt_dir: Path) -> int | None:
    backup = ckpt_dir / BACKUP_DIR
    try:
        return int(read_position(backup / "latest.weights.h5", backup / "training_metadata.json")["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def bring_in_snapshot(ckpt_dir: Path) -> str | None:
    """Copy the snapshot gpurun restored ($GPURUN_RESUME_FROM) into the checkpoint
    directory, where BackupAndRestore looks; returns its path, or None.  Never goes
    back: a checkpoint directory further along (the job was restarted with the
    same environment) is kept."""
    src = os.environ.get("GPURUN_RESUME_FROM")
    if not src:
        return None
    src_path = Path(src)
    if not src_path.is_dir():
        print(f"warning: GPURUN_RESUME_FROM={src} is not a directory; ignored", file=sys.stderr, flush=True)
        return None
    if src_path.resolve() == ckpt_dir.resolve():
        return src
    here, there = backup_step(ckpt_dir), backup_step(src_path)
    if here is not None and (there is None or here > there):
        print(
            f"note: {ckpt_dir} (step {here}) is newer than {src} (step {there}); using it", file=sys.stderr, flush=True
        )
        return None
    try:
        if (ckpt_dir / BACKUP_DIR).is_dir():  # don't mix the files of two backups
            shutil.rmtree(ckpt_dir / BACKUP_DIR)
        shutil.copytree(src_path, ckpt_dir, dirs_exist_ok=True)
    except (OSError, shutil.Error) as e:
        fail(f"cannot write checkpoint directory {ckpt_dir}: cannot copy {src}: {e}")
    return src


def prune_metrics(path: Path, step: int) -> float:
    """Drop metrics lines written after the backup we resume from; returns the last loss."""
    last_loss = float("nan")
    if not path.is_file():
        return last_loss
    try:
        lines = path.read_text().splitlines()
        kept = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= step]
        if len(kept) != len(lines):
            path.write_text("".join(ln + "\n" for ln in kept))
        if kept:
            last_loss = float(json.loads(kept[-1])["loss"])
    except (OSError, ValueError, KeyError) as e:
        print(f"warning: could not read {path}: {e}", file=sys.stderr, flush=True)
    return last_loss


def gpu_available() -> bool:
    backend = keras.backend.backend()
    try:
        if backend == "torch":
            import torch

            return torch.cuda.is_available()
        if backend == "jax":
            import jax

            return any(d.platform == "gpu" for d in jax.devices())
        if backend == "tensorflow":
            import tensorflow as tf

            return bool(tf.config.list_physical_devices("GPU"))
    except Exception:
        return False
    return False


def weights_sha256(model: keras.Model) -> str:
    h = hashlib.sha256()
    for w in model.get_weights():
        h.update(np.ascontiguousarray(w).tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--steps-per-epoch", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--save-every-steps", type=int, default=0, help="also back up every N global steps (0: only at epoch end)"
    )
    p.add_argument("--val-batches", type=int, default=4)
    p.add_argument("--log-every", type=int, default=50, help="print the loss every N steps (0: off)")
    args = p.parse_args(argv)
    for name in ("steps_per_epoch", "batch_size", "hidden", "layers", "seq_len", "val_batches"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    ckpt_dir = Path(os.environ.get("GPURUN_CHECKPOINT_DIR", "checkpoints")).absolute()
    check_writable(ckpt_dir)
    snapshot = bring_in_snapshot(ckpt_dir)
    for stale in (ckpt_dir / BACKUP_DIR).glob("*.tmp"):  # left over from a kill mid-save
        stale.unlink()
    (ckpt_dir / BACKUP_DIR / "incoming.weights.h5").unlink(missing_ok=True)

    keras.utils.set_random_seed(args.seed)
    gpu = gpu_available()
    if gpu:
        keras.mixed_precision.set_global_policy("mixed_float16")  # compile adds loss scaling
    log(f"keras {keras.__version__} backend {keras.backend.backend()} {'gpu, mixed_float16' if gpu else 'cpu'}")

    spe = args.steps_per_epoch
    model = build_model(args.seq_len, args.hidden, args.layers, args.dropout, args.seed)
    schedule = keras.optimizers.schedules.ExponentialDecay(args.lr, decay_steps=spe, decay_rate=0.9, staircase=True)
    model.compile(optimizer=keras.optimizers.Adam(schedule, clipnorm=1.0), loss="mse")

    train = WaveBatches(spe, args.batch_size, args.seq_len, args.seed, split=0)
    val = WaveBatches(args.val_batches, args.batch_size, args.seq_len, args.seed, split=1)

    backup = Backup(str(ckpt_dir / BACKUP_DIR), args.save_every_steps, spe)
    epoch_log = EpochLog(backup, ckpt_dir / METRICS_NAME, args.log_every)
    sigterm = StopOnSigterm(backup)
    callbacks = [
        SetEpoch(train),
        backup,
        keras.callbacks.ModelCheckpoint(str(ckpt_dir / MODEL_NAME)),
        epoch_log,
        sigterm,
    ]

    start_epoch, first_batch = 0, 0
    position = backup.position()
    if position is not None:
        start_epoch, first_batch, step = position["epoch"], position["batch"], position["step"]
        if position.get("steps_per_epoch", spe) != spe:
            start_epoch, first_batch = divmod(step, spe)
            print(
                f"warning: backup has --steps-per-epoch {position['steps_per_epoch']}, now {spe}",
                file=sys.stderr,
                flush=True,
            )
        backup.epoch, backup.batches_done = start_epoch, first_batch
        epoch_log.last_loss = prune_metrics(ckpt_dir / METRICS_NAME, step)
        log(f"resumed from {snapshot or backup.backup_dir} at epoch {start_epoch} step {step}")

    # shuffle=False: Keras would shuffle the batch order of a PyDataset, and a
    # resumed epoch could no longer skip exactly the batches already done.
    fit_args = dict(validation_data=val, callbacks=callbacks, shuffle=False, verbose=0)
    try:
        if first_batch and start_epoch < args.epochs:
            # Finish the interrupted epoch with only the batches it had not done;
            # Keras's restore (on_train_begin) sets the initial epoch to start_epoch.
            train.first_batch = backup.first_batch = first_batch
            model.fit(train, epochs=start_epoch + 1, **fit_args)
            train.first_batch = backup.first_batch = 0
        model.fit(train, epochs=args.epochs, **fit_args)
    except Preempted as stopped:
        log(str(stopped))
        sys.exit(0)

    log(f"done: epoch {backup.epoch} step {backup.step} loss {epoch_log.last_loss:.4f}")
    log(f"final weights sha256: {weights_sha256(model)}")


if __name__ == "__main__":
    main()
