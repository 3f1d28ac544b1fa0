"""moto in-process the way every AWS test needs it (fixtures `session`, `moto_validation`, `ip_echo`).

AMI, instance-type and key-pair validation are on, so tests catch what AWS
would reject; moto's bundled AMIs are loaded from a file (MOTO_AMIS_PATH),
which skips its ~1,100 "latest" AMIs per region; and the caller's IP comes
from a loopback "what is my IP" server, never the internet.
"""

from __future__ import annotations

import gzip
import http.server
import importlib.resources
import os
import threading
from collections.abc import Iterator
from typing import Any

import pytest

# moto reads these when first imported; the fixture also sets them on moto.settings.
os.environ.setdefault("MOTO_EC2_ENABLE_INSTANCE_TYPE_VALIDATION", "true")
os.environ.setdefault("MOTO_ENABLE_AMI_VALIDATION", "true")
os.environ.setdefault("MOTO_ENABLE_KEYPAIR_VALIDATION", "true")

CALLER_IP = "198.51.100.23"
_VALIDATION = ("EC2_ENABLE_INSTANCE_TYPE_VALIDATION", "ENABLE_AMI_VALIDATION", "ENABLE_KEYPAIR_VALIDATION")


@pytest.fixture(scope="session")
def bundled_amis(tmp_path_factory: pytest.TempPathFactory) -> str:
    """moto's 44 bundled AMIs as a file for MOTO_AMIS_PATH."""
    data = importlib.resources.files("moto.ec2").joinpath("resources/amis.json.gz").read_bytes()
    path = tmp_path_factory.mktemp("moto") / "amis.json"
    path.write_bytes(gzip.decompress(data))
    return str(path)


@pytest.fixture
def moto_validation(monkeypatch: pytest.MonkeyPatch, bundled_amis: str) -> None:
    enable_moto_validation(monkeypatch, bundled_amis)


def enable_moto_validation(monkeypatch: pytest.MonkeyPatch, bundled_amis: str) -> None:
    import moto.settings

    monkeypatch.setenv("MOTO_AMIS_PATH", bundled_amis)
    for name in _VALIDATION:
        monkeypatch.setattr(moto.settings, name, True)
    monkeypatch.setenv("GPURUN_IP_ECHO_URLS", "http://127.0.0.1:9/")  # nothing listens: never the internet


@pytest.fixture
def session(moto_validation: None) -> Iterator[Any]:
    """A boto3 session on moto (in-process, validation on)."""
    import boto3
    from moto import mock_aws

    from gpurun.providers.aws.session import new_botocore_session

    with mock_aws():
        yield boto3.Session(botocore_session=new_botocore_session(), region_name="us-east-1")


class _EchoHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        body = f"{CALLER_IP}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def ip_echo(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A "what is my IP" answer on loopback, after a URL where nothing listens (the fallback is exercised)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _EchoHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("GPURUN_IP_ECHO_URLS", f"http://127.0.0.1:9/, http://127.0.0.1:{server.server_address[1]}/ip")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    yield CALLER_IP
    server.shutdown()
    server.server_close()
