"""The Auto Scaling group of a recovering run: create it, find its machines, remove it.

The requests themselves are built in `recovery` (pure). Removal comes before
everything else at teardown: a group left alive would start a new machine for
every one that teardown terminates.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

import botocore.exceptions

from gpurun.providers.aws import recovery, requests
from gpurun.providers.aws.session import Aws, client_error_code, client_error_message

if TYPE_CHECKING:
    from mypy_boto3_autoscaling.type_defs import ActivityTypeDef, AutoScalingGroupTypeDef
    from mypy_boto3_autoscaling.type_defs import InstanceTypeDef as GroupInstance
    from mypy_boto3_ec2.type_defs import InstanceTypeDef, LaunchTemplateTypeDef

    from gpurun.providers.aws.teardown import Outcome, Timing

Say = Callable[[str], None]

_GONE_CODES = {"ValidationError", "InvalidLaunchTemplateName.NotFoundException", "InvalidLaunchTemplateId.NotFound"}


def groups_of(aws: Aws, run: str | None) -> list[AutoScalingGroupTypeDef]:
    """gpurun's groups (of one run, or all), checked by their own tags."""
    autoscaling = aws.client("autoscaling")
    found = []
    for page in autoscaling.get_paginator("describe_auto_scaling_groups").paginate(Filters=requests.run_filters(run)):
        for group in page.get("AutoScalingGroups", []):
            if requests.is_managed(group.get("Tags"), run):
                found.append(group)
    return found


def templates_of(aws: Aws, run: str | None) -> list[LaunchTemplateTypeDef]:
    found = []
    for page in aws.ec2.get_paginator("describe_launch_templates").paginate(Filters=requests.run_filters(run)):
        for template in page.get("LaunchTemplates", []):
            if requests.is_managed(template.get("Tags"), run):
                found.append(template)
    if run is not None and not found:
        # A template whose tags a reader cannot filter on is still found by its name, then checked.
        try:
            answer = aws.ec2.describe_launch_templates(LaunchTemplateNames=[recovery.template_name(run)])
        except botocore.exceptions.ClientError:
            return []
        found = [item for item in answer.get("LaunchTemplates", []) if requests.is_managed(item.get("Tags"), run)]
    return found


def group_instances(aws: Aws, run: str) -> list[GroupInstance]:
    """The instances the run's group holds now (any lifecycle state)."""
    instances: list[GroupInstance] = []
    for group in groups_of(aws, run):
        instances.extend(group.get("Instances", []))
    return instances


def create(
    aws: Aws,
    *,
    run: str,
    owner: str,
    template_data: dict[str, Any],
    group_kwargs: dict[str, Any],
    guard_at: datetime,
    created: Callable[[str, Any], None],
) -> None:
    """Launch template, group, scheduled guard; `created(key, value)` records each the moment it exists."""
    aws.ec2.create_launch_template(**recovery.create_launch_template_kwargs(run, owner, template_data))
    created("launch_template", recovery.template_name(run))
    autoscaling = aws.client("autoscaling")
    autoscaling.create_auto_scaling_group(**group_kwargs)
    created("auto_scaling_group", recovery.group_name(run))
    autoscaling.put_scheduled_update_group_action(**recovery.scheduled_guard_kwargs(run, guard_at))
    created("scheduled_action", f"{recovery.GUARD_ACTION} at {guard_at.isoformat()}")


def wait_first_instance(
    aws: Aws,
    run: str,
    *,
    timeout: float,
    interval: float,
    sleep: Callable[[float], None],
    say: Say,
    keep_waiting: bool = False,
    instance_types: list[str] | None = None,
) -> InstanceTypeDef:
    """The group's first running instance (described), printing each of the group's scaling
    activities once as it appears; NoCapacity after `timeout` with what AWS tried (StillWaiting with
    `keep_waiting`: the caller leaves the group trying)."""
    from gpurun.errors import NoCapacity, StillWaiting
    from gpurun.providers.aws.teardown import describe_by_ids

    name = recovery.group_name(run)
    autoscaling = aws.client("autoscaling")
    activities = ScalingActivities(instance_types or [])
    deadline = time.monotonic() + timeout
    while True:
        answer = autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[name])
        ids = [
            item["InstanceId"] for group in answer.get("AutoScalingGroups", []) for item in group.get("Instances", [])
        ]
        if ids:
            found = describe_by_ids(aws, ids)
            running = [found[key] for key in ids if found.get(key, {}).get("State", {}).get("Name") == "running"]
            if running:
                return running[0]
        for line in activities.feed(_activities(aws, run)):
            say(f"group {name}: {line}")
        if time.monotonic() >= deadline:
            message = f"the group {name} started no machine in {timeout:.0f}s"
            tried = activities.tried()
            if tried:
                message += f"; {tried}"
            if activities.last:
                message += f"; last scaling activity: {activities.last}"
            if keep_waiting:
                raise StillWaiting(
                    f"{message}. The group keeps trying: `gpurun status {run}` shows when its machine starts "
                    f"and the job runs, `gpurun teardown {run}` ends it"
                )
            raise NoCapacity(message)
        sleep(interval)


def _activities(aws: Aws, run: str) -> list[ActivityTypeDef]:
    """The group's newest scaling activities (newest first, as AWS lists them); none when unreadable."""
    try:
        answer = aws.client("autoscaling").describe_scaling_activities(
            AutoScalingGroupName=recovery.group_name(run), MaxRecords=100
        )
    except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError):
        return []
    return [item for item in answer.get("Activities", []) if isinstance(item, dict)]


#: A scaling activity's status once it will not change again.
_FINAL = {"Successful", "Failed", "Cancelled"}
#: Words of a failed launch's message that mean AWS had no capacity (or price) for it, not a fault of the spec.
_CAPACITY_WORDS = re.compile(
    r"\b(?:"
    + "|".join([*sorted(requests.CAPACITY_ERRORS), r"sufficient [\w.-]+ capacity", r"no spot capacity"])
    + r")\b",
    re.IGNORECASE,
)
_ZONE = re.compile(r"\b[a-z]{2}(?:-gov|-iso[a-z]?)?-[a-z]+-\d[a-z]\b")


@dataclass
class Failure:
    types: list[str]
    zones: list[str]
    capacity: bool


@dataclass
class ScalingActivities:
    """What launch has shown of a group's scaling activities: each once (by ActivityId), and once more
    when one first seen in progress ends; the failed launches, for what was tried."""

    instance_types: list[str]
    shown: dict[str, str] = field(default_factory=dict)
    failures: dict[str, Failure] = field(default_factory=dict)
    last: str = ""

    def feed(self, activities: Sequence[Mapping[str, Any]]) -> list[str]:
        """Lines for the activities not shown yet (oldest first); AWS lists the newest first."""
        lines = []
        for activity in reversed(activities):
            status = _text(activity.get("StatusCode"), 40) or "?"
            text = _text(activity.get("StatusMessage") or activity.get("Description"), 300)
            key = _text(activity.get("ActivityId"), 100) or f"{activity.get('StartTime')} {text}"
            before = self.shown.get(key)
            if before is not None and (before in _FINAL or status not in _FINAL):
                continue
            self.shown[key] = status
            label = status
            if status == "Failed":
                failure = self.failures[key] = self._failure(activity)
                if failure.capacity:
                    where = ", ".join(failure.types + failure.zones)
                    label = f"Failed (no capacity{': ' + where if where else ''})"
            line = f"{label}: {text}"
            lines.append(line)
            self.last = line
        return lines

    def _failure(self, activity: dict[str, Any]) -> Failure:
        said = " ".join(
            _text(activity.get(name), 2000) for name in ("StatusMessage", "Description", "Cause", "Details")
        )
        types = [name for name in self.instance_types if re.search(rf"(?<![\w.-]){re.escape(name)}(?![\w-])", said)]
        zones = list(dict.fromkeys(_ZONE.findall(said)))
        return Failure(types, zones, bool(_CAPACITY_WORDS.search(said)))

    def tried(self) -> str:
        """What the failed launches tried, by type then zone; "" when none failed."""
        if not self.failures:
            return ""
        by_type: dict[str, list[str]] = {}
        for failure in self.failures.values():
            for name in failure.types or ["type not named"]:
                zones = by_type.setdefault(name, [])
                zones.extend(zone for zone in failure.zones if zone not in zones)
        parts = [f"{name} in {', '.join(zones)}" if zones else name for name, zones in by_type.items()]
        count = len(self.failures)
        return f"{count} failed launch{'es' if count != 1 else ''} tried " + "; ".join(parts)


def _text(value: object, limit: int) -> str:
    """AWS's text, from untrusted JSON: one line, control characters escaped, bounded."""
    from gpurun.text import escape_controls

    return escape_controls(str(value))[:limit] if value is not None else ""


def remove(aws: Aws, run: str, timing: Timing, say: Say, outcome: Outcome) -> bool:
    """Delete the run's scheduled action, group (forced: its machines go too) and launch template.

    True when no group is left (teardown may then terminate the rest without a
    group starting replacements).
    """
    autoscaling = aws.client("autoscaling")
    try:
        groups = groups_of(aws, run)
    except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as error:
        outcome.failed.append(f"listing Auto Scaling groups: {client_error_message(error)}")
        return False
    for group in groups:
        name = group["AutoScalingGroupName"]
        try:
            listed = autoscaling.describe_scheduled_actions(AutoScalingGroupName=name)
            actions = [action["ScheduledActionName"] for action in listed.get("ScheduledUpdateGroupActions", [])]
            say(f"deleting Auto Scaling group {name} and its machines")
            autoscaling.delete_auto_scaling_group(AutoScalingGroupName=name, ForceDelete=True)
        except botocore.exceptions.ClientError as error:
            if client_error_code(error) not in _GONE_CODES:
                outcome.failed.append(f"deleting Auto Scaling group {name}: {client_error_message(error)}")
                outcome.left["auto_scaling_group"] = name
                return False
            actions = []
        outcome.removed.append(f"auto scaling group {name}")
        # Only once the group is going: a group left behind keeps its max_runtime guard. Deleting the
        # group deletes its scheduled actions; asking again costs nothing where it already has.
        for action in actions:
            with contextlib.suppress(botocore.exceptions.ClientError):
                autoscaling.delete_scheduled_action(AutoScalingGroupName=name, ScheduledActionName=action)
            outcome.removed.append(f"scheduled action {action}")
    deadline = time.monotonic() + timing.terminate_timeout
    while groups_of(aws, run):
        if time.monotonic() >= deadline:
            outcome.failed.append(f"Auto Scaling group of {run} still deleting after {timing.terminate_timeout:.0f}s")
            return False
        timing.sleep(timing.poll_interval)
    for template in templates_of(aws, run):
        try:
            aws.ec2.delete_launch_template(LaunchTemplateId=template["LaunchTemplateId"])
        except botocore.exceptions.ClientError as error:
            if client_error_code(error) not in _GONE_CODES:
                outcome.failed.append(
                    f"deleting launch template {template['LaunchTemplateName']}: {client_error_message(error)}"
                )
                continue
        outcome.removed.append(f"launch template {template['LaunchTemplateName']}")
    return True
