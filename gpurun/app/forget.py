"""`gpurun forget RUN...`: drop ended runs from this computer's list (their store copy stays)."""

from __future__ import annotations

from gpurun import runs
from gpurun.errors import BadInput


def forget(names: list[str]) -> list[str]:
    """Remove the records of ended runs; every name is checked before any record is removed."""
    records = [runs.load(name) for name in names]
    live = [record["run"] for record in records if record["state"] != "ended"]
    if live:
        raise BadInput(
            f"{', '.join(live)}: not ended; `gpurun teardown {live[0]}` first (forget only drops ended runs)"
        )
    for record in records:
        with runs.locked(record["run"]):
            runs.delete(record["run"])
    return [record["run"] for record in records]
