"""The machine's bootstrap (gpurun/bootstrap.py): SigV4, role credentials, the restart budget.

Against moto's server over HTTP and a fake IMDSv2 of the instance's own; the
budget's conditional writes are raced by real threads.
"""

from __future__ import annotations

import datetime
import json
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import boto3
import pytest
from botocore.auth import S3SigV4Auth, SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from gpurun import bootstrap as bs
from tests.plugins.fake_imds import FakeImds

CREDENTIALS = {"key": "AKIDEXAMPLE", "secret": "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "token": "session-token"}
WHEN = datetime.datetime(2026, 12, 4, 10, 0, 0, tzinfo=datetime.timezone.utc)


def _botocore_authorization(auth_class: Any, service: str, method: str, url: str, headers: dict, body: bytes) -> str:
    """botocore's own signer on the same request at the same instant."""
    request = AWSRequest(method=method, url=url, data=body, headers=dict(headers))
    signer = auth_class(
        Credentials(CREDENTIALS["key"], CREDENTIALS["secret"], CREDENTIALS["token"]), service, "eu-west-1"
    )
    with mock.patch("botocore.auth.get_current_datetime", return_value=WHEN.replace(tzinfo=None)):
        signer.add_auth(request)
    return str(request.headers["Authorization"])


@pytest.mark.parametrize(
    ("method", "url", "headers", "body"),
    [
        ("GET", "https://bucket-a.s3.eu-west-1.amazonaws.com/ckpt/run-1/attempts.json", {}, b""),
        (
            "PUT",
            "https://bucket-a.s3.eu-west-1.amazonaws.com/ckpt/run-1/a%20b%2Bc.json",
            {"if-match": '"abc"', "content-type": "application/json"},
            b'{"x": 1}',
        ),
    ],
)
def test_s3_signature_matches_botocore(method: str, url: str, headers: dict, body: bytes) -> None:
    ours = bs.sign(
        method, url, headers=headers, body=body, credentials=CREDENTIALS, region="eu-west-1", service="s3", when=WHEN
    )
    theirs = _botocore_authorization(
        S3SigV4Auth, "s3", method, url, {**headers, "x-amz-content-sha256": ours["x-amz-content-sha256"]}, body
    )
    assert ours["authorization"] == theirs


def test_autoscaling_signature_matches_botocore() -> None:
    body = b"Action=SetDesiredCapacity&Version=2011-01-01&AutoScalingGroupName=gpurun-x&DesiredCapacity=0"
    headers = {"content-type": "application/x-www-form-urlencoded; charset=utf-8"}
    url = "https://autoscaling.eu-west-1.amazonaws.com/"
    ours = bs.sign(
        "POST",
        url,
        headers=headers,
        body=body,
        credentials=CREDENTIALS,
        region="eu-west-1",
        service="autoscaling",
        when=WHEN,
    )
    # SigV4Auth signs without x-amz-content-sha256; give it the same headers so the comparison is exact.
    theirs = _botocore_authorization(
        SigV4Auth, "autoscaling", "POST", url, {**headers, "x-amz-content-sha256": ours["x-amz-content-sha256"]}, body
    )
    assert ours["authorization"] == theirs


@pytest.fixture
def machine_aws(moto_server: str, monkeypatch: pytest.MonkeyPatch, fake_imds: FakeImds) -> bs.Aws:
    """The bootstrap's own client, with the role credentials of a fake IMDSv2, on moto's server."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    return bs.Aws(bs.Metadata(), "us-east-1")


@pytest.fixture
def bucket(moto_server: str) -> str:
    name = f"gpurun-boot-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1").create_bucket(Bucket=name)
    return name


def test_credentials_come_from_the_instance_role(fake_imds: FakeImds) -> None:
    found = bs.Metadata().credentials()
    assert found["key"] == fake_imds.credentials["AccessKeyId"] and found["token"] == fake_imds.credentials["Token"]
    fake_imds.role = None
    with pytest.raises(RuntimeError, match="no role"):
        bs.Metadata().credentials()


def test_conditional_writes_on_moto(machine_aws: bs.Aws, bucket: str) -> None:
    assert machine_aws.put_object(bucket, "k", b"1", if_match="")
    assert not machine_aws.put_object(bucket, "k", b"2", if_match=""), "If-None-Match: * refuses an existing object"
    body, etag = machine_aws.get_object(bucket, "k") or (b"", "")
    assert body == b"1"
    assert not machine_aws.put_object(bucket, "k", b"3", if_match='"not-the-etag"')
    assert machine_aws.put_object(bucket, "k", b"4", if_match=etag)
    assert machine_aws.get_object(bucket, "missing") is None


def _budget(aws: bs.Aws, bucket: str, max_restarts: int) -> bs.Budget:
    return bs.Budget(aws, bucket, "ckpt/run-1/attempts.json", "run-1", max_restarts)


def test_budget_counts_machines_and_stops_when_spent(machine_aws: bs.Aws, bucket: str) -> None:
    budget = _budget(machine_aws, bucket, 1)
    first = budget.take_machine({"instance_id": "i-1", "type": "g5.xlarge"})
    assert first is not None and first["generation"] == 1
    assert budget.take_machine({"instance_id": "i-1"})["generation"] == 1, "a reboot is not a restart"  # type: ignore[index]
    second = budget.take_machine({"instance_id": "i-2"})
    assert second is not None and second["generation"] == 2
    assert budget.take_machine({"instance_id": "i-3"}) is None
    document, _etag = budget.read()
    assert document is not None
    assert document["state"] == "budget_spent" and document["restarts_used"] == 1
    assert [(m["instance_id"], m.get("why")) for m in document["machines"]] == [("i-1", "replaced"), ("i-2", None)]
    assert not budget.take_restart("i-2")


def test_two_machines_cannot_both_take_the_last_restart(machine_aws: bs.Aws, bucket: str) -> None:
    budget = _budget(machine_aws, bucket, 1)
    budget.take_machine({"instance_id": "i-1"})
    results: dict[str, Any] = {}
    start = threading.Barrier(2)

    def boot(instance: str) -> None:
        start.wait()
        results[instance] = _budget(bs.Aws(machine_aws.metadata, "us-east-1"), bucket, 1).take_machine(
            {"instance_id": instance}
        )

    threads = [threading.Thread(target=boot, args=(name,)) for name in ("i-a", "i-b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    granted = [name for name, entry in results.items() if entry is not None]
    assert len(granted) == 1, results
    document, _etag = budget.read()
    assert document is not None and document["restarts_used"] == 1
    assert [m["instance_id"] for m in document["machines"]] == ["i-1", granted[0]]


@pytest.fixture
def one_machine_group(moto_server: str) -> Iterator[tuple[str, Any]]:
    """A group of one machine on moto (its name and an Auto Scaling client), removed afterwards."""
    ec2 = boto3.client("ec2", endpoint_url=moto_server, region_name="us-east-1")
    autoscaling = boto3.client("autoscaling", endpoint_url=moto_server, region_name="us-east-1")
    name = f"gpurun-boot-{uuid.uuid4().hex[:8]}"
    image = ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    ec2.create_launch_template(
        LaunchTemplateName=name, LaunchTemplateData={"ImageId": image, "InstanceType": "t3.micro"}
    )
    subnets = [subnet["SubnetId"] for subnet in ec2.describe_subnets()["Subnets"]]
    autoscaling.create_auto_scaling_group(
        AutoScalingGroupName=name,
        MinSize=0,
        MaxSize=1,
        DesiredCapacity=1,
        VPCZoneIdentifier=",".join(subnets),
        LaunchTemplate={"LaunchTemplateName": name, "Version": "$Latest"},
    )
    try:
        yield name, autoscaling
    finally:
        autoscaling.delete_auto_scaling_group(AutoScalingGroupName=name, ForceDelete=True)
        ec2.delete_launch_template(LaunchTemplateName=name)


def test_a_machine_scales_its_own_group_to_zero(machine_aws: bs.Aws, one_machine_group: tuple[str, Any]) -> None:
    name, autoscaling = one_machine_group
    machine_aws.autoscaling(
        "SetDesiredCapacity", {"AutoScalingGroupName": name, "DesiredCapacity": "0", "HonorCooldown": "false"}
    )
    [group] = autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"]
    assert group["DesiredCapacity"] == 0 and group["Instances"] == []


def test_user_data_holds_no_credentials_and_fits(fake_imds: FakeImds) -> None:
    config = {"run": "exp-abc123", "store": "s3://bucket-a/ckpt", "env": {"A": "1"}}
    text = bs.user_data(config)
    assert text.startswith("#!/usr/bin/env python3\n") and len(text.encode()) < 16 * 1024
    assert "aws_secret_access_key" not in text.lower() and fake_imds.credentials["SecretAccessKey"] not in text
    namespace: dict[str, Any] = {}
    # The embedded program is this module, and the settings read back as given.
    exec(text.split("sys.exit(")[0].split("\n", 1)[1], namespace)  # noqa: S102 - the test reads its own output
    assert namespace["CONFIG"] == config and b"class Budget" in namespace["SOURCE"]
    assert json.loads(json.dumps(namespace["CONFIG"])) == config


def test_a_machine_that_cannot_set_itself_up_ends_the_run_instead_of_idling(
    machine_aws: bs.Aws,
    bucket: str,
    one_machine_group: tuple[str, Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    name, autoscaling = one_machine_group
    monkeypatch.setenv("GPURUN_BOOT_HOME", str(tmp_path / "home"))
    config = {
        "run": "run-1",
        "store": f"s3://{bucket}/ckpt",
        "group": name,
        "region": "us-east-1",
        "max_restarts": 1,
        "agent_tag": "missing",
        "code": "0" * 64,
        "checkpoint_dir": "ckpt",
    }
    assert bs.boot(config) == 1
    document, _etag = _budget(machine_aws, bucket, 1).read()
    assert document is not None and document["state"] == "failed"
    assert document["machines"][0]["why"].startswith("bootstrap failed: RuntimeError: s3://")
    [group] = autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"]
    assert group["DesiredCapacity"] == 0


@pytest.mark.parametrize("files_kept", [False, True])
def test_a_job_stopped_by_teardown_is_not_restarted(
    machine_aws: bs.Aws, bucket: str, fake_imds: FakeImds, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, files_kept
) -> None:
    """`gpurun teardown` stops the job over SSH, then removes the run directory (unless --keep-files) and
    deletes the group. The machine's monitor must not take that for a lost job: no restart is spent
    and no job starts again on a machine that is being deleted."""
    monkeypatch.setenv("GPURUN_BOOT_HOME", str(tmp_path / "home"))
    config = {
        "run": "run-1",
        "store": f"s3://{bucket}/ckpt",
        "group": "gpurun-run-1",
        "region": "us-east-1",
        "max_restarts": 2,
        "agent_tag": "missing",
        "code": "0" * 64,
        "checkpoint_dir": "ckpt",
        "idle_timeout": None,
    }
    budget = _budget(machine_aws, bucket, 2)
    assert budget.take_machine({"instance_id": fake_imds.identity["instanceId"]}) is not None
    run_dir = tmp_path / "home" / "gpurun" / "run-1"
    run_dir.mkdir(parents=True)
    (run_dir / "job.pid").write_text("999999999\n")  # the job teardown killed: no such process
    if files_kept:
        (run_dir / "job.exit").write_text("143\n")
        (run_dir / bs.TEARDOWN_MARK).write_text("")  # what teardown leaves before it stops the job
    else:
        (run_dir / bs.TEARDOWN_MARK).write_text("")
        import shutil

        shutil.rmtree(run_dir)  # teardown removed the run directory
    assert bs.monitor(config) == 0
    document, _etag = budget.read()
    assert document is not None and document["restarts_used"] == 0, document
    assert document["state"] == "running"
