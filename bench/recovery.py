"""Recovery on AWS (moto's server + the boot emulator): reclaim -> the new machine's job prints again.

    python bench/recovery.py [--repeat 3]

`gpurun launch` starts a recovering run (an Auto Scaling group) and exits. The
test suite's boot emulator runs each new instance's user data as cloud-init
would (fake IMDSv2 of its own, moto as every endpoint, power commands stubbed).
Each round: wait for a snapshot, post a spot notice, wait for the final
snapshot, then take the machine away with terminate_instance_in_auto_scaling_group
(no decrement) and measure until the replacement's job prints its first line
(`resumed at step N`). Also counted: the requests moto served in that window:
S3 ones are all the new machine's (bootstrap and agent); query-API POSTs are the
terminate call and the emulator's own polling of the group (5 a second): the
machine makes none until the run ends. No boot time: real EC2 adds its own.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import boto3  # noqa: E402
from moto.server import ThreadedMotoServer  # noqa: E402

from tests.plugins.boot_emulator import BootEmulator  # noqa: E402

TRAIN = """\
import json, os, time
ckpt = os.environ["GPURUN_CHECKPOINT_DIR"]
os.makedirs(ckpt, exist_ok=True)
step = 0
resume = os.environ.get("GPURUN_RESUME_FROM")
if resume and os.path.exists(os.path.join(resume, "state.json")):
    step = json.load(open(os.path.join(resume, "state.json")))["step"]
    print(f"resumed at step {step}", flush=True)
while True:
    step += 1
    with open(os.path.join(ckpt, "state.json.tmp"), "w") as handle:
        json.dump({"step": step}, handle)
    os.replace(os.path.join(ckpt, "state.json.tmp"), os.path.join(ckpt, "state.json"))
    print(f"step {step}", flush=True)
    time.sleep(0.2)
"""


class RequestCounter(logging.Handler):
    """Counts the moto server's request log lines (werkzeug) while `on` is set, by service."""

    LINE = re.compile(r'"(GET|PUT|POST|HEAD|DELETE) (\S+) HTTP')

    def __init__(self) -> None:
        super().__init__()
        self.on = False
        self.counts: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        if not self.on:
            return
        match = self.LINE.search(record.getMessage())
        if match:
            method, path = match.groups()
            # Query-API calls (Auto Scaling, EC2) are POSTs to /; S3 names bucket and key in the path.
            self.counts[f"{method} {'query API' if path.startswith('/?') or path == '/' else 'S3'}"] += 1


def wait(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise SystemExit(f"timed out waiting for {what}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="gpurun-recovery-bench-"))
    counter = RequestCounter()
    werkzeug = logging.getLogger("werkzeug")
    werkzeug.setLevel(logging.INFO)
    werkzeug.addHandler(counter)
    werkzeug.propagate = False
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=True)
    moto.start()
    host, port = moto.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update(
        {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench",
            "AWS_DEFAULT_REGION": "us-east-1",
            "GPURUN_HOME": str(work / "home"),
        }
    )
    boto3.client("s3", region_name="us-east-1").create_bucket(Bucket="recovery-bench")
    code = work / "code"
    code.mkdir()
    (code / "train.py").write_text(TRAIN)
    spec = work / "exp.yaml"
    spec.write_text(
        f"name: bench\nprovider: aws\nworkdir: code\nrun: {sys.executable} train.py\n"
        "checkpoint: {dir: ckpt, every: 1h, store: 's3://recovery-bench/runs', resume: never}\n"
        "aws: {instance_type: [t3.micro], ami: ami-1e749f67, disk_gb: 20, ssh_cidr: 127.0.0.1/32, spot: true}\n"
        f"recovery: {{max_restarts: {args.repeat + 1}}}\n"
    )
    emulator = BootEmulator(endpoint, work / "machines")
    emulator.start()
    from gpurun.cli import main as gpurun_main

    started = time.monotonic()
    try:
        gpurun_main(["launch", str(spec), "--json"])
    except SystemExit as exited:
        if exited.code:
            raise
    print(f"launch returned after {time.monotonic() - started:.1f}s; the laptop does nothing from here", flush=True)
    run = json.loads((work / "home" / "runs").glob("*.json").__next__().read_text())["run"]
    autoscaling = boto3.client("autoscaling", region_name="us-east-1")
    s3 = boto3.client("s3", region_name="us-east-1")

    def latest() -> int | None:
        try:
            return int(
                json.loads(s3.get_object(Bucket="recovery-bench", Key=f"runs/{run}/LATEST")["Body"].read())["seq"]
            )
        except s3.exceptions.NoSuchKey:
            return None

    def log(instance: str) -> str:
        path = emulator.run_dir(instance, run) / "job.log"
        return path.read_text(errors="replace") if path.exists() else ""

    timings: list[float] = []
    calls: list[Counter[str]] = []
    for _round in range(args.repeat):
        [current] = wait(lambda: emulator.live() if len(emulator.live()) == 1 else None, 60, "one machine")
        wait(lambda current=current: "step 3" in log(current), 60, "step 3")
        seq = latest() or 0
        emulator.interrupt(current)
        wait(lambda seq=seq: (latest() or 0) > seq, 60, "the final snapshot after the notice")
        counter.counts = Counter()
        counter.on = True
        taken = time.monotonic()
        autoscaling.terminate_instance_in_auto_scaling_group(InstanceId=current, ShouldDecrementDesiredCapacity=False)
        replacement = wait(lambda current=current: [i for i in emulator.live() if i != current], 30, "a replacement")[0]
        wait(lambda replacement=replacement: "resumed at step" in log(replacement), 120, "the resumed job's first line")
        elapsed = time.monotonic() - taken
        counter.on = False
        timings.append(elapsed)
        calls.append(counter.counts)
        print(f"reclaim -> first line of the resumed job: {elapsed:.2f}s; requests: {dict(counter.counts)}", flush=True)
    emulator.close()
    gpurun_main_exit = 0
    try:
        gpurun_main(["teardown", run, "--yes"])
    except SystemExit as exited:
        gpurun_main_exit = int(exited.code or 0)
    moto.stop()
    print(
        f"median {statistics.median(timings):.2f}s, max {max(timings):.2f}s over {len(timings)} reclaims "
        f"(target <= 60 s); teardown exit {gpurun_main_exit}"
    )


if __name__ == "__main__":
    threading.excepthook = lambda hook: None
    main()
