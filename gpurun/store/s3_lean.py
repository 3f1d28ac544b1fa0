"""Small objects to and from S3 without botocore's per-request machinery.

`S3Store` sends the files of a snapshot up to `lean_max_size`, and fetches the
files of a restore, through here. A checkpoint of 2,000 small files is 2,000
requests, and botocore spends 1.3 to 1.9 ms of CPU on each (event hooks,
parameter validation, endpoint rules, serialising, signing, parsing): more than
the bytes cost, and on a small machine that CPU is the wall time. Here a request
is signed with SigV4 (`bootstrap.sign`, which the tests hold to botocore's own
signer) and sent with `http.client` over kept-alive connections, for about a
quarter of that CPU (docs/benchmarks.md).

What it takes from the store's botocore client, so both reach the same place the same way:

- where to send, and what to sign for: the client builds and signs one HeadObject
  that is never sent (a before-send handler of ours answers it), and its URL and
  credential scope give the endpoint (AWS_ENDPOINT_URL, the profile's settings,
  path or virtual-hosted style, accelerate, dual-stack) and the region and
  service name to sign for;
- credentials: the session's, frozen for each request (botocore refreshes
  them before they expire);
- the client's before-send handlers see every request, and one may answer it
  (moto's in-process mock, a test's injected fault), as for the client's own.

Not used (`LeanS3.for_client` returns None, the store stays on its botocore client) when the
client would go through a proxy or present a client certificate, or does not
sign with plain SigV4 (an S3 Express session, no credentials).

Answers: 2xx is success. 500, 502, 503, 504, S3's throttling and timeout codes,
and connections that fail are tried again with jittered exponential backoff.
Anything else raises `Refused` with the status and S3's error Code, read from at
most 64 KiB of the answer; the caller maps it as it maps botocore's errors.
"""

from __future__ import annotations

import hashlib
import http.client
import io
import random
import re
import socket
import ssl
import threading
import time
import urllib.parse
import uuid
from typing import Any, cast

import botocore.awsrequest
import botocore.httpsession
import botocore.utils

from gpurun import bootstrap

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
ERROR_LIMIT = 64 * 1024
ATTEMPTS = 8
BACKOFF_BASE_S = 0.2
BACKOFF_MAX_S = 20.0
_RETRY_STATUS = {500, 502, 503, 504}
_RETRY_CODES = {
    "SlowDown",
    "InternalError",
    "ServiceUnavailable",
    "RequestTimeout",
    "RequestTimeoutException",
    "PriorRequestNotComplete",
    "Throttling",
    "ThrottlingException",
    "RequestLimitExceeded",
}
_CODE = re.compile(rb"<Code>([^<]{1,100})</Code>")
_MESSAGE = re.compile(rb"<Message>([^<]{0,500})</Message>")
_SCOPE = re.compile(r"^AWS4-HMAC-SHA256 Credential=[^/,\s]+/\d{8}/([a-z0-9-]+)/([a-z0-9-]+)/aws4_request,")
_NETWORK_ERRORS = (OSError, http.client.HTTPException)


class Refused(Exception):
    """S3 answered with something other than success (after the retries a failure deserves)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"HTTP {status} {code or '(no code)'}: {message}")
        self.status, self.code, self.message = status, code, message


class Unreachable(Exception):
    """No answer at all, on every attempt (the last network error is the cause)."""


class Abandoned(Exception):
    """The caller's stop event was set between attempts."""


class Response:
    """A successful answer whose body is read by the caller; `close` gives the connection back
    when the body was read to its end, and drops it otherwise."""

    def __init__(self, reply: Any, connection: http.client.HTTPConnection | None, pool: _Connections) -> None:
        self._reply, self._connection, self._pool = reply, connection, pool
        self.status: int = reply.status

    def header(self, name: str) -> str | None:
        value = self._reply.getheader(name)
        return None if value is None else str(value)

    def read(self, amount: int) -> bytes:
        data: bytes = self._reply.read(amount)
        if self._connection is not None and self._reply.isclosed():
            self.close()  # read to its end: the connection serves the next request
        return data

    def readinto(self, buffer: memoryview | bytearray) -> int:
        """As `read`, into `buffer` (no bytes object made); 0 at the end of the body."""
        count = int(self._reply.readinto(buffer))
        if self._connection is not None and self._reply.isclosed():
            self.close()
        return count

    def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        # Read to its end: http.client closes the answer with no bytes left. A body that broke off
        # is closed too, with bytes still owed: its connection is the server's closed one.
        if self._reply.isclosed() and not getattr(self._reply, "length", None):
            self._pool.give(connection)
        else:
            self._reply.close()
            connection.close()


class _Canned:
    """An answer from a before-send handler (botocore's AWSResponse), read like http.client's."""

    def __init__(self, answer: Any) -> None:
        self.status = int(answer.status_code)
        self._headers = {str(name).lower(): str(value) for name, value in answer.headers.items()}
        self._body = io.BytesIO(answer.content or b"")

    def getheader(self, name: str) -> str | None:
        return self._headers.get(name.lower())

    def read(self, amount: int | None = None) -> bytes:
        return self._body.read(-1 if amount is None else amount)

    def readinto(self, buffer: memoryview | bytearray) -> int:
        return self._body.readinto(buffer)

    def isclosed(self) -> bool:
        return True

    def close(self) -> None:
        self._body.close()


class _NoBody:
    def stream(self, **_kwargs: Any) -> Any:
        return iter(())


class _Connections:
    """Kept-alive connections to one host, taken by one request at a time."""

    def __init__(
        self,
        scheme: str,
        host: str,
        port: int | None,
        context: ssl.SSLContext | None,
        connect_timeout: float,
        read_timeout: float,
        keep: int,
    ) -> None:
        self.scheme, self.host, self.port, self.context = scheme, host, port, context
        self.connect_timeout, self.read_timeout, self.keep = connect_timeout, read_timeout, keep
        self._idle: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    def take(self) -> tuple[http.client.HTTPConnection, bool]:
        """A connection, and whether it served a request before (and may have gone stale)."""
        with self._lock:
            if self._idle:
                return self._idle.pop(), True
        if self.scheme == "https":
            connection: http.client.HTTPConnection = http.client.HTTPSConnection(
                self.host, self.port, timeout=self.connect_timeout, context=self.context
            )
        else:
            connection = http.client.HTTPConnection(self.host, self.port, timeout=self.connect_timeout)
        return connection, False

    def open(self, connection: http.client.HTTPConnection) -> None:
        if connection.sock is None:
            connection.connect()
            sock = connection.sock
            if sock is not None:
                sock.settimeout(self.read_timeout)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)

    def give(self, connection: http.client.HTTPConnection) -> None:
        with self._lock:
            if len(self._idle) < self.keep:
                self._idle.append(connection)
                return
        connection.close()

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()


class LeanS3:
    """Signed GETs and PUTs of objects in one bucket, the way the store's botocore client would send them."""

    def __init__(
        self,
        base_url: str,
        region: str,
        service: str,
        credentials: Any,
        events: Any,
        pool: _Connections,
    ) -> None:
        self.base_url, self.region, self.service = base_url, region, service
        self._base_path = urllib.parse.urlsplit(base_url).path
        self._credentials = credentials
        self._events = events
        self._pool = pool

    @classmethod
    def for_client(
        cls,
        client: Any,
        credentials: Any,
        bucket: str,
        *,
        events: Any,
        ca_bundle: str | None,
        connect_timeout: float,
        read_timeout: float,
        keep: int,
    ) -> LeanS3 | None:
        """The lean path for `bucket` as `client` would reach it, or None where only boto3 knows the way.

        `client` is a client made for the probe alone (its handlers change for a moment);
        `events` are those of the client the store uses, whose before-send handlers the
        lean requests go through.
        """
        config = client.meta.config
        if credentials is None or config.proxies or getattr(config, "client_cert", None):
            return None
        probe = f"gpurun-lean-probe-{uuid.uuid4().hex}"
        seen: dict[str, Any] = {}

        def answer(request: Any, **_kwargs: Any) -> Any:
            if probe not in request.url:
                return None
            seen["url"] = request.url
            seen["headers"] = {str(name).lower(): _text(value) for name, value in request.headers.items()}
            return botocore.awsrequest.AWSResponse(request.url, 200, botocore.awsrequest.HTTPHeaders(), _NoBody())

        client.meta.events.register_first("before-send.s3.HeadObject", answer)
        try:
            client.head_object(Bucket=bucket, Key=probe)
        except Exception:  # noqa: BLE001 - no credentials, a bad endpoint: boto3 will say so itself
            return None
        url, headers = seen.get("url", ""), seen.get("headers", {})
        scope = _SCOPE.match(headers.get("authorization", ""))
        parsed = urllib.parse.urlsplit(url)
        quoted = urllib.parse.quote(probe, safe="/~")
        if scope is None or "x-amz-s3session-token" in headers or parsed.query or not parsed.path.endswith(quoted):
            return None
        if botocore.utils.get_environ_proxies(url).get(parsed.scheme):
            return None
        base_url = url[: len(url) - len(quoted)]
        context = None
        if parsed.scheme == "https":
            context = ssl.create_default_context(cafile=ca_bundle or botocore.httpsession.get_cert_path(True))
        elif parsed.scheme != "http":
            return None
        pool = _Connections(
            parsed.scheme, parsed.hostname or "", parsed.port, context, connect_timeout, read_timeout, keep
        )
        return cls(base_url, scope.group(1), scope.group(2), credentials, events, pool)

    def close(self) -> None:
        self._pool.close()

    def put(
        self,
        key: str,
        body: bytes,
        sha256: str,
        headers: dict[str, str],
        stop: threading.Event | None = None,
    ) -> None:
        """PutObject; `sha256` (of `body`) is signed, so S3 refuses bytes that do not match it."""
        response = self.send("PUT", key, body=body, sha256=sha256, headers=headers, operation="PutObject", stop=stop)
        try:
            response.read(ERROR_LIMIT)
        finally:
            response.close()

    def get(self, key: str, stop: threading.Event | None = None, headers: dict[str, str] | None = None) -> Response:
        """GetObject (`headers` may ask for a range); the caller reads the body and closes the response."""
        return self.send("GET", key, headers=headers, operation="GetObject", stop=stop)

    def send(
        self,
        method: str,
        key: str,
        *,
        body: bytes = b"",
        sha256: str = EMPTY_SHA256,
        headers: dict[str, str] | None = None,
        operation: str,
        stop: threading.Event | None = None,
    ) -> Response:
        quoted = urllib.parse.quote(key, safe="/~")
        url, path = self.base_url + quoted, self._base_path + quoted
        for attempt in range(ATTEMPTS):
            if stop is not None and stop.is_set():
                raise Abandoned(key)
            signed = self._sign(method, url, headers or {}, sha256)
            # A plain dict for headers: what handlers read of them (items, get) it has, at no cost.
            prepared = botocore.awsrequest.AWSPreparedRequest(
                method, url, cast(Any, signed), body or None, method == "GET"
            )
            _handler, answer = self._events.emit_until_response(f"before-send.s3.{operation}", request=prepared)
            connection: http.client.HTTPConnection | None = None
            if answer is not None:
                reply: Any = _Canned(answer)
            else:
                connection, reused = self._pool.take()
                try:
                    self._pool.open(connection)
                    connection.request(method, path, body=body or None, headers=signed)
                    reply = connection.getresponse()
                except _NETWORK_ERRORS as error:
                    connection.close()
                    # A certificate that does not verify fails the same way every time: boto3's turn.
                    if attempt + 1 == ATTEMPTS or isinstance(error, ssl.SSLError):
                        raise Unreachable(f"{type(error).__name__}: {error}") from error
                    # A kept-alive connection that the server had closed: again at once, on a new one.
                    self._pause(attempt, stop, at_once=reused and attempt == 0)
                    continue
                except BaseException:
                    connection.close()
                    raise
            response = Response(reply, connection, self._pool)
            if 200 <= reply.status < 300:
                return response
            code, message = _error_of(response)
            if (reply.status in _RETRY_STATUS or code in _RETRY_CODES) and attempt + 1 < ATTEMPTS:
                self._pause(attempt, stop)
                continue
            raise Refused(reply.status, code, message)
        raise AssertionError("unreachable")  # pragma: no cover

    def _sign(self, method: str, url: str, headers: dict[str, str], sha256: str) -> dict[str, str]:
        frozen = self._credentials.get_frozen_credentials()
        return bootstrap.sign(
            method,
            url,
            headers=headers,
            body=b"",
            credentials={"key": frozen.access_key, "secret": frozen.secret_key, "token": frozen.token or ""},
            region=self.region,
            service=self.service,
            payload_sha256=sha256,
        )

    @staticmethod
    def _pause(attempt: int, stop: threading.Event | None, *, at_once: bool = False) -> None:
        delay = 0.0 if at_once else random.uniform(0, min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2**attempt))
        if stop is None:
            time.sleep(delay)
        elif stop.wait(delay):
            raise Abandoned("stopped")


def _text(value: Any) -> str:
    return value.decode("latin-1") if isinstance(value, bytes) else str(value)


def _error_of(response: Response) -> tuple[str, str]:
    """S3's error Code and Message from at most ERROR_LIMIT bytes of the answer (a HEAD or a proxy may send none)."""
    try:
        data = response.read(ERROR_LIMIT)
    except _NETWORK_ERRORS:
        data = b""
    finally:
        response.close()
    code = _CODE.search(data)
    message = _MESSAGE.search(data)
    return (
        code.group(1).decode("utf-8", "replace") if code else str(response.status),
        message.group(1).decode("utf-8", "replace") if message else "",
    )
