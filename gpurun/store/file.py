"""`file://` store: a directory tree with the same layout as S3."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

from gpurun.errors import SnapshotConflict, StoreError
from gpurun.store.base import Digests, Fetch, Fetches, ObjectStore, Progress, StoredObject, size_mismatch

_CHUNK = 1 << 20


def _tag(stat: os.stat_result) -> str:
    """A file's tag: a rename or a link keeps it; a rewrite gets a new one (an inode alone could
    be reused by the next file written)."""
    return f"{stat.st_ino}-{stat.st_mtime_ns}-{stat.st_size}"


def _tag_of(path: Path) -> str | None:
    try:
        return _tag(os.stat(path))
    except FileNotFoundError:
        return None


class FileStore(ObjectStore):
    def __init__(self, url: str) -> None:
        self.url = url
        self.root = Path(url[len("file://") :])

    def _path(self, key: str) -> Path:
        path = self.root / key
        if ".." in Path(key).parts:
            raise StoreError(f"{self.url}: refusing key {key!r} outside the store")
        return path

    def _install(self, temp: str, target: Path, if_absent: bool, if_match: str | None = None) -> str:
        """Put `temp` in place; returns its tag (`list_level` and `get_tagged` read the same)."""
        tag = _tag(os.stat(temp))
        try:
            if if_absent:
                # link() fails when the target exists: an atomic "create only".
                try:
                    os.link(temp, target)
                except FileExistsError:
                    raise SnapshotConflict(f"{self.url}/{target.relative_to(self.root)} already exists") from None
            elif if_match is not None:
                # Writers that compare first hold the folder's lock: the check and the
                # replace are one step for them.
                folder = os.open(target.parent, os.O_RDONLY)
                try:
                    fcntl.flock(folder, fcntl.LOCK_EX)
                    if _tag_of(target) != if_match:
                        raise SnapshotConflict(f"{self.url}/{target.relative_to(self.root)} changed meanwhile")
                    os.replace(temp, target)
                finally:
                    os.close(folder)  # releases the lock
            else:
                os.replace(temp, target)
        finally:
            if os.path.exists(temp):
                os.unlink(temp)
        return tag

    def _write(
        self, key: str, writer: Callable[[BinaryIO], object], if_absent: bool, if_match: str | None = None
    ) -> str:
        target = self._path(key)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            fd, temp = tempfile.mkstemp(prefix=".tmp-", dir=target.parent)
        except OSError as error:
            raise StoreError(f"{self.url}: cannot write {key}: {error.strerror}") from None
        try:
            with os.fdopen(fd, "wb") as handle:
                writer(handle)
                handle.flush()
                os.fsync(handle.fileno())
        except BaseException:
            os.unlink(temp)
            raise
        return self._install(temp, target, if_absent, if_match)

    def put_file(self, key: str, path: str, *, if_absent: bool = False, progress: Progress | None = None) -> None:
        def writer(handle: BinaryIO) -> None:
            with open(path, "rb") as source:
                while chunk := source.read(_CHUNK):
                    handle.write(chunk)
                    if progress:
                        progress(len(chunk))

        self._write(key, writer, if_absent)

    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False, if_match: str | None = None) -> str:
        return self._write(key, lambda handle: handle.write(data), if_absent, if_match)

    def get_tagged(self, key: str, *, limit: int | None = None) -> tuple[bytes, str] | None:
        try:
            with open(self._path(key), "rb") as handle:
                tag = _tag(os.fstat(handle.fileno()))
                return (handle.read() if limit is None else handle.read(limit + 1)), tag
        except FileNotFoundError:
            return None
        except OSError as error:
            raise StoreError(f"{self.url}: cannot read {key}: {error.strerror}") from None

    def get_bytes(self, key: str, *, limit: int | None = None) -> bytes | None:
        try:
            with open(self._path(key), "rb") as handle:
                return handle.read() if limit is None else handle.read(limit + 1)
        except FileNotFoundError:
            return None
        except OSError as error:
            raise StoreError(f"{self.url}: cannot read {key}: {error.strerror}") from None

    def get_file(self, key: str, path: str, *, progress: Progress | None = None) -> None:
        source = self._path(key)
        try:
            with open(source, "rb") as reader, open(path, "wb") as writer:
                while chunk := reader.read(_CHUNK):
                    writer.write(chunk)
                    if progress:
                        progress(len(chunk))
        except OSError as error:
            raise StoreError(f"{self.url}: cannot read {key}: {error.strerror}") from None

    def fetch_hashed(
        self, items: Fetches, *, progress: Progress | None = None, abandon: threading.Event | None = None
    ) -> Digests:
        stop = abandon or threading.Event()
        lock = threading.Lock()

        def report(amount: int) -> None:
            if progress is not None:
                with lock:
                    progress(amount)

        def fetch(item: Fetch) -> str:
            digest = hashlib.sha256()
            written = 0
            try:
                with open(self._path(item.key), "rb") as reader, open(item.path, "xb") as writer:
                    # One byte past the claim is enough to know the claim is wrong.
                    while chunk := reader.read(min(_CHUNK, item.size + 1 - written)):
                        if stop.is_set():
                            raise StoreError(f"{self.url}/{item.key}: download abandoned")
                        digest.update(chunk)
                        writer.write(chunk)
                        written += len(chunk)
                        report(len(chunk))
                        if written > item.size:
                            break
            except FileNotFoundError as error:
                if error.filename == item.path:
                    raise StoreError(f"cannot write {item.path}: {error.strerror}") from None
                raise StoreError(f"{self.url}/{item.key}: no such object") from None
            except OSError as error:
                raise StoreError(f"{self.url}: cannot read {item.key}: {error.strerror}") from None
            if written != item.size:
                actual = self.size_of(item.key)
                raise StoreError(
                    size_mismatch(self.url, item.key, actual if actual is not None else written, item.size)
                )
            return digest.hexdigest()

        if not items:
            return []
        with ThreadPoolExecutor(max_workers=min(8, len(items)), thread_name_prefix="gpurun-fetch") as pool:
            futures = [pool.submit(fetch, item) for item in items]
            try:
                return [future.result() for future in futures]
            except BaseException:
                # Every worker stops at its next chunk, and none starts: the caller may then remove the files.
                stop.set()
                pool.shutdown(wait=True, cancel_futures=True)
                raise

    def copy(self, source_key: str, dest_key: str) -> None:
        source, dest = self._path(source_key), self._path(dest_key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            # Snapshot files are never modified in place, so sharing the inode is safe.
            os.link(source, dest)
        except FileExistsError:
            raise SnapshotConflict(f"{self.url}/{dest_key} already exists") from None
        except OSError as error:
            if error.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK):
                raise StoreError(f"{self.url}: cannot copy {source_key}: {error.strerror}") from None
            shutil.copyfile(source, dest)

    def list(self, prefix: str) -> list[StoredObject]:
        base = self._path(prefix) if prefix else self.root
        start = base if base.is_dir() else base.parent
        if not start.exists():
            return []
        found = []
        root = str(self.root)
        for directory, _dirs, files in os.walk(start):
            for name in files:
                if name.startswith(".tmp-"):
                    continue
                full = os.path.join(directory, name)
                key = os.path.relpath(full, root)
                if key.startswith(prefix):
                    try:
                        stat = os.stat(full)
                        found.append(StoredObject(key, stat.st_size, stat.st_mtime))
                    except FileNotFoundError:
                        continue
        return found

    def list_level(self, folder: str) -> dict[str, str]:
        base = self._path(folder) if folder else self.root
        try:
            entries = list(os.scandir(base))
        except (FileNotFoundError, NotADirectoryError):
            return {}
        return {
            entry.name + "/" if entry.is_dir() else entry.name: "" if entry.is_dir() else _tag(entry.stat())
            for entry in entries
            if not entry.name.startswith(".")
        }

    def delete(self, keys: Iterable[str]) -> None:
        parents = set()
        for key in keys:
            path = self._path(key)
            try:
                path.unlink()
                parents.add(path.parent)
            except FileNotFoundError:
                continue
        for parent in sorted(parents, key=lambda p: len(p.parts), reverse=True):
            current = parent
            while current != self.root and self.root in current.parents:
                try:
                    current.rmdir()
                except OSError:
                    break
                current = current.parent

    def size_of(self, key: str) -> int | None:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            return None

    def check_writable(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = tempfile.NamedTemporaryFile(prefix=".tmp-probe-", dir=self.root)
            probe.close()
        except OSError as error:
            raise StoreError(f"store {self.url}: cannot write there: {error.strerror}") from None
