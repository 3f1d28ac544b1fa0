"""Send the workdir to a machine as one tar stream; a re-sync sends only what changed.

The machine keeps the manifest of what it was sent (path -> size, mtime_ns,
mode). A sync is two remote commands:

1. read the manifest, gzipped on the way when the machine has gzip (run
   while the workdir is scanned here, so the connection set-up and the
   first round trip overlap the scan);
2. one tar stream into `mkdir -p T && tar -x`: its first member carries the
   manifest update (and the list of deleted files, when there are any), the
   changed files follow. Only after tar succeeded does the same command
   delete the removed files and put the manifest in place, so a sync cut
   short leaves the old manifest and is simply redone.

The manifest is JSON lines: a full `{"files": {...}}` line, then one
`{"set": {...}, "del": [...]}` line appended per re-sync, so a re-sync that
changes ten files sends ten entries, not the whole table. A line that does
not parse (an append cut short) is skipped: what it recorded is sent again.
After `COMPACT_AFTER` appended lines, or once appending would make the file
more than twice the size of the whole table, it is rewritten whole.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import io
import json
import shlex
import shutil
import subprocess
import tarfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from gpurun.errors import TransportError
from gpurun.sync.ignore import IgnoreRules, WalkedFile
from gpurun.transport.base import CommandResult, Transport

Progress = Callable[[int, int], None]  # (files done, bytes done)
LARGE_SYNC_BYTES = 200 * 1024 * 1024
COMPACT_AFTER = 32  # appended manifest lines before it is rewritten whole
META_DIR = ".gpurun-sync.tmp"  # inside the target while a sync unpacks; removed after
PIPE_BYTES = 1 << 20  # tar's stdout pipe: fewer, bigger reads


@dataclass
class SyncResult:
    files_total: int = 0
    bytes_total: int = 0
    files_sent: int = 0
    bytes_sent: int = 0
    deleted: int = 0
    largest: list[tuple[str, int]] = field(default_factory=list)


def scan(
    root: Path, exclude: list[str] | tuple[str, ...] = (), include: list[str] | tuple[str, ...] = ()
) -> list[WalkedFile]:
    return scan_holding_back(root, exclude, include)[0]


def scan_holding_back(
    root: Path, exclude: list[str] | tuple[str, ...] = (), include: list[str] | tuple[str, ...] = ()
) -> tuple[list[WalkedFile], list[str]]:
    """The files to send, and the paths held back as credentials (not sent unless `include` names them)."""
    rules = IgnoreRules(root, exclude, include)
    files = list(rules.walk())
    return files, rules.held_back


def plan_changes(
    local: list[WalkedFile], remote: dict[str, list[int]]
) -> tuple[list[WalkedFile], list[str], dict[str, list[int]]]:
    manifest = {f.path: [f.size, f.mtime_ns, f.mode] for f in local}
    get = remote.get
    changed = [f for f in local if get(f.path) != manifest[f.path]]
    deleted = sorted(remote.keys() - manifest.keys())
    return changed, deleted, manifest


def parse_manifest(data: bytes) -> tuple[dict[str, list[int]] | None, int]:
    """(path -> [size, mtime_ns, mode] or None when there is no usable full line, appended lines)."""
    files: dict[str, list[int]] | None = None
    appended = 0
    for line in data.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # an append cut short: what it recorded is simply sent again
        if not isinstance(entry, dict):
            continue
        if isinstance(entry.get("files"), dict):
            files, appended = entry["files"], 0
        elif files is not None and isinstance(entry.get("set"), dict):
            files.update(entry["set"])
            for name in entry.get("del") or ():
                files.pop(name, None)
            appended += 1
    return files, appended


def _member(name: str, data: bytes) -> bytes:
    """One regular-file tar member (header, data, padding), as `tar -x` reads it."""
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o600
    info.mtime = int(time.time())
    return info.tobuf(tarfile.GNU_FORMAT) + data + b"\0" * (-len(data) % tarfile.BLOCKSIZE)


def _directory_member(name: str) -> bytes:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o700
    info.mtime = int(time.time())
    return info.tobuf(tarfile.GNU_FORMAT)


def parent_directories(paths: list[str]) -> list[str]:
    """Every directory above `paths`, parents before children."""
    found: set[str] = set()
    for path in paths:
        parts = path.split("/")[:-1]
        for depth in range(1, len(parts) + 1):
            found.add("/".join(parts[:depth]))
    return sorted(found)


def _tar_chunks(root: Path, files: list[WalkedFile], on_bytes: Callable[[int], None]) -> Iterator[bytes]:
    tar = shutil.which("tar")
    if tar is None:
        raise TransportError("sync needs the tar program on this computer")
    # A member for each directory above the files, before them: tar then replaces a link that
    # stands where a directory should be (one made on the machine: `sub -> /elsewhere`) with a
    # real directory, instead of following it and writing `sub/code.py` outside the work tree.
    directories = parent_directories([f.path for f in files])
    names = b"\0".join([*(d.encode() for d in directories), *(f.path.encode() for f in files)]) + b"\0"
    process = subprocess.Popen(
        [tar, "-c", "-f", "-", "-C", str(root), "--null", "--no-recursion", "-T", "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    names_in, archive = process.stdin, process.stdout
    # pipes opened in binary mode with the default buffering
    assert names_in is not None and isinstance(archive, io.BufferedReader) and process.stderr
    with contextlib.suppress(OSError, AttributeError):
        fcntl.fcntl(archive.fileno(), fcntl.F_SETPIPE_SZ, PIPE_BYTES)

    # Feed the name list from a thread: writing it all before reading could
    # deadlock once both pipes fill.
    def feed() -> None:
        try:
            names_in.write(names)
            names_in.close()
        except BrokenPipeError:
            pass

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        while chunk := archive.read1(PIPE_BYTES):
            on_bytes(len(chunk))
            yield chunk
    finally:
        if process.poll() is None:
            # At the end of the stream tar is exiting; if the consumer stopped early (the
            # remote command failed) it may be blocked writing: closing the pipe ends it.
            with contextlib.suppress(OSError):
                archive.close()
        feeder.join()
        code = process.wait()
        error = process.stderr.read().decode("utf-8", "replace").strip()
    if code != 0:
        raise TransportError(f"tar of the workdir failed: {error.splitlines()[-1] if error else code}")


def _read_remote(transport: Transport, manifest_path: str) -> CommandResult:
    """The manifest, gzipped on the way when the machine has gzip (a quarter of the bytes)."""
    qmanifest = shlex.quote(manifest_path)
    return transport.run(f"gzip -1 -c {qmanifest} 2>/dev/null || cat {qmanifest} 2>/dev/null")


def _manifest_bytes(result: CommandResult) -> bytes:
    data = result.stdout if result.ok else b""
    if data.startswith(b"\x1f\x8b"):
        try:
            return gzip.decompress(data)
        except (OSError, EOFError, zlib.error):
            return b""
    return data


def sync_tree(
    transport: Transport,
    root: Path,
    target: str,
    manifest_path: str,
    *,
    exclude: list[str] | tuple[str, ...] = (),
    include: list[str] | tuple[str, ...] = (),
    progress: Progress | None = None,
    files: list[WalkedFile] | None = None,
) -> SyncResult:
    """Make `target` on the machine hold the workdir's files; returns what was sent."""
    if files is not None:
        local = files
        existing = _read_remote(transport, manifest_path)
    else:
        # Connect and read the manifest while the workdir is scanned.
        answers: list[CommandResult] = []
        errors: list[BaseException] = []

        def read() -> None:
            try:
                answers.append(_read_remote(transport, manifest_path))
            except BaseException as error:  # re-raised below, in the caller's thread
                errors.append(error)

        reader = threading.Thread(target=read, name="gpurun-sync-manifest", daemon=True)
        reader.start()
        try:
            local = scan(root, exclude, include)
        finally:
            reader.join()
        if errors:
            raise errors[0]
        existing = answers[0]
    result = SyncResult(files_total=len(local), bytes_total=sum(f.size for f in local))
    result.largest = sorted(((f.path, f.size) for f in local), key=lambda item: -item[1])[:5]
    data = _manifest_bytes(existing)
    remote, appended = parse_manifest(data) if data.strip() else (None, 0)
    changed, deleted, manifest = plan_changes(local, remote or {})
    if remote is not None and not changed and not deleted:
        return result
    if any(f.path == META_DIR or f.path.startswith(META_DIR + "/") for f in changed):
        raise TransportError(f"the workdir has a path named {META_DIR}, which sync uses for itself; rename it")

    update = json.dumps({"files": manifest}, separators=(",", ":")).encode() + b"\n"
    whole = True
    if remote is not None and appended < COMPACT_AFTER:
        entries = {f.path: manifest[f.path] for f in changed}
        # The leading newline ends a line that an earlier append left cut short.
        delta = b"\n" + json.dumps({"set": entries, "del": deleted}, separators=(",", ":")).encode() + b"\n"
        if len(data) + len(delta) <= 2 * len(update):
            update, whole = delta, False

    qtarget, qmanifest = shlex.quote(target), shlex.quote(manifest_path)
    qmeta = shlex.quote(f"{target}/{META_DIR}")
    head = _directory_member(META_DIR) + _member(f"{META_DIR}/manifest", update)
    steps = [f"mkdir -p {qtarget}", f"tar -x -f - -C {qtarget}"]
    if deleted:
        head += _member(f"{META_DIR}/deleted", b"\0".join(name.encode() for name in deleted) + b"\0")
        # The same for what is removed: a link made on the machine where a synced directory was
        # must not lead `rm` outside the work tree. (Directories above changed files come with them.)
        above_changed = set(parent_directories([f.path for f in changed]))
        for directory in parent_directories(deleted):
            if directory not in above_changed:
                head += _directory_member(directory)
        steps.append(f"(cd {qtarget} && xargs -0 rm -f -- < {META_DIR}/deleted)")
    if whole:
        # One rename on the same file system. Across file systems mv copies, and a copy cut
        # short leaves a line that does not parse: everything is then sent again.
        steps.append(f"mv -f {qmeta}/manifest {qmanifest}")
    else:
        steps.append(f"cat {qmeta}/manifest >> {qmanifest}")
    steps.append(f"rm -rf {qmeta}")

    sent = [0]

    def on_bytes(count: int) -> None:
        sent[0] += count
        if progress:
            progress(len(changed), sent[0])

    def stream() -> Iterator[bytes]:
        yield head
        if changed:
            yield from _tar_chunks(root, changed, on_bytes)
        else:
            yield b"\0" * (2 * tarfile.BLOCKSIZE)  # end of archive

    outcome = transport.send(" && ".join(steps), stream())
    if not outcome.ok:
        detail = outcome.stderr.decode("utf-8", "replace").strip().splitlines()
        raise TransportError(
            f"syncing the code to {transport.label} failed: {detail[-1] if detail else outcome.exit_code}"
        )
    result.files_sent = len(changed)
    result.bytes_sent = sum(f.size for f in changed)
    result.deleted = len(deleted)
    return result
