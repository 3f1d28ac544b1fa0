"""`provider: ssh`: the user's own machines, named in `ssh.hosts` (one per node, rank order).

Nothing is created or rented, so `release` has nothing to free; the run
directory and the job are the app's to stop and remove. Hosts resolve through
~/.ssh/config. Host keys come from the user's known_hosts; a host not in it is
trusted on first use with a warning, its key stored for this run only
(`<state>/known_hosts/<run>`), and the key seen at launch is pinned in the run
record for every later connection. `acquire` looks at each host through the
`connect` the app hands it.
"""

from __future__ import annotations

import getpass
import os
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from gpurun import paths
from gpurun.errors import BadInput, GpurunError, TransportError
from gpurun.models import Machine
from gpurun.providers.base import Connect, OnChange, Provider, Record, Say
from gpurun.providers.capabilities import ConnectInfo

if TYPE_CHECKING:
    from gpurun.spec import Spec
    from gpurun.ssh_config import SshTarget

_PROBE = r"""
printf 'home=%s\n' "$HOME"
set -- $(hostname -I 2>/dev/null); printf 'ip=%s\n' "${1:-}"
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/gpu=/'
fi
exit 0
"""


def tofu_known_hosts(run: str) -> Path:
    """Host keys trusted on first use for this run (never written to ~/.ssh/known_hosts)."""
    return paths.home() / "known_hosts" / run


def connect_info(record: Record, machine: Machine) -> ConnectInfo:
    """The user's own host: its SSH config's user, key and ProxyJump, keys trusted on first use
    into the run's own file."""
    return ConnectInfo(
        host=machine.get("host") or "",
        port=machine["port"],
        user=machine.get("user"),
        key_path=machine.get("key_path"),
        host_keys=machine.get("host_keys") or None,
        known_hosts=str(tofu_known_hosts(record["run"])),
        trust_on_first_use=machine.get("trust_on_first_use", True),
        jump_host=machine.get("proxy_jump"),
        label=f"{machine.get('user')}@{machine.get('alias') or machine['host']}:{machine['port']}",
    )


def targets(spec: Spec) -> list[SshTarget]:
    """`ssh.hosts` resolved through the SSH config; the spec's user/port/identity_file win."""
    from gpurun.ssh_config import resolve

    ssh = spec.ssh
    port = ssh.port if ("port" in ssh.model_fields_set or ssh.port != 22) else None
    identity = ssh.identity_file
    if identity and not os.path.isfile(os.path.expanduser(identity)):
        raise BadInput(f"ssh.identity_file: {identity} does not exist")
    resolved = [resolve(host, user=ssh.user, port=port, identity_file=identity) for host in ssh.hosts]
    for target in resolved:
        if target.proxy_command and not target.proxy_jump:
            raise BadInput(
                f"ssh.hosts: {target.alias} uses ProxyCommand in the SSH config, which gpurun does not run; "
                f"use ProxyJump for it instead"
            )
    return resolved


def describe_gpus(lines: list[str]) -> str:
    """Summarize nvidia-smi's csv lines: "2 × NVIDIA A10G (23028 MiB)", or "no GPU found"."""
    names = []
    for line in lines:
        parts = [part.strip() for part in line.split(",")]
        if parts and parts[0]:
            names.append(f"{parts[0]} ({parts[1]})" if len(parts) > 1 and parts[1] else parts[0])
    if not names:
        return "no GPU found"
    return ", ".join(f"{count} × {name}" for name, count in Counter(names).items())


def _destination(machine: Machine) -> tuple[str, int, str]:
    return (machine.get("host") or "", machine["port"], machine["user"])


class SshProvider(Provider):
    name = "ssh"

    def plan(self, spec: Spec, run: str) -> list[tuple[str, str]]:
        hosts = targets(spec)
        rows = [("provider", "ssh: your own machines; nothing is rented or created")]
        for rank, target in enumerate(hosts):
            label = "host" if len(hosts) == 1 else f"node {rank}"
            where = f"{target.user or getpass.getuser()}@{target.host}:{target.port}"
            if target.alias != target.host:
                where += f" (alias {target.alias})"
            if target.proxy_jump:
                where += f" via {target.proxy_jump}"
            rows.append((label, where))
        key = hosts[0].identity_file if hosts else None
        rows.append(("ssh key", key or "ssh-agent and ~/.ssh defaults"))
        rows.append(("GPUs", "reported at launch (nvidia-smi)"))
        rows.append(("run directory", f"~/{paths.machine_run_dir(run)}"))
        rows.append(
            ("host keys", "~/.ssh/known_hosts; an unknown host is trusted on first use for this run, with a warning")
        )
        return rows

    def acquire(
        self, spec: Spec, record: Record, on_change: OnChange, say: Say, *, connect: Connect | None = None
    ) -> list[Machine]:
        if connect is None:
            raise TypeError("SshProvider.acquire needs connect: it looks at each host while acquiring it")
        run = record["run"]
        hosts = targets(spec)
        machines: list[Machine] = [
            {
                "rank": rank,
                "host": target.host,
                "alias": target.alias,
                "port": target.port,
                "user": target.user or getpass.getuser(),
                "key_path": target.identity_file,
                "proxy_jump": target.proxy_jump,
                "label": f"{target.alias}" if len(hosts) == 1 else f"{target.alias} (node {rank})",
                "trust_on_first_use": spec.ssh.trust_on_first_use,
            }
            for rank, target in enumerate(hosts)
        ]

        destinations = [_destination(machine) for machine in machines]

        def reach(machine: Machine) -> Machine:
            transport = connect(record, machine, say)
            values: dict[str, list[str]] = {}
            for line in transport.check(_PROBE, what="checking the machine", timeout=60).splitlines():
                key, sep, value = line.partition("=")
                if sep:
                    values.setdefault(key, []).append(value.strip())
            home = (values.get("home") or [""])[0]
            if not home.startswith("/"):
                raise TransportError(f"cannot find the home directory on {transport.label} ($HOME is {home!r})")
            gpus = values.get("gpu", [])
            machine["run_dir"] = f"{home}/{paths.machine_run_dir(run)}"
            if machine["rank"] > 0 and destinations.count(_destination(machine)) > 1:
                # The same login listed twice (several GPUs' worth of nodes on one box): keep nodes apart.
                machine["run_dir"] += f"-node{machine['rank']}"
            host = machine.get("host") or ""
            if host in ("localhost", "::1") or host.startswith("127."):
                machine["private_ip"] = host  # nodes on this very machine talk over loopback
            else:
                machine["private_ip"] = (values.get("ip") or [""])[0] or host
            machine["gpus"] = gpus
            machine["host_keys"] = [transport.server_key_line] if transport.server_key_line else []
            machine["state"] = "running"
            say(f"{machine['label']}: {transport.label}, {describe_gpus(gpus)}")
            return machine

        from concurrent.futures import ThreadPoolExecutor

        errors: list[BaseException] = []
        with ThreadPoolExecutor(max_workers=min(16, len(machines)) or 1) as pool:
            for future in [pool.submit(reach, machine) for machine in machines]:
                try:
                    future.result()
                except BaseException as error:  # collected: every host is tried before failing
                    errors.append(error)
        if errors:
            first = next((e for e in errors if isinstance(e, GpurunError)), errors[0])
            if len(errors) > 1 and isinstance(first, GpurunError):
                raise type(first)(f"{first} (and {len(errors) - 1} more host(s) failed)", exit_code=first.exit_code)
            raise first
        return machines

    def release(self, record: Record, on_change: OnChange, say: Say) -> list[str]:
        return []  # nothing was created; the app closes its connections

    def machine_env(self, record: Record, machine: Machine) -> dict[str, str]:
        return {}
