"""Remove what a run created, found by its tags; find what no record knows (orphans).

Only resources tagged `gpurun:managed=true` (and, for a run, `gpurun:run=<run>`)
are ever touched. What is already gone is fine. Order: a recovering run's
Auto Scaling group (scheduled action, group with its machines, launch
template: a live group would replace every machine terminated), instances (and wait
until they are terminated), placement group, instance profile and role,
security group, key pair, local key files.
"""

from __future__ import annotations

import contextlib
import functools
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import botocore.exceptions

from gpurun import paths
from gpurun.durations import format_duration
from gpurun.providers.aws import group as scaling
from gpurun.providers.aws import requests
from gpurun.providers.aws.session import Aws, client_error_code, client_error_message

if TYPE_CHECKING:
    from mypy_boto3_ec2.type_defs import DescribeInstancesResultTypeDef, InstanceTypeDef

Say = Callable[[str], None]

_GONE = {
    "InvalidInstanceID.NotFound",
    "InvalidGroup.NotFound",
    "InvalidGroupId.NotFound",
    "InvalidKeyPair.NotFound",
    "InvalidPlacementGroup.Unknown",
    "InvalidPlacementGroup.NotFound",
    "NoSuchEntity",
}


@dataclass
class Timing:
    """How long teardown waits, and how (tests make these tiny)."""

    poll_interval: float = 3.0
    terminate_timeout: float = 600.0
    #: How long a NotFound for an instance launch just started is taken as "not visible yet".
    not_found_timeout: float = 120.0
    dependency_timeout: float = 300.0
    sleep: Callable[[float], None] = time.sleep


@dataclass
class Outcome:
    removed: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    left: dict[str, Any] = field(default_factory=dict)


def _gone(error: BaseException) -> bool:
    return client_error_code(error) in _GONE


def _aws_errors() -> tuple[type[BaseException], ...]:
    return (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError)


def run_instances_live(aws: Aws, run: str | None) -> list[InstanceTypeDef]:
    found: list[InstanceTypeDef] = []
    paginator = aws.ec2.get_paginator("describe_instances")
    for page in paginator.paginate(Filters=requests.instance_filters(run)):
        for reservation in page.get("Reservations", []):
            found.extend(reservation.get("Instances", []))
    return [item for item in found if requests.is_managed(item.get("Tags"), run)]


def describe_by_ids(aws: Aws, ids: list[str]) -> dict[str, InstanceTypeDef]:
    """id -> instance; ids AWS no longer knows are simply absent (filters never raise NotFound)."""
    found: dict[str, InstanceTypeDef] = {}
    for start in range(0, len(ids), 199):
        chunk = ids[start : start + 199]
        paginator = aws.ec2.get_paginator("describe_instances")
        for page in paginator.paginate(Filters=[{"Name": "instance-id", "Values": chunk}]):
            for reservation in page.get("Reservations", []):
                for item in reservation.get("Instances", []):
                    found[item["InstanceId"]] = item
    return found


def describe_each(aws: Aws, ids: list[str]) -> tuple[dict[str, InstanceTypeDef], set[str]]:
    """Describe by id (InstanceIds, not a filter: filtered describes omit an instance for a while
    after RunInstances); returns (id -> instance, ids AWS answered NotFound for)."""
    found: dict[str, InstanceTypeDef] = {}
    missing: set[str] = set()
    for start in range(0, len(ids), 100):
        chunk = ids[start : start + 100]
        try:
            _collect(aws.ec2.describe_instances(InstanceIds=chunk), found)
            continue
        except botocore.exceptions.ClientError as error:
            if client_error_code(error) != "InvalidInstanceID.NotFound":
                raise
        for key in chunk:  # one unknown id fails the whole call: ask one at a time
            try:
                _collect(aws.ec2.describe_instances(InstanceIds=[key]), found)
            except botocore.exceptions.ClientError as error:
                if client_error_code(error) != "InvalidInstanceID.NotFound":
                    raise
                missing.add(key)
    return found, missing


def _collect(answer: DescribeInstancesResultTypeDef, found: dict[str, InstanceTypeDef]) -> None:
    for reservation in answer.get("Reservations", []):
        for item in reservation.get("Instances", []):
            found[item["InstanceId"]] = item


def _terminate(
    aws: Aws, run: str, timing: Timing, say: Say, outcome: Outcome, *, ledger: list[str], fresh: bool
) -> bool:
    """Terminate the run's instances and wait; True when none is left running.

    The ids the launch recorded come first: right after RunInstances a filtered
    describe may not list the instance yet, and tags are only a second source. A
    NotFound for a recorded id is "gone" only when the instance is old (`fresh`
    False); for a fresh one it means AWS has not caught up, and the terminate is
    sent again until `timing.not_found_timeout`.
    """
    try:
        live = run_instances_live(aws, run)
    except _aws_errors() as error:
        outcome.failed.append(f"listing instances: {client_error_message(error)}")
        outcome.left["instances"] = list(ledger)
        return False
    ids = list(dict.fromkeys([*ledger, *(item["InstanceId"] for item in live)]))
    if not ids:
        return True
    say(f"terminating {len(ids)} instance(s): {', '.join(ids[:8])}{' ...' if len(ids) > 8 else ''}")
    recorded = set(ledger)
    unconfirmed: set[str] = set()
    deadline = time.monotonic() + timing.not_found_timeout
    pending = list(ids)
    already: set[str] = set()  # ended before this teardown (a spot reclaim, the console): not "removed" by it
    while pending:
        chunk, pending = pending[:500], pending[500:]
        try:
            answer = aws.ec2.terminate_instances(InstanceIds=chunk)
            for item in answer.get("TerminatingInstances", []):
                if item.get("PreviousState", {}).get("Name") == "terminated":
                    already.add(item.get("InstanceId", ""))
            continue
        except _aws_errors() as error:
            if not _gone(error):
                outcome.failed.append(f"terminating {', '.join(chunk)}: {client_error_message(error)}")
                outcome.left["instances"] = ids
                return False
        # NotFound names one id and says nothing about the others: ask about each by id.
        try:
            found, missing = describe_each(aws, chunk)
        except _aws_errors() as error:
            outcome.failed.append(f"confirming {', '.join(chunk)}: {client_error_message(error)}")
            outcome.left["instances"] = ids
            return False
        ended = {key for key, item in found.items() if item["State"]["Name"] == "terminated"}
        unseen = {key for key in missing if key in recorded and fresh}
        already.update(ended - unconfirmed, missing - unseen - unconfirmed)
        retry = [key for key in chunk if (key in found and key not in ended) or key in unseen]
        if not retry:
            continue
        if time.monotonic() >= deadline:
            live_ids = sorted(key for key in retry if key in found)
            what = (
                f"{', '.join(live_ids)} still {found[live_ids[0]]['State']['Name']}"
                if live_ids
                else f"{', '.join(sorted(retry))} not visible yet"
            )
            outcome.failed.append(
                f"AWS kept answering NotFound to TerminateInstances for {', '.join(sorted(retry))} "
                f"for {format_duration(timing.not_found_timeout)} ({what})"
            )
            outcome.left["instances"] = ids
            return False
        unconfirmed.update(retry)
        say(
            f"TerminateInstances answered NotFound for {', '.join(sorted(retry))} (NotFound right after launch); "
            "terminating again"
        )
        timing.sleep(timing.poll_interval)
        pending = [*retry, *pending]
    outcome.removed.extend(f"instance {instance_id}" for instance_id in ids if instance_id not in already)
    deadline = time.monotonic() + timing.terminate_timeout
    last = None
    while True:
        try:
            found, missing = describe_each(aws, ids)
        except _aws_errors() as error:
            outcome.failed.append(f"waiting for termination: {client_error_message(error)}")
            outcome.left["instances"] = ids
            return False
        states = {key: item["State"]["Name"] for key, item in found.items()}
        waiting = sorted(key for key, state in states.items() if state != "terminated")
        if not waiting:
            return True
        if waiting != last:
            say(f"waiting for {len(waiting)} instance(s) to terminate ({states[waiting[0]]})")
            last = waiting
        if time.monotonic() >= deadline:
            outcome.failed.append(
                f"{', '.join(waiting)} still {states[waiting[0]]} {format_duration(timing.terminate_timeout)} "
                "after TerminateInstances"
            )
            outcome.left["instances"] = waiting
            return False
        timing.sleep(timing.poll_interval)


def _retrying(action: Callable[[], Any], codes: set[str], timing: Timing) -> None:
    """Run `action`, retrying with backoff while AWS answers one of `codes` (a dependency still in use)."""
    deadline = time.monotonic() + timing.dependency_timeout
    delay = timing.poll_interval
    while True:
        try:
            action()
            return
        except botocore.exceptions.ClientError as error:
            if client_error_code(error) not in codes or time.monotonic() >= deadline:
                raise
        timing.sleep(delay)
        delay = min(delay * 2, 30.0) if delay > 0 else 0.0


def _placement_groups(aws: Aws, run: str, timing: Timing, say: Say, outcome: Outcome, *, expected: bool) -> None:
    try:
        groups = aws.ec2.describe_placement_groups(Filters=requests.run_filters(run)).get("PlacementGroups", [])
    except _aws_errors() as error:
        message = f"listing placement groups: {client_error_message(error)}"
        if expected:
            outcome.failed.append(message)
            outcome.left["placement_group"] = requests.resource_name(run)
        else:
            say(f"warning: {message} (a placement group costs nothing)")
        return
    for group in groups:
        if not requests.is_managed(group.get("Tags"), run):
            continue
        name = group["GroupName"]
        try:
            _retrying(
                functools.partial(aws.ec2.delete_placement_group, GroupName=name),
                {"InvalidPlacementGroup.InUse"},
                timing,
            )
            outcome.removed.append(f"placement group {name}")
        except _aws_errors() as error:
            if not _gone(error):
                outcome.failed.append(f"placement group {name}: {client_error_message(error)}")
                outcome.left["placement_group"] = name


def _iam_tags_match(tag_list: Sequence[Mapping[str, Any]] | None, run: str) -> bool:
    return requests.is_managed(tag_list, run)


def _instance_profile(aws: Aws, name: str, run: str, outcome: Outcome) -> None:
    iam = aws.iam
    try:
        profile = iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"]
    except _aws_errors() as error:
        if not _gone(error):
            outcome.failed.append(f"instance profile {name}: {client_error_message(error)}")
            outcome.left["instance_profile"] = name
        return
    if not _iam_tags_match(profile.get("Tags"), run):
        return
    try:
        for role in profile.get("Roles", []):
            with contextlib.suppress(botocore.exceptions.ClientError):
                iam.remove_role_from_instance_profile(InstanceProfileName=name, RoleName=role["RoleName"])
        iam.delete_instance_profile(InstanceProfileName=name)
        outcome.removed.append(f"instance profile {name}")
    except _aws_errors() as error:
        if not _gone(error):
            outcome.failed.append(f"instance profile {name}: {client_error_message(error)}")
            outcome.left["instance_profile"] = name


def _role(aws: Aws, name: str, run: str, timing: Timing, outcome: Outcome) -> None:
    iam = aws.iam
    try:
        tag_list = iam.list_role_tags(RoleName=name).get("Tags", [])
    except _aws_errors() as error:
        if not _gone(error):
            outcome.failed.append(f"role {name}: {client_error_message(error)}")
            outcome.left["role"] = name
        return
    if not _iam_tags_match(tag_list, run):
        return
    try:
        for policy in iam.list_role_policies(RoleName=name).get("PolicyNames", []):
            iam.delete_role_policy(RoleName=name, PolicyName=policy)
        for attached in iam.list_attached_role_policies(RoleName=name).get("AttachedPolicies", []):
            iam.detach_role_policy(RoleName=name, PolicyArn=attached["PolicyArn"])
        _retrying(lambda: iam.delete_role(RoleName=name), {"DeleteConflict"}, timing)
        outcome.removed.append(f"role {name}")
    except _aws_errors() as error:
        if not _gone(error):
            outcome.failed.append(f"role {name}: {client_error_message(error)}")
            outcome.left["role"] = name


def _security_groups(aws: Aws, run: str, timing: Timing, say: Say, outcome: Outcome) -> None:
    try:
        groups = aws.ec2.describe_security_groups(Filters=requests.run_filters(run)).get("SecurityGroups", [])
    except _aws_errors() as error:
        outcome.failed.append(f"listing security groups: {client_error_message(error)}")
        return
    for group in groups:
        if not requests.is_managed(group.get("Tags"), run):
            continue
        group_id = group["GroupId"]
        try:
            _retrying(
                functools.partial(aws.ec2.delete_security_group, GroupId=group_id),
                {"DependencyViolation", "InvalidGroup.InUse"},
                timing,
            )
            outcome.removed.append(f"security group {group_id} ({group.get('GroupName', '')})")
        except _aws_errors() as error:
            if not _gone(error):
                outcome.failed.append(f"security group {group_id}: {client_error_message(error)}")
                outcome.left["security_group"] = group_id


def _key_pairs(aws: Aws, run: str, outcome: Outcome) -> None:
    try:
        pairs = aws.ec2.describe_key_pairs(Filters=requests.run_filters(run)).get("KeyPairs", [])
    except _aws_errors() as error:
        if not _gone(error):
            outcome.failed.append(f"listing key pairs: {client_error_message(error)}")
        return
    for pair in pairs:
        if not requests.is_managed(pair.get("Tags"), run):
            continue
        try:
            aws.ec2.delete_key_pair(KeyName=pair["KeyName"])
            outcome.removed.append(f"key pair {pair['KeyName']}")
        except _aws_errors() as error:
            if not _gone(error):
                outcome.failed.append(f"key pair {pair['KeyName']}: {client_error_message(error)}")
                outcome.left["key_pair"] = pair["KeyName"]


def remove_key_files(run: str, outcome: Outcome) -> None:
    directory = paths.keys_dir() / run
    if directory.exists():
        shutil.rmtree(directory, ignore_errors=True)
        outcome.removed.append(f"key files {directory}")


def remove_run(
    aws: Aws,
    run: str,
    say: Say,
    timing: Timing,
    *,
    names: dict[str, Any] | None = None,
    key_files: bool = True,
    placement_groups: bool = True,
    fresh: bool = False,
) -> Outcome:
    """Remove what `names` (the launch's ledger) lists, then everything tagged for `run` in this
    region (and its IAM role/profile); the run's key files last, once no instance is left.

    `placement_groups=False` skips looking for a placement group (a one-node
    run never makes one); one named in `names` is always looked for. `fresh`:
    the ledger's instances were launched moments ago (see `_terminate`).
    """
    outcome = Outcome()
    names = names or {}
    aws = aws.cleanup()
    scaling.remove(aws, run, timing, say, outcome)
    ledger = [str(key) for key in names.get("instances") or [] if isinstance(key, str)]
    terminated = _terminate(aws, run, timing, say, outcome, ledger=ledger, fresh=fresh)
    if placement_groups or names.get("placement_group"):
        _placement_groups(aws, run, timing, say, outcome, expected=bool(names.get("placement_group")))
    profile_names = dict.fromkeys([names.get("instance_profile"), requests.resource_name(run)])
    for name in profile_names:
        if name:
            _instance_profile(aws, name, run, outcome)
    for name in dict.fromkeys([names.get("role"), requests.resource_name(run)]):
        if name:
            _role(aws, name, run, timing, outcome)
    _security_groups(aws, run, timing, say, outcome)
    _key_pairs(aws, run, outcome)
    if key_files and terminated:
        remove_key_files(run, outcome)
    return outcome


def failure_message(run: str, outcome: Outcome) -> str:
    removed = f"; removed: {', '.join(outcome.removed)}" if outcome.removed else ""
    return (
        f"teardown of {run} could not remove everything: {'; '.join(outcome.failed)}{removed}; "
        f"run `gpurun teardown {run}` again"
    )


# -- orphans ---------------------------------------------------------------------------------


def find_orphans(aws: Aws, known_runs: set[str] | list[str], *, include_iam: bool = True) -> list[dict[str, Any]]:
    """gpurun-tagged resources in this region (and IAM) whose run no record here knows."""
    known = set(known_runs)
    orphans: list[dict[str, Any]] = []

    def add(kind: str, ident: str, tag_list: Sequence[Mapping[str, Any]] | None, **extra: Any) -> None:
        found = requests.tag_dict(tag_list)
        if found.get(requests.TAG_MANAGED) != "true":
            return
        run = found.get(requests.TAG_RUN, "")
        if run in known:
            return
        orphans.append(
            {
                "run": run,
                "region": aws.region,
                "kind": kind,
                "id": ident,
                "owner": found.get(requests.TAG_OWNER),
                **extra,
            }
        )

    ec2 = aws.ec2
    for item in run_instances_live(aws, None):
        add(
            "instance", item["InstanceId"], item.get("Tags"), state=item["State"]["Name"], type=item.get("InstanceType")
        )
    for found in scaling.groups_of(aws, None):
        add("auto_scaling_group", found["AutoScalingGroupName"], found.get("Tags"))
    for template in scaling.templates_of(aws, None):
        add("launch_template", template["LaunchTemplateId"], template.get("Tags"), name=template["LaunchTemplateName"])
    filters = requests.run_filters(None)
    for group in ec2.describe_security_groups(Filters=filters).get("SecurityGroups", []):
        add("security_group", group["GroupId"], group.get("Tags"), name=group.get("GroupName"))
    for pair in ec2.describe_key_pairs(Filters=filters).get("KeyPairs", []):
        add("key_pair", pair["KeyName"], pair.get("Tags"))
    try:
        for placement in ec2.describe_placement_groups(Filters=filters).get("PlacementGroups", []):
            add("placement_group", placement["GroupName"], placement.get("Tags"))
    except _aws_errors():
        pass
    if include_iam:
        iam = aws.iam
        for page in iam.get_paginator("list_roles").paginate(PathPrefix=requests.IAM_PATH):
            for role in page.get("Roles", []):
                tag_list = iam.list_role_tags(RoleName=role["RoleName"]).get("Tags", [])
                before = len(orphans)
                add("role", role["RoleName"], tag_list)
                if len(orphans) > before:
                    orphans[-1]["region"] = None
        for listed in iam.get_paginator("list_instance_profiles").paginate(PathPrefix=requests.IAM_PATH):
            for profile in listed.get("InstanceProfiles", []):
                profile_tags = profile.get("Tags")
                if profile_tags is None:
                    profile_tags = iam.get_instance_profile(InstanceProfileName=profile["InstanceProfileName"])[
                        "InstanceProfile"
                    ].get("Tags", [])
                before = len(orphans)
                add("instance_profile", profile["InstanceProfileName"], profile_tags)
                if len(orphans) > before:
                    orphans[-1]["region"] = None
    return orphans
