"""`gpurun exec RUN` (and `launch SPEC --on RUN`): the next job of a live run, on the machines it has.

No provisioning: every node gets what changed in the workdir (the incremental
tar stream), the previous job's files are set aside under `jobs/`, setup runs
again only when it or a file it names changed, and the agent starts again next
to the new job with the same store, checkpoint directory and schedule.

Order matters for `status` running at the same time: the old job's exit file
leaves the machines before the record names the new job, so a status that
reads in between never pins the old exit status on the new job.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import json
import shlex
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar, cast

from gpurun import jobs, paths, runs
from gpurun.app import common, connections, fingerprints
from gpurun.app.reporter import Reporter
from gpurun.app.status import reconcile
from gpurun.app.teardown import JOB_GRACE, wait_for_final_snapshot
from gpurun.errors import BadInput, GpurunError, TransportError
from gpurun.models import Machine, RunRecord
from gpurun.providers.capabilities import capabilities_of
from gpurun.sizes import human_bytes
from gpurun.spec import Spec, apply_override, label, spec_from_record, validate_spec
from gpurun.states import MACHINE_NOT_RUNNING, JobState
from gpurun.store import snapshots as snaps
from gpurun.sync.push import scan_holding_back, sync_tree
from gpurun.transport.base import Transport

# What a job may change; everything else belongs to the machines, the store and the agent.
CHANGEABLE = ("name", "run", "setup", "env", "sync", "workdir")

T = TypeVar("T")


def job_log_name(number: int) -> str:
    """Where job `number`'s output is kept on the machine once a later job has started."""
    return f"jobs/job-{number:04d}.log"


@contextlib.contextmanager
def _exclusive(run: str) -> Iterator[None]:
    """One exec of a run at a time; a second one says so instead of waiting."""
    directory = paths.ensure_private(paths.runs_dir())
    with open(directory / f".{run}.exec.lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise GpurunError(f"another `gpurun exec` of {run} is under way; wait for it to finish") from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def next_spec(record: RunRecord, overrides: Sequence[str], spec: Spec | None) -> Spec:
    """The spec of the next job: the run's own with `--set` applied, or the one given to `launch --on`."""
    if spec is None:
        data = {key: copy.deepcopy(value) for key, value in record["spec"].items() if key != "spec_dir"}
        for override in overrides:
            apply_override(data, override)
        spec = validate_spec(data, source=f"run {record['run']}", spec_dir="/")
    elif overrides:
        raise BadInput(f"--set {overrides[0]}: with --on RUN, --set applies to SPEC; give it once, before --on")
    old = spec_from_record(record["spec"]).to_record()
    new = spec.to_record()
    for key in sorted(set(old) | set(new)):
        if key not in CHANGEABLE and old.get(key) != new.get(key):
            raise BadInput(
                f"{key}: differs from run {record['run']}'s ({_first_difference(key, old.get(key), new.get(key))}); "
                f"exec reuses the run's machines, checkpoint store and agent, so only "
                f"{', '.join(CHANGEABLE[1:])} may change; launch a new run for the rest"
            )
    return spec


def _first_difference(key: str, old: Any, new: Any) -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        for name in sorted(set(old) | set(new)):
            if old.get(name) != new.get(name):
                return f"{key}.{name}: {old.get(name)!r} there, {new.get(name)!r} here"
    return f"{old!r} there, {new!r} here"


def command_text(words: Sequence[str]) -> str | None:
    """`-- CMD`: one word is shell text as written (`"a && b"`); several are quoted as given."""
    if not words:
        return None
    text = words[0] if len(words) == 1 else shlex.join(words)
    if not text.strip():
        raise BadInput("-- CMD: the command is empty; give the job's command, like -- python train.py")
    if "\x00" in text:
        raise BadInput("-- CMD: the command must not contain NUL bytes")
    return text


def _each_node(machines: list[Machine], work: Callable[[Machine], T]) -> list[T]:
    if len(machines) == 1:
        return [work(machines[0])]
    with ThreadPoolExecutor(max_workers=min(16, len(machines))) as pool:
        return list(pool.map(work, machines))


def exec_job(
    run: str,
    ui: Reporter,
    *,
    command: str | None = None,
    overrides: Sequence[str] = (),
    replace: bool = False,
    spec: Spec | None = None,
) -> dict[str, Any]:
    record = runs.load(run)
    runs.check_reachable_from_here(record, "exec")
    _check_live(record)
    spec = next_spec(record, overrides, spec)
    from gpurun.app import recovering

    if recovering.applies(spec):
        # Its machines bootstrap from the code archive in the store: a job started over SSH
        # would be undone by the next replacement machine.
        raise BadInput(
            f"run {run} recovers on AWS (recovery.max_restarts > 0), where machines start from the store; "
            "exec does not run there yet: launch a new run"
        )
    with _exclusive(run):
        record = runs.load(run)
        loaded = json.dumps(record, sort_keys=True)
        if capabilities_of(record).machines_disposable:
            # A machine that idle_timeout, max_runtime or a spot reclaim ended is named as such, not dialled.
            from gpurun.providers import get_provider

            try:
                get_provider(record["provider"]).refresh([record])
            except GpurunError as error:
                ui.warn(f"could not read the machines' states ({error}); trying them")
        record = reconcile(record, loaded)
        _check_live(record)
        return _exec(record, spec, ui, command=command, replace=replace)


def _check_live(record: RunRecord) -> None:
    run = record["run"]
    if record["state"] == "ended":
        raise BadInput(f"run {run} has ended; its machines are gone: `gpurun launch` starts a new run")
    if record["state"] == "launching":
        raise BadInput(f"run {run} is still launching; exec starts the next job once its first one runs")
    if not record.get("machines"):
        raise BadInput(f"run {run} has no machine; nothing to run a job on")
    if record.get("bootstrap"):
        # Its machine is replaced from the store and its monitor ends the group when the job ends.
        raise BadInput(
            f"run {run} recovers on an Auto Scaling group: exec is not supported there yet; "
            "`gpurun launch` a new run (`--resume` continues from its snapshot)"
        )


def _exec(record: RunRecord, spec: Spec, ui: Reporter, *, command: str | None, replace: bool) -> dict[str, Any]:
    run = record["run"]
    machines: list[Machine] = record["machines"]
    lost = [m for m in machines if m.get("state") in MACHINE_NOT_RUNNING]
    if lost:
        raise GpurunError(
            f"run {run}: node {lost[0].get('rank', 0)}'s machine is {lost[0].get('state')} "
            f"(idle_timeout, max_runtime or a spot reclaim); `gpurun teardown {run}` cleans up, `gpurun launch` starts anew"
        )
    conns = connections.Connections()
    previous = runs.current_job(record)
    number = previous["number"] if previous else 0

    def state_of(machine: Machine) -> jobs.JobReading:
        try:
            return jobs.read_state(conns.connect(record, machine), machine["run_dir"])
        except TransportError as error:
            raise TransportError(f"node {machine.get('rank', 0)} of {run} does not answer: {error}") from None

    states = _each_node(machines, state_of)
    running = [m.get("rank", 0) for m, s in zip(machines, states) if s["job_alive"]]
    if running and not replace:
        where = f" on node {running[0]}" if len(machines) > 1 else ""
        raise GpurunError(
            f"job {number} of {run} is still running{where}; wait for it (`gpurun logs {run} -f`), "
            f"or `gpurun exec {run} --replace` stops it (SIGTERM, final snapshot) and starts the new one"
        )
    if running:
        _stop_jobs(record, conns, ui, number)
    else:
        _wait_for_agents(record, conns, ui)
    setup_failed_before = bool(states[0]["phase"] == "setup" and not states[0]["job_alive"])

    files, held_back = scan_holding_back(
        spec.workdir_path, [*spec.sync.exclude, f"/{spec.checkpoint.dir.strip('/')}/"], spec.sync.include
    )
    if held_back:
        shown = ", ".join(label(path) for path in held_back[:20]) + (" and more" if len(held_back) > 20 else "")
        ui.warn(f"not syncing {shown}: they look like credentials; sync.include sends one on purpose")
    setup_hash = fingerprints.setup_hash(spec.setup, spec.workdir_path, files)
    last_setup_hash = previous.get("setup_hash") if previous else None
    run_setup = bool(spec.setup) and (setup_hash != last_setup_hash or setup_failed_before)
    if capabilities_of(record).run_dir_here:
        from gpurun.app import local_python

        record["spec"] = {**record["spec"], "setup": spec.setup}
        record["job_env"] = local_python.prepare(record, ui.say)
        if run_setup and local_python.setup_done_before(record, setup_hash):
            run_setup = False
    job_command = command or spec.run
    merged = spec.to_record()
    cast(dict[str, Any], merged).update((k, v) for k, v in record["spec"].items() if k not in CHANGEABLE)
    record["spec"] = merged

    def prepare(machine: Machine) -> tuple[int, int]:
        transport = conns.connect(record, machine)
        prefix = f"[node {machine['rank']}] " if len(machines) > 1 else ""
        result = sync_tree(
            transport,
            spec.workdir_path,
            common.work_dir(machine),
            f"{machine['run_dir']}/sync.manifest.json",
            files=files,
        )
        ui.say(
            f"{prefix}synced {result.files_sent} changed files ({human_bytes(result.bytes_sent)}) to {transport.label}"
        )
        _set_aside(transport, machine["run_dir"], number)
        return result.files_sent, result.bytes_sent

    sent = _each_node(machines, prepare)
    job = runs.add_job(
        record,
        command=job_command,
        code=fingerprints.code_hash(files),
        setup_hash=setup_hash,
        setup_ran=run_setup,
    )
    job["files_sent"] = sum(files for files, _ in sent)
    job["bytes_sent"] = sum(sent_bytes for _, sent_bytes in sent)
    record["state"] = "running"
    record["job"] = {"phase": "setup" if run_setup else "run", "alive": True}
    _save(record)
    agents = {id(m) for m in common.agent_machines(record)}

    def start(machine: Machine) -> None:
        transport = conns.connect(record, machine)
        python = None
        if id(machine) in agents:
            python = connections.agent_python(record, transport, ui.say)
            machine["agent_pid"] = jobs.start_agent(
                transport, machine["run_dir"], python, common.agent_arguments(record, machine)
            )
        resume_from = common.checkpoint_dir(record, machine) if record.get("resumed_from") else None
        env = common.job_environment(record, machine, resume_from)
        from gpurun.providers import get_provider

        env.update(get_provider(record["provider"]).machine_env(record, machine))
        machine["job_pid"] = jobs.start_job(
            transport,
            machine["run_dir"],
            common.work_dir(machine),
            env,
            spec.setup if run_setup else None,
            job_command,
            common.job_restarts(record, machine, python),
        )

    _each_node(machines, start)
    _save(record)
    try:
        snaps.put_run_record(common.open_run_store(record), run, record)
    except GpurunError as error:
        ui.warn(f"could not update run.json in {record['store']}: {error}")
    ui.say(
        f"job {job['number']} of {run} started"
        + (" (setup runs first: it or a file it names changed)" if run_setup else " (setup unchanged: not run)")
    )
    if run_setup:
        from gpurun.app.launch import wait_for_setup

        try:
            wait_for_setup(record, [(conns.connect(record, m), m) for m in machines], ui)
            if capabilities_of(record).run_dir_here:
                from gpurun.app import local_python

                local_python.note_setup_done(record, setup_hash)
        except GpurunError as error:
            reconcile(record)
            error.args = (f"job {job['number']} of {run}: {error}; the run's machines are kept: fix it and exec again",)
            raise
    return runs.public_view(record)


def _save(record: RunRecord) -> None:
    with runs.locked(record["run"]):
        runs.save(record)


def _set_aside(transport: Transport, run_dir: str, number: int) -> None:
    """Keep the previous job's output under jobs/ and clear the files that describe the current job."""
    qdir = shlex.quote(run_dir)
    keep = shlex.quote(job_log_name(max(number, 1)))
    transport.check(
        f"cd {qdir} && mkdir -p jobs && {{ [ ! -e job.log ] || mv -f job.log {keep}; }} && "
        "rm -f job.exit job.exit.tmp job.pid job.phase interrupted sync.request",
        what="setting the previous job's files aside",
    )


def _stop_jobs(record: RunRecord, conns: connections.Connections, ui: Reporter, number: int) -> None:
    """--replace: SIGTERM every node's job (KILL after the grace), then wait for the final snapshot."""
    run = record["run"]
    agents = {id(m) for m in common.agent_machines(record)}

    def stop(machine: Machine) -> dict[str, Any] | None:
        transport = conns.connect(record, machine)
        state = jobs.read_state(transport, machine["run_dir"])
        before = (state.get("agent") or {}).get("last_seq")
        if jobs.stop(transport, machine["run_dir"], "job", grace=JOB_GRACE):
            ui.warn(f"job {number} did not stop within {JOB_GRACE:.0f}s of SIGTERM and was killed")
        if id(machine) not in agents:
            return None
        return wait_for_final_snapshot(record, machine, transport, ui, before)

    with ui.spinner(f"stopping job {number} of {run} (SIGTERM, then its final snapshot)"):
        finals = _each_node(record["machines"], stop)
    state = jobs.read_state(conns.connect(record, record["machines"][0]), record["machines"][0]["run_dir"])
    runs.end_job(record, JobState.KILLED, state["exit_code"], state.get("ended_at"))
    final = finals[0]
    if final:
        record["last_checkpoint"] = runs.checkpoint_summary(final)


def _wait_for_agents(record: RunRecord, conns: connections.Connections, ui: Reporter) -> None:
    """The agent takes a final snapshot when a job ends: let it finish before the next one starts."""

    def wait(machine: Machine) -> None:
        transport = conns.connect(record, machine)
        state = jobs.read_state(transport, machine["run_dir"])
        if state["agent_alive"]:
            wait_for_final_snapshot(record, machine, transport, ui, (state.get("agent") or {}).get("last_seq"))

    _each_node(common.agent_machines(record), wait)
