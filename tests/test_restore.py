"""Restores are all-or-nothing: DIR holds one whole verified snapshot, or exactly what it held before.

Through the real CLI (`checkpoint-sync RUN --store URL --download DIR`) and
the agent's `--restore-from` (the resume on the machine), against moto's
server over HTTP and `file://` stores.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import boto3
import pytest

from gpurun.errors import BadInput, StoreError
from gpurun.store import open_store, snapshots
from gpurun.store.s3 import MiB, S3Store, parse_url
from gpurun.store.snapshots import StagedFile
from tests.helpers import REPO, gpurun, wait_until


def stage(directory: Path, contents: dict[str, bytes]) -> list[StagedFile]:
    staged = []
    for name, data in sorted(contents.items()):
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        staged.append(StagedFile(name, len(data), hashlib.sha256(data).hexdigest(), str(path)))
    return staged


def tree(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` by relative path, with its content."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    """Anything a restore may have left beside its target."""
    return sorted(p.name for p in parent.iterdir() if "gpurun-restore" in p.name or p.name.endswith(".gpurun-part"))


def snapshot(store, run: str, tmp: Path, data: dict[str, bytes], tag: str) -> dict:
    previous = (
        snapshots.read_manifest(store, run, snapshots.latest(store, run)["seq"])
        if snapshots.latest(store, run)
        else None
    )
    return snapshots.write_snapshot(store, run, stage(tmp / tag, data), previous=previous)


def rewrite_manifest(store, run: str, seq: int, change) -> None:
    """Tamper with a manifest the way a damaged store would (the file store lets a test write anywhere),
    and with its copy beside LATEST where that names the same snapshot: a reader finds the change in either."""
    key = f"{run}/snapshots/{seq:06d}.manifest.json"
    manifest = json.loads(store.get_bytes(key))
    change(manifest)
    copy = store.get_bytes(f"{run}/{snapshots.LATEST_MANIFEST}")
    keys = [key] + ([f"{run}/{snapshots.LATEST_MANIFEST}"] if copy and json.loads(copy)["seq"] == seq else [])
    for each in keys:
        if isinstance(store, S3Store):
            store.client.put_object(Bucket=store.bucket, Key=store.prefix + each, Body=json.dumps(manifest).encode())
        else:
            (store.root / each).write_text(json.dumps(manifest))


OLD = {"a": b"old a" * 10, "b": b"old b", "c/d": b"old d"}
NEW = {"a": b"new a" * 20, "b": b"new b!", "e": b"new e"}


@pytest.fixture
def s3_run(s3_bucket: str, tmp_path: Path) -> tuple[S3Store, str]:
    store = S3Store(s3_bucket)
    snapshot(store, "run", tmp_path, OLD, "one")
    snapshot(store, "run", tmp_path, NEW, "two")
    return store, s3_bucket


def test_sha_mismatch_on_file_2_of_3_leaves_nothing(s3_run, tmp_path: Path) -> None:
    store, url = s3_run
    bucket, prefix = parse_url(url)
    # Same size, other bytes: only the sha256 can tell.
    boto3.client("s3").put_object(Bucket=bucket, Key=f"{prefix}run/snapshots/000002/b", Body=b"evil b")
    target = tmp_path / "restore" / "here"

    done = gpurun("checkpoint-sync", "run", "--store", url, "--download", str(target), check=False)

    assert done.returncode == 1, done.stderr
    assert "b failed verification" in done.stderr and "Traceback" not in done.stderr
    assert "verified" not in done.stdout
    assert not (tmp_path / "restore").exists(), "the parents the restore made are gone too"


def test_into_a_dir_holding_an_older_snapshot(s3_run, tmp_path: Path) -> None:
    store, url = s3_run
    target = tmp_path / "ckpt"
    gpurun("checkpoint-sync", "run", "--store", url, "--download", str(target), "--seq", "1")
    assert tree(target) == OLD

    refused = gpurun("checkpoint-sync", "run", "--store", url, "--download", str(target), check=False)
    assert refused.returncode == 2
    assert "is not empty; add --force" in refused.stderr and "Traceback" not in refused.stderr
    assert tree(target) == OLD and leftovers(tmp_path) == []

    # A corrupt newer snapshot, forced: still exactly the old one, not a mix.
    bucket, prefix = parse_url(url)
    boto3.client("s3").put_object(Bucket=bucket, Key=f"{prefix}run/snapshots/000002/e", Body=b"bad e")
    failed = gpurun("checkpoint-sync", "run", "--store", url, "--download", str(target), "--force", check=False)
    assert failed.returncode == 1 and "e failed verification" in failed.stderr
    assert tree(target) == OLD
    assert leftovers(tmp_path) == []

    boto3.client("s3").put_object(Bucket=bucket, Key=f"{prefix}run/snapshots/000002/e", Body=NEW["e"])
    done = gpurun("checkpoint-sync", "run", "--store", url, "--download", str(target), "--force", "--json")
    info = json.loads(done.stdout)
    assert tree(target) == NEW, "no file of the older snapshot stays beside the new one"
    aside = Path(info["previous"])
    assert aside.parent == tmp_path and aside.name.startswith("ckpt.gpurun-old-")
    assert tree(aside) == OLD, "the old content is moved aside, not lost"
    assert leftovers(tmp_path) == []


def test_extra_files_in_dir_need_force(tmp_path: Path) -> None:
    store_url = f"file://{tmp_path / 'store'}"
    store = open_store(store_url)
    snapshot(store, "run", tmp_path, NEW, "src")
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "notes.txt").write_text("mine")

    refused = gpurun("checkpoint-sync", "run", "--store", store_url, "--download", str(target), check=False)
    assert refused.returncode == 2 and "not empty" in refused.stderr
    assert tree(target) == {"notes.txt": b"mine"}

    done = gpurun("checkpoint-sync", "run", "--store", store_url, "--download", str(target), "--force")
    assert tree(target) == NEW, "a file that is not in the snapshot is not kept silently in DIR"
    assert "previous content" in done.stdout + done.stderr
    asides = [p for p in tmp_path.iterdir() if p.name.startswith("ckpt.gpurun-old-")]
    assert len(asides) == 1 and tree(asides[0]) == {"notes.txt": b"mine"}


def test_the_newest_manifest_comes_from_its_copy_beside_latest(s3_bucket: str, tmp_path: Path) -> None:
    """One round trip to know what to fetch: LATEST and the copy are read together, and the
    snapshot's own manifest is not read at all when the copy names the snapshot LATEST points to."""
    store = S3Store(s3_bucket)
    snapshot(store, "run", tmp_path, OLD, "one")
    written = snapshot(store, "run", tmp_path, NEW, "two")
    assert json.loads(store.get_bytes(f"run/{snapshots.LATEST_MANIFEST}")) == written["manifest"]
    gets: list[str] = []
    store.client.meta.events.register(
        "before-send.s3.GetObject", lambda request, **_: gets.append(request.url.rsplit("/run/", 1)[-1])
    )

    info = snapshots.download_snapshot(store, "run", tmp_path / "out")

    assert info["seq"] == 2 and tree(tmp_path / "out") == NEW
    assert {"LATEST", snapshots.LATEST_MANIFEST} <= set(gets)
    assert not [key for key in gets if key.endswith(".manifest.json") and key != snapshots.LATEST_MANIFEST]


@pytest.mark.parametrize("kind", ["file", "s3"])
@pytest.mark.parametrize("copy", ["stale", "unreadable", "missing", "another run's", "same number, other content"])
def test_a_manifest_copy_that_does_not_fit_is_passed_over(
    kind: str, copy: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    store = S3Store(request.getfixturevalue("s3_bucket")) if kind == "s3" else open_store(f"file://{tmp_path / 's'}")
    first = snapshot(store, "run", tmp_path, OLD, "one")
    second = snapshot(store, "run", tmp_path, NEW, "two")
    key = f"run/{snapshots.LATEST_MANIFEST}"
    if copy == "missing":
        store.delete([key])
    else:
        data = {
            "stale": json.dumps(first["manifest"]).encode(),
            "unreadable": b'{"seq": 2, "files": [',
            "another run's": json.dumps({**second["manifest"], "run": "other"}).encode(),
            "same number, other content": json.dumps({**first["manifest"], "seq": 2}).encode(),
        }[copy]
        store.put_bytes(key, data)

    info = snapshots.download_snapshot(store, "run", tmp_path / "out")

    assert info["seq"] == 2 and tree(tmp_path / "out") == NEW


def test_an_empty_dir_is_filled_without_force(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path / 'store'}")
    snapshot(store, "run", tmp_path, NEW, "src")
    target = tmp_path / "ckpt"
    target.mkdir(mode=0o750)
    info = snapshots.download_snapshot(store, "run", target)
    assert tree(target) == NEW and info["previous"] is None
    assert target.stat().st_mode & 0o777 == 0o750, "the directory keeps its mode"


@pytest.mark.parametrize("kind", ["file", "s3"])
def test_the_size_claim_is_checked(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    store = S3Store(request.getfixturevalue("s3_bucket")) if kind == "s3" else open_store(f"file://{tmp_path / 's'}")
    snapshot(store, "run", tmp_path, {"one": b"x", "other": b"fine"}, "src")
    target = tmp_path / "out"

    def claim(size: int):
        return lambda manifest: [e.update(size=size) for e in manifest["files"] if e["path"] == "one"]

    rewrite_manifest(store, "run", 1, claim(10**15))
    with pytest.raises(StoreError, match="needs 1,000,000,000,000,004 bytes"):
        snapshots.download_snapshot(store, "run", target)
    assert not target.exists() and leftovers(tmp_path) == []

    # A claim the disk could hold is checked against what the store serves.
    rewrite_manifest(store, "run", 1, claim(2))
    with pytest.raises(StoreError, match="the stored object is 1 bytes, the manifest says 2"):
        snapshots.download_snapshot(store, "run", target)
    rewrite_manifest(store, "run", 1, claim(200 * MiB))  # a ranged download on S3
    with pytest.raises(StoreError, match="manifest says|shorter than the manifest"):
        snapshots.download_snapshot(store, "run", target)
    assert not target.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize("order", ["file-then-dir", "dir-then-file"])
def test_a_path_that_is_a_file_in_one_seq_and_a_dir_in_the_next(order: str, tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path / 'store'}")
    as_file = {"model": b"one file", "keep": b"k"}
    as_dir = {"model/weights": b"w", "model/optim": b"o", "keep": b"k"}
    first, second = (as_file, as_dir) if order == "file-then-dir" else (as_dir, as_file)
    snapshot(store, "run", tmp_path, first, "one")
    snapshot(store, "run", tmp_path, second, "two")

    for seq, expected in ((1, first), (2, second)):
        fresh = tmp_path / f"fresh-{seq}"
        snapshots.download_snapshot(store, "run", fresh, seq=seq)
        assert tree(fresh) == expected
    target = tmp_path / "forced"
    snapshots.download_snapshot(store, "run", target, seq=1)
    snapshots.download_snapshot(store, "run", target, seq=2, force=True)
    assert tree(target) == second


def test_a_manifest_that_names_a_path_twice_or_as_file_and_dir_is_refused(tmp_path: Path) -> None:
    store = open_store(f"file://{tmp_path / 'store'}")
    snapshot(store, "run", tmp_path, {"a": b"1", "b": b"2"}, "src")
    rewrite_manifest(store, "run", 1, lambda m: m["files"].append({**m["files"][0], "path": "a/x"}))
    with pytest.raises(StoreError, match="is both a file and the folder"):
        snapshots.download_snapshot(store, "run", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_sigint_during_a_20_file_s3_download(s3_bucket: str, slow_moto_server: str, tmp_path: Path) -> None:
    store = S3Store(s3_bucket)
    # File k's GET is held k x 150 ms by the slow endpoint: files complete one after another.
    data = {f"shard/delay-{k * 150:04d}ms-{k:02d}.bin": os.urandom(2000 + k) for k in range(20)}
    snapshot(store, "run", tmp_path, data, "src")
    target = tmp_path / "ckpt"
    target.mkdir()
    (target / "before.txt").write_text("as it was")
    env = {**os.environ, "AWS_ENDPOINT_URL": slow_moto_server, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, "-m", "gpurun", "checkpoint-sync", "run", "--store", s3_bucket, "--download", str(target)]
        + ["--force"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def some_done() -> bool:
            temps = [p for p in tmp_path.iterdir() if "gpurun-restore" in p.name]
            return bool(temps) and len(list(temps[0].rglob("*.bin"))) >= 5 and child.poll() is None

        wait_until(some_done, timeout=60, interval=0.02, what="the restore to be part-way")
        child.send_signal(signal.SIGINT)
        out, err = child.communicate(timeout=60)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == 130, err
    assert "Traceback" not in err
    assert tree(target) == {"before.txt": b"as it was"}, "DIR is exactly as before"
    assert leftovers(tmp_path) == [], "nothing temporary is left"
    assert not [p for p in tmp_path.iterdir() if ".gpurun-old-" in p.name]


def test_resume_on_the_machine_is_all_or_nothing(tmp_path: Path) -> None:
    """The agent's --restore-from (what launch runs on a machine to resume) has the same guarantees."""
    store_url = f"file://{tmp_path / 'store'}"
    store = open_store(store_url)
    snapshot(store, "run", tmp_path, NEW, "src")
    (tmp_path / "store" / "run" / "snapshots" / "000001" / "e").write_bytes(b"bad e")
    target = tmp_path / "work" / "checkpoints"
    target.mkdir(parents=True)
    (target / "stale.pt").write_text("from before")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    agent = [sys.executable, "-m", "gpurun.agent", "--to", store_url, "--restore-from", "run", "--into", str(target)]

    refused = subprocess.run(agent, env=env, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "not empty" in refused.stderr
    failed = subprocess.run([*agent, "--force"], env=env, capture_output=True, text=True, timeout=60)
    assert failed.returncode == 1 and "e failed verification" in failed.stderr
    assert tree(target) == {"stale.pt": b"from before"}
    assert sorted(p.name for p in target.parent.iterdir()) == ["checkpoints"]

    (tmp_path / "store" / "run" / "snapshots" / "000001" / "e").write_bytes(NEW["e"])
    done = subprocess.run([*agent, "--force"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert tree(target) == NEW


def test_bad_input_for_force(tmp_path: Path) -> None:
    done = gpurun("checkpoint-sync", "run", "--force", check=False)
    assert done.returncode == 2 and "--force goes with --download" in done.stderr
    with pytest.raises(BadInput, match="not a directory"):
        (tmp_path / "file").write_text("x")
        store = open_store(f"file://{tmp_path / 'store'}")
        snapshot(store, "run", tmp_path, NEW, "src")
        snapshots.download_snapshot(store, "run", tmp_path / "file")


def test_big_files_come_as_ranged_parts_hashed_in_order(s3_bucket: str, tmp_path: Path) -> None:
    store = S3Store(s3_bucket)
    data = {"big.bin": os.urandom(3 * MiB + 12345), "small.bin": b"s" * 100}
    snapshot(store, "run", tmp_path, data, "src")
    reader = S3Store(s3_bucket)
    # Parts of 256 KiB, at most two waiting for their turn to be hashed: the window is exercised.
    reader.ranged_threshold, reader.ranged_chunksize, reader.ranged_memory = MiB, 256 * 1024, 512 * 1024
    ranges: list[str] = []
    # before-send sees every request, through the lean path or the client.
    reader.client.meta.events.register(
        "before-send.s3.GetObject",
        lambda request, **_: ranges.extend(str(v) for k, v in request.headers.items() if str(k).lower() == "range"),
    )
    progress: list[int] = []
    info = snapshots.download_snapshot(reader, "run", tmp_path / "out", progress=progress.append)
    assert tree(tmp_path / "out") == data and info["files"] == 2
    part, size = 256 * 1024, len(data["big.bin"])
    expected = {f"bytes={start}-{min(size, start + part) - 1}" for start in range(0, size, part)}
    assert len(ranges) == len(expected) == 13 and set(ranges) == expected  # ceil((3 MiB + 12345) / 256 KiB)
    assert sum(progress) == sum(map(len, data.values()))


def test_requests_in_flight_follow_the_round_trip(s3_bucket: str, slow_moto_server: str, monkeypatch) -> None:
    near = S3Store(s3_bucket)
    assert near.concurrency(2000) == near.max_concurrency, "no request seen yet: the floor"
    near.put_bytes("probe", b"x")
    assert near.concurrency(5) == 5, "never more than the batch"
    monkeypatch.setenv("AWS_ENDPOINT_URL", slow_moto_server)
    far = S3Store(s3_bucket)
    near.put_bytes("far/delay-0150ms", b"x")
    assert far.get_bytes("far/delay-0150ms") == b"x"  # a round trip of 150 ms or more
    assert far.concurrency(2000) == far.max_small_concurrency == 256
    assert far.client.meta.config.max_pool_connections >= 256


def test_one_big_upload_keeps_its_parts_in_flight(s3_bucket: str, tmp_path: Path) -> None:
    store = S3Store(s3_bucket)
    store.multipart_threshold = store.multipart_chunksize = 5 * MiB
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(16 * MiB))
    assert store._requests_for(big.stat().st_size) == 4
    assert store.concurrency(store._requests_for(big.stat().st_size)) == 4, "one file, four parts at once"
