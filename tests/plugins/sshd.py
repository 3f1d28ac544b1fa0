"""A real OpenSSH sshd on 127.0.0.1 for the whole test session (fixture `sshd`).

It has its own ed25519 host key and accepts one freshly generated client key
for the current user. Sessions get HOME set to a private directory under the
test's temporary tree (and commands start there, through its .bashrc), so code under test that
writes to `~` on "the machine" never touches the real home directory.

A missing /usr/sbin/sshd is a failure, never a skip: install openssh-server.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SSHD = os.environ.get("GPURUN_TEST_SSHD", "/usr/sbin/sshd")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _keygen(path: Path, comment: str) -> None:
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        stdin=subprocess.DEVNULL,
    )


def _children(pid: int) -> list[int]:
    """Every descendant of `pid` (from /proc)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                stat = handle.read()
        except OSError:
            continue
        ppid = int(stat.rpartition(")")[2].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as handle:
            return handle.read().strip()
    except OSError:
        return ""


@dataclass
class Sshd:
    """A running test sshd and what a client needs to reach it."""

    directory: Path
    host: str = "127.0.0.1"
    port: int = 0
    user: str = field(default_factory=getpass.getuser)
    key_path: str = ""
    host_key_line: str = ""  # "ssh-ed25519 AAAA..." for pinning
    home: Path = field(default_factory=Path)  # $HOME of sessions
    log_path: Path = field(default_factory=Path)
    process: subprocess.Popen | None = None

    @property
    def config_path(self) -> Path:
        return self.directory / "sshd_config"

    @property
    def known_hosts_line(self) -> str:
        return f"[{self.host}]:{self.port} {self.host_key_line}"

    def _write_config(self) -> None:
        # bash started by sshd reads ~/.bashrc (our HOME): start commands there.
        (self.home / ".bashrc").write_text('cd "$HOME" 2>/dev/null\n')
        self.config_path.write_text(
            "\n".join(
                [
                    f"Port {self.port}",
                    f"ListenAddress {self.host}",
                    f"HostKey {self.directory / 'host_ed25519'}",
                    f"PidFile {self.directory / 'sshd.pid'}",
                    f"AuthorizedKeysFile {self.directory / 'authorized_keys'}",
                    "StrictModes no",
                    "PermitRootLogin prohibit-password",
                    "UsePAM no",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "PubkeyAuthentication yes",
                    "AllowTcpForwarding yes",
                    "MaxSessions 100",
                    "MaxStartups 100:30:200",
                    "PrintMotd no",
                    "LogLevel INFO",
                    "Subsystem sftp internal-sftp",
                    f"SetEnv HOME={self.home}",
                    "",
                ]
            )
        )

    def start(self, keep_port: bool = False) -> None:
        if self.process is not None and self.process.poll() is None:
            return
        try:  # sshd insists on its privilege separation directory
            Path("/run/sshd").mkdir(parents=True, exist_ok=True)
        except OSError:
            pass  # not root: sshd says what is missing if it needs it
        for _attempt in range(25 if keep_port else 5):
            if not self.port:
                self.port = _free_port()
            self._write_config()
            log = open(self.log_path, "ab")  # noqa: SIM115 - sshd writes to it until stopped
            offset = self.log_path.stat().st_size
            self.process = subprocess.Popen(
                [SSHD, "-D", "-e", "-f", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
            log.close()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                text = self.log_path.read_bytes()[offset:].decode("utf-8", "replace")
                if f"port {self.port}" in text and "listening" in text.lower():
                    return
                if self.process.poll() is not None:
                    break
                time.sleep(0.02)
            output = self.log_path.read_bytes()[offset:].decode("utf-8", "replace")
            self.stop()
            if "Address already in use" in output:
                if keep_port:
                    time.sleep(0.2)  # clients hold this port: wait for it rather than move
                else:
                    self.port = 0
                continue
            raise RuntimeError(f"test sshd did not start: {output.strip()[-2000:]}")
        raise RuntimeError(
            f"test sshd could not listen on port {self.port} again"
            if keep_port
            else "test sshd did not find a free port"
        )

    def drop_connections(self) -> None:
        """Kill every connection's sshd process (the listener stays)."""
        if self.process is None:
            return
        for pid in _children(self.process.pid):
            if _comm(pid).startswith("sshd"):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def stop(self) -> None:
        """Stop the listener and drop every open connection (as a machine reboot would)."""
        if self.process is None:
            return
        self.drop_connections()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def restart(self) -> None:
        """Stop (dropping connections) and start again on the same port with the same host key."""
        self.stop()
        self.start(keep_port=True)

    def seed_agent_venv(self) -> None:
        """Create the agent's venv (~/.gpurun/venv) in this sshd's HOME, seeing this interpreter's packages.

        For tests of the agent with an s3:// store: `ensure_agent(need_s3=True)`
        then finds boto3 there instead of pip-installing it from the network.
        """
        import site
        import sys

        venv = self.home / ".gpurun" / "venv"
        if (venv / ".gpurun-ready").exists():
            return
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        version = f"python{sys.version_info.major}.{sys.version_info.minor}"
        (venv / "lib" / version / "site-packages" / "_gpurun_test_packages.pth").write_text(
            "\n".join(site.getsitepackages()) + "\n"
        )
        (venv / ".gpurun-ready").touch()

    def run_local(self, command: str) -> subprocess.CompletedProcess:
        """Run `command` with the system ssh client against this sshd (pinned host key)."""
        known = self.directory / "client_known_hosts"
        known.write_text(self.known_hosts_line + "\n")
        return subprocess.run(
            [
                "ssh",
                "-F",
                "/dev/null",
                "-i",
                self.key_path,
                "-p",
                str(self.port),
                "-o",
                "BatchMode=yes",
                "-o",
                "StrictHostKeyChecking=yes",
                "-o",
                f"UserKnownHostsFile={known}",
                f"{self.user}@{self.host}",
                command,
            ],
            capture_output=True,
            stdin=subprocess.DEVNULL,
            timeout=30,
        )


def make_sshd(directory: Path, *, host: str = "127.0.0.1", port: int = 0) -> Sshd:
    if not os.path.exists(SSHD) or not shutil.which("ssh-keygen"):
        pytest.fail(
            f"{SSHD} (or ssh-keygen) is missing: the SSH tests need a real OpenSSH server; "
            "install it (Debian/Ubuntu: apt-get install openssh-server openssh-client)",
            pytrace=False,
        )
    directory.mkdir(parents=True, exist_ok=True)
    _keygen(directory / "host_ed25519", "gpurun-test-host")
    _keygen(directory / "client_ed25519", "gpurun-test-client")
    (directory / "authorized_keys").write_text((directory / "client_ed25519.pub").read_text())
    home = directory / "home"
    home.mkdir(exist_ok=True)
    server = Sshd(
        directory=directory,
        key_path=str(directory / "client_ed25519"),
        host_key_line=" ".join((directory / "host_ed25519.pub").read_text().split()[:2]),
        home=home,
        log_path=directory / "sshd.log",
        host=host,
        port=port,
    )
    server.start(keep_port=bool(port))
    return server


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory):
    """The session's test sshd (see the module docstring)."""
    server = make_sshd(tmp_path_factory.mktemp("sshd"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def private_sshd(tmp_path_factory: pytest.TempPathFactory):
    """An sshd of the test's own, for tests that stop or restart it."""
    server = make_sshd(tmp_path_factory.mktemp("sshd-private"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def ssh_client_home(sshd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This computer's HOME for a test: ~/.ssh/config names the test sshd `testbox`, its host key is known.

    GPURUN_SSH_CONFIG points at that config, and no ssh-agent is used.
    """
    home = tmp_path / "client-home"
    (home / ".ssh").mkdir(parents=True, mode=0o700)
    config = home / ".ssh" / "config"
    config.write_text(
        f"Host testbox\n  HostName {sshd.host}\n  Port {sshd.port}\n  User {sshd.user}\n  IdentityFile {sshd.key_path}\n"
    )
    (home / ".ssh" / "known_hosts").write_text(sshd.known_hosts_line + "\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("GPURUN_SSH_CONFIG", str(config))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    return home
