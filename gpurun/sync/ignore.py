"""Which files of the workdir are sent: git's ignore semantics through pathspec.

`.gpurunignore` files take the place of `.gitignore` files when the workdir
has one at its root; `sync.exclude` patterns apply on top; `.git` never goes.
Nested ignore files apply to their own directory, deeper files win, and a
file inside an excluded directory cannot be re-included (as in git).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pathspec

ALWAYS_EXCLUDED = (".git",)


@dataclass(frozen=True)
class WalkedFile:
    path: str  # relative, POSIX
    size: int
    mtime_ns: int
    mode: int
    is_link: bool


def _load(path: Path) -> pathspec.GitIgnoreSpec | None:
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return None
    return pathspec.GitIgnoreSpec.from_lines(lines)


class IgnoreRules:
    def __init__(self, root: Path, extra: list[str] | tuple[str, ...] = ()) -> None:
        self.root = Path(root)
        self.file_name = ".gpurunignore" if (self.root / ".gpurunignore").is_file() else ".gitignore"
        self.extra = pathspec.GitIgnoreSpec.from_lines(list(extra)) if extra else None

    def _decide(self, relative: str, specs: list[tuple[str, pathspec.GitIgnoreSpec]], is_dir: bool) -> bool:
        """True when `relative` is ignored; `specs` are (base dir, spec), shallowest first."""
        candidate = relative + "/" if is_dir else relative
        if self.extra is not None:
            result = self.extra.check_file(candidate)
            if result.include is not None:
                return bool(result.include)
        for base, spec in reversed(specs):
            inner = candidate[len(base) + 1 :] if base else candidate
            result = spec.check_file(inner)
            if result.include is not None:
                return bool(result.include)
        return False

    def walk(self) -> Iterator[WalkedFile]:
        """Every file that is sent, with the stat fields the manifest compares."""
        yield from self._walk(self.root, "", [])

    def _walk(self, directory: Path, relative: str, specs: list) -> Iterator[WalkedFile]:
        spec = _load(directory / self.file_name)
        if spec is not None:
            specs = [*specs, (relative, spec)]
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError:
            return
        for entry in entries:
            path = f"{relative}/{entry.name}" if relative else entry.name
            if entry.name in ALWAYS_EXCLUDED:
                continue
            is_dir = entry.is_dir(follow_symlinks=False)
            if self._decide(path, specs, is_dir):
                continue
            if is_dir:
                yield from self._walk(Path(entry.path), path, specs)
                continue
            try:
                stat = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            is_link = entry.is_symlink()
            if not is_link and not entry.is_file(follow_symlinks=False):
                continue  # sockets, fifos: nothing to send
            yield WalkedFile(path, stat.st_size, stat.st_mtime_ns, stat.st_mode & 0o7777, is_link)

    def is_ignored(self, relative: str) -> bool:
        """For one path (tests and `--dry-run`): walks its parents like `walk` does."""
        parts = relative.split("/")
        specs: list = []
        current = self.root
        for depth, part in enumerate(parts):
            spec = _load(current / self.file_name)
            base = "/".join(parts[:depth])
            if spec is not None:
                specs.append((base, spec))
            path = "/".join(parts[: depth + 1])
            if part in ALWAYS_EXCLUDED:
                return True
            is_dir = depth < len(parts) - 1 or (self.root / path).is_dir()
            if self._decide(path, specs, is_dir):
                return True
            current = current / part
        return False
