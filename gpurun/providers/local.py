"""`provider: local`: this computer is the machine; runs live under GPURUN_HOME/local/<run>."""

from __future__ import annotations

import shlex
import socket
import sys
from typing import Any

from gpurun import paths
from gpurun.providers.base import OnChange, Provider, Record, Say
from gpurun.transport.base import Transport
from gpurun.transport.local import LocalTransport


class LocalProvider(Provider):
    name = "local"

    def plan(self, spec, run: str) -> list[tuple[str, str]]:
        return [
            ("machine", f"this computer ({socket.gethostname()})"),
            ("run directory", str(paths.local_runs_dir() / run)),
        ]

    def acquire(self, spec, record: Record, on_change: OnChange, say: Say) -> list[dict[str, Any]]:
        run_dir = paths.local_runs_dir() / record["run"]
        run_dir.mkdir(parents=True, exist_ok=True)
        return [{"rank": 0, "host": "localhost", "private_ip": "127.0.0.1", "run_dir": str(run_dir), "state": "running"}]

    def connect(self, record: Record, machine: dict[str, Any]) -> Transport:
        return LocalTransport()

    def agent_python(self, record: Record, machine: dict[str, Any], transport: Transport, say: Say) -> str:
        return shlex.quote(sys.executable)

    def release(self, record: Record, on_change: OnChange, say: Say) -> list[str]:
        return []
