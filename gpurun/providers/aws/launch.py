"""Create a run's resources in order, recording each the moment it exists; undo all on failure.

Order: key pair, security group (+ ingress), role + instance profile (S3
store), placement group (nodes > 1), instances (with capacity failover across
zones, then types), wait until running, wait for SSH, pin host keys.
"""

from __future__ import annotations

import contextlib
import secrets
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import TYPE_CHECKING, Any

import botocore.exceptions

from gpurun import paths
from gpurun.durations import format_duration
from gpurun.errors import GpurunError, NoCapacity
from gpurun.models import Machine, RunRecord
from gpurun.providers.aws import requests
from gpurun.providers.aws.connect import DEFAULT_USER, known_hosts_file
from gpurun.providers.aws.pricing import hourly_price
from gpurun.providers.aws.session import client_error_code, client_error_message

if TYPE_CHECKING:
    from mypy_boto3_ec2.type_defs import InstanceTypeDef, ReservationResponseTypeDef

    from gpurun.providers.aws.prepare import Prepared
    from gpurun.spec import Spec

Say = Callable[[str], None]
OnChange = Callable[[RunRecord], None]


#: How often one RunInstances is sent again after throttling or a dropped connection.
RUN_INSTANCES_RETRIES = 4


class StepFailed(GpurunError):
    """An AWS call of launch failed; the message names the step."""


class Launcher:
    """One launch: the steps, what each created, and how long to wait for things."""

    def __init__(
        self,
        prepared: Prepared,
        spec: Spec,
        record: RunRecord,
        on_change: OnChange,
        say: Say,
        *,
        poll_interval: float,
        running_timeout: float,
        iam_propagation_timeout: float,
        sleep: Callable[[float], None],
    ) -> None:
        self.prepared = prepared
        self.aws = prepared.aws
        self.spec = spec
        self.record = record
        self.on_change = on_change
        self.say = say
        self.run = record["run"]
        self.name = requests.resource_name(self.run)
        self.tags = requests.tags(self.run, prepared.owner)
        self.resources: dict[str, Any] = record.setdefault("resources", {})
        self.poll_interval = poll_interval
        self.running_timeout = running_timeout
        self.iam_propagation_timeout = iam_propagation_timeout
        self.sleep = sleep
        self.step = "starting"
        self.nonce = secrets.token_hex(8)

    # -- bookkeeping -----------------------------------------------------------------------

    def created(self, key: str, value: Any) -> None:
        """Record a resource the moment it exists (a failed launch and teardown find it)."""
        self._created(key, value)

    def _created(self, key: str, value: Any) -> None:
        self.resources[key] = value
        self.on_change(self.record)

    @contextlib.contextmanager
    def _step(self, description: str, operation: str) -> Iterator[None]:
        self.step = f"{description} ({operation})"
        try:
            yield
        except botocore.exceptions.ClientError as error:
            raise StepFailed(f"launch failed while {self.step}: {client_error_message(error)}") from error
        except botocore.exceptions.BotoCoreError as error:
            raise StepFailed(f"launch failed while {self.step}: {error}") from error

    # -- steps -----------------------------------------------------------------------------

    def key_pair(self) -> str:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        self.step = "writing the run's private key"
        directory = paths.ensure_private(paths.keys_dir() / self.run)
        private = directory / "id_ed25519"
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        )
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        paths.atomic_write(private, pem, mode=0o600)
        paths.atomic_write(directory / "id_ed25519.pub", public + f" {self.name}\n".encode(), mode=0o600)
        self._created("key_file", str(private))
        with self._step("importing the key pair", "ImportKeyPair"):
            answer = self.aws.ec2.import_key_pair(
                KeyName=self.name,
                PublicKeyMaterial=public,
                TagSpecifications=requests.tag_specifications(["key-pair"], self.tags),
            )
        self.resources["key_pair_id"] = answer.get("KeyPairId")
        self._created("key_pair", self.name)
        return str(private)

    def security_group(self, vpc_id: str) -> str:
        cidr = self.prepared.ssh_cidr
        with self._step("creating the security group", "CreateSecurityGroup"):
            answer = self.aws.ec2.create_security_group(
                GroupName=self.name,
                Description=f"gpurun run {self.run}: SSH from {cidr} only",
                VpcId=vpc_id,
                TagSpecifications=requests.tag_specifications(["security-group"], self.tags),
            )
        group_id: str = answer["GroupId"]
        self._created("security_group", group_id)
        with self._step("opening SSH in the security group", "AuthorizeSecurityGroupIngress"):
            self.aws.ec2.authorize_security_group_ingress(
                GroupId=group_id,
                IpPermissions=requests.ingress_permissions(
                    cidr, port=self.spec.ssh.port, group_id=group_id, nodes=self.spec.aws.nodes
                ),
            )
        return group_id

    def instance_profile(self) -> str | None:
        if self.prepared.instance_profile:
            return self.prepared.instance_profile
        if not self.prepared.store:
            return None
        bucket, prefix = self.prepared.store
        iam = self.aws.iam
        with self._step("creating the IAM role", "CreateRole"):
            iam.create_role(
                RoleName=self.name,
                Path=requests.IAM_PATH,
                AssumeRolePolicyDocument=requests.policy_json(requests.trust_policy()),
                Description=f"gpurun run {self.run}: checkpoint store s3://{bucket}/{prefix}",
                Tags=self.tags,
            )
        self._created("role", self.name)
        with self._step("attaching the checkpoint-store policy", "PutRolePolicy"):
            iam.put_role_policy(
                RoleName=self.name,
                PolicyName=requests.ROLE_POLICY_NAME,
                PolicyDocument=requests.policy_json(self.role_policy(bucket, prefix)),
            )
        with self._step("creating the instance profile", "CreateInstanceProfile"):
            iam.create_instance_profile(InstanceProfileName=self.name, Path=requests.IAM_PATH, Tags=self.tags)
        self._created("instance_profile", self.name)
        with self._step("adding the role to the instance profile", "AddRoleToInstanceProfile"):
            iam.add_role_to_instance_profile(InstanceProfileName=self.name, RoleName=self.name)
        return self.name

    def role_policy(self, bucket: str, prefix: str) -> dict[str, Any]:
        source = self.record.get("resumed_from") or {}
        read_from = None
        if str(source.get("store", "")).startswith("s3://"):
            read_from = (*requests.parse_s3_url(source["store"]), source["run"])
        account, partition = self.prepared.identity.account, self.aws.partition
        parameters, secrets = [], []
        for reference in self.spec.secrets.values():
            kind, _, name = reference.partition(":")
            if kind == "ssm":
                parameters.append(
                    requests.parameter_arn(name, region=self.aws.region, account=account, partition=partition)
                )
            elif kind == "secretsmanager":
                secrets.append(requests.secret_arn(name, region=self.aws.region, account=account, partition=partition))
        return requests.role_policy(
            bucket,
            prefix,
            self.run,
            partition,
            read_from=read_from,
            parameter_arns=parameters,
            secret_arns=secrets,
        )

    def placement_group(self) -> str | None:
        if not self.prepared.placement(self.spec.aws.nodes):
            return None
        with self._step("creating the placement group", "CreatePlacementGroup"):
            self.aws.ec2.create_placement_group(
                GroupName=self.name,
                Strategy="cluster",
                TagSpecifications=requests.tag_specifications(["placement-group"], self.tags),
            )
        self._created("placement_group", self.name)
        return self.name

    def _run_once(self, kwargs: dict[str, Any], attempt: list[int]) -> ReservationResponseTypeDef:
        """RunInstances in one type/zone: one request per answer AWS gives.

        The client makes one attempt (botocore would repeat a capacity error's HTTP 500);
        here only throttling and a dropped connection are tried again, with the same
        ClientToken so AWS starts the instances once, and a fresh instance profile
        that IAM has not propagated yet is waited out.
        """
        ec2 = self.aws.view("single").ec2
        deadline = time.monotonic() + self.iam_propagation_timeout
        delay = max(self.poll_interval, 0.0)
        retries_left = RUN_INSTANCES_RETRIES
        backoff = 1.0
        kwargs["ClientToken"] = requests.client_token(self.run, attempt[0], self.nonce)
        attempt[0] += 1
        while True:
            try:
                return ec2.run_instances(**kwargs)
            except botocore.exceptions.ClientError as error:
                code = client_error_code(error)
                if code in requests.RETRYABLE_ERRORS and retries_left > 0:
                    retries_left -= 1
                    self.say(f"RunInstances: {code}; trying again in {backoff:.0f}s")
                    self.sleep(backoff)
                    backoff = min(backoff * 2, 20.0)
                    continue
                message = client_error_message(error).lower()
                propagating = "IamInstanceProfile" in kwargs and (
                    (code == "InvalidParameterValue" and "iaminstanceprofile" in message)
                    or (code == "InvalidParameterValue" and "instance profile" in message)
                    or code == "NoSuchEntity"
                )
                if not propagating or time.monotonic() >= deadline:
                    raise
            except (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError):
                if retries_left <= 0:
                    raise
                retries_left -= 1
                self.sleep(backoff)
                backoff = min(backoff * 2, 20.0)
                continue
            self.say("waiting for the new instance profile to reach EC2")
            self.sleep(delay)
            delay = min(max(delay * 2, 1.0), 10.0) if delay > 0 else 0.0
            kwargs["ClientToken"] = requests.client_token(self.run, attempt[0], self.nonce)
            attempt[0] += 1

    def instances(
        self, key_name: str, group_id: str, profile: str | None, placement: str | None
    ) -> tuple[list[InstanceTypeDef], str, str]:
        """Launch `nodes` machines: each zone of the first type, then the next type; (instances, type, zone)."""
        settings = self.spec.aws
        tried: list[tuple[str, str, str, str]] = []
        attempt = [0]
        self.step = "launching instances (RunInstances)"
        for info in self.prepared.types:
            ami = self.prepared.amis[info.arch]
            data = requests.user_data(
                run=self.run, max_runtime=settings.max_runtime, idle_timeout=settings.idle_timeout
            )
            for subnet in self.prepared.subnets[info.name]:
                kwargs = requests.run_instances_kwargs(
                    run=self.run,
                    owner=self.prepared.owner,
                    ami_id=ami.id,
                    root_device=ami.root_device,
                    instance_type=info.name,
                    nodes=settings.nodes,
                    disk_gb=settings.disk_gb,
                    key_name=key_name,
                    security_group_id=group_id,
                    subnet_id=subnet.id,
                    user_data=data,
                    spot=settings.spot,
                    max_price=settings.max_price,
                    instance_profile=profile,
                    placement_group=placement if info.cluster_placement else None,
                    associate_public_ip=not subnet.public_ip_on_launch,
                )
                market = "spot" if settings.spot else "on-demand"
                self.say(f"launching {settings.nodes}x {info.name} ({market}) in {subnet.zone}")
                try:
                    answer = self._run_once(kwargs, attempt)
                except botocore.exceptions.ClientError as error:
                    code = client_error_code(error)
                    kind = requests.error_kind(code)
                    message = error.response.get("Error", {}).get("Message", "")
                    if kind == "capacity":
                        if code == "SpotMaxPriceTooLow":
                            price = self.prepared.spot.get(info.name, {}).get(subnet.zone)
                            message = requests.spot_price_note(price, settings.max_price)
                        tried.append((info.name, subnet.zone, code, message))
                        self.say(f"{info.name} in {subnet.zone}: {code}; trying the next option")
                        continue
                    if kind == "quota":
                        raise StepFailed(
                            requests.quota_message(
                                code,
                                info.name,
                                spot=settings.spot,
                                vcpus=info.vcpus,
                                nodes=settings.nodes,
                                region=self.aws.region,
                            )
                        ) from error
                    raise StepFailed(
                        f"launch failed while launching {info.name} in {subnet.zone} (RunInstances): "
                        f"{client_error_message(error)}"
                    ) from error
                except botocore.exceptions.BotoCoreError as error:
                    raise StepFailed(f"launch failed while launching instances (RunInstances): {error}") from error
                launched = answer.get("Instances", [])
                self._created("instances", [item["InstanceId"] for item in launched])
                return launched, info.name, subnet.zone
        details = requests.capacity_table(tried)
        if any(code == "SpotMaxPriceTooLow" for _, _, code, _ in tried):
            details.append(requests.SPOT_PRICE_ADVICE)
        raise NoCapacity(
            f"no capacity for {', '.join(info.name for info in self.prepared.types)} "
            f"in {', '.join(self.prepared.zones())} ({len(tried)} tried, below)",
            details=details,
        )

    def wait_running(self, ids: list[str]) -> list[InstanceTypeDef]:
        """Poll (one batched describe per round) until every instance runs with a public IP."""
        from gpurun.providers.aws.teardown import describe_by_ids

        self.step = "waiting for instances to run (DescribeInstances)"
        deadline = time.monotonic() + self.running_timeout
        last = None
        while True:
            try:
                found = describe_by_ids(self.aws, ids)
            except botocore.exceptions.ClientError as error:
                raise StepFailed(f"launch failed while {self.step}: {client_error_message(error)}") from error
            states = {key: found[key]["State"]["Name"] if key in found else "pending" for key in ids}
            for key, state in states.items():
                if state in ("shutting-down", "terminated", "stopping", "stopped"):
                    reason = found.get(key, {}).get("StateReason", {}).get("Message") or state
                    raise StepFailed(f"{key} stopped while starting: {reason}")
            ready = [key for key in ids if states[key] == "running" and found[key].get("PublicIpAddress")]
            summary = ", ".join(f"{count} {state}" for state, count in _count(states.values()).items())
            if summary != last:
                self.say(f"waiting for {len(ids)} instance(s): {summary}")
                last = summary
            if len(ready) == len(ids):
                return [found[key] for key in ids]
            if time.monotonic() >= deadline:
                running_no_ip = [key for key in ids if states[key] == "running" and key not in ready]
                if running_no_ip:
                    raise StepFailed(
                        f"{', '.join(running_no_ip)} runs without a public IP: use a public subnet "
                        "(aws.subnet_id) or one that assigns public addresses"
                    )
                raise StepFailed(f"instances not running after {format_duration(self.running_timeout)}: {summary}")
            self.sleep(self.poll_interval)

    def machines(
        self, described: Sequence[Mapping[str, Any]], key_path: str, type_name: str, zone: str
    ) -> list[Machine]:
        settings = self.spec.aws
        user = self.spec.ssh.user or DEFAULT_USER
        spot_price = self.prepared.spot.get(type_name, {}).get(zone) if settings.spot else None
        price = hourly_price(type_name, self.aws.region, spot_price)
        ordered = sorted(described, key=lambda item: (item.get("AmiLaunchIndex", 0), item["InstanceId"]))
        known_hosts = known_hosts_file(self.run)
        # The login's home on Ubuntu, Amazon Linux and Debian images: /home/<user> (root: /root).
        home = "/root" if user == "root" else f"/home/{user}"
        machines: list[Machine] = []
        for rank, item in enumerate(ordered):
            launch = item.get("LaunchTime")
            machines.append(
                {
                    "rank": rank,
                    "host": item.get("PublicIpAddress"),
                    "public_ip": item.get("PublicIpAddress"),
                    "private_ip": item.get("PrivateIpAddress"),
                    "port": self.spec.ssh.port,
                    "user": user,
                    "instance_id": item["InstanceId"],
                    "instance_type": item.get("InstanceType", type_name),
                    "spot": bool(settings.spot),
                    "state": item["State"]["Name"],
                    "zone": item.get("Placement", {}).get("AvailabilityZone", zone),
                    "run_dir": f"{home}/{paths.machine_run_dir(self.run)}",
                    "key_path": key_path,
                    "known_hosts": str(known_hosts),
                    "host_keys": None,
                    "launch_time": launch.isoformat() if isinstance(launch, datetime) else str(launch or ""),
                    "price_per_hour": price,
                }
            )
        return machines

    def pin_host_keys(
        self, machines: list[Machine], *, timeout: float, interval: float, trust_on_first_use: bool = True
    ) -> None:
        """Host keys from the console output where cloud-init prints them; else trust on first use.

        cloud-init prints the keys near the end of boot, often after sshd answers:
        the console is read again every `interval` for at most `timeout`. Without
        `trust_on_first_use`, a machine whose keys never appear fails the launch.
        """
        for machine in machines:
            machine["trust_on_first_use"] = trust_on_first_use
        legacy: set[str] = set()

        def fetch(machine: Machine) -> list[str]:
            ec2 = self.aws.ec2
            instance_id = machine["instance_id"]
            try:
                if instance_id not in legacy:
                    try:
                        return requests.parse_host_keys(
                            ec2.get_console_output(InstanceId=instance_id, Latest=True).get("Output")
                        )
                    except botocore.exceptions.ClientError:
                        legacy.add(instance_id)  # Latest is for Nitro instances only
                output = ec2.get_console_output(InstanceId=instance_id).get("Output")
            except (botocore.exceptions.ClientError, botocore.exceptions.BotoCoreError):
                return []
            return requests.parse_host_keys(output)

        self.step = "reading host keys (GetConsoleOutput)"
        deadline = time.monotonic() + timeout
        waiting = list(machines)
        announced = False
        while waiting:
            with ThreadPoolExecutor(max_workers=min(16, len(waiting))) as pool:
                found = list(pool.map(fetch, waiting))
            for machine, keys in zip(waiting, found, strict=True):
                machine["host_keys"] = keys or None
            waiting = [machine for machine in waiting if not machine["host_keys"]]
            if not waiting or time.monotonic() + interval > deadline:
                break
            if not announced:
                self.say(f"waiting for {len(waiting)} machine(s) to print their host keys on the console")
                announced = True
            self.sleep(interval)
        if waiting:
            unpinned = [machine["instance_id"] for machine in waiting]
            if not trust_on_first_use:
                raise GpurunError(
                    f"host keys of {', '.join(unpinned[:4])}{' ...' if len(unpinned) > 4 else ''} did not appear in "
                    f"the console output within {timeout:.0f}s, and ssh.trust_on_first_use is false; use an AMI "
                    "whose cloud-init prints them, or allow trust on first use"
                )
            self.say(
                f"warning: host keys of {', '.join(unpinned[:4])}{' ...' if len(unpinned) > 4 else ''} are not in the "
                f"console output yet: trusting the first key seen, stored for this run only"
            )


def _count(states: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for state in states:
        counts[state] = counts.get(state, 0) + 1
    return dict(sorted(counts.items()))
