"""Boot emulator: runs each new Auto Scaling instance's user data as cloud-init would (fixture `boot_emulator`).

moto creates a group's instances from the launch template at once and keeps
their user data, but boots nothing. This emulator watches moto's groups; for
each new instance it starts a fake IMDSv2 with that instance's identity and
role credentials, makes a home of its own, and runs the user data there with
the moto server as every AWS endpoint. An instance that leaves its group
(terminated, scaled in, replaced) is taken away: every process it started is
killed, as a reclaimed machine's would be.

With `ssh_port`, each instance also gets an sshd of its own (tests/plugins/sshd.py)
on an address of its own (127.0.0.2, 127.0.0.3, ...) at that port, set as the
instance's public IP in moto, whose HOME is the instance's home; it accepts the
keys in `authorized_keys` (the run's key pair, as cloud-init installs it) and
has a new host key, as a new machine does. `~/instance-id` holds the instance's
id (cloud-init keeps it in /var/lib/cloud/data/instance-id).

No credentials reach the machine except through its fake IMDS; every power
command (shutdown, poweroff, halt, reboot, systemctl, systemd-run) is a stub
on PATH that only writes a line in `power.log`, so no test ever reaches the
host's.
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.helpers import live_processes

if TYPE_CHECKING:
    # Imported where used: a plugin imported by another is not assertion-rewritten.
    from tests.plugins.fake_imds import FakeImds
    from tests.plugins.sshd import Sshd

POWER_COMMANDS = ("shutdown", "poweroff", "halt", "reboot", "systemctl", "systemd-run")
MARK = "GPURUN_EMULATED_INSTANCE"
_DROPPED_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
)


@dataclass
class Instance:
    instance_id: str
    home: Path
    imds: FakeImds
    server: ThreadingHTTPServer
    booted_at: float
    user_data: Path
    taken_away_at: float | None = None
    boot: subprocess.Popen[bytes] | None = None
    sshd: Sshd | None = None


@dataclass
class BootEmulator:
    endpoint: str
    root: Path
    region: str = "us-east-1"
    #: Each instance's own sshd listens on this port (None: no sshd).
    ssh_port: int | None = None
    #: Public keys each instance's sshd accepts besides the test client's (read at each boot).
    authorized_keys: Path | None = None
    instances: dict[str, Instance] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    #: Instances that were in a group before the emulator started (another test's): never booted.
    ignored: set[str] = field(default_factory=set)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        import boto3

        self._autoscaling = boto3.client("autoscaling", endpoint_url=self.endpoint, region_name=self.region)
        self._ec2 = boto3.client("ec2", endpoint_url=self.endpoint, region_name=self.region)
        stubs = self.root / "stubs"
        stubs.mkdir(parents=True, exist_ok=True)
        for name in POWER_COMMANDS:
            stub = stubs / name
            stub.write_text(f'#!/bin/sh\necho "{name} $*" >> {self.root / "power.log"}\nexit 0\n')
            stub.chmod(0o755)
        self.ignored = set(self._members())
        self._thread = threading.Thread(target=self._watch, name="boot-emulator", daemon=True)
        self._thread.start()

    # -- what a test does ------------------------------------------------------------------------

    def interrupt(self, instance_id: str) -> None:
        """A spot interruption notice on that instance's metadata service."""
        self.instances[instance_id].imds.interrupt()

    def live(self) -> list[str]:
        with self._lock:
            return [key for key, item in self.instances.items() if item.taken_away_at is None]

    def run_dir(self, instance_id: str, run: str) -> Path:
        return self.instances[instance_id].home / "gpurun" / run

    def power_log(self) -> str:
        path = self.root / "power.log"
        return path.read_text() if path.exists() else ""

    # -- the watcher ------------------------------------------------------------------------------

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                self.step()
            except Exception as error:  # a test reads these; the watcher goes on
                self.errors.append(f"{type(error).__name__}: {error}")
            self._stop.wait(0.2)

    def _members(self) -> dict[str, dict[str, Any]]:
        members: dict[str, dict[str, Any]] = {}
        for group in self._autoscaling.describe_auto_scaling_groups()["AutoScalingGroups"]:
            for item in group.get("Instances", []):
                if item.get("LifecycleState") in ("Pending", "InService"):
                    members[item["InstanceId"]] = item
        return members

    def step(self) -> None:
        members = self._members()
        for instance_id, item in members.items():
            if instance_id not in self.instances and instance_id not in self.ignored:
                self._boot(instance_id, item)
        for instance_id in self.live():
            if instance_id not in members:
                self.take_away(instance_id)

    def _boot(self, instance_id: str, item: dict[str, Any]) -> None:
        from tests.plugins.fake_imds import FakeImds, serve_fake_imds

        home = self.root / instance_id / "home"
        home.mkdir(parents=True)
        identity = {
            "instanceId": instance_id,
            "instanceType": item.get("InstanceType", ""),
            "region": self.region,
            "availabilityZone": item.get("AvailabilityZone", ""),
        }
        imds = FakeImds(identity=identity)
        server = serve_fake_imds(imds)
        answer = self._ec2.describe_instance_attribute(InstanceId=instance_id, Attribute="userData")
        script = self.root / instance_id / "user-data"
        script.write_bytes(base64.b64decode(answer["UserData"]["Value"]))
        script.chmod(0o700)
        env = {key: value for key, value in os.environ.items() if key not in _DROPPED_ENV}
        env.update(
            {
                MARK: instance_id,
                "HOME": str(home),
                "GPURUN_BOOT_HOME": str(home),
                "GPURUN_AGENT_PYTHON": sys.executable,
                "AWS_EC2_METADATA_SERVICE_ENDPOINT": imds.url,
                "AWS_ENDPOINT_URL": self.endpoint,
                # The host's AWS files are not the machine's: it has only its role.
                "AWS_CONFIG_FILE": str(home / ".aws" / "config"),
                "AWS_SHARED_CREDENTIALS_FILE": str(home / ".aws" / "credentials"),
                "PATH": f"{self.root / 'stubs'}{os.pathsep}{os.environ.get('PATH', '')}",
                "NO_PROXY": "127.0.0.1,localhost",
            }
        )
        instance = Instance(instance_id, home, imds, server, time.monotonic(), script)
        (home / "instance-id").write_text(instance_id + "\n")
        if self.ssh_port is not None:
            instance.sshd = self._sshd(instance_id, len(self.instances) + 2)
        with self._lock:
            self.instances[instance_id] = instance
        with open(self.root / instance_id / "cloud-init-output.log", "ab") as log:
            # cloud-init runs the user data with python3 from its shebang; this interpreter stands in.
            instance.boot = subprocess.Popen(
                [sys.executable, str(script)], cwd=home, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )

    def _sshd(self, instance_id: str, number: int) -> Sshd:
        """The instance's sshd on 127.0.0.<number>, which becomes its public IP in moto."""
        from moto.core import DEFAULT_ACCOUNT_ID
        from moto.ec2.models import ec2_backends

        from tests.plugins.sshd import make_sshd

        assert self.ssh_port is not None
        address = f"127.0.0.{number}"
        server = make_sshd(self.root / instance_id, host=address, port=self.ssh_port)
        if self.authorized_keys is not None and self.authorized_keys.exists():
            with open(server.directory / "authorized_keys", "a") as handle:
                handle.write(self.authorized_keys.read_text())
        ec2_backends[DEFAULT_ACCOUNT_ID][self.region].get_instance(instance_id).nics[0].public_ip = address
        return server

    def take_away(self, instance_id: str) -> None:
        """The machine is gone: everything it ran dies at once, its metadata service too."""
        with self._lock:
            instance = self.instances[instance_id]
            if instance.taken_away_at is not None:
                return
            instance.taken_away_at = time.monotonic()
        mark = f"{MARK}={instance_id}".encode()
        for _round in range(3):
            for pid in live_processes(lambda _cmdline, environ: mark in environ):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        instance.server.shutdown()
        instance.server.server_close()
        if instance.sshd is not None:
            instance.sshd.stop()

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        for instance_id in list(self.instances):
            self.take_away(instance_id)
        for instance in self.instances.values():
            if instance.boot is not None and instance.boot.poll() is None:
                instance.boot.kill()
                instance.boot.wait(10)


@pytest.fixture
def boot_emulator(moto_server: str, tmp_path: Path) -> Iterator[BootEmulator]:
    emulator = BootEmulator(moto_server, tmp_path / "machines")
    emulator.start()
    try:
        yield emulator
    finally:
        emulator.close()
