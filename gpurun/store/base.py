"""What a checkpoint store must do: a few object operations on keys under its root.

The snapshot layout and its guarantees live in `snapshots.py` and are written
once against this interface, so `file://` and `s3://` behave the same.
"""

from __future__ import annotations

import builtins
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass

Progress = Callable[[int], None]


@dataclass(frozen=True)
class Fetch:
    """One object to download: where it goes and the size the manifest claims for it."""

    key: str
    path: str
    size: int


#: Annotations inside ObjectStore cannot say `list`: the class has a method of that name.
Fetches = list[Fetch]
Digests = list[str]


def size_mismatch(url: str, key: str, actual: int | str, expected: int) -> str:
    return f"{url}/{key}: the stored object is {actual} bytes, the manifest says {expected}"


@dataclass(frozen=True)
class Sent:
    """A file `put_files` knows it stored, from the store's own answers: exactly `size` bytes
    (S3 never keeps part of an object; each request said its length and was checked against
    the hash it was signed or sent with), so it need not be listed again to be confirmed.
    `sha256` when it was read, hashed and sent from one buffer (a lean PUT is signed with it);
    None for a multipart upload, whose parts the transfer read."""

    sha256: str | None
    size: int


@dataclass(frozen=True)
class StoredObject:
    key: str
    size: int
    # When the store itself last wrote the object (seconds since the epoch): S3's
    # LastModified, a file's mtime. Unlike times written inside documents, a
    # writer of the object cannot choose it.
    modified: float | None = None


class ObjectStore(ABC):
    url: str

    def hashed_while_sending(self) -> int:
        """`put_files` hashes (sha256) every file up to this size that it sends, and returns the
        digests and sizes it stored: the caller need not read those files again, nor list
        them to confirm them. 0: it hashes none."""
        return 0

    @abstractmethod
    def put_file(self, key: str, path: str, *, if_absent: bool = False, progress: Progress | None = None) -> None:
        """Upload a file; with `if_absent`, refuse (SnapshotConflict) when the key exists."""

    @abstractmethod
    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False, if_match: str | None = None) -> str:
        """Write an object; with `if_absent`, refuse (SnapshotConflict) when the key exists; with
        `if_match`, refuse unless the object there still has that tag (one atomic step where the
        store supports it). Returns the store's tag of what it wrote (S3's ETag), which
        `list_level` and `get_tagged` show."""

    @abstractmethod
    def get_bytes(self, key: str, *, limit: int | None = None) -> bytes | None:
        """The object's content, or None when it does not exist.

        With `limit`, at most `limit + 1` bytes are read: enough for the caller to tell
        that a document is too large without fetching all of a planted giant.
        """

    def get_tagged(self, key: str, *, limit: int | None = None) -> tuple[bytes, str] | None:
        """`get_bytes`, with the object's tag for a later `put_bytes(..., if_match=tag)`."""
        data = self.get_bytes(key, limit=limit)
        return None if data is None else (data, "")

    @abstractmethod
    def get_file(self, key: str, path: str, *, progress: Progress | None = None) -> None: ...

    @abstractmethod
    def copy(self, source_key: str, dest_key: str) -> None:
        """Copy inside the store without sending the bytes again."""

    @abstractmethod
    def list(self, prefix: str) -> list[StoredObject]:
        """Every object whose key starts with `prefix`."""

    @abstractmethod
    def delete(self, keys: Iterable[str]) -> None: ...

    @abstractmethod
    def size_of(self, key: str) -> int | None:
        """The stored size, or None when the key does not exist."""

    def put_files(
        self, items: builtins.list[tuple[str, str]], *, if_absent: bool = False, progress: Progress | None = None
    ) -> dict[str, Sent]:
        """Upload many files; returns, by key, those it knows it stored (see `Sent`; with the
        sha256 of those it hashed while sending, `hashed_while_sending`). Stores that can do it
        concurrently override this."""
        for key, path in items:
            self.put_file(key, path, if_absent=if_absent, progress=progress)
        return {}

    def copy_many(self, pairs: builtins.list[tuple[str, str]]) -> None:
        for source, dest in pairs:
            self.copy(source, dest)

    def get_files(self, items: builtins.list[tuple[str, str]], *, progress: Progress | None = None) -> None:
        for key, path in items:
            self.get_file(key, path, progress=progress)

    def fetch_hashed(
        self, items: Fetches, *, progress: Progress | None = None, abandon: threading.Event | None = None
    ) -> Digests:
        """Download each object to its path (the file is created), and return its sha256.

        The hash is computed while the bytes arrive, so nothing is read twice. An
        object whose size is not `Fetch.size` fails with StoreError (no more than
        size + 1 bytes are ever written). Setting `abandon` stops every transfer
        at its next chunk; the call returns only once no transfer writes any more.
        """
        raise NotImplementedError

    def list_level(self, folder: str) -> dict[str, str]:
        """What lies directly in `folder` ("" or ending in "/"): each object's name with its tag
        (as `put_bytes` returned it; "" where the store has none), and each sub-folder's name
        with a trailing "/" and "". Stores that can list one level override this: a folder of
        snapshots then costs one request, not one per 1,000 of the files inside them."""
        level: dict[str, str] = {}
        for obj in self.list(folder):
            name, below, _rest = obj.key[len(folder) :].partition("/")
            level[name + below] = ""
        return level

    def list_runs(self) -> builtins.list[str]:
        """Names of the top-level folders (each may hold a run)."""
        return sorted(name.rstrip("/") for name in self.list_level("") if name.endswith("/"))

    def check_writable(self) -> None:
        """Raise StoreError with a clear line when the store cannot be written."""
