"""Jobs' output in the store: `<run>/logs/job-NNNN/KKKKKK.log`, chunk K holding bytes [K*CHUNK, (K+1)*CHUNK).

Written by the agent (gpurun.agent.logship); read here. Everything read back
is untrusted: keys must have the exact shape, a chunk may not be larger than
CHUNK_BYTES, and no more than MAX_READ_BYTES (the end of the log) are read.
"""

from __future__ import annotations

import re

from gpurun.store.base import ObjectStore

_MiB = 1024 * 1024
CHUNK_BYTES = _MiB
MAX_READ_BYTES = 32 * 1024 * 1024
_CHUNK = re.compile(r"job-(\d{4,9})/(\d{6,9})\.log")


def chunk_key(run: str, job: int, index: int) -> str:
    return f"{run}/logs/job-{job:04d}/{index:06d}.log"


def _chunks(store: ObjectStore, run: str) -> dict[int, dict[int, int]]:
    """job -> {chunk index -> size} of every well-formed chunk object."""
    prefix = f"{run}/logs/"
    found: dict[int, dict[int, int]] = {}
    for entry in store.list(prefix):
        match = _CHUNK.fullmatch(entry.key[len(prefix) :])
        if match:
            found.setdefault(int(match.group(1)), {})[int(match.group(2))] = entry.size
    return found


def stored_jobs(store: ObjectStore, run: str) -> list[int]:
    """Numbers of the jobs whose output is in the store, oldest first."""
    return sorted(_chunks(store, run))


def read_job_log(store: ObjectStore, run: str, job: int) -> tuple[bytes, list[str]]:
    """(the end of job `job`'s output, at most MAX_READ_BYTES; problems met), or (b"", [...]) when absent.

    Chunks are read in order from the first; a missing or oversized chunk ends
    the log there and is named among the problems.
    """
    chunks = _chunks(store, run).get(job, {})
    problems: list[str] = []
    if not chunks:
        return b"", problems
    last = max(chunks)
    # Only the chunks that can hold the last MAX_READ_BYTES are fetched.
    first = max(0, last - MAX_READ_BYTES // CHUNK_BYTES)
    parts: list[bytes] = []
    for index in range(first, last + 1):
        data = _read_chunk(store, run, job, index, chunks.get(index), problems, report_missing=True)
        if data is None:
            break
        parts.append(data)
        if len(data) < CHUNK_BYTES and index != last:
            key = chunk_key(run, job, index)
            problems.append(f"{store.url}/{key} is short; the output after it may be missing a piece")
    data = b"".join(parts)
    if first > 0:
        problems.append(f"only the last {MAX_READ_BYTES // _MiB} MiB of job {job}'s output are shown")
    return data[-MAX_READ_BYTES:], problems


def read_job_log_from(store: ObjectStore, run: str, job: int, offset: int) -> tuple[bytes, int, list[str]]:
    """(job `job`'s output from byte `offset` on, the offset after it, problems met), for following.

    Only the chunks holding bytes past `offset` are fetched. When more than
    MAX_READ_BYTES lie ahead, the start is skipped (named among the problems).
    A missing chunk stops the read there: it may still be on its way.
    """
    chunks = _chunks(store, run).get(job, {})
    problems: list[str] = []
    if not chunks:
        return b"", offset, problems
    last = max(chunks)
    end = last * CHUNK_BYTES + min(chunks[last], CHUNK_BYTES)
    if end - offset > MAX_READ_BYTES:
        problems.append(
            f"{end - MAX_READ_BYTES - offset} bytes of job {job}'s output skipped (more than the last {MAX_READ_BYTES // _MiB} MiB)"
        )
        offset = end - MAX_READ_BYTES
    parts: list[bytes] = []
    position = offset
    for index in range(position // CHUNK_BYTES, last + 1):
        size = chunks.get(index)
        if size is not None and size <= CHUNK_BYTES and index * CHUNK_BYTES + size <= position:
            continue  # all of it shown already
        # A missing chunk may still be on its way: the read stops there without a word.
        data = _read_chunk(store, run, job, index, size, problems, report_missing=False)
        if data is None:
            break
        start = position - index * CHUNK_BYTES
        if len(data) > start:
            parts.append(data[start:])
            position = index * CHUNK_BYTES + len(data)
        if len(data) < CHUNK_BYTES:
            break  # the rest of this chunk (and the ones after it) is still to come
    return b"".join(parts), position, problems


def _read_chunk(
    store: ObjectStore, run: str, job: int, index: int, size: int | None, problems: list[str], *, report_missing: bool
) -> bytes | None:
    """Chunk `index` of job `job` (listed at `size` bytes), at most CHUNK_BYTES of it; None ends the
    read, with the reason among `problems` (a missing chunk only with `report_missing`)."""
    key = chunk_key(run, job, index)
    if size is not None and size > CHUNK_BYTES:
        problems.append(f"{store.url}/{key} is {size} bytes, more than a chunk holds; skipped")
        return None
    data = None if size is None else store.get_bytes(key, limit=CHUNK_BYTES)  # listed sizes may have changed since
    if data is None and report_missing:
        gone = "is missing; the output shown stops before it" if size is None else "vanished while reading"
        problems.append(f"{store.url}/{key} {gone}")
    return None if data is None else data[:CHUNK_BYTES]
