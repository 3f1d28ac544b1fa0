"""A small real model for the gpurun quickstart: a NumPy MLP that learns a noisy waveform.

It checkpoints into $GPURUN_CHECKPOINT_DIR after every epoch (atomically:
write a temporary file, then rename), and continues from $GPURUN_RESUME_FROM
when gpurun restored a snapshot there.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time

import numpy as np

stop_requested = False


def on_sigterm(_signum, _frame) -> None:
    global stop_requested
    stop_requested = True


def make_data(rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
    x = rng.uniform(-3, 3, size=(count, 1))
    y = np.sin(2 * x) + 0.3 * np.sin(7 * x) + rng.normal(0, 0.05, size=(count, 1))
    return x, y


def init_params(rng: np.random.Generator, hidden: int) -> dict[str, np.ndarray]:
    return {
        "w1": rng.normal(0, 1.0, (1, hidden)),
        "b1": np.zeros(hidden),
        "w2": rng.normal(0, 1 / np.sqrt(hidden), (hidden, hidden)),
        "b2": np.zeros(hidden),
        "w3": rng.normal(0, 1 / np.sqrt(hidden), (hidden, 1)),
        "b3": np.zeros(1),
    }


def forward_backward(p: dict[str, np.ndarray], x: np.ndarray, y: np.ndarray):
    h1 = np.tanh(x @ p["w1"] + p["b1"])
    h2 = np.tanh(h1 @ p["w2"] + p["b2"])
    out = h2 @ p["w3"] + p["b3"]
    diff = out - y
    loss = float(np.mean(diff**2))
    d_out = 2 * diff / len(x)
    grads = {"w3": h2.T @ d_out, "b3": d_out.sum(0)}
    d_h2 = (d_out @ p["w3"].T) * (1 - h2**2)
    grads["w2"], grads["b2"] = h1.T @ d_h2, d_h2.sum(0)
    d_h1 = (d_h2 @ p["w2"].T) * (1 - h1**2)
    grads["w1"], grads["b1"] = x.T @ d_h1, d_h1.sum(0)
    return loss, grads


def save(directory: str, params, moments, epoch: int, step: int, history: list[float]) -> None:
    os.makedirs(directory, exist_ok=True)
    temp = os.path.join(directory, "model.npz.tmp")
    with open(temp, "wb") as handle:
        np.savez(handle, **params, **{f"m_{k}": v for k, v in moments.items()})
    os.replace(temp, os.path.join(directory, "model.npz"))
    state = {"epoch": epoch, "step": step, "loss_history": history}
    with open(os.path.join(directory, "state.json.tmp"), "w") as handle:
        json.dump(state, handle)
    os.replace(os.path.join(directory, "state.json.tmp"), os.path.join(directory, "state.json"))


def load(directory: str):
    with np.load(os.path.join(directory, "model.npz")) as data:
        params = {k: data[k] for k in data.files if not k.startswith("m_")}
        moments = {k[2:]: data[k] for k in data.files if k.startswith("m_")}
    with open(os.path.join(directory, "state.json")) as handle:
        state = json.load(handle)
    return params, moments, state


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--samples", type=int, default=200000)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, on_sigterm)

    checkpoints = os.environ.get("GPURUN_CHECKPOINT_DIR", "checkpoints")
    resume_from = os.environ.get("GPURUN_RESUME_FROM")
    rng = np.random.default_rng(0)
    x, y = make_data(rng, args.samples)
    params, moments = init_params(rng, args.hidden), {}
    start_epoch, step, history = 0, 0, []
    if resume_from and os.path.exists(os.path.join(resume_from, "model.npz")):
        params, moments, state = load(resume_from)
        start_epoch, step, history = state["epoch"], state["step"], state["loss_history"]
        print(f"resumed from {resume_from} at epoch {start_epoch} step {step} (loss {history[-1]:.4f})", flush=True)
    else:
        print("starting fresh", flush=True)
    for name in params:
        moments.setdefault(name, np.zeros_like(params[name]))

    for epoch in range(start_epoch + 1, args.epochs + 1):
        started = time.monotonic()
        order = rng.permutation(len(x))
        losses = []
        for begin in range(0, len(x), args.batch):
            batch = order[begin : begin + args.batch]
            loss, grads = forward_backward(params, x[batch], y[batch])
            for name, grad in grads.items():
                moments[name] = 0.9 * moments[name] + grad
                params[name] -= args.lr * moments[name]
            losses.append(loss)
            step += 1
        history.append(float(np.mean(losses)))
        save(checkpoints, params, moments, epoch, step, history)
        print(
            f"epoch {epoch}/{args.epochs} step {step} loss {history[-1]:.5f} ({time.monotonic() - started:.2f}s)",
            flush=True,
        )
        if stop_requested:
            print(f"SIGTERM: saved checkpoint at epoch {epoch}, exiting", flush=True)
            return 0
    print(f"done: {args.epochs} epochs, final loss {history[-1]:.5f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
