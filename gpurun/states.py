"""The states a run and a job can be in, as they are written in records and `--json`.

Both are `str` enums: a record holds the plain string ("running"), and a state
read back from a record compares equal to its member.
"""

from __future__ import annotations

from enum import Enum


class RunState(str, Enum):
    """A run's state, derived from its newest job (see README, "JSON fields")."""

    LAUNCHING = "launching"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    ENDED = "ended"

    def __str__(self) -> str:
        return self.value


#: Machine states (as providers record them) of a machine that no longer exists.
MACHINE_GONE = frozenset({"terminated", "gone"})
#: ... and of one that will not answer or run a job again without someone starting it.
MACHINE_NOT_RUNNING = MACHINE_GONE | {"shutting-down", "stopping", "stopped"}

#: A run in these states may still have a job and machines to ask about.
ACTIVE = (RunState.LAUNCHING, RunState.RUNNING)


class JobState(str, Enum):
    """How a job ended; a job without one is still running."""

    EXITED = "exited"
    KILLED = "killed"
    INTERRUPTED = "interrupted"
    MACHINE_LOST = "machine_lost"

    def __str__(self) -> str:
        return self.value
