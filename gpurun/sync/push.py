"""Send the workdir to a machine as one tar stream; a re-sync sends only what changed.

The machine keeps the manifest of what it was sent (path -> size, mtime,
mode). A re-sync reads it, sends changed files in one tar stream and
deletes files that are gone. The manifest is written last, so a sync cut
short is simply redone.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from gpurun.errors import TransportError
from gpurun.sync.ignore import IgnoreRules, WalkedFile
from gpurun.transport.base import Transport

Progress = Callable[[int, int], None]  # (files done, bytes done)
LARGE_SYNC_BYTES = 200 * 1024 * 1024


@dataclass
class SyncResult:
    files_total: int = 0
    bytes_total: int = 0
    files_sent: int = 0
    bytes_sent: int = 0
    deleted: int = 0
    largest: list[tuple[str, int]] = field(default_factory=list)


def scan(root: Path, exclude: list[str] | tuple[str, ...] = ()) -> list[WalkedFile]:
    return list(IgnoreRules(root, exclude).walk())


def plan_changes(
    local: list[WalkedFile], remote: dict[str, list[int]]
) -> tuple[list[WalkedFile], list[str], dict[str, list[int]]]:
    manifest = {f.path: [f.size, f.mtime_ns, f.mode] for f in local}
    changed = [f for f in local if remote.get(f.path) != manifest[f.path]]
    deleted = sorted(set(remote) - set(manifest))
    return changed, deleted, manifest


def _tar_chunks(root: Path, files: list[WalkedFile], on_bytes: Callable[[int], None]) -> Iterator[bytes]:
    tar = shutil.which("tar")
    if tar is None:
        raise TransportError("sync needs the tar program on this computer")
    names = b"\0".join(f.path.encode() for f in files) + b"\0"
    process = subprocess.Popen(
        [tar, "-c", "-f", "-", "-C", str(root), "--null", "--no-recursion", "-T", "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert process.stdin and process.stdout and process.stderr
    # Feed the name list from a thread: writing it all before reading could
    # deadlock once both pipes fill.
    def feed() -> None:
        try:
            process.stdin.write(names)
            process.stdin.close()
        except BrokenPipeError:
            pass

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        while chunk := process.stdout.read1(1 << 20):
            on_bytes(len(chunk))
            yield chunk
    finally:
        feeder.join()
        code = process.wait()
        error = process.stderr.read().decode("utf-8", "replace").strip()
    if code != 0:
        raise TransportError(f"tar of the workdir failed: {error.splitlines()[-1] if error else code}")


def sync_tree(
    transport: Transport,
    root: Path,
    target: str,
    manifest_path: str,
    *,
    exclude: list[str] | tuple[str, ...] = (),
    progress: Progress | None = None,
    files: list[WalkedFile] | None = None,
) -> SyncResult:
    """Make `target` on the machine hold the workdir's files; returns what was sent."""
    local = files if files is not None else scan(root, exclude)
    result = SyncResult(files_total=len(local), bytes_total=sum(f.size for f in local))
    result.largest = sorted(((f.path, f.size) for f in local), key=lambda item: -item[1])[:5]
    existing = transport.run(f"cat {shlex.quote(manifest_path)} 2>/dev/null")
    remote: dict[str, list[int]] = {}
    if existing.ok and existing.stdout.strip():
        try:
            remote = json.loads(existing.stdout)["files"]
        except (ValueError, KeyError, TypeError):
            remote = {}
    changed, deleted, manifest = plan_changes(local, remote)
    qtarget = shlex.quote(target)
    if changed:
        sent = [0]

        def on_bytes(count: int) -> None:
            sent[0] += count
            if progress:
                progress(len(changed), sent[0])

        command = f"mkdir -p {qtarget} && tar -x -f - -C {qtarget}"
        outcome = transport.send(command, _tar_chunks(root, changed, on_bytes))
        if not outcome.ok:
            detail = outcome.stderr.decode("utf-8", "replace").strip().splitlines()
            raise TransportError(f"unpacking the code on {transport.label} failed: {detail[-1] if detail else outcome.exit_code}")
        result.files_sent = len(changed)
        result.bytes_sent = sum(f.size for f in changed)
    if deleted:
        names = b"\0".join(name.encode() for name in deleted) + b"\0"
        transport.check(f"cd {qtarget} && xargs -0 rm -f --", what="removing deleted files", input=names)
        result.deleted = len(deleted)
    if changed or deleted or not remote:
        data = json.dumps({"files": manifest}).encode()
        qmanifest = shlex.quote(manifest_path)
        transport.check(
            f"mkdir -p {qtarget} && cat > {qmanifest}.tmp && mv {qmanifest}.tmp {qmanifest}",
            what="writing the sync manifest",
            input=data,
        )
    return result
