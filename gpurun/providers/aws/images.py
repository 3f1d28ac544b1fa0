"""gpurun machine images on EC2: create (NoReboot), find by name or setup hash, list, delete, orphan snapshots.

An image gpurun bakes carries `gpurun:managed=true`, `gpurun:image=<name>`,
`gpurun:source-ami`, `gpurun:source-run` and `gpurun:setup-hash`; so do its
snapshots (tagged right after CreateImage). Only images and snapshots with
`gpurun:managed=true` owned by this account are ever deregistered or deleted.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import botocore.exceptions

from gpurun.errors import BadInput, GpurunError
from gpurun.providers.aws import requests
from gpurun.providers.aws.ami import AmiInfo, _image_info, resolve_ami
from gpurun.providers.aws.session import Aws, client_error_code, client_error_message
from gpurun.setup_hash import local_reader, setup_hash

if TYPE_CHECKING:
    from mypy_boto3_ec2.type_defs import FilterTypeDef, ImageTypeDef

    from gpurun.spec import Spec

TAG_IMAGE = "gpurun:image"
TAG_SOURCE_AMI = "gpurun:source-ami"
TAG_SOURCE_RUN = "gpurun:source-run"
TAG_SETUP_HASH = "gpurun:setup-hash"

#: EBS standard snapshot storage, USD per GB-month (us-east-1 list price; most regions are close).
SNAPSHOT_USD_PER_GB_MONTH = 0.05
IMAGE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{2,127}")
IMAGE_NAME_HELP = "3 to 128 letters, digits, '.', '_' and '-', starting with a letter or digit"


@dataclass(frozen=True)
class GpurunImage:
    id: str
    name: str
    state: str
    created: str
    arch: str
    size_gb: int
    snapshots: list[str]
    source_ami: str
    source_run: str
    setup_hash: str
    stored_bytes: int | None = None  # what the snapshots hold, when AWS says

    def monthly_usd(self) -> float:
        gigabytes = self.stored_bytes / 1e9 if self.stored_bytes is not None else float(self.size_gb)
        return round(gigabytes * SNAPSHOT_USD_PER_GB_MONTH, 2)

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "id": self.id,
            "state": self.state,
            "created_at": self.created,
            "arch": self.arch,
            "size_gb": self.size_gb,
            "snapshots": list(self.snapshots),
            "source_ami": self.source_ami,
            "source_run": self.source_run,
            "setup_hash": self.setup_hash,
            "monthly_usd": self.monthly_usd(),
        }


def check_name(name: str) -> str:
    if not IMAGE_NAME.fullmatch(name):
        shown = name if len(name) <= 60 else name[:57] + "..."
        raise BadInput(f"image name {shown!r} is not usable: {IMAGE_NAME_HELP}")
    return name


def image_tags(name: str, run: str, owner: str, source_ami: str, setup_hash: str) -> list[requests.Tag]:
    value = requests._tag_value
    return [
        {"Key": requests.TAG_MANAGED, "Value": "true"},
        {"Key": TAG_IMAGE, "Value": value(name)},
        {"Key": TAG_SOURCE_AMI, "Value": value(source_ami)},
        {"Key": TAG_SOURCE_RUN, "Value": value(run)},
        {"Key": TAG_SETUP_HASH, "Value": value(setup_hash)},
        {"Key": requests.TAG_OWNER, "Value": value(owner) or "unknown"},
        {"Key": "Name", "Value": value(name)},
    ]


def _from_described(image: Mapping[str, Any]) -> GpurunImage:
    tags = requests.tag_dict(image.get("Tags"))
    snapshots = []
    size = 0
    for mapping in image.get("BlockDeviceMappings") or []:
        ebs = mapping.get("Ebs") or {}
        if ebs.get("SnapshotId"):
            snapshots.append(ebs["SnapshotId"])
        size += int(ebs.get("VolumeSize") or 0)
    return GpurunImage(
        id=image["ImageId"],
        name=str(image.get("Name") or tags.get(TAG_IMAGE) or "(no name)"),
        state=str(image.get("State") or "unknown"),
        created=str(image.get("CreationDate") or ""),
        arch=str(image.get("Architecture") or "x86_64"),
        size_gb=size,
        snapshots=snapshots,
        source_ami=tags.get(TAG_SOURCE_AMI, ""),
        source_run=tags.get(TAG_SOURCE_RUN, ""),
        setup_hash=tags.get(TAG_SETUP_HASH, ""),
    )


def _managed_filter() -> list[FilterTypeDef]:
    return [{"Name": f"tag:{requests.TAG_MANAGED}", "Values": ["true"]}]


def list_images(aws: Aws, *, with_sizes: bool = False) -> list[GpurunImage]:
    """This account's gpurun images in the region, newest first."""
    found = aws.ec2.describe_images(Owners=["self"], Filters=_managed_filter()).get("Images", [])
    images = [_from_described(item) for item in found if requests.tag_dict(item.get("Tags")).get(TAG_IMAGE)]
    if with_sizes:
        sizes = _snapshot_bytes(aws, [snap for image in images for snap in image.snapshots])
        images = [
            GpurunImage(**{**image.__dict__, "stored_bytes": _sum_known(sizes, image.snapshots)}) for image in images
        ]
    return sorted(images, key=lambda image: image.created, reverse=True)


def _sum_known(sizes: dict[str, int], snapshots: list[str]) -> int | None:
    if not snapshots or any(snap not in sizes for snap in snapshots):
        return None
    return sum(sizes[snap] for snap in snapshots)


def _snapshot_bytes(aws: Aws, snapshot_ids: list[str]) -> dict[str, int]:
    """FullSnapshotSizeInBytes where AWS reports it (the billed size is at most this)."""
    if not snapshot_ids:
        return {}
    try:
        found = aws.ec2.describe_snapshots(SnapshotIds=snapshot_ids).get("Snapshots", [])
    except botocore.exceptions.ClientError:
        return {}
    return {
        item["SnapshotId"]: int(item["FullSnapshotSizeInBytes"]) for item in found if "FullSnapshotSizeInBytes" in item
    }


def find_image(aws: Aws, name: str) -> GpurunImage | None:
    found = aws.ec2.describe_images(
        Owners=["self"], Filters=[*_managed_filter(), {"Name": "name", "Values": [name]}]
    ).get("Images", [])
    images = [_from_described(item) for item in found if item.get("Name") == name]
    return images[0] if images else None


def create_image(aws: Aws, instance_id: str, name: str, tags: list[requests.Tag], description: str) -> str:
    """CreateImage without a reboot: the job keeps running; the disk is as the caller left it (synced)."""
    answer = aws.ec2.create_image(
        InstanceId=instance_id,
        Name=name,
        Description=description[:255],
        NoReboot=True,
        TagSpecifications=requests.tag_specifications(["image"], tags),
    )
    return str(answer["ImageId"])


def tag_snapshots(aws: Aws, image_id: str, tags: list[requests.Tag]) -> list[str]:
    """Tag the image's snapshots (CreateImage tags only the image here); returns their ids."""
    described = aws.ec2.describe_images(ImageIds=[image_id]).get("Images", [])
    snapshots = _from_described(described[0]).snapshots if described else []
    if snapshots:
        aws.ec2.create_tags(Resources=snapshots, Tags=requests.ec2_tags(tags))
    return snapshots


def wait_available(
    aws: Aws,
    image_id: str,
    on_progress: Callable[[str], None],
    *,
    poll: float = 5.0,
    sleep: Callable[[float], None] = time.sleep,
) -> GpurunImage:
    """Until the image is `available`; raises GpurunError when AWS says it failed."""
    while True:
        described = aws.ec2.describe_images(ImageIds=[image_id]).get("Images", [])
        if not described:
            raise GpurunError(f"image {image_id} vanished while it was being created")
        image = _from_described(described[0])
        if image.state == "available":
            return image
        if image.state in ("failed", "error", "invalid", "deregistered"):
            reason = (described[0].get("StateReason") or {}).get("Message") or image.state
            raise GpurunError(f"image {image_id} failed: {reason}")
        progress = _snapshot_progress(aws, image.snapshots)
        on_progress(f"image {image_id} {image.state}" + (f", snapshot {progress}" if progress else ""))
        sleep(poll)


def _snapshot_progress(aws: Aws, snapshot_ids: list[str]) -> str:
    if not snapshot_ids:
        return ""
    try:
        found = aws.ec2.describe_snapshots(SnapshotIds=snapshot_ids).get("Snapshots", [])
    except botocore.exceptions.ClientError:
        return ""
    return ", ".join(str(item.get("Progress") or "?") for item in found)


def delete_image(aws: Aws, image_id: str, snapshots: list[str] | None = None) -> list[str]:
    """Deregister a gpurun image and delete its snapshots; quiet about what is already gone."""
    removed: list[str] = []
    if snapshots is None:
        described = _describe_quietly(aws, image_id)
        snapshots = _from_described(described).snapshots if described else []
    try:
        aws.ec2.deregister_image(ImageId=image_id)
        removed.append(f"image {image_id}")
    except botocore.exceptions.ClientError as error:
        if not client_error_code(error).startswith("InvalidAMIID"):
            raise GpurunError(f"deregistering {image_id} failed: {client_error_message(error)}") from None
    for snapshot in snapshots:
        try:
            aws.ec2.delete_snapshot(SnapshotId=snapshot)
            removed.append(f"snapshot {snapshot}")
        except botocore.exceptions.ClientError as error:
            if client_error_code(error) != "InvalidSnapshot.NotFound":
                raise GpurunError(f"deleting snapshot {snapshot} failed: {client_error_message(error)}") from None
    return removed


def used_by_groups(aws: Aws) -> dict[str, list[str]]:
    """image id -> the runs whose recovery launch template boots it (deregistering it would stop replacements)."""
    from gpurun.providers.aws.group import templates_of

    used: dict[str, list[str]] = {}
    for template in templates_of(aws, None):
        try:
            versions = aws.ec2.describe_launch_template_versions(
                LaunchTemplateId=template["LaunchTemplateId"], Versions=["$Latest", "$Default"]
            ).get("LaunchTemplateVersions", [])
        except botocore.exceptions.ClientError:
            continue
        run = requests.tag_dict(template.get("Tags")).get(requests.TAG_RUN, template.get("LaunchTemplateName", "?"))
        for version in versions:
            image_id = (version.get("LaunchTemplateData") or {}).get("ImageId")
            if image_id and run not in used.setdefault(image_id, []):
                used[image_id].append(run)
    return used


def _describe_quietly(aws: Aws, image_id: str) -> ImageTypeDef | None:
    try:
        found = aws.ec2.describe_images(ImageIds=[image_id]).get("Images", [])
    except botocore.exceptions.ClientError:
        return None
    return found[0] if found else None


def orphan_snapshots(aws: Aws) -> list[dict[str, Any]]:
    """gpurun-tagged snapshots of this account that no image (gpurun's or not, any state) refers to."""
    snapshots = aws.ec2.describe_snapshots(OwnerIds=["self"], Filters=_managed_filter()).get("Snapshots", [])
    if not snapshots:
        return []
    used = {
        (mapping.get("Ebs") or {}).get("SnapshotId")
        for image in aws.ec2.describe_images(Owners=["self"]).get("Images", [])
        for mapping in image.get("BlockDeviceMappings") or []
    }
    return [
        {
            "kind": "snapshot",
            "id": item["SnapshotId"],
            "region": aws.region,
            "run": requests.tag_dict(item.get("Tags")).get(TAG_SOURCE_RUN, ""),
            "owner": requests.tag_dict(item.get("Tags")).get(requests.TAG_OWNER),
            "size_gb": item.get("VolumeSize"),
        }
        for item in snapshots
        if item["SnapshotId"] not in used and item.get("State") != "pending"
    ]


def image_entries(aws: Aws) -> list[dict[str, Any]]:
    """Each gpurun image, for teardown --orphans to list (never to remove)."""
    return [
        {
            "kind": "image",
            "id": image.id,
            "name": image.name,
            "region": aws.region,
            "run": image.source_run,
            "owner": None,
            "kept": True,
        }
        for image in list_images(aws)
    ]


def delete_snapshot(aws: Aws, snapshot_id: str) -> str | None:
    """Delete one gpurun snapshot after checking its tag; None when it is already gone."""
    try:
        found = aws.ec2.describe_snapshots(SnapshotIds=[snapshot_id]).get("Snapshots", [])
    except botocore.exceptions.ClientError as error:
        if client_error_code(error) == "InvalidSnapshot.NotFound":
            return None
        raise
    if not found or requests.tag_dict(found[0].get("Tags")).get(requests.TAG_MANAGED) != "true":
        return None
    aws.ec2.delete_snapshot(SnapshotId=snapshot_id)
    return f"snapshot {snapshot_id}"


# -- choosing an image for a launch ---------------------------------------------------------------


@dataclass(frozen=True)
class ImageChoice:
    ami: AmiInfo
    image: GpurunImage | None  # the gpurun image used, if any
    skip_setup: bool
    reason: str  # one line for the plan: which image and why


def choose(aws: Aws, ami: str, fallback: str, arch: str, wanted_hash: str, hashed_files: list[str]) -> ImageChoice:
    """`image:<name>` or `auto` to an image, and whether its setup hash lets the launch skip setup."""
    inputs = "setup" + (" + " + ", ".join(hashed_files) if hashed_files else "")
    short = wanted_hash[:12]
    if ami.startswith("image:"):
        name = ami[len("image:") :]
        image = find_image(aws, name)
        if image is None:
            raise BadInput(f"aws.ami: no gpurun image named {name!r} in {aws.region}; `gpurun image list` shows them")
        info = _checked_info(aws, image, arch)
        if image.setup_hash == wanted_hash:
            return ImageChoice(info, image, True, f"{name}: setup hash {short} ({inputs}) matches; setup is skipped")
        return ImageChoice(
            info,
            image,
            False,
            f"{name}: its setup hash {image.setup_hash[:12] or '(none)'} differs from {short} ({inputs}); setup runs",
        )
    matching = [
        image
        for image in list_images(aws)
        if image.setup_hash == wanted_hash and image.state == "available" and image.arch == arch
    ]
    if matching:
        image = matching[0]  # newest first
        info = _checked_info(aws, image, arch)
        return ImageChoice(
            info, image, True, f"auto: {image.name} is the newest image with setup hash {short}; setup is skipped"
        )
    info = resolve_ami(aws, fallback, arch)
    return ImageChoice(
        info,
        None,
        False,
        f"auto: no gpurun image has setup hash {short} ({inputs}); aws.ami_fallback {fallback}, setup runs",
    )


def resolve_spec_ami(aws: Aws, spec: Spec, arch: str) -> tuple[AmiInfo, ImageChoice | None]:
    """The spec's `aws.ami` for `arch`; with `image:<name>` or `auto`, also which gpurun image and why."""
    settings = spec.aws
    if settings.ami != "auto" and not settings.ami.startswith("image:"):
        return resolve_ami(aws, settings.ami, arch), None
    wanted, hashed = setup_hash(spec.setup, local_reader(str(spec.workdir_path)))
    choice = choose(aws, settings.ami, settings.ami_fallback, arch, wanted, hashed)
    return choice.ami, choice


def _checked_info(aws: Aws, image: GpurunImage, arch: str) -> AmiInfo:
    found = _describe_quietly(aws, image.id)
    if found is None:
        raise BadInput(f"aws.ami: gpurun image {image.name} ({image.id}) is gone")
    info = _image_info(found, f"gpurun image {image.name}")
    if info.arch != arch:
        raise BadInput(f"aws.ami: {image.name} ({image.id}) is {info.arch} but the instance type needs {arch}")
    return info


def age_days(created: str, now: datetime | None = None) -> float | None:
    try:
        when = datetime.fromisoformat(created.replace("Z", "+00:00"))
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return ((now or datetime.now(timezone.utc)) - when).total_seconds() / 86400
