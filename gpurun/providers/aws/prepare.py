"""Everything launch needs to know, found with read-only calls: the plan. Nothing is created here.

Bad input (a missing AMI, an unknown type, a region that does not exist, a
disk smaller than the image) is raised from here, before any resource exists.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from gpurun.durations import format_duration
from gpurun.errors import BadInput
from gpurun.providers.aws import requests
from gpurun.providers.aws.ami import AmiInfo
from gpurun.providers.aws.images import ImageChoice, resolve_spec_ami
from gpurun.providers.aws.instance_types import TypeInfo, describe_types, zones_offering
from gpurun.providers.aws.network import Subnet, find_subnets, resolve_cidr
from gpurun.providers.aws.pricing import ondemand_price, spot_prices
from gpurun.providers.aws.session import Aws, Identity, check_identity

if TYPE_CHECKING:
    from gpurun.spec import Spec


@dataclass
class Prepared:
    aws: Aws
    identity: Identity
    run: str
    types: list[TypeInfo]
    amis: dict[str, AmiInfo]
    vpc_id: str
    subnets: dict[str, list[Subnet]]  # per type, in the order to try
    ssh_cidr: str
    cidr_source: str
    spot: dict[str, dict[str, float]]  # per type: zone -> current spot price
    store: tuple[str, str] | None  # (bucket, prefix) when the store is s3://
    instance_profile: str | None  # the user's own profile, when given
    warnings: list[str] = field(default_factory=list)
    #: For `ami: image:<name>` or `auto`: per arch, which gpurun image (or fallback) and why.
    image_choices: dict[str, ImageChoice] = field(default_factory=dict)

    @property
    def setup_skipped(self) -> str | None:
        """Why setup need not run (every node boots a gpurun image with the spec's setup hash), or None."""
        choices = list(self.image_choices.values())
        if choices and all(choice.skip_setup for choice in choices):
            return choices[0].reason
        return None

    @property
    def owner(self) -> str:
        return self.identity.owner

    def zones(self) -> list[str]:
        seen: list[str] = []
        for subnets in self.subnets.values():
            for subnet in subnets:
                if subnet.zone not in seen:
                    seen.append(subnet.zone)
        return seen

    def placement(self, nodes: int) -> bool:
        return nodes > 1 and any(info.cluster_placement for info in self.types)


def prepare(aws: Aws, spec: Spec, run: str) -> Prepared:
    settings = spec.aws
    identity = check_identity(aws)
    warnings: list[str] = []
    names = list(dict.fromkeys(settings.instance_type))
    infos = describe_types(aws, names)
    types = [infos[name] for name in names]
    for info in types:
        if not info.has_gpu:
            warnings.append(f"{info.name} has no GPU")
        if settings.spot and not info.spot_supported:
            raise BadInput(f"aws.spot: {info.name} is not offered as spot; set aws.spot=false or pick another type")

    amis: dict[str, AmiInfo] = {}
    image_choices: dict[str, ImageChoice] = {}
    for arch in dict.fromkeys(info.arch for info in types):
        amis[arch], choice = resolve_spec_ami(aws, spec, arch)
        if choice is not None:
            image_choices[arch] = choice
    for ami in amis.values():
        if ami.snapshot_gb and settings.disk_gb < ami.snapshot_gb:
            raise BadInput(
                f"aws.disk_gb: {settings.disk_gb} GB is smaller than the root snapshot of {ami.id} "
                f"({ami.snapshot_gb} GB); set aws.disk_gb to at least {ami.snapshot_gb}"
            )

    vpc_id, subnets = find_subnets(aws, subnet_id=settings.subnet_id, vpc_id=settings.vpc_id)
    offered = zones_offering(aws, names) if not settings.subnet_id else {}
    spot: dict[str, dict[str, float]] = {name: spot_prices(aws.ec2, name) for name in names}
    per_type: dict[str, list[Subnet]] = {}
    for info in types:
        zones = offered.get(info.name)
        usable = [subnet for subnet in subnets if not offered or (zones and subnet.zone in zones)]
        if settings.spot and spot.get(info.name):
            prices = spot[info.name]
            usable.sort(key=lambda subnet: (prices.get(subnet.zone, float("inf")), subnet.zone))
        if usable:
            per_type[info.name] = usable
        else:
            warnings.append(f"{info.name} is not offered in any zone of {vpc_id}")
    if not per_type:
        raise BadInput(
            f"aws.instance_type: none of {', '.join(names)} is offered in the zones of {vpc_id} ({aws.region})"
        )
    types = [info for info in types if info.name in per_type]

    cidr, source = resolve_cidr(settings.ssh_cidr)
    if requests.is_open_to_world(cidr):
        warnings.append(f"SSH is open to the whole internet (aws.ssh_cidr={cidr}); use auto or your own /32")

    store = None
    url = spec.checkpoint.store
    if url and url.startswith("s3://") and not settings.iam_instance_profile:
        store = requests.parse_s3_url(url)
    return Prepared(
        aws=aws,
        identity=identity,
        run=run,
        types=types,
        amis=amis,
        vpc_id=vpc_id,
        subnets=per_type,
        ssh_cidr=cidr,
        cidr_source=source,
        spot=spot,
        store=store,
        instance_profile=settings.iam_instance_profile,
        warnings=warnings,
        image_choices=image_choices,
    )


def plan_rows(prepared: Prepared, spec: Spec) -> list[tuple[str, str]]:
    settings = spec.aws
    run = prepared.run
    name = requests.resource_name(run)
    rows: list[tuple[str, str]] = [
        ("region", f"{prepared.aws.region} (account {prepared.identity.account}, as {prepared.identity.owner})"),
    ]
    for arch, ami in prepared.amis.items():
        label = "AMI" if len(prepared.amis) == 1 else f"AMI ({arch})"
        rows.append((label, ami.describe()))
        if arch in prepared.image_choices:
            rows.append(
                ("image" if len(prepared.amis) == 1 else f"image ({arch})", prepared.image_choices[arch].reason)
            )
    for index, info in enumerate(prepared.types):
        label = "instance type" if index == 0 else f"fallback type {index}"
        rows.append((label, f"{info.name}: {info.describe()}"))
    for info in prepared.types:
        ondemand = ondemand_price(info.name, prepared.aws.region)
        parts = [ondemand.describe() if ondemand else "on-demand price unknown"]
        zones = prepared.spot.get(info.name) or {}
        if zones:
            zone, price = min(zones.items(), key=lambda item: item[1])
            parts.append(f"spot ${price:.4f}/h now ({zone})")
        else:
            parts.append("spot price unknown")
        if settings.spot:
            parts.append("launching as spot" + (f", max ${settings.max_price:g}/h" if settings.max_price else ""))
        if settings.nodes > 1 and ondemand:
            parts.append(f"{settings.nodes} nodes: ${ondemand.usd_per_hour * settings.nodes:.4f}/h on-demand")
        rows.append((f"price/hour {info.name}", ", ".join(parts)))
    rows.append(
        (
            "nodes",
            str(settings.nodes) + (f" (cluster placement group {name})" if prepared.placement(settings.nodes) else ""),
        )
    )
    rows.append(("zones to try", ", ".join(prepared.zones()) + f" ({prepared.vpc_id})"))
    rows.append(
        (
            "security rule",
            f"{requests.describe_rule(prepared.ssh_cidr, port=spec.ssh.port, nodes=settings.nodes)} "
            f"({prepared.cidr_source}); group {name}",
        )
    )
    tags = requests.tags(run, prepared.owner)
    rows += _fixed_rows(spec, name, tags, prepared.store, prepared.instance_profile, prepared.aws.partition)
    for warning in prepared.warnings:
        rows.append(("warning", warning))
    return rows


def _fixed_rows(
    spec: Spec,
    name: str,
    tags: Sequence[Mapping[str, Any]],
    store: tuple[str, str] | None,
    instance_profile: str | None,
    partition: str,
) -> list[tuple[str, str]]:
    """The rows that follow from the spec alone (no AWS call): key, disk, metadata, tags, guard, policy."""
    settings = spec.aws
    rows = [
        ("key pair", f"fresh ed25519 {name}; private key kept here, mode 0600"),
        ("disk", f"{settings.disk_gb} GB gp3, encrypted, deleted with the instance"),
        ("metadata", "IMDSv2 required (HttpTokens=required)"),
        ("tags", ", ".join(f"{tag['Key']}={tag['Value']}" for tag in tags)),
    ]
    guard = f"the machine terminates itself after {format_duration(settings.max_runtime)}"
    if settings.idle_timeout:
        guard += f", or {format_duration(settings.idle_timeout)} after the last job ends"
    rows.append(("guard", guard + " (shutdown behaviour: terminate)"))
    if store:
        bucket, prefix = store
        where = f"{bucket}/{prefix}/*" if prefix else f"{bucket}/*"
        rows.append(
            (
                "role policy",
                f"role {name}: s3:GetObject/PutObject/DeleteObject on arn:{partition}:s3:::{where}, "
                f"s3:ListBucket on {bucket} limited to prefix {prefix or '(all)'}; nothing else",
            )
        )
    elif instance_profile:
        rows.append(("role policy", f"your instance profile {instance_profile} (not created, not removed)"))
    else:
        rows.append(("role policy", "none (checkpoint store is not s3://); the machine gets no AWS access"))
    return rows


UNRESOLVED = "not resolved (needs AWS credentials)"


def offline_plan_rows(spec: Spec, run: str) -> list[tuple[str, str]]:
    """What `--dry-run` can show without credentials: everything that follows from the spec,
    the shipped on-demand prices and the caller's IP; the rest is marked unresolved."""
    settings = spec.aws
    name = requests.resource_name(run)
    rows: list[tuple[str, str]] = [("region", f"{settings.region} (account: {UNRESOLVED})")]
    rows.append(("AMI", f"{settings.ami}: {UNRESOLVED}"))
    names = list(dict.fromkeys(settings.instance_type))
    for index, type_name in enumerate(names):
        label = "instance type" if index == 0 else f"fallback type {index}"
        rows.append((label, f"{type_name}: GPUs, vCPUs and memory {UNRESOLVED}"))
    for type_name in names:
        ondemand = ondemand_price(type_name, settings.region)
        parts = [ondemand.describe() if ondemand else "on-demand price unknown", f"spot price {UNRESOLVED}"]
        if settings.spot:
            parts.append("launching as spot" + (f", max ${settings.max_price:g}/h" if settings.max_price else ""))
        rows.append((f"price/hour {type_name}", ", ".join(parts)))
    rows.append(("nodes", str(settings.nodes)))
    rows.append(("zones to try", UNRESOLVED))
    try:
        cidr, source = resolve_cidr(settings.ssh_cidr)
        rule = f"{requests.describe_rule(cidr, port=spec.ssh.port, nodes=settings.nodes)} ({source}); group {name}"
    except (BadInput, ValueError) as error:
        rule = f"not resolved: {error}"
    rows.append(("security rule", rule))
    owner_tags = [
        {**tag, "Value": "<your AWS identity: not resolved>"} if tag["Key"] == requests.TAG_OWNER else tag
        for tag in requests.tags(run, "unknown")
    ]
    store = None
    url = spec.checkpoint.store
    if url and url.startswith("s3://") and not settings.iam_instance_profile:
        store = requests.parse_s3_url(url)
    rows += _fixed_rows(spec, name, owner_tags, store, settings.iam_instance_profile, "aws")
    return rows
