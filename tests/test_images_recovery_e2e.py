"""A recovering run launched from a baked image: its group boots the image, and no machine runs setup.

The world of test_recovery_aws_e2e (moto's server, the boot emulator playing
cloud-init). The image is planted the way `gpurun image create` leaves one
(tags, setup hash of this spec); `image create` itself is tested in
test_images_e2e.py.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import boto3
import pytest

from gpurun.setup_hash import local_reader, setup_hash
from tests.helpers import wait_until
from tests.plugins.boot_emulator import BootEmulator
from tests.test_recovery_aws_e2e import AMI, _group, _log, _spec, cli, world  # noqa: F401

# Both image test files watch /dev/shm for the stash an image create leaves: one worker runs them.
pytestmark = pytest.mark.xdist_group("dev-shm-image-stash")

ACCOUNT = "123456789012"


def _plant_image(world: dict[str, Any], name: str, setup: str) -> str:  # noqa: F811
    from moto.ec2.models import ec2_backends

    ec2 = boto3.client("ec2", endpoint_url=world["endpoint"], region_name="us-east-1")
    instance = ec2.run_instances(ImageId=AMI, InstanceType="t3.micro", MinCount=1, MaxCount=1)["Instances"][0]
    wanted, _files = setup_hash(setup, local_reader(str(world["code"])))
    tags = {
        "gpurun:managed": "true",
        "gpurun:image": name,
        "gpurun:source-ami": AMI,
        "gpurun:source-run": "earlier-run",
        "gpurun:setup-hash": wanted,
    }
    image = ec2.create_image(
        InstanceId=instance["InstanceId"],
        Name=name,
        NoReboot=True,
        TagSpecifications=[{"ResourceType": "image", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}],
    )["ImageId"]
    ec2_backends[ACCOUNT]["us-east-1"].amis[image].root_device_type = "ebs"  # as EC2 registers it
    ec2.terminate_instances(InstanceIds=[instance["InstanceId"]])
    return str(image)


@pytest.mark.slow
def test_a_recovery_group_from_a_baked_image_boots_it_and_skips_setup(
    world: dict[str, Any],  # noqa: F811
    boot_emulator: BootEmulator,
    capsys: pytest.CaptureFixture[str],
) -> None:
    finish = world["tmp"] / "finish"
    setup = "echo ran >> setup-marker -- requirements.txt"
    (Path(world["code"]) / "requirements.txt").write_text("numpy==1.26.4\n")
    spec = _spec(world, str(finish), "{max_restarts: 1}")
    spec.write_text(spec.read_text().replace("run:", f"setup: {setup}\nrun:"))
    name = f"baked-{world['bucket']}"
    image = _plant_image(world, name, setup)
    ec2 = boto3.client("ec2", endpoint_url=world["endpoint"], region_name="us-east-1")
    try:
        code, out, err = cli(capsys, "launch", str(spec), "--json", "--set", f"aws.ami=image:{name}")
        assert code == 0, err
        assert "setup skipped" in err and name in err
        run = json.loads(out)["run"]
        [template] = ec2.describe_launch_template_versions(LaunchTemplateName=f"gpurun-{run}")["LaunchTemplateVersions"]
        assert template["LaunchTemplateData"]["ImageId"] == image
        [machine] = wait_until(boot_emulator.live, timeout=60, what="the group's machine")
        wait_until(lambda: "job started" in _log(boot_emulator, machine, run), timeout=120, what="the job")
        assert not (boot_emulator.run_dir(machine, run) / "work" / "setup-marker").exists()
        assert "[gpurun] setup:" not in _log(boot_emulator, machine, run)
        # Deleting the image would leave the group nothing to boot a replacement from: refused.
        code, out, err = cli(capsys, "image", "delete", name, "--region", "us-east-1", "--yes")
        assert code == 2 and f"run {run} boots its replacement machines" in err, err
        assert ec2.describe_images(ImageIds=[image])["Images"]
        finish.touch()
        wait_until(lambda: _group(world, run)["DesiredCapacity"] == 0, timeout=60, what="the group scaled to 0")
        code, out, err = cli(capsys, "teardown", run, "--yes")
        assert code == 0, err
        code, out, err = cli(capsys, "image", "delete", name, "--region", "us-east-1", "--yes")
        assert code == 0, err
    finally:
        with contextlib.suppress(Exception):
            ec2.deregister_image(ImageId=image)
