"""`gpurun teardown --orphans`: gpurun-tagged AWS resources that no live local record knows."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gpurun import runs
from gpurun.app.reporter import Reporter
from gpurun.errors import BadInput


def teardown_orphans(
    ui: Reporter,
    *,
    yes: bool,
    confirm: Callable[[str], bool],
    profile: str | None = None,
    regions: list[str] | None = None,
    store_url: str | None = None,
) -> dict[str, Any]:
    from gpurun.providers.aws import AwsProvider

    records, _problems = runs.load_all()
    if store_url:
        # Runs other computers launched and recorded live in the store are theirs, not orphans.
        records += _store_records(store_url)
    # A run torn down here is "known" only while it still runs; leftovers of ended runs are leaks.
    known = {r["run"] for r in records if r["state"] != "ended"}
    regions = regions or sorted(
        {r.get("spec", {}).get("aws", {}).get("region") for r in records if r["provider"] == "aws"} - {None}
    )
    provider = AwsProvider()
    with ui.spinner("looking for gpurun-tagged resources"):
        orphans = provider.find_orphans(known, regions=regions or None, profile=profile)
    if not orphans:
        ui.say("no orphaned gpurun resources")
        return {"orphans": [], "removed": []}
    rows = [[o.get("run") or "-", o.get("region") or "global", o["kind"], str(o["id"]), o.get("owner") or "-"] for o in orphans]
    ui.table(["RUN", "REGION", "KIND", "ID", "OWNER"], rows, title="gpurun resources no live local record knows")
    if not yes and not confirm(f"Remove these {len(orphans)} resources?"):
        raise BadInput("not confirmed; nothing was removed")
    removed = provider.remove_orphans(orphans, ui.say, profile=profile)
    for item in removed:
        ui.say(f"removed {item}")
    return {"orphans": orphans, "removed": removed}


def _store_records(store_url: str) -> list[dict[str, Any]]:
    if store_url.startswith("file://") and not store_url.startswith("file:///"):
        raise BadInput(f"store {store_url!r}: a file store needs an absolute path, like file:///data/checkpoints")
    from gpurun.store import open_store
    from gpurun.store.snapshots import list_run_records

    return [r for r in list_run_records(open_store(store_url)) if isinstance(r, dict) and r.get("run") and r.get("state")]
