"""`gpurun doctor` through the CLI in-process, against moto with AMI, type and key-pair validation on.

Every test also proves the doctor created nothing: no instance, security group,
key pair, role or instance profile in moto, no object left in the bucket, no
mutating AWS call other than the store's write probe (one PutObject and its
DeleteObject), and an untouched state directory.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest

# moto reads these when it is first imported; the fixture below also sets them on moto.settings.
os.environ.setdefault("MOTO_EC2_ENABLE_INSTANCE_TYPE_VALIDATION", "true")
os.environ.setdefault("MOTO_ENABLE_AMI_VALIDATION", "true")
os.environ.setdefault("MOTO_ENABLE_KEYPAIR_VALIDATION", "true")

import boto3  # noqa: E402
import botocore.client  # noqa: E402
import botocore.exceptions  # noqa: E402
from moto import mock_aws  # noqa: E402

from gpurun.cli import main  # noqa: E402
from gpurun.providers.aws.session import new_botocore_session  # noqa: E402

AMI = "ami-1e749f67"  # bundled with moto for us-east-1: Ubuntu 14.04 x86_64, 15 GB root snapshot
BUCKET = "ckpt-bucket"
from tests.plugins.aws_moto import CALLER_IP  # noqa: E402 - the loopback echo answers this

_MUTATING = ("Create", "Import", "Authorize", "Put", "Add", "Run", "Attach", "Associate", "Modify", "Delete", "Request")


def run_cli(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exited:
        main(list(args))
    out, err = capsys.readouterr()
    return exited.value.code, out, err


def run_json(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, dict[str, dict[str, Any]], str]:
    code, out, err = run_cli(capsys, "doctor", *args, "--json")
    checks = json.loads(out)
    assert isinstance(checks, list) and all(set(c) == {"check", "result", "detail", "fix"} for c in checks)
    return code, {check["check"]: check for check in checks}, err


class Calls:
    """Every AWS operation any client made (whatever session made it)."""

    def __init__(self) -> None:
        self.names: list[str] = []
        #: What Service Quotas answers (moto has no Service Quotas): code -> vCPUs; missing: NoSuchResource.
        self.quotas: dict[str, float] = {"L-DB2E81BA": 64.0, "L-417A185B": 0.0, "L-1216C47A": 32.0, "L-3819A6DF": 8.0}

    def mutating(self) -> list[str]:
        return [name for name in self.names if name.startswith(_MUTATING)]


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch, moto_validation: None, ip_echo, gpurun_home: Path):
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    calls = Calls()
    original = botocore.client.BaseClient._make_api_call

    def recording(self, operation_name, api_params):
        calls.names.append(operation_name)
        if operation_name == "GetServiceQuota":
            code = api_params["QuotaCode"]
            if code not in calls.quotas:
                raise botocore.exceptions.ClientError(
                    {"Error": {"Code": "NoSuchResourceException", "Message": "quota not found"}}, operation_name
                )
            return {"Quota": {"ServiceCode": "ec2", "QuotaCode": code, "Value": calls.quotas[code]}}
        return original(self, operation_name, api_params)

    with mock_aws():
        session = boto3.Session(botocore_session=new_botocore_session(), region_name="us-east-1")
        session.client("s3").create_bucket(Bucket=BUCKET)
        before = sorted(str(p.relative_to(gpurun_home)) for p in gpurun_home.rglob("*"))
        monkeypatch.setattr(botocore.client.BaseClient, "_make_api_call", recording)
        yield calls
        monkeypatch.setattr(botocore.client.BaseClient, "_make_api_call", original)
        assert leftovers(session) == []
        assert sorted(str(p.relative_to(gpurun_home)) for p in gpurun_home.rglob("*")) == before
        probes = calls.mutating()
        assert set(probes) <= {"PutObject", "DeleteObject"}, probes  # the store's write probe, and nothing else


def leftovers(session: boto3.Session) -> list[str]:
    """Everything a launch could have made, found by tag and by name, plus any object in the bucket."""
    ec2, iam, s3 = session.client("ec2"), session.client("iam"), session.client("s3")
    found = []
    for reservation in ec2.describe_instances()["Reservations"]:
        found += [f"instance {item['InstanceId']}" for item in reservation["Instances"]]
    found += [f"volume {v['VolumeId']}" for v in ec2.describe_volumes()["Volumes"]]
    found += [
        f"sg {g['GroupName']}" for g in ec2.describe_security_groups()["SecurityGroups"] if g["GroupName"] != "default"
    ]
    found += [f"key {k['KeyName']}" for k in ec2.describe_key_pairs()["KeyPairs"]]
    found += [f"role {r['RoleName']}" for r in iam.list_roles()["Roles"]]
    found += [f"profile {p['InstanceProfileName']}" for p in iam.list_instance_profiles()["InstanceProfiles"]]
    tagged = ec2.describe_tags(Filters=[{"Name": "key", "Values": ["gpurun:managed"]}])["Tags"]
    found += [f"tagged {tag['ResourceId']}" for tag in tagged]
    found += [f"object {o['Key']}" for o in s3.list_objects_v2(Bucket=BUCKET).get("Contents", [])]
    return found


def write_spec(tmp_path: Path, *, store: str = f"s3://{BUCKET}/team/exp", **aws: Any) -> Path:
    settings = {"ami": AMI, "instance_type": ["g5.xlarge"], "ssh_cidr": "auto", **aws}
    path = tmp_path / "experiment.yaml"
    path.write_text(
        "name: exp\nprovider: aws\nrun: python train.py\n"
        f"checkpoint: {json.dumps({'store': store})}\n"
        f"aws: {json.dumps(settings)}\n"
    )
    return path


# -- AWS -------------------------------------------------------------------------------------------


def test_everything_in_place_passes_and_creates_nothing(aws: Calls, capsys, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, instance_type=["g5.xlarge", "t3.micro"])
    code, out, err = run_cli(capsys, "doctor", str(spec))
    assert code == 0, out + err
    assert err == ""
    lines = out.splitlines()
    assert lines[0].split() == ["CHECK", "RESULT", "DETAIL", "/", "FIX"]
    rows = {line.split("  ")[0]: line for line in lines[1:]}
    assert "PASS" in rows["aws credentials"] and "123456789012" in rows["aws credentials"]
    assert "arn:aws:sts::123456789012:user/moto" in rows["aws credentials"]
    assert "us-east-1" in rows["aws region"] and "PASS" in rows["aws region"]
    assert f"{AMI} ubuntu/images/hvm-ssd/ubuntu-trusty-14.04" in rows["AMI"] and "created 20" in rows["AMI"]
    assert "1x NVIDIA A10G 22 GiB" in rows["instance type g5.xlarge"] and "PASS" in rows["instance type g5.xlarge"]
    assert "WARN" in rows["instance type t3.micro"] and "no GPU" in rows["instance type t3.micro"]
    assert f"{CALLER_IP}/32 only (your public IP)" in rows["caller IP (aws.ssh_cidr)"]
    assert "PASS" in rows["checkpoint bucket"] and "deleted right after" in rows["checkpoint bucket"]
    assert "PASS" in rows["ssh client"] and "PASS" in rows["tar"] and "PASS" in rows["aws network"]
    assert aws.mutating() == ["PutObject", "DeleteObject"]
    assert "GetCallerIdentity" in aws.names

    code, checks, err = run_json(capsys, str(spec))
    assert code == 0 and err == ""
    assert {c["result"] for c in checks.values()} == {"pass", "warn"}
    assert checks["instance type t3.micro"]["fix"]
    assert all(c["fix"] is None for c in checks.values() if c["result"] == "pass")


def test_missing_bucket_fails_with_the_command_that_creates_it(aws: Calls, capsys, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, store="s3://no-such-bucket/exp")
    code, checks, err = run_json(capsys, str(spec))
    assert code == 1
    bucket = checks["checkpoint bucket"]
    assert bucket["result"] == "fail" and "no-such-bucket does not exist" in bucket["detail"]
    assert "aws s3 mb s3://no-such-bucket --region us-east-1" in bucket["fix"] and "--create-bucket" in bucket["fix"]
    assert err.count("\n") == 1 and err.startswith("error: 1 of ") and "(checkpoint bucket)" in err
    assert [name for name, c in checks.items() if c["result"] != "pass"] == ["checkpoint bucket"]
    assert aws.mutating() == ["PutObject"]  # refused by S3: nothing to delete

    code, out, err = run_cli(capsys, "doctor", str(spec))
    assert code == 1 and "FIX: create it: `aws s3 mb s3://no-such-bucket" in out


def test_unknown_instance_type_fails_and_the_rest_is_still_checked(aws: Calls, capsys, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, instance_type=["p9.mega", "t3.micro"])
    code, checks, _ = run_json(capsys, str(spec))
    assert code == 1
    unknown = checks["instance type p9.mega"]
    assert unknown["result"] == "fail" and "p9.mega does not exist in us-east-1" in unknown["detail"]
    assert "g5.xlarge" in unknown["fix"]
    assert checks["instance type t3.micro"]["result"] == "warn"
    assert checks["AMI"]["result"] == "pass" and checks["checkpoint bucket"]["result"] == "pass"


def test_unknown_ami_fails(aws: Calls, capsys, tmp_path: Path) -> None:
    spec = write_spec(tmp_path)
    code, checks, err = run_json(capsys, str(spec), "--set", "aws.ami=ami-12345678")
    assert code == 1
    assert checks["AMI"]["result"] == "fail"
    assert "ami-12345678 does not exist in us-east-1" in checks["AMI"]["detail"]
    assert "dlami-pytorch" in checks["AMI"]["fix"]
    assert "(AMI)" in err


def test_disk_smaller_than_the_ami_fails(aws: Calls, capsys, tmp_path: Path) -> None:
    code, checks, _ = run_json(capsys, str(write_spec(tmp_path, disk_gb=8)))
    assert code == 1
    assert checks["AMI"]["result"] == "fail" and checks["AMI"]["fix"] == "set aws.disk_gb to at least 15"


def test_no_credentials_fails_naming_aws_configure(aws: Calls, capsys, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    code, checks, err = run_json(capsys, str(write_spec(tmp_path)))
    assert code == 1
    credentials = checks["aws credentials"]
    assert credentials["result"] == "fail" and "no AWS credentials found" in credentials["detail"]
    assert "`aws configure`" in credentials["fix"]
    for name in ("aws network", "instance type g5.xlarge", "AMI", "checkpoint bucket"):
        assert checks[name]["result"] == "skip", name
    assert checks["caller IP (aws.ssh_cidr)"]["result"] == "pass"  # needs no credentials
    assert aws.names == ["GetCallerIdentity"]  # refused here, unsigned: nothing else was tried
    assert err.startswith("error: ") and err.count("\n") == 1

    code, checks, _ = run_json(capsys)  # no SPEC: the default setup
    assert code == 1 and "`aws configure`" in checks["aws credentials"]["fix"]


def test_unknown_region_or_profile_fails_with_a_fix(aws: Calls, capsys, tmp_path: Path) -> None:
    code, checks, _ = run_json(capsys, str(write_spec(tmp_path)), "--set", "aws.region=us-easst-1")
    assert code == 1
    assert checks["aws region"]["result"] == "fail" and "did you mean 'us-east-1'" in checks["aws region"]["detail"]
    assert checks["aws credentials"]["result"] == "skip"

    code, checks, _ = run_json(capsys, str(write_spec(tmp_path)), "--set", "aws.profile=nobody")
    assert code == 1 and checks["aws region"]["result"] == "pass"
    credentials = checks["aws credentials"]
    assert credentials["result"] == "fail" and "'nobody' is not in your AWS config" in credentials["detail"]
    assert "aws configure --profile nobody" in credentials["fix"]


def test_without_spec_checks_ssh_client_credentials_and_region(aws: Calls, capsys, monkeypatch, tmp_path) -> None:
    code, checks, err = run_json(capsys)
    assert code == (0 if shutil.which("ssh") else 1), err
    assert list(checks) == ["ssh client", "aws region", "aws credentials"]
    assert checks["aws region"]["detail"].startswith("us-east-1")
    assert "user/moto" in checks["aws credentials"]["detail"]

    monkeypatch.setenv("PATH", str(tmp_path))  # no ssh anywhere
    code, checks, err = run_json(capsys)
    assert code == 1 and checks["ssh client"]["result"] == "fail"
    assert "openssh-client" in checks["ssh client"]["fix"] and "(ssh client)" in err


def test_bad_spec_input_is_exit_2(aws: Calls, capsys, tmp_path: Path) -> None:
    spec = write_spec(tmp_path)
    code, out, err = run_cli(capsys, "doctor", str(spec), "--set", "aws.spto=true")
    assert code == 2 and out == "" and "did you mean" in err and err.count("\n") == 1
    code, out, err = run_cli(capsys, "doctor", str(tmp_path / "missing.yaml"))
    assert code == 2 and "no such experiment file" in err
    code, out, err = run_cli(capsys, "doctor", "--set", "aws.spot=true")
    assert code == 2 and "needs a SPEC" in err
    assert aws.names == []


# -- provider ssh and local ------------------------------------------------------------------------


def _ssh_spec(tmp_path: Path, host: str) -> Path:
    path = tmp_path / "box.yaml"
    path.write_text(f"name: box\nprovider: ssh\nrun: python train.py\nssh: {{hosts: ['{host}']}}\n")
    return path


def test_ssh_host_that_does_not_answer_fails(capsys, tmp_path: Path, gpurun_home: Path) -> None:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again: nothing listens there
    code, checks, err = run_json(capsys, str(_ssh_spec(tmp_path, f"127.0.0.1:{port}")))
    assert code == 1
    host = checks["ssh host 127.0.0.1"]
    assert host["result"] == "fail" and host["fix"]
    assert checks["GPUs on 127.0.0.1"]["result"] == "skip"
    assert checks["checkpoint store"]["result"] == "pass"
    assert not (gpurun_home / "store").exists()  # the default store is not created by looking


def test_ssh_host_reached_reports_the_host_key_and_gpus(sshd, capsys, tmp_path: Path, monkeypatch, gpurun_home) -> None:
    client = tmp_path / "client-home"
    (client / ".ssh").mkdir(parents=True, mode=0o700)
    config = client / ".ssh/config"
    config.write_text(
        f"Host testbox\n  HostName {sshd.host}\n  Port {sshd.port}\n  User {sshd.user}\n  IdentityFile {sshd.key_path}\n"
    )
    monkeypatch.setenv("HOME", str(client))
    monkeypatch.setenv("GPURUN_SSH_CONFIG", str(config))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    spec = _ssh_spec(tmp_path, "testbox")

    code, checks, _ = run_json(capsys, str(spec))
    host = checks["ssh host testbox"]
    assert host["result"] == "warn" and "trusts it on first use" in host["detail"]  # not in known_hosts
    assert f"ssh-keyscan -p {sshd.port} {sshd.host}" in host["fix"]
    gpus = checks["GPUs on testbox"]
    if shutil.which("nvidia-smi"):
        assert gpus["result"] == "pass"
    else:
        assert code == 1 and gpus == {
            "check": "GPUs on testbox",
            "result": "fail",
            "detail": "nvidia-smi not found",
            "fix": "install the NVIDIA driver on testbox (nvidia-smi comes with it)",
        }
    assert not (client / ".ssh/known_hosts").exists() and not (gpurun_home / "known_hosts").exists()

    (client / ".ssh/known_hosts").write_text(sshd.known_hosts_line + "\n")
    _, checks, _ = run_json(capsys, str(spec))
    assert checks["ssh host testbox"]["result"] == "pass"
    assert "host key known" in checks["ssh host testbox"]["detail"]


def test_local_provider_checks_python_tar_and_store_without_creating_it(capsys, tmp_path: Path) -> None:
    store = tmp_path / "not-yet" / "store"
    spec = tmp_path / "local.yaml"
    spec.write_text(f"name: here\nprovider: local\nrun: python train.py\ncheckpoint: {{store: 'file://{store}'}}\n")
    code, checks, err = run_json(capsys, str(spec))
    assert code == 0, err
    assert list(checks) == ["ssh client", "tar", "python", "checkpoint store"]
    assert "launch creates it" in checks["checkpoint store"]["detail"]
    assert not store.parent.exists()

    store.mkdir(parents=True)
    _, checks, _ = run_json(capsys, str(spec))
    assert "removed right after" in checks["checkpoint store"]["detail"]
    assert list(store.iterdir()) == []

    store.chmod(0o500)
    try:
        if os.access(store, os.W_OK):  # root writes anywhere: nothing to prove here
            return
        code, checks, _ = run_json(capsys, str(spec))
        assert code == 1 and checks["checkpoint store"]["result"] == "fail"
    finally:
        store.chmod(0o700)


# -- what stops first launches: quotas; and the doctor's own reporting -----------------------------


def test_vcpu_quota_below_what_the_launch_needs_fails_with_the_request_command(aws: Calls, capsys, tmp_path) -> None:
    aws.quotas["L-DB2E81BA"] = 4.0
    spec = write_spec(tmp_path, instance_type=["g5.2xlarge", "g5.xlarge", "p5.4xlarge"], nodes=2)
    code, checks, err = run_json(capsys, str(spec))
    assert code == 1
    g = checks["vCPU quota: Running On-Demand G and VT instances"]
    assert g["result"] == "fail"
    assert g["detail"] == "4 vCPUs in us-east-1 (L-DB2E81BA); g5.2xlarge x2 needs 16"
    assert g["fix"] == (
        "aws service-quotas request-service-quota-increase --region us-east-1 --service-code ec2 "
        "--quota-code L-DB2E81BA --desired-value 16"
    )
    p = checks["vCPU quota: Running On-Demand P instances"]
    assert p["result"] == "fail" and p["detail"].startswith("0 vCPUs in us-east-1 (L-417A185B)")
    assert "2 of " in err and "checks failed (vCPU quota: Running On-Demand G and VT instances, vCPU quota" in err

    aws.quotas["L-DB2E81BA"] = 64.0
    code, checks, err = run_json(capsys, str(write_spec(tmp_path, spot=True)))
    spot = checks["vCPU quota: All G and VT Spot Instance Requests"]
    assert code == 0 and spot["result"] == "pass" and "8 vCPUs in us-east-1 (L-3819A6DF)" in spot["detail"]


def test_an_unreadable_quota_is_a_warning_that_names_the_permission(aws: Calls, capsys, tmp_path) -> None:
    del aws.quotas["L-DB2E81BA"]
    code, checks, _ = run_json(capsys, str(write_spec(tmp_path)))
    check = checks["vCPU quota: Running On-Demand G and VT instances"]
    assert code == 0 and check["result"] == "warn"
    assert "could not read quota L-DB2E81BA" in check["detail"] and "servicequotas:GetServiceQuota" in check["fix"]


def test_caller_ip_failure_keeps_the_reason_in_the_detail_and_the_fix_apart(aws: Calls, capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("GPURUN_IP_ECHO_URLS", "http://127.0.0.1:9/a http://127.0.0.1:9/b")
    code, checks, err = run_json(capsys, str(write_spec(tmp_path)))
    check = checks["caller IP (aws.ssh_cidr)"]
    assert check["result"] == "fail"
    assert check["detail"].startswith("aws.ssh_cidr: could not find your public IP (http://127.0.0.1:9/a: ")
    assert "http://127.0.0.1:9/b" in check["detail"]
    assert check["fix"] == "set it with --set aws.ssh_cidr=<your-ip>/32"
    code, out, _ = run_cli(capsys, "doctor", str(write_spec(tmp_path)))
    [row] = [line for line in out.splitlines() if line.startswith("caller IP")]
    assert row.endswith(". FIX: set it with --set aws.ssh_cidr=<your-ip>/32")


def test_skipped_checks_are_not_counted_as_failures(aws: Calls, capsys, tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    code, checks, err = run_json(capsys, str(write_spec(tmp_path)))
    failed = [name for name, check in checks.items() if check["result"] == "fail"]
    skipped = [name for name, check in checks.items() if check["result"] == "skip"]
    assert code == 1 and failed == ["aws credentials"] and len(skipped) >= 3
    assert err.startswith(
        f"error: 1 of {len(checks)} checks failed (aws credentials); {len(skipped)} skipped until it passes"
    )
