"""Launch overhead of the AWS provider against moto's server over HTTP: wall time and AWS calls.

    python bench/aws_launch_overhead.py [--nodes 1 8 32] [--repeat 3] [--amis bundled|latest] [--json]

A ThreadedMotoServer runs in its own process (so the provider does not share
its interpreter lock), with AMI, instance-type and key-pair validation on.
Each launch is what `gpurun launch` asks of the provider: plan (read-only
checks) then acquire (key pair, security group, role and instance profile for
an S3 store, placement group when nodes > 1, one RunInstances, batched
describes, host keys from the console output of every node), then release.
moto has no boot delay, so this measures gpurun's own overhead plus moto's:
"moto cpu s" is the CPU the server process spent on the launch (Linux only).
moto loads its 44 bundled AMIs, as the test suite does (`--amis latest`: its
~1,100 "latest" ones, which its RunInstances scans once per instance).

Stand-ins, counted as AWS calls like the rest: the DLAMI SSM parameters
(GetParametersByPath) and placement groups, which moto's server does not
serve, are answered by before-call handlers. The SSH wait is stubbed (no
sshd at moto's fake addresses). Type: g5.xlarge, AMI: dlami-pytorch.

Target (issue 3): 32 nodes cost no more than 2x the wall time of 1.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

AMI = "ami-1e749f67"  # bundled with moto (us-east-1)
DLAMI = "/aws/service/deeplearning/ami/x86_64/oss-nvidia-driver-gpu-pytorch-2.7-ubuntu-22.04/latest/ami-id"

SERVER = r"""
import logging, os, sys
logging.getLogger("werkzeug").setLevel(logging.ERROR)
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
server.start()
host, port = server.get_host_and_port()
print(f"http://{host}:{port}", flush=True)
sys.stdin.read()
server.stop()
"""


def bundled_amis_file() -> str:
    """moto's 44 bundled AMIs as a file for MOTO_AMIS_PATH, as the test suite loads them."""
    import gzip
    import importlib.resources

    data = importlib.resources.files("moto.ec2").joinpath("resources/amis.json.gz").read_bytes()
    path = Path(tempfile.mkdtemp(prefix="gpurun-bench-amis-")) / "amis.json"
    path.write_bytes(gzip.decompress(data))
    return str(path)


def start_server(amis: str) -> tuple[subprocess.Popen, str]:
    env = dict(
        os.environ,
        MOTO_EC2_ENABLE_INSTANCE_TYPE_VALIDATION="true",
        MOTO_ENABLE_AMI_VALIDATION="true",
        MOTO_ENABLE_KEYPAIR_VALIDATION="true",
    )
    if amis == "bundled":
        env["MOTO_AMIS_PATH"] = bundled_amis_file()
    process = subprocess.Popen(
        [sys.executable, "-c", SERVER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True
    )
    url = process.stdout.readline().strip()
    if not url.startswith("http://"):
        process.kill()
        raise SystemExit("moto server did not start; install moto[server]")
    return process, url


class Counting:
    """Counts every AWS call by operation; answers the ones moto's server lacks."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.stubbed: Counter[str] = Counter()
        self.groups: dict[str, dict[str, Any]] = {}

    def reset(self) -> None:
        self.calls.clear()
        self.stubbed.clear()

    def handlers(self) -> list[tuple[str, Any]]:
        return [("before-call", self.before)]

    def before(self, model: Any, params: dict[str, Any], **_: Any) -> Any:
        from botocore.awsrequest import AWSResponse

        name = model.name
        self.calls[name] += 1
        body = params.get("body")

        def answer(parsed: dict[str, Any]) -> Any:
            self.stubbed[name] += 1
            parsed.setdefault("ResponseMetadata", {"HTTPStatusCode": 200})
            return AWSResponse("https://stub/", 200, {}, None), parsed

        if name == "GetParametersByPath":
            return answer({"Parameters": [{"Name": DLAMI, "Value": AMI, "Type": "String"}]})
        if name == "CreatePlacementGroup":
            tags, index = [], 1
            while f"TagSpecification.1.Tag.{index}.Key" in body:
                tags.append(
                    {
                        "Key": body[f"TagSpecification.1.Tag.{index}.Key"],
                        "Value": body[f"TagSpecification.1.Tag.{index}.Value"],
                    }
                )
                index += 1
            self.groups[body["GroupName"]] = {"GroupName": body["GroupName"], "Strategy": "cluster", "Tags": tags}
            return answer({"PlacementGroup": self.groups[body["GroupName"]]})
        if name == "DescribePlacementGroups":
            run = next((value for key, value in body.items() if key.startswith("Filter.2.Value")), None)
            groups = [
                group
                for group in self.groups.values()
                if run is None or {"Key": "gpurun:run", "Value": run} in group["Tags"]
            ]
            return answer({"PlacementGroups": groups})
        if name == "DeletePlacementGroup":
            self.groups.pop(body["GroupName"], None)
            return answer({})
        return None


def fresh_moto(url: str) -> None:
    """Reset moto (terminated instances pile up and slow its filters), then wake its backends."""
    import urllib.request

    import boto3

    urllib.request.urlopen(urllib.request.Request(f"{url}/moto-api/reset", method="POST"), timeout=30).read()
    session = boto3.Session(region_name="us-east-1")
    session.client("ec2").describe_availability_zones()
    session.client("ec2").describe_images(ImageIds=[AMI])
    session.client("iam").list_roles()
    session.client("sts").get_caller_identity()


def process_cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of a process so far (Linux /proc); 0.0 elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError, TypeError):
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def one_launch(nodes: int, counting: Counting, index: int, server_pid: int | None = None) -> dict[str, Any]:
    from gpurun.providers.aws import AwsProvider
    from gpurun.spec import validate_spec

    spec = validate_spec(
        {
            "name": "bench",
            "provider": "aws",
            "run": "python train.py",
            "checkpoint": {"store": "s3://bench-bucket/runs"},
            "aws": {
                "ami": "dlami-pytorch",
                "instance_type": ["g5.xlarge"],
                "nodes": nodes,
                "ssh_cidr": "203.0.113.7/32",
            },
        },
        source="bench.yaml",
        spec_dir=tempfile.gettempdir(),
    )
    provider = AwsProvider()
    provider.event_handlers.extend(counting.handlers())
    provider.wait_ssh = lambda machines, cidr, say: None
    provider.host_key_timeout = 0.0  # moto's console never prints host keys: read it once
    run = f"bench-{nodes}n-{index}"
    record = {"run": run, "provider": "aws", "resources": {}, "spec": spec.to_record()}
    counting.reset()
    server_cpu_started = process_cpu_s(server_pid)
    cpu_started = time.process_time()
    started = time.perf_counter()
    provider.plan(spec, run)
    planned = time.perf_counter()
    machines = provider.acquire(spec, record, lambda r: None, lambda line: None)
    acquired = time.perf_counter()
    cpu_s = time.process_time() - cpu_started
    server_cpu_s = process_cpu_s(server_pid) - server_cpu_started
    launch_calls = sum(counting.calls.values())
    launch_by_op = dict(counting.calls)
    stubbed = sum(counting.stubbed.values())
    assert len(machines) == nodes
    counting.reset()
    before_release = time.perf_counter()
    removed = provider.release(record, lambda r: None, lambda line: None)
    released = time.perf_counter()
    assert sum(entry.startswith("instance i-") for entry in removed) == nodes, removed
    return {
        "nodes": nodes,
        "plan_s": planned - started,
        "launch_s": acquired - started,
        "launch_cpu_s": cpu_s,
        "server_cpu_s": server_cpu_s,
        "launch_calls": launch_calls,
        "launch_stubbed": stubbed,
        "launch_by_op": launch_by_op,
        "teardown_s": released - before_release,
        "teardown_calls": sum(counting.calls.values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--amis",
        choices=["bundled", "latest"],
        default="bundled",
        help="AMIs moto loads: its 44 bundled ones, as the test suite does (default), or its ~1,100 'latest' ones",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    server, url = start_server(args.amis)
    home = tempfile.mkdtemp(prefix="gpurun-bench-")
    os.environ.update(
        AWS_ENDPOINT_URL=url,
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        GPURUN_HOME=home,
    )
    os.environ.pop("AWS_PROFILE", None)
    counting = Counting()
    results: dict[int, list[dict[str, Any]]] = {}
    try:
        one_launch(1, counting, 0)  # warm-up: botocore loads its models, the provider its modules
        for index in range(args.repeat):  # interleaved, so drift hits every size alike
            for nodes in args.nodes:
                fresh_moto(url)
                results.setdefault(nodes, []).append(one_launch(nodes, counting, index + 1, server.pid))
    finally:
        server.stdin.close()
        server.wait(timeout=30)

    summary = []
    for nodes, runs in results.items():
        summary.append(
            {
                "nodes": nodes,
                "launch_s": statistics.median(r["launch_s"] for r in runs),
                "launch_cpu_s": statistics.median(r["launch_cpu_s"] for r in runs),
                "server_cpu_s": statistics.median(r["server_cpu_s"] for r in runs),
                "plan_s": statistics.median(r["plan_s"] for r in runs),
                "launch_calls": runs[-1]["launch_calls"],
                "launch_stubbed": runs[-1]["launch_stubbed"],
                "teardown_s": statistics.median(r["teardown_s"] for r in runs),
                "teardown_calls": runs[-1]["teardown_calls"],
                "launch_by_op": runs[-1]["launch_by_op"],
            }
        )
    base = summary[0]["launch_s"] if summary else 1.0
    base_cpu = summary[0]["launch_cpu_s"] if summary else 1.0
    if args.json:
        print(json.dumps({"repeat": args.repeat, "results": summary}, indent=1))
        return
    print(f"moto server over HTTP, median of {args.repeat}; SSH wait stubbed")
    print(
        f"{'nodes':>5}  {'launch s':>8}  {'x 1 node':>8}  {'client cpu s':>12}  {'x 1 node':>8}  {'moto cpu s':>10}  "
        f"{'plan s':>6}  "
        f"{'calls':>5}  {'teardown s':>10}  {'calls':>5}"
    )
    for row in summary:
        print(
            f"{row['nodes']:>5}  {row['launch_s']:>8.3f}  {row['launch_s'] / base:>8.2f}  "
            f"{row['launch_cpu_s']:>12.3f}  {row['launch_cpu_s'] / base_cpu:>8.2f}  {row['server_cpu_s']:>10.2f}  "
            f"{row['plan_s']:>6.3f}  "
            f"{row['launch_calls']:>5}  {row['teardown_s']:>10.3f}  {row['teardown_calls']:>5}"
        )
    for row in summary:
        ops = ", ".join(f"{op} {count}" for op, count in sorted(row["launch_by_op"].items()))
        print(f"  {row['nodes']} node(s) launch calls: {ops}")


if __name__ == "__main__":
    main()
