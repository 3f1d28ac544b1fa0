"""Checkpoint stores: `file://` and `s3://`, one layout, one set of guarantees."""

from __future__ import annotations

from typing import TYPE_CHECKING

from gpurun.errors import BadInput

if TYPE_CHECKING:
    from gpurun.store.base import ObjectStore


def open_store(url: str, **options: object) -> ObjectStore:
    """The store behind `url`; s3 support is imported only when used."""
    if url.startswith("file://"):
        if not url.startswith("file:///"):
            raise BadInput(f"store {url!r}: a file store needs an absolute path, like file:///data/checkpoints")
        from gpurun.store.file import FileStore

        return FileStore(url)
    if url.startswith("s3://"):
        from gpurun.store.s3 import S3Store

        return S3Store(url, **options)  # type: ignore[arg-type]
    raise BadInput(f"store {url!r}: unknown scheme; use s3://bucket/prefix or file:///absolute/path")
