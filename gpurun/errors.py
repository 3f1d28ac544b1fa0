"""The one exception family of gpurun; each error carries the exit status it means."""

from __future__ import annotations

from collections.abc import Sequence


class GpurunError(Exception):
    """An error a person can act on; the CLI prints its message as one line.

    `details` are further lines the CLI prints under it (a table of what was
    tried, what was removed); the message itself stays one line.
    """

    exit_code = 1

    def __init__(self, message: str, *, exit_code: int | None = None, details: Sequence[str] = ()) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code
        self.details: list[str] = list(details)

    @property
    def message(self) -> str:
        return str(self)


class BadInput(GpurunError):
    """The spec, a flag or a run name is wrong: nothing was created."""

    exit_code = 2


class SpecError(BadInput):
    """The experiment file is invalid."""


class NoCredentials(BadInput):
    """The cloud's credentials are missing, expired or unusable; nothing was asked of the cloud."""


class UnknownRun(BadInput):
    """No run by that name is recorded here or in the store."""


class UnknownRegion(BadInput):
    """aws.region names no AWS region."""


class NoCapacity(GpurunError):
    """Every zone and instance type the spec allows is out of capacity."""

    exit_code = 3


class StillWaiting(NoCapacity):
    """No capacity yet, and the launch was told to leave its Auto Scaling group trying (--keep-waiting)."""


class Interrupted(GpurunError):
    """The user pressed Ctrl-C."""

    exit_code = 130


class StoreError(GpurunError):
    """The checkpoint store refused or failed an operation."""


class NoSuchBucket(StoreError):
    """The store's S3 bucket does not exist (or these credentials cannot see it)."""


class InvalidDocument(StoreError):
    """A document read from a store or a machine does not fit its schema; the message names the object.

    `name` is the object (a URL or a file name) and `reason` what is wrong with it, for a caller
    that words its own line ("... is not a run record (reason); skipped").
    """

    def __init__(self, message: str, *, name: str = "", reason: str = "") -> None:
        super().__init__(message)
        self.name = name
        self.reason = reason or message


class NewerSchema(InvalidDocument):
    """A document written by a newer gpurun (its `version` is above what this one reads): never
    misread, never rewritten by this one; `reason` says to upgrade."""


class SnapshotConflict(StoreError):
    """Another writer already owns this snapshot number."""


class TransportError(GpurunError):
    """A command or a transfer to the machine failed."""


class ConnectionLost(TransportError):
    """The connection to the machine dropped mid-command; the next command reconnects."""
