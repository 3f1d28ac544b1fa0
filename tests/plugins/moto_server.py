"""moto's S3 over real HTTP on 127.0.0.1 for the whole session (fixtures `moto_server`, `s3_bucket`,
and endpoints onto the same backend that are slow or answer faults: `slow_moto_server`, `faulty_moto_server`).

One `ThreadedMotoServer` serves every test; each test that asks for
`s3_bucket` gets a fresh bucket and AWS_ENDPOINT_URL pointing at the server
(through monkeypatch, so only for that test). A server that cannot start is a
failure, never a skip: install `moto[server]`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest

START_TIMEOUT = 30.0


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """The endpoint URL (http://127.0.0.1:PORT) of a moto server running in this process."""
    try:
        from moto.server import ThreadedMotoServer
    except Exception as error:  # ImportError, or a broken flask/werkzeug
        pytest.fail(f"moto's server cannot be imported ({error!r}); install moto[server]", pytrace=False)
    # One log line per request would flood the captured output and slow every test.
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    failure: list[BaseException] = []

    def start() -> None:
        try:
            server.start()
        except BaseException as error:  # noqa: BLE001 - reported below
            failure.append(error)

    # start() waits forever when the server thread dies before it is ready: bound it.
    starter = threading.Thread(target=start, daemon=True)
    starter.start()
    starter.join(START_TIMEOUT)
    if failure or starter.is_alive() or server._server is None:
        reason = repr(failure[0]) if failure else f"not ready after {START_TIMEOUT:.0f} s"
        pytest.fail(f"moto server did not start on 127.0.0.1: {reason}", pytrace=False)
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(moto_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """`s3://<fresh bucket>/ckpt` on the moto server; AWS_ENDPOINT_URL points there for this test."""
    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    bucket = f"gpurun-test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/ckpt"


_DELAY = re.compile(r"delay-(\d+)ms")


@pytest.fixture(scope="session")
def slow_moto_server(moto_server: str) -> Iterator[str]:
    """A second endpoint onto the same moto backend that holds a GET of a key named `...delay-<N>ms...` N ms.

    The delay lets a test catch a download in the middle without a fixed
    sleep: files finish one after another, in the order their names say.
    """

    def delaying(app: Any) -> Any:
        def wrapped(environ: dict[str, Any], start_response: Any) -> Any:
            match = _DELAY.search(environ.get("PATH_INFO", ""))
            if match and environ["REQUEST_METHOD"] == "GET":
                time.sleep(int(match.group(1)) / 1000)
            return app(environ, start_response)

        return wrapped

    with _serving(delaying) as endpoint:
        yield endpoint


@contextlib.contextmanager
def _serving(wrap: Callable[[Any], Any]) -> Iterator[str]:
    """A second moto server on the same backend (moto's backends are per process), its app wrapped."""
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from moto.server import ThreadedMotoServer
    from werkzeug.serving import make_server

    class WrappedServer(ThreadedMotoServer):
        def _server_entry(self) -> None:
            app = wrap(DomainDispatcherApplication(create_backend_app))
            self._server = make_server(self._ip_address, self._port, app, True)
            self._server_ready_event.set()
            self._server.serve_forever()

    server = WrappedServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


_SLOWDOWN = re.compile(r"slowdown-(\d+)x")
_EXPIRED = re.compile(r"expired-(\d+)x")
_CUT = re.compile(r"cutbody-(\d+)x")
#: Requests signed with this access key are refused as S3 refuses an unknown one.
REJECTED_ACCESS_KEY = "AKIDREJECTEDBYSERVER"


class FaultyS3:
    """The endpoint of `faulty_moto_server`, and the faults it has answered so far."""

    def __init__(self, endpoint: str, refused: Counter[tuple[str, str]]) -> None:
        self.endpoint = endpoint
        self.refused = refused  # (method, path) -> fault answers given (503 SlowDown, 400 ExpiredToken)


def _s3_error(start_response: Any, status: str, code: str, message: str) -> list[bytes]:
    body = f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code><Message>{message}</Message></Error>"
    start_response(status, [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
    return [body.encode()]


def _cut_short(app: Any, environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """moto's answer with its Content-Length as it is and half its body: the reader sees the
    body break off (the server closes every connection after its answer)."""
    answer: list[Any] = []
    body = b"".join(app(environ, lambda status, headers, *_: answer.extend((status, headers))))
    start_response(*answer)
    return [body[: len(body) // 2]]


@pytest.fixture(scope="session")
def faulty_moto_server(moto_server: str) -> Iterator[FaultyS3]:
    """An endpoint onto the same moto backend that answers as S3 does when it is unhappy:

    - a key named `...slowdown-<N>x...` gets 503 SlowDown for its first N requests of each
      method (PUT, GET), then moto's answer; `...expired-<N>x...` gets 400 ExpiredToken;
    - a GET of a key named `...cutbody-<N>x...` gets moto's status and headers but only half
      the body, then the connection closes, for its first N GETs (ranged or not);
    - a request signed with REJECTED_ACCESS_KEY gets 403 InvalidAccessKeyId.
    """
    refused: Counter[tuple[str, str]] = Counter()
    lock = threading.Lock()

    def faulty(app: Any) -> Any:
        def wrapped(environ: dict[str, Any], start_response: Any) -> Any:
            # Read what the client sent first, as S3 does: it then sees the answer, not a broken pipe.
            length = int(environ.get("CONTENT_LENGTH") or 0)
            body = environ["wsgi.input"].read(length) if length else b""
            environ["wsgi.input"] = io.BytesIO(body)
            if f"Credential={REJECTED_ACCESS_KEY}/" in environ.get("HTTP_AUTHORIZATION", ""):
                return _s3_error(
                    start_response,
                    "403 Forbidden",
                    "InvalidAccessKeyId",
                    "The AWS Access Key Id you provided does not exist in our records.",
                )
            path = environ.get("PATH_INFO", "")
            for pattern, status, code, message in (
                (_SLOWDOWN, "503 Slow Down", "SlowDown", "Please reduce your request rate."),
                (_EXPIRED, "400 Bad Request", "ExpiredToken", "The provided token has expired."),
            ):
                match = pattern.search(path)
                if match:
                    slot = (environ["REQUEST_METHOD"], path)
                    with lock:
                        fault = refused[slot] < int(match.group(1))
                        if fault:
                            refused[slot] += 1
                    if fault:
                        return _s3_error(start_response, status, code, message)
            cut = _CUT.search(path)
            if cut and environ["REQUEST_METHOD"] == "GET":
                slot = ("GET", path)
                with lock:
                    fault = refused[slot] < int(cut.group(1))
                    if fault:
                        refused[slot] += 1
                if fault:
                    return _cut_short(app, environ, start_response)
            return app(environ, start_response)

        return wrapped

    with _serving(faulty) as endpoint:
        yield FaultyS3(endpoint, refused)
