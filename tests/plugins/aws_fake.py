"""The AWS provider against moto in-process: a fake for what moto lacks, and the helpers tests share.

`FakeAws` answers through botocore `before-call` handlers where moto has nothing
(placement groups, the public DLAMI parameters) and injects faults; `leftovers`
lists everything gpurun could have made that still exists. Registered as a
plugin (tests/conftest.py), so its `fake` and `provider` fixtures are everywhere.
"""

from __future__ import annotations

import base64
import json
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

# moto reads these when it is first imported; the session fixture also sets them on moto.settings.
os.environ.setdefault("MOTO_EC2_ENABLE_INSTANCE_TYPE_VALIDATION", "true")
os.environ.setdefault("MOTO_ENABLE_AMI_VALIDATION", "true")
os.environ.setdefault("MOTO_ENABLE_KEYPAIR_VALIDATION", "true")

import boto3  # noqa: E402
from botocore.awsrequest import AWSResponse  # noqa: E402

from gpurun.providers.aws import AwsProvider  # noqa: E402
from gpurun.providers.aws.teardown import Timing  # noqa: E402
from gpurun.spec import validate_spec  # noqa: E402

# Bundled with moto for us-east-1: Ubuntu 14.04 x86_64, root /dev/sda1 from a 15 GB snapshot.
AMI = "ami-1e749f67"
OTHER_AMI = "ami-785db401"  # Ubuntu 16.04, also bundled
CIDR = "203.0.113.7/32"
STORE = "s3://ckpt-bucket/team/exp"
DLAMI = "/aws/service/deeplearning/ami"
DLAMI_PARAMETERS = {
    "x86_64": [
        (f"{DLAMI}/x86_64/oss-nvidia-driver-gpu-pytorch-2.7-ubuntu-22.04/latest/ami-id", OTHER_AMI),
        (f"{DLAMI}/x86_64/oss-nvidia-driver-gpu-pytorch-2.12-ubuntu-22.04/latest/ami-id", AMI),
        (f"{DLAMI}/x86_64/oss-nvidia-driver-gpu-pytorch-2.12-amazon-linux-2023/latest/ami-id", OTHER_AMI),
        (f"{DLAMI}/x86_64/base-oss-nvidia-driver-gpu-ubuntu-20.04/latest/ami-id", AMI),
        (f"{DLAMI}/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id", OTHER_AMI),
        (f"{DLAMI}/x86_64/base-oss-nvidia-driver-gpu-amazon-linux-2023/latest/ami-id", AMI),
    ],
    "arm64": [],
}
MUTATING_STEPS = [
    "ImportKeyPair",
    "CreateSecurityGroup",
    "AuthorizeSecurityGroupIngress",
    "CreateRole",
    "PutRolePolicy",
    "CreateInstanceProfile",
    "AddRoleToInstanceProfile",
    "CreatePlacementGroup",
    "RunInstances",
]
_MUTATING_PREFIXES = ("Create", "Import", "Authorize", "Put", "Add", "Run", "Attach", "Associate", "Modify")


def _response(status: int, parsed: dict[str, Any]) -> tuple[AWSResponse, dict[str, Any]]:
    parsed.setdefault("ResponseMetadata", {"HTTPStatusCode": status, "RequestId": "fake"})
    return AWSResponse("https://fake.amazonaws.com/", status, {}, None), parsed


def _error(code: str, message: str = "injected", status: int = 400) -> tuple[AWSResponse, dict[str, Any]]:
    return _response(status, {"Error": {"Code": code, "Message": message}})


def _query_tags(body: dict[str, Any], prefix: str = "TagSpecification.1") -> list[dict[str, str]]:
    tags, index = [], 1
    while f"{prefix}.Tag.{index}.Key" in body:
        tags.append({"Key": body[f"{prefix}.Tag.{index}.Key"], "Value": body[f"{prefix}.Tag.{index}.Value"]})
        index += 1
    return tags


def _query_filters(body: dict[str, Any]) -> list[tuple[str, list[str]]]:
    filters, index = [], 1
    while f"Filter.{index}.Name" in body:
        values, value_index = [], 1
        while f"Filter.{index}.Value.{value_index}" in body:
            values.append(body[f"Filter.{index}.Value.{value_index}"])
            value_index += 1
        filters.append((body[f"Filter.{index}.Name"], values))
        index += 1
    return filters


class FakeAws:
    """botocore handlers: record calls, inject faults, and serve what moto lacks."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.bodies: dict[str, list[Any]] = {}
        self.fail_once: dict[str, tuple[str, str]] = {}
        self.interrupt_before: set[str] = set()
        self.interrupt_after: set[str] = set()
        self.run_instances_rule = None  # body -> (code, message) | None
        self.placement_groups: dict[str, dict[str, Any]] = {}
        self.console_output: str | None = None
        self.deprecate: set[str] = set()
        self.launch_shift = timedelta(0)

    def handlers(self) -> list[tuple[str, Any]]:
        return [("before-call", self.before), ("after-call", self.after)]

    def mutating_calls(self) -> list[str]:
        return [name for name in self.calls if name.startswith(_MUTATING_PREFIXES)]

    def before(self, model, params, **_: Any):
        name = model.name
        body = params.get("body")
        self.calls.append(name)
        self.bodies.setdefault(name, []).append(body)
        if name in self.interrupt_before:
            self.interrupt_before.discard(name)
            raise KeyboardInterrupt
        if name in self.fail_once:
            code, message = self.fail_once.pop(name)
            return _error(code, message, 500 if code == "InternalError" else 400)
        if name == "RunInstances" and self.run_instances_rule is not None:
            answer = self.run_instances_rule(body)
            if answer:
                return _error(*answer)
        if name == "CreatePlacementGroup":
            group = body["GroupName"]
            if group in self.placement_groups:
                return _error("InvalidPlacementGroup.Duplicate", f"{group} exists")
            self.placement_groups[group] = {
                "GroupName": group,
                "Strategy": body.get("Strategy"),
                "State": "available",
                "Tags": _query_tags(body),
            }
            return _response(200, {"PlacementGroup": self.placement_groups[group]})
        if name == "DescribePlacementGroups":
            groups = list(self.placement_groups.values())
            for filter_name, values in _query_filters(body):
                if filter_name.startswith("tag:"):
                    key = filter_name[4:]
                    groups = [g for g in groups if {t["Key"]: t["Value"] for t in g["Tags"]}.get(key) in values]
            return _response(200, {"PlacementGroups": groups})
        if name == "DeletePlacementGroup":
            group = body["GroupName"]
            if self.placement_groups.pop(group, None) is None:
                return _error("InvalidPlacementGroup.Unknown", f"{group} unknown")
            return _response(200, {})
        if name == "GetParametersByPath":
            path = json.loads(body)["Path"].rstrip("/")
            if path.startswith(DLAMI):
                arch = path.rsplit("/", 1)[-1]
                parameters = [
                    {"Name": key, "Value": value, "Type": "String", "Version": 1}
                    for key, value in DLAMI_PARAMETERS.get(arch, [])
                ]
                return _response(200, {"Parameters": parameters})
        if name == "GetConsoleOutput" and self.console_output is not None:
            instance = body["InstanceId"]
            encoded = base64.b64encode(self.console_output.encode()).decode()
            return _response(200, {"InstanceId": instance, "Output": encoded})
        return None

    def after(self, model, parsed, **_: Any):
        name = model.name
        if name in self.interrupt_after:
            self.interrupt_after.discard(name)
            raise KeyboardInterrupt
        if name == "DescribeImages":
            for image in parsed.get("Images", []):
                if image["ImageId"] in self.deprecate:
                    image["DeprecationTime"] = "2020-01-01T00:00:00.000Z"
        if name == "DescribeInstances" and self.launch_shift:
            for reservation in parsed.get("Reservations", []):
                for item in reservation.get("Instances", []):
                    item["LaunchTime"] = item["LaunchTime"] - self.launch_shift


class Saves:
    """on_change: keeps a copy of every saved record."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def __call__(self, record: dict[str, Any]) -> None:
        self.records.append(json.loads(json.dumps(record)))


@pytest.fixture
def fake() -> FakeAws:
    return FakeAws()


def make_provider(fake: FakeAws) -> AwsProvider:
    provider = AwsProvider()
    provider.event_handlers.extend(fake.handlers())
    provider.wait_ssh = lambda machines, cidr, say: None
    provider.poll_interval = 0.0
    provider.iam_propagation_timeout = 1.0
    provider.host_key_timeout = 0.0  # moto's console never shows host keys
    provider.sleep = lambda seconds: None
    provider.teardown_timing = Timing(
        poll_interval=0.0, terminate_timeout=5.0, dependency_timeout=0.5, sleep=lambda s: None
    )
    return provider


@pytest.fixture
def provider(session, fake: FakeAws) -> AwsProvider:
    return make_provider(fake)


def make_spec(tmp_path: Path, *, store: str | None = STORE, recovery: dict[str, Any] | None = None, **aws: Any):
    data: dict[str, Any] = {
        "name": "exp",
        "provider": "aws",
        "run": "python train.py",
        "aws": {"ami": AMI, "ssh_cidr": CIDR, "instance_type": ["g5.xlarge"], **aws},
    }
    if recovery is not None:
        data["recovery"] = recovery
    if store:
        data["checkpoint"] = {"store": store}
    return validate_spec(data, source="experiment.yaml", spec_dir=tmp_path)


def new_record(run: str = "exp-abc123") -> dict[str, Any]:
    return {
        "run": run,
        "provider": "aws",
        "state": "launching",
        "created_at": "2026-01-01T00:00:00+00:00",
        "store": STORE,
        "resources": {},
    }


class Said(list):
    """What the rollback reports, in order (a Reporter for app/launch's rollback)."""

    def say(self, message: str) -> None:
        self.append(message)

    warn = error = say


def acquire(provider: AwsProvider, spec, record: dict[str, Any], saves, said: list[str]):
    """provider.acquire, rolled back on failure the way `gpurun launch` does it (the one rollback)."""
    from gpurun.app.connections import Connections
    from gpurun.app.launch import rolled_back

    reporter = Said()
    try:
        return provider.acquire(spec, record, saves, said.append)
    except BaseException as error:
        failure = rolled_back(error, provider, Connections(), record, [], reporter, saves, "acquiring machines")
        said.extend(reporter)
        raise failure from None


def text(error: BaseException) -> str:
    """An error as the CLI prints it: its line, then its details."""
    return "\n".join([str(error), *getattr(error, "details", [])])


def launch(provider: AwsProvider, spec, run: str = "exp-abc123", said: list[str] | None = None):
    record = new_record(run)
    saves = Saves()
    messages = said if said is not None else []
    machines = acquire(provider, spec, record, saves, messages)
    record["machines"] = machines
    return record, machines, saves


def leftovers(session: boto3.Session, fake: FakeAws) -> list[str]:
    """Everything gpurun could have made that still exists (found by tag AND by name)."""
    ec2, iam = session.client("ec2"), session.client("iam")
    found = []
    for reservation in ec2.describe_instances()["Reservations"]:
        for item in reservation["Instances"]:
            if item["State"]["Name"] != "terminated":
                found.append(f"instance {item['InstanceId']}")
    found += [f"volume {v['VolumeId']}" for v in ec2.describe_volumes()["Volumes"]]
    found += [
        f"sg {g['GroupName']}" for g in ec2.describe_security_groups()["SecurityGroups"] if g["GroupName"] != "default"
    ]
    found += [f"key {k['KeyName']}" for k in ec2.describe_key_pairs()["KeyPairs"]]
    found += [f"role {r['RoleName']}" for r in iam.list_roles()["Roles"] if r["RoleName"].startswith("gpurun-")]
    found += [f"profile {p['InstanceProfileName']}" for p in iam.list_instance_profiles()["InstanceProfiles"]]
    found += [f"placement group {name}" for name in fake.placement_groups]
    return found


def key_dir(run: str = "exp-abc123") -> Path:
    return Path(os.environ["GPURUN_HOME"]) / "keys" / run


# -- plan ----------------------------------------------------------------------------------------
