"""The spot interruption poller against a fake IMDSv2 over real HTTP (token flow required)."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request

import pytest

from gpurun.agent import imds
from tests.plugins.fake_imds import SPOT_PATH, TOKEN_PATH


@pytest.fixture(autouse=True)
def _fresh_clients() -> None:
    imds._clients.clear()


def test_fake_refuses_gets_without_a_token(fake_imds) -> None:
    """The fake is strict like the real service, so a v1-style client cannot pass these tests."""
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(fake_imds.url + SPOT_PATH, timeout=2)
    assert refused.value.code == 401
    request = urllib.request.Request(fake_imds.url + TOKEN_PATH, method="PUT")
    with pytest.raises(urllib.error.HTTPError) as no_ttl:
        urllib.request.urlopen(request, timeout=2)
    assert no_ttl.value.code == 400


def test_no_notice_is_none_then_the_notice_appears(fake_imds) -> None:
    assert imds.spot_notice() is None
    assert fake_imds.gets(SPOT_PATH) == [404]
    posted = fake_imds.interrupt(when="2030-01-01T00:02:00Z")
    notice = imds.spot_notice()
    assert notice == posted == {"action": "terminate", "time": "2030-01-01T00:02:00Z"}
    assert not imds.unreachable()


def test_token_is_cached_between_polls(fake_imds) -> None:
    for _ in range(5):
        assert imds.spot_notice() is None
    assert fake_imds.token_puts == 1
    assert fake_imds.gets(SPOT_PATH) == [404] * 5


def test_revoked_token_is_replaced_once(fake_imds) -> None:
    assert imds.spot_notice() is None
    fake_imds.revoke_tokens()
    fake_imds.interrupt(action="stop")
    assert imds.spot_notice()["action"] == "stop"
    assert fake_imds.token_puts == 2
    assert fake_imds.gets(SPOT_PATH) == [404, 401, 200]


def test_token_refreshed_before_it_expires(fake_imds, monkeypatch) -> None:
    now = [1000.0]
    monkeypatch.setattr(imds.time, "monotonic", lambda: now[0])
    client = imds.MetadataClient(token_ttl=21600)
    assert client.spot_notice() is None
    now[0] += 21600 - 120  # still two minutes left: reuse
    assert client.spot_notice() is None
    assert fake_imds.token_puts == 1
    now[0] += 90  # within the last minute: fetch a new one before the service refuses it
    assert client.spot_notice() is None
    assert fake_imds.token_puts == 2


def test_endpoint_follows_the_environment(fake_imds, monkeypatch) -> None:
    fake_imds.interrupt()
    assert imds.spot_notice() is not None
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", fake_imds.url + "/")
    assert imds.client().endpoint == fake_imds.url


def test_unreadable_notice_still_counts(fake_imds) -> None:
    fake_imds.spot = ["not", "a", "dict"]  # type: ignore[assignment]
    notice = imds.spot_notice()
    assert notice is not None and notice["action"] == "unknown"


def test_instance_identity(fake_imds) -> None:
    assert imds.instance_identity()["instanceId"] == "i-0123456789abcdef0"


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_no_metadata_service_is_none_and_then_unreachable(monkeypatch) -> None:
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    for attempt in range(imds.MAX_FAILURES):
        assert not imds.unreachable(), attempt
        assert imds.spot_notice(timeout=0.5) is None
    assert imds.unreachable()
    assert imds.consecutive_failures() == imds.MAX_FAILURES


def test_silent_endpoint_times_out_quickly(monkeypatch) -> None:
    """A service that accepts but never answers costs one timeout, not a hang."""
    import time

    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
        started = time.monotonic()
        assert imds.spot_notice(timeout=0.3) is None
        assert time.monotonic() - started < 2
    assert imds.consecutive_failures() == 1


def test_recovers_after_failures(fake_imds, monkeypatch) -> None:
    real = fake_imds.url
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    client = imds.MetadataClient()
    for _ in range(imds.MAX_FAILURES):
        client.spot_notice(timeout=0.5)
    assert client.unreachable
    client.endpoint = real
    fake_imds.interrupt()
    assert client.spot_notice() is not None
    assert not client.unreachable
