"""Resolve a host name or alias through the user's SSH config, the way `ssh` does.

`~/.ssh/config` (or the file named by `GPURUN_SSH_CONFIG`) supplies HostName,
User, Port, IdentityFile and ProxyJump for an alias; values given explicitly
(the spec's `ssh.user`, `ssh.port`, `ssh.identity_file`, or `user@host:port`
in `ssh.hosts`) override the config, as options on the ssh command line do.
`Include` lines are followed (paramiko's parser does not do that itself).
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from gpurun.errors import BadInput

if TYPE_CHECKING:
    import paramiko

DEFAULT_PORT = 22
_MAX_INCLUDE_DEPTH = 16


@dataclass(frozen=True)
class SshTarget:
    """Where and how to reach one host, after the SSH config has been applied."""

    alias: str
    host: str
    port: int = DEFAULT_PORT
    user: str | None = None
    identity_files: tuple[str, ...] = field(default_factory=tuple)
    proxy_jump: str | None = None
    proxy_command: str | None = None  # not run by gpurun; callers refuse it with a message

    @property
    def identity_file(self) -> str | None:
        return self.identity_files[0] if self.identity_files else None

    @property
    def label(self) -> str:
        user = f"{self.user}@" if self.user else ""
        return f"{user}{self.host}:{self.port}"


def config_path() -> Path:
    """The SSH config gpurun reads: `GPURUN_SSH_CONFIG`, else ~/.ssh/config."""
    override = os.environ.get("GPURUN_SSH_CONFIG")
    if override:
        return Path(override).expanduser()
    return Path.home() / ".ssh" / "config"


def parse_destination(text: str) -> tuple[str | None, str, int | None]:
    """`[user@]host[:port]` (IPv6 as `[addr]:port`) as (user, host, port)."""
    user = None
    rest = text.strip()
    if "@" in rest:
        user, _, rest = rest.rpartition("@")
        user = user or None
    port: int | None = None
    if rest.startswith("["):
        close = rest.find("]")
        if close < 0:
            raise BadInput(f"ssh host {text!r}: missing ']' after the IPv6 address")
        host, tail = rest[1:close], rest[close + 1 :]
        if tail:
            if not tail.startswith(":"):
                raise BadInput(f"ssh host {text!r}: expected [address]:port")
            port = _port(text, tail[1:])
    elif rest.count(":") == 1:
        host, _, raw = rest.partition(":")
        port = _port(text, raw)
    else:
        host = rest
    if not host:
        raise BadInput(f"ssh host {text!r}: no host name")
    return user, host, port


def _port(text: str, raw: str) -> int:
    if not raw.isdigit() or not 1 <= int(raw) <= 65535:
        raise BadInput(f"ssh host {text!r}: {raw!r} is not a port number (1-65535)")
    return int(raw)


def _expand_includes(path: Path, depth: int = 0) -> str:
    """The config text with every `Include` replaced by the files it names."""
    if depth > _MAX_INCLUDE_DEPTH:
        raise BadInput(f"{path}: Include nested more than {_MAX_INCLUDE_DEPTH} deep (a loop?)")
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return ""
    except OSError as error:
        raise BadInput(f"cannot read SSH config {path}: {error.strerror}") from None
    lines = []
    context = "Host *"  # the Host/Match block the next line belongs to
    for line in text.splitlines():
        if re.match(r"\s*(host|match)\b", line, re.IGNORECASE):
            context = line.strip()
        match = re.match(r"\s*include\s*=?\s*(.+)$", line, re.IGNORECASE)
        if not match:
            lines.append(line)
            continue
        for pattern in _split_words(match.group(1)):
            pattern = os.path.expanduser(pattern)
            if not os.path.isabs(pattern):
                # Relative includes are relative to ~/.ssh for user configs.
                pattern = str(Path.home() / ".ssh" / pattern)
            for included in sorted(glob.glob(pattern)):
                lines.append(_expand_includes(Path(included), depth + 1))
                # As in ssh, blocks opened by the included file end with it.
                lines.append(context)
    return "\n".join(lines) + "\n"


def _split_words(value: str) -> list[str]:
    return [a or b for a, b in re.findall(r'"([^"]*)"|(\S+)', value)]


def load_config(path: Path | None = None) -> paramiko.SSHConfig:
    """The parsed SSH config (an empty one when the file does not exist)."""
    import paramiko

    path = path or config_path()
    text = _expand_includes(path)
    try:
        return paramiko.SSHConfig.from_text(text)
    except Exception as error:  # paramiko raises ConfigParseError and others
        raise BadInput(f"cannot parse SSH config {path}: {error}") from None


def resolve(
    destination: str,
    *,
    user: str | None = None,
    port: int | None = None,
    identity_file: str | None = None,
    config: paramiko.SSHConfig | None = None,
) -> SshTarget:
    """Apply the SSH config to `destination` ([user@]alias[:port]); explicit values win.

    Precedence, most specific first: user/port written in `destination`, the
    keyword arguments, the SSH config, then the defaults (port 22; user None
    meaning "the current local user", as ssh does).
    """
    dest_user, alias, dest_port = parse_destination(destination)
    if config is None:
        config = load_config()
    try:
        options = config.lookup(alias)
    except Exception as error:  # e.g. `Match exec` without the invoke package
        raise BadInput(f"cannot apply SSH config {config_path()} to {alias!r}: {error}") from None
    host = options.get("hostname") or alias
    config_port = options.get("port")
    resolved_port = dest_port or port
    if resolved_port is None:
        try:
            resolved_port = int(config_port) if config_port else DEFAULT_PORT
        except ValueError:
            raise BadInput(f"SSH config {config_path()}: Port {config_port!r} for {alias!r} is not a number") from None
    files: tuple[str, ...]
    if identity_file:
        files = (os.path.expanduser(identity_file),)
    else:
        files = tuple(
            os.path.expanduser(f) for f in options.get("identityfile", []) if os.path.exists(os.path.expanduser(f))
        )
    jump = options.get("proxyjump")
    if jump is not None and jump.strip().lower() == "none":
        jump = None
    return SshTarget(
        alias=alias,
        host=host,
        port=resolved_port,
        user=dest_user or user or options.get("user") or None,
        identity_files=files,
        proxy_jump=jump or None,
        proxy_command=options.get("proxycommand") or None,
    )
