"""GPU utilisation and memory from `nvidia-smi`, as the agent samples them and `status` shows them.

The agent writes nvidia-smi's CSV to `<run_dir>/gpu.csv` every SAMPLE_EVERY
seconds; a node without an agent (or a stale file) is asked directly. The text
comes from a machine: parsed strictly, at most MAX_GPUS lines.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time

from gpurun.models import Gpu

QUERY = ["--query-gpu=index,utilization.gpu,memory.used,memory.total", "--format=csv,noheader,nounits"]
SAMPLE_EVERY = 10.0
FRESH_FOR = 60.0  # an older gpu.csv means its agent stopped: ask nvidia-smi instead
MAX_GPUS = 16
FILE = "gpu.csv"

# One shell line for the state script: the agent's fresh sample, else nvidia-smi itself, as `gpu=a,b,c,d;...`.
SHELL = (
    'g=; if [ -n "$(find "$d/gpu.csv" -mmin -1 2>/dev/null)" ]; then g=$(head -c 4000 "$d/gpu.csv"); '
    "elif command -v nvidia-smi >/dev/null 2>&1; then g=$(timeout 5 nvidia-smi "
    + " ".join(QUERY)
    + " 2>/dev/null | head -c 4000); fi; echo \"gpu=$(printf %s \"$g\" | tr '\\n' ';')\""
)


def sample() -> str | None:
    """nvidia-smi's CSV on this machine, or None where there is none (or it fails)."""
    program = shutil.which("nvidia-smi")
    if program is None:
        return None
    try:
        done = subprocess.run([program, *QUERY], capture_output=True, timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout[:4000].decode("utf-8", "replace") if done.returncode == 0 else None


def read_here(run_dir: str) -> list[Gpu] | None:
    """This machine's GPUs, from the agent's fresh sample or nvidia-smi; None without GPUs."""
    path = os.path.join(run_dir, FILE)
    try:
        if time.time() - os.stat(path).st_mtime < FRESH_FOR:
            with open(path, "rb") as handle:
                return parse(handle.read(4000).decode("utf-8", "replace"))
    except OSError:
        pass
    text = sample()
    return parse(text) if text else None


def parse(text: str) -> list[Gpu] | None:
    """`index, util, used MiB, total MiB` lines (or `;`-separated) as dicts; malformed lines are skipped."""
    gpus: list[Gpu] = []
    for line in text.replace(";", "\n").splitlines()[:MAX_GPUS]:
        fields = [field.strip() for field in line.split(",")]
        if len(fields) != 4 or not all(field.isdigit() and len(field) <= 9 for field in fields):
            continue
        index, util, used, total = (int(field) for field in fields)
        gpus.append({"index": index, "util_pct": min(util, 100), "memory_used_mib": used, "memory_total_mib": total})
    return gpus or None


def summary(listed: list[Gpu] | list[str] | None) -> str:
    """`87% 10.0/24.0 GiB`, or `2 GPUs 45% 10.1/48.0 GiB` (mean utilisation, summed memory).

    Names alone (what the ssh provider's first look at a machine found) measure nothing: `-`."""
    gpus = [gpu for gpu in listed or [] if isinstance(gpu, dict)]
    if not gpus:
        return "-"
    util = sum(int(g.get("util_pct", 0)) for g in gpus) / len(gpus)
    used = sum(int(g.get("memory_used_mib", 0)) for g in gpus) / 1024
    total = sum(int(g.get("memory_total_mib", 0)) for g in gpus) / 1024
    count = f"{len(gpus)} GPUs " if len(gpus) > 1 else ""
    return f"{count}{util:.0f}% {used:.1f}/{total:.1f} GiB"
