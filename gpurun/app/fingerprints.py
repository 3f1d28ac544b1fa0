"""What identifies a job's code and its setup, so `exec` can tell what changed since the last job."""

from __future__ import annotations

import hashlib
import shlex
from pathlib import Path

from gpurun.sync.ignore import WalkedFile

# Files named by setup are read whole to hash them; bigger ones count by size and time only.
_SETUP_FILE_READ_LIMIT = 64 * 1024 * 1024


def code_hash(files: list[WalkedFile]) -> str:
    """sha256 of the synced tree's manifest (path, size, modification time, mode of every file)."""
    digest = hashlib.sha256()
    for entry in sorted(files, key=lambda f: f.path):
        digest.update(f"{entry.path}\0{entry.size}\0{entry.mtime_ns}\0{entry.mode}\n".encode())
    return digest.hexdigest()


def setup_files(setup: str, files: list[WalkedFile]) -> list[WalkedFile]:
    """The synced files that the setup command names (`-r requirements.txt`, `--file=env.yml`, `./install.sh`)."""
    try:
        words = shlex.split(setup, comments=True)
    except ValueError:
        words = setup.split()
    by_path = {entry.path: entry for entry in files}
    named: dict[str, WalkedFile] = {}
    for word in words:
        for part in (word, *word.split("=")[1:]):
            path = part[2:] if part.startswith("./") else part
            if path in by_path:
                named[path] = by_path[path]
    return [named[path] for path in sorted(named)]


def setup_hash(setup: str | None, root: Path, files: list[WalkedFile]) -> str | None:
    """sha256 of the setup command and the contents of the synced files it names; None without setup."""
    if not setup:
        return None
    digest = hashlib.sha256(setup.encode() + b"\0")
    for entry in setup_files(setup, files):
        digest.update(entry.path.encode() + b"\0")
        if entry.size <= _SETUP_FILE_READ_LIMIT:
            try:
                digest.update(hashlib.sha256((root / entry.path).read_bytes()).digest())
                continue
            except OSError:
                pass
        digest.update(f"{entry.size}\0{entry.mtime_ns}".encode())
    return digest.hexdigest()
