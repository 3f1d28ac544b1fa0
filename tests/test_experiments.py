"""Every file in experiments/ passes `gpurun launch --dry-run` (the AWS ones against moto) and creates nothing."""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import pytest

from gpurun.cli import main
from gpurun.providers.aws import AwsProvider
from tests.helpers import REPO
from tests.plugins.aws_fake import FakeAws

EXPERIMENTS = sorted((REPO / "experiments").glob("*.yaml"))


def test_there_are_examples_for_each_provider() -> None:
    import yaml

    providers = {path.name: yaml.safe_load(path.read_text())["provider"] for path in EXPERIMENTS}
    assert {"quickstart.yaml", "pytorch-spot.yaml", "keras-on-demand.yaml", "workstation.yaml"} <= set(providers)
    assert set(providers.values()) == {"local", "ssh", "aws"}


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_dry_run(path: Path, session, ip_echo, monkeypatch, capsys, gpurun_home: Path) -> None:
    fake = FakeAws()
    original = AwsProvider.__init__

    def with_fakes(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.event_handlers.extend(fake.handlers())

    monkeypatch.setattr(AwsProvider, "__init__", with_fakes)
    s3 = boto3.client("s3", region_name="us-east-1")
    s3.create_bucket(Bucket="my-gpurun-bucket")
    with pytest.raises(SystemExit) as exited:
        main(["launch", str(path), "--dry-run", "--json"])
    out, err = capsys.readouterr()
    assert exited.value.code == 0, err
    plan = {row["item"]: row["value"] for row in json.loads(out)["plan"]}
    assert plan["resume"]
    if "provider: aws" in path.read_text():
        assert "ami-" in json.dumps(plan), plan
        ec2 = boto3.client("ec2", region_name="us-east-1")
        assert ec2.describe_instances()["Reservations"] == []
        assert [k for k in ec2.describe_key_pairs()["KeyPairs"] if k["KeyName"].startswith("gpurun")] == []
        assert [g for g in ec2.describe_security_groups()["SecurityGroups"] if g["GroupName"] != "default"] == []
        assert fake.mutating_calls() == []
    assert not (gpurun_home / "runs").exists() or not list((gpurun_home / "runs").glob("*.json"))
