"""`provider: aws`: EC2 machines from the spec's AMI and types, with safe defaults; never leaks.

Read-only checks and the plan live in `prepare`, resource creation in
`launch` (each resource recorded as it appears; app/launch rolls back),
removal by recorded id and by tag, and orphans, in `teardown`; the pure
request builders in `requests`. This class joins them behind the Provider
interface.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import botocore.exceptions

from gpurun.durations import format_duration
from gpurun.errors import BadInput, GpurunError, Interrupted
from gpurun.models import Machine
from gpurun.providers.aws import requests
from gpurun.providers.aws.images import delete_snapshot, image_entries, orphan_snapshots
from gpurun.providers.aws.launch import Launcher
from gpurun.providers.aws.network import wait_ssh_answer
from gpurun.providers.aws.prepare import Prepared, offline_plan_rows, plan_rows, prepare
from gpurun.providers.aws.pricing import hourly_price
from gpurun.providers.aws.session import Aws, check_identity, client_error_message, make_session, profile_label
from gpurun.providers.aws.teardown import (
    Outcome,
    Timing,
    describe_by_ids,
    failure_message,
    remove_run,
)
from gpurun.providers.aws.teardown import find_orphans as _find_orphans
from gpurun.providers.base import Connect, OnChange, Provider, Record, Say

if TYPE_CHECKING:
    from gpurun.spec import Spec

#: (machines, ssh_cidr, say) -> None; raises when SSH does not answer in time.
WaitSsh = Callable[[list[Machine], str, Say], None]

_BILLED_STATES = {"pending", "running", "stopping", "shutting-down"}
_ENDED_STATES = {"terminated", "shutting-down", "stopped", "gone"}


class AwsProvider(Provider):
    name = "aws"

    def __init__(self) -> None:
        #: (event, handler) pairs registered on every boto3 session made here (tests inject faults).
        self.event_handlers: list[tuple[str, Callable[..., Any]]] = []
        self.poll_interval = 2.0
        self.running_timeout = 600.0
        self.ssh_timeout = 300.0
        self.ssh_poll_interval = 3.0
        #: How long to keep reading console output for host keys before trusting on first use.
        self.host_key_timeout = 90.0
        self.host_key_poll_interval = 5.0
        self.iam_propagation_timeout = 120.0
        self.teardown_timing = Timing()
        self.sleep: Callable[[float], None] = time.sleep
        #: Replaceable: tests without an sshd set this to a no-op.
        self.wait_ssh: WaitSsh = self._wait_ssh
        self._sessions: dict[tuple[str, str | None], Aws] = {}
        self._prepared: dict[str, Prepared] = {}

    # -- sessions and the plan -------------------------------------------------------------------

    def session(self, region: str, profile: str | None = None) -> Aws:
        key = (region, profile)
        aws = self._sessions.get(key)
        if aws is None:
            aws = self._sessions[key] = make_session(region, profile, handlers=self.event_handlers)
        return aws

    def _prepare(self, spec: Spec, run: str) -> Prepared:
        fingerprint = json.dumps(
            [run, spec.aws.model_dump(mode="json"), spec.checkpoint.store, spec.ssh.port], sort_keys=True
        )
        prepared = self._prepared.get(fingerprint)
        if prepared is None:
            aws = self.session(spec.aws.region, spec.aws.profile)
            prepared = self._prepared[fingerprint] = prepare(aws, spec, run)
        return prepared

    def plan(self, spec: Spec, run: str) -> list[tuple[str, str]]:
        prepared = self._prepare(spec, run)
        rows = plan_rows(prepared, spec)
        if recovering(spec):
            from gpurun.providers.aws import recovery

            # The group's guard replaces the machine's own shutdown guard.
            rows = [row for row in rows if row[0] != "guard"]
            rows += recovery.plan_rows(
                run=run,
                instance_types=[info.name for info in _group_types(prepared)],
                zones=prepared.zones(),
                spot=spec.aws.spot,
                nodes=spec.aws.nodes,
                max_runtime_text=format_duration(spec.aws.max_runtime),
                idle_timeout_text=format_duration(spec.aws.idle_timeout) if spec.aws.idle_timeout else None,
                max_restarts=spec.recovery.max_restarts or 0,
                on_failure=spec.recovery.on_failure,
            )
        return rows

    def plan_offline(self, spec: Spec, run: str) -> list[tuple[str, str]]:
        return offline_plan_rows(spec, run)

    def setup_skipped(self, spec: Spec, run: str) -> str | None:
        return self._prepare(spec, run).setup_skipped

    # -- acquire ---------------------------------------------------------------------------------

    def acquire(
        self, spec: Spec, record: Record, on_change: OnChange, say: Say, *, connect: Connect | None = None
    ) -> list[Machine]:
        run = record["run"]
        prepared = self._prepare(spec, run)  # every BadInput is raised here, before anything exists
        aws = prepared.aws
        record["aws"] = {
            "region": aws.region,
            "profile": spec.aws.profile,
            "account": prepared.identity.account,
            "owner": prepared.owner,
            "nodes": spec.aws.nodes,
        }
        for choice in prepared.image_choices.values():
            record["image"] = {
                "name": choice.image.name if choice.image else None,
                "id": choice.ami.id,
                "setup_skipped": choice.skip_setup,
                "reason": choice.reason,
            }
        record.setdefault("resources", {})
        on_change(record)
        for warning in prepared.warnings:
            say(f"warning: {warning}")
        launcher = Launcher(
            prepared,
            spec,
            record,
            on_change,
            say,
            poll_interval=self.poll_interval,
            running_timeout=self.running_timeout,
            iam_propagation_timeout=self.iam_propagation_timeout,
            sleep=self.sleep,
        )
        try:
            if recovering(spec):
                return self._acquire_group(prepared, spec, record, launcher, say)
            key_path = launcher.key_pair()
            group_id = launcher.security_group(prepared.vpc_id)
            profile = launcher.instance_profile()
            placement = launcher.placement_group()
            launched, type_name, zone = launcher.instances(requests.resource_name(run), group_id, profile, placement)
            described = launcher.wait_running([item["InstanceId"] for item in launched])
            machines = launcher.machines(described, key_path, type_name, zone)
            launcher.step = "waiting for SSH"
            self.wait_ssh(machines, prepared.ssh_cidr, say)
            launcher.pin_host_keys(
                machines,
                timeout=self.host_key_timeout,
                interval=self.host_key_poll_interval,
                trust_on_first_use=spec.ssh.trust_on_first_use,
            )
        except KeyboardInterrupt:
            # What exists is in the record (the ledger); app/launch removes it and says so.
            raise Interrupted(f"interrupted while {launcher.step}") from None
        except GpurunError:
            raise
        except Exception as error:
            raise GpurunError(f"launch failed while {launcher.step}: {type(error).__name__}: {error}") from error
        return machines

    def _acquire_group(
        self, prepared: Prepared, spec: Spec, record: Record, launcher: Launcher, say: Say
    ) -> list[Machine]:
        """A recovering run: key pair, security group, role, then a launch template and an Auto Scaling
        group whose machines bootstrap themselves from the store (record["bootstrap"], set by the app)."""
        from gpurun.bootstrap import user_data
        from gpurun.providers.aws import group, recovery

        aws = prepared.aws
        run = record["run"]
        if not isinstance(record.get("bootstrap"), dict):
            raise GpurunError(
                "a recovering run needs its code and agent staged in the store first (gpurun launch does)"
            )
        key_path = launcher.key_pair()
        security_group = launcher.security_group(prepared.vpc_id)
        profile = launcher.instance_profile()
        if profile and profile == requests.resource_name(run):
            launcher.step = "letting the role scale its own group (PutRolePolicy)"
            statement = recovery.own_group_statement(
                run, region=aws.region, account=prepared.identity.account, partition=aws.partition
            )
            aws.iam.put_role_policy(
                RoleName=profile,
                PolicyName=recovery.GROUP_POLICY_NAME,
                PolicyDocument=requests.policy_json({"Version": "2012-10-17", "Statement": [statement]}),
            )
        types = _group_types(prepared)
        first = types[0]
        ami = prepared.amis[first.arch]
        subnets = [subnet for info in types for subnet in prepared.subnets[info.name]]
        config = {**(record.get("bootstrap") or {}), "group": recovery.group_name(run), "region": aws.region}
        data = recovery.launch_template_data(
            run=run,
            owner=prepared.owner,
            ami_id=ami.id,
            instance_type=first.name,
            root_device=ami.root_device,
            disk_gb=spec.aws.disk_gb,
            key_name=requests.resource_name(run),
            security_group_id=security_group,
            instance_profile=profile,
            user_data=user_data(config),
        )
        launched_at = datetime.now(timezone.utc)
        launcher.step = "creating the Auto Scaling group (CreateLaunchTemplate, CreateAutoScalingGroup)"
        say(f"creating Auto Scaling group {recovery.group_name(run)} ({', '.join(t.name for t in types)})")
        group.create(
            aws,
            run=run,
            owner=prepared.owner,
            template_data=data,
            group_kwargs=recovery.auto_scaling_group_kwargs(
                run=run,
                owner=prepared.owner,
                instance_types=[info.name for info in types],
                subnet_ids=[subnet.id for subnet in subnets],
                nodes=spec.aws.nodes,
                spot=spec.aws.spot,
                max_price=spec.aws.max_price,
            ),
            guard_at=recovery.guard_time(launched_at, spec.aws.max_runtime),
            created=launcher.created,
        )
        launcher.step = "waiting for the group's first machine (DescribeAutoScalingGroups)"
        first_instance = group.wait_first_instance(
            aws,
            run,
            timeout=spec.aws.capacity_wait,
            interval=self.poll_interval,
            sleep=self.sleep,
            say=say,
            keep_waiting=bool(record.get("keep_waiting")),
            instance_types=[info.name for info in types],
        )
        zone = first_instance.get("Placement", {}).get("AvailabilityZone", "")
        machines = launcher.machines([first_instance], key_path, first_instance.get("InstanceType", first.name), zone)
        for machine in machines:
            # Each machine of the group has its own host key, never pinned (nothing reads its console):
            # its first key is trusted only where the spec allows trust on first use.
            machine["trust_on_first_use"] = spec.ssh.trust_on_first_use
            machine["generation"] = 1
        return machines

    def _remove_recorded(self, aws: Aws, record: Record, say: Say) -> Outcome:
        """What the record's ledger names (by id), then everything tagged with the run."""
        return remove_run(
            aws,
            record["run"],
            say,
            self.teardown_timing,
            names=record.get("resources") or {},
            placement_groups=_may_have_placement_group(record),
            fresh=record.get("state") == "launching",
        )

    def _wait_ssh(self, machines: list[Machine], ssh_cidr: str, say: Say) -> None:
        if not machines:
            return
        say(f"waiting for SSH on {len(machines)} machine(s) (at most {format_duration(self.ssh_timeout)})")
        deadline = time.monotonic() + self.ssh_timeout

        stop = threading.Event()

        def probe(machine: Machine) -> bool:
            return wait_ssh_answer(machine.get("host") or "", machine["port"], deadline, self.ssh_poll_interval, stop)

        # Not `with`: leaving it waits for every probe to reach its deadline, and Ctrl-C must answer now.
        pool = ThreadPoolExecutor(max_workers=min(32, len(machines)))
        try:
            answered = list(pool.map(probe, machines))
        finally:
            stop.set()
            pool.shutdown(wait=False, cancel_futures=True)
        silent = [machine for machine, ok in zip(machines, answered, strict=True) if not ok]
        if silent:
            first = silent[0]
            more = f" (and {len(silent) - 1} more)" if len(silent) > 1 else ""
            raise GpurunError(
                f"{first['instance_id']} is running but SSH at {first['host']}:{first['port']} did not answer in "
                f"{format_duration(self.ssh_timeout)}{more}: check ssh_cidr (now {ssh_cidr})"
            )

    # -- using the machines ------------------------------------------------------------------------

    def machine_env(self, record: Record, machine: Machine) -> dict[str, str]:
        region, _ = _location(record)
        return {"AWS_DEFAULT_REGION": region, "AWS_REGION": region}

    # -- status ------------------------------------------------------------------------------------

    def refresh(self, records: list[Record]) -> None:
        """One batched describe per region; vanished instances become state "gone", never an error."""
        groups: dict[tuple[str, str | None], list[Record]] = {}
        for record in records:
            if record.get("provider") != "aws":
                continue
            if not any(machine.get("instance_id") for machine in record.get("machines") or []):
                continue
            groups.setdefault(_location(record), []).append(record)
        now = datetime.now(timezone.utc)
        for (region, profile), members in groups.items():
            ids = [m["instance_id"] for r in members for m in r.get("machines", []) if m.get("instance_id")]
            try:
                found = describe_by_ids(self.session(region, profile), list(dict.fromkeys(ids)))
            except (GpurunError, botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError) as error:
                message = (
                    client_error_message(error) if isinstance(error, botocore.exceptions.ClientError) else str(error)
                )
                for record in members:
                    record["refresh_error"] = f"AWS state unknown: {message}"
                continue
            for record in members:
                record.pop("refresh_error", None)
                _update_machines(record, found, region, now)

    # -- teardown ----------------------------------------------------------------------------------

    def check_access(self, record: Record) -> None:
        """Tags are per account: other credentials would find nothing and call the run ended."""
        region, profile = _location(record)
        aws = self.session(region, profile)
        identity = check_identity(aws)
        launched_in = (record.get("aws") or {}).get("account")
        if launched_in and identity.account and identity.account != launched_in:
            raise BadInput(
                f"run {record['run']} was launched in AWS account {launched_in}, but {profile_label(profile)} "
                f"is account {identity.account}; nothing was touched. Use credentials for {launched_in} "
                "(teardown --profile NAME, or AWS_PROFILE)"
            )

    def release(self, record: Record, on_change: OnChange, say: Say) -> list[str]:
        run = record["run"]
        region, profile = _location(record)
        aws = self.session(region, profile)
        self.check_access(record)
        outcome = self._remove_recorded(aws, record, say)
        record["resources"] = outcome.left
        gone = {entry.split(" ", 1)[1] for entry in outcome.removed if entry.startswith("instance i-")}
        for machine in record.get("machines") or []:
            if machine.get("instance_id") in gone:
                machine["state"] = "terminated"
        on_change(record)
        if outcome.failed:
            raise GpurunError(failure_message(run, outcome))
        return outcome.removed

    def find_orphans(
        self, known_runs: set[str] | list[str], regions: list[str] | None = None, profile: str | None = None
    ) -> list[dict[str, Any]]:
        """gpurun-tagged resources (instances, groups, key pairs, placement groups, roles, profiles)
        whose `gpurun:run` no local record knows. Each: {run, region, kind, id, owner, ...}."""
        found: list[dict[str, Any]] = []
        for index, region in enumerate(regions or [default_region(profile)]):
            aws = self.session(region, profile)
            check_identity(aws)
            try:
                found.extend(_find_orphans(aws, known_runs, include_iam=index == 0))
                # Images are listed (they cost money) but only `gpurun image delete` removes one.
                found.extend(image_entries(aws))
                found.extend(orphan_snapshots(aws))
            except botocore.exceptions.ClientError as error:
                raise GpurunError(
                    f"listing gpurun resources in {region} failed: {client_error_message(error)}"
                ) from None
        return found

    def remove_orphans(self, orphans: list[dict[str, Any]], say: Say, profile: str | None = None) -> list[str]:
        """Remove every run named in `orphans` (found by tag, as teardown does); returns what was removed."""
        runs: dict[str, list[str]] = {}
        removed: list[str] = []
        failed: list[str] = []
        for orphan in orphans:
            if orphan.get("kind") == "snapshot":
                region = orphan.get("region") or default_region(profile)
                try:
                    gone = delete_snapshot(self.session(region, profile), orphan["id"])
                except botocore.exceptions.ClientError as error:
                    failed.append(f"snapshot {orphan['id']}: {client_error_message(error)}")
                    continue
                if gone:
                    removed.append(gone)
                continue
            if orphan.get("kind") == "image" or not orphan.get("run"):
                continue
            regions = runs.setdefault(orphan["run"], [])
            region = orphan.get("region")
            if region and region not in regions:
                regions.append(region)
        for run, regions in runs.items():
            for region in regions or [default_region(profile)]:
                outcome = remove_run(self.session(region, profile), run, say, self.teardown_timing)
                removed.extend(outcome.removed)
                failed.extend(f"{run}: {item}" for item in outcome.failed)
        if failed:
            raise GpurunError(f"could not remove every orphan: {'; '.join(failed)}; removed: {', '.join(removed)}")
        return removed


# -- helpers -------------------------------------------------------------------------------------


def recovering(spec: Spec) -> bool:
    """A run whose machine belongs to an Auto Scaling group (recovery on)."""
    return (spec.recovery.max_restarts or 0) > 0


def _group_types(prepared: Prepared) -> list[Any]:
    """The types one launch template can serve: those of the first type's architecture (one AMI)."""
    first = prepared.types[0]
    return [info for info in prepared.types if info.arch == first.arch]


def default_region(profile: str | None = None) -> str:
    import boto3

    try:
        return boto3.Session(profile_name=profile).region_name or "us-east-1"
    except Exception:
        return "us-east-1"


def _location(record: Record) -> tuple[str, str | None]:
    saved = record.get("aws") or {}
    spec_aws = (record.get("spec") or {}).get("aws") or {}
    region = saved.get("region") or spec_aws.get("region") or default_region(spec_aws.get("profile"))
    profile = saved.get("profile") if "profile" in saved else spec_aws.get("profile")
    return region, profile


def _may_have_placement_group(record: Record) -> bool:
    """Only runs of several nodes make one; a record that does not say how many might have."""
    if (record.get("resources") or {}).get("placement_group"):
        return True
    nodes = ((record.get("spec") or {}).get("aws") or {}).get("nodes")
    if nodes is None:
        nodes = (record.get("aws") or {}).get("nodes")
    return nodes is None or int(nodes) > 1


def _parse_time(text: Any) -> datetime | None:
    if isinstance(text, datetime):
        return text if text.tzinfo else text.replace(tzinfo=timezone.utc)
    if not text:
        return None
    try:
        value = datetime.fromisoformat(str(text).replace("Z", "+00:00"))
    except ValueError:
        return None
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


_TRANSITION = re.compile(r"\((\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) (?:GMT|UTC)\)")


def _ended_at(reason: str | None) -> str | None:
    match = _TRANSITION.search(reason or "")
    if not match:
        return None
    return datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S").replace(tzinfo=timezone.utc).isoformat()


def _update_machines(record: Record, found: Mapping[str, Mapping[str, Any]], region: str, now: datetime) -> None:
    total = 0.0
    known = False
    for machine in record.get("machines") or []:
        item = found.get(machine.get("instance_id", ""))
        if item is None:
            if machine.get("state") != "gone" and not machine.get("ended_at"):
                # AWS forgets a terminated instance after about an hour: it ended by the last time
                # it was seen running, or by now; cost so far counts up to then.
                machine["ended_at"] = machine.get("seen_at") or now.isoformat()
            machine["state"] = "gone"
            machine["public_ip"] = None
        else:
            state = item["State"]["Name"]
            machine["state"] = state
            machine["public_ip"] = item.get("PublicIpAddress")
            if item.get("PublicIpAddress"):
                machine["host"] = item["PublicIpAddress"]
            launched = _parse_time(item.get("LaunchTime"))
            if launched is not None:
                machine["launch_time"] = launched.isoformat()
            if state in _BILLED_STATES:
                machine["seen_at"] = now.isoformat()
            if state in _ENDED_STATES and not machine.get("ended_at"):
                machine["ended_at"] = _ended_at(item.get("StateTransitionReason")) or now.isoformat()
        cost = _machine_cost(machine, region, now)
        if cost is not None:
            machine["cost_usd"] = cost
        cost = machine.get("cost_usd")
        if cost is not None:
            total += cost
            known = True
    # A recovering run's earlier machines (replaced by its group) cost what they cost until they ended.
    for machine in record.get("past_machines") or []:
        past_cost = machine.get("cost_usd")
        if past_cost is not None:
            total += past_cost
            known = True
    record["cost_usd"] = round(total, 4) if known else None


def _machine_cost(machine: Machine, region: str, now: datetime) -> float | None:
    price = machine.get("price_per_hour")
    if price is None:
        price = hourly_price(machine.get("instance_type", ""), region, None)
    start = _parse_time(machine.get("launch_time"))
    if price is None or start is None:
        return None
    end = _parse_time(machine.get("ended_at"))
    if end is None:
        if machine.get("state") not in _BILLED_STATES:
            return None  # vanished without an end time: keep the last estimate
        end = now
    hours = max(0.0, (end - start).total_seconds() / 3600)
    return round(hours * float(price), 4)
