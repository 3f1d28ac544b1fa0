"""Pure builders for a recovering run on AWS: launch template, Auto Scaling group, guard, role scope.

A run with `recovery.max_restarts` > 0 does not call RunInstances: its machine
belongs to an Auto Scaling group, so AWS itself replaces a reclaimed spot
machine, and the new machine bootstraps from the store (`gpurun.bootstrap`).

Every security default of a plain launch is in the launch template (IMDSv2
required, encrypted gp3 root volume, the run's security group and scoped
instance profile, tags on instance, volume and network interface). What is
different, and why:

- no `InstanceInitiatedShutdownBehavior=terminate` and no power-off guard in
  user data: the group would replace a machine that ends itself, and bill
  forever. The max_runtime guard is a scheduled action on the group instead
  (capacity 0, max 0 at launch + max_runtime), enforced by AWS.
- no market options in the template: a group with a mixed instances policy
  refuses a template that asks for spot; spot or on-demand is the group's
  `InstancesDistribution`.
- the template's instance type is only the first of the spec's types: the
  policy's overrides, which list them all in failover order, take precedence.

Nothing here imports boto3.
"""

from __future__ import annotations

import base64
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from gpurun.providers.aws.requests import (
    block_device_mappings,
    resource_name,
    tag_specifications,
    tags,
)

if TYPE_CHECKING:
    from mypy_boto3_ec2.literals import ResourceTypeType

#: The role's inline policy that lets a machine scale its own group.
GROUP_POLICY_NAME = "gpurun-own-group"
#: The scheduled action that ends the group's machines at launch + max_runtime.
GUARD_ACTION = "gpurun-max-runtime"
#: Resource types the template tags at launch (a spot request is the group's, not ours to tag).
TEMPLATE_TAGGED: list[ResourceTypeType] = ["instance", "volume", "network-interface"]
#: What a machine may do to its own group (and nothing else): scale it to 0 when the run is over,
#: and end itself without lowering the capacity (a machine to replace).
GROUP_ACTIONS = ["autoscaling:SetDesiredCapacity", "autoscaling:TerminateInstanceInAutoScalingGroup"]


def group_name(run: str) -> str:
    return resource_name(run)


def template_name(run: str) -> str:
    return resource_name(run)


def launch_template_data(
    *,
    run: str,
    owner: str,
    ami_id: str,
    instance_type: str,
    root_device: str,
    disk_gb: int,
    key_name: str,
    security_group_id: str,
    instance_profile: str | None,
    user_data: str,
    associate_public_ip: bool = True,
) -> dict[str, Any]:
    """LaunchTemplateData: every machine of the group starts with these defaults."""
    data: dict[str, Any] = {
        "ImageId": ami_id,
        "InstanceType": instance_type,
        "KeyName": key_name,
        "UserData": base64.b64encode(user_data.encode()).decode(),
        "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled", "HttpPutResponseHopLimit": 1},
        "BlockDeviceMappings": block_device_mappings(root_device, disk_gb),
        "TagSpecifications": tag_specifications(TEMPLATE_TAGGED, tags(run, owner)),
        # The group picks the subnet; the interface carries the run's group and a public address.
        "NetworkInterfaces": [
            {
                "DeviceIndex": 0,
                "AssociatePublicIpAddress": associate_public_ip,
                "DeleteOnTermination": True,
                "Groups": [security_group_id],
            }
        ],
    }
    if instance_profile:
        data["IamInstanceProfile"] = {"Name": instance_profile}
    return data


def create_launch_template_kwargs(run: str, owner: str, data: dict[str, Any]) -> dict[str, Any]:
    return {
        "LaunchTemplateName": template_name(run),
        "VersionDescription": f"gpurun run {run}",
        "LaunchTemplateData": data,
        "TagSpecifications": tag_specifications(["launch-template"], tags(run, owner)),
    }


def _spot_price(max_price: float | None) -> str | None:
    if max_price is None:
        return None
    return f"{max_price:.6f}".rstrip("0").rstrip(".") or "0"


def auto_scaling_group_kwargs(
    *,
    run: str,
    owner: str,
    instance_types: list[str],
    subnet_ids: list[str],
    nodes: int,
    spot: bool,
    max_price: float | None = None,
) -> dict[str, Any]:
    """CreateAutoScalingGroup: `nodes` machines over every allowed subnet, the types in failover order."""
    distribution: dict[str, Any] = {
        # On-demand: the first type that has capacity, in the spec's order.
        "OnDemandAllocationStrategy": "prioritized",
        "OnDemandBaseCapacity": 0,
        "OnDemandPercentageAboveBaseCapacity": 0 if spot else 100,
        "SpotAllocationStrategy": "price-capacity-optimized",
    }
    price = _spot_price(max_price) if spot else None
    if price is not None:
        distribution["SpotMaxPrice"] = price
    name = group_name(run)
    return {
        "AutoScalingGroupName": name,
        "MinSize": 0,
        "MaxSize": nodes,
        "DesiredCapacity": nodes,
        "VPCZoneIdentifier": ",".join(dict.fromkeys(subnet_ids)),
        "MixedInstancesPolicy": {
            "LaunchTemplate": {
                "LaunchTemplateSpecification": {"LaunchTemplateName": template_name(run), "Version": "$Latest"},
                "Overrides": [{"InstanceType": name_} for name_ in dict.fromkeys(instance_types)],
            },
            "InstancesDistribution": distribution,
        },
        # A spot machine at elevated risk is replaced before it is reclaimed.
        "CapacityRebalance": bool(spot),
        "NewInstancesProtectedFromScaleIn": False,
        # The template tags instances and volumes; the group's own tags find it at teardown.
        "Tags": [
            {
                "ResourceId": name,
                "ResourceType": "auto-scaling-group",
                "Key": item["Key"],
                "Value": item["Value"],
                "PropagateAtLaunch": False,
            }
            for item in tags(run, owner)
        ],
    }


def guard_time(launched_at: datetime, max_runtime: float) -> datetime:
    """When the scheduled action ends the group: launch + max_runtime, to the second."""
    if launched_at.tzinfo is None:
        launched_at = launched_at.replace(tzinfo=timezone.utc)
    return datetime.fromtimestamp(int(launched_at.timestamp() + max_runtime), timezone.utc)


def scheduled_guard_kwargs(run: str, at: datetime) -> dict[str, Any]:
    """PutScheduledUpdateGroupAction: capacity and maximum 0 at `at`; nothing can start a machine after."""
    return {
        "AutoScalingGroupName": group_name(run),
        "ScheduledActionName": GUARD_ACTION,
        "StartTime": at,
        "MinSize": 0,
        "MaxSize": 0,
        "DesiredCapacity": 0,
    }


def group_arn_pattern(run: str, *, region: str, account: str, partition: str = "aws") -> str:
    """The group's ARN with its id wildcarded (the id is known only after creation)."""
    return f"arn:{partition}:autoscaling:{region}:{account}:autoScalingGroup:*:autoScalingGroupName/{group_name(run)}"


def own_group_statement(run: str, *, region: str, account: str, partition: str = "aws") -> dict[str, Any]:
    """The role statement that lets a machine scale its own group to 0, or end itself, and nothing else."""
    return {
        "Sid": "OwnGroup",
        "Effect": "Allow",
        "Action": list(GROUP_ACTIONS),
        "Resource": group_arn_pattern(run, region=region, account=account, partition=partition),
    }


def plan_rows(
    *,
    run: str,
    instance_types: list[str],
    zones: list[str],
    spot: bool,
    nodes: int,
    max_runtime_text: str,
    idle_timeout_text: str | None,
    max_restarts: int,
    on_failure: bool,
) -> list[tuple[str, str]]:
    market = "spot, price-capacity-optimized" if spot else "on-demand, in order"
    guard = f"group scaled to 0 after {max_runtime_text} (scheduled action {GUARD_ACTION})"
    if idle_timeout_text:
        guard += f", or by its machine {idle_timeout_text} after the job ends"
    else:
        guard += "; idle_timeout off: the machine stays after the job ends"
    restarts = f"{max_restarts} (a lost machine{' or a failed job' if on_failure else ''} restarts from LATEST)"
    return [
        ("auto scaling group", f"{group_name(run)}: {nodes} machine(s), replaced by AWS when lost"),
        ("types", f"{', '.join(instance_types)} ({market})"),
        ("zones", ", ".join(zones) or "-"),
        ("guard", guard),
        ("restart budget", restarts),
    ]
