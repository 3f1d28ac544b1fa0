"""The setup hash: what a machine image's installed software depends on.

It covers the `setup` command and the content of every file in the work tree
that the command names (`pip install -r requirements.txt`, `bash setup.sh`,
`--requirement=reqs.txt`, `-rreqs.txt`). An image baked after setup carries
the hash as a tag; a launch whose hash is the same may skip setup.

Files are read through a callback, so the same function hashes the laptop's
work tree (at launch) and the machine's synced copy (at `image create`).
"""

from __future__ import annotations

import hashlib
import json
import shlex
from collections.abc import Callable

#: A named file larger than this is hashed by name only: setup inputs are small text files.
MAX_FILE_BYTES = 4 * 1024 * 1024
VERSION = 1


def _candidates(word: str) -> list[str]:
    found = [word]
    if word.startswith("-") and "=" in word:
        found.append(word.split("=", 1)[1])
    elif word.startswith(("-r", "-c")) and len(word) > 2 and not word.startswith("--"):
        found.append(word[2:])  # pip's -rrequirements.txt
    return found


def named_paths(setup: str | None) -> list[str]:
    """Relative paths the setup command names, in order, each once (existence is checked by the caller)."""
    if not setup:
        return []
    try:
        # Shell operators are words of their own: `pip install -r req.txt; echo ok` names req.txt.
        lexer = shlex.shlex(setup, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words = list(lexer)
    except ValueError:
        words = setup.split()
    seen: list[str] = []
    for word in words:
        for candidate in _candidates(word.strip()):
            parts = candidate.split("/")
            if (
                not candidate
                or candidate.startswith(("/", "-", "~", "$"))
                or ".." in parts
                or len(candidate) > 1024
                or any(ch in candidate for ch in "\0\n*?$`")
            ):
                continue
            normal = "/".join(part for part in parts if part not in ("", "."))
            if normal and normal not in seen:
                seen.append(normal)
    return seen


def setup_hash(setup: str | None, read: Callable[[str], bytes | None]) -> tuple[str, list[str]]:
    """(sha256 hex, the files that went into it). `read(path)` gives a file's bytes, or None when it is no file."""
    files: dict[str, str] = {}
    for path in named_paths(setup):
        data = read(path)
        if data is None:
            continue
        files[path] = hashlib.sha256(data).hexdigest() if len(data) <= MAX_FILE_BYTES else f"large:{len(data)}"
    document = json.dumps({"v": VERSION, "setup": (setup or "").strip(), "files": files}, sort_keys=True)
    return hashlib.sha256(document.encode()).hexdigest(), sorted(files)


def local_reader(root: str) -> Callable[[str], bytes | None]:
    """Reads regular files under `root` (links that leave it are not followed)."""
    import os

    base = os.path.realpath(root)

    def read(path: str) -> bytes | None:
        full = os.path.realpath(os.path.join(base, path))
        if not full.startswith(base + os.sep) or not os.path.isfile(full):
            return None
        try:
            with open(full, "rb") as handle:
                return handle.read(MAX_FILE_BYTES + 1)
        except OSError:
            return None

    return read
