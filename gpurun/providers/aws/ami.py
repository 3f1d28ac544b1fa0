"""Resolve the spec's `aws.ami` to one image: ami-..., ssm:/path, name:<pattern>@<owner>, or a DLAMI alias.

Deep Learning AMIs are never hard-coded: the public SSM parameters under
/aws/service/deeplearning/ami/<arch>/ are listed and the newest matching one
is taken.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import botocore.exceptions

from gpurun.errors import BadInput
from gpurun.providers.aws.session import Aws, client_error_code, client_error_message

DLAMI_ROOT = "/aws/service/deeplearning/ami"

# .../oss-nvidia-driver-gpu-pytorch-2.7-ubuntu-22.04/latest/ami-id
_PYTORCH = re.compile(
    r"/(?P<kind>[a-z0-9-]*nvidia[a-z0-9-]*-pytorch-(?P<fw>\d+(?:\.\d+)*)-(?:[a-z0-9]+-)*?ubuntu-(?P<os>\d+(?:\.\d+)*))"
    r"/latest/ami-id$"
)
# .../base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id
_BASE = re.compile(r"/(?P<kind>base-oss-nvidia-driver-gpu-(?:[a-z0-9]+-)*?ubuntu-(?P<os>\d+(?:\.\d+)*))/latest/ami-id$")
ALIASES = {"dlami-pytorch": _PYTORCH, "dlami-base": _BASE}


@dataclass(frozen=True)
class AmiInfo:
    id: str
    name: str
    created: str
    arch: str
    root_device: str
    snapshot_gb: int
    owner: str
    source: str

    def describe(self) -> str:
        date = self.created[:10] if self.created else "date unknown"
        return f"{self.id} {self.name} ({date}; {self.source})"


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".") if part.isdigit())


def _parse_time(text: str | None) -> datetime | None:
    if not text:
        return None
    try:
        value = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def _image_info(image: Mapping[str, Any], source: str, field: str = "aws.ami") -> AmiInfo:
    image_id = image["ImageId"]
    name = image.get("Name") or "(no name)"
    state = image.get("State", "available")
    if state != "available":
        raise BadInput(f"{field}: {image_id} ({name}) is {state}, not available")
    deprecated = _parse_time(image.get("DeprecationTime"))
    if deprecated and deprecated <= datetime.now(timezone.utc):
        raise BadInput(
            f"{field}: {image_id} ({name}) is deprecated since {deprecated.date()}; "
            "use dlami-pytorch, dlami-base or a newer image"
        )
    root_device = image.get("RootDeviceName") or "/dev/sda1"
    snapshot_gb = 0
    for mapping in image.get("BlockDeviceMappings", []) or []:
        if mapping.get("DeviceName") == root_device and "Ebs" in mapping:
            snapshot_gb = int(mapping["Ebs"].get("VolumeSize") or 0)
    if image.get("RootDeviceType", "ebs") != "ebs":
        raise BadInput(f"{field}: {image_id} ({name}) has no EBS root volume; use an EBS-backed image")
    return AmiInfo(
        id=image_id,
        name=name,
        created=image.get("CreationDate", ""),
        arch=image.get("Architecture", "x86_64"),
        root_device=root_device,
        snapshot_gb=snapshot_gb,
        owner=image.get("OwnerId", ""),
        source=source,
    )


def describe_image(aws: Aws, image_id: str, source: str) -> AmiInfo:
    try:
        images = aws.ec2.describe_images(ImageIds=[image_id]).get("Images", [])
    except botocore.exceptions.ClientError as error:
        code = client_error_code(error)
        if code.startswith("InvalidAMIID"):
            raise BadInput(f"aws.ami: {image_id} does not exist in {aws.region} (or is not shared with you)") from None
        raise BadInput(f"aws.ami: cannot look up {image_id}: {client_error_message(error)}") from None
    if not images:
        raise BadInput(f"aws.ami: {image_id} does not exist in {aws.region} (or is not shared with you)")
    return _image_info(images[0], source)


def _from_ssm(aws: Aws, path: str) -> AmiInfo:
    try:
        value = aws.ssm.get_parameter(Name=path)["Parameter"]["Value"]
    except botocore.exceptions.ClientError as error:
        code = client_error_code(error)
        if code in ("ParameterNotFound", "ValidationException", "AccessDeniedException"):
            raise BadInput(f"aws.ami: SSM parameter {path} not found in {aws.region} ({code})") from None
        raise BadInput(f"aws.ami: cannot read SSM parameter {path}: {client_error_message(error)}") from None
    value = value.strip()
    if not re.fullmatch(r"ami-[0-9a-f]{8,17}", value):
        raise BadInput(f"aws.ami: SSM parameter {path} holds {value[:40]!r}, not an AMI id")
    return describe_image(aws, value, f"ssm:{path}")


def _from_name(aws: Aws, spec: str) -> AmiInfo:
    pattern, _, owner = spec[len("name:") :].rpartition("@")
    if not pattern or not owner:
        raise BadInput(
            f"aws.ami: {spec!r} must look like name:<pattern>@<owner>, e.g. name:ubuntu/images/*@099720109477"
        )
    try:
        images = aws.ec2.describe_images(Owners=[owner], Filters=[{"Name": "name", "Values": [pattern]}]).get(
            "Images", []
        )
    except botocore.exceptions.ClientError as error:
        raise BadInput(f"aws.ami: cannot search {spec!r}: {client_error_message(error)}") from None
    now = datetime.now(timezone.utc)
    usable = [
        image
        for image in images
        if image.get("State", "available") == "available"
        and not ((_parse_time(image.get("DeprecationTime")) or datetime.max.replace(tzinfo=timezone.utc)) <= now)
    ]
    if not usable:
        raise BadInput(f"aws.ami: no available image named {pattern!r} owned by {owner} in {aws.region}")
    newest = max(usable, key=lambda image: image.get("CreationDate", ""))
    return _image_info(newest, f"newest of {len(usable)} matching {pattern!r}@{owner}")


def dlami_parameters(aws: Aws, arch: str) -> list[tuple[str, str]]:
    """(name, value) of every public DLAMI parameter for `arch`."""
    path = f"{DLAMI_ROOT}/{arch}"
    found: list[tuple[str, str]] = []
    try:
        paginator = aws.ssm.get_paginator("get_parameters_by_path")
        for page in paginator.paginate(Path=path, Recursive=True):
            for parameter in page.get("Parameters", []):
                found.append((parameter["Name"], parameter.get("Value", "")))
    except botocore.exceptions.ClientError as error:
        raise BadInput(f"aws.ami: cannot list Deep Learning AMIs under {path}: {client_error_message(error)}") from None
    return found


def pick_dlami(alias: str, parameters: list[tuple[str, str]]) -> tuple[str, str] | None:
    """The newest (name, ami id) for the alias: highest framework version, then Ubuntu version."""
    pattern = ALIASES[alias]
    best: tuple[tuple[tuple[int, ...], tuple[int, ...]], str, str] | None = None
    for name, value in parameters:
        match = pattern.search(name)
        if not match or "neuron" in name:
            continue
        groups = match.groupdict()
        key = (_version(groups.get("fw") or "0"), _version(groups["os"]))
        if best is None or key > best[0]:
            best = (key, name, value)
    return (best[1], best[2]) if best else None


def _from_alias(aws: Aws, alias: str, arch: str) -> AmiInfo:
    parameters = dlami_parameters(aws, arch)
    picked = pick_dlami(alias, parameters)
    if picked is None:
        raise BadInput(
            f"aws.ami: no {alias} Deep Learning AMI for {arch} in {aws.region} "
            f"(looked under {DLAMI_ROOT}/{arch}); give ami-... or ssm:/path instead"
        )
    name, value = picked
    return describe_image(aws, value.strip(), f"ssm:{name}")


def resolve_ami(aws: Aws, spec: str, arch: str) -> AmiInfo:
    """One image for `spec` that boots on `arch` (x86_64 or arm64)."""
    if spec in ALIASES:
        info = _from_alias(aws, spec, arch)
    elif spec.startswith("ssm:"):
        info = _from_ssm(aws, spec[len("ssm:") :])
    elif spec.startswith("name:"):
        info = _from_name(aws, spec)
    else:
        info = describe_image(aws, spec, "given")
    if info.arch != arch:
        raise BadInput(f"aws.ami: {info.id} ({info.name}) is {info.arch} but the instance type needs {arch}")
    return info
