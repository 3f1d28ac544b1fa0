"""From a run's machines to transports, and to the agent's Python on a machine.

Providers describe how to reach each machine (`providers.capabilities.ConnectInfo`:
host, port, user, key, pinned host keys, where a key trusted on first use goes,
jump host) and what they can do; this module opens the transport that
description asks for, and never branches on which provider it is.

A workflow opens its transports through one `Connections`, which keeps each
machine's connection per (run, rank) for a provider that `keeps_connections`
(the ssh provider looks at its hosts while acquiring them, and the launch goes
on over those connections).
"""

from __future__ import annotations

import shlex
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from gpurun.models import Machine, RunRecord
from gpurun.providers.capabilities import ConnectInfo, capabilities, connect_info

if TYPE_CHECKING:
    from gpurun.transport.base import Transport
    from gpurun.transport.ssh import SshTransport


def open_transport(
    record: RunRecord, machine: Machine, *, on_warning: Callable[[str], None] | None = None
) -> Transport:
    """A new transport to one machine of the run; nothing is dialled until its first command."""
    from gpurun import runs

    # A run adopted from a store: its machines, keys and paths are what the store said.
    runs.check_reachable_from_here(record, "a connection to its machines")
    info = connect_info(record, machine)
    if info is None:
        from gpurun.transport.local import LocalTransport

        return LocalTransport()
    return _ssh_transport(info, on_warning)


def _ssh_transport(info: ConnectInfo, on_warning: Callable[[str], None] | None) -> SshTransport:
    from gpurun.transport.ssh import SshTransport

    return SshTransport(
        info.host,
        port=info.port,
        user=info.user,
        key_filename=info.key_path,
        pinned_keys=info.host_keys,
        known_hosts_file=info.known_hosts,
        trust_on_first_use=info.trust_on_first_use,
        proxy_jump=info.jump_host,
        connect_retry_for=info.connect_retry_for,
        label=info.label,
        on_warning=on_warning,
    )


def agent_python(record: RunRecord, transport: Transport, say: Callable[[str], None]) -> str:
    """A Python on the machine that can run `python -m gpurun`, shell-quoted (shipping gpurun if needed)."""
    if capabilities(record["provider"]).run_dir_here:
        return shlex.quote(sys.executable)  # this very gpurun
    from gpurun.app.agent_install import ensure_agent

    # A disposable machine's store is always s3:// (common.store_url_for).
    return ensure_agent(transport, say, need_s3=str(record.get("store") or "").startswith("s3://"))


class Connections:
    """The transports one workflow opens; kept per (run, rank) until `close(run)` where the provider `keeps_connections`."""

    def __init__(self) -> None:
        self._kept: dict[tuple[str, int], SshTransport] = {}
        self._lock = threading.Lock()

    def connect(
        self, record: RunRecord, machine: Machine, on_warning: Callable[[str], None] | None = None
    ) -> Transport:
        info = connect_info(record, machine)
        if info is None or not capabilities(record["provider"]).keeps_connections:
            return open_transport(record, machine, on_warning=on_warning)
        from gpurun import runs

        runs.check_reachable_from_here(record, "a connection to its machines")
        key = (record["run"], int(machine.get("rank", 0)))
        with self._lock:
            transport = self._kept.get(key)
            if transport is None or transport.host != info.host or transport.port != info.port:
                transport = self._kept[key] = _ssh_transport(info, on_warning)
            return transport

    def close(self, run: str) -> None:
        """Close the kept connections of the run."""
        with self._lock:
            for key in [key for key in self._kept if key[0] == run]:
                self._kept.pop(key).close()
