"""What identifies a job's code and its setup, so `exec` can tell what changed since the last job."""

from __future__ import annotations

import hashlib
from pathlib import Path

from gpurun.setup_hash import local_reader
from gpurun.setup_hash import setup_hash as hash_of_setup
from gpurun.sync.ignore import WalkedFile


def code_hash(files: list[WalkedFile]) -> str:
    """sha256 of the synced tree's manifest (path, size, modification time, mode of every file)."""
    digest = hashlib.sha256()
    for entry in sorted(files, key=lambda f: f.path):
        digest.update(f"{entry.path}\0{entry.size}\0{entry.mtime_ns}\0{entry.mode}\n".encode())
    return digest.hexdigest()


def setup_hash(setup: str | None, root: Path, files: list[WalkedFile]) -> str | None:
    """The setup hash images use too (gpurun.setup_hash): the command and the files it names; None without setup."""
    if not setup:
        return None
    return hash_of_setup(setup, local_reader(str(root)))[0]
