"""Cold-process timings of `gpurun --help` and `gpurun status` with 100 recorded runs.

    python bench/cli_startup.py [--repeat 15]

Each measurement is a fresh `python -m gpurun` process (what a user runs),
median of --repeat runs. Also shows, from `python -X importtime`, that
`--help` imports neither boto3, paramiko nor pydantic.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(argv: list[str], env: dict[str, str], repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        samples.append(time.perf_counter() - started)
    return statistics.median(samples)


def make_runs(home: Path, count: int, live_pid: int) -> None:
    (home / "runs").mkdir(parents=True)
    for index in range(count):
        run = f"bench-{index:06d}"
        run_dir = home / "local" / run
        run_dir.mkdir(parents=True)
        (run_dir / "job.pid").write_text(str(live_pid))
        (run_dir / "job.phase").write_text("run")
        (run_dir / "agent.status.json").write_text(
            json.dumps(
                {"last_seq": 3, "last_at": "2026-11-26T08:00:00+00:00", "last_bytes": 41_000_000, "last_files": 2}
            )
        )
        record = {
            "run": run,
            "provider": "local",
            "state": "running",
            "exit_code": None,
            "created_at": "2026-11-26T07:00:00+00:00",
            "store": f"file://{home}/store",
            "spec": {"name": "bench", "checkpoint": {"dir": "checkpoints", "nodes": "rank0"}},
            "machines": [{"rank": 0, "host": "localhost", "run_dir": str(run_dir)}],
            "resources": {},
            "last_checkpoint": None,
            "cost_usd": None,
        }
        (home / "runs" / f"{run}.json").write_text(json.dumps(record))


# In one process: the records read through their schema (runs.load_all) against the same
# files parsed as plain JSON, best of 30, so the schema's share of `status` shows apart from start-up.
READ_RECORDS = """
import json, os, time
from gpurun import paths, runs

def best(read):
    times = []
    for _ in range(30):
        started = time.perf_counter()
        read()
        times.append(time.perf_counter() - started)
    return min(times)

def plain():
    for entry in os.scandir(paths.runs_dir()):
        with open(entry.path, "rb") as handle:
            json.loads(handle.read())

print(best(runs.load_all), best(plain))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="gpurun-bench-"))
    sleeper = subprocess.Popen(["sleep", "3600"])
    try:
        make_runs(home, 100, sleeper.pid)
        env = {**os.environ, "GPURUN_HOME": str(home), "NO_COLOR": "1"}
        base = [sys.executable, "-m", "gpurun"]
        python_only = timed([sys.executable, "-c", "pass"], env, args.repeat)
        help_time = timed([*base, "--help"], env, args.repeat)
        status_time = timed([*base, "status"], env, args.repeat)
        imports = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "gpurun", "--help"], env=env, capture_output=True, text=True
        ).stderr
        heavy = sorted(
            {
                line.split("|")[-1].strip().split(".")[0]
                for line in imports.splitlines()
                if any(
                    f"| {name}" in line or f"|   {name}" in line
                    for name in ("boto3", "botocore", "paramiko", "pydantic")
                )
            }
        )
        print(f"python -c pass        {python_only:.3f} s (interpreter start-up, for scale)")
        print(f"gpurun --help         {help_time:.3f} s  (target <= 0.25 s; sky --help ~2.1 s)")
        print(f"gpurun status (100)   {status_time:.3f} s  (target <= 0.30 s; sky status ~2.8 s)")
        print(f"heavy modules imported by --help: {heavy or 'none'}")
        checked, plain = map(
            float,
            subprocess.run(
                [sys.executable, "-c", READ_RECORDS], env=env, capture_output=True, text=True, check=True
            ).stdout.split(),
        )
        print(
            f"100 records read       {checked * 1000:.1f} ms checked against their schema, "
            f"{plain * 1000:.1f} ms as plain JSON ({checked / plain:.1f}x)"
        )
    finally:
        sleeper.kill()
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
