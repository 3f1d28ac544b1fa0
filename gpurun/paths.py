"""Where gpurun keeps its state on this computer (GPURUN_HOME overrides)."""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

from gpurun.errors import GpurunError


def home() -> Path:
    override = os.environ.get("GPURUN_HOME")
    if override:
        return Path(override).expanduser().resolve()
    from platformdirs import user_state_path

    return user_state_path("gpurun", appauthor=False)


def runs_dir() -> Path:
    return home() / "runs"


def keys_dir() -> Path:
    return home() / "keys"


def local_runs_dir() -> Path:
    return home() / "local"


def default_store_url() -> str:
    return f"file://{home() / 'store'}"


# Errors that mean "this file system takes no more": the message names the path, not a traceback.
_FULL = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large",
}


def cannot_write(path: Path, error: OSError) -> GpurunError:
    """One line naming the path that could not be written, and why."""
    why = _FULL.get(error.errno or 0) or error.strerror or str(error)
    hint = "; free some space there and run the command again" if error.errno in _FULL else ""
    return GpurunError(f"cannot write {path}: {why}{hint}")


def ensure_private(path: Path) -> Path:
    """Create a directory only this user can read (keys and records live here)."""
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as error:
        raise cannot_write(path, error) from None
    return path


def machine_run_dir(run: str) -> str:
    """The run's directory on a remote machine, relative to the login's home."""
    return f"gpurun/{run}"


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write `path` whole or not at all; a full disk is a GpurunError naming it."""
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    except OSError as error:
        raise cannot_write(path, error) from None
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            temp.unlink()
        if isinstance(error, OSError):
            raise cannot_write(path, error) from None
        raise
