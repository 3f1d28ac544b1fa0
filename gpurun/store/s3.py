"""`s3://bucket/prefix` store: the `file://` layout and guarantees on S3.

Imported only when an s3:// URL is used, so botocore stays off the CLI's fast path. It needs
botocore, not boto3, and imports s3transfer only for a batch that uses it: a restore starts
0.05 s sooner without either.

- Create-only writes use S3 conditional writes (`If-None-Match: *`) on
  PutObject, CompleteMultipartUpload and CopyObject; S3 answers 412
  PreconditionFailed (or 409 ConditionalRequestConflict while a racing write
  is in flight) and that becomes `SnapshotConflict`. A create-only object
  carries a random `x-amz-meta-gpurun-put` token, so a write that succeeded
  but whose response was lost (the retry then gets 412) is recognised as ours.
- Small files (up to `lean_max_size`) of a snapshot go up, and the files of
  a restore come down, through `s3_lean`: SigV4-signed requests on kept-alive
  connections, without botocore's per-request machinery (a quarter of its
  CPU per request), to the endpoint and with the credentials of the botocore
  client. Where that path cannot go the way the client would (a proxy, a redirect,
  no credentials), the client does the work.
- Bigger uploads go through one s3transfer `TransferManager` per batch: every
  file is submitted at once and runs `max_concurrency` wide; big files go
  multipart in `multipart_chunksize` parts.
- Copies are server-side (CopyObject, or UploadPartCopy for big objects):
  an unchanged file costs one request and no upload.
- Restores (`fetch_hashed`) run their own pool: every file at once, big
  files as parallel ranged GETs, each written where it goes and hashed
  (sha256) as its bytes arrive, in order, so nothing is read twice.
- Retries: botocore's `standard` mode (throttling, 5xx, connection errors);
  a GET whose body breaks off is started again, up to `_STREAM_ATTEMPTS` times.
"""

from __future__ import annotations

import builtins
import contextlib
import datetime
import email.utils
import functools
import hashlib
import http.client
import math
import os
import re
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, cast

import botocore.config
import botocore.exceptions
import botocore.session
import botocore.utils

from gpurun.aws_files import check_shared_files
from gpurun.errors import BadInput, NoSuchBucket, SnapshotConflict, StoreError
from gpurun.store import s3_lean
from gpurun.store.base import Digests, Fetch, Fetches, ObjectStore, Progress, Sent, StoredObject, size_mismatch

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from s3transfer.manager import TransferManager
    from s3transfer.subscribers import BaseSubscriber as _SubscriberBase
else:
    _SubscriberBase = object

MiB = 1 << 20
GiB = 1 << 30

_BUCKET = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{1,254}$")
_CONFLICT_CODES = {"PreconditionFailed", "ConditionalRequestConflict", "412"}
_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}
_DENIED_CODES = {"AccessDenied", "403", "AllAccessDisabled", "AccountProblem"}
_CREDENTIAL_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "RequestExpired",
}
_NONCE = "gpurun-put"  # user metadata on create-only objects: x-amz-meta-gpurun-put
_STREAM_ATTEMPTS = 3
_READ_CHUNK = 1 << 20
_STREAM_ERRORS = (
    botocore.exceptions.IncompleteReadError,
    botocore.exceptions.ReadTimeoutError,
    botocore.exceptions.ResponseStreamingError,
    botocore.exceptions.ConnectionClosedError,
    ConnectionError,
    TimeoutError,
    http.client.HTTPException,  # the lean path's body broke off (IncompleteRead)
)
#: Answers of the lean path that boto3 handles better: it follows a bucket's region, refreshes
#: credentials, corrects for clock skew. The request is made again through the client.
_BOTO3_KNOWS_BETTER = {
    "PermanentRedirect",
    "TemporaryRedirect",
    "AuthorizationHeaderMalformed",
    "IllegalLocationConstraintException",
    "ExpiredToken",
    "TokenRefreshRequired",
    "RequestTimeTooSkewed",
}
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+)$")


def parse_url(url: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` -> ("bucket", "some/prefix/"); the prefix may be empty."""
    if not url.startswith("s3://"):
        raise BadInput(f"store {url!r}: not an s3:// URL")
    bucket, _, prefix = url[len("s3://") :].partition("/")
    if not bucket:
        raise BadInput(f"store {url!r}: no bucket name; use s3://bucket/prefix")
    if not _BUCKET.match(bucket):
        raise BadInput(f"store {url!r}: {bucket!r} is not a valid S3 bucket name")
    prefix = "/".join(part for part in prefix.split("/") if part)
    return bucket, (prefix + "/" if prefix else "")


def _code(error: botocore.exceptions.ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def _status(error: botocore.exceptions.ClientError) -> int:
    return int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)


def _is_conflict(error: BaseException) -> bool:
    return isinstance(error, botocore.exceptions.ClientError) and (
        _code(error) in _CONFLICT_CODES or _status(error) == 412
    )


def _client_error(refused: s3_lean.Refused, operation: str) -> botocore.exceptions.ClientError:
    """The lean path's refusal as botocore would have raised it, so one mapping serves both."""
    answer: Any = {
        "Error": {"Code": refused.code, "Message": refused.message},
        "ResponseMetadata": {"HTTPStatusCode": refused.status},
    }
    return botocore.exceptions.ClientError(answer, operation)


def _needs_boto3(refused: s3_lean.Refused) -> bool:
    return refused.status in (301, 302, 307, 308) or refused.code in _BOTO3_KNOWS_BETTER


def _certificate_refused(unreachable: s3_lean.Unreachable) -> bool:
    return isinstance(unreachable.__cause__, ssl.SSLError)


def _file_size(path: str) -> int | None:
    try:
        return os.path.getsize(path)
    except OSError:
        return None  # the upload itself reports it


def _is_not_found(error: BaseException) -> bool:
    return isinstance(error, botocore.exceptions.ClientError) and _code(error) in _NOT_FOUND_CODES


class _Subscriber(_SubscriberBase):
    """Tells s3transfer the size and ETag we already listed (saves a HEAD per object) and forwards progress.

    s3transfer calls a subscriber's `on_queued` and `on_progress` where it has them; not
    subclassing its BaseSubscriber keeps s3transfer unimported until a batch needs it.
    """

    def __init__(self, known: tuple[int, str] | None, progress: Progress | None) -> None:
        self._known = known
        self._progress = progress

    def on_queued(self, future: Any, **kwargs: Any) -> None:
        if self._known is not None:
            future.meta.provide_transfer_size(self._known[0])
            future.meta.provide_object_etag(self._known[1])

    def on_progress(self, future: Any, bytes_transferred: int, **kwargs: Any) -> None:
        if self._progress is not None:
            self._progress(bytes_transferred)


class S3Store(ObjectStore):
    #: Requests in flight per batch at least (big files' parts, or many files on a near endpoint).
    max_concurrency = 32
    #: With many files, enough requests in flight to hide the round trip (in flight = rate x round
    #: trip, Little's law), at the rate below and up to `max_small_concurrency`; the round trip is the
    #: fastest single request this store has made (the claim, LATEST, a listing).
    target_request_rate = 2000.0
    max_small_concurrency = 256
    #: Files at least this big are uploaded (and downloaded) in parts.
    multipart_threshold = 32 * MiB
    multipart_chunksize = 8 * MiB  # s3transfer adjusts it upwards for files of more than 10,000 parts
    #: Server-side copies below this are one CopyObject; above, UploadPartCopy in parallel.
    copy_threshold = 512 * MiB
    copy_chunksize = 128 * MiB
    #: Restores: objects at least this big are fetched as parallel ranged GETs of this size. Big
    #: ranges, because a server may read the whole object for each one (moto does; s5cmd uses 50 MB).
    ranged_threshold = 128 * MiB
    ranged_chunksize = 64 * MiB
    #: Restores: bytes of one big file held in memory until their turn to be hashed, at most.
    ranged_memory = 512 * MiB
    #: Connections kept per client; more than any pool here runs at once, and opened only when needed.
    max_pool_connections = 264
    #: Files up to this size go up through the lean path (`s3_lean`), read whole into memory:
    #: with `max_small_concurrency` in flight, at most that many MiB are held at once.
    lean_max_size = 1 * MiB
    #: False: every request through the botocore client (as before the lean path; for comparison).
    use_lean = True

    def __init__(
        self,
        url: str,
        *,
        region: str | None = None,
        profile: str | None = None,
        endpoint_url: str | None = None,
    ) -> None:
        self.bucket, self.prefix = parse_url(url)
        self.url = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        check_shared_files(profile)
        core = _session(profile, region, f"store {self.url}")
        # botocore parses every timestamp with dateutil, about 1 ms each: a 1,000-object listing
        # page cost a second of CPU, and every GET one more parse of Last-Modified.
        core.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=_parse_timestamp)
        config = botocore.config.Config(
            retries={"mode": "standard", "max_attempts": 10},
            max_pool_connections=self.max_pool_connections,
            connect_timeout=10,
            read_timeout=120,
            tcp_keepalive=True,
            # Every downloaded file is checked against the manifest's sha256, so the
            # CRC check on GET adds nothing (and moto serves wrong CRCs for copied
            # multipart objects). Uploads still send a CRC32 that S3 checks.
            response_checksum_validation="when_required",
            # What botocore does over HTTPS, on every endpoint: the CRC32 that S3 checks each body
            # against, and no second sha256 of every byte to sign it. Over plain HTTP nothing S3
            # sends back is signed either, so that hash protected nothing a restore relies on
            # (the restore checks each file's sha256 from the manifest); it cost a core 0.3 s per
            # 500 MB while the server needed the CPU.
            s3={"payload_signing_enabled": False},
        )
        # endpoint_url=None lets botocore honour AWS_ENDPOINT_URL / AWS_ENDPOINT_URL_S3.
        self.client = _client(core, endpoint_url=endpoint_url, config=config)
        self._client_options: dict[str, Any] = {"endpoint_url": endpoint_url, "config": config}
        self._core = core
        self._lean: s3_lean.LeanS3 | None = None
        self._lean_probed = False
        self._lean_lock = threading.Lock()
        self._progress_lock = threading.Lock()
        self._round_trip: float | None = None
        self._create_only: dict[str, int] = {}
        self._create_only_lock = threading.Lock()
        for operation in ("PutObject", "CompleteMultipartUpload", "CopyObject"):
            self.client.meta.events.register(f"before-parameter-build.s3.{operation}", self._add_if_none_match)

    # -- keys and errors ---------------------------------------------------------

    def _key(self, key: str) -> str:
        if key.startswith("/") or ".." in key.split("/"):
            raise StoreError(f"{self.url}: refusing key {key!r} outside the store")
        return self.prefix + key

    def _error(self, error: BaseException, action: str, key: str = "") -> StoreError:
        """One line a person can act on, naming the bucket and what to do."""
        where = f"s3://{self.bucket}/{self.prefix}{key}".rstrip("/")
        if isinstance(error, StoreError):
            return error
        if isinstance(error, botocore.exceptions.NoCredentialsError):
            return StoreError(
                f"{action} {where}: no AWS credentials found; set AWS_PROFILE, run `aws configure`, or use an instance role"
            )
        if isinstance(error, botocore.exceptions.EndpointConnectionError):
            return self._unreachable(error, action, key)
        if isinstance(error, (http.client.IncompleteRead, botocore.exceptions.IncompleteReadError)):
            return StoreError(
                f"{action} {where}: the connection broke off before the end of the object, "
                f"{_STREAM_ATTEMPTS} times; check the network and try again"
            )
        if isinstance(error, botocore.exceptions.ClientError):
            code, message = _code(error), error.response.get("Error", {}).get("Message", "")
            if code == "NoSuchBucket":
                return NoSuchBucket(
                    f"bucket {self.bucket} does not exist ({action} {where}); create it or fix checkpoint.store"
                )
            if _is_conflict(error) and action in ("uploading", "writing", "copying to"):
                return SnapshotConflict(f"{where} already exists (another writer got there first)")
            if code in _DENIED_CODES:
                return StoreError(
                    f"access denied {action} {where}; the credentials in use need s3:{_permission(action)} on arn:aws:s3:::{self.bucket}/{self.prefix}*"
                )
            if code in _CREDENTIAL_CODES:
                return StoreError(f"{action} {where}: AWS credentials rejected ({code}); refresh or fix them")
            if _is_not_found(error):
                return StoreError(f"{action} {where}: no such object")
            detail = f"{code}: {message}" if message else code or str(error)
            return StoreError(f"{action} {where} failed: {detail}")
        if isinstance(error, botocore.exceptions.BotoCoreError):
            return StoreError(f"{action} {where} failed: {error}")
        if isinstance(error, OSError):
            return StoreError(f"{action} {where}: {error.strerror or error} ({error.filename or 'local file'})")
        return StoreError(f"{action} {where} failed: {error!r}")

    def _unreachable(self, error: BaseException, action: str, key: str) -> StoreError:
        """No answer after every attempt. The lean path's attempts are not made again through the
        client: with both, an endpoint that refuses connections took 45 s to fail, not 20."""
        where = f"s3://{self.bucket}/{self.prefix}{key}".rstrip("/")
        return StoreError(f"{action} {where}: cannot reach S3 ({error}); check the network or the endpoint URL")

    # -- create-only writes ------------------------------------------------------

    def _add_if_none_match(self, params: dict[str, Any], **kwargs: Any) -> None:
        key = params.get("Key")
        if key is not None and key in self._create_only and params.get("Bucket") == self.bucket:
            params.setdefault("IfNoneMatch", "*")

    def _mark_create_only(self, keys: Iterable[str], add: bool) -> None:
        with self._create_only_lock:
            for key in keys:
                if add:
                    self._create_only[key] = self._create_only.get(key, 0) + 1
                elif self._create_only.get(key, 0) <= 1:
                    self._create_only.pop(key, None)
                else:
                    self._create_only[key] -= 1

    def _written_by_us(self, full_key: str, nonce: str) -> bool:
        """After a 412: was the object there our own earlier attempt (a retry after a lost response)?"""
        return self._our_etag(full_key, nonce) is not None

    def _our_etag(self, full_key: str, nonce: str) -> str | None:
        """The ETag of the object at `full_key` if it is our own earlier attempt; None if not."""
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=full_key)
        except botocore.exceptions.ClientError:
            return None
        return _etag(head) if head.get("Metadata", {}).get(_NONCE) == nonce else None

    def _locked(self, progress: Progress | None) -> Progress | None:
        """s3transfer reports from many threads; callers get one call at a time."""
        if progress is None:
            return None

        def report(amount: int) -> None:
            with self._progress_lock:
                progress(amount)

        return report

    def _timed(self, started: float) -> None:
        """Remember the fastest single request: the round trip, plus the least the server takes."""
        elapsed = time.monotonic() - started
        if self._round_trip is None or elapsed < self._round_trip:
            self._round_trip = elapsed

    def concurrency(self, requests: int) -> int:
        """Requests to keep in flight for a batch of `requests` (never more than that)."""
        wanted = math.ceil(self.target_request_rate * (self._round_trip or 0.0))
        return max(1, min(requests, max(self.max_concurrency, min(self.max_small_concurrency, wanted))))

    def _manager(self, threshold: int, chunksize: int, concurrency: int | None = None) -> TransferManager:
        from s3transfer.manager import TransferConfig, TransferManager

        return TransferManager(
            self.client,
            TransferConfig(
                multipart_threshold=threshold,
                multipart_chunksize=chunksize,
                max_request_concurrency=concurrency or self.max_concurrency,
                max_submission_concurrency=4,
                max_request_queue_size=10_000,
                max_submission_queue_size=10_000,
                max_io_queue_size=1000,
                io_chunksize=256 * 1024,
            ),
        )

    # -- ObjectStore -------------------------------------------------------------

    def put_file(self, key: str, path: str, *, if_absent: bool = False, progress: Progress | None = None) -> None:
        self.put_files([(key, path)], if_absent=if_absent, progress=progress)

    def put_files(
        self, items: list[tuple[str, str]], *, if_absent: bool = False, progress: Progress | None = None
    ) -> dict[str, Sent]:
        """Upload every file at once; wait for all. Returns the sha256 and size of each file sent
        from one buffer (the lean path, or its fallback through the client).

        Small files go through the lean path in a pool of their own; bigger ones
        through one transfer manager at the same time.
        """
        if not items:
            return {}
        nonce = uuid.uuid4().hex
        extra = {"Metadata": {_NONCE: nonce}} if if_absent else {}
        full_keys = [self._key(key) for key, _path in items]
        report = self._locked(progress)
        lean = self._lean_path()
        sizes = [_file_size(path) for _key, path in items]
        small = [
            index
            for index, size in enumerate(sizes)
            if lean is not None and size is not None and size <= self.lean_max_size
        ]
        big = sorted(set(range(len(items))) - set(small))
        # Many small files are latency-bound: size the pool by the round trip. Big files' parts
        # are bandwidth-bound: `max_concurrency` of them at most.
        concurrency = self.concurrency(len(small) + sum(self._requests_for(sizes[index]) for index in big))
        if if_absent:
            self._mark_create_only(full_keys, True)
        try:
            with contextlib.ExitStack() as stack:
                futures = []
                if big:
                    manager = stack.enter_context(
                        self._manager(self.multipart_threshold, self.multipart_chunksize, concurrency)
                    )
                    subscribers = [_Subscriber(None, report)]
                    futures = [
                        (
                            index,
                            manager.upload(
                                items[index][1],
                                self.bucket,
                                full_keys[index],
                                extra_args=extra,
                                subscribers=subscribers,
                            ),
                        )
                        for index in big
                    ]
                jobs = [(items[index][0], full_keys[index], items[index][1]) for index in small]
                digests = self._put_small(jobs, nonce if if_absent else None, report, concurrency) if jobs else {}
                for index, future in futures:
                    try:
                        future.result()
                    except Exception as error:
                        if if_absent and _is_conflict(error) and self._written_by_us(full_keys[index], nonce):
                            continue
                        raise self._error(error, "uploading", items[index][0]) from None
                    # Every request said its length (the transfer's size, taken when it started) and S3
                    # checked each body against its checksum: the object is exactly that long.
                    digests[items[index][0]] = Sent(None, future.meta.size)
                return digests
        finally:
            if if_absent:
                self._mark_create_only(full_keys, False)

    def hashed_while_sending(self) -> int:
        return self.lean_max_size if self._lean_path() is not None else 0

    def _lean_path(self) -> s3_lean.LeanS3 | None:
        """The lean path, found on first use (from a request the client signs but never sends)."""
        with self._lean_lock:
            if not self._lean_probed:
                self._lean_probed = True
                if self.use_lean:
                    self._lean = s3_lean.LeanS3.for_client(
                        # Its own client for the probe: handlers of the store's own do not change
                        # while another thread may be using it.
                        _client(self._core, **self._client_options),
                        self._core.get_credentials(),
                        self.bucket,
                        events=self.client.meta.events,
                        ca_bundle=self._core.get_config_variable("ca_bundle"),
                        connect_timeout=10,
                        read_timeout=120,
                        keep=self.max_pool_connections,
                    )
            return self._lean

    def _put_small(
        self, jobs: list[tuple[str, str, str]], nonce: str | None, report: Progress | None, workers: int
    ) -> dict[str, Sent]:
        """(key, full key, path) each in one PutObject, `workers` at once; the first failure stops the rest."""
        headers = {"if-none-match": "*", f"x-amz-meta-{_NONCE}": nonce} if nonce else {}
        stop = threading.Event()

        def send(full_key: str, path: str) -> Sent:
            try:
                return self._put_one(full_key, path, headers, nonce, report, stop)
            except BaseException:
                stop.set()
                raise

        digests: dict[str, Sent] = {}
        failure: tuple[str, Exception] | None = None
        pool = ThreadPoolExecutor(max_workers=min(workers, len(jobs)), thread_name_prefix="gpurun-put")
        try:
            futures = [(key, pool.submit(send, full_key, path)) for key, full_key, path in jobs]
            for key, future in futures:
                try:
                    digests[key] = future.result()
                except (s3_lean.Abandoned, CancelledError):
                    continue
                except Exception as error:
                    if failure is None:
                        failure = (key, error)
                        pool.shutdown(wait=False, cancel_futures=True)
        except BaseException:
            stop.set()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        if failure is not None:
            raise self._error(failure[1], "uploading", failure[0]) from None
        return digests

    def _put_one(
        self,
        full_key: str,
        path: str,
        headers: dict[str, str],
        nonce: str | None,
        report: Progress | None,
        stop: threading.Event,
    ) -> Sent:
        """One small file, read once: hashed, signed with its hash, sent. Returns its sha256 and size."""
        with open(path, "rb") as handle:
            data = handle.read()
        digest = hashlib.sha256(data).hexdigest()
        lean = self._lean
        try:
            if lean is None or len(data) > self.lean_max_size:
                self._put_through_client(full_key, data, nonce)
            else:
                try:
                    lean.put(full_key, data, digest, headers, stop)
                except s3_lean.Refused as refused:
                    if not _needs_boto3(refused):
                        raise _client_error(refused, "PutObject") from None
                    self._put_through_client(full_key, data, nonce)
                    self._lean = None  # the client found the way where the lean path did not: stay on it
                except s3_lean.Unreachable as unreachable:
                    if not _certificate_refused(unreachable):
                        raise self._unreachable(unreachable, "uploading", full_key[len(self.prefix) :]) from None
                    self._put_through_client(full_key, data, nonce)  # the client's own words for a certificate
        except botocore.exceptions.ClientError as error:
            if not (nonce and _is_conflict(error) and self._written_by_us(full_key, nonce)):
                raise
        if report is not None:
            report(len(data))
        return Sent(digest, len(data))

    def _put_through_client(self, full_key: str, data: bytes, nonce: str | None) -> None:
        # A create-only key is marked: `_add_if_none_match` adds If-None-Match.
        if nonce:
            self.client.put_object(Bucket=self.bucket, Key=full_key, Body=data, Metadata={_NONCE: nonce})
        else:
            self.client.put_object(Bucket=self.bucket, Key=full_key, Body=data)

    def _requests_for(self, size: int | None) -> int:
        """Requests that uploading a file of `size` bytes can keep in flight: one, or one per part."""
        if size is None or size < self.multipart_threshold:
            return 1
        return -(-size // self.multipart_chunksize)

    def put_bytes(self, key: str, data: bytes, *, if_absent: bool = False, if_match: str | None = None) -> str:
        full_key = self._key(key)
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": full_key, "Body": data}
        if if_absent:
            nonce = uuid.uuid4().hex
            args.update(IfNoneMatch="*", Metadata={_NONCE: nonce})
        elif if_match is not None:
            args.update(IfMatch=if_match)
        started = time.monotonic()
        try:
            answer = self.client.put_object(**args)
        except Exception as error:
            if if_absent and _is_conflict(error):
                ours = self._our_etag(full_key, nonce)
                if ours is not None:
                    return ours
            if if_match is not None and (_is_conflict(error) or _is_not_found(error)):
                raise SnapshotConflict(f"{self.url}/{key} changed meanwhile") from None
            raise self._error(error, "writing", key) from None
        self._timed(started)
        return _etag(answer)

    def get_bytes(self, key: str, *, limit: int | None = None) -> bytes | None:
        found = self.get_tagged(key, limit=limit)
        return None if found is None else found[0]

    def get_tagged(self, key: str, *, limit: int | None = None) -> tuple[bytes, str] | None:
        started = time.monotonic()
        try:
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            body = response["Body"]
            try:
                data: bytes = body.read() if limit is None else body.read(limit + 1)
            finally:
                body.close()  # with a limit, the rest of a planted giant is never fetched
        except Exception as error:
            if _is_not_found(error):
                self._timed(started)
                return None
            raise self._error(error, "reading", key) from None
        self._timed(started)
        return data, _etag(response)

    def get_file(self, key: str, path: str, *, progress: Progress | None = None) -> None:
        self.get_files([(key, path)], progress=progress)

    def get_files(self, items: list[tuple[str, str]], *, progress: Progress | None = None) -> None:
        """Download in parallel; sizes come from one listing instead of a HEAD per file."""
        if not items:
            return
        known = self._listed([key for key, _path in items]) if len(items) > 1 else {}
        report = self._locked(progress)
        try:
            with self._manager(self.multipart_threshold, max(self.multipart_chunksize, 64 * MiB)) as manager:
                futures = [
                    (
                        key,
                        manager.download(
                            self.bucket, self._key(key), path, subscribers=[_Subscriber(known.get(key), report)]
                        ),
                    )
                    for key, path in items
                ]
                for key, future in futures:
                    try:
                        future.result()
                    except Exception as error:
                        raise self._error(error, "downloading", key) from None
        except StoreError:
            raise
        except Exception as error:
            raise self._error(error, "downloading") from None

    def fetch_hashed(
        self, items: Fetches, *, progress: Progress | None = None, abandon: threading.Event | None = None
    ) -> Digests:
        """Every file at once, big ones in ranged parts; each hashed while its bytes arrive."""
        if not items:
            return []
        stop = abandon or threading.Event()
        report = self._locked(progress) or (lambda _amount: None)
        results: dict[int, Callable[[], str]] = {}
        big: list[Callable[[], None]] = []
        small: list[Callable[[], None]] = []
        ranged_files: list[_RangedFetch] = []
        requests = sum(
            -(-item.size // self.ranged_chunksize) if item.size >= self.ranged_threshold else 1 for item in items
        )
        pool = ThreadPoolExecutor(max_workers=self.concurrency(requests), thread_name_prefix="gpurun-get")
        try:
            for index, item in enumerate(items):
                if item.size >= self.ranged_threshold:
                    window = self.ranged_memory // self.ranged_chunksize
                    ranged = _RangedFetch(self, item, self.ranged_chunksize, window, stop, report)
                    ranged_files.append(ranged)
                    big.extend(ranged.tasks())
                    results[index] = ranged.result
                else:
                    whole = _WholeFetch(self, item, stop, report)
                    small.append(whole.run)
                    results[index] = whole.result
            # Big files' parts go first: they take longest, and small files fill the gaps.
            futures: list[Future[None]] = [pool.submit(task) for task in big + small]
            for future in futures:
                future.result()
            return [results[index]() for index in range(len(items))]
        except BaseException as error:
            # Every worker stops at its next chunk and none starts: then the caller may remove the files.
            stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
            if isinstance(error, Exception):
                raise self._error(error, "downloading") from None
            raise
        finally:
            pool.shutdown(wait=True)
            for ranged in ranged_files:
                ranged.close()

    def _get(self, key: str, **extra: Any) -> Any:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key), **extra)
        except Exception as error:
            raise self._get_error(error, key) from None

    def _get_error(self, error: BaseException, key: str) -> StoreError:
        if isinstance(error, botocore.exceptions.ClientError) and (
            _code(error) == "InvalidRange" or _status(error) == 416
        ):
            return StoreError(f"{self.url}/{key}: the stored object is shorter than the manifest says")
        return self._error(error, "downloading", key)

    def _open(self, key: str, stop: threading.Event, byte_range: str | None = None) -> tuple[str | None, Any]:
        """An object, or the `byte_range` of it ("bytes=A-B"), to read: (its Content-Length, or
        with a range its Content-Range; a body with read(n) and close())."""
        lean = self._lean_path()
        answered = "Content-Range" if byte_range else "Content-Length"
        if lean is not None:
            try:
                response = lean.get(self._key(key), stop, headers={"range": byte_range} if byte_range else None)
                return response.header(answered), response
            except s3_lean.Abandoned:
                raise StoreError(f"{self.url}/{key}: download abandoned") from None
            except s3_lean.Refused as refused:
                if not _needs_boto3(refused):
                    raise self._get_error(_client_error(refused, "GetObject"), key) from None
                self._lean = None  # the client's way from now on (it follows a redirect, refreshes credentials)
            except s3_lean.Unreachable as unreachable:
                if not _certificate_refused(unreachable):
                    raise self._unreachable(unreachable, "downloading", key) from None
                # A certificate that does not verify: the client says what is wrong with it.
        answer = self._get(key, **({"Range": byte_range} if byte_range else {}))
        value = answer.get(answered.replace("-", ""))
        return (None if value is None else str(value)), answer["Body"]

    def copy(self, source_key: str, dest_key: str) -> None:
        self.copy_many([(source_key, dest_key)])

    def copy_many(self, pairs: list[tuple[str, str]]) -> None:
        """Server-side copies in parallel; the destination must not exist yet."""
        if not pairs:
            return
        known = self._listed([source for source, _dest in pairs]) if len(pairs) > 1 else {}
        # S3 refuses a CopyObject onto an existing key through If-None-Match; stores
        # that ignore it on copies (moto, some S3 clones) are caught by this listing.
        existing = self._existing([dest for _source, dest in pairs])
        if existing:
            raise SnapshotConflict(f"{self.url}/{existing[0]} already exists (another writer got there first)")
        dest_keys = [self._key(dest) for _source, dest in pairs]
        self._mark_create_only(dest_keys, True)
        try:
            with self._manager(self.copy_threshold, self.copy_chunksize) as manager:
                futures = [
                    (
                        dest,
                        manager.copy(
                            {"Bucket": self.bucket, "Key": self._key(source)},
                            self.bucket,
                            dest_key,
                            subscribers=[_Subscriber(known.get(source), None)],
                        ),
                    )
                    for (source, dest), dest_key in zip(pairs, dest_keys, strict=True)
                ]
                for dest, future in futures:
                    try:
                        future.result()
                    except Exception as error:
                        raise self._error(error, "copying to", dest) from None
        finally:
            self._mark_create_only(dest_keys, False)

    def list(self, prefix: str) -> list[StoredObject]:
        found: list[StoredObject] = []
        start = len(self.prefix)
        try:
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
                found.extend(
                    StoredObject(item["Key"][start:], item["Size"], _timestamp(item.get("LastModified")))
                    for item in page.get("Contents", ())
                )
        except Exception as error:
            raise self._error(error, "listing", prefix) from None
        return found

    def list_level(self, folder: str) -> dict[str, str]:
        """One level (`Delimiter="/"`): one LIST per 1,000 names, whatever the folders hold."""
        level: dict[str, str] = {}
        start = len(self.prefix) + len(folder)
        try:
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + folder, Delimiter="/"):
                level.update((common["Prefix"][start:], "") for common in page.get("CommonPrefixes", ()))
                level.update((item["Key"][start:], _etag(item)) for item in page.get("Contents", ()))
        except Exception as error:
            raise self._error(error, "listing", folder) from None
        return {name: tag for name, tag in level.items() if name not in ("", "/")}

    def delete(self, keys: Iterable[str]) -> None:
        full_keys = [self._key(key) for key in keys]
        for start in range(0, len(full_keys), 1000):
            batch = full_keys[start : start + 1000]
            try:
                response = self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": key} for key in batch], "Quiet": True}
                )
            except Exception as error:
                raise self._error(error, "deleting from") from None
            errors = [e for e in response.get("Errors", ()) if e.get("Code") not in _NOT_FOUND_CODES]
            if errors:
                first = errors[0]
                key = first.get("Key", "")[len(self.prefix) :]
                if first.get("Code") in _DENIED_CODES:
                    raise StoreError(
                        f"access denied deleting s3://{self.bucket}/{first.get('Key')}; the credentials in use need s3:DeleteObject"
                    )
                raise StoreError(
                    f"deleting {self.url}/{key} failed: {first.get('Code')}: {first.get('Message', '')} ({len(errors)} objects not deleted)"
                )

    def size_of(self, key: str) -> int | None:
        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=self._key(key))["ContentLength"])
        except Exception as error:
            if _is_not_found(error):
                return None
            if isinstance(error, botocore.exceptions.ClientError) and _code(error) == "404":
                return None
            raise self._error(error, "reading", key) from None

    def check_writable(self) -> None:
        """Put and delete a small probe object under the prefix; one clear line when that fails."""
        probe = f".gpurun-write-probe-{uuid.uuid4().hex[:12]}"
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(probe), Body=b"gpurun write probe\n")
        except Exception as error:
            if isinstance(error, botocore.exceptions.ClientError) and _code(error) == "NoSuchBucket":
                raise NoSuchBucket(
                    f"store {self.url}: bucket {self.bucket} does not exist; create it (or let gpurun create it) or fix checkpoint.store"
                ) from None
            raise self._error(error, "writing", probe) from None
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self._key(probe))
        except Exception as error:
            raise self._error(error, "deleting", probe) from None

    # -- helpers -----------------------------------------------------------------

    def _existing(self, keys: builtins.list[str]) -> builtins.list[str]:
        if len(keys) == 1:
            return keys if self.size_of(keys[0]) is not None else []
        return sorted(self._listed(keys, fallback=True))

    def _listed(self, keys: builtins.list[str], *, fallback: bool = False) -> dict[str, tuple[int, str]]:
        """(size, ETag) of those `keys` that exist, from one listing of their common folder
        (one request per 1,000 objects instead of a HEAD each)."""
        folder = os.path.commonprefix(keys)
        folder = folder[: folder.rfind("/") + 1]
        if not folder:
            if not fallback:
                return {}
            return {key: (size, "") for key in keys if (size := self.size_of(key)) is not None}
        wanted = set(keys)
        found: dict[str, tuple[int, str]] = {}
        try:
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + folder):
                for item in page.get("Contents", ()):
                    key = item["Key"][len(self.prefix) :]
                    if key in wanted:
                        found[key] = (item["Size"], item["ETag"])
        except Exception as error:
            raise self._error(error, "listing", folder) from None
        return found


class _WholeFetch:
    """One object, one GET: streamed to its file and hashed on the way."""

    def __init__(self, store: S3Store, item: Fetch, stop: threading.Event, report: Progress) -> None:
        self.store, self.item, self.stop, self.report = store, item, stop, report
        self.digest = ""

    def run(self) -> None:
        item = self.item
        for attempt in range(_STREAM_ATTEMPTS):
            digest = hashlib.sha256()
            received = 0
            length, body = self.store._open(item.key, self.stop)
            try:
                if length != str(item.size):
                    raise StoreError(size_mismatch(self.store.url, item.key, str(length), item.size))
                with open(item.path, "wb" if attempt else "xb") as handle:
                    while chunk := body.read(_READ_CHUNK):
                        if self.stop.is_set():
                            raise StoreError(f"{self.store.url}/{item.key}: download abandoned")
                        received += len(chunk)
                        if received > item.size:
                            raise StoreError(
                                size_mismatch(self.store.url, item.key, f"more than {item.size}", item.size)
                            )
                        digest.update(chunk)
                        handle.write(chunk)
                        self.report(len(chunk))
                if received != item.size:
                    # The answer said the right length and its body ended early: the connection
                    # broke (http.client reports that as a short read), so the GET is made again.
                    raise http.client.IncompleteRead(b"", item.size - received)
                self.digest = digest.hexdigest()
                return
            except _STREAM_ERRORS as error:
                body.close()
                self.report(-received)
                if attempt + 1 == _STREAM_ATTEMPTS or self.stop.is_set():
                    raise self.store._error(error, "downloading", item.key) from None
            except BaseException:
                body.close()
                raise

    def result(self) -> str:
        return self.digest


class _RangedFetch:
    """One big object as ranged GETs in parallel, each part written at its offset.

    sha256 is sequential, so parts are hashed in order as they complete; a part
    that arrives early waits in memory, and no part starts more than `window`
    parts ahead of the hash, which bounds that memory.
    """

    def __init__(
        self, store: S3Store, item: Fetch, part_size: int, window: int, stop: threading.Event, report: Progress
    ) -> None:
        self.store, self.item, self.part_size, self.stop, self.report = store, item, part_size, stop, report
        self.window = max(2, window)
        self.parts = -(-item.size // part_size)
        self.digest = hashlib.sha256()
        self.hashed = 0  # parts hashed so far
        self.waiting: dict[int, bytearray] = {}
        self.turn = threading.Condition()
        self.fd = os.open(item.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        self.closed = False

    def tasks(self) -> list[Callable[[], None]]:
        return [functools.partial(self._part, index) for index in range(self.parts)]

    def _part(self, index: int) -> None:
        with self.turn:
            while index >= self.hashed + self.window and not self.stop.is_set():
                self.turn.wait(0.2)
        start = index * self.part_size
        end = min(self.item.size, start + self.part_size) - 1
        # The part's bytes land in one buffer, read into where they go (no chunks joined
        # afterwards): it is written, then hashed, from there.
        data = bytearray(end - start + 1)
        view = memoryview(data)
        for attempt in range(_STREAM_ATTEMPTS):
            if self.stop.is_set():
                raise StoreError(f"{self.store.url}/{self.item.key}: download abandoned")
            content_range, body = self.store._open(self.item.key, self.stop, f"bytes={start}-{end}")
            received = 0
            try:
                if content_range is None:
                    raise StoreError(
                        f"{self.store.url}/{self.item.key}: the server answered a ranged GET without a "
                        "Content-Range (it ignores Range); this store cannot restore files from "
                        f"{self.store.ranged_threshold:,} bytes up"
                    )
                match = _CONTENT_RANGE.match(content_range)
                if not match or int(match.group(3)) != self.item.size:
                    total = match.group(3) if match else repr(content_range)
                    raise StoreError(size_mismatch(self.store.url, self.item.key, str(total), self.item.size))
                if (int(match.group(1)), int(match.group(2))) != (start, end):
                    raise StoreError(f"{self.store.url}/{self.item.key}: the server sent another range than asked")
                while received < len(data):
                    if self.stop.is_set():
                        raise StoreError(f"{self.store.url}/{self.item.key}: download abandoned")
                    amount = _read_into(body, view[received : received + _READ_CHUNK])
                    if not amount:
                        raise http.client.IncompleteRead(b"", len(data) - received)  # broke off: again
                    received += amount
                    self.report(amount)
                if _read_into(body, bytearray(1)):
                    raise StoreError(
                        f"{self.store.url}/{self.item.key}: part {index} is longer than the range asked for"
                    )
                break
            except _STREAM_ERRORS as error:
                body.close()
                self.report(-received)
                if attempt + 1 == _STREAM_ATTEMPTS:
                    raise self.store._error(error, "downloading", self.item.key) from None
            except BaseException:
                # Closing drops the connection; a body read to its end goes back to the pool instead.
                body.close()
                raise
        while view:
            view = view[os.pwrite(self.fd, view, end + 1 - len(view)) :]
        with self.turn:
            self.waiting[index] = data
            while self.hashed in self.waiting:
                self.digest.update(self.waiting.pop(self.hashed))
                self.hashed += 1
            self.turn.notify_all()

    def close(self) -> None:
        with self.turn:
            if not self.closed:
                self.closed = True
                os.close(self.fd)

    def result(self) -> str:
        with self.turn:
            if self.hashed != self.parts:
                raise StoreError(f"{self.store.url}/{self.item.key}: download incomplete")
            return self.digest.hexdigest()


def _read_into(body: Any, buffer: memoryview | bytearray) -> int:
    """Fill as much of `buffer` as one read gives: in place where the body can (the lean path's
    answer, and botocore's StreamingBody from 1.31 on), else through a read of that many bytes."""
    if hasattr(body, "readinto"):
        return int(body.readinto(buffer))
    chunk = body.read(len(buffer))
    buffer[: len(chunk)] = chunk
    return len(chunk)


def _etag(answer: Any) -> str:
    """An ETag as S3 gives it in an answer or a listing, without its quotes ("" when absent)."""
    return str(answer.get("ETag") or "").strip('"')


def _parse_timestamp(value: str) -> datetime.datetime:
    """S3's two timestamp forms (ISO 8601 in XML bodies, RFC 1123 in headers), without dateutil."""
    try:
        parsed = datetime.datetime.fromisoformat(value)
    except ValueError:
        try:
            parsed = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return botocore.utils.parse_timestamp(value)
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.timezone.utc)


def _permission(action: str) -> str:
    if action.startswith(("reading", "downloading", "listing")):
        return "GetObject/s3:ListBucket"
    if action.startswith("deleting"):
        return "DeleteObject"
    return "PutObject"


def create_bucket(
    url: str, region: str | None = None, *, profile: str | None = None, endpoint_url: str | None = None
) -> bool:
    """Create the bucket of `url` the safe way; True if created, False if it was already ours.

    New buckets get Block Public Access (all four settings), default
    encryption (SSE-S3), a lifecycle rule that aborts multipart uploads left
    by an interrupted sync after 7 days, and the `gpurun:managed=true` tag.
    A bucket that already exists is left exactly as it is.
    """
    bucket, _prefix = parse_url(url)
    session = _session(profile, region, f"bucket {bucket}")
    region = region or session.get_config_variable("region") or "us-east-1"
    client = _client(
        session,
        region_name=region,
        endpoint_url=endpoint_url,
        config=botocore.config.Config(retries={"mode": "standard", "max_attempts": 10}),
    )
    args: dict[str, Any] = {"Bucket": bucket}
    if region != "us-east-1":
        args["CreateBucketConfiguration"] = {"LocationConstraint": region}
    try:
        client.create_bucket(**args)
    except botocore.exceptions.ClientError as error:
        code = _code(error)
        if code == "BucketAlreadyOwnedByYou":
            return False
        if code == "BucketAlreadyExists":
            raise StoreError(
                f"bucket {bucket} belongs to another AWS account (bucket names are global); choose another name"
            ) from None
        if code in _DENIED_CODES:
            raise StoreError(
                f"access denied creating bucket {bucket}; the credentials in use need s3:CreateBucket"
            ) from None
        raise StoreError(
            f"creating bucket {bucket} failed: {code}: {error.response['Error'].get('Message', '')}"
        ) from None
    except botocore.exceptions.NoCredentialsError:
        raise StoreError(
            f"creating bucket {bucket}: no AWS credentials found; set AWS_PROFILE, run `aws configure`, or use an instance role"
        ) from None
    try:
        client.put_public_access_block(
            Bucket=bucket,
            PublicAccessBlockConfiguration={
                "BlockPublicAcls": True,
                "IgnorePublicAcls": True,
                "BlockPublicPolicy": True,
                "RestrictPublicBuckets": True,
            },
        )
        client.put_bucket_encryption(
            Bucket=bucket,
            ServerSideEncryptionConfiguration={
                "Rules": [{"ApplyServerSideEncryptionByDefault": {"SSEAlgorithm": "AES256"}, "BucketKeyEnabled": True}]
            },
        )
        client.put_bucket_lifecycle_configuration(
            Bucket=bucket,
            LifecycleConfiguration={
                "Rules": [
                    {
                        "ID": "gpurun-abort-incomplete-uploads",
                        "Status": "Enabled",
                        "Filter": {"Prefix": ""},
                        "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 7},
                    }
                ]
            },
        )
        client.put_bucket_tagging(Bucket=bucket, Tagging={"TagSet": [{"Key": "gpurun:managed", "Value": "true"}]})
    except botocore.exceptions.ClientError as error:
        raise StoreError(
            f"bucket {bucket} was created but securing it failed ({_code(error)}); check it in the S3 console"
        ) from None
    return True


def _session(profile: str | None, region: str | None, what: str) -> botocore.session.Session:
    """A botocore session of its own (its handlers are changed), for `profile` and `region`.

    botocore rather than boto3: nothing here uses what boto3 adds, and importing it costs
    0.05 s before the first request.
    """
    session = botocore.session.Session(profile=profile)
    if region:
        session.set_config_variable("region", region)
    try:
        session.get_scoped_config()
    except botocore.exceptions.ProfileNotFound:
        raise StoreError(f"{what}: AWS profile {profile!r} not found in ~/.aws/config") from None
    return session


def _client(session: botocore.session.Session, **options: Any) -> S3Client:
    return cast("S3Client", session.create_client("s3", **options))


def _timestamp(value: Any) -> float | None:
    """LastModified as botocore parses it (a datetime), in seconds since the epoch."""
    return value.timestamp() if hasattr(value, "timestamp") else None
