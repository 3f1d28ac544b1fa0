"""A machine over SSH (paramiko): run, stream and send, with verified host keys.

Host keys are checked against, in this order of authority:

1. `pinned_keys` ("ssh-ed25519 AAAA..." lines the provider learned when it
   created the machine): nothing else is consulted;
2. otherwise the user's ~/.ssh/known_hosts, then the per-run
   `known_hosts_file`;
3. a host in neither is refused, unless `trust_on_first_use`: then its key is
   stored in `known_hosts_file` and `on_warning` says so.

A key that differs from the one on record is always refused, and an unknown
key is accepted only through the explicit trust-on-first-use path above.

The connection is opened on first use, retried with backoff for
`connect_retry_for` seconds (a machine that is still booting), kept alive,
and reopened on the next call after it dropped. A command is never re-run
after it may have started: only opening the channel is retried.
"""

from __future__ import annotations

import base64
import contextlib
import getpass
import logging
import os
import shlex
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import paramiko

from gpurun.errors import ConnectionLost, TransportError
from gpurun.transport.base import CommandResult, Transport

if TYPE_CHECKING:
    from paramiko import Channel, PKey, SSHClient
    from paramiko.transport import _SocketLike

# paramiko logs connection trouble at ERROR; without a handler Python would
# print those lines to the terminal. Our own errors say what happened.
logging.getLogger("paramiko").addHandler(logging.NullHandler())
log = logging.getLogger("gpurun.ssh")

WINDOW_SIZE = 16 * 1024 * 1024  # what the machine may send us before we read it
MAX_PACKET_SIZE = 32768  # OpenSSH's own channel packet size
KEEPALIVE_S = 15
TCP_USER_TIMEOUT_MS = 120_000  # unacknowledged data this long means the peer is gone
READ_CHUNK = 65536
_FAST_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
_FAST_MACS = ("hmac-sha2-256-etm@openssh.com", "hmac-sha2-512-etm@openssh.com")
_known_hosts_lock = threading.Lock()


def user_known_hosts() -> Path:
    return Path.home() / ".ssh" / "known_hosts"


def host_key_name(host: str, port: int) -> str:
    """How known_hosts names a host: `host` on port 22, else `[host]:port`."""
    return host if port == 22 else f"[{host}]:{port}"


def fingerprint(key: PKey) -> str:
    return key.fingerprint


def parse_key_line(line: str) -> PKey:
    """A public key from "ssh-ed25519 AAAA... [comment]" (an optional leading host name is skipped)."""
    parts = line.split()
    if len(parts) >= 3 and not parts[0].startswith(("ssh-", "ecdsa-", "sk-")):
        parts = parts[1:]
    if len(parts) < 2:
        raise ValueError(f"not a public key line: {line!r}")
    try:
        return paramiko.PKey.from_type_string(parts[0], base64.b64decode(parts[1]))
    except Exception as error:
        raise ValueError(f"not a usable public key ({parts[0]}): {error}") from None


def key_line(key: PKey) -> str:
    return f"{key.get_name()} {key.get_base64()}"


class _Retry(Exception):
    """A connection attempt failed in a way that may pass (boot, restart): message inside."""


class _HostKeyPolicy(paramiko.MissingHostKeyPolicy):
    """Unknown host: trust on first use into the per-run file (with a warning), or refuse."""

    def __init__(self, owner: SshTransport) -> None:
        self.owner = owner

    def missing_host_key(self, client: SSHClient, hostname: str, key: PKey) -> None:
        owner = self.owner
        if owner.pinned_keys:
            raise TransportError(
                f"host key for {hostname} does not match the key pinned for this run "
                f"(it offered {key.get_name()} {fingerprint(key)}); refusing to connect"
            )
        if not owner.trust_on_first_use or not owner.known_hosts_file:
            raise TransportError(
                f"host key for {hostname} is not known (it offered {key.get_name()} {fingerprint(key)}); "
                f"check that fingerprint, then add the key to {user_known_hosts()} "
                f"(ssh-keyscan -p {owner.port} {owner.host} >> {user_known_hosts()})"
            )
        path = Path(owner.known_hosts_file)
        with _known_hosts_lock:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            with os.fdopen(fd, "a") as handle:
                handle.write(f"{hostname} {key_line(key)}\n")
        client.get_host_keys().add(hostname, key.get_name(), key)
        owner.warn(
            f"trusting the host key of {hostname} on first use ({key.get_name()} {fingerprint(key)}); stored in {path}"
        )


class SshTransport(Transport):
    def __init__(
        self,
        host: str,
        *,
        port: int = 22,
        user: str | None = None,
        key_filename: str | list[str] | tuple[str, ...] | None = None,
        pinned_keys: list[str] | None = None,
        known_hosts_file: str | None = None,
        trust_on_first_use: bool = False,
        proxy_jump: str | None = None,
        connect_timeout: float = 10.0,
        connect_retry_for: float = 0.0,
        reconnect_retry_for: float = 15.0,
        label: str | None = None,
        on_warning: Callable[[str], None] | None = None,
    ) -> None:
        self.host = host
        self.port = int(port)
        self.user = user or getpass.getuser()
        if isinstance(key_filename, str):
            key_filename = [key_filename]
        self.key_filenames = [os.path.expanduser(k) for k in key_filename or []]
        self.pinned_keys = list(pinned_keys or [])
        self.known_hosts_file = str(known_hosts_file) if known_hosts_file else None
        self.trust_on_first_use = trust_on_first_use
        self.proxy_jump = proxy_jump or None
        self.connect_timeout = connect_timeout
        self.connect_retry_for = connect_retry_for
        self.reconnect_retry_for = reconnect_retry_for
        self.label = label or f"{self.user}@{host}:{self.port}"
        self.on_warning = on_warning
        try:
            self._pinned = [parse_key_line(line) for line in self.pinned_keys]
        except ValueError as error:
            raise TransportError(f"the host key recorded for {self.label} is unusable: {error}") from None
        self._client: SSHClient | None = None
        self._jump: SshTransport | None = None
        self._lock = threading.RLock()
        self._connected_before = False

    # ---- connection ----------------------------------------------------------------

    def warn(self, message: str) -> None:
        if self.on_warning is not None:
            self.on_warning(message)
        else:
            log.warning(message)

    @property
    def connected(self) -> bool:
        client = self._client
        transport = client.get_transport() if client is not None else None
        return bool(transport is not None and transport.is_active())

    @property
    def server_key_line(self) -> str | None:
        """The host key the machine offered ("ssh-ed25519 AAAA..."), once connected: pin it."""
        client = self._client
        transport = client.get_transport() if client is not None else None
        if transport is None:
            return None
        return key_line(transport.get_remote_server_key())

    def connect(self) -> None:
        """Open the connection now (otherwise the first command opens it)."""
        self._transport()

    def _transport(self) -> paramiko.Transport:
        with self._lock:
            client = self._client
            transport = client.get_transport() if client is not None else None
            if transport is not None and transport.is_active():
                return transport
            self._drop()
            retry_for = self.connect_retry_for
            if self._connected_before:
                retry_for = max(retry_for, self.reconnect_retry_for)
            self._client = self._connect(retry_for)
            self._connected_before = True
            transport = self._client.get_transport()
            assert transport is not None
            return transport

    def _drop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()

    def _connect(self, retry_for: float) -> SSHClient:
        deadline = time.monotonic() + retry_for
        auth_deadline: float | None = None
        delay = 0.5
        while True:
            try:
                return self._connect_once()
            except _Retry as error:
                message = str(error)
                now = time.monotonic()
                give_up = deadline
                if isinstance(error.__cause__, paramiko.AuthenticationException):
                    # While a machine boots its key may not be installed yet; a
                    # wrong user or key should not wait out the whole boot window.
                    auth_deadline = auth_deadline or now + min(retry_for, 30.0)
                    give_up = min(deadline, auth_deadline)
                if now >= give_up:
                    raise TransportError(message) from None
                log.debug("retrying in %.1fs: %s", delay, message)
                time.sleep(min(delay, give_up - now))
                delay = min(delay * 2, 5.0)

    def _connect_once(self) -> SSHClient:
        for path in self.key_filenames:
            if not os.path.isfile(path):
                raise TransportError(f"SSH key {path} for {self.label} does not exist; check ssh.identity_file")
        sock = self._open_socket()
        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(_HostKeyPolicy(self))
        name = host_key_name(self.host, self.port)
        if self._pinned:
            for key in self._pinned:
                client.get_host_keys().add(name, key.get_name(), key)
        else:
            self._load_known_hosts(client)
        try:
            client.connect(
                self.host,
                port=self.port,
                username=self.user,
                key_filename=self.key_filenames or None,  # type: ignore[arg-type]  # paramiko takes a list of key files; its stubs say str
                allow_agent=True,  # after the key files, as ssh does (a passphrase-protected key in the agent)
                look_for_keys=not self.key_filenames,
                timeout=self.connect_timeout,
                banner_timeout=self.connect_timeout,
                auth_timeout=max(self.connect_timeout, 15.0),
                sock=sock,
                transport_factory=_fast_transport,
            )
        except TransportError:
            client.close()
            raise
        except paramiko.BadHostKeyException as error:
            client.close()
            raise TransportError(self._changed_key_message(client, name, error.key, error.expected_key)) from None
        except paramiko.PasswordRequiredException:
            client.close()
            raise TransportError(
                f"the SSH key {', '.join(self.key_filenames)} for {self.label} needs a passphrase; "
                f"add it to ssh-agent first (ssh-add {shlex.quote(self.key_filenames[0]) if self.key_filenames else ''})"
            ) from None
        except paramiko.AuthenticationException as error:
            client.close()
            keys = ", ".join(self.key_filenames) or "ssh-agent and ~/.ssh/id_*"
            raise _Retry(
                f"cannot log in to {self.host}:{self.port} as {self.user!r} with {keys}: "
                f"check the user (ssh.user or User in ~/.ssh/config) and the key "
                f"(ssh.identity_file or IdentityFile) that this host accepts"
            ) from error
        except (paramiko.SSHException, EOFError, OSError) as error:
            client.close()
            raise _Retry(
                f"cannot connect to {self.label}: the SSH handshake failed ({_reason(error)}); "
                f"check that port {self.port} is an SSH server"
            ) from error
        transport = client.get_transport()
        assert transport is not None
        transport.set_keepalive(KEEPALIVE_S)
        return client

    def _open_socket(self) -> socket.socket | Channel:
        if self.proxy_jump:
            return self._open_via_jump()
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        except socket.gaierror:
            from gpurun.ssh_config import config_path

            raise TransportError(
                f"cannot resolve host {self.host!r} (for {self.label}): it is neither a DNS name nor an "
                f"alias in {config_path()}; check ssh.hosts"
            ) from None
        except ConnectionRefusedError as error:
            raise _Retry(
                f"cannot connect to {self.label}: connection refused; check that sshd runs there "
                f"and listens on port {self.port} (ssh.port)"
            ) from error
        except TimeoutError as error:
            raise _Retry(
                f"cannot connect to {self.label}: no answer in {self.connect_timeout:.0f}s; check the address "
                f"and that no firewall or security group blocks port {self.port} from this computer"
            ) from error
        except OSError as error:
            raise _Retry(
                f"cannot connect to {self.label}: {_reason(error)}; check the address and the network"
            ) from error
        with contextlib.suppress(OSError, AttributeError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, TCP_USER_TIMEOUT_MS)
        return sock

    def _open_via_jump(self) -> Channel:
        if self._jump is None:
            self._jump = _jump_transport(self)
        try:
            jump = self._jump._transport()
        except TransportError as error:
            raise TransportError(f"via ProxyJump {self.proxy_jump}: {error}") from None
        try:
            return jump.open_channel(
                "direct-tcpip",
                (self.host, self.port),
                ("127.0.0.1", 0),
                timeout=self.connect_timeout,
                window_size=WINDOW_SIZE,
                max_packet_size=MAX_PACKET_SIZE,
            )
        except (paramiko.SSHException, EOFError, OSError) as error:
            raise _Retry(
                f"cannot connect to {self.label} through the jump host {self._jump.label}: {_reason(error)}; "
                f"check the address and port as the jump host sees them"
            ) from error

    def _load_known_hosts(self, client: SSHClient) -> None:
        user_file = user_known_hosts()
        for path, loader in ((user_file, client.load_system_host_keys), (self.known_hosts_file, client.load_host_keys)):
            if path and os.path.isfile(path):
                try:
                    loader(str(path))
                except (OSError, paramiko.SSHException) as error:
                    raise TransportError(f"cannot read known hosts file {path}: {_reason(error)}") from None

    def _changed_key_message(self, client: SSHClient, name: str, got: PKey, expected: PKey) -> str:
        offered = f"it offered {got.get_name()} {fingerprint(got)}"
        if self._pinned:
            return (
                f"host key for {name} changed: {offered}, but this run pinned {expected.get_name()} "
                f"{fingerprint(expected)}; refusing to connect (someone may be intercepting the connection)"
            )
        where = self.known_hosts_file or str(user_known_hosts())
        with contextlib.suppress(OSError, paramiko.SSHException):
            if paramiko.HostKeys(str(user_known_hosts())).lookup(name) is not None:
                where = str(user_known_hosts())
        return (
            f"host key for {name} changed: {offered}, {where} has {expected.get_name()} {fingerprint(expected)}; "
            f"if the machine was rebuilt, remove the line from {where} "
            f"(ssh-keygen -R {shlex.quote(name)} -f {shlex.quote(where)}) and connect again"
        )

    def close(self) -> None:
        with self._lock:
            self._drop()
            if self._jump is not None:
                self._jump.close()
                self._jump = None

    # ---- commands ------------------------------------------------------------------

    def _session(self) -> Channel:
        """A new session channel; a dead connection is reopened (no command has run yet)."""
        for attempt in (1, 2):
            transport = self._transport()
            try:
                return transport.open_session(
                    window_size=WINDOW_SIZE, max_packet_size=MAX_PACKET_SIZE, timeout=self.connect_timeout
                )
            except (paramiko.SSHException, EOFError, OSError) as error:
                with self._lock:
                    if self._client is not None and self._client.get_transport() is transport:
                        self._drop()
                if attempt == 2:
                    raise TransportError(f"cannot open a session on {self.label}: {_reason(error)}") from None
        raise AssertionError("unreachable")

    @staticmethod
    def _wrap(command: str) -> str:
        return f"bash -c {shlex.quote(command)}"

    def _finish(self, channel: Channel, deadline: float | None, what: str) -> int:
        """Wait for the exit status; a lost connection raises, a signal death gives 255 (like ssh)."""
        remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
        if not channel.status_event.wait(remaining):
            raise TransportError(f"{what} on {self.label} did not finish in time")
        if channel.exit_status_ready() and channel.exit_status != -1:
            return channel.exit_status
        transport = channel.get_transport()
        if transport is None or not transport.is_active():
            self._forget(transport)
            raise ConnectionLost(
                f"connection to {self.label} was lost while {what} ran; it is reopened on the next command"
            )
        return 255

    def _forget(self, transport: paramiko.Transport | None) -> None:
        with self._lock:
            if self._client is not None and self._client.get_transport() in (transport, None):
                self._drop()

    def _lost(self, channel: Channel, what: str, error: BaseException) -> TransportError:
        transport = channel.get_transport()
        # EOFError is the socket closing under us: the transport may not have noticed yet.
        if transport is None or not transport.is_active() or isinstance(error, EOFError):
            self._forget(transport)
            return ConnectionLost(
                f"connection to {self.label} was lost while {what} ran; it is reopened on the next command"
            )
        return TransportError(f"{what} on {self.label} failed: {_reason(error)}")

    def run(self, command: str, *, input: bytes | None = None, timeout: float | None = None) -> CommandResult:
        return self._exchange(command, [input] if input else [], timeout=timeout, what="a command")

    def send(self, command: str, chunks: Iterable[bytes], *, timeout: float | None = None) -> CommandResult:
        return self._exchange(command, chunks, timeout=timeout, what="a transfer")

    def _exchange(self, command: str, chunks: Iterable[bytes], *, timeout: float | None, what: str) -> CommandResult:
        deadline = None if timeout is None else time.monotonic() + timeout
        channel = self._session()
        out: list[bytes] = []
        err: list[bytes] = []

        def drain(receive: Callable[[int], bytes], into: list[bytes]) -> None:
            with contextlib.suppress(Exception):
                while data := receive(READ_CHUNK):
                    into.append(data)

        try:
            channel.settimeout(timeout)
            channel.exec_command(self._wrap(command))
            readers = [
                threading.Thread(target=drain, args=(channel.recv, out), daemon=True),
                threading.Thread(target=drain, args=(channel.recv_stderr, err), daemon=True),
            ]
            for reader in readers:
                reader.start()
            try:
                for chunk in chunks:
                    if chunk:
                        # a view: sendall slices what is left after each packet, without copying it
                        channel.sendall(memoryview(chunk))  # type: ignore[arg-type]  # paramiko sends any buffer; its stubs say bytes
            except TimeoutError:
                raise TransportError(f"{what} on {self.label} did not finish in {timeout:.0f}s") from None
            except OSError:
                pass  # the command stopped reading (it exited); its status says why
            with contextlib.suppress(OSError, EOFError):
                channel.shutdown_write()
            code = self._finish(channel, deadline, what)
            for reader in readers:
                remaining = None if deadline is None else max(0.1, deadline - time.monotonic())
                reader.join(remaining)
            return CommandResult(code, b"".join(out), b"".join(err))
        except (paramiko.SSHException, EOFError) as error:
            raise self._lost(channel, what, error) from None
        finally:
            channel.close()

    def stream(self, command: str, on_output: Callable[[bytes], None], *, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        channel = self._session()
        try:
            channel.set_combine_stderr(True)
            channel.exec_command(self._wrap(command))
            channel.shutdown_write()
            while True:
                if deadline is not None:
                    channel.settimeout(max(0.01, deadline - time.monotonic()))
                try:
                    data = channel.recv(READ_CHUNK)
                except TimeoutError:
                    raise TransportError(f"a command on {self.label} did not finish in {timeout:.0f}s") from None
                if not data:
                    break
                on_output(data)
            return self._finish(channel, deadline, "a command")
        except (paramiko.SSHException, EOFError, OSError) as error:
            raise self._lost(channel, "a command", error) from None
        finally:
            channel.close()


def _fast_transport(
    sock: _SocketLike, /, *, disabled_algorithms: Mapping[str, Iterable[str]] | None = None, **_gss: bool
) -> paramiko.Transport:
    """A paramiko Transport that prefers AES-GCM (one pass per packet) and big windows.

    paramiko passes only `disabled_algorithms`; its stubs also name the GSS options
    older releases passed, which do not apply here (`_gss`).
    """
    transport = paramiko.Transport(
        sock,
        default_window_size=WINDOW_SIZE,
        default_max_packet_size=MAX_PACKET_SIZE,
        disabled_algorithms=disabled_algorithms,
    )
    options = transport.get_security_options()
    ciphers = [c for c in _FAST_CIPHERS if c in options.ciphers]
    options.ciphers = tuple(ciphers + [c for c in options.ciphers if c not in ciphers])
    macs = [m for m in _FAST_MACS if m in options.digests]
    options.digests = tuple(macs + [m for m in options.digests if m not in macs])
    return transport


def _jump_transport(target: SshTransport) -> SshTransport:
    """The transport to the last hop of `target.proxy_jump` (earlier hops chain through it)."""
    from gpurun.ssh_config import resolve

    hops = [hop.strip() for hop in (target.proxy_jump or "").split(",") if hop.strip()]
    hop = resolve(hops[-1])
    earlier = ",".join(hops[:-1]) or hop.proxy_jump
    return SshTransport(
        hop.host,
        port=hop.port,
        user=hop.user,
        key_filename=list(hop.identity_files) or None,
        known_hosts_file=target.known_hosts_file,
        trust_on_first_use=target.trust_on_first_use,
        proxy_jump=earlier,
        connect_timeout=target.connect_timeout,
        connect_retry_for=target.connect_retry_for,
        reconnect_retry_for=target.reconnect_retry_for,
        on_warning=target.on_warning,
    )


def _reason(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror.lower()
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
