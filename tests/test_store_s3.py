"""The s3:// store through the real snapshot functions, against moto's server over real HTTP.

moto in-process (`mock_aws`) is used only where a fault must be injected or a
bucket's settings inspected.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.parse
from pathlib import Path

import boto3
import pytest
from botocore.awsrequest import AWSResponse

from gpurun.errors import BadInput, SnapshotConflict, StoreError
from gpurun.store import open_store, snapshots
from gpurun.store.file import FileStore
from gpurun.store.s3 import MiB, S3Store, create_bucket, parse_url
from gpurun.store.snapshots import StagedFile

REPO = Path(__file__).resolve().parent.parent


def stage(directory: Path, contents: dict[str, bytes]) -> list[StagedFile]:
    """Write `contents` under `directory` and describe them as a snapshot's staged files."""
    staged = []
    for name, data in sorted(contents.items()):
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        staged.append(StagedFile(name, len(data), hashlib.sha256(data).hexdigest(), str(path)))
    return staged


def small_store(url: str) -> S3Store:
    """A store whose multipart threshold is S3's minimum part size, so multipart paths run on small files."""
    store = S3Store(url)
    store.multipart_threshold = store.multipart_chunksize = 5 * MiB
    store.copy_threshold = store.copy_chunksize = 5 * MiB
    return store


class Recorder:
    """Every S3 request a store sends, through its boto3 client or its lean path (both emit
    before-send on the client): operation, key, headers and query (names lower-cased), body bytes."""

    def __init__(self, store: S3Store) -> None:
        self.calls: list[tuple[str, str, dict]] = []
        self.body_bytes: list[tuple[str, int]] = []
        self._lock = threading.Lock()
        self._bucket = store.bucket
        store.client.meta.events.register("before-send.s3.*", self._send)

    def _send(self, request, event_name: str, **kwargs) -> None:
        url = urllib.parse.urlsplit(request.url)
        path = urllib.parse.unquote(url.path).lstrip("/")
        key = path[len(self._bucket) + 1 :] if path.startswith(self._bucket + "/") else path  # path-style URLs
        headers = {
            str(name).lower(): value.decode() if isinstance(value, bytes) else str(value)
            for name, value in request.headers.items()
        }
        details = {**headers, **dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))}
        with self._lock:
            self.calls.append((event_name.rsplit(".", 1)[-1], key, details))
            if request.method in ("PUT", "POST"):
                body = request.body
                size = len(body) if isinstance(body, bytes) else int(headers.get("content-length") or 0)
                self.body_bytes.append((request.url, size))

    def ops(self, key_part: str = "") -> list[str]:
        return [name for name, key, _params in self.calls if key_part in key]


def contents(seed: int, names: list[str], size: tuple[int, int] = (100, 5000)) -> dict[str, bytes]:
    rng = random.Random(seed)
    return {name: rng.randbytes(rng.randint(*size)) for name in names}


# -- layout, write, restore -------------------------------------------------------


def test_write_restore_verify(s3_bucket: str, tmp_path: Path) -> None:
    store = small_store(s3_bucket)
    data = contents(1, ["model.pt", "optim/state.bin", "logs/step.txt"])
    data["big/weights.h5"] = random.Random(2).randbytes(11 * MiB)  # three multipart parts
    data["empty.marker"] = b""
    files = stage(tmp_path / "staged", data)
    progress: list[int] = []

    result = snapshots.write_snapshot(store, "run-a", files, previous=None, progress=progress.append)

    assert result["seq"] == 1 and result["files"] == 5
    assert result["sent_bytes"] == result["bytes"] == sum(map(len, data.values())) == sum(progress)
    bucket, prefix = parse_url(s3_bucket)
    keys = {
        item["Key"]
        for item in boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]
        if "/snapshots/000001/" in item["Key"]
    }
    # File names are kept: `aws s3 ls` shows the weights where a person expects them.
    assert keys == {f"ckpt/run-a/snapshots/000001/{name}" for name in data}
    assert json.loads(store.get_bytes("run-a/LATEST"))["seq"] == 1

    restored = tmp_path / "restored"
    assert snapshots.download_snapshot(store, "run-a", restored)["seq"] == 1
    for name, blob in data.items():
        assert (restored / name).read_bytes() == blob
    assert not list(restored.rglob("*.gpurun-part"))
    assert snapshots.list_snapshots(store, "run-a") == [
        {"seq": 1, "at": result["at"], "files": 5, "bytes": result["bytes"]}
    ]


RESTORE_IN_A_FRESH_PROCESS = r"""
import json, sys
from gpurun.store import snapshots
from gpurun.store.s3 import S3Store
info = snapshots.download_snapshot(S3Store(sys.argv[1]), "run-a", sys.argv[2])
print(json.dumps({"seq": info["seq"], "loaded": sorted(m for m in ("boto3", "s3transfer") if m in sys.modules)}))
"""


def test_a_restore_starts_without_boto3_or_s3transfer(s3_bucket: str, tmp_path: Path) -> None:
    """Importing them costs a restore 0.05 s before its first request (docs/benchmarks.md);
    botocore and the lean path are all it needs."""
    data = contents(3, ["model.pt", "optim/state.bin"])
    snapshots.write_snapshot(S3Store(s3_bucket), "run-a", stage(tmp_path / "staged", data), previous=None)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    restored = tmp_path / "restored"

    done = subprocess.run(
        [sys.executable, "-c", RESTORE_IN_A_FRESH_PROCESS, s3_bucket, str(restored)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"seq": 1, "loaded": []}
    assert {name: (restored / name).read_bytes() for name in data} == data


def test_open_store_passes_options(s3_bucket: str, moto_server: str) -> None:
    store = open_store(s3_bucket + "/", region="us-east-1", endpoint_url=moto_server)
    assert isinstance(store, S3Store)
    assert store.url == s3_bucket and store.prefix == "ckpt/"
    store.check_writable()
    assert store.list("") == []  # the probe object is gone again


def test_endpoint_comes_from_aws_endpoint_url(s3_bucket: str, moto_server: str) -> None:
    assert os.environ["AWS_ENDPOINT_URL"] == moto_server
    assert S3Store(s3_bucket).client.meta.endpoint_url == moto_server


def test_corrupted_object_fails_verification(s3_bucket: str, tmp_path: Path) -> None:
    store = S3Store(s3_bucket)
    snapshots.write_snapshot(store, "run", stage(tmp_path / "s", {"w.bin": b"good" * 100}), previous=None)
    bucket, _ = parse_url(s3_bucket)
    boto3.client("s3").put_object(Bucket=bucket, Key="ckpt/run/snapshots/000001/w.bin", Body=b"evil" * 100)
    with pytest.raises(StoreError, match="failed verification"):
        snapshots.download_snapshot(store, "run", tmp_path / "out")
    assert not (tmp_path / "out" / "w.bin").exists()


# -- unchanged files are not sent again ---------------------------------------------


def test_unchanged_snapshot_sends_zero_bytes(s3_bucket: str, tmp_path: Path) -> None:
    store = small_store(s3_bucket)
    data = contents(3, [f"shard-{i}.bin" for i in range(12)])
    data["big.bin"] = random.Random(4).randbytes(6 * MiB)  # a multipart object, copied in parts
    first = snapshots.write_snapshot(store, "run", stage(tmp_path / "a", data), previous=None)
    previous = snapshots.read_manifest(store, "run", first["seq"])
    unchanged = [StagedFile(e["path"], e["size"], e["sha256"], None) for e in previous["files"]]

    recorder = Recorder(store)
    second = snapshots.write_snapshot(store, "run", unchanged, previous=previous)

    assert second["seq"] == 2 and second["sent_bytes"] == 0 and second["bytes"] == first["bytes"]
    # No request per file: the manifest refers to the objects where snapshot 1 wrote them.
    assert recorder.ops("/snapshots/000002/") == []
    assert not {"CopyObject", "UploadPartCopy", "HeadObject"} & set(recorder.ops()), recorder.ops()
    assert len(recorder.calls) <= 8, recorder.ops()
    assert {e["seq"] for e in second["manifest"]["files"]} == {1}
    out = tmp_path / "restored"
    snapshots.download_snapshot(store, "run", out, seq=2)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == data


def test_only_changed_files_are_uploaded(s3_bucket: str, tmp_path: Path) -> None:
    store = S3Store(s3_bucket)
    names = [f"f{i}" for i in range(6)]
    snapshots.write_snapshot(store, "run", stage(tmp_path / "a", contents(5, names)), previous=None)
    previous = snapshots.read_manifest(store, "run", 1)
    changed = {"f2": b"new content"}
    files = [
        StagedFile(e["path"], e["size"], e["sha256"], None) for e in previous["files"] if e["path"] not in changed
    ] + stage(tmp_path / "b", changed)
    recorder = Recorder(store)
    result = snapshots.write_snapshot(store, "run", files, previous=previous)
    assert result["sent_bytes"] == len(b"new content")
    puts = [key for name, key, _ in recorder.calls if name == "PutObject" and "/snapshots/000002/" in key]
    assert puts == ["ckpt/run/snapshots/000002/f2"]


# -- conditional writes -----------------------------------------------------------


def test_conditional_writes_refuse_a_second_writer(s3_bucket: str, tmp_path: Path) -> None:
    first, second = small_store(s3_bucket), small_store(s3_bucket)
    recorder = Recorder(second)
    first.put_bytes("run/snapshots/000001.claim", b"writer 1", if_absent=True)
    with pytest.raises(SnapshotConflict, match="already exists"):
        second.put_bytes("run/snapshots/000001.claim", b"writer 2", if_absent=True)
    assert first.get_bytes("run/snapshots/000001.claim") == b"writer 1"
    puts = [params for name, _key, params in recorder.calls if name == "PutObject"]
    assert puts[-1].get("if-none-match") == "*"

    small = tmp_path / "small.bin"
    small.write_bytes(b"x" * 1000)
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(11 * MiB))
    first.put_file("run/snapshots/000001/w.bin", str(small), if_absent=True)
    first.put_file("run/snapshots/000001/big.bin", str(big), if_absent=True)
    recorder.calls.clear()
    with pytest.raises(SnapshotConflict):
        second.put_file("run/snapshots/000001/w.bin", str(big), if_absent=True)
    with pytest.raises(SnapshotConflict):
        second.put_files([("run/snapshots/000001/big.bin", str(small))], if_absent=True)
    with pytest.raises(SnapshotConflict):
        second.put_file("run/snapshots/000001/big.bin", str(big), if_absent=True)  # multipart: refused at Complete
    completes = [params for name, _key, params in recorder.calls if name == "CompleteMultipartUpload"]
    assert completes and all(params.get("if-none-match") == "*" for params in completes)
    with pytest.raises(SnapshotConflict):
        second.copy("run/snapshots/000001/w.bin", "run/snapshots/000001/big.bin")
    assert first.size_of("run/snapshots/000001/w.bin") == 1000
    assert first.size_of("run/snapshots/000001/big.bin") == 11 * MiB

    # Without if_absent an object is simply replaced (LATEST, run.json).
    second.put_bytes("run/LATEST", b"1")
    second.put_bytes("run/LATEST", b"2")
    assert first.get_bytes("run/LATEST") == b"2"


def test_two_agents_never_share_a_snapshot(s3_bucket: str, tmp_path: Path) -> None:
    results: list[dict] = []
    errors: list[BaseException] = []

    def agent(index: int) -> None:
        store = S3Store(s3_bucket)
        try:
            for step in range(3):
                data = contents(index * 10 + step, ["w.bin", "opt.bin"])
                results.append(
                    snapshots.write_snapshot(
                        store, "run", stage(tmp_path / f"{index}-{step}", data), previous=None, writer=str(index)
                    )
                )
        except BaseException as error:  # noqa: BLE001 - re-raised in the test thread
            errors.append(error)

    threads = [threading.Thread(target=agent, args=(index,)) for index in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    seqs = sorted(result["seq"] for result in results)
    # Nine snapshots, nine numbers. A number may be skipped: a writer whose listing already
    # shows a higher claim gives its own back (numbers grow with time, so LATEST can follow).
    assert len(set(seqs)) == len(seqs) == 9, seqs
    store = S3Store(s3_bucket)
    assert json.loads(store.get_bytes("run/LATEST"))["seq"] == max(seqs)
    for seq in seqs:
        snapshots.download_snapshot(store, "run", tmp_path / f"out-{seq}", seq=seq)


class _Raw:
    def __init__(self, body: bytes) -> None:
        self._body = body

    def stream(self, **kwargs):
        yield self._body


def test_retry_after_a_lost_response_is_not_a_conflict(s3_bucket: str) -> None:
    """The PUT lands but the client sees a 500; the retry gets 412 and must recognise its own write."""
    import urllib3

    store = S3Store(s3_bucket)
    http = urllib3.PoolManager()
    dropped = []

    def lose_first_response(request, **kwargs):
        if request.method == "PUT" and request.url.endswith("/claim-me") and not dropped:
            body = request.body if isinstance(request.body, bytes) else request.body.read()
            landed = http.request("PUT", request.url, body=body, headers=dict(request.headers))
            dropped.append(landed.status)
            return AWSResponse(request.url, 500, {}, _Raw(b"<Error><Code>InternalError</Code></Error>"))
        return None

    store.client.meta.events.register_first("before-send.s3.PutObject", lose_first_response)
    store.put_bytes("claim-me", b"mine", if_absent=True)
    assert dropped == [200]
    assert store.get_bytes("claim-me") == b"mine"
    other = S3Store(s3_bucket)
    with pytest.raises(SnapshotConflict):
        other.put_bytes("claim-me", b"theirs", if_absent=True)


# -- retention ---------------------------------------------------------------------


def test_prune_keeps_the_newest_and_latest(s3_bucket: str, tmp_path: Path) -> None:
    store = S3Store(s3_bucket)
    previous = None
    for step in range(5):
        data = {"fixed.bin": b"same every time", "step.bin": str(step).encode() * 50}
        files = stage(tmp_path / str(step), data)
        result = snapshots.write_snapshot(store, "run", files, previous=previous)
        previous = snapshots.read_manifest(store, "run", result["seq"])
    # An abandoned half snapshot below LATEST (a writer killed mid-way) goes too.
    store.put_bytes("run/snapshots/000003/orphan.bin", b"x")

    assert snapshots.prune(store, "run", keep=2) == [1, 2, 3]
    assert [s["seq"] for s in snapshots.list_snapshots(store, "run")] == [4, 5]
    # fixed.bin never changed: snapshots 4 and 5 refer to snapshot 1's object, which stays.
    left = {obj.key for obj in store.list("run/snapshots/") if obj.key.split("/")[2][:6] not in ("000004", "000005")}
    assert left == {"run/snapshots/000001/fixed.bin"}
    out = tmp_path / "out"
    snapshots.download_snapshot(store, "run", out)
    assert (out / "step.bin").read_bytes() == b"4" * 50
    # keep=1 never removes what LATEST points to, even when the newest manifest is above it.
    assert snapshots.prune(store, "run", keep=1) == [4]
    assert [s["seq"] for s in snapshots.list_snapshots(store, "run")] == [5]


def test_prune_never_deletes_an_object_a_kept_manifest_refers_to(s3_bucket: str, tmp_path: Path) -> None:
    store = S3Store(s3_bucket)
    previous = None
    frozen = {f"frozen/{i}.bin": bytes([i]) * 300 for i in range(3)}
    for step in range(4):
        data = {**frozen, "step.bin": str(step).encode() * 50}
        result = snapshots.write_snapshot(store, "run", stage(tmp_path / str(step), data), previous=previous)
        previous = result["manifest"]
        snapshots.prune(store, "run", keep=1)
        # Each LATEST restores whole after every prune, its unchanged files read from snapshot 1's folder.
        out = tmp_path / f"out-{step}"
        snapshots.download_snapshot(store, "run", out)
        assert {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()} == data
    assert {e["path"]: e.get("seq") for e in previous["files"]} == {**dict.fromkeys(frozen, 1), "step.bin": None}

    # Once a frozen file changes and the snapshots naming the old object are pruned, the object goes too.
    data = {**frozen, "frozen/0.bin": b"thawed", "step.bin": b"last"}
    snapshots.write_snapshot(store, "run", stage(tmp_path / "last", data), previous=previous)
    snapshots.prune(store, "run", keep=1)
    keys = {obj.key for obj in store.list("run/snapshots/000001/")}
    assert keys == {"run/snapshots/000001/frozen/1.bin", "run/snapshots/000001/frozen/2.bin"}


def test_an_unchanged_snapshot_costs_a_few_requests_not_one_per_file(s3_bucket: str, tmp_path: Path) -> None:
    store = S3Store(s3_bucket)
    data = contents(9, [f"shard-{i % 7}/t-{i:04d}.bin" for i in range(300)], size=(10, 200))
    first = snapshots.write_snapshot(store, "run", stage(tmp_path / "a", data), previous=None)
    unchanged = [StagedFile(e["path"], e["size"], e["sha256"], None) for e in first["manifest"]["files"]]
    recorder = Recorder(store)
    second = snapshots.write_snapshot(store, "run", unchanged, previous=first["manifest"])
    # list used numbers, claim, list snapshot 1's folder, manifest, read LATEST, write LATEST and the manifest's copy
    assert len(recorder.calls) <= 7, recorder.ops()
    # The used numbers come from one level of snapshots/, not from every file in its folders.
    numbers = [params for name, key, params in recorder.calls if name == "ListObjectsV2" and "delimiter" in params]
    assert [params["prefix"] for params in numbers] == [store.prefix + "run/snapshots/"], recorder.calls
    assert second["sent_bytes"] == 0
    snapshots.download_snapshot(store, "run", tmp_path / "out")
    assert len(list((tmp_path / "out").rglob("*.bin"))) == 300


def test_a_new_snapshot_costs_one_request_per_file_and_no_listing_of_what_it_sent(
    s3_bucket: str, tmp_path: Path
) -> None:
    store = S3Store(s3_bucket)
    data = contents(4, [f"shard-{i % 5}/t-{i:04d}.bin" for i in range(200)], size=(10, 300))
    recorder = Recorder(store)
    snapshots.write_snapshot(store, "run", stage(tmp_path / "a", data), previous=None)
    ops = recorder.ops()
    assert ops.count("PutObject") == 200 + 4, ops  # the files, the claim, the manifest, LATEST and its copy
    # The one listing finds the free snapshot number; every PUT's answer confirmed its file.
    assert ops.count("ListObjectsV2") == 1, ops
    snapshots.download_snapshot(store, "run", tmp_path / "out")
    out = tmp_path / "out"
    assert {path.relative_to(out).as_posix(): path.read_bytes() for path in out.rglob("*.bin")} == data


@pytest.mark.parametrize("size", [100, 6 * MiB], ids=["lean PUT", "multipart"])
def test_a_file_that_grew_after_staging_is_refused_before_the_manifest(
    s3_bucket: str, tmp_path: Path, size: int
) -> None:
    store = small_store(s3_bucket)
    staged = stage(tmp_path / "a", {"w.bin": b"x" * size})
    Path(staged[0].local_path).write_bytes(b"x" * (size + 50))  # the training process wrote more after staging
    stale = [StagedFile(staged[0].path, staged[0].size, None, staged[0].local_path)]
    with pytest.raises(StoreError, match="w.bin"):
        snapshots.write_snapshot(store, "run", stale, previous=None)
    assert snapshots.latest(store, "run") is None
    assert store.get_bytes("run/snapshots/000001.manifest.json") is None


def test_a_multipart_file_is_confirmed_by_its_upload_not_listed_again(s3_bucket: str, tmp_path: Path) -> None:
    store = small_store(s3_bucket)
    data = {"model.bin": random.Random(3).randbytes(11 * MiB), "step.txt": b"7"}
    recorder = Recorder(store)
    snapshots.write_snapshot(store, "run", stage(tmp_path / "a", data), previous=None)
    ops = recorder.ops()
    assert ops.count("UploadPart") == 3 and ops.count("CompleteMultipartUpload") == 1, ops
    # What S3 checks every part's bytes against before it answers.
    parts = [params for name, _key, params in recorder.calls if name == "UploadPart"]
    assert all(params.get("x-amz-checksum-crc32") for params in parts), parts
    # The one listing finds the free snapshot number; the parts' answers confirmed the big file.
    assert ops.count("ListObjectsV2") == 1, ops
    snapshots.download_snapshot(store, "run", tmp_path / "out")
    assert (tmp_path / "out/model.bin").read_bytes() == data["model.bin"]


def claim_requests(recorder: Recorder) -> list[tuple[str, str]]:
    """(operation, snapshot number) of every request on a claim, in order."""
    return [
        (name, key.rsplit("/", 1)[-1][:6])
        for name, key, _params in recorder.calls
        if key.endswith(".claim") or (name == "DeleteObjects")
    ]


def test_the_number_after_the_previous_snapshot_is_claimed_only_when_no_higher_one_is_in_use(
    s3_bucket: str, tmp_path: Path
) -> None:
    store = S3Store(s3_bucket)
    manifests = []
    for index in range(3):
        staged = stage(tmp_path / f"v{index}", {"w.bin": bytes([index]) * 10})
        manifests.append(
            snapshots.write_snapshot(store, "run", staged, previous=manifests[-1] if manifests else None)["manifest"]
        )
    assert [m["seq"] for m in manifests] == [1, 2, 3]
    # The usual case: the number after the previous snapshot, claimed beside the one listing.
    recorder = Recorder(store)
    fourth = snapshots.write_snapshot(store, "run", stage(tmp_path / "d", {"w.bin": b"d"}), previous=manifests[-1])
    assert fourth["seq"] == 4
    assert claim_requests(recorder) == [("PutObject", "000004")], recorder.calls
    # A writer whose previous snapshot is 1 (another writer made 2 to 4) tries 2: held, so 5.
    recorder.calls.clear()
    fifth = snapshots.write_snapshot(store, "run", stage(tmp_path / "e", {"w.bin": b"e"}), previous=manifests[0])
    assert fifth["seq"] == 5
    # (The HEAD asks whether the claim that refused ours is our own earlier attempt.)
    assert claim_requests(recorder) == [("PutObject", "000002"), ("HeadObject", "000002"), ("PutObject", "000005")]
    # Snapshot 1's claim is gone (pruned), its manifest is not: the free-looking guess 1 is
    # given back once the listing shows 1 to 5 in use, and 6 is taken.
    store.delete(["run/snapshots/000001.claim"])
    recorder.calls.clear()
    sixth = snapshots.write_snapshot(store, "run", stage(tmp_path / "f", {"w.bin": b"f"}), previous=None)
    assert sixth["seq"] == 6
    assert [op for op, _seq in claim_requests(recorder)] == ["PutObject", "DeleteObjects", "PutObject"], recorder.calls
    assert store.size_of("run/snapshots/000001.claim") is None
    assert snapshots.latest(store, "run")["seq"] == 6
    assert [s["seq"] for s in snapshots.list_snapshots(store, "run")] == [1, 2, 3, 4, 5, 6]


def test_a_claim_another_writer_overwrote_is_not_taken_for_ours(s3_bucket: str, tmp_path: Path) -> None:
    """On a store that ignores create-only writes, two writers can both "claim" a number: the
    listing shows whose claim is there now, by its tag, and the number is left to that one."""
    store = S3Store(s3_bucket)
    first = snapshots.write_snapshot(store, "run", stage(tmp_path / "a", {"w.bin": b"a"}), previous=None)
    other = boto3.client("s3")
    bucket, prefix = parse_url(s3_bucket)

    ours_written = threading.Event()

    def ignore_create_only(request, **kwargs) -> None:
        request.headers.pop("If-None-Match", None)

    def claim_written(http_response, **kwargs) -> None:
        ours_written.set()

    def other_writer_claims_after_us(request, **kwargs) -> None:
        # Between our claim and our listing, the other writer's claim replaces ours.
        if "delimiter=" in request.url:
            assert ours_written.wait(timeout=60)
            other.put_object(Bucket=bucket, Key=f"{prefix}run/snapshots/000002.claim", Body=b'{"writer": "other"}')

    store.client.meta.events.register("before-send.s3.PutObject", ignore_create_only)
    store.client.meta.events.register("after-call.s3.PutObject", claim_written)
    store.client.meta.events.register("before-send.s3.ListObjectsV2", other_writer_claims_after_us)
    second = snapshots.write_snapshot(store, "run", stage(tmp_path / "b", {"w.bin": b"b"}), previous=first["manifest"])
    assert second["seq"] == 3
    assert store.get_bytes("run/snapshots/000002.claim") == b'{"writer": "other"}'  # theirs, left alone
    assert store.size_of("run/snapshots/000002.manifest.json") is None


def test_latest_never_goes_back_to_an_older_snapshot(s3_bucket: str, tmp_path: Path) -> None:
    """Another writer points LATEST at a newer snapshot between this writer's read of LATEST
    and its write: S3 refuses the write (If-Match), LATEST is read again and left at the newer one."""
    store = S3Store(s3_bucket)
    first = snapshots.write_snapshot(store, "run", stage(tmp_path / "a", {"w.bin": b"1"}), previous=None)
    bucket, prefix = parse_url(s3_bucket)
    other = boto3.client("s3")
    newer = snapshots.latest_bytes({"seq": 9, "at": snapshots.now_iso(), "files": 1, "bytes": 1})

    def another_writer_first(request, **kwargs) -> None:
        if request.url.endswith("/LATEST") and request.method == "PUT" and "If-Match" in request.headers:
            other.put_object(Bucket=bucket, Key=f"{prefix}run/LATEST", Body=newer)

    store.client.meta.events.register("before-send.s3.PutObject", another_writer_first)
    recorder = Recorder(store)
    second = snapshots.write_snapshot(store, "run", stage(tmp_path / "b", {"w.bin": b"2"}), previous=first["manifest"])
    assert second["seq"] == 2
    # Read beside the manifest, refused once, read again; not written a second time.
    assert [name for name, key, _p in recorder.calls if key.endswith("LATEST")] == [
        "GetObject",
        "PutObject",
        "GetObject",
    ]
    assert snapshots.latest(store, "run")["seq"] == 9
    assert store.get_bytes("run/snapshots/000002.manifest.json") is not None  # the snapshot itself is complete


def test_a_late_snapshot_below_latest_leaves_the_manifest_copy_alone(s3_bucket: str, tmp_path: Path) -> None:
    """An old machine's final sync that finishes after its replacement's newer snapshot: LATEST
    stays, and so does the copy of the newer manifest beside it."""
    store = S3Store(s3_bucket)
    first = snapshots.write_snapshot(store, "run", stage(tmp_path / "a", {"w.bin": b"1"}), previous=None)
    newer = {"seq": 9, "at": snapshots.now_iso(), "files": 1, "bytes": 1}
    store.put_bytes("run/LATEST", snapshots.latest_bytes(newer))
    copy_of_newer = json.dumps({**first["manifest"], **newer, "files": first["manifest"]["files"]}).encode()
    store.put_bytes(f"run/{snapshots.LATEST_MANIFEST}", copy_of_newer)

    late = snapshots.write_snapshot(store, "run", stage(tmp_path / "b", {"w.bin": b"2"}), previous=first["manifest"])

    assert late["seq"] == 2 and snapshots.latest(store, "run")["seq"] == 9
    assert store.get_bytes(f"run/{snapshots.LATEST_MANIFEST}") == copy_of_newer


# -- runs listing -------------------------------------------------------------------


def test_list_runs_one_level(s3_bucket: str, tmp_path: Path) -> None:
    store = S3Store(s3_bucket)
    for run in ("alpha-1", "beta-2"):
        snapshots.put_run_record(store, run, {"run": run, "state": "running"})
        snapshots.write_snapshot(store, run, stage(tmp_path / run, {"w": b"1"}), previous=None)
    store.put_bytes("not-a-run/other.txt", b"x")
    recorder = Recorder(store)
    assert store.list_runs() == ["alpha-1", "beta-2", "not-a-run"]
    assert [params.get("delimiter") for name, _k, params in recorder.calls if name == "ListObjectsV2"] == ["/"]
    assert sorted(r["run"] for r in snapshots.list_run_records(store)) == ["alpha-1", "beta-2"]

    files = FileStore(f"file://{tmp_path / 'fs'}")
    snapshots.put_run_record(files, "gamma-3", {"run": "gamma-3"})
    assert files.list_runs() == ["gamma-3"]
    assert [r["run"] for r in snapshots.list_run_records(files)] == ["gamma-3"]


# -- errors a person can act on -------------------------------------------------------


@pytest.mark.parametrize("url", ["s3://", "s3:///prefix", "s3://bad bucket/x"])
def test_bad_urls(url: str) -> None:
    with pytest.raises(BadInput, match="s3://"):
        S3Store(url)


def test_missing_bucket_is_one_clear_line(moto_server: str, monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    store = S3Store("s3://gpurun-no-such-bucket/ckpt")
    with pytest.raises(StoreError) as raised:
        store.check_writable()
    message = str(raised.value)
    assert "\n" not in message and "bucket gpurun-no-such-bucket does not exist" in message
    with pytest.raises(StoreError, match="bucket gpurun-no-such-bucket does not exist") as raised:
        snapshots.write_snapshot(store, "run", stage(tmp_path, {"w": b"1"}), previous=None)
    assert "\n" not in str(raised.value)
    with pytest.raises(StoreError, match="does not exist"):
        snapshots.latest(store, "run")


def test_no_credentials_is_one_clear_line(moto_server: str, monkeypatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(StoreError, match="no AWS credentials found") as raised:
        S3Store("s3://some-bucket/ckpt").check_writable()
    assert "\n" not in str(raised.value) and "s3://some-bucket/ckpt" in str(raised.value)


def test_unknown_profile() -> None:
    with pytest.raises(StoreError, match="profile 'nobody' not found"):
        S3Store("s3://some-bucket/ckpt", profile="nobody")


def _deny(operation: str):
    def handler(**kwargs):
        error = {"Error": {"Code": "AccessDenied", "Message": "Access Denied"}}
        return AWSResponse("https://s3.amazonaws.com", 403, {}, None), error

    return f"before-call.s3.{operation}", handler


def test_access_denied_is_one_clear_line() -> None:
    from moto import mock_aws

    with mock_aws():
        boto3.client("s3").create_bucket(Bucket="theirs")
        store = S3Store("s3://theirs/ckpt")
        store.client.meta.events.register(*_deny("PutObject"))
        with pytest.raises(StoreError) as raised:
            store.check_writable()
        message = str(raised.value)
        assert message.startswith("access denied writing s3://theirs/ckpt/.gpurun-write-probe-")
        assert "s3:PutObject" in message and "\n" not in message
        with pytest.raises(StoreError, match="access denied writing s3://theirs/ckpt/run/snapshots/000001.claim"):
            snapshots.write_snapshot(store, "run", [], previous=None)


def test_create_bucket_is_private_and_encrypted() -> None:
    from moto import mock_aws

    with mock_aws():
        assert create_bucket("s3://gpurun-new-bucket/ckpt", "eu-west-1") is True
        client = boto3.client("s3", region_name="eu-west-1")
        assert client.get_bucket_location(Bucket="gpurun-new-bucket")["LocationConstraint"] == "eu-west-1"
        block = client.get_public_access_block(Bucket="gpurun-new-bucket")["PublicAccessBlockConfiguration"]
        assert all(block.values()) and len(block) == 4
        rule = client.get_bucket_encryption(Bucket="gpurun-new-bucket")["ServerSideEncryptionConfiguration"]["Rules"][0]
        assert rule["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"
        lifecycle = client.get_bucket_lifecycle_configuration(Bucket="gpurun-new-bucket")["Rules"]
        assert lifecycle[0]["AbortIncompleteMultipartUpload"]["DaysAfterInitiation"] == 7
        tags = client.get_bucket_tagging(Bucket="gpurun-new-bucket")["TagSet"]
        assert {"Key": "gpurun:managed", "Value": "true"} in tags
        # Asking again is fine and changes nothing; us-east-1 needs no location constraint.
        assert create_bucket("s3://gpurun-new-bucket", "eu-west-1") is False
        assert create_bucket("s3://gpurun-virginia", "us-east-1") is True
        S3Store("s3://gpurun-virginia/x", region="us-east-1").check_writable()


# -- crash consistency ----------------------------------------------------------------

# A zygote that imports everything once and forks one writer per line it reads
# ("<seed> <snapshots to write>"), so 50+ kills cost milliseconds each instead
# of an interpreter start.
WRITER = r"""
import hashlib, os, random, signal, sys
from gpurun.store import snapshots
from gpurun.store.s3 import S3Store

url, run, root = sys.argv[1:4]
store = S3Store(url)
store.multipart_threshold = store.multipart_chunksize = 5 << 20
store.copy_threshold = store.copy_chunksize = 5 << 20
signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # killed writers are reaped at once


def write_snapshots(seed, count):
    rng = random.Random(seed)
    for step in range(count):
        pointer = snapshots.latest(store, run)
        previous = snapshots.read_manifest(store, run, pointer["seq"]) if pointer else None
        old = {entry["path"]: entry for entry in previous["files"]} if previous else {}
        names = ["model.pt", "optimizer/state.bin", "step.txt"] + [f"extra/{i}.bin" for i in range(rng.randint(0, 4))]
        files = []
        for name in names:
            if name in old and rng.random() < 0.5:
                entry = old[name]
                files.append(snapshots.StagedFile(name, entry["size"], entry["sha256"], None))
                continue
            # model.pt is sometimes big enough for a multipart upload (and a multipart copy later).
            big = name == "model.pt" and rng.random() < 0.4
            size = rng.randint(5 << 20, 6 << 20) if big else rng.randint(10, 30000)
            data = rng.randbytes(size)
            path = os.path.join(root, f"{seed}-{step}-{name.replace('/', '_')}")
            with open(path, "wb") as handle:
                handle.write(data)
            # Half arrive hashed (copied to staging), half not (held by link: hashed during the upload).
            digest = hashlib.sha256(data).hexdigest() if rng.random() < 0.5 else None
            files.append(snapshots.StagedFile(name, size, digest, path))
        snapshots.write_snapshot(store, run, files, previous=previous, writer=str(os.getpid()))
        snapshots.prune(store, run, keep=3)


for line in sys.stdin:
    pid = os.fork()
    if pid == 0:
        try:
            write_snapshots(*map(int, line.split()))
        except BaseException:
            import traceback
            with open(os.path.join(root, "writer-errors.txt"), "a") as log:
                traceback.print_exc(file=log)
        finally:
            os._exit(0)
    print(pid, flush=True)
"""


def _wait_dead(pid: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/status") as handle:
                if any(line.startswith("State:") and "Z" in line for line in handle):
                    return
        except (FileNotFoundError, ProcessLookupError):  # gone, or going while we read
            return
        time.sleep(0.005)
    raise AssertionError(f"writer {pid} still running after {timeout} s")


def test_sigkill_at_random_moments_never_breaks_latest(s3_bucket: str, tmp_path: Path) -> None:
    iterations = 50
    rng = random.Random(1234)
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    staged = tmp_path / "staged"
    staged.mkdir()
    zygote = subprocess.Popen(
        [sys.executable, "-c", WRITER, s3_bucket, "run", str(staged)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    store = S3Store(s3_bucket)

    def fork_writer(seed: int, count: int) -> int:
        zygote.stdin.write(f"{seed} {count}\n")
        zygote.stdin.flush()
        line = zygote.stdout.readline()
        assert line, "writer zygote died"
        return int(line)

    # One writer runs to completion first: LATEST exists from then on, and its pace
    # (slower on a loaded machine) scales the kill times, so kills land mid-snapshot.
    try:
        warm_up = fork_writer(-1, 3)
        begun = time.monotonic()
        _wait_dead(warm_up, timeout=60)
        pace = (time.monotonic() - begun) / 3
        assert snapshots.latest(store, "run")["seq"] == 3, "the warm-up writer failed"
    except BaseException:
        zygote.kill()
        raise
    verified, partial_seen, seen_latest = 0, 0, set()
    rounds = 0
    try:
        # At least `iterations` kills; more (up to 3x) if load slowed the writers after
        # the warm-up so that too few snapshots, or too few mid-snapshot kills, were seen.
        for iteration in range(3 * iterations):
            if iteration >= iterations and len(seen_latest) >= 10 and partial_seen >= 10:
                break
            rounds += 1
            pid = fork_writer(iteration, 1000)
            time.sleep(rng.uniform(0.1, 2.5) * pace)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                errors = staged / "writer-errors.txt"
                pytest.fail(f"writer stopped by itself: {errors.read_text() if errors.exists() else '?'}")
            _wait_dead(pid)

            pointer = snapshots.latest(store, "run")
            assert pointer is not None, "LATEST disappeared"
            seen_latest.add(pointer["seq"])
            manifest = snapshots.read_manifest(store, "run", pointer["seq"])
            assert manifest is not None, f"LATEST -> {pointer['seq']} has no manifest"
            target = tmp_path / f"restore-{iteration}"
            summary = snapshots.download_snapshot(store, "run", target)  # verifies every sha256
            assert summary["seq"] == pointer["seq"]
            restored = {str(p.relative_to(target)) for p in target.rglob("*") if p.is_file()}
            assert restored == {entry["path"] for entry in manifest["files"]}
            verified += 1
            complete = {s["seq"] for s in snapshots.list_snapshots(store, "run")}
            started = {int(obj.key.split("/")[2][:6]) for obj in store.list("run/snapshots/")}
            partial_seen += bool(started - complete)
    finally:
        zygote.stdin.close()
        zygote.wait(timeout=10)

    stats = f"verified {verified}, killed mid-snapshot {partial_seen}, distinct LATEST {len(seen_latest)}"
    assert verified == rounds >= iterations, stats
    assert len(seen_latest) >= 10, f"the writers should land many snapshots between kills: {stats}"
    assert partial_seen >= 10, f"kills should often land in the middle of a snapshot: {stats}"

    # A clean writer carries on past every abandoned number, and prune clears them.
    pointer = snapshots.latest(store, "run")
    previous = snapshots.read_manifest(store, "run", pointer["seq"])
    result = snapshots.write_snapshot(store, "run", stage(tmp_path / "last", {"final.bin": b"done"}), previous=previous)
    assert result["seq"] > pointer["seq"]
    snapshots.prune(store, "run", keep=2)
    complete = [s["seq"] for s in snapshots.list_snapshots(store, "run")]
    assert complete[-1] == result["seq"] and len(complete) == 2
    # Of every other number below, only the objects a kept manifest still refers to are left.
    referenced = {
        snapshots.object_key("run", snapshots.stored_in(entry, seq), entry["path"])
        for seq in complete
        for entry in snapshots.read_manifest(store, "run", seq)["files"]
    }
    leftover = {
        obj.key
        for obj in store.list("run/snapshots/")
        if int(obj.key.split("/")[2][:6]) not in complete and int(obj.key.split("/")[2][:6]) < result["seq"]
    }
    assert leftover <= referenced
    snapshots.download_snapshot(store, "run", tmp_path / "final")
    assert (tmp_path / "final" / "final.bin").read_bytes() == b"done"
