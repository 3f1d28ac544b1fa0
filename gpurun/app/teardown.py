"""`gpurun teardown`: final sync, stop the job and the agent, release everything; idempotent."""

from __future__ import annotations

import re
import shlex
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpurun import bootstrap, jobs, paths, runs
from gpurun.app import common, connections
from gpurun.app.reporter import Reporter
from gpurun.durations import format_duration
from gpurun.errors import BadInput, GpurunError, Interrupted, TransportError, UnknownRun
from gpurun.models import Machine, RunRecord
from gpurun.providers import get_provider
from gpurun.providers.capabilities import capabilities, capabilities_of
from gpurun.states import MACHINE_NOT_RUNNING, JobState, RunState
from gpurun.store import snapshots as snaps

if TYPE_CHECKING:
    from gpurun.app.connections import Connections
    from gpurun.providers.base import Provider
    from gpurun.transport.base import Transport

JOB_GRACE = 20.0
AGENT_FINAL_SYNC_TIMEOUT = 600.0


def check_can_end_here(record: RunRecord) -> None:
    """A run known only from its store can be ended here only where the cloud API reaches it,
    with credentials for the account it runs in; checked before anything is written here."""
    if record.get("source") != "store":
        return
    if not capabilities(record["provider"]).machines_disposable:
        where = ", ".join(m.get("host") or "?" for m in record.get("machines", [])) or "its machine"
        raise BadInput(
            f"run {record['run']} runs on {record['provider']} ({where}) and was launched from another computer, "
            "which alone holds its way in: tear it down there"
        )
    get_provider(record["provider"]).check_access(record)


def recover_damaged(run: str, ui: Reporter) -> None:
    """For `teardown --force`: a record here that no longer reads (truncated, corrupt) is rebuilt
    from what survives it, so the run's job can still be found and stopped.

    First the copy in the run's store (written at launch: the whole spec and its machines),
    else, for a local run, its run directory and pid files. The damaged file is kept beside
    the records; what could not be recovered is said.
    """
    try:
        runs.load(run)
        return
    except UnknownRun:
        return
    except GpurunError:
        pass
    salvaged = runs.salvage(run)
    store_url = salvaged.get("store") or paths.default_store_url()
    record: RunRecord | None = None
    lost: list[str] = []
    try:
        copy = runs.load_from_store(run, store_url)
        copy.pop("source", None)
        _check_store_copy(copy, salvaged)
        copy["store"] = store_url
        record = copy
        lost = ["changes since launch (jobs started with exec, machine states)"]
        found = f"its copy in {store_url}/{run}/run.json"
    except GpurunError as error:
        if isinstance(error, UntrustedCopy):
            ui.warn(str(error))
        record = None
        local_dir = paths.local_runs_dir() / run
        if capabilities_of({"provider": salvaged.get("provider", "local")}).run_dir_here and local_dir.is_dir():
            record = _local_record_from(run, local_dir, salvaged, store_url)
            lost = ["the spec", "the job history", "the last checkpoint"]
            found = f"its run directory {local_dir}"
    if record is None:
        provider = salvaged.get("provider", "unknown")
        # With no provider recorded, the tagged resources are the one trail left to follow.
        hint = (
            "`gpurun teardown --orphans` finds its AWS resources by their gpurun:run tag"
            if "provider" not in salvaged or capabilities_of({"provider": provider}).resources_tagged
            else "stop its job on the machine by hand (`kill -- -$(cat ~/gpurun/RUN/job.pid)`)"
        )
        raise GpurunError(
            f"run record {runs.record_path(run)} is damaged and {store_url} holds no copy of {run}; "
            f"the provider ({provider}) and its machines cannot be recovered from here: {hint}"
        )
    aside = runs.set_aside(run)
    runs.save(record)
    ui.warn(
        f"run record of {run} was damaged (kept at {aside}); recovered from {found}; not recovered: {', '.join(lost)}"
    )


class UntrustedCopy(GpurunError):
    """The store's copy of a run does not look like what gpurun wrote for it."""


def _check_store_copy(record: RunRecord, salvaged: dict[str, str]) -> None:
    """The store is untrusted: its copy may steer teardown only where gpurun itself would go.

    Teardown removes each machine's run directory, so a copy naming any other directory
    (`/home/me`) is refused, as is one whose provider the damaged record contradicts.
    """
    run = record["run"]
    where = f"the store's copy of {run}"
    if salvaged.get("provider") and salvaged["provider"] != record["provider"]:
        raise UntrustedCopy(
            f"{where} says provider {record['provider']!r}, the damaged record {salvaged['provider']!r}; not used"
        )
    expected_local = str(paths.local_runs_dir() / run)
    for machine in record.get("machines", []):
        run_dir = machine.get("run_dir") if isinstance(machine, dict) else None
        if capabilities(record["provider"]).run_dir_here:
            usable = run_dir == expected_local
        else:
            # ~/gpurun/<run>, or ~/gpurun/<run>-nodeK for a second node on the same host.
            own = re.escape(paths.machine_run_dir(run))
            usable = (
                isinstance(run_dir, str)
                and re.fullmatch(rf"(/[^\x00]*/)?{own}(-node[0-9]+)?", run_dir) is not None
                and ".." not in run_dir.split("/")
            )
        if not usable:
            raise UntrustedCopy(f"{where} names run directory {run_dir!r}, not one gpurun makes for it; not used")


def _local_record_from(run: str, local_dir: Path, salvaged: dict[str, str], store_url: str) -> RunRecord:
    """A local run as its directory shows it: enough to stop its job and agent and remove it."""
    return {
        "run": run,
        "provider": "local",
        "state": "running",
        "exit_code": None,
        "created_at": salvaged.get("created_at") or runs.now_iso(),
        "owner": salvaged.get("owner", "unknown"),
        "store": store_url,
        # Unknown: the agent, sent SIGTERM, takes its final snapshot with the settings it was started with.
        "spec": {"checkpoint": {}, "aws": {}, "env": {}},
        "machines": [{"rank": 0, "run_dir": str(local_dir), "state": "running"}],
        "resources": {},
        "jobs": [],
        "last_checkpoint": None,
        "cost_usd": None,
        "recovered": "partial",
    }


def _adopt(record: RunRecord, store_url: str) -> RunRecord:
    """Keep a record of the store's run here, so an interrupted teardown can be run again.

    The record's own `store` is whatever the store holds: it is replaced by the
    store the record was read from, so neither this teardown nor a later
    command reads or writes where a planted record points.
    """
    check_can_end_here(record)
    record = record.copy()
    record.pop("source", None)
    record["adopted_from"] = store_url
    record["store"] = store_url
    # Paths on the launching computer mean nothing here, and a planted one would say where to write.
    machines = [machine.copy() for machine in record.get("machines", [])]
    for machine in machines:
        machine.pop("key_path", None)
        machine.pop("known_hosts", None)
    record["machines"] = machines
    runs.save(record)
    return record


def teardown(
    run: str,
    ui: Reporter,
    *,
    final_sync: bool = True,
    keep_files: bool = False,
    store_url: str | None = None,
    profile: str | None = None,
) -> dict[str, Any]:
    with runs.locked(run):
        record = runs.load_here_or_from_store(run, store_url, profile)
        if record.get("source") == "store":
            record = _adopt(record, store_url or "")
    provider = get_provider(record["provider"])
    conns = connections.Connections()
    removed: list[str] = []
    final_checkpoint = None
    gone_states = MACHINE_NOT_RUNNING
    adopted = bool(record.get("adopted_from"))
    store_seq_before = (_store_latest(record, ui) or {}).get("seq") if adopted else None
    try:
        if adopted and (keep_files or not final_sync):
            ui.warn("--keep-files and --no-final-sync change nothing for a run ended from another computer")
        if adopted:
            ui.warn(
                f"this computer has no SSH key for {run} (it stays on the computer that launched it), so there is "
                "no final sync from here: terminating the machine sends the agent SIGTERM, and it takes its own "
                "final snapshot while the machine shuts down"
            )
        if not adopted:
            _follow_the_group(record, ui)
            _refresh_machine_states(provider, record, ui)
        for machine in record.get("machines", []):
            if adopted or machine.get("state") in gone_states or machine.get("cleaned"):
                continue
            try:
                stopped = _stop_machine(conns, record, machine, ui, final_sync, keep_files, removed)
            except TransportError as error:
                _unreachable(record, machine, error, ui)
                continue
            final_checkpoint = stopped or final_checkpoint
        removed += provider.release(record, _save_progress, ui.say)
        conns.close(run)
        if adopted:
            final_checkpoint = _store_final_checkpoint(record, store_seq_before, ui)
    except KeyboardInterrupt:
        _save_progress(record)
        raise Interrupted(f"teardown of {run} interrupted; run `gpurun teardown {run}` again to finish it") from None
    here = capabilities(record["provider"]).run_dir_here
    if here and not keep_files:
        local_dir = paths.local_runs_dir() / run
        if local_dir.exists():
            shutil.rmtree(local_dir, ignore_errors=True)
    if not here:
        from gpurun.app.remote_access import remove_ssh_config

        remove_ssh_config(run)
    with runs.locked(run):
        current = runs.load(run)
        runs.copy_keys(current, record, ("machines", "resources", "exit_code", "job", "jobs"))
        job = runs.current_job(current)
        if job is not None and job.get("ended_by") is None and record.get("state") != "launching":
            # Not stopped here: its machine was gone (or unreachable) before teardown came.
            disposable = capabilities(current["provider"]).machines_disposable
            runs.end_job(current, JobState.MACHINE_LOST if disposable else JobState.KILLED)
        current["ended_at"] = current.get("ended_at") or runs.now_iso()
        current["state"] = RunState.ENDED
        if final_checkpoint:
            current["last_checkpoint"] = runs.checkpoint_summary(final_checkpoint)
        runs.save(current)
    try:
        snaps.put_run_record(common.open_run_store(_home_store(current)), run, current)
    except GpurunError as error:
        ui.warn(f"could not update run.json in {_home_store(current)['store']}: {error}")
    return {"run": run, "removed": removed, "final_checkpoint": final_checkpoint}


def _home_store(record: RunRecord) -> RunRecord:
    """The record as far as its store goes: an adopted run's record goes back where it was read from
    (records adopted before `store` was replaced at adoption still name the planted one)."""
    home = record.copy()
    home["store"] = record.get("adopted_from") or record["store"]
    return home


def _follow_the_group(record: RunRecord, ui: Reporter) -> None:
    """A recovering run's record may still name a machine its group has replaced (no `status` ran
    since the reclaim): point it at the machine that runs the job now, so the final sync reaches it."""
    if not (capabilities_of(record).replaces_lost_machines and record.get("bootstrap")):
        return
    from gpurun.app import recovering

    problems: list[str] = []
    recovering.reconcile_from_store(record, problems)
    for problem in problems:
        ui.warn(f"{problem}; ending the machines the record names")


def _refresh_machine_states(provider: Provider, record: RunRecord, ui: Reporter) -> None:
    """A machine the cloud already ended (spot reclaim, console) is not waited for over SSH."""
    try:
        provider.refresh([record])
    except GpurunError as error:
        ui.warn(f"could not read the machines' states ({error}); trying each one")


def _unreachable(record: RunRecord, machine: Machine, error: GpurunError, ui: Reporter) -> None:
    """A cloud machine is terminated anyway; on the user's own box the job would keep running."""
    rank, run = machine.get("rank", 0), record["run"]
    if capabilities(record["provider"]).machines_disposable:
        ui.warn(f"node {rank} is unreachable ({error}); terminating it without a final sync from here")
        return
    _save_progress(record)
    raise TransportError(
        f"node {rank} ({machine.get('host')}) is unreachable, so its job was not stopped ({error}); "
        f"run `gpurun teardown {run}` again when it answers"
    )


def _stop_machine(
    conns: Connections,
    record: RunRecord,
    machine: Machine,
    ui: Reporter,
    final_sync: bool,
    keep_files: bool,
    removed: list[str],
) -> dict[str, Any] | None:
    run_dir = machine["run_dir"]
    local = capabilities(record["provider"]).run_dir_here
    transport = conns.connect(record, machine)
    final = None
    partial = record.get("recovered") == "partial"
    with transport:
        if transport.connect_retry_for:
            # An address that answers nothing (a security group closed to this computer) is tried until the
            # bound: say so, rather than sit silent for minutes.
            bound = format_duration(transport.connect_retry_for)
            unanswered = (
                "; if it does not answer, it is terminated without a final sync"
                if capabilities(record["provider"]).machines_disposable
                else ""
            )
            with ui.spinner(f"connecting to {transport.label} to stop its job (tried for up to {bound}{unanswered})"):
                transport.connect()
        if record.get("bootstrap"):
            # A group machine's monitor restarts a job that ends without an exit status: not this one.
            transport.run(f"touch {shlex.quote(run_dir + '/' + bootstrap.TEARDOWN_MARK)}", timeout=30)
        if not final_sync and not partial:
            jobs.signal_group(transport, run_dir, "agent", "KILL")
        state = jobs.read_state(transport, run_dir)
        before = (state.get("agent") or {}).get("last_seq")
        job_was_running = state["job_alive"]
        with ui.spinner(f"stopping the job of {record['run']} on {transport.label}"):
            killed = jobs.stop(transport, run_dir, "job", grace=JOB_GRACE)
        if killed:
            ui.warn(f"the job did not stop within {JOB_GRACE:.0f}s of SIGTERM and was killed")
        removed.append(f"job on {transport.label}")
        if machine.get("rank", 0) == 0:
            state = jobs.read_state(transport, run_dir)
            if record.get("exit_code") is None:
                record["exit_code"] = state["exit_code"]
            record["job"] = {"phase": state["phase"], "alive": False}
            if job_was_running:
                runs.end_job(record, JobState.KILLED, state["exit_code"], state.get("ended_at"))
            elif state["exit_code"] is not None:
                ending = JobState.INTERRUPTED if state["interrupted"] else JobState.EXITED
                runs.end_job(record, ending, state["exit_code"], state.get("ended_at"))
            elif state["job_started"]:
                runs.end_job(record, JobState.KILLED)
        # A partly recovered record lacks the agent's settings: SIGTERM below makes it take its final snapshot.
        if final_sync and not partial and machine in common.agent_machines(record):
            final = wait_for_final_snapshot(record, machine, transport, ui, before)
        jobs.stop(transport, run_dir, "agent", grace=10)
        # The secrets go whatever else is kept (--keep-files keeps code, logs and checkpoints).
        if record["spec"].get("secrets") or partial:
            jobs.remove_secrets(transport, run_dir)
            removed.append(f"secrets file on {transport.label}")
        if not keep_files and not local:
            transport.run(f"rm -rf {shlex.quote(run_dir)}", timeout=120)
            removed.append(f"run directory {run_dir} on {transport.label}")
    machine["cleaned"] = True
    machine["files_kept"] = keep_files  # `gpurun logs` tells a removed directory from a lost connection
    _save_progress(record)
    return final


def _store_latest(record: RunRecord, ui: Reporter) -> dict[str, Any] | None:
    try:
        return snaps.latest(common.open_run_store(_home_store(record)), record["run"])
    except GpurunError as error:
        ui.warn(f"cannot read {record['store']}: {error}")
        return None


def _store_final_checkpoint(record: RunRecord, before: int | None, ui: Reporter) -> dict[str, Any] | None:
    """After the machines are gone: the newest snapshot in the store, and whether it is new."""
    pointer = _store_latest(record, ui)
    if pointer is None:
        ui.say("no snapshot in the store")
        return None
    info = {key: pointer[key] for key in ("seq", "at", "bytes", "files")}
    info["new"] = pointer["seq"] != before
    ui.say(f"latest checkpoint: snapshot {info['seq']} ({info['files']} files)")
    return info


def _save_progress(record: RunRecord) -> None:
    """Record what teardown has done (machines, resources) without undoing other writers' changes."""
    with runs.locked(record["run"]):
        try:
            current = runs.load(record["run"])
        except GpurunError:
            current = record
        runs.copy_keys(current, record, ("machines", "resources"))
        runs.save(current)


def wait_for_final_snapshot(
    record: RunRecord, machine: Machine, transport: Transport, ui: Reporter, before: int | None
) -> dict[str, Any] | None:
    """The agent sees the job exit and takes the final snapshot; wait for it, or take it ourselves."""
    run_dir = machine["run_dir"]
    deadline = time.monotonic() + AGENT_FINAL_SYNC_TIMEOUT
    with ui.spinner("final checkpoint sync"):
        while time.monotonic() < deadline:
            state = jobs.read_state(transport, run_dir)
            if not state["agent_alive"]:
                break
            time.sleep(0.3)
        agent = state.get("agent") or {}
        if state["agent_alive"] or agent.get("state") != "stopped" or agent.get("last_error"):
            python = connections.agent_python(record, transport, ui.say)
            jobs.signal_group(transport, run_dir, "agent", "KILL")
            transport.run(common.agent_command(python, common.agent_arguments(record, machine, once=True)))
            state = jobs.read_state(transport, run_dir)
            agent = state.get("agent") or {}
    if agent.get("last_error"):
        ui.error(f"final checkpoint sync failed: {agent['last_error']}; last good snapshot: {agent.get('last_seq')}")
        return None
    if agent.get("last_seq") is None:
        ui.say("no checkpoint files to sync")
        return None
    info = {
        "seq": agent["last_seq"],
        "at": agent["last_at"],
        "bytes": agent["last_bytes"],
        "files": agent["last_files"],
    }
    info["new"] = agent["last_seq"] != before
    ui.say(f"final checkpoint: snapshot {info['seq']} ({info['files']} files)")
    return info
