"""How a recovering run's record follows attempts.json, which its machines write (untrusted)."""

from __future__ import annotations

from typing import Any

import pytest

from gpurun.app.recovering import apply_attempts

RUN = "rec-a1b2c3"
DEFAULT_DIR = f"/home/ubuntu/gpurun/{RUN}"


def _after_reclaim(reported: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "run": RUN,
        "state": "running",
        "machines": [{"rank": 0, "instance_id": "i-first", "run_dir": DEFAULT_DIR, "host": "198.51.100.1"}],
    }
    second = {"instance_id": "i-second", "type": "g5.xlarge", "zone": "us-east-1b", "generation": 2}
    if reported is not None:
        second["run_dir"] = reported
    document = {
        "version": 1,
        "run": RUN,
        "state": "running",
        "restarts_used": 1,
        "max_restarts": 2,
        "machines": [
            {"instance_id": "i-first", "generation": 1, "ended_at": "2026-12-04T20:00:00+00:00", "why": "replaced"},
            second,
        ],
    }
    apply_attempts(record, document)
    return dict(record["machines"][0])


def test_the_record_takes_the_run_directory_the_current_machine_reported() -> None:
    machine = _after_reclaim(f"/data/home/me/gpurun/{RUN}")
    assert machine["instance_id"] == "i-second" and machine["run_dir"] == f"/data/home/me/gpurun/{RUN}"
    assert machine["host"] is None, "its address comes from AWS, not from the first machine"


@pytest.mark.parametrize(
    "reported",
    [
        None,
        "relative/gpurun/" + RUN,
        f"/home/me/../../etc/gpurun/{RUN}",
        f"/home/me/gpurun/{RUN}; rm -rf ~",
        f"/home/me/gpurun/{RUN}\n",
        "/home/me/gpurun/another-run",
        "/" + "a" * 2000 + f"/gpurun/{RUN}",
        42,
    ],
)
def test_a_run_directory_of_another_shape_is_not_taken(reported: Any) -> None:
    machine = _after_reclaim(reported)
    assert machine["instance_id"] == "i-second" and machine["run_dir"] == DEFAULT_DIR


def test_a_replacement_of_another_type_costs_what_its_own_type_costs() -> None:
    """The group fails over to the next type: status's cost-so-far must not bill the first machine's price
    for it, nor show the first machine's address, keys or teardown marks as the new machine's."""
    from datetime import datetime, timedelta, timezone

    from gpurun.providers.aws.provider import _update_machines

    now = datetime.now(timezone.utc)
    record: dict[str, Any] = {
        "run": RUN,
        "state": "running",
        "machines": [
            {
                "rank": 0,
                "instance_id": "i-first",
                "instance_type": "g5.xlarge",
                "price_per_hour": 1.006,
                "run_dir": DEFAULT_DIR,
                "host": "198.51.100.1",
                "private_ip": "10.0.0.5",
                "host_keys": ["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFirstMachineKey"],
                "launch_time": (now - timedelta(hours=3)).isoformat(),
            }
        ],
    }
    started = (now - timedelta(hours=1)).isoformat()
    document = {
        "version": 1,
        "run": RUN,
        "state": "running",
        "machines": [
            {"instance_id": "i-first", "type": "g5.xlarge", "ended_at": started, "why": "reclaimed"},
            {"instance_id": "i-second", "type": "g6.xlarge", "zone": "us-east-1b", "started_at": started},
        ],
    }
    apply_attempts(record, document)
    found = {"i-second": {"State": {"Name": "running"}, "PublicIpAddress": "198.51.100.2", "LaunchTime": started}}
    _update_machines(record, found, "us-east-1", now)
    [machine] = record["machines"]
    assert machine["instance_type"] == "g6.xlarge"
    assert machine["cost_usd"] == pytest.approx(0.8048, abs=0.01), "billed at the first machine's g5.xlarge price"
    assert machine.get("private_ip") is None and not machine.get("host_keys")
