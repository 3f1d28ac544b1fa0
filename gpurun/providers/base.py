"""The interface every provider implements, and the machine it hands back.

A provider records each resource in the run record the moment it exists
(`record["resources"]`, saved through `on_change`), so that a failed or
interrupted launch, or a teardown from another process, can find and remove it.

Providers import no transport: the app opens transports from the machine dicts
(`gpurun.app.connections`), and hands `acquire` a `Connect` for a provider that
must look at its machines while acquiring them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from gpurun.models import Machine, RunRecord
from gpurun.providers.capabilities import Capabilities, ConnectInfo, capabilities, connect_info

if TYPE_CHECKING:
    from gpurun.spec import Spec

Record = RunRecord
OnChange = Callable[[Record], None]
Say = Callable[[str], None]


class Shell(Protocol):
    """What a provider may do on a machine while acquiring it (the app's transport satisfies it)."""

    label: str

    @property
    def server_key_line(self) -> str | None: ...

    def check(self, command: str, *, what: str, timeout: float | None = None) -> str: ...


#: connect(record, machine, say): a shell on one machine of the run; `say` hears its warnings.
Connect = Callable[[Record, Machine, Say], Shell]


class Provider(ABC):
    name: str

    @property
    def capabilities(self) -> Capabilities:
        """What this provider can do (`providers.capabilities`: app/ decides from these, never from `name`)."""
        return capabilities(self.name)

    def connect_info(self, record: Record, machine: Machine) -> ConnectInfo | None:
        """How to reach one of the run's machines; None when it is this computer."""
        return connect_info(record, machine)

    @abstractmethod
    def plan(self, spec: Spec, run: str) -> list[tuple[str, str]]:
        """Check the spec against the world (raising BadInput) and describe what launch would do.

        Creates nothing. Returns (label, value) rows for `--dry-run` and the launch header.
        """

    @abstractmethod
    def acquire(
        self, spec: Spec, record: Record, on_change: OnChange, say: Say, *, connect: Connect | None = None
    ) -> list[Machine]:
        """Create or reach the machines; returns one dict per node, rank order.

        Each machine dict holds at least `rank`, `host` and, once connected,
        `run_dir` (absolute path of the run directory on that machine), plus
        what the app needs to connect to it (port, user, key_path, host_keys, ...).
        `connect` opens a shell on a machine, for a provider that looks at its
        machines while acquiring them.
        """

    def plan_offline(self, spec: Spec, run: str) -> list[tuple[str, str]] | None:
        """The plan rows that need no call to the cloud, for `--dry-run` without credentials;
        what could not be resolved says so. None: this provider has nothing to show offline."""
        return None

    def setup_skipped(self, spec: Spec, run: str) -> str | None:
        """Why the machines need no `setup` (their image already holds its result), or None: setup runs."""
        return None

    def refresh(self, records: list[Record]) -> None:
        """Update machine states in place from the provider (cheap; may be a no-op)."""

    @abstractmethod
    def release(self, record: Record, on_change: OnChange, say: Say) -> list[str]:
        """Remove what the run created; quiet about what is already gone. Returns what was removed."""

    def check_access(self, record: Record) -> None:
        """Raise BadInput when these credentials cannot reach what the run created (before touching it)."""

    def machine_env(self, record: Record, machine: Machine) -> dict[str, str]:
        """Extra environment for the job on this machine (credentials are never among it)."""
        return {}
