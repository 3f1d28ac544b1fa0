"""A fake EC2 instance metadata service (IMDSv2 only) over real HTTP (fixture `fake_imds`).

Like the real one it refuses every GET without a valid session token (401),
hands out tokens only to `PUT /latest/api/token` with a TTL header, and answers
404 on `/latest/meta-data/spot/instance-action` until the test calls
`fake_imds.interrupt()`. AWS_EC2_METADATA_SERVICE_ENDPOINT points at it for the test.
"""

from __future__ import annotations

import json
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

TOKEN_PATH = "/latest/api/token"
SPOT_PATH = "/latest/meta-data/spot/instance-action"
IDENTITY_PATH = "/latest/dynamic/instance-identity/document"
CREDENTIALS_PATH = "/latest/meta-data/iam/security-credentials/"


@dataclass
class FakeImds:
    url: str = ""
    spot: dict[str, Any] | None = None
    identity: dict[str, Any] = field(
        default_factory=lambda: {
            "instanceId": "i-0123456789abcdef0",
            "instanceType": "g5.xlarge",
            "region": "us-east-1",
            "availabilityZone": "us-east-1a",
        }
    )
    #: The instance role's name and its credentials (moto accepts any); None: no instance profile.
    role: str | None = "gpurun-test-role"
    credentials: dict[str, str] = field(
        default_factory=lambda: {
            "Code": "Success",
            "AccessKeyId": "ASIAFAKEIMDSKEY00001",
            "SecretAccessKey": "fake-imds-secret",
            "Token": "fake-imds-session-token",
            "Expiration": "2099-01-01T00:00:00Z",
        }
    )
    tokens: dict[str, float] = field(default_factory=dict)  # token -> expiry (monotonic)
    token_puts: int = 0
    requests: list[tuple[str, str, int]] = field(default_factory=list)  # (method, path, status)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def interrupt(self, action: str = "terminate", when: str | None = None) -> dict[str, Any]:
        """Post a spot interruption notice, two minutes out unless `when` is given."""
        when = when or time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 120))
        self.spot = {"action": action, "time": when}
        return self.spot

    def clear(self) -> None:
        self.spot = None

    def revoke_tokens(self) -> None:
        """As after a metadata service restart: every token given out so far is refused."""
        with self.lock:
            self.tokens.clear()

    def gets(self, path: str) -> list[int]:
        return [status for method, seen, status in self.requests if method == "GET" and seen == path]


def _handler(state: FakeImds) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:  # keep test output quiet
            pass

        def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
            with state.lock:
                state.requests.append((self.command, self.path, status))
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_PUT(self) -> None:  # noqa: N802 - http.server's naming
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            if self.path != TOKEN_PATH:
                return self._send(405 if self.path.startswith("/latest/") else 404)
            if self.headers.get("X-Forwarded-For"):
                return self._send(403)
            ttl_header = self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")
            try:
                ttl = int(ttl_header or "")
            except ValueError:
                return self._send(400)
            if not 1 <= ttl <= 21600:
                return self._send(400)
            token = secrets.token_urlsafe(32)
            with state.lock:
                state.tokens[token] = time.monotonic() + ttl
                state.token_puts += 1
            return self._send(200, token.encode(), {"X-aws-ec2-metadata-token-ttl-seconds": str(ttl)})

        def do_GET(self) -> None:  # noqa: N802
            token = self.headers.get("X-aws-ec2-metadata-token")
            with state.lock:
                valid = token is not None and state.tokens.get(token, 0) > time.monotonic()
            if not valid:
                return self._send(401)
            if self.path == SPOT_PATH:
                notice = state.spot
                if notice is None:
                    return self._send(404)
                return self._send(200, json.dumps(notice).encode(), {"Content-Type": "text/plain"})
            if self.path == IDENTITY_PATH:
                return self._send(200, json.dumps(state.identity).encode(), {"Content-Type": "text/plain"})
            if state.role and self.path == CREDENTIALS_PATH:
                return self._send(200, state.role.encode(), {"Content-Type": "text/plain"})
            if state.role and self.path == CREDENTIALS_PATH + state.role:
                return self._send(200, json.dumps(state.credentials).encode(), {"Content-Type": "text/plain"})
            return self._send(404)

    return Handler


def serve_fake_imds(state: FakeImds) -> ThreadingHTTPServer:
    """Serve `state` on a free loopback port (its `url` is set); the caller shuts the server down.

    One per emulated instance: each machine sees its own identity.
    """
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), name="fake-imds", daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    return server


@pytest.fixture
def fake_imds(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeImds]:
    state = FakeImds()
    server = serve_fake_imds(state)
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", state.url)
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
