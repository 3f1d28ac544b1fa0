"""What an instance type offers (GPUs, architecture, vCPUs), from describe_instance_types."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import botocore.exceptions

from gpurun.errors import BadInput
from gpurun.providers.aws.session import Aws, client_error_code, client_error_message

if TYPE_CHECKING:
    from mypy_boto3_ec2.literals import InstanceTypeType


@dataclass(frozen=True)
class TypeInfo:
    name: str
    arch: str
    vcpus: int
    memory_mib: int
    gpu_model: str | None
    gpu_count: int
    gpu_memory_mib: int
    cluster_placement: bool
    spot_supported: bool

    @property
    def has_gpu(self) -> bool:
        return self.gpu_count > 0

    def describe(self) -> str:
        memory = f"{self.memory_mib / 1024:g} GiB RAM"
        gpu = f"{self.gpu_count}x {self.gpu_model} {self.gpu_memory_mib / 1024:.0f} GiB" if self.has_gpu else "no GPU"
        return f"{gpu}, {self.vcpus} vCPUs, {memory}, {self.arch}"


def _parse(item: Mapping[str, Any]) -> TypeInfo:
    arches = item.get("ProcessorInfo", {}).get("SupportedArchitectures", []) or ["x86_64"]
    arch = "arm64" if "arm64" in arches and "x86_64" not in arches else "x86_64"
    gpus = item.get("GpuInfo", {}).get("Gpus", []) or []
    count = sum(int(gpu.get("Count", 0)) for gpu in gpus)
    model = None
    if gpus:
        first = gpus[0]
        model = " ".join(part for part in (first.get("Manufacturer"), first.get("Name")) if part) or None
    memory = int(item.get("GpuInfo", {}).get("TotalGpuMemoryInMiB", 0) or 0)
    strategies = item.get("PlacementGroupInfo", {}).get("SupportedStrategies", []) or []
    usage = item.get("SupportedUsageClasses", []) or []
    return TypeInfo(
        name=item["InstanceType"],
        arch=arch,
        vcpus=int(item.get("VCpuInfo", {}).get("DefaultVCpus", 0) or 0),
        memory_mib=int(item.get("MemoryInfo", {}).get("SizeInMiB", 0) or 0),
        gpu_model=model,
        gpu_count=count,
        gpu_memory_mib=memory,
        cluster_placement="cluster" in strategies,
        spot_supported="spot" in usage,
    )


def _type_names(names: list[str]) -> list[InstanceTypeType]:
    """The spec's names as the stubs' literal type: AWS, not the stubs' list of its day, says which exist."""
    return cast("list[InstanceTypeType]", names)


def describe_types(aws: Aws, names: list[str]) -> dict[str, TypeInfo]:
    """Info for every type in `names`; a type that does not exist is BadInput."""
    unique = list(dict.fromkeys(names))
    try:
        answer = aws.ec2.describe_instance_types(InstanceTypes=_type_names(unique))
    except botocore.exceptions.ClientError as error:
        if client_error_code(error) in ("InvalidInstanceType", "InvalidParameterValue"):
            missing = _find_missing(aws, unique)
            listed = ", ".join(missing) if missing else ", ".join(unique)
            raise BadInput(
                f"aws.instance_type: {listed} does not exist in {aws.region}; use a type such as g5.xlarge or g6.xlarge"
            ) from None
        raise BadInput(f"aws.instance_type: cannot check {', '.join(unique)}: {client_error_message(error)}") from None
    found: dict[str, TypeInfo] = {item["InstanceType"]: _parse(item) for item in answer.get("InstanceTypes", [])}
    missing = [name for name in unique if name not in found]
    if missing:
        raise BadInput(f"aws.instance_type: {', '.join(missing)} does not exist in {aws.region}")
    return found


def _find_missing(aws: Aws, names: list[str]) -> list[str]:
    missing = []
    for name in names:
        try:
            aws.ec2.describe_instance_types(InstanceTypes=_type_names([name]))
        except botocore.exceptions.ClientError:
            missing.append(name)
    return missing


def zones_offering(aws: Aws, names: list[str]) -> dict[str, set[str]]:
    """Availability zones where each type is offered (empty dict when the call is not allowed)."""
    try:
        paginator = aws.ec2.get_paginator("describe_instance_type_offerings")
        offered: dict[str, set[str]] = {name: set() for name in names}
        for page in paginator.paginate(
            LocationType="availability-zone",
            Filters=[{"Name": "instance-type", "Values": list(names)}],
        ):
            for item in page.get("InstanceTypeOfferings", []):
                offered.setdefault(item["InstanceType"], set()).add(item["Location"])
        return offered
    except botocore.exceptions.ClientError:
        return {}
