"""Client CPU per small-object request: S3Store's upload and restore paths, against one moto server.

    python bench/s3_request_cpu.py [--files 2000] [--latency-ms 0] [--repeat 3]

The moto server runs in its own process (bench/s3_upload.py's), so the CPU
counted here (`time.process_time()`, every thread of this process) is the
client's alone: `put_files` of N small files (2 to 20 KB, as the upload bench)
and `fetch_hashed` of the same N objects (each written to its own file and
hashed), once through the lean path (`gpurun.store.s3_lean`) and once through
the boto3 client (`S3Store.use_lean = False`, the path before it), alternating.
Reported as milliseconds of CPU per request; the wall time is shown too but
depends on the machine's load (and moto's server, ~2.5 ms of CPU a request, is
the ceiling here).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.s3_upload import BUCKET, start_server  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    server, endpoint = start_server(args.latency_ms)
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,
    )
    import boto3

    from gpurun.store.base import Fetch
    from gpurun.store.s3 import S3Store

    boto3.client("s3").create_bucket(Bucket=BUCKET)
    rng = random.Random(7)
    paths = {"lean path": True, "boto3 client": False}
    results: dict[tuple[str, str], list[tuple[float, float]]] = {
        (path, op): [] for path in paths for op in ("put", "get")
    }
    try:
        with tempfile.TemporaryDirectory(prefix="gpurun-cpu-") as root:
            items, sizes, digests = [], {}, {}
            for index in range(args.files):
                data = os.urandom(rng.randint(2_000, 20_000))
                path = Path(root, f"f{index:05d}.bin")
                path.write_bytes(data)
                key = f"shard-{index % 20:02d}/tensor-{index:05d}.bin"
                items.append((key, str(path)))
                sizes[key], digests[key] = len(data), hashlib.sha256(data).hexdigest()
            for attempt in range(args.repeat):
                for path, lean in paths.items():
                    tag = f"cpu-{attempt}-{int(lean)}"
                    store = S3Store(f"s3://{BUCKET}/{tag}")
                    store.use_lean = lean
                    store.put_bytes("probe", b"x")  # the round trip the pool is sized by
                    cpu, wall = time.process_time(), time.perf_counter()
                    store.put_files(items, if_absent=True)
                    results[path, "put"].append((time.process_time() - cpu, time.perf_counter() - wall))
                    out = Path(root, tag)
                    out.mkdir()
                    fetches = [Fetch(key, str(out / f"{n:05d}"), sizes[key]) for n, (key, _p) in enumerate(items)]
                    cpu, wall = time.process_time(), time.perf_counter()
                    got = store.fetch_hashed(fetches)
                    results[path, "get"].append((time.process_time() - cpu, time.perf_counter() - wall))
                    assert got == [digests[key] for key, _p in items], "restored bytes differ"
    finally:
        server.stdin.close()
        server.wait(timeout=30)
    print(f"{args.files} objects, {args.latency_ms:g} ms added; median of {args.repeat}; {os.cpu_count()} CPUs")
    print("| path | request | CPU per request (ms) | wall (s) |")
    print("|---|---|---|---|")
    for (path, op), runs in results.items():
        cpu = statistics.median(c for c, _w in runs) / args.files * 1000
        wall = statistics.median(w for _c, w in runs)
        print(f"| {path} | {'PutObject' if op == 'put' else 'GetObject'} | {cpu:.2f} | {wall:.2f} |")


if __name__ == "__main__":
    main()
