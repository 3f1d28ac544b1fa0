"""The security defaults hold for every AWS experiment we ship, checked on every request gpurun sends.

For each `experiments/*.yaml` with `provider: aws` (as written, and with
`nodes: 2` and spot), the AWS provider plans and acquires on moto (in-process,
validation on) while a botocore `before-call` handler on every service records
each request body. Then, over all of them: no ingress from 0.0.0.0/0 or ::/0
unless the spec asks for it (and then with a warning), IMDSv2 required, every
block device encrypted, the role's policy limited to the store's prefix, no
credentials in user data, the run's private key 0600 in a 0700 directory, and
every resource tagged. A CLI `launch --json` / `status --json` / `teardown
--json` with recognisable fake credentials prints none of them, and writes
none of them into records, the store or the machine. Afterwards moto holds
nothing of gpurun's.
"""

from __future__ import annotations

import base64
import json
import re
import shlex
import stat
import sys
from pathlib import Path
from typing import Any

import pytest

from gpurun.app import connections
from gpurun.providers.aws import AwsProvider
from gpurun.spec import load_spec
from gpurun.transport.local import LocalTransport
from tests.helpers import REPO, process_alive, wait_until
from tests.plugins.aws_fake import (
    FakeAws,
    Said,
    Saves,
    key_dir,
    leftovers,
    make_provider,
    new_record,
)


@pytest.fixture
def recorder() -> FakeAws:
    """Records every request body; serves the DLAMI parameters and placement groups moto lacks."""
    return FakeAws()


ACCESS_KEY = "AKIAIOSFODNN7EXAMPLE"
SECRET_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
SESSION_TOKEN = "FwoGZXIvYXdzEXAMPLEsessionTOKENgpurunTEST0123456789"
# A `secrets:` value from the launching computer's environment, planted in the CLI test.
WANDB_CANARY = "wandb-canary-3b1f9c0e7d2a4f6b8e5c1a9d0f7b3e2c"
SECRETS = (SECRET_KEY, SESSION_TOKEN, WANDB_CANARY)
from tests.plugins.aws_moto import CALLER_IP  # noqa: E402

OPEN = ("0.0.0.0/0", "::/0")
RUN = "exp-sec123"

EXPERIMENTS = sorted((REPO / "experiments").glob("*.yaml"))
AWS_EXPERIMENTS = [path for path in EXPERIMENTS if re.search(r"^provider:\s*aws\b", path.read_text(), re.M)]
VARIANTS = {"as-written": [], "two-spot-nodes": ["aws.nodes=2", "aws.spot=true"]}


@pytest.fixture
def world(session, recorder, ip_echo, monkeypatch):
    """moto with fake but recognisable credentials, and an IP echo service for ssh_cidr: auto."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    monkeypatch.setenv("AWS_SESSION_TOKEN", SESSION_TOKEN)
    session.client("s3").create_bucket(Bucket="my-gpurun-bucket")
    return session


def _bodies(recorder: FakeAws, name: str) -> list[dict[str, Any]]:
    return [body for body in recorder.bodies.get(name, []) if isinstance(body, dict)]


def _text(body: Any) -> str:
    if isinstance(body, bytes):
        return body.decode("utf-8", "replace")
    if isinstance(body, dict):
        return json.dumps(body, default=str)
    return str(body or "")


def _indexed(body: dict[str, Any], pattern: str) -> dict[str, Any]:
    return {key: value for key, value in body.items() if re.fullmatch(pattern, key)}


def _user_data(body: dict[str, Any]) -> str:
    raw = body.get("UserData", "")
    try:
        return base64.b64decode(raw, validate=True).decode()
    except ValueError:
        return raw


def _has_managed_tag(body: dict[str, Any]) -> bool:
    keys = [
        k
        for k, v in body.items()
        if re.fullmatch(r"(TagSpecification\.\d+\.Tag|Tags\.member)\.\d+\.Key", k) and v == "gpurun:managed"
    ]
    return any(body[key.replace(".Key", ".Value")] == "true" for key in keys)


def check_role_policy(
    policy: dict[str, Any],
    *,
    bucket: str,
    prefix: str,
    run: str,
    resumed: tuple[str, str, str] | None = None,
    secret_statements: list[dict[str, Any]] | None = None,
) -> None:
    """Each statement scoped to one run: this one's objects, and only reading the resumed one's;
    beyond S3, only reading exactly the spec's secrets."""
    scopes = [(bucket, f"{prefix}/{run}", ["s3:DeleteObject", "s3:GetObject", "s3:PutObject"])]
    if resumed:
        scopes.append((resumed[0], f"{resumed[1]}/{resumed[2]}", ["s3:GetObject"]))
    statements = [st for st in policy["Statement"] if st["Sid"].startswith(("ThisRun", "ResumedRun"))]
    others = [st for st in policy["Statement"] if st not in statements]
    assert others == (secret_statements or []), others
    policy = {**policy, "Statement": statements}
    assert len(statements) == 2 * len(scopes), statements
    for (scope_bucket, key, actions), objects, listing in zip(scopes, statements[::2], statements[1::2]):
        assert objects["Effect"] == "Allow" and objects["Resource"] == f"arn:aws:s3:::{scope_bucket}/{key}/*"
        assert sorted(objects["Action"]) == actions
        assert "Condition" not in objects
        assert listing["Effect"] == "Allow" and listing["Action"] == "s3:ListBucket"
        assert listing["Resource"] == f"arn:aws:s3:::{scope_bucket}"
        assert listing["Condition"] == {"StringLike": {"s3:prefix": [f"{key}/*"]}}
    text = json.dumps(policy)
    for _bucket, key, _actions in scopes:
        text = text.replace(f"{key}/*", "")
    assert "*" not in text, f"a wildcard beyond the run's own keys: {policy}"


def check_requests(
    recorder: FakeAws,
    *,
    cidr: str,
    bucket: str,
    prefix: str,
    nodes: int,
    run: str = "exp-sec123",
    resumed: tuple[str, str, str] | None = None,
    secret_statements: list[dict[str, Any]] | None = None,
) -> int:
    """Every assertion over what gpurun sent; returns how many bodies were checked."""
    everything = [(name, body) for name, bodies in recorder.bodies.items() for body in bodies]
    for name, body in everything:
        text = _text(body)
        for secret in (*SECRETS, "aws_secret"):
            assert secret not in text, f"{name} carries {secret!r}"
        if cidr not in OPEN:
            for open_range in OPEN:
                assert open_range not in text, f"{name} opens {open_range}: {text[:300]}"

    ingress = _bodies(recorder, "AuthorizeSecurityGroupIngress")
    assert ingress, "no ingress rule was written"
    for body in ingress:
        ranges = _indexed(body, r"IpPermissions\.\d+\.(IpRanges|Ipv6Ranges)\.\d+\.CidrIpv?6?")
        assert set(ranges.values()) == {cidr}, ranges
        ports = {
            (body[k], body[k.replace("FromPort", "ToPort")]) for k in _indexed(body, r"IpPermissions\.\d+\.FromPort")
        }
        assert ports <= {("22", "22"), (22, 22), ("-1", "-1"), (-1, -1)}, ports
        groups = _indexed(body, r"IpPermissions\.\d+\.Groups\.\d+\.GroupId")
        assert set(groups.values()) <= {body["GroupId"]}, "only the run's own group may reach all ports"
        assert bool(groups) == (nodes > 1)
    assert "AuthorizeSecurityGroupEgress" not in recorder.calls

    launches = _bodies(recorder, "RunInstances")
    templates = _bodies(recorder, "CreateLaunchTemplate")
    assert launches or templates, "neither RunInstances nor CreateLaunchTemplate was sent"
    for body in templates:
        # A recovering run: every machine of its group boots from this template.
        data = "LaunchTemplateData."
        assert body[f"{data}MetadataOptions.HttpTokens"] == "required"
        assert str(body[f"{data}MetadataOptions.HttpPutResponseHopLimit"]) == "1"
        devices = _indexed(body, rf"{re.escape(data)}BlockDeviceMapping\.\d+\.DeviceName")
        assert devices
        for key in devices:
            index = key.split(".")[2]
            ebs = f"{data}BlockDeviceMapping.{index}.Ebs."
            assert body.get(f"{ebs}Encrypted") in (True, "true"), f"template device {index} unencrypted"
            assert body.get(f"{ebs}DeleteOnTermination") in (True, "true")
        # Inside a group, shutdown=terminate would only make the group start another machine.
        assert f"{data}InstanceInitiatedShutdownBehavior" not in body
        script = base64.b64decode(body[f"{data}UserData"]).decode()
        for secret in (ACCESS_KEY, *SECRETS, "aws_secret", "aws_access_key_id", "AWS_SESSION_TOKEN", "AKIA"):
            assert secret.lower() not in script.lower(), f"template user data holds {secret!r}"
        kinds = set(_indexed(body, rf"{re.escape(data)}TagSpecification\.\d+\.ResourceType").values())
        assert {"instance", "volume"} <= kinds
    for body in launches:
        assert body["MetadataOptions.HttpTokens"] == "required"
        assert body["MetadataOptions.HttpEndpoint"] == "enabled"
        assert str(body["MetadataOptions.HttpPutResponseHopLimit"]) == "1"
        devices = _indexed(body, r"BlockDeviceMapping\.\d+\.DeviceName")
        assert devices
        for key in devices:
            index = key.split(".")[1]
            assert body.get(f"BlockDeviceMapping.{index}.Ebs.Encrypted") in (True, "true"), (
                f"device {index} unencrypted"
            )
            assert body.get(f"BlockDeviceMapping.{index}.Ebs.DeleteOnTermination") in (True, "true")
        assert body["InstanceInitiatedShutdownBehavior"] == "terminate"
        script = _user_data(body)
        assert script.startswith("#!/bin/bash")
        for secret in (ACCESS_KEY, *SECRETS, "aws_secret", "aws_access_key_id", "AWS_SESSION_TOKEN", "AKIA"):
            assert secret.lower() not in script.lower(), f"user data holds {secret!r}"
        assert "NetworkInterface.1.AssociatePublicIpAddress" not in body or body.get("NetworkInterface.1.Groups.1")

    for name in ("CreateAccessKey", "CreateUser", "AttachRolePolicy", "PutUserPolicy", "CreateLoginProfile"):
        assert name not in recorder.calls, f"gpurun must never call {name}"
    [role] = _bodies(recorder, "CreateRole")
    trust = json.loads(role["AssumeRolePolicyDocument"])
    assert [s["Principal"] for s in trust["Statement"]] == [{"Service": "ec2.amazonaws.com"}]
    puts = {body["PolicyName"]: json.loads(body["PolicyDocument"]) for body in _bodies(recorder, "PutRolePolicy")}
    group_policy = puts.pop("gpurun-own-group", None)
    if group_policy is not None:
        # A recovering run's machines may scale or leave their own group, and touch nothing else.
        for statement in group_policy["Statement"]:
            assert statement["Effect"] == "Allow"
            assert set(statement["Action"]) <= {
                "autoscaling:SetDesiredCapacity",
                "autoscaling:TerminateInstanceInAutoScalingGroup",
            }
            resources = [statement["Resource"]] if isinstance(statement["Resource"], str) else statement["Resource"]
            assert resources and all(f"autoScalingGroupName/gpurun-{run}" in r for r in resources), resources
    [put_document] = puts.values()
    check_role_policy(
        put_document,
        bucket=bucket,
        prefix=prefix,
        run=run,
        resumed=resumed,
        secret_statements=secret_statements,
    )

    for name in ("ImportKeyPair", "CreateSecurityGroup", "RunInstances", "CreateRole", "CreateInstanceProfile"):
        for body in _bodies(recorder, name):
            assert _has_managed_tag(body), f"{name} without gpurun:managed=true"
    for body in _bodies(recorder, "RunInstances"):
        kinds = set(_indexed(body, r"TagSpecification\.\d+\.ResourceType").values())
        assert {"instance", "volume"} <= kinds
    return len(everything)


def check_key_files(record: dict[str, Any]) -> None:
    key = Path(record["resources"]["key_file"])
    assert key.parent == key_dir(record["run"])
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(key.parent.stat().st_mode) == 0o700
    for other in key.parent.iterdir():
        assert stat.S_IMODE(other.stat().st_mode) & 0o077 == 0, f"{other} is readable by others"


def test_every_shipped_aws_experiment_is_checked():
    assert len(AWS_EXPERIMENTS) >= 2
    assert [path for path in EXPERIMENTS if load_spec(path).provider == "aws"] == AWS_EXPERIMENTS


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("experiment", AWS_EXPERIMENTS, ids=lambda path: path.stem)
def test_every_request_of_every_aws_experiment_is_safe(world, recorder, experiment, variant):
    spec = load_spec(experiment, VARIANTS[variant])
    provider = make_provider(recorder)
    rows = dict(provider.plan(spec, RUN))
    assert f"{CALLER_IP}/32" in rows["security rule"] and "warning" not in rows
    record, said, saves = new_record(RUN), [], Saves()
    record["store"] = spec.checkpoint.store
    recovering = bool(spec.recovery.max_restarts)
    if recovering:
        # As `gpurun launch` does: the group's machines bootstrap from code and agent in the store.
        from gpurun.app import recovering as recovery_app
        from gpurun.store import open_store

        record["spec"] = spec.to_record()
        recovery_app.stage(spec, record, open_store(record["store"]), [], None, Said())
    machines = provider.acquire(spec, record, saves, said.append)
    assert len(machines) == spec.aws.nodes
    assert not any("open to the whole internet" in line for line in said)
    bucket, _, prefix = spec.checkpoint.store[len("s3://") :].partition("/")
    checked = check_requests(
        recorder, cidr=f"{CALLER_IP}/32", bucket=bucket, prefix=prefix.strip("/"), nodes=spec.aws.nodes
    )
    assert checked > 10
    check_key_files(record)
    for saved in saves.records:
        assert not any(secret in json.dumps(saved) for secret in SECRETS)

    ec2 = world.client("ec2")
    volumes = ec2.describe_volumes()["Volumes"]
    if recovering:
        # moto gives a group's instance the AMI's own 8 GB gp2 root beside the template's disk;
        # EC2 replaces the root with the template's mapping. The template's request is checked above.
        volumes = [v for v in volumes if v["VolumeType"] == "gp3"]
    assert len(volumes) == spec.aws.nodes and all(v["Encrypted"] for v in volumes)
    if not recovering:  # moto does not copy a launch template's MetadataOptions to the group's instances
        for reservation in ec2.describe_instances()["Reservations"]:
            for instance in reservation["Instances"]:
                assert instance["MetadataOptions"]["HttpTokens"] == "required"

    provider.release(record, Saves(), said.append)
    if recovering:
        # The moto-only gp2 root (see above) has no DeleteOnTermination; only it may be left.
        gp2 = {v["VolumeId"] for v in ec2.describe_volumes()["Volumes"] if v["VolumeType"] == "gp2"}
        assert [x for x in leftovers(world, recorder) if x.split()[-1] not in gp2] == []
    else:
        assert leftovers(world, recorder) == []
    assert not key_dir(RUN).exists()


def test_the_role_only_reads_the_run_it_resumes_from_and_the_named_secrets(world, recorder):
    """Resuming from another run: read-only on that run's keys, nothing on the store's other runs;
    with ssm: and secretsmanager: secrets, reading exactly those."""
    spec = load_spec(
        AWS_EXPERIMENTS[0], ["secrets.DB_PASSWORD=ssm:/team/db", "secrets.HF_TOKEN=secretsmanager:hf-token"]
    )
    provider = make_provider(recorder)
    record = new_record(RUN)
    record["store"] = spec.checkpoint.store
    record["resumed_from"] = {"run": "exp-old456", "seq": 3, "store": "s3://other-bucket/older", "bytes": 10}
    provider.acquire(spec, record, Saves(), [].append)
    bucket, _, prefix = spec.checkpoint.store[len("s3://") :].partition("/")
    check_requests(
        recorder,
        cidr=f"{CALLER_IP}/32",
        bucket=bucket,
        prefix=prefix.strip("/"),
        nodes=1,
        resumed=("other-bucket", "older", "exp-old456"),
        secret_statements=[
            {
                "Sid": "SecretParameters",
                "Effect": "Allow",
                "Action": "ssm:GetParameter",
                "Resource": [f"arn:aws:ssm:{spec.aws.region}:123456789012:parameter/team/db"],
            },
            {
                "Sid": "Secrets",
                "Effect": "Allow",
                "Action": "secretsmanager:GetSecretValue",
                "Resource": [f"arn:aws:secretsmanager:{spec.aws.region}:123456789012:secret:hf-token-??????"],
            },
        ],
    )
    provider.release(record, Saves(), [].append)
    assert leftovers(world, recorder) == []


@pytest.mark.parametrize("open_range", OPEN)
def test_an_open_rule_only_when_the_spec_says_so_and_with_a_warning(world, recorder, open_range):
    spec = load_spec(AWS_EXPERIMENTS[0], [f"aws.ssh_cidr={open_range}"])
    provider = make_provider(recorder)
    rows = provider.plan(spec, RUN)
    assert any(label == "warning" and "open to the whole internet" in value for label, value in rows)
    record, said = new_record(RUN), []
    record["store"] = spec.checkpoint.store
    provider.acquire(spec, record, Saves(), said.append)
    assert any("open to the whole internet" in line for line in said)
    bucket, _, prefix = spec.checkpoint.store[len("s3://") :].partition("/")
    check_requests(recorder, cidr=open_range, bucket=bucket, prefix=prefix.strip("/"), nodes=1)
    [group] = world.client("ec2").describe_security_groups(GroupIds=[record["resources"]["security_group"]])[
        "SecurityGroups"
    ]
    [rule] = group["IpPermissions"]
    cidrs = [r["CidrIp"] for r in rule.get("IpRanges", [])] + [r["CidrIpv6"] for r in rule.get("Ipv6Ranges", [])]
    assert cidrs == [open_range]
    provider.release(record, Saves(), said.append)
    assert leftovers(world, recorder) == []


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    from gpurun.cli import main

    with pytest.raises(SystemExit) as exited:
        main(list(args))
    out, err = capsys.readouterr()
    return exited.value.code, out, err


def _no_secret_under(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file() and path.stat().st_size < 2_000_000:
            data = path.read_bytes()
            for secret in SECRETS:
                assert secret.encode() not in data, f"{secret!r} written into {path}"


def test_the_cli_prints_and_writes_no_secret(world, recorder, monkeypatch, tmp_path, gpurun_home, capsys):
    """launch/status/teardown --json in-process; the "machine" is this computer with its own HOME."""
    machine_home = tmp_path / "machine-home"
    machine_home.mkdir()
    monkeypatch.setenv("HOME", str(machine_home))
    monkeypatch.setenv("WANDB_API_KEY", WANDB_CANARY)
    original_init = AwsProvider.__init__
    configured = make_provider(recorder)

    def patched_init(self) -> None:
        original_init(self)
        for name in (
            "wait_ssh",
            "poll_interval",
            "iam_propagation_timeout",
            "host_key_timeout",
            "sleep",
            "teardown_timing",
        ):
            setattr(self, name, getattr(configured, name))
        self.event_handlers.extend(recorder.handlers())

    monkeypatch.setattr(AwsProvider, "__init__", patched_init)
    monkeypatch.setattr(connections, "open_transport", lambda record, machine, **_: LocalTransport())
    # The agent talks to a closed port: this computer has no moto for it to reach.
    monkeypatch.setattr(
        connections,
        "agent_python",
        lambda record, transport, say: (
            f"env AWS_ENDPOINT_URL=http://127.0.0.1:9 AWS_EC2_METADATA_SERVICE_ENDPOINT=http://127.0.0.1:9 "
            f"{shlex.quote(sys.executable)}"
        ),
    )
    experiment = next(p for p in AWS_EXPERIMENTS if "spot" in p.stem)
    code, out, err = _cli(
        capsys,
        "launch",
        str(experiment),
        "--json",
        "--set",
        "setup=null",
        "--set",
        "run=sleep 60",
        "--set",
        "aws.nodes=1",
        "--set",
        "secrets.WANDB_API_KEY=env",
        # One machine the CLI reaches over its transport (a recovering group bootstraps itself instead).
        "--set",
        "recovery.max_restarts=0",
    )
    assert code == 0, err
    launched = json.loads(out)
    run = launched["run"]
    assert launched["provider"] == "aws" and launched["state"] == "running"
    printed = [out, err]
    code, out, err = _cli(capsys, "status", "--json")
    assert code == 0, err
    assert [r["run"] for r in json.loads(out)] == [run]
    printed += [out, err]
    record = json.loads((gpurun_home / "runs" / f"{run}.json").read_text())
    check_key_files(record)
    run_dir = Path(record["machines"][0]["run_dir"])
    assert run_dir.is_relative_to(machine_home)
    job_pid = int((run_dir / "job.pid").read_text())
    bucket, _, prefix = launched["store"][len("s3://") :].partition("/")
    check_requests(recorder, cidr=f"{CALLER_IP}/32", bucket=bucket, prefix=prefix.strip("/"), nodes=1, run=run)
    stored = world.client("s3").get_object(Bucket=bucket, Key=f"{prefix}/{run}/run.json")["Body"].read().decode()
    printed.append(stored)
    for name in ("job.sh", "sync.manifest.json"):
        printed.append((run_dir / name).read_text())
    secrets_file = run_dir / "secrets.env"
    assert stat.S_IMODE(secrets_file.stat().st_mode) == 0o600 and WANDB_CANARY in secrets_file.read_text()
    for path in run_dir.rglob("*"):
        if path.is_file() and path != secrets_file:
            printed.append(path.read_bytes().decode("utf-8", "replace"))
    _no_secret_under(gpurun_home)

    code, out, err = _cli(capsys, "teardown", run, "--yes", "--json", "--no-final-sync")
    assert code == 0, err
    printed += [out, err]
    assert json.loads(out)["runs"][0]["run"] == run
    for text in printed:
        for secret in SECRETS:
            assert secret not in text
    wait_until(lambda: not process_alive(job_pid), timeout=10, what="the job to stop")
    _no_secret_under(gpurun_home)
    assert leftovers(world, recorder) == []
    assert json.loads((gpurun_home / "runs" / f"{run}.json").read_text())["state"] == "ended"
