"""The SSH transport, SSH config, agent install, ssh provider and `gpurun ssh` against a real sshd."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import socket
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest

from gpurun.errors import BadInput, TransportError
from gpurun.ssh_config import parse_destination, resolve
from gpurun.transport.base import CommandResult, Transport
from gpurun.transport.ssh import SshTransport, parse_key_line
from tests.helpers import wait_until


@pytest.fixture(autouse=True)
def client_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """This computer's HOME (~/.ssh/known_hosts, ~/.ssh/config) is a fresh directory; no ssh-agent."""
    home = tmp_path / "client-home"
    (home / ".ssh").mkdir(parents=True, mode=0o700)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    monkeypatch.setenv("GPURUN_SSH_CONFIG", str(home / ".ssh" / "config"))
    return home


def connect(server, **options) -> SshTransport:
    settings = {
        "port": server.port,
        "user": server.user,
        "key_filename": server.key_path,
        "pinned_keys": [server.host_key_line],
    }
    settings.update(options)
    return SshTransport(server.host, **settings)


def other_key_line(tmp_path: Path) -> str:
    path = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return " ".join(path.with_suffix(".pub").read_text().split()[:2])


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def one_line_error(excinfo: pytest.ExceptionInfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and excinfo.value.exit_code == 1
    return message


# ---- commands ---------------------------------------------------------------------------


def test_run_returns_exit_code_stdout_stderr_and_takes_input(sshd) -> None:
    with connect(sshd) as transport:
        result = transport.run("echo out; echo err >&2; exit 7")
        assert result == CommandResult(7, b"out\n", b"err\n")
        assert transport.run("pwd").text.strip() == str(sshd.home)
        assert transport.run("tr a-z A-Z", input=b"hello").stdout == b"HELLO"
        assert transport.run("printf '%s' \"$1\" ", input=None).ok
        quoted = 'it\'s "quoted" $HOME `x`'
        assert transport.run(f"printf %s {__import__('shlex').quote(quoted)}").text == quoted
        with pytest.raises(TransportError, match="listing on .* failed: nope"):
            transport.check("echo nope >&2; exit 2", what="listing")


def test_stream_hands_output_over_as_it_arrives(sshd) -> None:
    arrivals: list[tuple[float, bytes]] = []
    with connect(sshd) as transport:
        code = transport.stream(
            "echo first; sleep 1.5; echo second >&2; exit 4", lambda chunk: arrivals.append((time.monotonic(), chunk))
        )
    assert code == 4
    assert b"".join(chunk for _, chunk in arrivals) == b"first\nsecond\n"
    first = next(at for at, chunk in arrivals if b"first" in chunk)
    second = next(at for at, chunk in arrivals if b"second" in chunk)
    assert second - first > 0.7  # "first" came as it was printed, not with the rest at the end


def test_timeouts_raise_one_line(sshd) -> None:
    with connect(sshd) as transport:
        with pytest.raises(TransportError, match="did not finish"):
            transport.run("sleep 5", timeout=0.5)
        with pytest.raises(TransportError, match="did not finish"):
            transport.stream("sleep 5", lambda chunk: None, timeout=0.5)
        assert transport.run("echo still-usable").text == "still-usable\n"


def test_send_streams_a_large_input_on_one_channel(sshd) -> None:
    block = os.urandom(1 << 20)
    expected = hashlib.sha256(block * 48).hexdigest()
    with connect(sshd) as transport:
        started = time.monotonic()
        result = transport.send("sha256sum", (block for _ in range(48)))
        elapsed = time.monotonic() - started
        assert result.ok and result.text.split()[0] == expected
        assert elapsed < 20
        # A command that stops reading early does not hang the sender.
        early = transport.send("head -c 10 >/dev/null; echo done; exit 3", (block for _ in range(64)))
        assert early.exit_code == 3 and early.stdout == b"done\n"


# ---- host keys --------------------------------------------------------------------------


def test_pinned_key_accepted_and_wrong_pin_refused(sshd, tmp_path: Path) -> None:
    with connect(sshd) as transport:
        assert transport.run("true").ok
        assert transport.server_key_line == sshd.host_key_line
    with pytest.raises(TransportError) as excinfo:
        connect(sshd, pinned_keys=[other_key_line(tmp_path)]).run("true")
    message = one_line_error(excinfo)
    assert f"host key for [127.0.0.1]:{sshd.port} changed" in message and "pinned" in message


def test_unknown_host_refused_without_trust_on_first_use(sshd, tmp_path: Path) -> None:
    with pytest.raises(TransportError) as excinfo:
        connect(sshd, pinned_keys=None, known_hosts_file=str(tmp_path / "kh")).run("true")
    message = one_line_error(excinfo)
    assert "is not known" in message and "SHA256:" in message
    assert not (tmp_path / "kh").exists()


def test_trust_on_first_use_stores_the_key_and_warns(sshd, tmp_path: Path) -> None:
    known = tmp_path / "state" / "known_hosts" / "run-1"
    warnings: list[str] = []
    with connect(
        sshd, pinned_keys=None, known_hosts_file=str(known), trust_on_first_use=True, on_warning=warnings.append
    ) as t:
        assert t.run("true").ok
    assert len(warnings) == 1 and "first use" in warnings[0] and str(known) in warnings[0]
    assert known.read_text() == f"[127.0.0.1]:{sshd.port} {sshd.host_key_line}\n"
    assert known.stat().st_mode & 0o777 == 0o600
    # Known now: no warning, and no trust-on-first-use needed.
    warnings.clear()
    with connect(sshd, pinned_keys=None, known_hosts_file=str(known), on_warning=warnings.append) as again:
        assert again.run("true").ok
    assert warnings == []


def test_changed_key_is_refused_naming_the_file(sshd, tmp_path: Path, client_home: Path) -> None:
    known = tmp_path / "known_hosts"
    known.write_text(f"[127.0.0.1]:{sshd.port} {other_key_line(tmp_path)}\n")
    with pytest.raises(TransportError) as excinfo:
        connect(sshd, pinned_keys=None, known_hosts_file=str(known), trust_on_first_use=True).run("true")
    message = one_line_error(excinfo)
    assert f"host key for [127.0.0.1]:{sshd.port} changed" in message
    assert f"if the machine was rebuilt, remove the line from {known}" in message
    # The user's own known_hosts is consulted first, and named when it holds the old key.
    user_known = client_home / ".ssh" / "known_hosts"
    user_known.write_text(known.read_text())
    with pytest.raises(TransportError, match=f"remove the line from {user_known}"):
        connect(sshd, pinned_keys=None, known_hosts_file=str(tmp_path / "empty"), trust_on_first_use=True).run("true")
    user_known.write_text(sshd.known_hosts_line + "\n")
    with connect(sshd, pinned_keys=None) as transport:
        assert transport.run("true").ok


# ---- failures to connect ----------------------------------------------------------------


def test_wrong_user_or_key_is_one_line(sshd, tmp_path: Path) -> None:
    with pytest.raises(TransportError) as excinfo:
        connect(sshd, user="no-such-user-gpurun").run("true")
    message = one_line_error(excinfo)
    assert "cannot log in" in message and "'no-such-user-gpurun'" in message and str(sshd.port) in message
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    with pytest.raises(TransportError) as excinfo:
        connect(sshd, key_filename=str(stranger)).run("true")
    assert str(stranger) in one_line_error(excinfo)
    with pytest.raises(TransportError, match="does not exist"):
        connect(sshd, key_filename=str(tmp_path / "missing")).run("true")
    locked = tmp_path / "locked"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "secret", "-f", str(locked)], check=True)
    with pytest.raises(TransportError) as excinfo:
        connect(sshd, key_filename=str(locked)).run("true")
    assert "needs a passphrase" in one_line_error(excinfo)


def test_refused_port_and_unknown_host_are_one_line(sshd) -> None:
    port = free_port()
    started = time.monotonic()
    with pytest.raises(TransportError) as excinfo:
        connect(sshd, port=port, connect_retry_for=1.0).run("true")
    assert time.monotonic() - started >= 0.9
    message = one_line_error(excinfo)
    assert "connection refused" in message and f"127.0.0.1:{port}" in message and sshd.user in message
    with pytest.raises(TransportError) as excinfo:
        SshTransport("no-such-host.invalid", user="ubuntu").run("true")
    assert "cannot resolve host 'no-such-host.invalid'" in one_line_error(excinfo)


def test_connect_retries_while_the_machine_boots(private_sshd) -> None:
    private_sshd.stop()
    timer = threading.Timer(1.0, private_sshd.start)
    timer.start()
    try:
        with connect(private_sshd, connect_retry_for=20) as transport:
            assert transport.run("echo up").text == "up\n"
    finally:
        timer.join()


def test_reconnects_after_the_connection_dropped(private_sshd) -> None:
    with connect(private_sshd, reconnect_retry_for=10) as transport:
        assert transport.run("echo one").text == "one\n"
        private_sshd.restart()
        assert transport.run("echo two").text == "two\n"
        # A drop while a command runs is reported, never retried; the next call reconnects.
        errors: list[BaseException] = []

        started = private_sshd.home / "long-command-started"
        started.unlink(missing_ok=True)

        def long_command() -> None:
            try:
                transport.run(f"touch {started}; sleep 5")
            except BaseException as error:
                errors.append(error)

        worker = threading.Thread(target=long_command)
        worker.start()
        wait_until(started.exists, timeout=30, interval=0.05, what="the command to start")
        private_sshd.drop_connections()
        worker.join(10)
        assert errors and isinstance(errors[0], TransportError) and "was lost" in str(errors[0])
        assert transport.run("echo three").text == "three\n"


def test_proxy_jump_through_an_ssh_config_alias(sshd, tmp_path: Path, client_home: Path) -> None:
    (client_home / ".ssh" / "config").write_text(
        f"Host jumpbox\n  HostName 127.0.0.1\n  Port {sshd.port}\n  User {sshd.user}\n  IdentityFile {sshd.key_path}\n"
    )
    warnings: list[str] = []
    known = tmp_path / "kh"
    with connect(
        sshd, proxy_jump="jumpbox", known_hosts_file=str(known), trust_on_first_use=True, on_warning=warnings.append
    ) as transport:
        assert transport.run("echo through").text == "through\n"
        assert transport._jump is not None and transport._jump.connected
    assert len(warnings) == 1 and "first use" in warnings[0]  # the jump host's key; the target is pinned


# ---- ssh config -------------------------------------------------------------------------


def test_ssh_config_resolves_aliases_and_explicit_values_win(client_home: Path, tmp_path: Path) -> None:
    key = tmp_path / "id_box"
    key.write_text("not really a key")
    ssh = client_home / ".ssh"
    (ssh / "extra.conf").write_text("Host inc\n  HostName 10.0.0.9\n")
    (ssh / "config").write_text(
        "Include extra.conf\n"
        "Host box\n"
        "  HostName 192.0.2.10\n"
        "  User alice\n"
        "  Port 2200\n"
        f"  IdentityFile {key}\n"
        "  ProxyJump bastion\n"
        "Host *\n"
        "  User everyone\n"
    )
    target = resolve("box")
    assert (target.host, target.user, target.port, target.identity_file, target.proxy_jump) == (
        "192.0.2.10",
        "alice",
        2200,
        str(key),
        "bastion",
    )
    assert resolve("box", user="bob", port=22).user == "bob"
    assert resolve("box", port=2300).port == 2300
    assert (resolve("carol@box:2400").user, resolve("carol@box:2400").port) == ("carol", 2400)
    assert resolve("inc").host == "10.0.0.9" and resolve("inc").user == "everyone"
    plain = resolve("203.0.113.5")
    assert (plain.host, plain.port, plain.user, plain.identity_files) == ("203.0.113.5", 22, "everyone", ())
    assert parse_destination("[::1]:2222") == (None, "::1", 2222)
    with pytest.raises(BadInput, match="not a port"):
        parse_destination("box:99999")


def test_ssh_config_alias_reaches_the_test_sshd(sshd, client_home: Path) -> None:
    (client_home / ".ssh" / "config").write_text(
        f"Host testbox\n  HostName {sshd.host}\n  Port {sshd.port}\n  User {sshd.user}\n  IdentityFile {sshd.key_path}\n"
    )
    target = resolve("testbox")
    transport = SshTransport(
        target.host,
        port=target.port,
        user=target.user,
        key_filename=target.identity_file,
        pinned_keys=[sshd.host_key_line],
    )
    with transport:
        assert transport.run("whoami").text.strip() == sshd.user


# ---- the agent --------------------------------------------------------------------------


class CountingTransport(Transport):
    def __init__(self, inner: Transport) -> None:
        self.inner, self.label, self.calls = inner, inner.label, []

    def run(self, command, *, input=None, timeout=None):
        self.calls.append("run")
        return self.inner.run(command, input=input, timeout=timeout)

    def stream(self, command, on_output, *, timeout=None):
        self.calls.append("stream")
        return self.inner.stream(command, on_output, timeout=timeout)

    def send(self, command, chunks, *, timeout=None):
        self.calls.append("send")
        return self.inner.send(command, chunks, timeout=timeout)


def test_ensure_agent_ships_once_and_is_reused(private_sshd) -> None:
    from gpurun.app.agent_install import agent_bundle, ensure_agent

    said: list[str] = []
    with connect(private_sshd) as ssh:
        transport = CountingTransport(ssh)
        python = ensure_agent(transport, said.append, need_s3=False)
        tag = agent_bundle()[0]
        assert python == f"{private_sshd.home}/.gpurun/agent/{tag}/python"
        assert transport.calls == ["run", "send"] and len(said) == 1 and "installing" in said[0]
        probe = ssh.run(
            f"cd /tmp && PYTHONPATH=/nowhere {python} -c "
            "'import gpurun, gpurun.store.file, sys; print(gpurun.__file__); print(sys.prefix); print(sys.path[0])'"
        )
        module, prefix, first = probe.text.split("\n")[:3]
        assert probe.ok, probe.stderr
        assert module == f"{private_sshd.home}/.gpurun/agent/{tag}/gpurun/__init__.py"
        assert prefix == f"{private_sshd.home}/.gpurun/venv"
        assert first != "/tmp" and "/nowhere" not in probe.text
        # It can follow setsid/nohup like any command, and the agent needs nothing but the venv.
        assert ssh.run(f"nohup {python} -c 'print(1)'").text.strip() == "1"
        agent_help = ssh.run(f"setsid {python} -m gpurun.agent --help")
        assert agent_help.ok and "--watch" in agent_help.text, agent_help.stderr

        transport.calls.clear()
        said.clear()
        assert ensure_agent(transport, said.append, need_s3=False) == python
        assert transport.calls == ["run"] and said == []


def _fake_boto3_wheel(directory: Path) -> None:
    files = {
        "boto3/__init__.py": b"FAKE = True\n",
        "boto3-99.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: boto3\nVersion: 99.0\n",
        "boto3-99.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for name, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(data)}")
    record.append("boto3-99.0.dist-info/RECORD,,")
    files["boto3-99.0.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as wheel:
        for name, data in files.items():
            wheel.writestr(name, data)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "boto3-99.0-py3-none-any.whl").write_bytes(buffer.getvalue())


def test_ensure_agent_installs_boto3_into_its_venv_only_when_needed(
    private_sshd, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gpurun.app.agent_install import ensure_agent

    wheels = tmp_path / "wheels"
    _fake_boto3_wheel(wheels)
    monkeypatch.setenv("GPURUN_AGENT_PIP_ARGS", f"--no-index --find-links {wheels}")
    with connect(private_sshd) as ssh:  # its own HOME: the fake boto3 stays out of the shared venv
        python = ensure_agent(ssh, lambda line: None, need_s3=False)
        assert ssh.run(f"{python} -c 'import boto3; print(boto3.__file__)'").text.find(".gpurun/venv") < 0
        said: list[str] = []
        assert ensure_agent(ssh, said.append, need_s3=True) == python
        assert said and "boto3" in said[0]
        assert ssh.run(f"{python} -c 'import boto3; print(boto3.FAKE)'").text.strip() == "True"
        said.clear()
        ensure_agent(ssh, said.append, need_s3=True)
        assert said == []


def test_seeded_agent_venv_finds_boto3_without_pip(private_sshd) -> None:
    from gpurun.app.agent_install import ensure_agent

    private_sshd.seed_agent_venv()
    said: list[str] = []
    with connect(private_sshd) as ssh:
        python = ensure_agent(ssh, said.append, need_s3=True)
        assert "boto3" not in said[0]  # only the package was shipped
        probe = ssh.run(f"{python} -c 'import boto3, gpurun; print(gpurun.__file__)'")
        assert probe.ok and ".gpurun/agent/" in probe.text, probe.stderr


def test_ensure_agent_names_python3_venv_when_venv_is_missing(private_sshd) -> None:
    from gpurun.app.agent_install import ensure_agent

    fake = private_sshd.directory / "fakebin"
    fake.mkdir()
    (fake / "python3").write_text(
        "#!/bin/sh\n"
        'if [ "$1" = -m ] && [ "$2" = venv ]; then\n'
        "  echo 'The virtual environment was not created successfully because ensurepip is not available.' >&2\n"
        "  exit 1\n"
        "fi\n"
        "exit 0\n"
    )
    (fake / "python3").chmod(0o755)
    with (private_sshd.home / ".bashrc").open("a") as bashrc:
        bashrc.write(f'export PATH="{fake}:$PATH"\n')
    with connect(private_sshd) as ssh, pytest.raises(TransportError) as excinfo:
        ensure_agent(ssh, lambda line: None, need_s3=False)
    message = one_line_error(excinfo)
    assert "python3-venv" in message and "ensurepip is not available" in message


# ---- the ssh provider -------------------------------------------------------------------


def _ssh_spec(tmp_path: Path, hosts: list[str], **ssh):
    from gpurun.spec import validate_spec

    return validate_spec(
        {"name": "box", "provider": "ssh", "run": "true", "ssh": {"hosts": hosts, **ssh}},
        source="experiment.yaml",
        spec_dir=tmp_path,
    )


def test_ssh_provider_acquires_hosts_through_ssh_config(sshd, tmp_path: Path, client_home: Path, gpurun_home) -> None:
    from gpurun.app.connections import Connections
    from gpurun.providers.ssh import SshProvider, tofu_known_hosts

    (client_home / ".ssh" / "config").write_text(
        f"Host testbox\n  HostName {sshd.host}\n  Port {sshd.port}\n  User {sshd.user}\n  IdentityFile {sshd.key_path}\n"
    )
    spec = _ssh_spec(tmp_path, ["testbox", "testbox"])
    record = {"run": "box-abc123", "provider": "ssh", "store": "file:///tmp/store"}
    provider = SshProvider()
    rows = dict(provider.plan(spec, record["run"]))
    assert f"{sshd.user}@127.0.0.1:{sshd.port} (alias testbox)" == rows["node 0"] == rows["node 1"]

    said: list[str] = []
    conns = Connections()
    machines = provider.acquire(spec, record, lambda r: None, said.append, connect=conns.connect)
    assert [m["rank"] for m in machines] == [0, 1]
    first = machines[0]
    assert (first["host"], first["port"], first["user"], first["key_path"]) == (
        "127.0.0.1",
        sshd.port,
        sshd.user,
        sshd.key_path,
    )
    assert first["run_dir"] == f"{sshd.home}/gpurun/box-abc123"
    assert first["private_ip"] and first["host_keys"] == [sshd.host_key_line]
    assert sum("no GPU found" in line for line in said) == 2
    assert any("first use" in line for line in said)
    assert tofu_known_hosts(record["run"]).read_text().startswith(f"[127.0.0.1]:{sshd.port} ssh-ed25519 ")

    record["machines"] = machines
    transport = conns.connect(record, machines[1])  # the connection acquire opened, kept per (run, rank)
    assert transport.run("echo ok").text == "ok\n"
    assert provider.release(record, lambda r: None, said.append) == []
    conns.close(record["run"])
    assert not transport.connected


def test_ssh_provider_reports_an_unreachable_host_in_one_line(sshd, tmp_path: Path) -> None:
    from gpurun.app.connections import Connections
    from gpurun.providers.ssh import SshProvider

    spec = _ssh_spec(tmp_path, [f"127.0.0.1:{free_port()}"], identity_file=sshd.key_path)
    record = {"run": "box-x", "provider": "ssh", "store": "file:///s"}
    with pytest.raises(TransportError) as excinfo:
        SshProvider().acquire(spec, record, lambda r: None, lambda line: None, connect=Connections().connect)
    assert "connection refused" in one_line_error(excinfo)
    with pytest.raises(BadInput, match="identity_file"):
        SshProvider().plan(_ssh_spec(tmp_path, ["h"], identity_file=str(tmp_path / "nope")), "box-x")
    (Path.home() / ".ssh" / "config").write_text("Host viacmd\n  ProxyCommand nc %h %p\n")
    with pytest.raises(BadInput, match="ProxyJump"):
        SshProvider().plan(_ssh_spec(tmp_path, ["viacmd"]), "box-x")


# ---- gpurun ssh / tunnel / ssh-config ---------------------------------------------------


def _stop_ssh_client(process: subprocess.Popen) -> None:
    """SIGTERM, and again if ssh is still running 3 s later.

    OpenSSH 9.2 (Debian 12) checks its quit flag and then calls poll() without
    blocking signals in between; a signal that lands in that gap is seen only
    when poll() times out (ServerAliveInterval, 15 s). CI hit that gap once.
    A second signal wakes poll(), as a second Ctrl-C does for a user.
    """
    process.terminate()
    try:
        process.wait(3)
    except subprocess.TimeoutExpired:
        process.terminate()
        process.wait(10)


def _record(server, run: str = "exp-abc123", nodes: int = 1, host_key: str | None = None) -> dict:
    return {
        "run": run,
        "provider": "ssh",
        "state": "running",
        "machines": [
            {
                "rank": rank,
                "host": server.host,
                "port": server.port,
                "user": server.user,
                "key_path": server.key_path,
                "host_keys": [host_key or server.host_key_line],
                "run_dir": f"{server.home}/gpurun/{run}",
            }
            for rank in range(nodes)
        ],
    }


def test_ssh_argv_pins_the_host_key_and_works(sshd, tmp_path: Path, gpurun_home: Path) -> None:
    from gpurun.app.remote_access import known_hosts_file, ssh_argv

    record = _record(sshd)
    (sshd.home / "gpurun" / record["run"] / "work").mkdir(parents=True, exist_ok=True)
    argv = ssh_argv(record, ["pwd;", "echo", "hi"])
    assert argv[0] == "ssh" and "StrictHostKeyChecking=yes" in argv
    assert f"UserKnownHostsFile={known_hosts_file(record['run'])}" in argv
    assert known_hosts_file(record["run"]).read_text() == f"[127.0.0.1]:{sshd.port} {sshd.host_key_line}\n"
    done = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"{sshd.home}/gpurun/{record['run']}/work\nhi\n"
    shell = ssh_argv(record)
    assert "-t" in shell and shell[-1].endswith('exec "$SHELL" -l')

    forged = _record(sshd, host_key=other_key_line(tmp_path))
    refused = subprocess.run(ssh_argv(forged, ["true"]), capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert refused.returncode == 255 and "host key" in refused.stderr.lower()
    # Without recorded keys: the run's trusted-on-first-use file, still strict.
    from gpurun.providers.ssh import tofu_known_hosts

    unpinned = _record(sshd, run="tofu-run")
    unpinned["machines"][0]["host_keys"] = []
    tofu_known_hosts("tofu-run").parent.mkdir(parents=True, exist_ok=True)
    tofu_known_hosts("tofu-run").write_text(sshd.known_hosts_line + "\n")
    fallback = subprocess.run(ssh_argv(unpinned, ["true"]), capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert fallback.returncode == 0, fallback.stderr
    with pytest.raises(BadInput, match="no node 3"):
        ssh_argv(record, rank=3)
    with pytest.raises(BadInput, match="this computer"):
        ssh_argv({"run": "l", "provider": "local", "machines": []})


def test_ssh_config_entries_work_with_the_system_ssh(sshd, client_home: Path, gpurun_home: Path) -> None:
    from gpurun.app import remote_access

    record = _record(sshd, nodes=2)
    other = _record(sshd, run="other-zzz999")
    remote_access.write_ssh_config(other)
    path = remote_access.write_ssh_config(record)
    path = remote_access.write_ssh_config(record)  # rewriting replaces the block
    text = path.read_text()
    assert text.count("Host gpurun-exp-abc123\n") == 1 and "Host gpurun-exp-abc123-1\n" in text
    assert "Host gpurun-other-zzz999\n" in text and "StrictHostKeyChecking yes" in text
    for alias in ("gpurun-exp-abc123", "gpurun-exp-abc123-1"):
        done = subprocess.run(
            ["ssh", "-F", str(path), "-o", "BatchMode=yes", alias, "echo", alias],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=30,
        )
        assert done.returncode == 0 and done.stdout == f"{alias}\n", done.stderr

    user_config = client_home / ".ssh" / "config"
    user_config.write_text("Host old\n  User someone\n")
    assert remote_access.install_ssh_config_include() == (user_config, True)
    lines = [line for line in user_config.read_text().splitlines() if line and not line.startswith("#")]
    assert lines[0] == f"Include {path}" and lines[1:] == ["Host old", "  User someone"]
    before = user_config.read_text()
    assert remote_access.install_ssh_config_include() == (user_config, False)
    assert user_config.read_text() == before
    # gpurun's own resolver follows the Include too.
    assert resolve("gpurun-exp-abc123-1").port == sshd.port
    assert resolve("old").user == "someone"

    assert remote_access.remove_ssh_config(record["run"])
    assert "exp-abc123" not in path.read_text() and "gpurun-other-zzz999" in path.read_text()


def test_tunnel_forwards_a_port(sshd, gpurun_home: Path) -> None:
    from gpurun.app.remote_access import tunnel_argv

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    remote_port = server.getsockname()[1]

    def echo_once() -> None:
        connection, _ = server.accept()
        with connection:
            connection.sendall(connection.recv(100).upper())

    threading.Thread(target=echo_once, daemon=True).start()
    local_port = free_port()
    argv = tunnel_argv(_record(sshd), remote_port, local_port)
    assert "-N" in argv and f"127.0.0.1:{local_port}:127.0.0.1:{remote_port}" in argv
    tunnel = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                client = socket.create_connection(("127.0.0.1", local_port), timeout=5)
                break
            except OSError:
                assert tunnel.poll() is None, tunnel.stderr.read() if tunnel.stderr else ""
                assert time.monotonic() < deadline
                time.sleep(0.05)
        with client:
            client.sendall(b"ping")
            assert client.recv(100) == b"PING"
    finally:
        _stop_ssh_client(tunnel)
        server.close()
    with pytest.raises(BadInput, match="not a port"):
        tunnel_argv(_record(sshd), 70000)


def test_parse_key_line_accepts_known_hosts_and_pub_formats(sshd) -> None:
    key = parse_key_line(sshd.host_key_line)
    assert parse_key_line(sshd.known_hosts_line) == key
    assert parse_key_line(sshd.host_key_line + " comment") == key
    with pytest.raises(ValueError):
        parse_key_line("garbage")


def test_gpurun_ssh_passes_the_commands_own_debug_flag_on(sshd, gpurun_home: Path) -> None:
    from gpurun import runs

    record = {**_record(sshd), "created_at": "2026-11-26T10:00:00Z", "store": "file:///tmp/unused"}
    runs.save(record)
    (sshd.home / "gpurun" / record["run"] / "work").mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [sys.executable, "-m", "gpurun", "ssh", record["run"], "echo", "train.py", "--debug"],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "train.py --debug\n"  # the machine's command keeps its --debug
