"""Pure builders for the AWS requests gpurun makes: plain dicts in, plain dicts out.

Nothing here imports boto3 or talks to AWS, so every default (tags, IMDSv2,
encrypted gp3, the guard in user data, the role policy scoped to one prefix)
is unit-tested on its own.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import math
import re
import shlex
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypedDict

if TYPE_CHECKING:  # boto3-stubs (test extras): the request shapes, checked by mypy, nothing imported at run time
    from mypy_boto3_ec2.literals import ResourceTypeType
    from mypy_boto3_ec2.type_defs import FilterTypeDef, IpPermissionTypeDef, TagSpecificationTypeDef
    from mypy_boto3_ec2.type_defs import TagTypeDef as Ec2Tag

TAG_RUN = "gpurun:run"
TAG_MANAGED = "gpurun:managed"
TAG_OWNER = "gpurun:owner"
IAM_PATH = "/gpurun/"
ROLE_POLICY_NAME = "gpurun-checkpoint-store"

#: Errors from run_instances that move on to the next zone, then the next type.
CAPACITY_ERRORS = frozenset(
    {
        "InsufficientInstanceCapacity",
        "InsufficientCapacity",
        "InsufficientHostCapacity",
        "Unsupported",
        "SpotMaxPriceTooLow",
        "MaxSpotInstanceCountExceeded",
        "UnfulfillableCapacity",
    }
)
#: Errors worth sending the same RunInstances again for (same ClientToken): AWS is busy, not full.
RETRYABLE_ERRORS = frozenset(
    {"RequestLimitExceeded", "Throttling", "ThrottlingException", "Unavailable", "ServiceUnavailable"}
)
#: Errors that stop the launch: a quota must be raised first.
QUOTA_ERRORS = frozenset({"VcpuLimitExceeded", "InstanceLimitExceeded"})

# Service Quotas names (and codes) of the per-family vCPU quotas.
_ON_DEMAND_QUOTAS = {
    "standard": ("Running On-Demand Standard (A, C, D, H, I, M, R, T, Z) instances", "L-1216C47A"),
    "g": ("Running On-Demand G and VT instances", "L-DB2E81BA"),
    "p": ("Running On-Demand P instances", "L-417A185B"),
    "inf": ("Running On-Demand Inf instances", None),
    "trn": ("Running On-Demand Trn instances", None),
    "dl": ("Running On-Demand DL instances", None),
    "f": ("Running On-Demand F instances", None),
    "x": ("Running On-Demand X instances", None),
}
_SPOT_QUOTAS = {
    "standard": ("All Standard (A, C, D, H, I, M, R, T, Z) Spot Instance Requests", "L-34B43A08"),
    "g": ("All G and VT Spot Instance Requests", "L-3819A6DF"),
    "p": ("All P Spot Instance Requests", "L-7212CCBC"),
    "inf": ("All Inf Spot Instance Requests", None),
    "trn": ("All Trn Spot Instance Requests", None),
    "dl": ("All DL Spot Instance Requests", None),
    "f": ("All F Spot Instance Requests", None),
    "x": ("All X Spot Instance Requests", None),
}


def resource_name(run: str) -> str:
    """The name of every resource a run creates (key pair, group, role, profile)."""
    return f"gpurun-{run}"


def _tag_value(value: str) -> str:
    """Tag values allow letters, digits, spaces and _.:/=+-@ (at most 256)."""
    return re.sub(r"[^\w .:/=+\-@]", "_", value)[:256]


class Tag(TypedDict):
    """One tag as IAM and Auto Scaling take it (EC2's own shape: `ec2_tags`)."""

    Key: str
    Value: str


def tags(run: str, owner: str) -> list[Tag]:
    return [
        {"Key": TAG_RUN, "Value": _tag_value(run)},
        {"Key": TAG_MANAGED, "Value": "true"},
        {"Key": TAG_OWNER, "Value": _tag_value(owner) or "unknown"},
        {"Key": "Name", "Value": _tag_value(resource_name(run))},
    ]


def ec2_tags(tag_list: Sequence[Tag]) -> list[Ec2Tag]:
    return [{"Key": tag["Key"], "Value": tag["Value"]} for tag in tag_list]


def tag_dict(items: Sequence[Mapping[str, Any]] | None) -> dict[str, str]:
    """Tags as AWS describes them ({"Key", "Value"} each), as one dict."""
    return {item["Key"]: item["Value"] for item in items or []}


def is_managed(items: Sequence[Mapping[str, Any]] | None, run: str | None = None) -> bool:
    """True when the tags say gpurun made this (and, given `run`, for that run)."""
    found = tag_dict(items)
    if found.get(TAG_MANAGED) != "true":
        return False
    return run is None or found.get(TAG_RUN) == run


def tag_specifications(
    resource_types: Sequence[ResourceTypeType], tag_list: Sequence[Tag]
) -> list[TagSpecificationTypeDef]:
    return [{"ResourceType": kind, "Tags": ec2_tags(tag_list)} for kind in resource_types]


def run_filters(run: str | None = None) -> list[FilterTypeDef]:
    """EC2 (and Auto Scaling) filters that find what gpurun made (for one run, or for all)."""
    filters: list[FilterTypeDef] = [{"Name": f"tag:{TAG_MANAGED}", "Values": ["true"]}]
    if run is not None:
        filters.append({"Name": f"tag:{TAG_RUN}", "Values": [run]})
    return filters


LIVE_STATES = ["pending", "running", "stopping", "stopped", "shutting-down"]


def instance_filters(run: str | None = None) -> list[FilterTypeDef]:
    return [*run_filters(run), {"Name": "instance-state-name", "Values": LIVE_STATES}]


def client_token(run: str, attempt: int, nonce: str = "") -> str:
    """Idempotency token: a retried RunInstances returns the same instances, not new ones.

    `nonce` is fresh per launch, so launching a run of the same name again
    never gets back the (terminated) instances of an earlier launch.
    """
    digest = hashlib.sha256(f"{run}/{nonce}/{attempt}".encode()).hexdigest()[:40]
    return f"gpurun-{digest}"


def block_device_mappings(root_device: str, disk_gb: int) -> list[dict[str, Any]]:
    return [
        {
            "DeviceName": root_device,
            "Ebs": {
                "VolumeSize": int(disk_gb),
                "VolumeType": "gp3",
                "Encrypted": True,
                "DeleteOnTermination": True,
            },
        }
    ]


def market_options(spot: bool, max_price: float | None) -> dict[str, Any] | None:
    if not spot:
        return None
    options: dict[str, Any] = {"SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"}
    if max_price is not None:
        options["MaxPrice"] = f"{max_price:.6f}".rstrip("0").rstrip(".") or "0"
    return {"MarketType": "spot", "SpotOptions": options}


def run_instances_kwargs(
    *,
    run: str,
    owner: str,
    ami_id: str,
    root_device: str,
    instance_type: str,
    nodes: int,
    disk_gb: int,
    key_name: str,
    security_group_id: str,
    subnet_id: str | None,
    user_data: str,
    spot: bool = False,
    max_price: float | None = None,
    instance_profile: str | None = None,
    placement_group: str | None = None,
    associate_public_ip: bool = False,
    attempt: int = 0,
    nonce: str = "",
) -> dict[str, Any]:
    """The whole RunInstances request for one attempt (one type, one subnet)."""
    tag_list = tags(run, owner)
    resource_types: list[ResourceTypeType] = ["instance", "volume", "network-interface"]
    if spot:
        resource_types.append("spot-instances-request")
    kwargs: dict[str, Any] = {
        "ImageId": ami_id,
        "InstanceType": instance_type,
        "MinCount": nodes,
        "MaxCount": nodes,
        "KeyName": key_name,
        "UserData": user_data,
        "InstanceInitiatedShutdownBehavior": "terminate",
        "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled", "HttpPutResponseHopLimit": 1},
        "BlockDeviceMappings": block_device_mappings(root_device, disk_gb),
        "TagSpecifications": tag_specifications(resource_types, tag_list),
        "ClientToken": client_token(run, attempt, nonce),
    }
    if associate_public_ip:
        # A subnet that does not hand out public addresses by itself.
        interface: dict[str, Any] = {
            "DeviceIndex": 0,
            "AssociatePublicIpAddress": True,
            "DeleteOnTermination": True,
            "Groups": [security_group_id],
        }
        if subnet_id:
            interface["SubnetId"] = subnet_id
        kwargs["NetworkInterfaces"] = [interface]
    else:
        kwargs["SecurityGroupIds"] = [security_group_id]
        if subnet_id:
            kwargs["SubnetId"] = subnet_id
    market = market_options(spot, max_price)
    if market:
        kwargs["InstanceMarketOptions"] = market
    if instance_profile:
        kwargs["IamInstanceProfile"] = {"Name": instance_profile}
    if placement_group:
        kwargs["Placement"] = {"GroupName": placement_group}
    return kwargs


def ingress_permissions(
    ssh_cidr: str, *, port: int = 22, group_id: str | None = None, nodes: int = 1
) -> list[IpPermissionTypeDef]:
    """TCP `port` from `ssh_cidr` only; all traffic between the run's own nodes when nodes > 1."""
    network = ipaddress.ip_network(ssh_cidr, strict=False)
    rule: IpPermissionTypeDef = {"IpProtocol": "tcp", "FromPort": port, "ToPort": port}
    if network.version == 4:
        rule["IpRanges"] = [{"CidrIp": str(network), "Description": "gpurun ssh"}]
    else:
        rule["Ipv6Ranges"] = [{"CidrIpv6": str(network), "Description": "gpurun ssh"}]
    permissions = [rule]
    if nodes > 1 and group_id:
        permissions.append(
            {
                "IpProtocol": "-1",
                "UserIdGroupPairs": [{"GroupId": group_id, "Description": "gpurun nodes of one run"}],
            }
        )
    return permissions


def describe_rule(ssh_cidr: str, *, port: int = 22, nodes: int = 1) -> str:
    text = f"TCP {port} from {ssh_cidr} only"
    if nodes > 1:
        text += "; all traffic between the run's own nodes"
    return text


def is_open_to_world(ssh_cidr: str) -> bool:
    return ipaddress.ip_network(ssh_cidr, strict=False).prefixlen == 0


def parse_s3_url(url: str) -> tuple[str, str]:
    """(bucket, prefix without slashes) of s3://bucket/prefix."""
    if not url.startswith("s3://"):
        raise ValueError(f"{url!r} is not an s3:// URL")
    bucket, _, prefix = url[len("s3://") :].partition("/")
    return bucket, prefix.strip("/")


def trust_policy() -> dict[str, Any]:
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"Service": "ec2.amazonaws.com"},
                "Action": "sts:AssumeRole",
            }
        ],
    }


def _run_key(prefix: str, run: str) -> str:
    return f"{prefix}/{run}" if prefix else run


def _run_statements(sid: str, actions: list[str], bucket: str, key: str, partition: str) -> list[dict[str, Any]]:
    """Object actions on `<key>/*` and a listing that may name only keys under it."""
    return [
        {
            "Sid": f"{sid}Objects",
            "Effect": "Allow",
            "Action": actions,
            "Resource": f"arn:{partition}:s3:::{bucket}/{key}/*",
        },
        {
            "Sid": f"{sid}List",
            "Effect": "Allow",
            "Action": "s3:ListBucket",
            "Resource": f"arn:{partition}:s3:::{bucket}",
            "Condition": {"StringLike": {"s3:prefix": [f"{key}/*"]}},
        },
    ]


def role_policy(
    bucket: str,
    prefix: str,
    run: str,
    partition: str = "aws",
    *,
    read_from: tuple[str, str, str] | None = None,
    parameter_arns: list[str] | tuple[str, ...] = (),
    secret_arns: list[str] | tuple[str, ...] = (),
) -> dict[str, Any]:
    """What the machine may do, and nothing else: read, write and delete its own run's objects
    (`<prefix>/<run>/*`, its ranks included), read those of the run it resumes from
    (`read_from`: bucket, prefix, run), and read exactly the spec's SSM parameters and
    Secrets Manager secrets. A compromised job cannot touch the store's other runs."""
    statements = _run_statements(
        "ThisRun", ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"], bucket, _run_key(prefix, run), partition
    )
    if read_from is not None and read_from != (bucket, prefix, run):
        source_bucket, source_prefix, source_run = read_from
        statements += _run_statements(
            "ResumedRun", ["s3:GetObject"], source_bucket, _run_key(source_prefix, source_run), partition
        )
    if parameter_arns:
        statements.append(
            {
                "Sid": "SecretParameters",
                "Effect": "Allow",
                "Action": "ssm:GetParameter",
                "Resource": sorted(set(parameter_arns)),
            }
        )
    if secret_arns:
        statements.append(
            {
                "Sid": "Secrets",
                "Effect": "Allow",
                "Action": "secretsmanager:GetSecretValue",
                "Resource": sorted(set(secret_arns)),
            }
        )
    return {"Version": "2012-10-17", "Statement": statements}


def parameter_arn(path: str, *, region: str, account: str, partition: str = "aws") -> str:
    """The ARN of an SSM parameter named `/a/b` (or `a`, a name without a path)."""
    return f"arn:{partition}:ssm:{region}:{account}:parameter/{path.lstrip('/')}"


def secret_arn(name: str, *, region: str, account: str, partition: str = "aws") -> str:
    """The ARN of a Secrets Manager secret: AWS appends six random characters to the name."""
    if name.startswith("arn:"):
        return name
    return f"arn:{partition}:secretsmanager:{region}:{account}:secret:{name}-??????"


def policy_json(document: dict[str, Any]) -> str:
    return json.dumps(document, separators=(",", ":"), sort_keys=True)


GUARD_STATE = "/var/lib/gpurun"


def idle_guard_script(idle_s: int, poll_s: int = 30) -> str:
    """Power off once no ~/gpurun/*/job.pid process has been alive for `idle_s`, after a job existed."""
    return "\n".join(
        [
            "#!/bin/bash",
            f"STATE={GUARD_STATE}",
            f"IDLE={int(idle_s)}",
            "seen=0",
            "idle_since=$(date +%s)",
            f"while sleep {poll_s}; do",
            "  alive=0",
            "  any=0",
            "  for pidfile in /home/*/gpurun/*/job.pid /root/gpurun/*/job.pid; do",
            '    [ -e "$pidfile" ] || continue',
            "    any=1",
            '    pid=$(tr -dc 0-9 < "$pidfile" 2>/dev/null)',
            '    if [ -n "$pid" ] && [ -d "/proc/$pid" ] && ! grep -q "^State:.*Z" "/proc/$pid/status" 2>/dev/null; then',
            "      alive=1",
            "    fi",
            "  done",
            "  now=$(date +%s)",
            '  if [ "$alive" = 1 ]; then seen=1; idle_since=$now; continue; fi',
            '  if [ "$seen" = 0 ]; then',
            '    if [ "$any" = 1 ]; then seen=1; idle_since=$now; fi',
            "    continue",
            "  fi",
            '  if [ $((now - idle_since)) -ge "$IDLE" ]; then',
            '    echo "gpurun: no job alive for ${IDLE}s, powering off" >> "$STATE/guard.log"',
            "    systemctl poweroff || shutdown -h now",
            "  fi",
            "done",
        ]
    )


def arm_script(*, idle: bool) -> str:
    """Run at every boot: power off at the deadline written on first boot (a reboot does not disarm it)."""
    lines = [
        "#!/bin/bash",
        f"STATE={GUARD_STATE}",
        'deadline=$(cat "$STATE/deadline")',
        "left=$((deadline - $(date +%s)))",
        'if [ "$left" -le 0 ]; then',
        "  echo 'gpurun: max_runtime reached' >> \"$STATE/guard.log\"",
        "  systemctl poweroff || shutdown -h now",
        "  exit 0",
        "fi",
        "if command -v systemd-run >/dev/null 2>&1 && "
        'systemd-run --unit=gpurun-max-runtime --on-active="${left}s" /bin/systemctl poweroff; then',
        '  echo "gpurun: power off in ${left}s" >> "$STATE/guard.log"',
        "else",
        "  shutdown -h +$(((left + 59) / 60)) 'gpurun: max_runtime reached' "
        '|| (nohup sh -c "sleep $left; poweroff -f" >/dev/null 2>&1 &)',
        "fi",
    ]
    if idle:
        lines += [
            "if ! (command -v systemd-run >/dev/null 2>&1 && "
            'systemd-run --unit=gpurun-idle-guard "$STATE/idle-guard"); then',
            '  nohup setsid "$STATE/idle-guard" >/dev/null 2>&1 &',
            "fi",
        ]
    return "\n".join(lines)


def user_data(*, run: str, max_runtime: float, idle_timeout: float | None, poll_s: int = 30) -> str:
    """A bash script that arms the guard; it holds no credentials and no secrets.

    `max_runtime`: the first boot writes a deadline; at every boot a systemd
    timer (or `shutdown -h +N` where systemd-run is missing) powers the machine
    off at that deadline, and InstanceInitiatedShutdownBehavior=terminate turns
    that into termination. `idle_timeout`: once a job has existed under
    ~/gpurun/*/job.pid, the machine powers off when no such process has been
    alive for that long.
    """
    runtime_s = max(60, int(math.ceil(max_runtime)))
    lines = [
        "#!/bin/bash",
        f"# gpurun guard for run {shlex.quote(run)}: this script holds no credentials.",
        "set -u",
        f"STATE={GUARD_STATE}",
        'mkdir -p "$STATE"',
        f"RUNTIME={runtime_s}",
        '[ -s "$STATE/deadline" ] || echo $(($(date +%s) + RUNTIME)) > "$STATE/deadline"',
        "# 1. max_runtime: power off (the instance then terminates) whatever happens to the laptop.",
        "cat > \"$STATE/arm\" <<'GPURUN_ARM'",
        arm_script(idle=bool(idle_timeout)),
        "GPURUN_ARM",
    ]
    if idle_timeout:
        idle_s = max(60, int(math.ceil(idle_timeout)))
        lines += [
            "# 2. idle_timeout: power off when no job has been alive for this long, after a job existed.",
            "cat > \"$STATE/idle-guard\" <<'GPURUN_IDLE'",
            idle_guard_script(idle_s, poll_s),
            "GPURUN_IDLE",
            'chmod 755 "$STATE/idle-guard"',
        ]
    lines += [
        'chmod 755 "$STATE/arm"',
        "# Re-armed at every boot from the same deadline.",
        "mkdir -p /var/lib/cloud/scripts/per-boot",
        'ln -sf "$STATE/arm" /var/lib/cloud/scripts/per-boot/gpurun-guard',
        '"$STATE/arm"',
    ]
    return "\n".join(lines) + "\n"


_HOST_KEY_BLOCK = re.compile(
    r"-----BEGIN SSH HOST KEY KEYS-----(.*?)-----END SSH HOST KEY KEYS-----",
    re.DOTALL,
)
_HOST_KEY_LINE = re.compile(r"^(ssh-ed25519|ecdsa-sha2-nistp\d+|ssh-rsa)\s+([A-Za-z0-9+/=]+)")


def parse_host_keys(console_output: str | None) -> list[str]:
    """Host public keys that cloud-init printed to the console ("type base64" lines)."""
    if not console_output:
        return []
    found: list[str] = []
    for block in _HOST_KEY_BLOCK.findall(console_output):
        for raw in block.splitlines():
            # Console lines may carry a "[   12.3] cloud-init[..]: " prefix.
            line = raw.strip()
            for start in ("ssh-ed25519", "ecdsa-sha2-", "ssh-rsa"):
                index = line.find(start)
                if index > 0:
                    line = line[index:]
                    break
            match = _HOST_KEY_LINE.match(line)
            if match:
                key = f"{match.group(1)} {match.group(2)}"
                if key not in found:
                    found.append(key)
    return found


def error_kind(code: str) -> str | None:
    """'capacity', 'quota' or None for a RunInstances error code."""
    if code in CAPACITY_ERRORS:
        return "capacity"
    if code in QUOTA_ERRORS:
        return "quota"
    return None


def instance_family(instance_type: str) -> str:
    match = re.match(r"^([a-z]+)", instance_type)
    return match.group(1) if match else instance_type


def quota_for(instance_type: str, spot: bool) -> tuple[str, str | None]:
    """The Service Quotas name (and code where known) that bounds this type's vCPUs."""
    family = instance_family(instance_type)
    if family.startswith("g") or family == "vt":
        bucket = "g"
    elif family.startswith("p"):
        bucket = "p"
    elif family.startswith("inf"):
        bucket = "inf"
    elif family.startswith("trn"):
        bucket = "trn"
    elif family.startswith("dl"):
        bucket = "dl"
    elif family.startswith("f"):
        bucket = "f"
    elif family.startswith("x"):
        bucket = "x"
    else:
        bucket = "standard"
    table = _SPOT_QUOTAS if spot else _ON_DEMAND_QUOTAS
    return table[bucket]


def quota_message(code: str, instance_type: str, *, spot: bool, vcpus: int | None, nodes: int, region: str) -> str:
    name, quota_code = quota_for(instance_type, spot)
    need = f"{vcpus * nodes} vCPUs" if vcpus else f"{nodes} instance(s)"
    how = (
        f"aws service-quotas request-service-quota-increase --region {region} --service-code ec2 "
        f"--quota-code {quota_code} --desired-value <vCPUs>"
        if quota_code
        else f"https://console.aws.amazon.com/servicequotas/home/services/ec2/quotas (region {region})"
    )
    return f"{instance_type} x{nodes} needs {need} but the quota {name!r} is too low ({code}); raise it with: {how}"


def capacity_table(attempts: list[tuple[str, str, str, str]]) -> list[str]:
    """A small text table of (type, zone, code, message) attempts, one string per line."""
    rows = [("type", "zone", "error", "message"), *attempts]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    out = []
    for row in rows:
        message = row[3] if len(row[3]) <= 100 else row[3][:97] + "..."
        out.append(("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:3])) + "  " + message).rstrip())
    return out


def spot_price_note(spot_price: float | None, max_price: float | None) -> str:
    """The table's message for SpotMaxPriceTooLow: the price now against the cap that refused it."""
    now = f"spot price now ${spot_price:.4f}/h" if spot_price is not None else "spot price now unknown"
    cap = f"aws.max_price ${max_price:g}/h" if max_price is not None else "the maximum price"
    return f"{now}, above {cap}"


SPOT_PRICE_ADVICE = (
    "SpotMaxPriceTooLow: raise aws.max_price (or remove it: the on-demand price is then the cap), "
    "or set aws.spot: false for on-demand"
)
