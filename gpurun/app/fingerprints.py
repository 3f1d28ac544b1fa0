"""What identifies a job's code and its setup, so `exec` can tell what changed since the last job."""

from __future__ import annotations

import hashlib
from pathlib import Path

from gpurun.setup_hash import local_reader
from gpurun.setup_hash import setup_hash as shared_setup_hash
from gpurun.sync.ignore import WalkedFile


def code_hash(files: list[WalkedFile]) -> str:
    """sha256 of the synced tree's manifest (path, size, modification time, mode of every file)."""
    digest = hashlib.sha256()
    for entry in sorted(files, key=lambda f: f.path):
        digest.update(f"{entry.path}\0{entry.size}\0{entry.mtime_ns}\0{entry.mode}\n".encode())
    return digest.hexdigest()


def setup_hash(setup: str | None, root: Path, files: list[WalkedFile]) -> str | None:
    """The setup hash (`gpurun.setup_hash`: the command and the synced files it names); None without setup.

    The same function tags baked images, so a job's hash and an image's compare.
    """
    if not setup:
        return None
    synced = {entry.path for entry in files}
    read = local_reader(str(root))
    return shared_setup_hash(setup, lambda path: read(path) if path in synced else None)[0]
