"""The PyTorch template for one epoch on CUDA (mixed precision) and on the CPU: samples/s and peak GPU memory.

    python bench/gpu_template.py [--steps 200] [--batch-size 64]

Run it on a machine with an NVIDIA GPU; on a machine without one it reports
the CPU figure only. Each device runs in its own process
(CUDA_VISIBLE_DEVICES='' hides the GPU for the CPU run), with the checkpoint
directory in a temporary folder. The epoch is timed inside the process, so
interpreter and torch start-up are not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

TEMPLATE = Path(__file__).resolve().parent.parent / "templates" / "pytorch"

CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import torch
import train
steps, batch = int(sys.argv[2]), int(sys.argv[3])
argv = ["--epochs", "1", "--steps-per-epoch", str(steps), "--batch-size", str(batch), "--log-every", "0", "--val-batches", "1"]
if torch.cuda.is_available():
    torch.cuda.reset_peak_memory_stats()
started = time.perf_counter()
train.main(argv)
if torch.cuda.is_available():
    torch.cuda.synchronize()
elapsed = time.perf_counter() - started
result = {
    "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    "seconds": elapsed,
    "samples_per_s": steps * batch / elapsed,
    "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
    "amp": torch.cuda.is_available(),
}
print("RESULT " + json.dumps(result), flush=True)
"""


def measure(steps: int, batch: int, hide_gpu: bool) -> dict:
    env = {**os.environ, "GPURUN_CHECKPOINT_DIR": tempfile.mkdtemp(prefix="gpurun-gpu-bench-")}
    if hide_gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(TEMPLATE), str(steps), str(batch)], env=env, capture_output=True, text=True
    )
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise SystemExit(f"the template failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    import torch

    rows = []
    if torch.cuda.is_available():
        rows.append(measure(args.steps, args.batch_size, hide_gpu=False))
    rows.append(measure(args.steps, args.batch_size, hide_gpu=True))
    for row in rows:
        memory = f"{row['peak_gpu_mib']:.0f} MiB" if row["peak_gpu_mib"] is not None else "-"
        print(
            f"{row['device']:<28} amp={str(row['amp']):<5} {row['samples_per_s']:>10.0f} samples/s"
            f"  {row['seconds']:.2f} s/epoch  peak GPU memory {memory}"
        )
    if len(rows) == 2:
        print(f"GPU/CPU ratio: {rows[0]['samples_per_s'] / rows[1]['samples_per_s']:.1f}x")


if __name__ == "__main__":
    main()
