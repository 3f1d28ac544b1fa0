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
        remote, unreadable = runs.load_all_from_store(store_url)
        here = {r["run"] for r in records}  # this computer's record of a run is the newer word on it
        records += [r for r in remote if r["run"] not in here]
        for problem in unreadable:
            ui.warn(problem)
    # A run torn down here is "known" only while it still runs; leftovers of ended runs are leaks.
    known = {r["run"] for r in records if r["state"] != "ended"}
    provider = AwsProvider()
    recorded = {(r.get("spec") or {}).get("aws", {}).get("region") for r in records if r["provider"] == provider.name}
    regions = regions or sorted(str(region) for region in recorded if region is not None)
    with ui.spinner("looking for gpurun-tagged resources"):
        orphans = provider.find_orphans(known, regions=regions or None, profile=profile)
    if not orphans:
        ui.say("no orphaned gpurun resources")
        return {"orphans": [], "removed": []}
    rows = [
        [
            o.get("run") or "-",
            o.get("region") or "global",
            o["kind"] + (" (kept)" if o.get("kept") else ""),
            str(o["id"]) + (f" {o['name']}" if o.get("name") else ""),
            o.get("owner") or "-",
        ]
        for o in orphans
    ]
    ui.table(["RUN", "REGION", "KIND", "ID", "OWNER"], rows, title="gpurun resources no live local record knows")
    removable = [o for o in orphans if not o.get("kept")]
    if any(o.get("kept") for o in orphans):
        ui.say("teardown never deletes images: `gpurun image delete NAME` removes one and its snapshots")
    if not removable:
        return {"orphans": orphans, "removed": []}
    if not yes and not confirm(f"Remove these {len(removable)} resources?"):
        raise BadInput("not confirmed; nothing was removed")
    removed = provider.remove_orphans(removable, ui.say, profile=profile)
    for item in removed:
        ui.say(f"removed {item}")
    return {"orphans": orphans, "removed": removed}
