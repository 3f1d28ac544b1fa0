"""Where gpurun keeps its state on this computer (GPURUN_HOME overrides)."""

from __future__ import annotations

import os
from pathlib import Path


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


def ensure_private(path: Path) -> Path:
    """Create a directory only this user can read (keys and records live here)."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return path


def machine_run_dir(run: str) -> str:
    """The run's directory on a remote machine, relative to the login's home."""
    return f"gpurun/{run}"


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        if temp.exists():
            temp.unlink()
        raise
