"""The EC2 instance metadata service (IMDSv2), as the checkpoint agent needs it.

Only the standard library: this runs in the agent's small virtual environment.

    token = PUT /latest/api/token            X-aws-ec2-metadata-token-ttl-seconds: 21600
    GET /latest/meta-data/spot/instance-action   X-aws-ec2-metadata-token: <token>
        404                -> no interruption pending
        200 {"action": "terminate", "time": "2026-01-01T12:00:00Z"}

The endpoint follows AWS_EC2_METADATA_SERVICE_ENDPOINT (default
http://169.254.169.254), so tests serve a fake one. Tokens are cached until a
minute before they expire, and fetched again when the service answers 401.
Network errors give None; after `MAX_FAILURES` in a row `unreachable()` is
true, so a caller off EC2 can stop polling.
"""

from __future__ import annotations

import http.client
import json
import os
import threading
import time
import urllib.error
import urllib.request
from typing import Any

DEFAULT_ENDPOINT = "http://169.254.169.254"
TOKEN_TTL_SECONDS = 21600
MAX_FAILURES = 3

_SPOT_PATH = "/latest/meta-data/spot/instance-action"
_IDENTITY_PATH = "/latest/dynamic/instance-identity/document"

# Never send metadata requests through a proxy.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class MetadataClient:
    """IMDSv2 with a cached session token and a count of consecutive network failures."""

    def __init__(self, endpoint: str | None = None, *, token_ttl: int = TOKEN_TTL_SECONDS) -> None:
        self.endpoint = (endpoint or endpoint_from_env()).rstrip("/")
        self.token_ttl = token_ttl
        self.failures = 0
        self._token: str | None = None
        self._token_expires = 0.0
        self._lock = threading.Lock()

    @property
    def unreachable(self) -> bool:
        """True after MAX_FAILURES network errors in a row: most likely not on EC2."""
        return self.failures >= MAX_FAILURES

    def _request(self, method: str, path: str, headers: dict[str, str], timeout: float) -> tuple[int, bytes]:
        request = urllib.request.Request(self.endpoint + path, method=method, headers=headers)
        try:
            with _OPENER.open(request, timeout=timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            with error:
                return error.code, error.read()

    def _get_token(self, timeout: float) -> str | None:
        with self._lock:
            if self._token and time.monotonic() < self._token_expires:
                return self._token
        status, body = self._request(
            "PUT", "/latest/api/token", {"X-aws-ec2-metadata-token-ttl-seconds": str(self.token_ttl)}, timeout
        )
        if status != 200:
            return None
        token = body.decode("ascii", "replace").strip()
        margin = min(60.0, self.token_ttl / 2)
        with self._lock:
            self._token = token
            self._token_expires = time.monotonic() + self.token_ttl - margin
        return token

    def forget_token(self) -> None:
        with self._lock:
            self._token = None
            self._token_expires = 0.0

    def get(self, path: str, *, timeout: float = 1.0) -> tuple[int, bytes] | None:
        """(status, body) of a GET with a session token; None when the service cannot be reached."""
        try:
            for _attempt in range(2):
                token = self._get_token(timeout)
                if token is None:
                    self.failures = 0
                    return 401, b""
                status, body = self._request("GET", path, {"X-aws-ec2-metadata-token": token}, timeout)
                if status != 401:
                    break
                # The token expired or the service restarted: fetch a new one once.
                self.forget_token()
        except (OSError, ValueError, http.client.HTTPException):
            # URLError, timeouts, refused connections, resets: no metadata service here (yet).
            self.failures += 1
            return None
        self.failures = 0
        return status, body

    def spot_notice(self, *, timeout: float = 1.0) -> dict[str, Any] | None:
        """The pending spot interruption (`{"action": "terminate", "time": ...}`), or None."""
        answer = self.get(_SPOT_PATH, timeout=timeout)
        if answer is None or answer[0] != 200:
            return None
        text = answer[1].decode("utf-8", "replace")
        try:
            notice = json.loads(text)
        except ValueError:
            notice = None
        if not isinstance(notice, dict):
            # Something is pending even if we cannot read it: better to sync now than to wait.
            return {"action": "unknown", "raw": text}
        return notice

    def instance_identity(self, *, timeout: float = 1.0) -> dict[str, Any] | None:
        """The instance identity document (instanceId, region, instanceType, ...), or None."""
        answer = self.get(_IDENTITY_PATH, timeout=timeout)
        if answer is None or answer[0] != 200:
            return None
        try:
            document = json.loads(answer[1])
        except ValueError:
            return None
        return document if isinstance(document, dict) else None


def endpoint_from_env() -> str:
    return (os.environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


_clients: dict[str, MetadataClient] = {}
_clients_lock = threading.Lock()


def client() -> MetadataClient:
    """The shared client for the endpoint currently in the environment."""
    endpoint = endpoint_from_env()
    with _clients_lock:
        found = _clients.get(endpoint)
        if found is None:
            found = _clients[endpoint] = MetadataClient(endpoint)
        return found


def spot_notice(timeout: float = 1.0) -> dict[str, Any] | None:
    """Poll once: the pending spot interruption notice, or None (none pending, or no service)."""
    return client().spot_notice(timeout=timeout)


def instance_identity(timeout: float = 1.0) -> dict[str, Any] | None:
    return client().instance_identity(timeout=timeout)


def unreachable() -> bool:
    """True after MAX_FAILURES network errors in a row: the caller may stop polling."""
    return client().unreachable


def consecutive_failures() -> int:
    return client().failures
