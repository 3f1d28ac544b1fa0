"""The lean request path of the s3:// store (gpurun/store/s3_lean.py): small files of a snapshot go up,
and the files of a restore come down, without botocore's per-request machinery.

Against moto's server over real HTTP, and an endpoint onto the same backend that answers
503 SlowDown or refuses a credential as S3 does (`faulty_moto_server`).
"""

from __future__ import annotations

import datetime
import hashlib
import random
import socket
import threading
from pathlib import Path
from unittest import mock

import boto3
import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest, AWSResponse
from botocore.credentials import Credentials

from gpurun.errors import NoSuchBucket, StoreError
from gpurun.store import snapshots
from gpurun.store.base import Fetch
from gpurun.store.s3 import MiB, S3Store, parse_url
from tests.plugins.moto_server import REJECTED_ACCESS_KEY, FaultyS3
from tests.test_store_s3 import Recorder, stage

NAMES = {
    "model weights.pt": b"spaces " * 300,
    "ünïcödé/é tensor.bin": b"\x00\x01unicode" * 500,
    "a+b=c&d.bin": b"plus and friends" * 40,
    "100%/~tilde;semi,comma.bin": b"percent" * 70,
    "empty.marker": b"",
}


def bucket_objects(url: str, folder: str, endpoint: str | None = None) -> dict[str, bytes]:
    """What a plain boto3 client finds under `folder` of the store: key (below the folder) -> bytes."""
    bucket, prefix = parse_url(url)
    client = boto3.client("s3", endpoint_url=endpoint)
    found = {}
    for item in client.list_objects_v2(Bucket=bucket, Prefix=prefix + folder).get("Contents", []):
        body = client.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
        found[item["Key"][len(prefix + folder) :]] = body
    return found


def client_calls(store: S3Store) -> list[str]:
    """Keys of the GETs and PUTs that went through the boto3 client's own pipeline (the lean path skips it)."""
    calls: list[str] = []

    def record(params: dict, model, **_kwargs) -> None:
        if model.name in ("PutObject", "GetObject"):
            calls.append(params["Key"].rsplit("/", 1)[-1])

    store.client.meta.events.register("before-parameter-build.s3.*", record)
    return calls


def test_small_files_land_with_their_names_and_bytes_and_come_back(s3_bucket: str, tmp_path: Path) -> None:
    store = S3Store(s3_bucket)
    recorder = Recorder(store)
    through_client = client_calls(store)
    result = snapshots.write_snapshot(store, "run", stage(tmp_path / "staged", NAMES), previous=None)

    assert bucket_objects(s3_bucket, "run/snapshots/000001/") == NAMES
    manifest = {entry["path"]: entry["sha256"] for entry in result["manifest"]["files"]}
    assert manifest == {name: hashlib.sha256(data).hexdigest() for name, data in NAMES.items()}
    # Each file is signed with the sha256 the manifest records: S3 refuses bytes that differ from it.
    puts = {key: params for name, key, params in recorder.calls if name == "PutObject" and "/000001/" in key}
    for name, digest in manifest.items():
        assert puts[f"ckpt/run/snapshots/000001/{name}"]["x-amz-content-sha256"] == digest
    assert all(params["if-none-match"] == "*" for params in puts.values())

    snapshots.download_snapshot(store, "run", tmp_path / "restored")
    # The files went the lean way; the claim, manifest, LATEST and the manifest's copy beside it the client's.
    assert sorted(set(through_client)) == ["000001.claim", "000001.manifest.json", "LATEST", "LATEST.manifest.json"]
    assert {
        str(path.relative_to(tmp_path / "restored")): path.read_bytes()
        for path in (tmp_path / "restored").rglob("*")
        if path.is_file()
    } == NAMES


def test_a_missing_bucket_is_one_line(moto_server: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    store = S3Store("s3://gpurun-lean-no-such-bucket/ckpt")
    through_client = client_calls(store)
    files = stage(tmp_path, {"a.bin": b"a" * 100, "b.bin": b"b" * 100})
    with pytest.raises(NoSuchBucket) as raised:
        store.put_files([(f"run/{f.path}", str(f.local_path)) for f in files], if_absent=True)
    message = str(raised.value)
    assert "\n" not in message and message.startswith("bucket gpurun-lean-no-such-bucket does not exist")
    with pytest.raises(NoSuchBucket, match="bucket gpurun-lean-no-such-bucket does not exist"):
        store.fetch_hashed([Fetch("run/a.bin", str(tmp_path / "out.bin"), 100)])
    assert not (tmp_path / "out.bin").exists()
    assert through_client == [], "the lean path's own answer, mapped as the client's would be"


def test_an_endpoint_that_refuses_connections_fails_once_not_twice(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The lean path's attempts are not made all over again through the client (that doubled
    the time an unreachable S3 took to fail: 45 s for a restore of one file)."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: every connection is refused
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed.getsockname()[1]}")
    monkeypatch.setattr("gpurun.store.s3_lean.BACKOFF_BASE_S", 0.001)
    store = S3Store("s3://gpurun-unreachable/ckpt")
    store._lean_path()  # found from a request the client signs and never sends: it needs no server
    through_client = client_calls(store)
    files = stage(tmp_path / "staged", {"a.bin": b"a" * 100, "b.bin": b"b" * 100})
    try:
        with pytest.raises(StoreError) as up:
            store.put_files([(f"run/{f.path}", str(f.local_path)) for f in files], if_absent=True)
        with pytest.raises(StoreError) as down:
            store.fetch_hashed([Fetch("run/a.bin", str(tmp_path / "out.bin"), 100)])
    finally:
        closed.close()
    for raised, action in ((up, "uploading"), (down, "downloading")):
        message = str(raised.value)
        assert message.startswith(f"{action} s3://gpurun-unreachable/ckpt/run/") and "\n" not in message
        assert "cannot reach S3 (ConnectionRefusedError" in message and "check the network" in message
    assert through_client == [], "every attempt was the lean path's"
    assert not (tmp_path / "out.bin").exists()


def test_slow_down_is_retried_and_the_snapshot_completes(
    s3_bucket: str, moto_server: str, faulty_moto_server: FaultyS3, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", faulty_moto_server.endpoint)
    store = S3Store(s3_bucket)
    through_client = client_calls(store)
    data = {"w-slowdown-2x.bin": b"weights" * 1000, "o-slowdown-3x.bin": b"optimizer" * 500, "plain.bin": b"p"}
    snapshots.write_snapshot(store, "run", stage(tmp_path / "staged", data), previous=None)
    assert bucket_objects(s3_bucket, "run/snapshots/000001/", moto_server) == data
    bucket, _prefix = parse_url(s3_bucket)
    refused = {
        (method, path.rsplit("/", 1)[-1]): count
        for (method, path), count in faulty_moto_server.refused.items()
        if f"/{bucket}/" in path
    }
    assert refused == {("PUT", "w-slowdown-2x.bin"): 2, ("PUT", "o-slowdown-3x.bin"): 3}

    snapshots.download_snapshot(store, "run", tmp_path / "restored")
    assert {path.name: path.read_bytes() for path in (tmp_path / "restored").iterdir()} == data
    refused_gets = {
        path.rsplit("/", 1)[-1]: count
        for (method, path), count in faulty_moto_server.refused.items()
        if method == "GET" and f"/{bucket}/" in path
    }
    assert refused_gets == {"w-slowdown-2x.bin": 2, "o-slowdown-3x.bin": 3}
    assert sorted(set(through_client)) == ["000001.claim", "000001.manifest.json", "LATEST", "LATEST.manifest.json"]


def test_a_part_whose_body_breaks_off_is_fetched_again(
    s3_bucket: str, faulty_moto_server: FaultyS3, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    data = {"w-cutbody-2x.bin": random.Random(5).randbytes(3 * MiB + 777), "s-cutbody-1x.bin": b"small" * 999}
    snapshots.write_snapshot(S3Store(s3_bucket), "run", stage(tmp_path / "staged", data), previous=None)
    monkeypatch.setenv("AWS_ENDPOINT_URL", faulty_moto_server.endpoint)
    store = S3Store(s3_bucket)
    store.ranged_threshold, store.ranged_chunksize = MiB, MiB  # four ranged GETs for the big file
    through_client = client_calls(store)
    progress: list[int] = []

    snapshots.download_snapshot(store, "run", tmp_path / "restored", progress=progress.append)

    assert {path.name: path.read_bytes() for path in (tmp_path / "restored").iterdir()} == data
    bucket, _prefix = parse_url(s3_bucket)
    cut = {
        path.rsplit("/", 1)[-1]: count
        for (method, path), count in faulty_moto_server.refused.items()
        if method == "GET" and "cutbody" in path and f"/{bucket}/" in path
    }
    assert cut == {"w-cutbody-2x.bin": 2, "s-cutbody-1x.bin": 1}
    assert sum(progress) == sum(map(len, data.values())), "the bytes of a broken answer are taken back"
    # What to fetch: LATEST and the manifest's copy beside it, read together.
    assert set(through_client) == {"LATEST", "LATEST.manifest.json"}, "every file, every range, through the lean path"


def test_a_body_that_keeps_breaking_off_fails_in_one_line_and_restores_nothing(
    s3_bucket: str, faulty_moto_server: FaultyS3, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    data = {"w-cutbody-99x.bin": b"w" * 5000}
    snapshots.write_snapshot(S3Store(s3_bucket), "run", stage(tmp_path / "staged", data), previous=None)
    monkeypatch.setenv("AWS_ENDPOINT_URL", faulty_moto_server.endpoint)

    with pytest.raises(StoreError) as raised:
        snapshots.download_snapshot(S3Store(s3_bucket), "run", tmp_path / "restored")

    message = str(raised.value)
    assert message.startswith("downloading s3://") and message.count("\n") == 0
    assert "w-cutbody-99x.bin: the connection broke off before the end of the object, 3 times" in message
    assert not (tmp_path / "restored").exists()


def test_a_server_that_ignores_range_is_named(s3_bucket: str, tmp_path: Path) -> None:
    """Some S3-compatible servers answer a ranged GET with the whole object (200, no Content-Range)."""
    data = {"big.bin": random.Random(7).randbytes(2 * MiB + 5)}
    snapshots.write_snapshot(S3Store(s3_bucket), "run", stage(tmp_path / "staged", data), previous=None)
    store = S3Store(s3_bucket)
    store.ranged_threshold, store.ranged_chunksize = MiB, MiB

    def whole_object(request, **_kwargs):
        if not any(str(name).lower() == "range" for name in request.headers):
            return None
        body = data["big.bin"]
        return AWSResponse(request.url, 200, {"Content-Length": str(len(body))}, _Raw(body))

    store.client.meta.events.register_first("before-send.s3.GetObject", whole_object)
    with pytest.raises(StoreError, match="answered a ranged GET without a Content-Range \\(it ignores Range\\)"):
        snapshots.download_snapshot(store, "run", tmp_path / "restored")
    assert not (tmp_path / "restored").exists()


class _Raw:
    """A body for a canned botocore answer."""

    def __init__(self, data: bytes) -> None:
        self._data = data

    def stream(self, **_kwargs):
        yield self._data


def test_a_rejected_credential_fails_clearly(
    s3_bucket: str, faulty_moto_server: FaultyS3, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    writer = S3Store(s3_bucket)
    files = stage(tmp_path / "staged", {"w.bin": b"w" * 500})
    writer.put_files([("run/w.bin", str(files[0].local_path))])
    monkeypatch.setenv("AWS_ENDPOINT_URL", faulty_moto_server.endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", REJECTED_ACCESS_KEY)
    store = S3Store(s3_bucket)
    through_client = client_calls(store)
    with pytest.raises(StoreError) as raised:
        store.put_files([("run/again.bin", str(files[0].local_path))], if_absent=True)
    message = str(raised.value)
    assert "\n" not in message
    assert (
        message
        == f"uploading {s3_bucket}/run/again.bin: AWS credentials rejected (InvalidAccessKeyId); refresh or fix them"
    )
    with pytest.raises(StoreError, match=r"AWS credentials rejected \(InvalidAccessKeyId\)"):
        store.fetch_hashed([Fetch("run/w.bin", str(tmp_path / "out.bin"), 500)])
    assert not (tmp_path / "out.bin").exists()
    assert through_client == []
    assert "run/again.bin" not in {obj.key for obj in writer.list("run/")}


def test_the_in_process_moto_mock_sees_the_lean_requests(tmp_path: Path) -> None:
    """No endpoint URL: the requests name real AWS, and moto's mock answers them (a before-send handler)."""
    from moto import mock_aws

    with mock_aws():
        boto3.client("s3").create_bucket(Bucket="gpurun-mocked")
        store = S3Store("s3://gpurun-mocked/ckpt")
        snapshots.write_snapshot(store, "run", stage(tmp_path / "staged", NAMES), previous=None)
        assert bucket_objects("s3://gpurun-mocked/ckpt", "run/snapshots/000001/") == NAMES
        snapshots.download_snapshot(store, "run", tmp_path / "restored")
        assert (tmp_path / "restored" / "model weights.pt").read_bytes() == NAMES["model weights.pt"]


def test_an_expired_token_is_sent_again_through_the_client(
    s3_bucket: str, moto_server: str, faulty_moto_server: FaultyS3, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """botocore refreshes credentials (and follows a bucket's region): such answers go to the client."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", faulty_moto_server.endpoint)
    store = S3Store(s3_bucket)
    through_client = client_calls(store)
    data = {"w-expired-1x.bin": b"weights" * 100}
    snapshots.write_snapshot(store, "run", stage(tmp_path / "staged", data), previous=None)
    assert bucket_objects(s3_bucket, "run/snapshots/000001/", moto_server) == data
    assert "w-expired-1x.bin" in through_client


def test_the_lean_signature_is_botocores(s3_bucket: str, tmp_path: Path) -> None:
    """moto checks no signature: botocore's own signer, on the same request at the same instant, must agree."""
    store = S3Store(s3_bucket)
    sent: list = []
    store.client.meta.events.register("before-send.s3.PutObject", lambda request, **_: sent.append(request))
    files = stage(tmp_path, NAMES)
    store.put_files([(f"run/{f.path}", str(f.local_path)) for f in files], if_absent=True)
    assert len(sent) == len(NAMES)
    frozen = store._core.get_credentials().get_frozen_credentials()
    for request in sent:
        headers = dict(request.headers)
        ours = headers.pop("authorization")
        when = datetime.datetime.strptime(headers["x-amz-date"], "%Y%m%dT%H%M%SZ")
        theirs = AWSRequest(method="PUT", url=request.url, data=request.body or b"", headers=headers)
        signer = S3SigV4Auth(Credentials(frozen.access_key, frozen.secret_key, frozen.token), "s3", "us-east-1")
        with mock.patch("botocore.auth.get_current_datetime", return_value=when):
            signer.add_auth(theirs)
        assert ours == theirs.headers["Authorization"], request.url


class KeepAliveServer:
    """An HTTP/1.1 server on loopback that answers every request 200 and keeps the connection,
    or, with `close_after_answer`, closes it silently after each answer (as S3 closes an idle one)."""

    def __init__(self, close_after_answer: bool) -> None:
        self.close_after_answer = close_after_answer
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.connections = 0
        self.requests: list[str] = []
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}/bucket/"

    def _serve(self) -> None:
        while True:
            try:
                connection, _address = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._answer, args=(connection,), daemon=True).start()

    def _answer(self, connection: socket.socket) -> None:
        reader = connection.makefile("rb")
        with connection, reader:
            while line := reader.readline():
                length = 0
                while (header := reader.readline()) not in (b"\r\n", b""):
                    name, _, value = header.decode().partition(":")
                    length = int(value) if name.lower() == "content-length" else length
                reader.read(length)
                self.requests.append(line.decode().split()[1])
                connection.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                if self.close_after_answer:
                    return

    def close(self) -> None:
        self.listener.close()


@pytest.mark.parametrize("close_after_answer", [False, True])
def test_kept_alive_connections_are_reused_and_a_closed_one_is_replaced(close_after_answer: bool) -> None:
    from botocore.hooks import HierarchicalEmitter

    from gpurun.store.s3_lean import LeanS3, _Connections

    server = KeepAliveServer(close_after_answer)
    try:
        pool = _Connections("http", "127.0.0.1", int(server.url.split(":")[2].split("/")[0]), None, 5, 5, 4)
        lean = LeanS3(server.url, "us-east-1", "s3", Credentials("k", "s"), HierarchicalEmitter(), pool)
        for index in range(3):
            lean.put(f"key-{index}", b"x", hashlib.sha256(b"x").hexdigest(), {})
        # A kept-alive connection that the server has closed is replaced by a new one, and the PUT goes through.
        assert server.requests == ["/bucket/key-0", "/bucket/key-1", "/bucket/key-2"]
        assert server.connections == (3 if close_after_answer else 1)
    finally:
        server.close()
