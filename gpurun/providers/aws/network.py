"""Where the machines go and how they are reached: subnets, the caller's IP, the SSH probe."""

from __future__ import annotations

import ipaddress
import os
import socket
import threading
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import botocore.exceptions

from gpurun.errors import BadInput
from gpurun.providers.aws.session import Aws, client_error_code, client_error_message

DEFAULT_IP_ECHO_URLS = (
    "https://checkip.amazonaws.com",
    "https://api.ipify.org",
    "https://ifconfig.me/ip",
)


@dataclass(frozen=True)
class Subnet:
    id: str
    zone: str
    vpc_id: str
    public_ip_on_launch: bool


def ip_echo_urls() -> list[str]:
    raw = os.environ.get("GPURUN_IP_ECHO_URLS", "")
    urls = [part.strip() for part in raw.replace(",", " ").split() if part.strip()]
    return urls or list(DEFAULT_IP_ECHO_URLS)


def detect_public_ip(timeout: float = 5.0) -> str:
    """The caller's public address, from the first "what is my IP" service that answers."""
    urls = ip_echo_urls()
    problems = []
    for url in urls:
        try:
            request = urllib.request.Request(url, headers={"User-Agent": "gpurun"})
            with urllib.request.urlopen(request, timeout=timeout) as answer:  # noqa: S310 (fixed https URLs)
                text = answer.read(200).decode("ascii", "replace").strip()
            return str(ipaddress.ip_address(text))
        except (OSError, ValueError) as error:
            problems.append(f"{url}: {getattr(error, 'reason', error)}")
    raise BadInput(
        f"aws.ssh_cidr: could not find your public IP ({', '.join(problems)[:300]}); "
        "set it with --set aws.ssh_cidr=<your-ip>/32"
    )


def resolve_cidr(ssh_cidr: str) -> tuple[str, str]:
    """(CIDR, where it came from) for `auto` or a CIDR written in the spec."""
    if ssh_cidr != "auto":
        return str(ipaddress.ip_network(ssh_cidr, strict=False)), "from aws.ssh_cidr"
    address = ipaddress.ip_address(detect_public_ip())
    suffix = 32 if address.version == 4 else 128
    return f"{address}/{suffix}", "your public IP"


def _subnet(item: Mapping[str, Any]) -> Subnet:
    return Subnet(
        id=item["SubnetId"],
        zone=item["AvailabilityZone"],
        vpc_id=item["VpcId"],
        public_ip_on_launch=bool(item.get("MapPublicIpOnLaunch")),
    )


def find_subnets(aws: Aws, *, subnet_id: str | None, vpc_id: str | None) -> tuple[str, list[Subnet]]:
    """(VPC id, subnets to try, one per zone, sorted by zone)."""
    ec2 = aws.ec2
    try:
        if subnet_id:
            try:
                items = ec2.describe_subnets(SubnetIds=[subnet_id])["Subnets"]
            except botocore.exceptions.ClientError as error:
                if client_error_code(error).startswith("InvalidSubnetID"):
                    raise BadInput(f"aws.subnet_id: {subnet_id} does not exist in {aws.region}") from None
                raise
            subnet = _subnet(items[0])
            if vpc_id and subnet.vpc_id != vpc_id:
                raise BadInput(f"aws.subnet_id: {subnet_id} is in {subnet.vpc_id}, not in aws.vpc_id {vpc_id}")
            return subnet.vpc_id, [subnet]
        if vpc_id:
            try:
                ec2.describe_vpcs(VpcIds=[vpc_id])
            except botocore.exceptions.ClientError as error:
                if client_error_code(error).startswith("InvalidVpcID"):
                    raise BadInput(f"aws.vpc_id: {vpc_id} does not exist in {aws.region}") from None
                raise
            items = ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [vpc_id]}])["Subnets"]
            if not items:
                raise BadInput(f"aws.vpc_id: {vpc_id} has no subnets; set aws.subnet_id")
        else:
            vpcs = ec2.describe_vpcs(Filters=[{"Name": "isDefault", "Values": ["true"]}])["Vpcs"]
            if not vpcs:
                raise BadInput(f"aws.vpc_id: {aws.region} has no default VPC; set aws.subnet_id (or aws.vpc_id)")
            vpc_id = vpcs[0]["VpcId"]
            items = ec2.describe_subnets(
                Filters=[{"Name": "vpc-id", "Values": [vpc_id]}, {"Name": "default-for-az", "Values": ["true"]}]
            )["Subnets"]
            if not items:
                raise BadInput(f"aws.subnet_id: the default VPC {vpc_id} has no default subnets; set aws.subnet_id")
    except botocore.exceptions.ClientError as error:
        raise BadInput(f"aws: cannot look up the network: {client_error_message(error)}") from None
    # One subnet per zone: the one that hands out public addresses, else the first.
    by_zone: dict[str, Subnet] = {}
    for subnet in sorted((_subnet(item) for item in items), key=lambda s: (s.zone, not s.public_ip_on_launch, s.id)):
        by_zone.setdefault(subnet.zone, subnet)
    return vpc_id, [by_zone[zone] for zone in sorted(by_zone)]


def ssh_answers(host: str, port: int, timeout: float = 5.0) -> bool:
    """True when something at host:port speaks SSH (sends an `SSH-` banner)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as connection:
            connection.settimeout(timeout)
            return connection.recv(4).startswith(b"SSH-")
    except OSError:
        return False


def wait_ssh_answer(
    host: str, port: int, deadline: float, interval: float = 3.0, stop: threading.Event | None = None
) -> bool:
    """Probe until SSH answers, `deadline` passes, or `stop` is set (Ctrl-C: the caller leaves at once)."""
    stop = stop or threading.Event()
    while not stop.is_set():
        if ssh_answers(host, port, timeout=min(5.0, max(0.5, deadline - time.monotonic()))):
            return True
        if time.monotonic() >= deadline:
            return False
        stop.wait(min(interval, max(0.0, deadline - time.monotonic())))
    return False
