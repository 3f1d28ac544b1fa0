"""`provider: local`: this computer is the machine; runs live under GPURUN_HOME/local/<run>."""

from __future__ import annotations

import socket
from typing import TYPE_CHECKING

from gpurun import paths
from gpurun.models import Machine
from gpurun.providers.base import Connect, OnChange, Provider, Record, Say

if TYPE_CHECKING:
    from gpurun.spec import Spec


class LocalProvider(Provider):
    name = "local"

    def plan(self, spec: Spec, run: str) -> list[tuple[str, str]]:
        return [
            ("machine", f"this computer ({socket.gethostname()})"),
            ("run directory", str(paths.local_runs_dir() / run)),
        ]

    def acquire(
        self, spec: Spec, record: Record, on_change: OnChange, say: Say, *, connect: Connect | None = None
    ) -> list[Machine]:
        run_dir = paths.local_runs_dir() / record["run"]
        run_dir.mkdir(parents=True, exist_ok=True)
        return [
            {"rank": 0, "host": "localhost", "private_ip": "127.0.0.1", "run_dir": str(run_dir), "state": "running"}
        ]

    def release(self, record: Record, on_change: OnChange, say: Say) -> list[str]:
        return []
