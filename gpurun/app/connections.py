"""From a run's machine dicts to transports, and to the agent's Python on a machine.

Providers describe their machines as plain dicts (host, port, user, key_path,
host_keys, known_hosts, trust_on_first_use, proxy_jump, run_dir, ...) and
import no transport. This module opens one, as the run's provider needs:

- `local`: this computer, through subprocesses;
- `ssh`: the user's machine; a host key neither pinned nor in ~/.ssh/known_hosts
  is trusted on first use into the run's own file (`providers.ssh.tofu_known_hosts`);
- `aws`: a machine the run created; trust on first use only while no key is
  pinned, and connecting is retried while the machine boots.

A workflow opens its transports through one `Connections`, which keeps each
`ssh` machine's connection per (run, rank): the ssh provider looks at its
hosts while acquiring them, and the launch goes on over those connections.
"""

from __future__ import annotations

import shlex
import sys
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gpurun import paths
from gpurun.errors import BadInput

if TYPE_CHECKING:
    from gpurun.transport.base import Transport
    from gpurun.transport.ssh import SshTransport

#: aws: sshd may answer before cloud-init has installed the run's key.
AWS_CONNECT_RETRY_FOR = 120.0


def open_transport(
    record: dict[str, Any], machine: dict[str, Any], *, on_warning: Callable[[str], None] | None = None
) -> Transport:
    """A new transport to one machine of the run; nothing is dialled until its first command."""
    from gpurun import runs

    runs.check_reachable_from_here(record, "a connection to its machines")
    provider = record["provider"]
    if provider == "local":
        from gpurun.transport.local import LocalTransport

        return LocalTransport()
    if provider == "ssh":
        return _user_machine_transport(record, machine, on_warning)
    if provider == "aws":
        from gpurun.transport.ssh import SshTransport

        host = machine["host"]
        port = int(machine.get("port") or 22)
        user = machine.get("user") or "ubuntu"
        known_hosts = machine.get("known_hosts") or str(paths.keys_dir() / record["run"] / "known_hosts")
        pinned = machine.get("host_keys") or None
        return SshTransport(
            host,
            port=port,
            user=user,
            key_filename=machine.get("key_path"),
            pinned_keys=pinned,
            known_hosts_file=known_hosts,
            # Keys the console did not show: the first one seen is kept in the run's own file.
            trust_on_first_use=pinned is None and machine.get("trust_on_first_use", True),
            connect_retry_for=AWS_CONNECT_RETRY_FOR,
            label=f"{user}@{host}:{port}",
            on_warning=on_warning,
        )
    raise BadInput(f"run {record['run']}: unknown provider {provider!r}; use aws, ssh or local")


def _user_machine_transport(
    record: dict[str, Any], machine: dict[str, Any], on_warning: Callable[[str], None] | None
) -> SshTransport:
    from gpurun.providers.ssh import tofu_known_hosts
    from gpurun.transport.ssh import SshTransport

    return SshTransport(
        machine["host"],
        port=int(machine["port"]),
        user=machine.get("user"),
        key_filename=machine.get("key_path"),
        pinned_keys=machine.get("host_keys") or None,
        known_hosts_file=str(tofu_known_hosts(record["run"])),
        trust_on_first_use=machine.get("trust_on_first_use", True),
        proxy_jump=machine.get("proxy_jump"),
        label=f"{machine.get('user')}@{machine.get('alias') or machine['host']}:{machine['port']}",
        on_warning=on_warning,
    )


def agent_python(record: dict[str, Any], transport: Transport, say: Callable[[str], None]) -> str:
    """A Python on the machine that can run `python -m gpurun`, shell-quoted (shipping gpurun if needed)."""
    if record["provider"] == "local":
        return shlex.quote(sys.executable)  # this very gpurun
    from gpurun.app.agent_install import ensure_agent

    need_s3 = record["provider"] == "aws" or str(record.get("store") or "").startswith("s3://")
    return ensure_agent(transport, say, need_s3=need_s3)


class Connections:
    """The transports one workflow opens; an `ssh` machine's is kept per (run, rank) until `close(run)`."""

    def __init__(self) -> None:
        self._kept: dict[tuple[str, int], SshTransport] = {}
        self._lock = threading.Lock()

    def connect(
        self, record: dict[str, Any], machine: dict[str, Any], on_warning: Callable[[str], None] | None = None
    ) -> Transport:
        if record["provider"] != "ssh":
            return open_transport(record, machine, on_warning=on_warning)
        key = (record["run"], int(machine.get("rank", 0)))
        with self._lock:
            transport = self._kept.get(key)
            if transport is None or transport.host != machine["host"] or transport.port != int(machine["port"]):
                transport = self._kept[key] = _user_machine_transport(record, machine, on_warning)
            return transport

    def close(self, run: str) -> None:
        """Close the kept connections of the run."""
        with self._lock:
            for key in [key for key in self._kept if key[0] == run]:
                self._kept.pop(key).close()
