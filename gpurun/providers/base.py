"""The interface every provider implements, and the machine it hands back.

A provider records each resource in the run record the moment it exists
(`record["resources"]`, saved through `on_change`), so that a failed or
interrupted launch, or a teardown from another process, can find and remove it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gpurun.spec import Spec
    from gpurun.transport.base import Transport

Record = dict[str, Any]
OnChange = Callable[[Record], None]
Say = Callable[[str], None]


class Provider(ABC):
    name: str

    @abstractmethod
    def plan(self, spec: Spec, run: str) -> list[tuple[str, str]]:
        """Check the spec against the world (raising BadInput) and describe what launch would do.

        Creates nothing. Returns (label, value) rows for `--dry-run` and the launch header.
        """

    @abstractmethod
    def acquire(self, spec: Spec, record: Record, on_change: OnChange, say: Say) -> list[dict[str, Any]]:
        """Create or reach the machines; returns one dict per node, rank order.

        Each machine dict holds at least `rank`, `host` and, once connected,
        `run_dir` (absolute path of the run directory on that machine).
        """

    @abstractmethod
    def connect(self, record: Record, machine: dict[str, Any]) -> Transport:
        """A transport to one machine of the run."""

    @abstractmethod
    def agent_python(self, record: Record, machine: dict[str, Any], transport: Transport, say: Say) -> str:
        """A Python on the machine that can run `python -m gpurun` (shipping gpurun if needed)."""

    def refresh(self, records: list[Record]) -> None:
        """Update machine states in place from the provider (cheap; may be a no-op)."""

    @abstractmethod
    def release(self, record: Record, on_change: OnChange, say: Say) -> list[str]:
        """Remove what the run created; quiet about what is already gone. Returns what was removed."""

    def machine_env(self, record: Record, machine: dict[str, Any]) -> dict[str, str]:
        """Extra environment for the job on this machine (credentials are never among it)."""
        return {}
