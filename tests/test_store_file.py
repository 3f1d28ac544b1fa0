"""The file:// store: layout, create-only snapshots, LATEST last, prune, verified download."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gpurun.errors import BadInput, NewerSchema, SnapshotConflict, StoreError
from gpurun.store import open_store
from gpurun.store import snapshots as snaps
from gpurun.store.file import FileStore
from gpurun.store.snapshots import StagedFile, sha256_file


def stage(directory: Path, files: dict[str, bytes]) -> list[StagedFile]:
    staged = []
    for name, data in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        staged.append(StagedFile(name, len(data), sha256_file(path), str(path)))
    return staged


@pytest.fixture
def store(tmp_path: Path):
    return open_store(f"file://{tmp_path / 'store'}")


def test_layout_matches_the_design(store, tmp_path: Path) -> None:
    files = stage(tmp_path / "a", {"weights.hdf5": b"w" * 1000, "sub/opt.pt": b"o" * 10})
    info = snaps.write_snapshot(store, "run-1", files, previous=None)
    root = tmp_path / "store" / "run-1"
    assert info["seq"] == 1 and info["files"] == 2 and info["bytes"] == 1010
    assert (root / "snapshots/000001/weights.hdf5").read_bytes() == b"w" * 1000
    assert (root / "snapshots/000001/sub/opt.pt").exists()
    manifest = json.loads((root / "snapshots/000001.manifest.json").read_text())
    assert {f["path"]: f["size"] for f in manifest["files"]} == {"weights.hdf5": 1000, "sub/opt.pt": 10}
    assert json.loads((root / "LATEST").read_text())["seq"] == 1


def test_unchanged_files_are_not_sent_again(store, tmp_path: Path) -> None:
    first = stage(tmp_path / "a", {"big.bin": b"x" * 100_000, "small": b"1"})
    snaps.write_snapshot(store, "r", first, previous=None)
    previous = snaps.read_manifest(store, "r", 1)
    changed = stage(tmp_path / "b", {"small": b"2"})
    again = [StagedFile("big.bin", first[0].size, first[0].sha256, None), *changed]
    info = snaps.write_snapshot(store, "r", again, previous=previous)
    assert info["seq"] == 2
    assert info["sent_bytes"] == 1
    # Not copied either: the manifest names the snapshot whose folder holds it.
    assert not (tmp_path / "store/r/snapshots/000002/big.bin").exists()
    entry = next(e for e in info["manifest"]["files"] if e["path"] == "big.bin")
    assert entry["seq"] == 1 and "seq" not in next(e for e in info["manifest"]["files"] if e["path"] == "small")
    out = tmp_path / "out"
    snaps.download_snapshot(store, "r", out, seq=2)
    assert (out / "big.bin").read_bytes() == b"x" * 100_000 and (out / "small").read_bytes() == b"2"


def test_files_staged_without_a_hash_are_hashed_and_unchanged_ones_still_not_sent(store, tmp_path: Path) -> None:
    # What the agent stages by hard link carries no sha256: write_snapshot computes it.
    def unhashed(directory: Path, files: dict[str, bytes]) -> list[StagedFile]:
        return [StagedFile(f.path, f.size, None, f.local_path) for f in stage(directory, files)]

    snaps.write_snapshot(store, "r", unhashed(tmp_path / "a", {"big.bin": b"x" * 100_000, "new": b"1"}), previous=None)
    previous = snaps.read_manifest(store, "r", 1)
    assert {f["path"]: f["sha256"] for f in previous["files"]} == {
        "big.bin": sha256_file(tmp_path / "a/big.bin"),
        "new": sha256_file(tmp_path / "a/new"),
    }
    # big.bin rewritten with the same bytes (same size: hashed before deciding); new grew.
    again = unhashed(tmp_path / "b", {"big.bin": b"x" * 100_000, "new": b"22"})
    info = snaps.write_snapshot(store, "r", again, previous=previous)
    assert info["sent_bytes"] == 2
    manifest = snaps.read_manifest(store, "r", 2)
    assert {f["path"]: f["sha256"] for f in manifest["files"]}["new"] == sha256_file(tmp_path / "b/new")


def test_snapshot_cut_short_leaves_old_latest_valid(store, tmp_path: Path) -> None:
    snaps.write_snapshot(store, "r", stage(tmp_path / "a", {"w": b"good"}), previous=None)

    class Crash(Exception):
        pass

    original = store.put_bytes

    def crash_on_manifest(key, data, *, if_absent=False):
        if key.endswith(".manifest.json"):
            raise Crash()
        return original(key, data, if_absent=if_absent)

    store.put_bytes = crash_on_manifest
    with pytest.raises(Crash):
        snaps.write_snapshot(store, "r", stage(tmp_path / "b", {"w": b"half-done"}), previous=None)
    store.put_bytes = original
    assert snaps.latest(store, "r")["seq"] == 1
    assert [s["seq"] for s in snaps.list_snapshots(store, "r")] == [1]
    out = tmp_path / "restore"
    snaps.download_snapshot(store, "r", out)
    assert (out / "w").read_bytes() == b"good"
    # The next writer moves past the abandoned number, and prune removes it.
    info = snaps.write_snapshot(store, "r", stage(tmp_path / "c", {"w": b"next"}), previous=None)
    assert info["seq"] == 3
    snaps.prune(store, "r", keep=1)
    assert not (tmp_path / "store/r/snapshots/000002").exists()
    assert snaps.latest(store, "r")["seq"] == 3


def test_snapshot_files_are_never_overwritten(store, tmp_path: Path) -> None:
    files = stage(tmp_path / "a", {"w": b"1"})
    store.put_file("r/snapshots/000001/w", files[0].local_path, if_absent=True)
    with pytest.raises(SnapshotConflict):
        store.put_file("r/snapshots/000001/w", files[0].local_path, if_absent=True)


def test_two_writers_get_different_numbers(store, tmp_path: Path) -> None:
    store.put_bytes("r/snapshots/000001.claim", b"{}", if_absent=True)  # another agent is mid-snapshot
    info = snaps.write_snapshot(store, "r", stage(tmp_path / "a", {"w": b"mine"}), previous=None)
    assert info["seq"] == 2


def test_prune_keeps_newest_and_latest(store, tmp_path: Path) -> None:
    for index in range(5):
        snaps.write_snapshot(store, "r", stage(tmp_path / f"s{index}", {"w": bytes([index]) * 10}), previous=None)
    removed = snaps.prune(store, "r", keep=2)
    assert removed == [1, 2, 3]
    assert [s["seq"] for s in snaps.list_snapshots(store, "r")] == [4, 5]
    assert snaps.latest(store, "r")["seq"] == 5


def test_download_verifies_every_sha256(store, tmp_path: Path) -> None:
    snaps.write_snapshot(store, "r", stage(tmp_path / "a", {"w": b"precious"}), previous=None)
    (tmp_path / "store/r/snapshots/000001/w").write_bytes(b"tampered")
    with pytest.raises(StoreError, match="failed verification"):
        snaps.download_snapshot(store, "r", tmp_path / "out")
    assert not (tmp_path / "out/w").exists()


def test_unknown_seq_and_empty_run_are_bad_input(store, tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="no snapshot"):
        snaps.download_snapshot(store, "nothing", tmp_path / "out")
    snaps.write_snapshot(store, "r", stage(tmp_path / "a", {"w": b"1"}), previous=None)
    with pytest.raises(BadInput, match="no snapshot 9"):
        snaps.download_snapshot(store, "r", tmp_path / "out", seq=9)


def test_unwritable_store_says_so(tmp_path: Path) -> None:
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the store should be")
    with pytest.raises(StoreError, match="cannot write"):
        open_store(f"file://{blocked}/store").check_writable()


def test_latest_never_goes_back_to_an_older_snapshot(tmp_path: Path) -> None:
    """Another writer points LATEST at a newer snapshot between this writer's read of LATEST
    and its write: the write is refused, LATEST read again, and left at the newer one."""
    newer = snaps.latest_bytes({"seq": 9, "at": snaps.now_iso(), "files": 1, "bytes": 1})

    class AnotherWriterFirst(FileStore):
        def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False, if_match: str | None = None) -> str:
            if key.endswith("/LATEST") and if_match is not None and data != newer:
                super().put_bytes(key, newer)
            return super().put_bytes(key, data, if_absent=if_absent, if_match=if_match)

    store = AnotherWriterFirst(f"file://{tmp_path / 'store'}")
    first = snaps.write_snapshot(store, "r", stage(tmp_path / "a", {"w": b"1"}), previous=None)
    second = snaps.write_snapshot(store, "r", stage(tmp_path / "b", {"w": b"2"}), previous=first["manifest"])
    assert second["seq"] == 2
    assert snaps.latest(store, "r")["seq"] == 9
    assert snaps.read_manifest(store, "r", 2) is not None  # the snapshot itself is complete


def test_a_latest_written_by_a_newer_gpurun_is_never_overwritten(store, tmp_path: Path) -> None:
    first = snaps.write_snapshot(store, "r", stage(tmp_path / "a", {"w": b"1"}), previous=None)
    newer = json.dumps({"version": 99, "seq": 1, "layout": "reshaped"}).encode()
    store.put_bytes("r/LATEST", newer)
    with pytest.raises(NewerSchema, match="upgrade gpurun"):
        snaps.write_snapshot(store, "r", stage(tmp_path / "b", {"w": b"2"}), previous=first["manifest"])
    assert store.get_bytes("r/LATEST") == newer
