"""The AWS provider against moto (in-process), with AMI, instance-type and key-pair validation on.

Every assertion is on what moto holds afterwards. Faults are injected with
botocore `before-call` handlers that answer in place of AWS; the same handlers
stand in for what moto lacks (placement groups, the public DLAMI parameters).
"""

from __future__ import annotations

import base64
import json
import os
import socket
import stat
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

# moto reads these when it is first imported; the fixture below also sets them on moto.settings.
os.environ.setdefault("MOTO_EC2_ENABLE_INSTANCE_TYPE_VALIDATION", "true")
os.environ.setdefault("MOTO_ENABLE_AMI_VALIDATION", "true")
os.environ.setdefault("MOTO_ENABLE_KEYPAIR_VALIDATION", "true")

import boto3  # noqa: E402

from gpurun.errors import BadInput, GpurunError, Interrupted, NoCapacity  # noqa: E402
from gpurun.providers.aws import AwsProvider  # noqa: E402
from gpurun.providers.aws.ami import pick_dlami  # noqa: E402
from gpurun.providers.aws.teardown import Timing  # noqa: E402
from gpurun.spec import validate_spec  # noqa: E402
from tests.helpers import isolate  # noqa: E402
from tests.plugins.aws_fake import (  # noqa: E402  (moto's settings first)
    _MUTATING_PREFIXES,
    AMI,
    CIDR,
    DLAMI,
    MUTATING_STEPS,
    OTHER_AMI,
    FakeAws,
    Saves,
    _error,
    acquire,
    key_dir,
    launch,
    leftovers,
    make_provider,
    make_spec,
    new_record,
    text,
)
from tests.plugins.aws_moto import enable_moto_validation  # noqa: E402


def test_plan_shows_everything_and_creates_nothing(provider, session, fake, tmp_path):
    spec = make_spec(tmp_path, instance_type=["g5.xlarge", "g6.xlarge"], spot=True, recovery={"max_restarts": 0})
    rows = dict(provider.plan(spec, "exp-abc123"))
    assert AMI in rows["AMI"] and "ubuntu-trusty-14.04" in rows["AMI"]
    assert "1x NVIDIA A10G 22 GiB" in rows["instance type"]
    assert "g6.xlarge" in rows["fallback type 1"] and "L4" in rows["fallback type 1"]
    assert "$1.0060/h on-demand" in rows["price/hour g5.xlarge"] and "spot $" in rows["price/hour g5.xlarge"]
    assert "us-east-1a" in rows["zones to try"]
    assert f"TCP 22 from {CIDR} only" in rows["security rule"]
    assert "gpurun:run=exp-abc123" in rows["tags"] and "gpurun:managed=true" in rows["tags"]
    assert "gpurun:owner=user/moto" in rows["tags"]
    assert "12h" in rows["guard"] and "30m" in rows["guard"]
    assert "arn:aws:s3:::ckpt-bucket/team/exp/*" in rows["role policy"]
    assert "IMDSv2" in rows["metadata"] and "encrypted" in rows["disk"]
    assert "warning" not in rows
    assert leftovers(session, fake) == []
    assert not key_dir().exists()
    assert not [name for name in fake.calls if name.startswith(_MUTATING_PREFIXES)]


def test_plan_warns_about_a_type_without_gpu_and_an_open_rule(provider, tmp_path):
    spec = make_spec(tmp_path, instance_type=["t3.micro"], ssh_cidr="0.0.0.0/0", store=None)
    rows = provider.plan(spec, "exp-abc123")
    warnings = [value for label, value in rows if label == "warning"]
    assert "t3.micro has no GPU" in warnings
    assert any("open to the whole internet" in warning for warning in warnings)
    assert "none" in dict(rows)["role policy"]


def test_plan_resolves_dlami_aliases_through_ssm(provider, tmp_path):
    rows = dict(provider.plan(make_spec(tmp_path, ami="dlami-pytorch"), "exp-abc123"))
    assert AMI in rows["AMI"] and "pytorch-2.12-ubuntu-22.04" in rows["AMI"]
    rows = dict(provider.plan(make_spec(tmp_path, ami="dlami-base"), "exp-abc123"))
    assert OTHER_AMI in rows["AMI"] and "base-oss-nvidia-driver-gpu-ubuntu-22.04" in rows["AMI"]


def test_pick_dlami_prefers_newest_framework_then_ubuntu():
    names = [
        (f"{DLAMI}/arm64/oss-nvidia-driver-gpu-pytorch-2.7-ubuntu-22.04/latest/ami-id", "ami-a"),
        (f"{DLAMI}/arm64/oss-nvidia-driver-gpu-pytorch-2.12-ubuntu-22.04/latest/ami-id", "ami-b"),
        (f"{DLAMI}/arm64/oss-nvidia-driver-gpu-pytorch-2.12-ubuntu-24.04/latest/ami-id", "ami-c"),
        (f"{DLAMI}/arm64/oss-nvidia-driver-gpu-pytorch-2.12-ubuntu-24.04/2026.01.01/ami-id", "ami-old"),
        (f"{DLAMI}/arm64/base-oss-nvidia-driver-gpu-ubuntu-24.04/latest/ami-id", "ami-d"),
        (f"{DLAMI}/arm64/neuron-pytorch-9.9-ubuntu-24.04/latest/ami-id", "ami-neuron"),
    ]
    assert pick_dlami("dlami-pytorch", names)[1] == "ami-c"
    assert pick_dlami("dlami-base", names)[1] == "ami-d"
    assert pick_dlami("dlami-base", names[:3]) is None


# -- launch: the defaults, asserted on what moto holds --------------------------------------------


@pytest.fixture(scope="class")
def safe_launch(tmp_path_factory: pytest.TempPathFactory, bundled_amis: str) -> dict[str, Any]:
    """One launch with the defaults, and what moto then holds about it, read once: each test
    below checks one part (a launch costs more than all the reads)."""
    from moto import mock_aws

    from gpurun.providers.aws.session import new_botocore_session

    with pytest.MonkeyPatch.context() as monkeypatch, mock_aws():
        isolate(tmp_path_factory, monkeypatch)
        enable_moto_validation(monkeypatch, bundled_amis)
        session = boto3.Session(botocore_session=new_botocore_session(), region_name="us-east-1")
        fake = FakeAws()
        spec = make_spec(tmp_path_factory.mktemp("spec"), disk_gb=120)
        record, [machine], _ = launch(make_provider(fake), spec)
        ec2, iam = session.client("ec2"), session.client("iam")
        instance = ec2.describe_instances(InstanceIds=[machine["instance_id"]])["Reservations"][0]["Instances"][0]
        by_instance = [{"Name": "attachment.instance-id", "Values": [instance["InstanceId"]]}]
        policy = iam.get_role_policy(RoleName="gpurun-exp-abc123", PolicyName="gpurun-checkpoint-store")
        key_path = Path(machine["key_path"])
        return {
            "record": record,
            "machine": machine,
            "instance": instance,
            "shutdown": ec2.describe_instance_attribute(
                InstanceId=instance["InstanceId"], Attribute="instanceInitiatedShutdownBehavior"
            )["InstanceInitiatedShutdownBehavior"]["Value"],
            "user_data": ec2.describe_instance_attribute(InstanceId=instance["InstanceId"], Attribute="userData")[
                "UserData"
            ]["Value"],
            "volumes": ec2.describe_volumes(Filters=by_instance)["Volumes"],
            "run_instances": fake.bodies["RunInstances"][-1],
            "groups": ec2.describe_security_groups(GroupIds=[record["resources"]["security_group"]])["SecurityGroups"],
            "policy": policy["PolicyDocument"],
            "role_tags": iam.list_role_tags(RoleName="gpurun-exp-abc123")["Tags"],
            "attached_policies": iam.list_attached_role_policies(RoleName="gpurun-exp-abc123")["AttachedPolicies"],
            "key_pairs": ec2.describe_key_pairs(KeyNames=["gpurun-exp-abc123"])["KeyPairs"],
            "key_dir": key_dir(),
            "key_mode": stat.S_IMODE(key_path.stat().st_mode),
            "key_dir_mode": stat.S_IMODE(key_path.parent.stat().st_mode),
            "key_text": key_path.read_text(),
        }


@pytest.mark.xdist_group("aws-provider-safe-launch")  # one worker launches once for the whole class
class TestLaunchAppliesEverySafeDefault:
    def test_the_instance_is_tagged_requires_imdsv2_and_terminates_on_shutdown(self, safe_launch) -> None:
        instance = safe_launch["instance"]
        tags = {t["Key"]: t["Value"] for t in instance["Tags"]}
        assert tags == {
            "gpurun:run": "exp-abc123",
            "gpurun:managed": "true",
            "gpurun:owner": "user/moto",
            "Name": "gpurun-exp-abc123",
        }
        assert instance["MetadataOptions"]["HttpTokens"] == "required"
        assert instance["ImageId"] == AMI and instance["InstanceType"] == "g5.xlarge"
        assert safe_launch["shutdown"] == "terminate"

    def test_the_root_volume_is_encrypted_gp3_of_the_spec_size_and_goes_with_the_instance(self, safe_launch) -> None:
        [volume] = safe_launch["volumes"]
        assert (volume["Size"], volume["VolumeType"], volume["Encrypted"]) == (120, "gp3", True)
        assert {t["Key"]: t["Value"] for t in volume["Tags"]}["gpurun:run"] == "exp-abc123"
        body = safe_launch["run_instances"]
        assert body["BlockDeviceMapping.1.Ebs.DeleteOnTermination"] in (True, "true")
        assert body["BlockDeviceMapping.1.DeviceName"] == "/dev/sda1"

    def test_the_security_group_opens_ssh_to_the_caller_only(self, safe_launch) -> None:
        [group] = safe_launch["groups"]
        assert {t["Key"]: t["Value"] for t in group["Tags"]}["gpurun:managed"] == "true"
        [rule] = group["IpPermissions"]
        assert (rule["IpProtocol"], rule["FromPort"], rule["ToPort"]) == ("tcp", 22, 22)
        assert [r["CidrIp"] for r in rule["IpRanges"]] == [CIDR]
        assert not rule.get("Ipv6Ranges") and not rule.get("UserIdGroupPairs")
        assert [g["GroupId"] for g in safe_launch["instance"]["SecurityGroups"]] == [group["GroupId"]]

    def test_the_role_reaches_only_the_runs_store_prefix(self, safe_launch) -> None:
        policy = safe_launch["policy"]
        if isinstance(policy, str):
            policy = json.loads(policy)
        resources = [statement["Resource"] for statement in policy["Statement"]]
        assert resources == ["arn:aws:s3:::ckpt-bucket/team/exp/exp-abc123/*", "arn:aws:s3:::ckpt-bucket"]
        assert policy["Statement"][1]["Condition"]["StringLike"]["s3:prefix"] == ["team/exp/exp-abc123/*"]
        role_tags = {t["Key"]: t["Value"] for t in safe_launch["role_tags"]}
        assert role_tags["gpurun:managed"] == "true"
        assert safe_launch["attached_policies"] == []
        assert safe_launch["instance"]["IamInstanceProfile"]["Arn"].endswith(
            "instance-profile/gpurun/gpurun-exp-abc123"
        )

    def test_a_fresh_ed25519_key_is_kept_private_here(self, safe_launch) -> None:
        [pair] = safe_launch["key_pairs"]
        assert pair["KeyType"] == "ed25519"
        assert safe_launch["instance"]["KeyName"] == "gpurun-exp-abc123"
        assert Path(safe_launch["machine"]["key_path"]).parent == safe_launch["key_dir"]
        assert safe_launch["key_mode"] == 0o600
        assert safe_launch["key_dir_mode"] == 0o700
        assert safe_launch["key_text"].startswith("-----BEGIN OPENSSH PRIVATE KEY-----")

    def test_user_data_guards_runtime_and_idleness_and_holds_no_credentials(self, safe_launch) -> None:
        script = base64.b64decode(safe_launch["user_data"]).decode()
        assert "RUNTIME=43200" in script and "--unit=gpurun-max-runtime" in script and "per-boot" in script
        assert "IDLE=1800" in script and "job.pid" in script
        for secret in ("testing", "AWS_SECRET", "aws_access_key_id", "AKIA"):
            assert secret not in script

    def test_the_machine_and_record_say_how_to_reach_it(self, safe_launch) -> None:
        machine, instance = safe_launch["machine"], safe_launch["instance"]
        assert machine == {
            **machine,
            "rank": 0,
            "host": instance["PublicIpAddress"],
            "public_ip": instance["PublicIpAddress"],
            "private_ip": instance["PrivateIpAddress"],
            "port": 22,
            "user": "ubuntu",
            "instance_type": "g5.xlarge",
            "spot": False,
            "state": "running",
            "host_keys": None,
            "price_per_hour": 1.006,
            "run_dir": "/home/ubuntu/gpurun/exp-abc123",
        }
        assert safe_launch["record"]["aws"] == {
            "region": "us-east-1",
            "profile": None,
            "account": "123456789012",
            "owner": "user/moto",
            "nodes": 1,
        }


def test_each_resource_is_saved_the_moment_it_exists(provider, tmp_path):
    _, _, saves = launch(provider, make_spec(tmp_path, nodes=2))
    order = []
    for saved in saves.records:
        for key in saved["resources"]:
            if key not in order:
                order.append(key)
    assert order == [
        "key_file",
        "key_pair_id",
        "key_pair",
        "security_group",
        "role",
        "instance_profile",
        "placement_group",
        "instances",
    ]
    assert len(saves.records[-1]["resources"]["instances"]) == 2


def test_spot_launch_with_max_price(provider, session, fake, tmp_path):
    _, machines, _ = launch(provider, make_spec(tmp_path, spot=True, max_price=0.75, recovery={"max_restarts": 0}))
    body = fake.bodies["RunInstances"][-1]
    assert body["InstanceMarketOptions.MarketType"] == "spot"
    assert body["InstanceMarketOptions.SpotOptions.SpotInstanceType"] == "one-time"
    assert body["InstanceMarketOptions.SpotOptions.InstanceInterruptionBehavior"] == "terminate"
    assert body["InstanceMarketOptions.SpotOptions.MaxPrice"] == "0.75"
    instance = session.client("ec2").describe_instances(InstanceIds=[machines[0]["instance_id"]])
    assert instance["Reservations"][0]["Instances"][0]["InstanceLifecycle"] == "spot"
    assert machines[0]["spot"] is True
    assert machines[0]["price_per_hour"] == pytest.approx(0.00001)  # moto's spot price for the zone


def test_several_nodes_share_a_placement_group_and_a_self_rule(provider, session, fake, tmp_path):
    record, machines, _ = launch(provider, make_spec(tmp_path, nodes=3))
    assert [m["rank"] for m in machines] == [0, 1, 2]
    assert len({m["zone"] for m in machines}) == 1
    assert len({m["instance_id"] for m in machines}) == 3
    group = fake.placement_groups["gpurun-exp-abc123"]
    assert group["Strategy"] == "cluster" and {"Key": "gpurun:managed", "Value": "true"} in group["Tags"]
    assert fake.bodies["RunInstances"][-1]["Placement.GroupName"] == "gpurun-exp-abc123"
    assert fake.bodies["RunInstances"][-1]["MinCount"] == fake.bodies["RunInstances"][-1]["MaxCount"] == 3
    assert fake.calls.count("RunInstances") == 1
    [group] = session.client("ec2").describe_security_groups(GroupIds=[record["resources"]["security_group"]])[
        "SecurityGroups"
    ]
    rules = {rule["IpProtocol"]: rule for rule in group["IpPermissions"]}
    assert [pair["GroupId"] for pair in rules["-1"]["UserIdGroupPairs"]] == [group["GroupId"]]
    assert [r["CidrIp"] for r in rules["tcp"]["IpRanges"]] == [CIDR]
    removed = provider.release(record, Saves(), [].append)
    assert "placement group gpurun-exp-abc123" in removed
    assert leftovers(session, fake) == []


def test_no_placement_group_for_types_without_cluster_support(provider, fake, tmp_path):
    launch(provider, make_spec(tmp_path, nodes=2, instance_type=["t3.micro"], store=None))
    assert fake.placement_groups == {}
    assert "CreatePlacementGroup" not in fake.calls
    assert "CreateRole" not in fake.calls  # no S3 store: no role, no profile


def test_users_own_instance_profile_is_used_not_created(provider, session, fake, tmp_path):
    session.client("iam").create_instance_profile(InstanceProfileName="mine")
    record, machines, _ = launch(provider, make_spec(tmp_path, iam_instance_profile="mine"))
    assert "CreateRole" not in fake.calls
    assert fake.bodies["RunInstances"][-1]["IamInstanceProfile.Name"] == "mine"
    provider.release(record, Saves(), [].append)
    assert [p["InstanceProfileName"] for p in session.client("iam").list_instance_profiles()["InstanceProfiles"]] == [
        "mine"
    ]


def test_login_user_and_port_come_from_the_ssh_section(provider, session, tmp_path):
    data = {
        "name": "exp",
        "provider": "aws",
        "run": "python train.py",
        "ssh": {"user": "root", "port": 2222},
        "aws": {"ami": AMI, "ssh_cidr": CIDR, "instance_type": ["g5.xlarge"]},
    }
    spec = validate_spec(data, source="experiment.yaml", spec_dir=tmp_path)
    record, machines, _ = launch(provider, spec)
    assert (machines[0]["user"], machines[0]["port"]) == ("root", 2222)
    assert machines[0]["run_dir"] == "/root/gpurun/exp-abc123"
    [group] = session.client("ec2").describe_security_groups(GroupIds=[record["resources"]["security_group"]])[
        "SecurityGroups"
    ]
    assert (group["IpPermissions"][0]["FromPort"], group["IpPermissions"][0]["ToPort"]) == (2222, 2222)


def test_host_keys_are_pinned_from_the_console_output(provider, fake, tmp_path):
    fake.console_output = (
        "-----BEGIN SSH HOST KEY KEYS-----\n"
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHOSTKEY root@ip\n"
        "-----END SSH HOST KEY KEYS-----\n"
    )
    said: list[str] = []
    _, machines, _ = launch(provider, make_spec(tmp_path), said=said)
    assert machines[0]["host_keys"] == ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHOSTKEY"]
    assert not any("trusting the first key" in line for line in said)


def test_host_keys_printed_late_are_waited_for(provider, fake, tmp_path):
    keys = "-----BEGIN SSH HOST KEY KEYS-----\nssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHOSTKEY root@ip\n-----END SSH HOST KEY KEYS-----\n"
    reads = {"count": 0}

    def late(model, params, **_):
        if model.name == "GetConsoleOutput":
            reads["count"] += 1
            fake.console_output = keys if reads["count"] >= 3 else "Booting...\n"
        return None

    provider.event_handlers.insert(0, ("before-call", late))
    provider.host_key_timeout = 60.0
    said: list[str] = []
    _, machines, _ = launch(provider, make_spec(tmp_path), said=said)
    assert machines[0]["host_keys"] == ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHOSTKEY"]
    assert reads["count"] == 3
    assert any("to print their host keys" in line for line in said)


def test_without_console_keys_trust_on_first_use_is_announced(provider, tmp_path):
    said: list[str] = []
    _, machines, _ = launch(provider, make_spec(tmp_path), said=said)
    assert machines[0]["host_keys"] is None
    assert machines[0]["known_hosts"] == str(key_dir() / "known_hosts")
    assert any("trusting the first key seen" in line for line in said)


def test_open_rule_is_allowed_only_when_written_and_warned(provider, session, tmp_path):
    said: list[str] = []
    record, _, _ = launch(provider, make_spec(tmp_path, ssh_cidr="0.0.0.0/0"), said=said)
    assert any("open to the whole internet" in line for line in said)
    [group] = session.client("ec2").describe_security_groups(GroupIds=[record["resources"]["security_group"]])[
        "SecurityGroups"
    ]
    assert group["IpPermissions"][0]["IpRanges"][0]["CidrIp"] == "0.0.0.0/0"


# -- ssh_cidr: auto ---------------------------------------------------------------------------------


def test_auto_cidr_is_the_callers_address(provider, session, ip_echo, tmp_path):
    spec = make_spec(tmp_path, ssh_cidr="auto")
    assert (
        "TCP 22 from 198.51.100.23/32 only (your public IP)" in dict(provider.plan(spec, "exp-abc123"))["security rule"]
    )
    record, _, _ = launch(provider, spec)
    [group] = session.client("ec2").describe_security_groups(GroupIds=[record["resources"]["security_group"]])[
        "SecurityGroups"
    ]
    assert group["IpPermissions"][0]["IpRanges"][0]["CidrIp"] == "198.51.100.23/32"


def test_auto_cidr_failure_names_the_flag(provider, session, fake, tmp_path):
    with pytest.raises(BadInput, match=r"--set aws.ssh_cidr=<your-ip>/32") as caught:
        launch(provider, make_spec(tmp_path, ssh_cidr="auto"))
    assert caught.value.exit_code == 2
    assert leftovers(session, fake) == []


# -- failover -------------------------------------------------------------------------------------


def _zone_of(session: boto3.Session):
    subnets = {s["SubnetId"]: s["AvailabilityZone"] for s in session.client("ec2").describe_subnets()["Subnets"]}
    return lambda body: subnets[body["SubnetId"]]


def test_failover_moves_to_the_next_zone_then_the_next_type(provider, session, fake, tmp_path):
    zone_of = _zone_of(session)

    def rule(body):
        if body["InstanceType"] == "g5.xlarge":
            return ("InsufficientInstanceCapacity", "We currently do not have sufficient g5.xlarge capacity")
        if zone_of(body) == "us-east-1a":
            return ("Unsupported", "not supported in us-east-1a")
        return None

    fake.run_instances_rule = rule
    said: list[str] = []
    record, machines, _ = launch(provider, make_spec(tmp_path, instance_type=["g5.xlarge", "g6.xlarge"]), said=said)
    assert machines[0]["instance_type"] == "g6.xlarge"
    assert machines[0]["zone"] == "us-east-1b"
    attempts = [(body["InstanceType"], zone_of(body)) for body in fake.bodies["RunInstances"]]
    g5_zones = [zone for kind, zone in attempts if kind == "g5.xlarge"]
    assert len(g5_zones) >= 2 and g5_zones == sorted(g5_zones)
    assert attempts[len(g5_zones) :] == [("g6.xlarge", "us-east-1a"), ("g6.xlarge", "us-east-1b")]
    assert any("InsufficientInstanceCapacity; trying the next option" in line for line in said)
    tokens = [body["ClientToken"] for body in fake.bodies["RunInstances"]]
    assert len(set(tokens)) == len(tokens)


def test_no_capacity_anywhere_is_exit_3_with_a_table(provider, session, fake, tmp_path):
    fake.run_instances_rule = lambda body: ("InsufficientInstanceCapacity", "no capacity")
    with pytest.raises(NoCapacity) as caught:
        launch(provider, make_spec(tmp_path, instance_type=["g5.xlarge", "g6.xlarge"]))
    assert caught.value.exit_code == 3
    message = text(caught.value)
    lines = message.splitlines()
    assert "everything it created was removed" in lines[0]
    assert lines[1].split()[:3] == ["type", "zone", "error"]
    tried = fake.calls.count("RunInstances")
    assert sum("InsufficientInstanceCapacity" in line for line in lines) == tried
    assert any(line.startswith("g6.xlarge") for line in lines)
    assert "removed:" in message
    assert leftovers(session, fake) == []
    assert not key_dir().exists()


@pytest.mark.parametrize("code", ["VcpuLimitExceeded", "InstanceLimitExceeded"])
def test_quota_errors_stop_with_the_quota_name(provider, session, fake, tmp_path, code):
    fake.run_instances_rule = lambda body: (code, "You have requested more vCPU capacity than your current vCPU limit")
    with pytest.raises(GpurunError) as caught:
        launch(provider, make_spec(tmp_path, instance_type=["g5.xlarge", "g6.xlarge"], nodes=2))
    assert caught.value.exit_code == 1
    assert "Running On-Demand G and VT instances" in str(caught.value)
    assert "8 vCPUs" in str(caught.value) and "L-DB2E81BA" in str(caught.value)
    assert fake.calls.count("RunInstances") == 1
    assert leftovers(session, fake) == []


def test_a_fresh_instance_profile_is_waited_for(provider, fake, tmp_path):
    fake.fail_once["RunInstances"] = (
        "InvalidParameterValue",
        "Value (gpurun-exp-abc123) for parameter iamInstanceProfile.name is invalid. Invalid IAM Instance Profile name",
    )
    said: list[str] = []
    _, machines, _ = launch(provider, make_spec(tmp_path), said=said)
    assert len(machines) == 1
    assert fake.calls.count("RunInstances") == 2
    assert any("instance profile to reach EC2" in line for line in said)


# -- rollback: every mutating call fails in turn -----------------------------------------------------


def test_the_fault_matrix_covers_every_mutating_call(provider, fake, tmp_path):
    launch(provider, make_spec(tmp_path, nodes=2))
    assert fake.mutating_calls() == MUTATING_STEPS


@pytest.mark.parametrize("step", MUTATING_STEPS)
def test_a_failing_step_removes_everything(provider, session, fake, tmp_path, step):
    fake.fail_once[step] = ("InternalError", "injected failure")
    said: list[str] = []
    record = new_record()
    saves = Saves()
    with pytest.raises(GpurunError) as caught:
        acquire(provider, make_spec(tmp_path, nodes=2), record, saves, said)
    message = text(caught.value)
    assert f"({step})" in message and "InternalError: injected failure" in message
    assert caught.value.exit_code == 1
    if step != "ImportKeyPair":
        assert "removed:" in message and "key pair gpurun-exp-abc123" in message
    assert leftovers(session, fake) == []
    assert not key_dir().exists()
    assert record["resources"] == {}
    assert saves.records[-1]["resources"] == {}
    assert any(line.startswith("launch failed: removing what exp-abc123 created") for line in said)


def test_failure_while_waiting_for_running_removes_the_instances(provider, session, fake, tmp_path):
    fake.fail_once["DescribeInstances"] = ("InternalError", "injected failure")
    with pytest.raises(GpurunError, match=r"\(DescribeInstances\)"):
        launch(provider, make_spec(tmp_path))
    assert leftovers(session, fake) == []


def test_ssh_that_never_answers_rolls_back(provider, session, fake, tmp_path):
    def silent(machines, cidr, say):
        raise GpurunError(
            f"{machines[0]['instance_id']} is running but SSH did not answer: check ssh_cidr (now {cidr})"
        )

    provider.wait_ssh = silent
    with pytest.raises(GpurunError, match=rf"check ssh_cidr \(now {CIDR}\)") as caught:
        launch(provider, make_spec(tmp_path))
    assert "removed: instance i-" in text(caught.value)
    assert leftovers(session, fake) == []


@pytest.mark.parametrize(
    "where, step",
    [
        ("before", "CreateSecurityGroup"),
        ("before", "CreateInstanceProfile"),
        ("after", "RunInstances"),  # instances exist but the answer never arrived: found by tag
        ("before", "DescribeInstances"),
    ],
)
def test_ctrl_c_at_any_step_removes_everything(provider, session, fake, tmp_path, where, step):
    (fake.interrupt_before if where == "before" else fake.interrupt_after).add(step)
    with pytest.raises(Interrupted) as caught:
        launch(provider, make_spec(tmp_path, nodes=2))
    assert caught.value.exit_code == 130
    assert "interrupted while" in str(caught.value)
    assert leftovers(session, fake) == []
    assert not key_dir().exists()


def test_ctrl_c_while_waiting_for_ssh(provider, session, fake, tmp_path):
    def interrupted(machines, cidr, say):
        raise KeyboardInterrupt

    provider.wait_ssh = interrupted
    with pytest.raises(
        Interrupted, match="interrupted while waiting for SSH; everything it created was removed"
    ) as caught:
        launch(provider, make_spec(tmp_path))
    assert "removed: instance" in text(caught.value)
    assert leftovers(session, fake) == []


# -- bad input: exit 2, nothing created -------------------------------------------------------------


@pytest.mark.parametrize(
    "aws_fields, message",
    [
        ({"ami": "ami-0123456789abcdef0"}, r"aws.ami: ami-0123456789abcdef0 does not exist"),
        ({"ami": "ssm:/no/such/parameter"}, r"aws.ami: SSM parameter /no/such/parameter not found"),
        ({"ami": "name:no-such-image-*@099720109477"}, r"aws.ami: no available image named 'no-such-image-\*'"),
        ({"instance_type": ["g5.xlarge", "g9z.huge"]}, r"aws.instance_type: g9z.huge does not exist in us-east-1"),
        ({"region": "xx-nowhere-1"}, r"aws.region: 'xx-nowhere-1' is not an AWS region"),
        ({"region": "us-est-1"}, r"is not an AWS region \(did you mean 'us-\w+-1'\?\)"),
        ({"disk_gb": 10}, r"aws.disk_gb: 10 GB is smaller than the root snapshot of ami-1e749f67 \(15 GB\)"),
        ({"instance_type": ["g5g.xlarge"]}, r"aws.ami: ami-1e749f67 .* is x86_64 but the instance type needs arm64"),
        ({"ami": "dlami-pytorch", "instance_type": ["g5g.xlarge"]}, r"no dlami-pytorch Deep Learning AMI for arm64"),
        ({"subnet_id": "subnet-0123456789abcdef0"}, r"aws.subnet_id: subnet-0123456789abcdef0 does not exist"),
        ({"vpc_id": "vpc-0123456789abcdef0"}, r"aws.vpc_id: vpc-0123456789abcdef0 does not exist"),
        ({"profile": "nobody"}, r"aws.profile: profile 'nobody' is not in your AWS config"),
    ],
)
def test_bad_input_is_exit_2_and_creates_nothing(provider, session, fake, tmp_path, aws_fields, message):
    spec = make_spec(tmp_path, **aws_fields)
    with pytest.raises(BadInput, match=message) as caught:
        provider.plan(spec, "exp-abc123")
    assert caught.value.exit_code == 2
    assert "\n" not in str(caught.value)
    with pytest.raises(BadInput, match=message):
        launch(provider, spec)
    assert leftovers(session, fake) == []
    assert not key_dir().exists()
    assert not fake.mutating_calls()


@pytest.mark.parametrize(
    "aws_fields, field",
    [({"nodes": 0}, "aws.nodes"), ({"max_price": -0.5}, "aws.max_price"), ({"ssh_cidr": "my-laptop"}, "aws.ssh_cidr")],
)
def test_bad_spec_values_stop_before_aws(session, fake, tmp_path, aws_fields, field):
    with pytest.raises(BadInput, match=rf"experiment.yaml: {field}:") as caught:
        make_spec(tmp_path, **aws_fields)
    assert caught.value.exit_code == 2
    assert leftovers(session, fake) == []


def test_ssm_parameter_and_name_pattern_resolve(provider, session, tmp_path):
    session.client("ssm").put_parameter(Name="/team/ami", Value=OTHER_AMI, Type="String")
    assert OTHER_AMI in dict(provider.plan(make_spec(tmp_path, ami="ssm:/team/ami"), "r"))["AMI"]
    rows = dict(provider.plan(make_spec(tmp_path, ami="name:ubuntu/images/hvm-ssd/*@099720109477"), "r"))
    assert "newest of 2" in rows["AMI"]


def test_deprecated_ami_is_refused(provider, session, fake, tmp_path):
    fake.deprecate.add(AMI)
    with pytest.raises(BadInput, match=r"is deprecated since 2020-01-01"):
        provider.plan(make_spec(tmp_path), "exp-abc123")
    assert leftovers(session, fake) == []


def test_missing_credentials_name_the_profile_and_the_fix(provider, monkeypatch, tmp_path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(BadInput, match=r"no AWS credentials found for .*aws configure") as caught:
        provider.plan(make_spec(tmp_path), "exp-abc123")
    assert caught.value.exit_code == 2


def test_expired_credentials_say_how_to_log_in(provider, fake, gpurun_home, tmp_path):
    (gpurun_home / "aws-config").write_text("[profile research]\nregion = us-east-1\n")
    (gpurun_home / "aws-credentials").write_text("[research]\naws_access_key_id = a\naws_secret_access_key = b\n")
    fake.fail_once["GetCallerIdentity"] = ("ExpiredToken", "The security token included in the request is expired")
    with pytest.raises(BadInput, match=r"profile 'research' are expired .*aws sso login --profile research"):
        provider.plan(make_spec(tmp_path, profile="research"), "exp-abc123")
    assert fake.calls == ["GetCallerIdentity"]


# -- teardown ---------------------------------------------------------------------------------------


def test_teardown_removes_everything_and_is_idempotent(provider, session, fake, tmp_path):
    record, machines, _ = launch(provider, make_spec(tmp_path, nodes=2))
    saves = Saves()
    group_id = record["resources"]["security_group"]
    removed = provider.release(record, saves, [].append)
    assert sorted(removed) == sorted(
        [f"instance {m['instance_id']}" for m in machines]
        + [
            "placement group gpurun-exp-abc123",
            "instance profile gpurun-exp-abc123",
            "role gpurun-exp-abc123",
            f"security group {group_id} (gpurun-exp-abc123)",
            "key pair gpurun-exp-abc123",
            f"key files {key_dir()}",
        ]
    )
    assert leftovers(session, fake) == []
    assert record["resources"] == {} and saves.records[-1]["resources"] == {}
    assert {m["state"] for m in record["machines"]} == {"terminated"}
    assert provider.release(record, Saves(), [].append) == []


def test_teardown_from_another_machine_finds_resources_by_tag(provider, session, fake, tmp_path):
    record, _, _ = launch(provider, make_spec(tmp_path))
    bare = {"run": record["run"], "provider": "aws", "spec": {"aws": {"region": "us-east-1"}}}
    fresh = make_provider(fake)
    removed = fresh.release(bare, Saves(), [].append)
    assert any(entry.startswith("instance i-") for entry in removed)
    assert leftovers(session, fake) == []


def test_one_node_teardown_does_not_look_for_a_placement_group(provider, fake, tmp_path):
    record, _, _ = launch(provider, make_spec(tmp_path))
    provider.release(record, Saves(), [].append)
    assert "DescribePlacementGroups" not in fake.calls


def test_placement_group_listing_failure_is_only_a_warning_when_none_was_made(provider, session, fake, tmp_path):
    record, _, _ = launch(provider, make_spec(tmp_path))
    fake.fail_once["DescribePlacementGroups"] = ("InternalError", "not available")
    said: list[str] = []
    removed = make_provider(fake).release({"run": record["run"], "provider": "aws"}, Saves(), said.append)
    assert any(entry.startswith("instance ") for entry in removed)
    assert any("placement group costs nothing" in line for line in said)
    assert leftovers(session, fake) == []


def test_teardown_never_touches_untagged_or_other_runs(provider, session, fake, tmp_path):
    ec2 = session.client("ec2")
    record, _, _ = launch(provider, make_spec(tmp_path))
    other, _, _ = launch(provider, make_spec(tmp_path), run="exp-zzz999")
    # Same run tag but no gpurun:managed: not ours to touch.
    lookalike = ec2.create_security_group(
        GroupName="lookalike",
        Description="x",
        TagSpecifications=[{"ResourceType": "security-group", "Tags": [{"Key": "gpurun:run", "Value": record["run"]}]}],
    )["GroupId"]
    stray = ec2.run_instances(
        ImageId=AMI,
        InstanceType="t3.micro",
        MinCount=1,
        MaxCount=1,
        TagSpecifications=[
            {
                "ResourceType": "instance",
                "Tags": [{"Key": "gpurun:run", "Value": record["run"]}, {"Key": "gpurun:managed", "Value": "false"}],
            }
        ],
    )["Instances"][0]["InstanceId"]
    provider.release(record, Saves(), [].append)
    assert ec2.describe_security_groups(GroupIds=[lookalike])["SecurityGroups"]
    state = ec2.describe_instances(InstanceIds=[stray])["Reservations"][0]["Instances"][0]["State"]["Name"]
    assert state == "running"
    left = leftovers(session, fake)
    assert f"instance {other['machines'][0]['instance_id']}" in left
    assert "key gpurun-exp-zzz999" in left and "role gpurun-exp-zzz999" in left


def test_security_group_deletion_waits_out_dependency_violation(provider, session, fake, tmp_path):
    record, _, _ = launch(provider, make_spec(tmp_path))
    remaining = {"count": 2}

    def busy(model, params, **_):
        if model.name == "DeleteSecurityGroup" and remaining["count"]:
            remaining["count"] -= 1
            return _error("DependencyViolation", "resource sg has a dependent object")
        return None

    fresh = make_provider(fake)
    fresh.event_handlers.insert(0, ("before-call", busy))
    fresh.teardown_timing = Timing(
        poll_interval=0.0, terminate_timeout=5.0, dependency_timeout=5.0, sleep=lambda s: None
    )
    fresh.release(record, Saves(), [].append)
    assert remaining["count"] == 0
    assert leftovers(session, fake) == []


def test_teardown_that_cannot_finish_says_so(provider, session, fake, tmp_path):
    record, _, _ = launch(provider, make_spec(tmp_path))

    def always_busy(model, params, **_):
        if model.name == "DeleteSecurityGroup":
            return _error("DependencyViolation", "still in use")
        return None

    fresh = make_provider(fake)
    fresh.event_handlers.insert(0, ("before-call", always_busy))
    saves = Saves()
    with pytest.raises(GpurunError, match=r"could not remove everything: security group sg-.*teardown exp-abc123"):
        fresh.release(record, saves, [].append)
    assert list(saves.records[-1]["resources"]) == ["security_group"]
    assert provider.release(record, Saves(), [].append)  # a second teardown finishes the job
    assert leftovers(session, fake) == []


def test_orphans_are_listed_and_removed(provider, session, fake, tmp_path):
    known, _, _ = launch(provider, make_spec(tmp_path))
    lost, lost_machines, _ = launch(provider, make_spec(tmp_path, nodes=2), run="exp-lost01")
    orphans = provider.find_orphans({known["run"]}, regions=["us-east-1"])
    kinds = sorted((o["kind"], o["run"]) for o in orphans)
    assert kinds == sorted(
        [("instance", "exp-lost01")] * 2
        + [
            ("security_group", "exp-lost01"),
            ("key_pair", "exp-lost01"),
            ("placement_group", "exp-lost01"),
            ("role", "exp-lost01"),
            ("instance_profile", "exp-lost01"),
        ]
    )
    assert all(o["owner"] == "user/moto" for o in orphans)
    removed = provider.remove_orphans(orphans, [].append)
    assert f"instance {lost_machines[0]['instance_id']}" in removed
    assert provider.find_orphans({known["run"]}, regions=["us-east-1"]) == []
    left = leftovers(session, fake)
    assert f"instance {known['machines'][0]['instance_id']}" in left and "key gpurun-exp-abc123" in left
    assert not any("lost01" in entry for entry in left)


# -- status -----------------------------------------------------------------------------------------


def test_refresh_shows_state_cost_and_vanished_instances(provider, session, fake, tmp_path):
    record, machines, _ = launch(provider, make_spec(tmp_path))
    other, _, _ = launch(provider, make_spec(tmp_path), run="exp-other1")
    fake.launch_shift = timedelta(hours=2)
    calls_before = fake.calls.count("DescribeInstances")
    provider.refresh([record, other, {"run": "local-1", "provider": "local", "machines": [{"rank": 0}]}])
    assert fake.calls.count("DescribeInstances") == calls_before + 1  # one batched call for both runs
    assert record["machines"][0]["state"] == "running"
    assert record["cost_usd"] == pytest.approx(2 * 1.006, rel=0.01)

    session.client("ec2").terminate_instances(InstanceIds=[machines[0]["instance_id"]])
    provider.refresh([record])
    assert record["machines"][0]["state"] == "terminated"
    assert record["machines"][0]["ended_at"]
    assert record["cost_usd"] is not None

    record["machines"][0]["instance_id"] = "i-0123456789abcdef0"  # vanished: AWS no longer knows it
    provider.refresh([record])
    assert record["machines"][0]["state"] == "gone"
    assert "refresh_error" not in record


def test_refresh_without_credentials_is_not_an_error(provider, monkeypatch, tmp_path):
    record, _, _ = launch(provider, make_spec(tmp_path))
    record["aws"]["profile"] = "nobody"
    provider.refresh([record])
    assert "AWS state unknown" in record["refresh_error"]
    assert record["machines"][0]["state"] == "running"


# -- the machine: connect, agent, SSH wait --------------------------------------------------------------


def test_connect_builds_an_ssh_transport_with_the_run_key(provider, tmp_path):
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from gpurun.app.connections import open_transport
    from gpurun.providers.aws.connect import AWS_CONNECT_RETRY_FOR

    record, machines, _ = launch(provider, make_spec(tmp_path))
    machine = machines[0]
    transport = open_transport(record, machine)  # nothing is dialled until the first command
    assert (transport.host, transport.port, transport.user) == (machine["host"], 22, "ubuntu")
    assert transport.key_filenames == [machine["key_path"]]
    assert transport.known_hosts_file == str(key_dir() / "known_hosts")
    assert transport.pinned_keys == [] and transport.trust_on_first_use is True
    assert transport.label == f"ubuntu@{machine['host']}:22"
    assert transport.connect_retry_for == AWS_CONNECT_RETRY_FOR == 120.0  # sshd may answer before the key is in

    public = Ed25519PrivateKey.generate().public_key()
    line = public.public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    machine["host_keys"] = [line]
    pinned = open_transport(record, machine)
    assert pinned.pinned_keys == [line] and pinned.trust_on_first_use is False
    assert provider.machine_env(record, machine) == {"AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1"}


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_ssh_wait_gives_up_with_an_actionable_message():
    provider = AwsProvider()
    provider.ssh_timeout = 0.3
    provider.ssh_poll_interval = 0.05
    machines = [{"instance_id": "i-0abc", "host": "127.0.0.1", "port": _closed_port()}]
    with pytest.raises(GpurunError) as caught:
        provider.wait_ssh(machines, CIDR, [].append)
    assert str(caught.value) == (
        f"i-0abc is running but SSH at 127.0.0.1:{machines[0]['port']} did not answer in 0s: check ssh_cidr (now {CIDR})"
    )


def test_ssh_wait_returns_once_a_banner_arrives():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(4)

    def serve():
        for _ in range(2):
            try:
                connection, _ = server.accept()
            except OSError:
                return
            connection.sendall(b"SSH-2.0-OpenSSH_9.6\r\n")
            connection.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    provider = AwsProvider()
    provider.ssh_timeout = 5
    machines = [{"instance_id": f"i-{n}", "host": "127.0.0.1", "port": server.getsockname()[1]} for n in range(2)]
    said: list[str] = []
    provider.wait_ssh(machines, CIDR, said.append)
    server.close()
    assert said == ["waiting for SSH on 2 machine(s) (at most 5s)"]


def test_timestamps_are_utc_iso(provider, tmp_path):
    _, machines, _ = launch(provider, make_spec(tmp_path))
    launched = datetime.fromisoformat(machines[0]["launch_time"])
    assert launched.tzinfo is not None
    assert abs(datetime.now(timezone.utc) - launched) < timedelta(minutes=5)


def test_without_trust_on_first_use_keys_that_never_reach_the_console_fail_the_launch(
    provider, session, fake, tmp_path
):
    spec = make_spec(tmp_path)
    spec.ssh.trust_on_first_use = False
    with pytest.raises(GpurunError, match="did not appear in the console output") as raised:
        launch(provider, spec)
    assert "trust_on_first_use is false" in str(raised.value)
    assert leftovers(session, fake) == [], "the launch rolled back everything it made"


@pytest.mark.parametrize("trust", [True, False])
def test_a_recovering_runs_machine_trusts_a_first_key_only_as_the_spec_allows(provider, tmp_path, trust):
    """Its keys are never pinned (nothing reads a group machine's console): `ssh.trust_on_first_use: false`
    must still mean an unknown host key is refused, for `gpurun ssh` and for gpurun's own connections."""
    from gpurun.app import remote_access
    from gpurun.providers.aws.connect import connect_info

    spec = make_spec(tmp_path, recovery={"max_restarts": 1})
    spec.ssh.trust_on_first_use = trust
    record = new_record()
    record["bootstrap"] = {"run": record["run"]}
    [machine] = acquire(provider, spec, record, Saves(), [])
    record["machines"] = [machine]
    assert connect_info(record, machine).trust_on_first_use is trust
    expected = "StrictHostKeyChecking=accept-new" if trust else "StrictHostKeyChecking=yes"
    assert expected in remote_access.ssh_argv(record)
