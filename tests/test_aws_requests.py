"""The pure AWS request builders: no boto3, no AWS, just the dicts gpurun would send."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pytest

from gpurun.providers.aws import requests as rq

RUN = "sine-lstm-ab12cd"


def _kwargs(**overrides):
    base = dict(
        run=RUN,
        owner="user/alice",
        ami_id="ami-0123456789abcdef0",
        root_device="/dev/sda1",
        instance_type="g5.xlarge",
        nodes=1,
        disk_gb=100,
        key_name=f"gpurun-{RUN}",
        security_group_id="sg-1234",
        subnet_id="subnet-1",
        user_data="#!/bin/bash\n",
    )
    base.update(overrides)
    return rq.run_instances_kwargs(**base)


def test_tags_name_the_run_owner_and_managed():
    tags = rq.tag_dict(rq.tags(RUN, "assumed-role/Admin/alice@example.com"))
    assert tags == {
        "gpurun:run": RUN,
        "gpurun:managed": "true",
        "gpurun:owner": "assumed-role/Admin/alice@example.com",
        "Name": f"gpurun-{RUN}",
    }
    # Characters tags do not allow are replaced, never sent.
    assert rq.tag_dict(rq.tags(RUN, "user/a,b*c"))["gpurun:owner"] == "user/a_b_c"
    assert rq.tag_dict(rq.tags(RUN, ""))["gpurun:owner"] == "unknown"


def test_is_managed_needs_the_managed_tag_and_the_run():
    tags = rq.tags(RUN, "me")
    assert rq.is_managed(tags)
    assert rq.is_managed(tags, RUN)
    assert not rq.is_managed(tags, "other-run")
    assert not rq.is_managed([{"Key": "gpurun:run", "Value": RUN}], RUN)
    assert not rq.is_managed([{"Key": "gpurun:managed", "Value": "false"}, {"Key": "gpurun:run", "Value": RUN}])
    assert not rq.is_managed(None)


def test_run_instances_defaults_are_safe():
    kwargs = _kwargs()
    assert kwargs["MinCount"] == kwargs["MaxCount"] == 1
    assert kwargs["MetadataOptions"]["HttpTokens"] == "required"
    assert kwargs["InstanceInitiatedShutdownBehavior"] == "terminate"
    assert kwargs["BlockDeviceMappings"] == [
        {
            "DeviceName": "/dev/sda1",
            "Ebs": {"VolumeSize": 100, "VolumeType": "gp3", "Encrypted": True, "DeleteOnTermination": True},
        }
    ]
    kinds = {spec["ResourceType"]: rq.tag_dict(spec["Tags"]) for spec in kwargs["TagSpecifications"]}
    assert {"instance", "volume"} <= set(kinds)
    assert all(tags["gpurun:managed"] == "true" and tags["gpurun:run"] == RUN for tags in kinds.values())
    assert kwargs["SecurityGroupIds"] == ["sg-1234"]
    assert kwargs["SubnetId"] == "subnet-1"
    assert kwargs["KeyName"] == f"gpurun-{RUN}"
    assert "InstanceMarketOptions" not in kwargs
    assert "IamInstanceProfile" not in kwargs
    assert "Placement" not in kwargs
    assert len(kwargs["ClientToken"]) <= 64


def test_run_instances_spot_profile_placement_and_nodes():
    kwargs = _kwargs(
        nodes=4, spot=True, max_price=0.5, instance_profile="gpurun-x", placement_group="gpurun-x", disk_gb=250
    )
    assert kwargs["MinCount"] == kwargs["MaxCount"] == 4
    assert kwargs["InstanceMarketOptions"] == {
        "MarketType": "spot",
        "SpotOptions": {"SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate", "MaxPrice": "0.5"},
    }
    assert kwargs["IamInstanceProfile"] == {"Name": "gpurun-x"}
    assert kwargs["Placement"] == {"GroupName": "gpurun-x"}
    assert kwargs["BlockDeviceMappings"][0]["Ebs"]["VolumeSize"] == 250
    assert "spot-instances-request" in {spec["ResourceType"] for spec in kwargs["TagSpecifications"]}


def test_spot_without_max_price_pays_at_most_on_demand():
    options = rq.market_options(True, None)
    assert "MaxPrice" not in options["SpotOptions"]
    assert rq.market_options(False, 3.0) is None


def test_subnet_without_public_addresses_gets_one_through_the_interface():
    kwargs = _kwargs(associate_public_ip=True)
    assert "SecurityGroupIds" not in kwargs and "SubnetId" not in kwargs
    assert kwargs["NetworkInterfaces"] == [
        {
            "DeviceIndex": 0,
            "AssociatePublicIpAddress": True,
            "DeleteOnTermination": True,
            "Groups": ["sg-1234"],
            "SubnetId": "subnet-1",
        }
    ]


def test_client_token_is_stable_per_attempt():
    assert rq.client_token(RUN, 0) == rq.client_token(RUN, 0)
    assert rq.client_token(RUN, 0) != rq.client_token(RUN, 1)
    assert rq.client_token(RUN, 0, "launch-a") != rq.client_token(RUN, 0, "launch-b")
    assert rq.client_token("x" * 60, 3).startswith("gpurun-")
    assert len(rq.client_token("x" * 60, 3)) <= 64


def test_ingress_is_ssh_from_one_address_only():
    assert rq.ingress_permissions("203.0.113.7/32") == [
        {
            "IpProtocol": "tcp",
            "FromPort": 22,
            "ToPort": 22,
            "IpRanges": [{"CidrIp": "203.0.113.7/32", "Description": "gpurun ssh"}],
        }
    ]
    # One node: no self rule even when the group is known.
    assert len(rq.ingress_permissions("203.0.113.7/32", group_id="sg-1", nodes=1)) == 1


def test_ingress_for_ipv6_and_for_several_nodes():
    rules = rq.ingress_permissions("2001:db8::1/128", port=2222, group_id="sg-1", nodes=3)
    assert rules[0]["Ipv6Ranges"] == [{"CidrIpv6": "2001:db8::1/128", "Description": "gpurun ssh"}]
    assert rules[0]["FromPort"] == rules[0]["ToPort"] == 2222
    assert rules[1] == {
        "IpProtocol": "-1",
        "UserIdGroupPairs": [{"GroupId": "sg-1", "Description": "gpurun nodes of one run"}],
    }
    assert "between the run's own nodes" in rq.describe_rule("1.2.3.4/32", nodes=3)


def test_open_to_world_is_recognised():
    assert rq.is_open_to_world("0.0.0.0/0")
    assert rq.is_open_to_world("::/0")
    assert not rq.is_open_to_world("10.0.0.0/8")


def test_filters_find_managed_resources_of_a_run():
    assert rq.run_filters(RUN) == [
        {"Name": "tag:gpurun:managed", "Values": ["true"]},
        {"Name": "tag:gpurun:run", "Values": [RUN]},
    ]
    assert rq.run_filters() == [{"Name": "tag:gpurun:managed", "Values": ["true"]}]
    states = rq.instance_filters(RUN)[-1]
    assert states["Name"] == "instance-state-name" and "terminated" not in states["Values"]


def test_role_policy_is_scoped_to_the_run():
    policy = rq.role_policy("ckpt-bucket", "team/exp", "exp-abc123")
    objects, listing = policy["Statement"]
    assert objects["Action"] == ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"]
    assert objects["Resource"] == "arn:aws:s3:::ckpt-bucket/team/exp/exp-abc123/*"
    assert listing["Action"] == "s3:ListBucket"
    assert listing["Resource"] == "arn:aws:s3:::ckpt-bucket"
    assert listing["Condition"] == {"StringLike": {"s3:prefix": ["team/exp/exp-abc123/*"]}}
    text = rq.policy_json(policy)
    assert '"*"' not in text and "s3:*" not in text and "team/exp/*" not in text
    assert json.loads(text) == policy


def test_role_policy_reads_the_resumed_run_and_nothing_else():
    policy = rq.role_policy("b", "p", "exp-new111", read_from=("old-bucket", "q", "exp-old222"))
    _own, _own_list, source, source_list = policy["Statement"]
    assert source["Action"] == ["s3:GetObject"]
    assert source["Resource"] == "arn:aws:s3:::old-bucket/q/exp-old222/*"
    assert source_list["Resource"] == "arn:aws:s3:::old-bucket"
    assert source_list["Condition"] == {"StringLike": {"s3:prefix": ["q/exp-old222/*"]}}
    # Resuming from itself (the same key) adds nothing.
    assert len(rq.role_policy("b", "p", "exp-new111", read_from=("b", "p", "exp-new111"))["Statement"]) == 2


def test_role_policy_reads_exactly_the_named_secrets():
    parameter = rq.parameter_arn("/team/db", region="eu-west-1", account="123456789012")
    secret = rq.secret_arn("hf-token", region="eu-west-1", account="123456789012")
    assert parameter == "arn:aws:ssm:eu-west-1:123456789012:parameter/team/db"
    assert secret == "arn:aws:secretsmanager:eu-west-1:123456789012:secret:hf-token-??????"
    policy = rq.role_policy("b", "", "exp-abc123", parameter_arns=[parameter], secret_arns=[secret])
    statements = {statement["Sid"]: statement for statement in policy["Statement"]}
    assert statements["SecretParameters"]["Action"] == "ssm:GetParameter"
    assert statements["SecretParameters"]["Resource"] == [parameter]
    assert statements["Secrets"]["Action"] == "secretsmanager:GetSecretValue"
    assert statements["Secrets"]["Resource"] == [secret]


def test_role_policy_for_a_whole_bucket_and_other_partitions():
    policy = rq.role_policy("b", "", "exp-abc123", partition="aws-cn")
    assert policy["Statement"][0]["Resource"] == "arn:aws-cn:s3:::b/exp-abc123/*"
    assert policy["Statement"][1]["Condition"] == {"StringLike": {"s3:prefix": ["exp-abc123/*"]}}


def test_trust_policy_lets_only_ec2_assume_the_role():
    statement = rq.trust_policy()["Statement"][0]
    assert statement["Principal"] == {"Service": "ec2.amazonaws.com"}
    assert statement["Action"] == "sts:AssumeRole"


def test_parse_s3_url():
    assert rq.parse_s3_url("s3://bucket/a/b/") == ("bucket", "a/b")
    assert rq.parse_s3_url("s3://bucket") == ("bucket", "")
    with pytest.raises(ValueError):
        rq.parse_s3_url("file:///tmp")


def test_user_data_arms_the_max_runtime_guard():
    text = rq.user_data(run=RUN, max_runtime=12 * 3600, idle_timeout=None)
    assert text.startswith("#!/bin/bash\n")
    assert "RUNTIME=43200" in text
    assert '[ -s "$STATE/deadline" ] || echo $(($(date +%s) + RUNTIME)) > "$STATE/deadline"' in text
    assert 'systemd-run --unit=gpurun-max-runtime --on-active="${left}s" /bin/systemctl poweroff' in text
    assert "shutdown -h +$(((left + 59) / 60))" in text
    # Re-armed at every boot, from the first boot's deadline.
    assert 'ln -sf "$STATE/arm" /var/lib/cloud/scripts/per-boot/gpurun-guard' in text
    assert text.rstrip().endswith('"$STATE/arm"')
    assert "idle-guard" not in text


def test_user_data_rounds_short_runtimes_up_to_a_minute():
    assert "RUNTIME=90" in rq.user_data(run=RUN, max_runtime=89.5, idle_timeout=None)
    assert "RUNTIME=60" in rq.user_data(run=RUN, max_runtime=5, idle_timeout=None)


def test_user_data_idle_guard_watches_job_pids():
    text = rq.user_data(run=RUN, max_runtime=3600, idle_timeout=1800)
    assert "IDLE=1800" in text
    assert "/home/*/gpurun/*/job.pid" in text
    assert "systemctl poweroff" in text
    assert 'systemd-run --unit=gpurun-idle-guard "$STATE/idle-guard"' in text


def test_user_data_holds_no_credentials():
    text = rq.user_data(run=RUN, max_runtime=3600, idle_timeout=1800).lower()
    for word in ("aws_access_key_id", "aws_secret_access_key", "aws_session_token", "akia", "secret", "password"):
        assert word not in text


@pytest.mark.parametrize("idle", [None, 600])
def test_user_data_is_valid_bash(tmp_path, idle):
    text = rq.user_data(run=RUN, max_runtime=7200, idle_timeout=idle)
    scripts = {"user-data": text, "arm": rq.arm_script(idle=bool(idle)), "idle": rq.idle_guard_script(600)}
    for name, body in scripts.items():
        path = tmp_path / name
        path.write_text(body + "\n")
        result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, (name, result.stderr)


def _stub_bin(tmp_path, log, *, systemd_run_ok=True):
    """systemd-run, systemctl and shutdown that only write their arguments to `log`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("systemd-run", "systemctl", "shutdown"):
        status = 1 if name == "systemd-run" and not systemd_run_ok else 0
        (bin_dir / name).write_text(f'#!/bin/sh\necho "{name} $*" >> {log}\nexit {status}\n')
        (bin_dir / name).chmod(0o755)
    return f"{bin_dir}:/usr/bin:/bin"


def _run_arm(tmp_path, seconds_left, *, systemd_run_ok=True):
    state = tmp_path / "state"
    state.mkdir()
    (state / "deadline").write_text(str(int(time.time()) + seconds_left))
    log = tmp_path / "calls.log"
    arm = state / "arm"
    arm.write_text(rq.arm_script(idle=False).replace(f"STATE={rq.GUARD_STATE}", f"STATE={state}") + "\n")
    env = {"PATH": _stub_bin(tmp_path, log, systemd_run_ok=systemd_run_ok)}
    subprocess.run(["bash", str(arm)], env=env, check=True, timeout=30)
    return log.read_text().splitlines()


def test_arm_sets_a_timer_for_the_time_left(tmp_path):
    [call] = _run_arm(tmp_path, 3600)
    match = re.fullmatch(r"systemd-run --unit=gpurun-max-runtime --on-active=(\d+)s /bin/systemctl poweroff", call)
    assert match and 3590 <= int(match.group(1)) <= 3600


def test_arm_falls_back_to_shutdown(tmp_path):
    calls = _run_arm(tmp_path, 3600, systemd_run_ok=False)
    assert calls[-1] == "shutdown -h +60 gpurun: max_runtime reached"


def test_arm_after_the_deadline_powers_off_now(tmp_path):
    assert _run_arm(tmp_path, -5) == ["systemctl poweroff"]


def test_idle_guard_powers_off_only_after_the_job_is_gone(tmp_path):
    home = tmp_path / "home" / "ubuntu" / "gpurun" / RUN
    home.mkdir(parents=True)
    log = tmp_path / "calls.log"
    script = (
        rq.idle_guard_script(1, poll_s=30)
        .replace(f"STATE={rq.GUARD_STATE}", f"STATE={tmp_path}")
        .replace("while sleep 30", "while sleep 0.1")
        .replace("/home/*/gpurun/*/job.pid /root/gpurun/*/job.pid", f"{tmp_path}/home/*/gpurun/*/job.pid")
    )
    (tmp_path / "idle-guard").write_text(script + "\n")
    job = subprocess.Popen(["sleep", "30"])
    guard = subprocess.Popen(["bash", str(tmp_path / "idle-guard")], env={"PATH": _stub_bin(tmp_path, log)})
    try:
        time.sleep(1.5)
        assert not log.exists()  # no job has existed yet: never idle
        (home / "job.pid").write_text(f"{job.pid}\n")
        time.sleep(1.5)
        assert not log.exists()  # the job runs
        job.kill()
        job.wait()
        deadline = time.monotonic() + 10
        while not (log.exists() and log.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.1)  # the stub's `>>` creates the log before it writes the line
        assert log.read_text().splitlines()[0] == "systemctl poweroff"
    finally:
        guard.kill()
        guard.wait()
        job.kill()


CONSOLE = """\
[   10.1] cloud-init[812]: Cloud-init v. 23.4 running 'modules:final'
-----BEGIN SSH HOST KEY FINGERPRINTS-----
256 SHA256:abc root@ip-172-31-0-4 (ED25519)
-----END SSH HOST KEY FINGERPRINTS-----
-----BEGIN SSH HOST KEY KEYS-----
ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBEXAMPLE= root@ip-172-31-0-4
[   11.2] cloud-init[812]: ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEXAMPLEKEY root@ip-172-31-0-4
ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQEXAMPLE root@ip-172-31-0-4
-----END SSH HOST KEY KEYS-----
"""


def test_parse_host_keys_from_console_output():
    assert rq.parse_host_keys(CONSOLE) == [
        "ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAABBBEXAMPLE=",
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIEXAMPLEKEY",
        "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQEXAMPLE",
    ]
    assert rq.parse_host_keys(CONSOLE + CONSOLE) == rq.parse_host_keys(CONSOLE)


@pytest.mark.parametrize(
    "output", [None, "", "Linux version 6.8\nno keys here\n", "-----BEGIN SSH HOST KEY KEYS-----\n"]
)
def test_parse_host_keys_without_a_block(output):
    assert rq.parse_host_keys(output) == []


@pytest.mark.parametrize(
    "code, kind",
    [
        ("InsufficientInstanceCapacity", "capacity"),
        ("InsufficientCapacity", "capacity"),
        ("InsufficientHostCapacity", "capacity"),
        ("Unsupported", "capacity"),
        ("SpotMaxPriceTooLow", "capacity"),
        ("MaxSpotInstanceCountExceeded", "capacity"),
        ("UnfulfillableCapacity", "capacity"),
        ("VcpuLimitExceeded", "quota"),
        ("InstanceLimitExceeded", "quota"),
        ("InvalidParameterValue", None),
        ("InternalError", None),
    ],
)
def test_error_kind(code, kind):
    assert rq.error_kind(code) == kind


@pytest.mark.parametrize(
    "instance_type, spot, name",
    [
        ("g5.xlarge", False, "Running On-Demand G and VT instances"),
        ("g4dn.12xlarge", True, "All G and VT Spot Instance Requests"),
        ("p4d.24xlarge", False, "Running On-Demand P instances"),
        ("p5.48xlarge", True, "All P Spot Instance Requests"),
        ("t3.micro", False, "Running On-Demand Standard (A, C, D, H, I, M, R, T, Z) instances"),
        ("trn1.32xlarge", False, "Running On-Demand Trn instances"),
        ("inf2.xlarge", True, "All Inf Spot Instance Requests"),
    ],
)
def test_quota_names(instance_type, spot, name):
    assert rq.quota_for(instance_type, spot)[0] == name


def test_quota_message_says_how_to_raise_it():
    message = rq.quota_message("VcpuLimitExceeded", "g5.12xlarge", spot=False, vcpus=48, nodes=2, region="eu-west-1")
    assert "Running On-Demand G and VT instances" in message
    assert "96 vCPUs" in message
    assert "--quota-code L-DB2E81BA" in message and "--region eu-west-1" in message
    fallback = rq.quota_message(
        "InstanceLimitExceeded", "trn1.2xlarge", spot=False, vcpus=None, nodes=1, region="us-east-1"
    )
    assert "servicequotas" in fallback and "1 instance(s)" in fallback


def test_capacity_table_lists_every_attempt():
    table = rq.capacity_table(
        [
            ("g5.xlarge", "us-east-1a", "InsufficientInstanceCapacity", "We currently do not have sufficient capacity"),
            ("g6.xlarge", "us-east-1b", "Unsupported", "x" * 200),
        ]
    )
    lines = table
    assert lines[0].split() == ["type", "zone", "error", "message"]
    assert "g5.xlarge" in lines[1] and "us-east-1a" in lines[1] and "InsufficientInstanceCapacity" in lines[1]
    assert lines[2].endswith("...")


def test_builders_load_without_boto3():
    code = "import sys, gpurun.providers.aws.requests; sys.exit('boto3' in sys.modules or 'botocore' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
