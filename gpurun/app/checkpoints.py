"""`gpurun checkpoint-sync`: sync now, list, download; and the agent mode (--watch)."""

from __future__ import annotations

import secrets
import shlex
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gpurun import jobs, runs
from gpurun.app import common, connections
from gpurun.app.reporter import Reporter
from gpurun.errors import BadInput, GpurunError, InvalidDocument
from gpurun.models import RunRecord
from gpurun.store import open_store
from gpurun.store import snapshots as snaps
from gpurun.store.base import ObjectStore

SYNC_TIMEOUT = 900.0


def record_and_store(run: str, store_url: str | None) -> tuple[RunRecord | None, ObjectStore]:
    try:
        record = runs.load(run)
    except BadInput:
        if store_url is None:
            raise
        record = None
    if store_url is not None:
        return record, open_store(store_url)
    assert record is not None  # without --store, a run unknown here raised above
    return record, common.open_run_store(record)


def list_snapshots(
    run: str, *, store_url: str | None = None, warn: Callable[[str], None] | None = None
) -> list[dict[str, Any]]:
    """The run's snapshots, oldest first; an unreadable manifest is skipped (`warn` hears which)."""
    record, store = record_and_store(run, store_url)
    found = snaps.list_snapshots(store, run, warn=warn)
    if not found and record is None and not _stored_record_exists(store, run):
        raise BadInput(f"unknown run {run!r} in {store.url}")
    return found


def _stored_record_exists(store: ObjectStore, run: str) -> bool:
    try:
        return snaps.get_run_record(store, run) is not None
    except InvalidDocument:
        return True  # there, if unreadable: the run is known, its snapshots are what was asked


def download(
    run: str, dest: Path, *, seq: int | None, ui: Reporter, store_url: str | None = None, force: bool = False
) -> dict[str, Any]:
    """Restore one snapshot into `dest`, all or nothing (see store/restore.py)."""
    _record, store = record_and_store(run, store_url)
    manifest = snaps.resolve_seq(store, run, seq)
    with ui.progress(f"downloading snapshot {manifest['seq']}", manifest["bytes"]) as advance:
        info = snaps.download_snapshot(store, run, dest, manifest=manifest, progress=advance, force=force)
    return {**info, "dir": str(dest), "verified": True}


def sync_now(run: str, ui: Reporter, *, timeout: float = SYNC_TIMEOUT) -> dict[str, Any]:
    """Ask the agent for a snapshot now and wait for it; runs a one-off sync when no agent is alive."""
    from gpurun.app.status import with_current_machine

    record = with_current_machine(runs.load(run))
    if not record.get("machines"):
        raise BadInput(f"run {run} has no machine; nothing to sync")
    if record["state"] == "ended":
        raise BadInput(f"run {run} has ended; `gpurun checkpoint-sync {run} --list` shows its snapshots")
    machine = common.agent_machines(record)[0]
    conns = connections.Connections()
    with conns.connect(record, machine) as transport:
        state = jobs.read_state(transport, machine["run_dir"])
        before = (state.get("agent") or {}).get("last_seq")
        if state["agent_alive"]:
            nonce = secrets.token_hex(8)
            path = shlex.quote(f"{machine['run_dir']}/sync.request")
            transport.check(f"echo {nonce} > {path}", what="asking the agent to sync")
            deadline = time.monotonic() + timeout
            with ui.spinner(f"waiting for the agent of {run} to take a snapshot"):
                while time.monotonic() < deadline:
                    state = jobs.read_state(transport, machine["run_dir"])
                    agent = state.get("agent") or {}
                    if agent.get("handled_request") == nonce:
                        break
                    if not state["agent_alive"]:
                        break
                    time.sleep(0.3)
                else:
                    raise GpurunError(f"the agent of {run} did not answer in {timeout:.0f}s; see its agent.log")
            agent = state.get("agent") or {}
        else:
            python = connections.agent_python(record, transport, ui.say)
            with ui.spinner(f"taking a snapshot of {run} (its agent is not running)"):
                transport.run(common.agent_command(python, common.agent_arguments(record, machine, once=True)))
            agent = jobs.read_state(transport, machine["run_dir"]).get("agent") or {}
    if agent.get("last_error") and agent.get("failures"):
        raise GpurunError(f"snapshot of {run} failed: {agent['last_error']}")
    if agent.get("last_seq") is None:
        raise GpurunError(f"run {run} has no checkpoint files yet in {record['spec']['checkpoint']['dir']}")
    store = common.open_run_store(record)
    manifest = snaps.read_manifest(store, run, agent["last_seq"])
    info = snaps.summary(manifest) if manifest else {"seq": agent["last_seq"], "at": agent["last_at"]}
    info["new"] = agent["last_seq"] != before
    info["sent_bytes"] = agent.get("last_sent_bytes") if info["new"] else 0
    return info
