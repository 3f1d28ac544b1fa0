"""moto's S3 over real HTTP on 127.0.0.1 for the whole session (fixtures `moto_server`, `s3_bucket`).

One `ThreadedMotoServer` serves every test; each test that asks for
`s3_bucket` gets a fresh bucket and AWS_ENDPOINT_URL pointing at the server
(through monkeypatch, so only for that test). A server that cannot start is a
failure, never a skip: install `moto[server]`.
"""

from __future__ import annotations

import logging
import re
import threading
import time
import uuid
from collections.abc import Iterator
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
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
    from moto.server import ThreadedMotoServer
    from werkzeug.serving import make_server

    def delaying(app: Any) -> Any:
        def wrapped(environ: dict[str, Any], start_response: Any) -> Any:
            match = _DELAY.search(environ.get("PATH_INFO", ""))
            if match and environ["REQUEST_METHOD"] == "GET":
                time.sleep(int(match.group(1)) / 1000)
            return app(environ, start_response)

        return wrapped

    class DelayingServer(ThreadedMotoServer):
        def _server_entry(self) -> None:
            app = delaying(DomainDispatcherApplication(create_backend_app))
            self._server = make_server(self._ip_address, self._port, app, True)
            self._server_ready_event.set()
            self._server.serve_forever()

    server = DelayingServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()
