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
