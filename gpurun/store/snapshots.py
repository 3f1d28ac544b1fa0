"""The snapshot layout and its guarantees, written once for every store.

    <run>/snapshots/000007/<files>          never overwritten (create-only writes)
    <run>/snapshots/000007.manifest.json    path, size, sha256 of every file; written after them
    <run>/LATEST                            {"seq": 7, ...}; written last
    <run>/LATEST.manifest.json              a copy of the manifest, written with LATEST: a hint for
                                            restores, taken only when it matches LATEST
    <run>/run.json                          the run record

A reader trusts only LATEST and manifests, so a snapshot cut short at any
point leaves the previous LATEST pointing at a complete snapshot.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, cast

from gpurun.errors import BadInput, InvalidDocument, NewerSchema, SnapshotConflict, StoreError
from gpurun.models import SCHEMA_VERSION, RunDocument, RunRecord
from gpurun.store.base import ObjectStore, Progress

_MANIFEST = re.compile(r"^snapshots/(\d{6,})\.manifest\.json$")
_SEQ_ANY = re.compile(r"^snapshots/(\d{6,})(?:[./]|$)")
# The run-name pattern of gpurun.runs (the store layer imports nothing above it).
_RUN_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")
#: A copy of the newest snapshot's manifest beside LATEST, read in parallel with it: a restore
#: then needs one round trip to know what to fetch, not two. Only a hint: it is taken when it
#: names the snapshot LATEST points to, and the snapshot's own manifest is read otherwise.
LATEST_MANIFEST = "LATEST.manifest.json"


@dataclass(frozen=True)
class StagedFile:
    """One file of a snapshot: where it is now and what it holds."""

    path: str  # relative, POSIX
    size: int
    sha256: str | None  # None: write_snapshot hashes local_path (while uploading where it can)
    local_path: str | None  # None: identical to the previous snapshot's copy


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def seq_dir(seq: int) -> str:
    return f"snapshots/{seq:06d}"


def stored_in(entry: dict[str, Any], manifest_seq: int) -> int:
    """The snapshot whose folder holds this manifest entry's object.

    An entry unchanged since an earlier snapshot names that snapshot in `seq`
    instead of being copied: the object stays where it was first written.
    """
    source = entry.get("seq", manifest_seq)
    if not isinstance(source, int) or isinstance(source, bool) or not 1 <= source <= manifest_seq:
        raise StoreError(f"snapshot {manifest_seq}: {entry.get('path')!r} refers to snapshot {source!r}")
    return source


def object_key(run: str, source_seq: int, path: str) -> str:
    return f"{run}/{seq_dir(source_seq)}/{path}"


class InvalidLatest(InvalidDocument):
    """LATEST is there but says nothing usable: `repair_latest` rebuilds it from the manifests."""


def latest(store: ObjectStore, run: str, *, seq_only: bool = False) -> dict[str, Any] | None:
    """LATEST as stored, validated (`documents.Latest`, or with `seq_only` just `documents.Pointer`),
    less its schema `version`; None when there is none. Raises InvalidLatest."""
    from gpurun.store import documents

    data = store.get_bytes(f"{run}/LATEST", limit=documents.LATEST_LIMIT)
    if data is None:
        return None
    return _parse_latest(store, run, data, seq_only=seq_only)


def _parse_latest(store: ObjectStore, run: str, data: bytes, *, seq_only: bool = False) -> dict[str, Any]:
    from gpurun.store import documents

    model = documents.Pointer if seq_only else documents.Latest
    try:
        pointer = documents.read(data, model, name=f"{store.url}/{run}/LATEST", limit=documents.LATEST_LIMIT)
    except NewerSchema:
        raise  # not broken: written by a newer gpurun, which this one must not repair or overwrite
    except InvalidDocument as error:
        raise InvalidLatest(str(error), name=error.name, reason=error.reason) from None
    pointer.pop("version", None)  # how it is stored, not what it says
    return pointer


def repair_latest(store: ObjectStore, run: str) -> dict[str, Any] | None:
    """Point LATEST at the newest complete snapshot: a manifest that reads, names its own
    seq, and whose every file is stored at the size it lists. None when there is none
    (a corrupt LATEST then stays until the next snapshot replaces it)."""
    objects = store.list(f"{run}/snapshots/")
    sizes = {obj.key: obj.size for obj in objects}
    seqs = []
    for obj in objects:
        match = _MANIFEST.match(obj.key[len(run) + 1 :])
        if match:
            seqs.append(int(match.group(1)))
    for seq in sorted(seqs, reverse=True):
        try:
            manifest = read_manifest(store, run, seq)
        except InvalidDocument:
            continue
        if isinstance(manifest, dict) and _complete(manifest, run, seq, sizes):
            pointer = summary(manifest)
            store.put_bytes(f"{run}/LATEST", latest_bytes(pointer))
            return pointer
    return None


def _complete(manifest: Any, run: str, seq: int, sizes: dict[str, int]) -> bool:
    if not isinstance(manifest, dict) or manifest.get("seq") != seq or not isinstance(manifest.get("files"), list):
        return False
    try:
        return all(
            sizes.get(object_key(run, stored_in(entry, seq), entry["path"])) == entry["size"]
            for entry in manifest["files"]
        )
    except (TypeError, KeyError, AttributeError, StoreError):
        return False


def written_at(store: ObjectStore, key: str) -> float | None:
    """When the store wrote `key` (its own clock, not a time the object claims); None if unknown."""
    for obj in store.list(key):
        if obj.key == key:
            return obj.modified
    return None


def usable_latest(store: ObjectStore, run: str) -> dict[str, Any] | None:
    """LATEST, if it points at a snapshot whose manifest is there; None when there is no LATEST.

    Raises StoreError naming what is wrong, so a caller choosing among runs can skip this one.
    """
    pointer = latest(store, run, seq_only=True)  # the manifest completes it
    if pointer is None:
        return None
    seq: int = pointer["seq"]
    try:
        manifest = read_manifest(store, run, seq)
    except InvalidDocument as error:
        raise StoreError(
            f"{store.url}/{run}/LATEST points at snapshot {seq}, whose manifest is unusable: {error}"
        ) from None
    if manifest is None or manifest.get("seq") != seq:
        raise StoreError(f"{store.url}/{run}/LATEST points at snapshot {seq}, which has no valid manifest")
    return {**pointer, **summary(manifest)}


def read_manifest(store: ObjectStore, run: str, seq: int) -> dict[str, Any] | None:
    """The manifest as stored, validated (`documents.Manifest`); None when there is none. Raises InvalidDocument."""

    return _read_manifest_at(store, f"{run}/{seq_dir(seq)}.manifest.json")


def _read_manifest_at(store: ObjectStore, key: str) -> dict[str, Any] | None:
    from gpurun.store import documents

    data = store.get_bytes(key, limit=documents.MANIFEST_LIMIT)
    if data is None:
        return None
    return documents.read(data, documents.Manifest, name=f"{store.url}/{key}", limit=documents.MANIFEST_LIMIT)


def _latest_manifest_copy(store: ObjectStore, run: str) -> dict[str, Any] | None:
    """The copy of the newest manifest beside LATEST, validated as a manifest; None when there
    is none or it does not read (the snapshot's own manifest is read then, and says what is wrong)."""
    try:
        return _read_manifest_at(store, f"{run}/{LATEST_MANIFEST}")
    except StoreError:  # InvalidDocument included
        return None


def list_snapshots(store: ObjectStore, run: str, warn: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Complete snapshots (those with a manifest), oldest first; an unreadable manifest is skipped (`warn` hears it)."""
    result = []
    for obj in store.list(f"{run}/snapshots/"):
        match = _MANIFEST.match(obj.key[len(run) + 1 :])
        if match:
            try:
                manifest = read_manifest(store, run, int(match.group(1)))
            except InvalidDocument as error:
                if warn is not None:
                    warn(f"{error}; skipped")
                continue
            if manifest:
                result.append(summary(manifest))
    return sorted(result, key=lambda item: item["seq"])


def latest_bytes(pointer: dict[str, Any]) -> bytes:
    """LATEST as written: the snapshot's summary and the schema version."""
    return json.dumps({"version": SCHEMA_VERSION, **pointer}).encode()


def summary(manifest: dict[str, Any]) -> dict[str, Any]:
    return {
        "seq": manifest["seq"],
        "at": manifest["at"],
        "files": len(manifest["files"]),
        "bytes": manifest["bytes"],
    }


def _used_seqs(level: dict[str, str], *, but: tuple[str, str] | None = None) -> set[int]:
    """Every number a claim, a manifest or a folder holds in one level of `snapshots/`, but for
    the object `but` (name, tag): our own claim, recognised by the tag its write returned."""
    seqs = set()
    for name, tag in level.items():
        match = _SEQ_ANY.match("snapshots/" + name)
        if match and (name, tag) != but:
            seqs.add(int(match.group(1)))
    return seqs


def _read_latest_tagged(store: ObjectStore, run: str) -> tuple[bytes, str] | None:
    from gpurun.store import documents

    return store.get_tagged(f"{run}/LATEST", limit=documents.LATEST_LIMIT)


def _advance_latest(
    store: ObjectStore,
    run: str,
    manifest: dict[str, Any],
    found: tuple[bytes, str] | None,
    alongside: Callable[[], object] | None = None,
) -> None:
    """Point LATEST at `manifest` unless it points at a newer snapshot already.

    `found` is LATEST as read (with its tag) while the manifest went up. The write is a
    compare-and-swap on that tag (`If-Match`; create-only when there was none): if another
    writer moved LATEST in between (an old machine's final sync beside its replacement's
    snapshot), it is read again and compared again, so LATEST never goes back to an older
    snapshot. A store that ignores `If-Match` makes it a plain write after the read.
    `alongside` is started once, as LATEST is first written (never when LATEST stays).
    """
    key, data = f"{run}/LATEST", latest_bytes(summary(manifest))
    for _attempt in range(10):
        current, tag = None, None
        if found is not None:
            raw, tag = found
            try:
                current = _parse_latest(store, run, raw)
            except InvalidLatest:
                pass  # this snapshot is complete and confirmed: it is a sound LATEST
        if current is not None and current["seq"] >= manifest["seq"]:
            return
        if alongside is not None:
            alongside()
            alongside = None
        try:
            if found is None:
                store.put_bytes(key, data, if_absent=True)
            else:
                store.put_bytes(key, data, if_match=tag or None)
            return
        except SnapshotConflict:
            found = _read_latest_tagged(store, run)
    raise StoreError(f"{store.url}/{key}: other writers kept moving it; snapshot {manifest['seq']} is complete")


def _claim(store: ObjectStore, run: str, writer: str, guess: int) -> int:
    """Take a snapshot number no writer has used: create-only `000N.claim`, higher than any in use.

    The number after the writer's previous snapshot is almost always the one: it is claimed
    while the listing that shows it is the highest runs, so the claim costs no round trip of
    its own. The listing may or may not show that claim; shown with another tag than our write
    returned, it is another writer's (a store that ignores create-only writes let both write
    it), and anything else under that number (a folder or manifest of a writer cut short
    before its claim) also makes it used. Then our claim is given back (deleted, where the
    listing gave no sign that it is anyone else's) and the next free number above them all
    is claimed instead.
    """
    folder = f"{run}/snapshots/"
    claim = json.dumps({"writer": writer, "nonce": uuid.uuid4().hex}).encode()

    def claimed(seq: int) -> str | None:
        """Our claim's tag, or None when another writer holds the number."""
        try:
            return store.put_bytes(f"{run}/{seq_dir(seq)}.claim", claim, if_absent=True)
        except SnapshotConflict:
            return None

    name = f"{guess:06d}.claim"
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpurun-list") as pool:
        listing = pool.submit(store.list_level, folder)
        tag = claimed(guess)
        try:
            level = listing.result()
        except BaseException:
            if tag is not None:
                store.delete([folder + name])  # no number is left claimed for nothing
            raise
    used = _used_seqs(level, but=None if tag is None else (name, tag))
    if tag is not None and max(used, default=0) < guess:
        return guess
    if tag is not None and level.get(name, tag) == tag:
        store.delete([folder + name])
    for _attempt in range(20):
        seq = max(used | {guess}, default=0) + 1
        if claimed(seq) is not None:
            return seq
        used = _used_seqs(store.list_level(folder))
    raise StoreError(f"{store.url}/{run}: could not claim a snapshot number (too many concurrent writers)")


def write_snapshot(
    store: ObjectStore,
    run: str,
    files: list[StagedFile],
    *,
    previous: dict[str, Any] | None,
    progress: Progress | None = None,
    writer: str = "",
    before_commit: Callable[[], None] | None = None,
    links: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Upload a new numbered snapshot, then its manifest, then move LATEST.

    `links` (path -> relative target, both inside the checkpoint directory) go
    into the manifest as they are: a restore makes them links again.

    A file equal to the previous snapshot's is not sent or copied: its manifest
    entry names (in `seq`) the earlier snapshot whose folder holds it, which
    costs no request per file. `before_commit` runs after every object is confirmed and
    before the manifest: raising there abandons the snapshot. Returns the
    manifest summary with `sent_bytes` and the whole `manifest` added.
    """
    previous_files: dict[str, dict[str, Any]] = {}
    if previous:
        previous_files = {entry["path"]: entry for entry in previous["files"]}
    hashes = {item.path: item.sha256 for item in files if item.sha256}
    unhashed = [item for item in files if not item.sha256]
    if any(item.local_path is None for item in unhashed):
        raise StoreError("a staged file has neither a local copy nor a sha256")
    # Only a file the size of its previous version can be unchanged: hash those
    # before deciding, and the rest while they upload.
    maybe_same = [item for item in unhashed if previous_files.get(item.path, {}).get("size") == item.size]
    hashes.update(_hash_files(maybe_same))
    # The claim makes the number ours: a second agent gets a conflict and moves on.
    seq = _claim(store, run, writer, previous["seq"] + 1 if previous else 1)

    prefix = f"{run}/{seq_dir(seq)}/"
    uploads: list[tuple[str, str]] = []
    # path -> the earlier snapshot whose folder already holds that exact object.
    references: dict[str, int] = {}
    sent = 0
    for item in files:
        old = previous_files.get(item.path)
        if old and old["sha256"] == hashes.get(item.path) and old["size"] == item.size:
            assert previous is not None  # previous_files is empty without it
            references[item.path] = stored_in(old, previous["seq"])
        elif item.local_path is None:
            raise StoreError(f"{item.path}: no staged copy and no identical file in the previous snapshot")
        else:
            uploads.append((prefix + item.path, item.local_path))
            sent += item.size
    # hashlib releases the interpreter lock on large reads: the hash costs no upload time. Files
    # the store hashes as it sends them (it signs each small one with its sha256) are read once.
    hashed_by_store = store.hashed_while_sending()
    pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="gpurun-hash")
    abandon = threading.Event()
    try:
        pending = {
            item.path: pool.submit(sha256_file, item.local_path, abandon)
            for item in unhashed
            if item.path not in hashes and item.local_path is not None and item.size > hashed_by_store
        }
        sent_whole = store.put_files(uploads, if_absent=True, progress=progress)
        hashes.update({path: future.result() for path, future in pending.items()})
        for item in unhashed:
            if item.path not in hashes and item.local_path is not None:
                whole = sent_whole.get(prefix + item.path)
                digest = whole.sha256 if whole is not None else None
                hashes[item.path] = digest or sha256_file(item.local_path, abandon)
    finally:
        # After a failed upload, a big file's hash stops at its next chunk: the
        # agent's final sync and its exit do not wait for it.
        abandon.set()
        pool.shutdown(wait=False, cancel_futures=True)

    # Confirm every object before the manifest makes the snapshot visible, the
    # referenced ones too (one listing per folder, not a request per file). What
    # the store acknowledged from one buffer it hashed and sent is confirmed by that
    # answer: listing 2,000 of them again cost 0.4-0.7 s of a small-file snapshot.
    stored = {key: whole.size for key, whole in sent_whole.items()}
    if any(key not in stored for key, _path in uploads):
        stored = {obj.key: obj.size for obj in store.list(prefix)} | stored
    for source in sorted(set(references.values())):
        stored.update((obj.key, obj.size) for obj in store.list(f"{run}/{seq_dir(source)}/"))
    for item in files:
        key = object_key(run, references.get(item.path, seq), item.path)
        if stored.get(key) != item.size:
            raise StoreError(f"{store.url}/{key}: stored size {stored.get(key)} != {item.size}")
    if before_commit is not None:
        before_commit()  # the stager checks that nothing it held was written while it was read
    manifest = {
        "version": SCHEMA_VERSION,
        "seq": seq,
        "run": run,
        "at": now_iso(),
        "files": [
            {"path": f.path, "size": f.size, "sha256": hashes[f.path]}
            | ({"seq": references[f.path]} if f.path in references else {})
            for f in sorted(files, key=lambda f: f.path)
        ],
        "bytes": sum(f.size for f in files),
        "sent_bytes": sent,
    }
    if links:
        manifest["links"] = [{"path": path, "target": links[path]} for path in sorted(links)]
    # LATEST is read while the manifest goes up: one round trip for both. The copy of the
    # manifest beside LATEST goes up while LATEST is written: no round trip of its own.
    document = json.dumps(manifest, indent=1).encode()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpurun-latest") as pool:
        reading = pool.submit(_read_latest_tagged, store, run)
        store.put_bytes(f"{run}/{seq_dir(seq)}.manifest.json", document, if_absent=True)
        found = reading.result()
        # Only when LATEST moves: an old machine's late final sync would replace a good copy
        # with an older manifest.
        copying = []
        _advance_latest(
            store,
            run,
            manifest,
            found,
            alongside=lambda: copying.append(pool.submit(store.put_bytes, f"{run}/{LATEST_MANIFEST}", document)),
        )
        try:
            for copied in copying:
                copied.result()
        except (StoreError, OSError):
            pass  # a hint only (a full disk included): a restore that finds it missing or stale reads the manifest
    return {**summary(manifest), "sent_bytes": sent, "manifest": manifest}


def _hash_files(items: list[StagedFile]) -> dict[str, str]:
    if not items:
        return {}
    with ThreadPoolExecutor(max_workers=min(4, len(items)), thread_name_prefix="gpurun-hash") as pool:
        return dict(zip([item.path for item in items], pool.map(sha256_file, [item.local_path for item in items])))


def prune(store: ObjectStore, run: str, keep: int) -> list[int]:
    """Remove all but the newest `keep` complete snapshots, and abandoned partial ones.

    Runs only against the LATEST already written, and never removes it. An
    object that a remaining manifest refers to (an unchanged file first
    written by an older snapshot) stays in its folder until no manifest
    names it. Returns the snapshots from which something was removed.
    """
    pointer = latest(store, run)
    if pointer is None:
        return []
    latest_seq = pointer["seq"]
    objects = store.list(f"{run}/snapshots/")
    complete, seen = set(), set()
    for obj in objects:
        rel = obj.key[len(run) + 1 :]
        match = _MANIFEST.match(rel)
        if match:
            complete.add(int(match.group(1)))
        match = _SEQ_ANY.match(rel)
        if match:
            seen.add(int(match.group(1)))
    kept = set(sorted(seq for seq in complete if seq <= latest_seq)[-keep:]) | {latest_seq}
    # Partial snapshots above LATEST may be in flight in another writer: leave them.
    doomed = {seq for seq in seen if seq not in kept and seq < latest_seq}
    if not doomed:
        return []
    referenced = _referenced_elsewhere(store, run, sorted(complete - doomed))
    if referenced is None:
        return []  # a remaining manifest cannot be read: what it needs is unknown, so delete nothing
    keys: list[str] = []
    manifests: list[str] = []
    pruned: set[int] = set()
    for obj in objects:
        match = _SEQ_ANY.match(obj.key[len(run) + 1 :])
        if match and int(match.group(1)) in doomed and obj.key not in referenced:
            pruned.add(int(match.group(1)))
            # Manifests go first so a half-done prune never leaves a manifest without files.
            (manifests if obj.key.endswith(".manifest.json") else keys).append(obj.key)
    store.delete(manifests)
    store.delete(keys)
    return sorted(pruned)


def _referenced_elsewhere(store: ObjectStore, run: str, seqs: list[int]) -> set[str] | None:
    """Keys of objects in other snapshots' folders that the manifests of `seqs` refer to."""
    referenced: set[str] = set()
    for seq in seqs:
        try:
            manifest = read_manifest(store, run, seq)
            if manifest is None:
                continue  # removed meanwhile: it needs nothing
            for entry in manifest["files"]:
                source = stored_in(entry, seq)
                if source != seq:
                    referenced.add(object_key(run, source, entry["path"]))
        except (ValueError, TypeError, KeyError, AttributeError, StoreError):
            return None
    return referenced


def resolve_seq(store: ObjectStore, run: str, seq: int | None) -> dict[str, Any]:
    """The manifest of snapshot `seq`, or of the one LATEST points to (with the copy beside
    LATEST read at the same time, so that the usual case costs one round trip)."""
    if seq is None:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpurun-latest") as pool:
            copy = pool.submit(_latest_manifest_copy, store, run)
            pointer = latest(store, run)
            hint = copy.result()
        if pointer is None:
            raise BadInput(f"run {run}: no snapshot in {store.url} yet")
        seq = pointer["seq"]
        # The copy is the manifest LATEST points to when it says the same: the same run, number,
        # time, count of files and bytes (a number is never reused, and manifests are create-only).
        if (
            hint is not None
            and hint.get("run") == run
            and summary(hint) == {key: pointer.get(key) for key in summary(hint)}
        ):
            return hint
    manifest = read_manifest(store, run, seq)
    if manifest is None:
        known = ", ".join(str(s["seq"]) for s in list_snapshots(store, run)) or "none"
        raise BadInput(f"run {run}: no snapshot {seq} in {store.url} (snapshots: {known})")
    return manifest


def sha256_file(path: str | Path, abandon: threading.Event | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            if abandon is not None and abandon.is_set():
                raise StoreError(f"{path}: hash abandoned")
            digest.update(chunk)
    return digest.hexdigest()


def download_snapshot(
    store: ObjectStore,
    run: str,
    dest: str | Path,
    *,
    seq: int | None = None,
    manifest: dict[str, Any] | None = None,
    progress: Progress | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Restore one snapshot into `dest`, all or nothing, every size and sha256 verified.

    `manifest` is the snapshot's, when the caller has read it already (`resolve_seq`).
    A non-empty `dest` needs `force`; its old content is then moved aside
    (the summary's `previous` says where). See `restore.py`.
    """
    from gpurun.store import restore

    manifest = manifest if manifest is not None else resolve_seq(store, run, seq)
    moved = restore.download(store, run, manifest, dest, force=force, progress=progress)
    return {**summary(manifest), **moved}


def put_run_record(store: ObjectStore, run: str, record: RunRecord | RunDocument) -> None:
    document = {**record, "version": SCHEMA_VERSION}
    store.put_bytes(f"{run}/run.json", json.dumps(document, indent=1, sort_keys=True).encode())


def get_run_record(store: ObjectStore, run: str) -> RunDocument | None:
    """run.json as stored, validated (`documents.RunDocument`); None when there is none. Raises InvalidDocument."""
    from gpurun.store import documents

    data = store.get_bytes(f"{run}/run.json", limit=documents.RUN_RECORD_LIMIT)
    if data is None:
        return None
    document = documents.read(
        data, documents.RunDocument, name=f"{store.url}/{run}/run.json", limit=documents.RUN_RECORD_LIMIT
    )
    return cast(RunDocument, document)


def list_run_records(store: ObjectStore, warn: Callable[[str, str], None] | None = None) -> list[RunDocument]:
    """The readable run records; one that is invalid (`warn(run, line)` hears why) or names another run is left out."""
    records: list[RunDocument] = []
    for run in store.list_runs():
        if not _RUN_KEY.fullmatch(run):
            continue
        try:
            record = get_run_record(store, run)
        except NewerSchema as error:
            if warn is not None:
                warn(run, f"{error}; skipped")
            continue
        except InvalidDocument as error:
            if warn is not None:
                warn(run, f"{error.name} is not a run record ({error.reason}); skipped")
            continue
        if record is not None and record.get("run") == run:
            records.append(record)
    return records
