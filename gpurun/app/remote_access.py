"""`gpurun ssh`, `gpurun tunnel` and `gpurun ssh-config`: the system ssh client, with the run's key and host key.

Every command pins the host key: `StrictHostKeyChecking=yes` with a per-run
known_hosts file holding the keys recorded for the run's machines
(`<state>/ssh/<run>.known_hosts`). Machines without recorded keys fall back to
the run's own known_hosts files (trusted on first use) and ~/.ssh/known_hosts,
still strictly checked.

`write_ssh_config` keeps one block per run in `<state>/ssh_config`:
`Host gpurun-<run>` for rank 0 and `gpurun-<run>-<rank>` for the others, so
`ssh gpurun-<run>` and editors' remote-SSH work once
`install_ssh_config_include` has put `Include <state>/ssh_config` at the top of
~/.ssh/config.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

from gpurun import paths, runs
from gpurun.errors import BadInput, GpurunError
from gpurun.models import Machine, RunRecord
from gpurun.providers.capabilities import capabilities_of

_BEGIN = "# >>> gpurun run {run}"
_END = "# <<< gpurun run {run}"


def ssh_config_file() -> Path:
    """The file of per-run Host entries that ~/.ssh/config includes."""
    return paths.home() / "ssh_config"


def known_hosts_file(run: str) -> Path:
    return paths.home() / "ssh" / f"{run}.known_hosts"


def host_alias(run: str, rank: int = 0) -> str:
    return f"gpurun-{run}" if rank == 0 else f"gpurun-{run}-{rank}"


def _machines(record: RunRecord) -> list[Machine]:
    if capabilities_of(record).run_dir_here:
        raise BadInput(f"run {record['run']} runs on this computer; its files are under {paths.local_runs_dir()}")
    machines = [m for m in record.get("machines") or [] if m.get("host")]
    if not machines:
        raise GpurunError(f"run {record['run']} has no machine to reach (state: {record.get('state', 'unknown')})")
    return sorted(machines, key=lambda m: int(m.get("rank", 0)))


def _machine(record: RunRecord, rank: int) -> Machine:
    runs.check_reachable_from_here(record, "ssh or a tunnel")
    machines = _machines(record)
    for machine in machines:
        if int(machine.get("rank", 0)) == rank:
            return machine
    raise BadInput(f"run {record['run']} has no node {rank}; its nodes are 0-{len(machines) - 1}")


def _host_key_name(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


def pinned_known_hosts(record: RunRecord) -> Path | None:
    """Write the run's recorded host keys as a known_hosts file; None when none are recorded."""
    lines: list[str] = []
    for machine in _machines(record):
        name = _host_key_name(machine.get("host") or "", int(machine.get("port") or 22))
        lines.extend(f"{name} {' '.join(key.split()[:2])}" for key in machine.get("host_keys") or [])
    if not lines:
        return None
    path = known_hosts_file(record["run"])
    paths.ensure_private(path.parent)
    paths.atomic_write(path, ("\n".join(lines) + "\n").encode())
    return path


def _known_hosts_files(record: RunRecord) -> list[str]:
    pinned = pinned_known_hosts(record)
    if pinned is not None:
        return [str(pinned)]
    from gpurun.providers.ssh import tofu_known_hosts

    run = record["run"]
    files = [str(m["known_hosts"]) for m in _machines(record) if m.get("known_hosts")]
    files += [str(tofu_known_hosts(run)), str(paths.keys_dir() / run / "known_hosts")]
    files.append(str(Path.home() / ".ssh" / "known_hosts"))
    return list(dict.fromkeys(files))


def _config_quote(value: str) -> str:
    return f'"{value}"' if re.search(r"\s", value) else value


def _options(record: RunRecord, machine: Machine) -> list[str]:
    """`-o` options shared by ssh and tunnel (also the lines of the ssh_config entry)."""
    known = " ".join(_config_quote(path) for path in _known_hosts_files(record))
    # A machine its group started (a recovering run) was never dialled by gpurun: nothing pinned or
    # learned its key yet. Its first key is trusted and kept in the run's known_hosts, as for any
    # machine without pinned keys; a changed key is still refused.
    first_use = bool(machine.get("generation")) and not machine.get("host_keys") and machine.get("trust_on_first_use")
    options = [
        f"StrictHostKeyChecking={'accept-new' if first_use else 'yes'}",
        f"UserKnownHostsFile={known}",
        "GlobalKnownHostsFile=/dev/null",
        "ServerAliveInterval=15",
        "ServerAliveCountMax=8",
    ]
    key_path = machine.get("key_path")
    if key_path:
        options += [f"IdentityFile={_config_quote(key_path)}", "IdentitiesOnly=yes"]
    if machine.get("proxy_jump"):
        options.append(f"ProxyJump={machine['proxy_jump']}")
    return options


def _base_argv(record: RunRecord, machine: Machine) -> list[str]:
    argv = ["ssh"]
    for option in _options(record, machine):
        argv += ["-o", option]
    argv += ["-p", str(int(machine.get("port") or 22))]
    if machine.get("user"):
        argv += ["-l", str(machine["user"])]
    return argv


def ssh_argv(record: RunRecord, command: list[str] | None = None, *, rank: int = 0) -> list[str]:
    """argv for `gpurun ssh RUN [-- CMD]`: a login shell, or CMD, in the run's work directory.

    The CLI hands it to os.execvp. CMD words are joined with spaces and run by
    the login shell on the machine, exactly as `ssh host CMD...` does.
    """
    machine = _machine(record, rank)
    argv = _base_argv(record, machine)
    run_dir = machine.get("run_dir")
    enter = (
        f"cd {shlex.quote(run_dir + '/work')} 2>/dev/null || cd {shlex.quote(run_dir)} 2>/dev/null; " if run_dir else ""
    )
    host = machine.get("host") or ""  # _machines keeps only machines with a host
    if command:
        return [*argv, "--", host, enter + " ".join(command)]
    return [*argv, "-t", "--", host, enter + 'exec "$SHELL" -l']


def tunnel_argv(record: RunRecord, port: int, local_port: int | None = None, *, rank: int = 0) -> list[str]:
    """argv for `gpurun tunnel RUN PORT`: forward 127.0.0.1:LOCAL_PORT here to 127.0.0.1:PORT there."""
    for value in (port, local_port or port):
        if not 1 <= int(value) <= 65535:
            raise BadInput(f"port {value} is not a port number (1-65535)")
    machine = _machine(record, rank)
    argv = _base_argv(record, machine)
    forward = f"127.0.0.1:{int(local_port or port)}:127.0.0.1:{int(port)}"
    return [*argv, "-N", "-o", "ExitOnForwardFailure=yes", "-L", forward, "--", machine.get("host") or ""]


def ssh_config_entries(record: RunRecord) -> str:
    """The run's block for the ssh_config file (one Host per node)."""
    run = record["run"]
    lines = [_BEGIN.format(run=run)]
    for machine in _machines(record):
        rank = int(machine.get("rank", 0))
        lines.append(f"Host {host_alias(run, rank)}")
        lines.append(f"    HostName {machine['host']}")
        lines.append(f"    Port {int(machine.get('port') or 22)}")
        if machine.get("user"):
            lines.append(f"    User {machine['user']}")
        for option in _options(record, machine):
            key, _, value = option.partition("=")
            lines.append(f"    {key} {value}")
    lines.append(_END.format(run=run))
    return "\n".join(lines) + "\n"


def _without_run(text: str, run: str) -> str:
    begin, end = _BEGIN.format(run=run), _END.format(run=run)
    kept, skipping = [], False
    for line in text.splitlines():
        if line.strip() == begin:
            skipping = True
        elif skipping and line.strip() == end:
            skipping = False
        elif not skipping:
            kept.append(line)
    return "\n".join(kept).strip("\n") + ("\n" if kept and any(kept) else "")


def write_ssh_config(record: RunRecord) -> Path:
    """Add or refresh the run's Host entries in `<state>/ssh_config`; returns that file."""
    path = ssh_config_file()
    paths.ensure_private(path.parent)
    current = path.read_text() if path.exists() else ""
    text = _without_run(current, record["run"])
    if not text:
        text = "# Written by gpurun: one block per run. `gpurun ssh-config --install` includes it in ~/.ssh/config.\n"
    paths.atomic_write(path, (text + "\n" + ssh_config_entries(record)).encode())
    return path


def remove_ssh_config(run: str) -> bool:
    """Drop the run's entries and pinned known_hosts (at teardown); True when there was something."""
    path = ssh_config_file()
    removed = False
    if path.exists():
        current = path.read_text()
        text = _without_run(current, run)
        if text != current:
            paths.atomic_write(path, text.encode())
            removed = True
    pinned = known_hosts_file(run)
    if pinned.exists():
        pinned.unlink()
        removed = True
    return removed


def user_ssh_config() -> Path:
    from gpurun.ssh_config import config_path

    return config_path()


def include_line() -> str:
    return f"Include {_config_quote(str(ssh_config_file()))}"


def ssh_config_included() -> bool:
    path = user_ssh_config()
    if not path.exists():
        return False
    wanted = include_line().split(None, 1)[1].strip('"')
    for line in path.read_text(errors="replace").splitlines():
        parts = shlex.split(line, comments=True) if line.strip() else []
        if len(parts) >= 2 and parts[0].lower() == "include" and wanted in parts[1:]:
            return True
    return False


def install_ssh_config_include() -> tuple[Path, bool]:
    """Put `Include <state>/ssh_config` at the top of ~/.ssh/config (once); returns (file, changed).

    At the top, because an Include below a Host line would only apply to that
    host. The CLI asks the user before calling this.
    """
    path = user_ssh_config()
    if ssh_config_included():
        return path, False
    if not ssh_config_file().exists():
        paths.ensure_private(ssh_config_file().parent)
        paths.atomic_write(ssh_config_file(), b"# Written by gpurun: one block per run.\n")
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    current = path.read_text() if path.exists() else ""
    mode = (path.stat().st_mode & 0o777) if path.exists() else 0o600
    header = f"# Added by gpurun (gpurun ssh-config --install): the Host gpurun-<run> entries\n{include_line()}\n\n"
    paths.atomic_write(path.resolve(), (header + current).encode(), mode=mode)
    return path, True
