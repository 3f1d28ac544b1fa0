"""`gpurun status`: every run with its job, machines, cost and last checkpoint.

Local runs are read straight from their files (fast); remote runs are asked
over their transport; AWS instance states come from one batched describe.
"""

from __future__ import annotations

import json
from datetime import datetime, timezone

from gpurun import jobs, runs
from gpurun.app import connections
from gpurun.app.reporter import Reporter
from gpurun.errors import GpurunError
from gpurun.models import RunRecord
from gpurun.providers import get_provider
from gpurun.providers.capabilities import capabilities_of
from gpurun.states import ACTIVE, MACHINE_GONE, MACHINE_NOT_RUNNING, JobState, RunState


def _job_outcome(record: RunRecord, state: jobs.JobReading) -> None:
    record["job"] = {"phase": state["phase"], "alive": state["job_alive"]}
    if state.get("restarts"):
        record["restarts_used"] = state["restarts"]
    agent = state.get("agent")
    if agent:
        if agent.get("last_seq") is not None:
            record["last_checkpoint"] = {
                "seq": agent["last_seq"],
                "at": agent["last_at"],
                "bytes": agent["last_bytes"],
            }
        record["checkpoint_error"] = (
            {"error": agent["last_error"], "at": agent.get("last_error_at"), "failures": agent.get("failures")}
            if agent.get("last_error")
            else None
        )
        warning = agent.get("last_warning")
        record["checkpoint_warning"] = warning if isinstance(warning, str) else None
        record["agent_alive"] = state["agent_alive"]
    if record["state"] != "running":
        return
    if state["exit_code"] is not None:
        record["exit_code"] = state["exit_code"]
        if state["interrupted"]:
            record["state"] = RunState.INTERRUPTED
        else:
            record["state"] = RunState.SUCCEEDED if state["exit_code"] == 0 else RunState.FAILED
        runs.end_job(
            record,
            JobState.INTERRUPTED if state["interrupted"] else JobState.EXITED,
            state["exit_code"],
            state.get("ended_at"),
        )
    elif state["job_started"] and not state["job_alive"]:
        record["state"] = RunState.INTERRUPTED if state["interrupted"] else RunState.FAILED
        record["job"] = {
            "phase": state["phase"],
            "alive": state["job_alive"],
            "note": "the job ended without recording its exit status (killed?)",
        }
        runs.end_job(record, JobState.INTERRUPTED if state["interrupted"] else JobState.KILLED)


def reconcile(
    record: RunRecord,
    loaded: str | None = None,
    problems: list[str] | None = None,
    *,
    attempts_read: bool | None = None,
) -> RunRecord:
    """Ask the machine how the job is doing, save what changed; returns the updated record.

    `loaded` is the record as read from disk (before an AWS refresh changed it):
    the record is saved only over that copy, so a teardown or launch that wrote
    since wins. When no machine answers, the last checkpoint comes from the
    store's LATEST, which outlives every machine. `attempts_read` is what
    `recovering.reconcile_from_store` returned when the caller already applied
    a recovering run's attempts.json (it is not read again).
    """
    before = loaded if loaded is not None else json.dumps(record, sort_keys=True)
    # A run adopted from a store is not dialled: its machines are what the store said.
    problems = problems if problems is not None else []
    if capabilities_of(record).replaces_lost_machines and record.get("bootstrap") and record["state"] != "ended":
        # A recovering run: its machines come and go; the store says what happened, to any computer.
        from gpurun.app import recovering

        if attempts_read is None:
            attempts_read = recovering.reconcile_from_store(record, problems)
        if attempts_read and record.get("store"):
            _latest_from_store(record, record["store"], problems)
    elif record["state"] in ACTIVE and record.get("machines") and not record.get("adopted_from"):
        _ask_machines(record, problems)
    if json.dumps(record, sort_keys=True) != before:
        with runs.locked(record["run"]):
            try:
                unchanged = json.dumps(runs.load(record["run"]), sort_keys=True) == before
            except GpurunError:
                unchanged = False
            if unchanged:
                try:
                    runs.save(record)
                except GpurunError:
                    # Reading must work on a full disk: what status learned is shown, and saved next time.
                    pass
    return record


def _ask_machines(record: RunRecord, problems: list[str]) -> None:
    conns = connections.Connections()
    answered = False
    for machine in record["machines"]:
        if machine.get("state") in MACHINE_NOT_RUNNING:
            continue
        try:
            with conns.connect(record, machine) as transport:
                # A look, not a wait: one try (connect timeout), not the boot window a launch allows,
                # or a machine that does not answer holds `status` for minutes.
                transport.connect_retry_for = 0.0
                state = jobs.read_state(transport, machine["run_dir"])
            machine.pop("unreachable", None)
            machine["gpus"] = state.get("gpus")
        except GpurunError as error:
            machine["unreachable"] = str(error)
            continue
        if machine.get("rank", 0) == 0:
            answered = True
            _job_outcome(record, state)
    machines = record["machines"]
    gone = machines and all(m.get("state") in MACHINE_GONE for m in machines)
    if capabilities_of(record).machines_disposable and record["state"] == "running" and gone:
        record["state"] = RunState.INTERRUPTED
        runs.end_job(record, JobState.MACHINE_LOST)
    if not answered and not capabilities_of(record).run_dir_here and record.get("store"):
        _latest_from_store(record, record["store"], problems)


# Ended runs older than this are left out of `status` without --all.
RECENT_SECONDS = 24 * 3600


def is_recent(record: RunRecord, now: datetime | None = None) -> bool:
    """Not ended, or ended (else created) within RECENT_SECONDS."""
    if record.get("state") != "ended":
        return True
    when = record.get("ended_at") or record.get("created_at")
    try:
        then = datetime.fromisoformat(str(when))
        if then.tzinfo is None:
            then = then.replace(tzinfo=timezone.utc)
    except ValueError:
        return True
    return ((now or datetime.now(timezone.utc)) - then).total_seconds() < RECENT_SECONDS


def collect(
    run: str | None = None,
    *,
    ui: Reporter | None = None,
    store_url: str | None = None,
    hidden: list[int] | None = None,
) -> tuple[list[RunRecord], list[str]]:
    """Runs with their state brought up to date; with `hidden` (a list to fill), old ended runs are left out."""
    problems: list[str] = []
    if run is not None:
        records = [runs.load_here_or_from_store(run, store_url)]
    else:
        records, problems = runs.load_all()
        if hidden is not None:
            shown = [record for record in records if is_recent(record)]
            hidden.append(len(records) - len(shown))
            records = shown
    if store_url and run is None:
        known = {r["run"] for r in records}
        remote, unreadable = runs.load_all_from_store(store_url)
        records += [record for record in remote if record["run"] not in known]
        problems += unreadable
    loaded = {record["run"]: json.dumps(record, sort_keys=True) for record in records}
    attempts_read: dict[str, bool] = {}
    for record in records:
        if _recovering(record) and record.get("source") != "store":
            # The group's current machine first, so that the cloud is asked about it (its address, state).
            from gpurun.app import recovering

            attempts_read[record["run"]] = recovering.reconcile_from_store(record, problems)
    # The cloud says what became of disposable machines (a spot reclaim, a guard), in one call per provider.
    cloud = [r for r in records if capabilities_of(r).machines_disposable and r["state"] != "ended"]
    for name in sorted({r["provider"] for r in cloud}):
        try:
            get_provider(name).refresh([r for r in cloud if r["provider"] == name])
        except GpurunError as error:
            problems.append(f"{name.upper()}: {error}")
    for record in records:
        if record.get("source") == "store":
            if capabilities_of(record).replaces_lost_machines and record.get("bootstrap"):
                from gpurun.app import recovering

                recovering.reconcile_from_store(record, problems)
            _latest_from_store(record, store_url or record["store"], problems)
            continue
        reconcile(record, loaded[record["run"]], problems, attempts_read=attempts_read.get(record["run"]))
        if runs.launcher_gone(record):
            record["launcher_gone"] = True
            problems.append(
                f"{record['run']} is still `launching` but the process that launched it "
                f"(pid {(record.get('launcher') or {}).get('pid')}) is gone: `gpurun teardown {record['run']}` removes what it created"
            )
    return records, problems


def _recovering(record: RunRecord) -> bool:
    return bool(
        capabilities_of(record).replaces_lost_machines and record.get("bootstrap") and record["state"] != "ended"
    )


def with_current_machine(record: RunRecord) -> RunRecord:
    """A recovering run's record pointing at its group's current machine, with that machine's address
    (what `ssh`, `tunnel` and `checkpoint-sync` need); any other record as it is."""
    if not _recovering(record):
        return record
    records, _problems = collect(record["run"])
    return records[0]


def _latest_from_store(record: RunRecord, store_url: str, problems: list[str]) -> None:
    """The store's run.json changes only at launch, job end and teardown; LATEST moves with every snapshot."""
    from gpurun.store import open_store
    from gpurun.store.snapshots import latest

    try:
        pointer = latest(open_store(store_url), record["run"])
    except GpurunError as error:
        problems.append(f"{record['run']}: cannot read its snapshots in {store_url}: {error}")
        return
    if pointer is not None:
        newest = runs.checkpoint_summary(pointer)
        known = record.get("last_checkpoint")
        if not isinstance(known, dict) or not isinstance(known.get("seq"), int) or known["seq"] <= newest["seq"]:
            record["last_checkpoint"] = newest


def age(iso: str | None) -> str:
    if not iso:
        return "-"
    try:
        then = datetime.fromisoformat(iso)
    except ValueError:
        return "-"
    seconds = (datetime.now(timezone.utc) - then).total_seconds()
    from gpurun.durations import format_duration

    return format_duration(max(seconds, 0)) + " ago"
