"""How to reach a machine the run created on AWS (no boto3 here: status and ssh import this)."""

from __future__ import annotations

from gpurun import paths
from gpurun.errors import TransportError
from gpurun.models import Machine, RunRecord
from gpurun.providers.capabilities import ConnectInfo

#: sshd may answer before cloud-init has installed the run's key.
AWS_CONNECT_RETRY_FOR = 120.0
#: The login of the Deep Learning AMIs gpurun launches, unless ssh.user says otherwise.
DEFAULT_USER = "ubuntu"


def known_hosts_file(run: str) -> str:
    """Host keys of the run's machines, pinned from the console output or trusted on first use."""
    return str(paths.keys_dir() / run / "known_hosts")


def connect_info(record: RunRecord, machine: Machine) -> ConnectInfo:
    host = machine.get("host")
    if not host:
        # A machine without a public address yet (still pending, or replaced by its group): unreachable
        # like one that does not answer, so teardown still terminates it and releases the rest.
        raise TransportError(
            f"machine {machine.get('instance_id', '?')} of {record['run']} has no public address yet; "
            "`gpurun status` shows when it has one"
        )
    port = int(machine.get("port") or 22)
    user = machine.get("user") or DEFAULT_USER
    pinned = machine.get("host_keys") or None
    return ConnectInfo(
        host=host,
        port=port,
        user=user,
        key_path=machine.get("key_path"),
        host_keys=pinned,
        known_hosts=machine.get("known_hosts") or known_hosts_file(record["run"]),
        # Keys the console did not show: the first one seen is kept in the run's own file.
        trust_on_first_use=pinned is None and machine.get("trust_on_first_use", True),
        connect_retry_for=AWS_CONNECT_RETRY_FOR,
        label=f"{user}@{host}:{port}",
    )
