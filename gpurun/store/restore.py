"""All-or-nothing restores: a snapshot lands in DIR complete and verified, or DIR is left as it was.

The files go into a temporary directory beside DIR (same filesystem), each
checked against the manifest's size and sha256 as it arrives. Only when every
file is verified does the directory move into place, in one rename:

- DIR missing or empty: rename(temp, DIR).
- DIR holding files (needs `force`): the two are exchanged in one step
  (renameat2 RENAME_EXCHANGE), and the old content is kept beside DIR as
  `DIR.gpurun-old-<time>`; it is never mixed with the snapshot.

On any failure, Ctrl-C included, the workers stop, the temporary directory
and any parent directories the restore created are removed, and DIR is
exactly as before.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import re
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from gpurun.errors import BadInput, StoreError
from gpurun.store.base import Fetch, ObjectStore, Progress

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


@dataclass(frozen=True)
class Entry:
    """One file of a manifest, validated: a relative path inside DIR, its size and sha256, and where it is stored."""

    path: str
    size: int
    sha256: str
    seq: int  # the snapshot whose folder holds the object


def checked_entries(manifest: dict[str, Any]) -> list[Entry]:
    """The manifest's files, or StoreError naming the first entry that could not be restored safely."""
    seq = manifest.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        raise StoreError(f"manifest: seq {seq!r} is not a snapshot number")
    files = manifest.get("files")
    if not isinstance(files, list):
        raise StoreError(f"snapshot {seq}: the manifest has no list of files")
    entries: list[Entry] = []
    seen: set[str] = set()
    for raw in files:
        if not isinstance(raw, dict):
            raise StoreError(f"snapshot {seq}: a manifest entry is not an object")
        path, size, digest = raw.get("path"), raw.get("size"), raw.get("sha256")
        source = raw.get("seq", seq)
        if not isinstance(path, str) or not _safe_path(path):
            raise StoreError(f"snapshot {seq}: refusing path {path!r} outside the target")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise StoreError(f"snapshot {seq}: {path!r} has size {size!r}, not a byte count")
        if not isinstance(digest, str) or not _SHA256.match(digest):
            raise StoreError(f"snapshot {seq}: {path!r} has no valid sha256")
        if not isinstance(source, int) or isinstance(source, bool) or not 1 <= source <= seq:
            raise StoreError(f"snapshot {seq}: {path!r} refers to snapshot {source!r}, not an earlier one")
        if path in seen:
            raise StoreError(f"snapshot {seq}: {path!r} is listed twice")
        seen.add(path)
        entries.append(Entry(path, size, digest, source))
    # A path cannot be a file and a folder of other files in the same snapshot.
    for entry in entries:
        clash = next((folder for folder in _folders_of(entry.path) if folder in seen), None)
        if clash is not None:
            raise StoreError(f"snapshot {seq}: {clash!r} is both a file and the folder of {entry.path!r}")
    return entries


def _folders_of(path: str) -> Iterator[str]:
    """The folders `path` is in, innermost first ("a/b/c" -> "a/b", "a"); `path` is already checked
    (`_safe_path`). String work: PurePosixPath's parents cost 20 ms per 2,000 files of a restore."""
    end = path.rfind("/")
    while end > 0:
        yield path[:end]
        end = path.rfind("/", 0, end)


def checked_links(manifest: dict[str, Any], entries: list[Entry]) -> list[tuple[str, str]]:
    """The manifest's symbolic links as (path, target), or StoreError naming the first that
    could not be restored safely: a target must be relative and stay inside DIR, and a
    link may not stand where a file, a folder of files or another link's folder is."""
    seq = manifest["seq"]
    raw_links = manifest.get("links", [])
    if not isinstance(raw_links, list):
        raise StoreError(f"snapshot {seq}: the manifest's links are not a list")
    if not raw_links:
        return []
    files = {entry.path for entry in entries}
    folders = {folder for entry in entries for folder in _folders_of(entry.path)}
    links: list[tuple[str, str]] = []
    linked: set[str] = set()
    for raw in raw_links:
        path = raw.get("path") if isinstance(raw, dict) else None
        target = raw.get("target") if isinstance(raw, dict) else None
        if not isinstance(path, str) or not _safe_path(path):
            raise StoreError(f"snapshot {seq}: refusing link {path!r} outside the target")
        if not isinstance(target, str) or not _inside(path, target):
            raise StoreError(f"snapshot {seq}: refusing link {path!r} -> {target!r}, which leads outside the target")
        if path in files or path in folders or path in linked:
            raise StoreError(f"snapshot {seq}: {path!r} is both a link and a file or folder")
        if any(folder in files for folder in _folders_of(path)):
            raise StoreError(f"snapshot {seq}: link {path!r} is inside what is a file")
        links.append((path, target))
        linked.add(path)
    paths = dict(links)
    for path, _target in links:
        under = next((folder for folder in _folders_of(path) if folder in paths), None)
        if under is not None:
            raise StoreError(f"snapshot {seq}: link {path!r} would be written through link {under!r}")
    return links


def _inside(path: str, target: str) -> bool:
    """Whether `target`, read from the folder of `path`, names something inside the restore directory.

    Only the form the agent writes is accepted: some `..` first, then names (or
    `.`). Checking `a/../..` by its letters would not do: `a` may be another
    link, and the system resolves `..` from where that link leads.
    """
    if target == ".":
        return True
    if not target or "\0" in target or "\\" in target or target.startswith("/"):
        return False
    parts = target.split("/")
    ups = 0
    while ups < len(parts) and parts[ups] == "..":
        ups += 1
    names = parts[ups:]
    if any(part in ("", ".", "..") for part in names):
        return False
    return ups <= len(PurePosixPath(path).parent.parts)


def _safe_path(path: str) -> bool:
    if not path or "\\" in path or "\0" in path or path.startswith("/"):
        return False
    parts = path.split("/")
    return all(part not in ("", ".", "..") for part in parts)


def download(
    store: ObjectStore,
    run: str,
    manifest: dict[str, Any],
    dest: str | Path,
    *,
    force: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Restore `manifest` into `dest`, all or nothing; returns where the old content went (or None)."""
    entries = checked_entries(manifest)
    links = checked_links(manifest, entries)
    with _staging(Path(dest), force=force) as (temp, swap):
        total = sum(entry.size for entry in entries)
        free = _free_bytes(temp)
        if free is not None and total > free:
            raise StoreError(
                f"snapshot {manifest['seq']} needs {total:,} bytes; {temp.parent} has {free:,} free (or the manifest is wrong)"
            )
        for directory in sorted({entry.path.rpartition("/")[0] for entry in entries} - {""}):
            (temp / directory).mkdir(parents=True, exist_ok=True)
        items = [
            Fetch(f"{run}/snapshots/{entry.seq:06d}/{entry.path}", str(temp / entry.path), entry.size)
            for entry in entries
        ]
        hashes = store.fetch_hashed(items, progress=progress)
        for entry, actual in zip(entries, hashes, strict=True):
            if actual != entry.sha256:
                raise StoreError(
                    f"snapshot {manifest['seq']}: {entry.path} failed verification "
                    f"(sha256 {actual[:12]}, expected {entry.sha256[:12]})"
                )
        for path, target in links:
            (temp / path).parent.mkdir(parents=True, exist_ok=True)
            os.symlink(target, temp / path)
        moved_aside = swap()
    return {"previous": str(moved_aside) if moved_aside else None}


def _free_bytes(path: Path) -> int | None:
    try:
        stat = os.statvfs(path)
    except OSError:
        return None
    return stat.f_bavail * stat.f_frsize


def _is_empty_dir(path: Path) -> bool:
    with os.scandir(path) as entries:
        return next(entries, None) is None


@contextmanager
def _staging(dest: Path, *, force: bool) -> Iterator[tuple[Path, Any]]:
    """A temporary directory beside `dest`, and the function that moves it into place.

    On an exception (KeyboardInterrupt too) everything this created is removed.
    """
    dest = Path(os.path.abspath(dest))
    if dest.is_symlink():
        raise BadInput(f"{dest} is a symbolic link; give the directory itself")
    if dest.exists() and not dest.is_dir():
        raise BadInput(f"{dest} exists and is not a directory")
    if dest.is_dir() and not _is_empty_dir(dest) and not force:
        raise BadInput(f"{dest} is not empty; add --force to replace its content (the old content is kept beside it)")
    created = _make_parents(dest.parent)
    temp = None
    try:
        temp = Path(_mkdtemp(dest))
        # The restored directory gets the mode a plain mkdir would give (or the one it had).
        mode = (dest.stat().st_mode & 0o7777) if dest.is_dir() else (0o777 & ~_umask())
        os.chmod(temp, mode)

        def swap() -> Path | None:
            assert temp is not None
            # Between the exchange and the rename, temp holds the old content: no Ctrl-C in there.
            with _no_interrupts():
                return _move_into_place(temp, dest)

        yield temp, swap
    except BaseException:
        with _no_interrupts():
            if temp is not None:
                shutil.rmtree(temp, ignore_errors=True)
            for directory in reversed(created):
                try:
                    directory.rmdir()
                except OSError:
                    break
        raise


def _make_parents(parent: Path) -> list[Path]:
    """Create `parent` and its missing ancestors; returns those created, outermost first."""
    missing = []
    current = parent
    while not current.exists():
        missing.append(current)
        current = current.parent
    created: list[Path] = []
    for directory in reversed(missing):
        try:
            directory.mkdir()
        except FileExistsError:
            continue
        except OSError as error:
            for made in reversed(created):
                made.rmdir()
            raise StoreError(f"cannot create {directory}: {error.strerror}") from None
        created.append(directory)
    return created


def _mkdtemp(dest: Path) -> str:
    import tempfile

    try:
        return tempfile.mkdtemp(prefix=f".{dest.name}.gpurun-restore-", dir=dest.parent)
    except OSError as error:
        raise StoreError(f"cannot write beside {dest}: {error.strerror}") from None


def _umask() -> int:
    current = os.umask(0o22)
    os.umask(current)
    return current


def _move_into_place(temp: Path, dest: Path) -> Path | None:
    """One rename; returns where the old content of `dest` went, if it had any."""
    try:
        os.rename(temp, dest)  # replaces a missing or empty directory atomically
        return None
    except OSError as error:
        if error.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise StoreError(f"cannot move the restored snapshot to {dest}: {error.strerror}") from None
    aside = _aside_name(dest)
    if _exchange(temp, dest):
        os.rename(temp, aside)  # temp now holds the old content
        return aside
    # No RENAME_EXCHANGE here (not Linux, or an old kernel): two renames, the first undone on failure.
    os.rename(dest, aside)
    try:
        os.rename(temp, dest)
    except OSError as error:
        os.rename(aside, dest)
        raise StoreError(f"cannot move the restored snapshot to {dest}: {error.strerror}") from None
    return aside


def _aside_name(dest: Path) -> Path:
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    candidate = dest.with_name(f"{dest.name}.gpurun-old-{stamp}")
    counter = 1
    while os.path.lexists(candidate):
        counter += 1
        candidate = dest.with_name(f"{dest.name}.gpurun-old-{stamp}-{counter}")
    return candidate


def _exchange(first: Path, second: Path) -> bool:
    """Swap two paths atomically; False when the system cannot."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError, TypeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    result = renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second), _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise StoreError(f"cannot move the restored snapshot to {second}: {os.strerror(code)}")


@contextmanager
def _no_interrupts() -> Iterator[None]:
    """Cleanup runs to its end: a second Ctrl-C waits until it is done."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, _frame: pending.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pending and callable(previous):
        previous(signal.SIGINT, None)
