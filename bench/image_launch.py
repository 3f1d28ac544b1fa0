"""Launch to the job's first output line: a fresh machine that runs `setup` vs one booted from a baked image.

    python bench/image_launch.py [--repeat 3] [--wheels DIR] [--package numpy]

The loopback world of tests/test_images_e2e.py: moto's server over HTTP in
this process, the instance's public IP set to 127.0.0.1, the "machine" being a
loopback sshd. `setup` pip-installs one package from a wheel in DIR (offline:
`--no-index --find-links`) into a target directory, and the job's first line
imports it. One fresh launch (reported on its own: its caches are cold), then
`gpurun image create`, then from-image and fresh launches interleaved; a fresh launch starts with the package
removed (a new machine has nothing installed), a launch from the image skips
setup because the setup hash matches. Timed: from calling `gpurun launch` to
the job's first line appearing in job.log. moto boots nothing, so real
machines add their boot time to both columns.

Get a wheel once with pip's ordinary client, e.g.
`pip download --no-deps --only-binary=:all: -d /tmp/wheels numpy`.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

for _name in (
    "MOTO_EC2_ENABLE_INSTANCE_TYPE_VALIDATION",
    "MOTO_ENABLE_AMI_VALIDATION",
    "MOTO_ENABLE_KEYPAIR_VALIDATION",
):
    os.environ[_name] = "true"

AMI = "ami-1e749f67"  # bundled with moto (us-east-1)
ACCOUNT = "123456789012"
FIRST_LINE = "first line: imported"


def cli(*args: str) -> tuple[int, str, str]:
    from gpurun.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main(list(args))
        except SystemExit as exited:
            code = int(exited.code or 0)
    return code, out.getvalue(), err.getvalue()


def check(result: tuple[int, str, str], what: str) -> str:
    code, out, err = result
    if code != 0:
        raise SystemExit(f"{what} failed ({code}): {err.strip()[-600:]}")
    return out


def setup_world(root: Path) -> tuple[Any, Any, str]:
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    from gpurun.providers.aws import AwsProvider
    from tests.plugins.sshd import make_sshd

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    os.environ.update(
        GPURUN_HOME=str(root / "gpurun-home"),
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_CONFIG_FILE=str(root / "aws-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(root / "aws-credentials"),
        NO_COLOR="1",
        GPURUN_IP_ECHO_URLS="http://127.0.0.1:9/",
    )
    boto3.client("s3", region_name="us-east-1").create_bucket(Bucket="bench-images")
    sshd = make_sshd(root / "sshd")
    aws_dir = sshd.home / ".aws"
    aws_dir.mkdir(exist_ok=True)
    (aws_dir / "credentials").write_text("[default]\naws_access_key_id = machine\naws_secret_access_key = machine\n")
    (aws_dir / "config").write_text(f"[default]\nregion = us-east-1\nendpoint_url = {endpoint}\n")
    sshd.seed_agent_venv()

    def after_run_instances(parsed: dict[str, Any], **_: Any) -> None:
        from moto.ec2.models import ec2_backends

        for instance in parsed.get("Instances", []):
            ec2_backends[ACCOUNT]["us-east-1"].get_instance(instance["InstanceId"]).nics[0].public_ip = "127.0.0.1"

    def before_import_key(params: dict[str, Any], **_: Any) -> None:
        material = params["body"]["PublicKeyMaterial"]
        key = base64.b64decode(material).decode() if not material.startswith("ssh-") else material
        with open(sshd.directory / "authorized_keys", "a") as handle:
            handle.write(key.strip() + "\n")

    def no_placement_groups(**_: Any) -> Any:
        from botocore.awsrequest import AWSResponse

        answer = {"PlacementGroups": [], "ResponseMetadata": {"HTTPStatusCode": 200, "RequestId": "bench"}}
        return AWSResponse(endpoint, 200, {}, None), answer

    def after_create_image(parsed: dict[str, Any], **_: Any) -> None:
        from moto.ec2.models import ec2_backends

        ec2_backends[ACCOUNT]["us-east-1"].amis[parsed["ImageId"]].root_device_type = "ebs"  # as EC2 registers it

    original_init = AwsProvider.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        self.host_key_timeout = 0  # moto's console output never prints host keys
        self.poll_interval = 0.2
        self.event_handlers.append(("after-call.ec2.RunInstances", after_run_instances))
        self.event_handlers.append(("before-call.ec2.ImportKeyPair", before_import_key))
        self.event_handlers.append(("before-call.ec2.DescribePlacementGroups", no_placement_groups))
        self.event_handlers.append(("after-call.ec2.CreateImage", after_create_image))

    AwsProvider.__init__ = init  # type: ignore[method-assign]
    return server, sshd, endpoint


def launch_until_first_line(spec: Path, sshd: Any, *extra: str) -> tuple[str, float, float]:
    """(run, seconds to the job's first line, seconds `launch` itself took)."""
    started = time.perf_counter()
    run = json.loads(check(cli("launch", str(spec), "--json", *extra), "launch"))["run"]
    launched = time.perf_counter() - started
    log = sshd.home / "gpurun" / run / "job.log"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if log.exists() and FIRST_LINE in log.read_text(errors="replace"):
            return run, time.perf_counter() - started, launched
        time.sleep(0.02)
    raise SystemExit(f"no first line from {run}: {log.read_text(errors='replace')[-600:] if log.exists() else ''}")


def end(run: str, sshd: Any) -> None:
    check(cli("teardown", run, "--yes", "--no-final-sync"), "teardown")
    for name in ("job.pid", "agent.pid"):  # moto's termination cannot stop loopback processes
        with contextlib.suppress(OSError, ValueError):
            os.kill(int((sshd.home / "gpurun" / run / name).read_text()), 9)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--wheels", default="/tmp/wheels", help="a directory holding the package's wheel")
    parser.add_argument("--package", default="numpy")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    wheels = Path(args.wheels).resolve()
    if not any(wheels.glob(f"{args.package}-*.whl")):
        raise SystemExit(f"no {args.package} wheel in {wheels}: see this file's docstring")
    root = Path(tempfile.mkdtemp(prefix="gpurun-image-bench-"))
    server, sshd, _endpoint = setup_world(root)
    target = sshd.home / "bench-site"
    code = root / "code"
    code.mkdir()
    (code / "requirements.txt").write_text(f"{args.package}\n")
    (code / "train.py").write_text(
        "import os, sys, time\n"
        "sys.path.insert(0, os.path.expanduser('~/bench-site'))\n"
        f"import {args.package}\n"
        f"print('{FIRST_LINE}', {args.package}.__name__, flush=True)\n"
        "time.sleep(600)\n"
    )
    spec = root / "bench.yaml"
    setup = (
        f"{sys.executable} -m pip install --quiet --disable-pip-version-check --no-index "
        f"--find-links {wheels} --target $HOME/bench-site -r requirements.txt"
    )
    spec.write_text(
        "name: imgbench\nprovider: aws\nworkdir: code\n"
        f"setup: {json.dumps(setup)}\n"
        f"run: {sys.executable} train.py\n"
        "checkpoint: {dir: ckpt, every: 1h, keep: 1, store: 's3://bench-images/runs', resume: never}\n"
        f"aws: {{instance_type: t3.micro, ami: {AMI}, disk_gb: 20, ssh_cidr: 127.0.0.1/32, spot: false}}\n"
        f"ssh: {{user: {sshd.user}, port: {sshd.port}}}\n"
    )
    fresh: list[float] = []
    baked: list[float] = []
    launch_only: dict[str, list[float]] = {"fresh": [], "image": []}
    try:
        shutil.rmtree(target, ignore_errors=True)
        run, seconds, launched = launch_until_first_line(spec, sshd)
        fresh.append(seconds)
        launch_only["fresh"].append(launched)
        started = time.perf_counter()
        made = json.loads(check(cli("image", "create", run, "--name", "bench-image", "--json"), "image create"))
        create_s = time.perf_counter() - started
        end(run, sshd)
        for _ in range(args.repeat):
            run, seconds, launched = launch_until_first_line(spec, sshd, "--set", "aws.ami=image:bench-image")
            baked.append(seconds)
            launch_only["image"].append(launched)
            end(run, sshd)
            shutil.rmtree(target, ignore_errors=True)
            run, seconds, launched = launch_until_first_line(spec, sshd)
            fresh.append(seconds)
            launch_only["fresh"].append(launched)
            end(run, sshd)
        check(cli("image", "delete", "bench-image", "--region", "us-east-1", "--yes"), "image delete")
    finally:
        sshd.stop()
        server.stop()
    cold = fresh.pop(0)  # the first launch also fills the page cache with pip and the wheel
    result = {
        "package": args.package,
        "first_fresh_s": round(cold, 2),
        "fresh_s": [round(value, 2) for value in fresh],
        "from_image_s": [round(value, 2) for value in baked],
        "fresh_median_s": round(statistics.median(fresh), 2),
        "from_image_median_s": round(statistics.median(baked), 2),
        "speedup": round(statistics.median(fresh) / statistics.median(baked), 2),
        "image_create_s": round(create_s, 2),
        "image_setup_hash": made["setup_hash"][:12],
    }
    if args.json:
        print(json.dumps(result))
        return
    print(f"setup: pip install {args.package} (offline wheel) into a target directory")
    print(f"first launch (cold caches, setup runs):       {result['first_fresh_s']} s")
    print(f"launch -> first line, fresh (setup runs):     {result['fresh_s']}  median {result['fresh_median_s']} s")
    print(
        f"launch -> first line, from the baked image:   {result['from_image_s']}  median {result['from_image_median_s']} s"
    )
    print(
        f"fresh / image: {result['speedup']}x;  image create (NoReboot, job paused around CreateImage): {create_s:.2f} s"
    )


if __name__ == "__main__":
    main()
