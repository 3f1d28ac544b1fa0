"""Take a consistent view of the checkpoint directory while training keeps writing.

A changed file is taken only once it has been quiet for `settle` seconds (a
training loop writing in chunks pauses far less than that), or two seconds
where the file system keeps whole-second mtimes. It is held by a
hard link in the staging directory and uploaded from there, with no copy:
frameworks that save to a temporary name and rename never touch the held
inode again. Before the snapshot is committed, `verify` compares each held
file's stat with the one taken at staging; a file written in place meanwhile
abandons that snapshot, and from then on that path is copied to staging
(hashed on the way, stat compared before and after) instead of linked.
Where a hard link is impossible (another file system), the file is copied.
Files whose stat matches the previous snapshot are not read at all.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from stat import S_ISLNK, S_ISREG
from typing import Any

from gpurun.store.snapshots import StagedFile, sha256_file

# Files that training frameworks write before an atomic rename.
TEMPORARY_SUFFIXES = (".tmp", ".part", ".partial", ".gpurun-part")
# Keras writes a backup as incoming.* before renaming it; the templates probe writability.
TEMPORARY_PREFIXES = (".gpurun", "incoming.", ".write-test-")
_CHUNK = 1 << 20
# The widest mtime step of a common file system (FAT's two seconds).
COARSE_MTIME_SPAN = 2.0


class HeldFileChanged(OSError):
    """A file held by link was written in place before its snapshot committed."""


@dataclass(frozen=True)
class FileIdentity:
    size: int
    mtime_ns: int
    inode: int


def _identity(stat: os.stat_result) -> FileIdentity:
    return FileIdentity(stat.st_size, stat.st_mtime_ns, stat.st_ino)


@dataclass
class CheckpointScan:
    """One walk of the checkpoint directory: its regular files, and its symbolic links, those whose
    target is inside it (path -> target relative to the link's folder) and "path -> target" for the others.

    Links to folders are not descended into (their files are under their target
    already); a link whose target lies outside is never followed.
    """

    files: dict[str, FileIdentity] = field(default_factory=dict)
    links_inside: dict[str, str] = field(default_factory=dict)
    links_outside: list[str] = field(default_factory=list)


def scan_checkpoint_dir(directory: Path) -> CheckpointScan:
    scan = CheckpointScan()
    if not directory.is_dir():
        return scan
    root = os.path.realpath(directory)
    for current, dirs, files in os.walk(directory):
        dirs[:] = [d for d in dirs if not d.startswith(".gpurun")]
        # One relpath per folder, not per file: a checkpoint of 2,000 files spent 10 ms on them.
        folder = os.path.relpath(current, directory).replace(os.sep, "/")
        prefix = "" if folder == "." else folder + "/"
        for name in sorted(dirs + files):
            if name.endswith(TEMPORARY_SUFFIXES) or name.startswith(TEMPORARY_PREFIXES):
                continue
            full = os.path.join(current, name)
            relative = prefix + name
            try:
                stat = os.stat(full, follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed while we looked
            if S_ISLNK(stat.st_mode):
                try:
                    target = os.readlink(full)
                except OSError:
                    continue
                resolved = os.path.realpath(os.path.join(current, target))
                if resolved == root or resolved.startswith(root + os.sep):
                    scan.links_inside[relative] = os.path.relpath(resolved, os.path.realpath(current)).replace(
                        os.sep, "/"
                    )
                else:
                    scan.links_outside.append(f"{relative} -> {target}")
            elif S_ISREG(stat.st_mode):
                scan.files[relative] = _identity(stat)
    return scan


def _copy_and_hash(source: str, dest: str) -> tuple[str, int]:
    digest = hashlib.sha256()
    size = 0
    with open(source, "rb") as reader, open(dest, "wb") as writer:
        while chunk := reader.read(_CHUNK):
            digest.update(chunk)
            writer.write(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


class Stager:
    """Remembers what the last snapshot held so unchanged files cost nothing."""

    def __init__(self, watch_dir: Path, staging_dir: Path, settle: float = 0.5) -> None:
        self.settle = settle
        self.watch_dir = Path(watch_dir)
        self.staging_dir = Path(staging_dir)
        self.known: dict[str, tuple[FileIdentity, str]] = {}
        self._pending: dict[str, tuple[FileIdentity, str | None]] = {}
        # Held by hard link, not copied: their stat must not change until the snapshot commits.
        self._held: dict[str, tuple[str, FileIdentity]] = {}
        # Paths seen written in place while held: copied from then on.
        self.copied_paths: set[str] = set()
        self._links = 0
        # Staging link -> the checkpoint file it holds, to name the real file in errors.
        self._link_names: dict[str, str] = {}
        # Symbolic links in the checkpoint directory: kept as links when they stay inside it.
        self.links: dict[str, str] = {}
        self.outside_links: list[str] = []
        self.known_links: dict[str, str] = {}
        self._pending_links: dict[str, str] = {}

    def remember(self, manifest: dict[str, Any] | None) -> None:
        """Seed from the previous snapshot's manifest when current files still match by size."""
        if not manifest:
            return
        self.known_links = {entry["path"]: entry["target"] for entry in manifest.get("links", [])}
        current = scan_checkpoint_dir(self.watch_dir).files
        for entry in manifest["files"]:
            identity = current.get(entry["path"])
            # Trust size alone only after checking the hash once.
            if (
                identity
                and identity.size == entry["size"]
                and sha256_file(self.watch_dir / entry["path"]) == entry["sha256"]
            ):
                self.known[entry["path"]] = (identity, entry["sha256"])

    def stage(self, attempts: int = 5) -> tuple[list[StagedFile], bool]:
        """Files for the next snapshot, and whether anything changed since the last one."""
        if self.staging_dir.exists():
            shutil.rmtree(self.staging_dir)
        self.staging_dir.mkdir(parents=True)
        scan = scan_checkpoint_dir(self.watch_dir)
        current = scan.files
        staged: list[StagedFile] = []
        self._pending = {}
        self._held = {}
        self._links = 0
        self._link_names = {}
        self.links, self.outside_links = scan.links_inside, scan.links_outside
        self._pending_links = dict(self.links)
        changed = set(current) != set(self.known) or self.links != self.known_links
        to_take = []
        for path, identity in sorted(current.items()):
            known = self.known.get(path)
            if known and known[0] == identity:
                staged.append(StagedFile(path, identity.size, known[1], None))
                self._pending[path] = known
            else:
                to_take.append(path)
        changed = changed or bool(to_take)
        for _attempt in range(attempts):
            to_take = self._take(to_take, staged)
            if not to_take:
                break
        else:
            raise OSError(f"{to_take[0]} kept changing while it was copied; will retry")
        staged.sort(key=lambda item: item.path)
        return staged, changed

    def _take(self, paths: list[str], staged: list[StagedFile]) -> list[str]:
        """Stage what is stable now; returns the paths to try again."""
        links_dir = self.staging_dir / ".links"
        if paths:
            links_dir.mkdir(parents=True, exist_ok=True)
        held: dict[str, tuple[str, FileIdentity, bool]] = {}
        for path in paths:
            source = os.path.join(self.watch_dir, path)
            # A hard link holds on to this inode: a writer that saves to a new
            # file and renames it can no longer change what we upload.
            self._links += 1
            link = os.path.join(links_dir, str(self._links))
            try:
                os.link(source, link)
                held_path, linked = link, True
            except FileNotFoundError:
                continue  # removed while we looked: simply not in this snapshot
            except OSError:
                held_path, linked = source, False
            try:
                held[path] = (held_path, _identity(os.stat(held_path)), linked)
                # A file the agent may link but not read would fail the upload under the link's name.
                os.close(os.open(held_path, os.O_RDONLY))
            except FileNotFoundError:
                continue
            except PermissionError as error:
                if linked:
                    os.unlink(held_path)
                raise OSError(
                    error.errno, f"cannot read {self.watch_dir / path} ({error.strerror}); no snapshot until it can be"
                ) from None
            if linked:
                self._link_names[held_path] = source
        if held:
            now = time.time()
            wait = max(
                self._quiet_needed(identity) - (now - identity.mtime_ns / 1e9) for _, identity, _ in held.values()
            )
            if wait > 0:
                time.sleep(min(wait, max(self.settle, COARSE_MTIME_SPAN)))  # an mtime in the future waits no longer
        retry = []
        for path, (held_path, identity, linked) in held.items():
            try:
                if _identity(os.stat(held_path)) != identity:
                    retry.append(path)  # written in place while we waited
                    if linked:
                        os.unlink(held_path)
                    continue
                if linked and path not in self.copied_paths:
                    # Uploaded from the link and hashed by write_snapshot; `verify` checks it before commit.
                    staged.append(StagedFile(path, identity.size, None, held_path))
                    self._held[path] = (held_path, identity)
                    self._pending[path] = (identity, None)
                    continue
                dest = self.staging_dir / path
                dest.parent.mkdir(parents=True, exist_ok=True)
                digest, size = _copy_and_hash(held_path, str(dest))
                after = _identity(os.stat(held_path))
            except FileNotFoundError:
                continue
            if linked:
                os.unlink(held_path)
            if after != identity or size != identity.size:
                retry.append(path)
                continue
            staged.append(StagedFile(path, size, digest, str(dest)))
            self._pending[path] = (identity, digest)
        return retry

    def _quiet_needed(self, identity: FileIdentity) -> float:
        """How long a file must have been quiet before its stat can vouch for its bytes.

        On file systems that keep whole-second mtimes (FAT keeps two seconds;
        ext4 with 128-byte inodes and some network mounts keep one), a rewrite
        in the same second keeps the same mtime, and the truncated mtime makes
        the file look older than it is. Once the clock has left that mtime's
        two-second span, any later write changes the mtime, so `verify` and the
        copy's before/after check see it.
        """
        if identity.mtime_ns % 1_000_000_000 == 0:
            return max(self.settle, COARSE_MTIME_SPAN)
        return self.settle

    def verify(self) -> None:
        """Raise OSError if a file held by link was written in place since it was staged.

        Size and mtime are compared, as rsync's quick check does; ctime cannot
        be, since a rename over the checkpoint's name changes the held inode's
        link count and so its ctime.
        """
        changed = []
        for path, (held_path, identity) in self._held.items():
            try:
                now = _identity(os.stat(held_path))
            except FileNotFoundError:
                now = None
            if now != identity:
                changed.append(path)
        if changed:
            self.copied_paths.update(changed)  # every one of them, so the retry needs no further round
            more = f" and {len(changed) - 1} more" if len(changed) > 1 else ""
            raise HeldFileChanged(
                f"{changed[0]}{more} written in place while uploaded; copied to staging from now on, and retried"
            )

    def real_names(self, message: str) -> str:
        """`message` with each staging link's path replaced by the checkpoint file it held."""
        for link in sorted(self._link_names, key=len, reverse=True):  # .links/10 before .links/1
            message = message.replace(link, self._link_names[link])
        return message

    def discard(self) -> None:
        """Drop what a failed snapshot staged: its links hold old checkpoint versions on disk."""
        shutil.rmtree(self.staging_dir, ignore_errors=True)
        self._held = {}

    def committed(self, manifest: dict[str, Any] | None = None) -> None:
        """After a snapshot landed: the identities seen while staging are now known.

        Hashes that write_snapshot computed come from the snapshot's manifest.
        """
        self.discard()  # the links and copies are in the store now: let the old inodes go
        self.known_links = self._pending_links
        digests = {entry["path"]: entry["sha256"] for entry in (manifest or {}).get("files", [])}
        self.known = {
            path: (identity, digest or digests[path])
            for path, (identity, digest) in self._pending.items()
            if digest or path in digests
        }
