"""What each provider can do, and how to reach its machines, as plain data.

app/ decides from these, never from a provider's name (scripts/check_layers.py
enforces it). This module imports nothing heavy: status and teardown ask it for
every run, and the AWS provider's boto3 stays unloaded until AWS is called.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from gpurun.errors import BadInput
from gpurun.models import Machine, RunRecord


@dataclass(frozen=True)
class Capabilities:
    #: Machines are created for the run and end with it: their disk is no place for checkpoints,
    #: their files need no cleaning, and one that no longer answers is ended anyway.
    machines_disposable: bool
    #: The run directory is on this computer (files are read directly, nothing to connect to).
    run_dir_here: bool
    #: A lost machine can be replaced by the provider (AWS Auto Scaling, with recovery on).
    replaces_lost_machines: bool
    #: A workflow keeps one connection per machine (the user's own hosts, looked at while acquiring).
    keeps_connections: bool
    #: Machines may be reclaimed with a notice (spot): the agent watches for it.
    spot_notice: bool
    #: A live machine can be baked into an image that later launches start from (`gpurun image create`).
    bakes_images: bool = False
    #: The run directory lies under the login's home, which is known only once connected (the AMI decides it).
    run_dir_under_login_home: bool = False
    #: Machines are rented in the AWS account of the spec's `aws:` section: a launch needs its credentials,
    #: network, instance types, AMI, vCPU quota and the caller's IP (what `gpurun doctor` checks first).
    rents_aws_machines: bool = False
    #: The machines are the hosts the spec lists (`ssh.hosts`): each must log in and offer python3, tar and GPUs.
    machines_are_spec_hosts: bool = False
    #: What the run creates carries its `gpurun:run` tag, so `teardown --orphans` finds it without a record.
    resources_tagged: bool = False


CAPABILITIES = {
    "local": Capabilities(
        machines_disposable=False,
        run_dir_here=True,
        replaces_lost_machines=False,
        keeps_connections=False,
        spot_notice=False,
    ),
    "ssh": Capabilities(
        machines_disposable=False,
        run_dir_here=False,
        replaces_lost_machines=False,
        keeps_connections=True,
        spot_notice=False,
        machines_are_spec_hosts=True,
    ),
    "aws": Capabilities(
        machines_disposable=True,
        run_dir_here=False,
        replaces_lost_machines=True,
        keeps_connections=False,
        spot_notice=True,
        bakes_images=True,
        run_dir_under_login_home=True,
        rents_aws_machines=True,
        resources_tagged=True,
    ),
}


#: What a provider gpurun does not know can do (a record from a newer gpurun, or planted): nothing.
NOTHING = Capabilities(
    machines_disposable=False,
    run_dir_here=False,
    replaces_lost_machines=False,
    keeps_connections=False,
    spot_notice=False,
)


def capabilities(provider: str) -> Capabilities:
    """The provider's capabilities; BadInput for a name gpurun does not know."""
    try:
        return CAPABILITIES[provider]
    except KeyError:
        raise BadInput(f"unknown provider {provider!r}; use aws, ssh or local") from None


def capabilities_of(record: Mapping[str, object]) -> Capabilities:
    """The capabilities of a record's provider (a RunRecord, or just `{"provider": name}`), NOTHING
    for an unknown one (listings never fail on it)."""
    return CAPABILITIES.get(str(record.get("provider")), NOTHING)


@dataclass(frozen=True)
class ConnectInfo:
    """How to reach one machine over SSH, as its provider describes it."""

    host: str
    port: int
    user: str | None
    key_path: str | None
    #: Host keys pinned for this machine ("type base64" lines); None: not known yet.
    host_keys: list[str] | None
    #: Where a host key trusted on first use is kept (never ~/.ssh/known_hosts).
    known_hosts: str
    trust_on_first_use: bool
    label: str
    #: ProxyJump destination, from the user's SSH config.
    jump_host: str | None = None
    #: Keep trying to connect this long (a machine that is still booting).
    connect_retry_for: float = 0.0


def connect_info(record: RunRecord, machine: Machine) -> ConnectInfo | None:
    """How to reach `machine` of the run, as its provider describes it; None when it is this computer."""
    provider = record["provider"]
    if capabilities(provider).run_dir_here:
        return None
    if provider == "ssh":
        from gpurun.providers import ssh

        return ssh.connect_info(record, machine)
    from gpurun.providers.aws import connect

    return connect.connect_info(record, machine)
