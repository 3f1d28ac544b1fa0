"""Time from a spot interruption notice to a new LATEST, for a 100 MB checkpoint on moto's S3 server.

    python bench/spot_notice.py [--mb 100] [--repeat 3]

The agent runs as on a machine (`python -m gpurun.agent --spot-notice`),
polling a fake IMDSv2 (token flow required) every 5 s. The training loop has
just written a new 100 MB checkpoint when the notice appears. Measured: the
notice being posted -> LATEST naming the new snapshot. The poll interval
(up to 5 s) is part of the figure, as it would be on EC2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import boto3  # noqa: E402
from moto.server import ThreadedMotoServer  # noqa: E402

from tests.plugins.fake_imds import FakeImds, _handler  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=int, default=100)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    host, port = moto.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    imds = FakeImds()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(imds))
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    imds.url = f"http://127.0.0.1:{server.server_address[1]}"
    env = {
        **os.environ,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_SERVICE_ENDPOINT": imds.url,
    }
    s3 = boto3.client(
        "s3", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="b", aws_secret_access_key="b"
    )
    s3.create_bucket(Bucket="spot-bench")
    samples = []
    try:
        for attempt in range(args.repeat):
            imds.clear()
            root = Path(tempfile.mkdtemp(prefix="gpurun-spot-"))
            ckpt = root / "work/ckpt"
            ckpt.mkdir(parents=True)
            (ckpt / "weights.bin").write_bytes(os.urandom(args.mb * 1_000_000))
            run = f"spot-{attempt}"
            agent = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "gpurun.agent",
                    "--watch",
                    str(ckpt),
                    "--to",
                    "s3://spot-bench/runs",
                    "--run",
                    run,
                    "--every",
                    "1s",
                    "--run-dir",
                    str(root),
                    "--spot-notice",
                ],
                env=env,
                stdout=open(root / "agent.log", "wb"),
                stderr=subprocess.STDOUT,
            )

            def latest(run: str = run) -> int:
                try:
                    return json.loads(s3.get_object(Bucket="spot-bench", Key=f"runs/{run}/LATEST")["Body"].read())[
                        "seq"
                    ]
                except s3.exceptions.NoSuchKey:
                    return 0

            while latest() < 1:
                time.sleep(0.2)
            os.kill(agent.pid, 0)
            # Slow the schedule down so only the notice can trigger the next snapshot.
            agent.terminate()
            agent.wait()
            before = latest()
            agent = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "gpurun.agent",
                    "--watch",
                    str(ckpt),
                    "--to",
                    "s3://spot-bench/runs",
                    "--run",
                    run,
                    "--every",
                    "1h",
                    "--run-dir",
                    str(root),
                    "--spot-notice",
                ],
                env=env,
                stdout=open(root / "agent.log", "ab"),
                stderr=subprocess.STDOUT,
            )
            time.sleep(2.0)
            (ckpt / "weights.tmp").write_bytes(os.urandom(args.mb * 1_000_000))
            os.replace(ckpt / "weights.tmp", ckpt / "weights.bin")
            started = time.perf_counter()
            imds.interrupt()
            while latest() <= before:
                time.sleep(0.05)
            samples.append(time.perf_counter() - started)
            agent.terminate()
            agent.wait()
            print(f"run {attempt}: notice -> new LATEST in {samples[-1]:.2f} s")
    finally:
        server.shutdown()
        moto.stop()
    print(f"median notice -> LATEST for {args.mb} MB: {statistics.median(samples):.2f} s (target <= 10 s)")


if __name__ == "__main__":
    main()
