"""`gpurun launch`: plan, acquire machines, sync, restore, start agent and job; roll back on failure."""

from __future__ import annotations

import contextlib
import getpass
import shlex
import shutil
import signal
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpurun import jobs, paths, runs
from gpurun.app import common, connections, fingerprints, job_secrets, local_python, recovering
from gpurun.app.reporter import Reporter
from gpurun.durations import format_duration
from gpurun.errors import (
    BadInput,
    ConnectionLost,
    GpurunError,
    Interrupted,
    NoCredentials,
    StillWaiting,
)
from gpurun.models import Machine, ResumeSource, RunRecord
from gpurun.providers import get_provider
from gpurun.providers.capabilities import capabilities_of
from gpurun.sizes import human_bytes
from gpurun.spec import NAME_PATTERN, Spec, label
from gpurun.store import open_store
from gpurun.store import snapshots as snaps
from gpurun.sync.ignore import WalkedFile
from gpurun.sync.push import LARGE_SYNC_BYTES, scan_holding_back, sync_tree

if TYPE_CHECKING:
    from gpurun.app.connections import Connections
    from gpurun.providers.base import Provider
    from gpurun.transport.base import Transport

#: (transport, machine) of each node where the launch has started to work, for rollback.
Started = list[tuple["Transport", Machine]]


def find_resume_source(
    spec: Spec, store_url: str, resume: str | None, warn: Callable[[str], None] | None = None
) -> ResumeSource | None:
    """Which run and snapshot to restore from, or None. Raises BadInput for a bad --resume.

    With `resume: auto`, the newest of this spec's runs in the store wins, judged by
    when the store wrote each run's LATEST: the `at` inside LATEST is the writer's
    claim (a planted "9999-..." would always win). A run whose LATEST or manifest
    is unusable is skipped with a warning.
    """
    if resume is None and spec.checkpoint.resume == "never":
        return None
    source_url = store_url
    if resume is not None:
        runs.check_name(resume, "--resume")
        try:
            source_url = runs.load(resume)["store"]
        except BadInput:
            pass  # a run launched from another computer: look in this spec's store
        store = open_store(source_url, **common.store_options(spec))
        pointer = snaps.latest(store, resume)
        if pointer is None:
            raise BadInput(f"--resume {resume}: that run has no snapshot in {source_url}")
        return {"run": resume, "seq": pointer["seq"], "store": source_url, "bytes": pointer["bytes"]}
    store = open_store(store_url, **common.store_options(spec))
    prefix = runs.new_run_name(spec.name).rsplit("-", 1)[0] + "-"
    candidates = []

    def of_this_spec(name: str) -> bool:
        return name.startswith(prefix) and len(name) == len(prefix) + 6

    def skipped(name: str, message: str) -> None:
        # An unreadable record may be one of this spec's runs; another spec's is not this launch's business.
        if warn is not None and of_this_spec(name):
            warn(f"resume: {message}")

    for record in snaps.list_run_records(store, warn=skipped):
        name = record["run"]
        recorded = record.get("spec")
        same_spec = isinstance(recorded, dict) and recorded.get("name") == spec.name
        # Runs launched with --name count too: their record names the spec they ran.
        if not (same_spec or of_this_spec(name)):
            continue
        try:
            pointer = snaps.usable_latest(store, name)
        except GpurunError as error:
            if warn is not None:
                warn(f"resume: skipping {name}: {error}")
            continue
        if pointer is not None:
            candidates.append((snaps.written_at(store, f"{name}/LATEST") or 0.0, name, pointer))
    if not candidates:
        return None
    _written, name, pointer = max(candidates, key=lambda candidate: (candidate[0], candidate[1]))
    return {"run": name, "seq": pointer["seq"], "store": store_url, "bytes": pointer["bytes"]}


def _held_back_text(held_back: list[str], limit: int = 20) -> str:
    if not held_back:
        return "-"
    shown = ", ".join(label(path) for path in held_back[:limit])
    more = f" and {len(held_back) - limit} more" if len(held_back) > limit else ""
    return f"{shown}{more}"


def _choose_name(spec: Spec, name: str | None) -> str:
    if name is None:
        return runs.new_run_name(spec.name)
    if not NAME_PATTERN.fullmatch(name):
        shown = name if len(name) <= 60 else name[:57] + "..."
        raise BadInput(f"--name {shown!r}: use letters, digits, '-' and '_' (at most 40)")
    _check_name_free(name)
    return name


def _check_name_free(name: str) -> RunRecord | None:
    """The ended run whose name a launch takes over (its record is archived then), or None; BadInput while it lives."""
    if not runs.record_path(name).exists():
        return None
    try:
        existing = runs.load(name)
    except GpurunError:
        existing = None
    if existing is None or existing.get("state") != "ended":
        raise BadInput(f"--name {name}: a run by that name exists; pick another or tear it down first")
    return existing


def launch(
    spec: Spec,
    ui: Reporter,
    *,
    name: str | None = None,
    resume: str | None = None,
    dry_run: bool = False,
    create_bucket: bool = False,
    keep_waiting: bool = False,
) -> dict[str, Any]:
    provider = get_provider(spec.provider)
    conns = connections.Connections()
    store_url = common.store_url_for(spec)
    run = _choose_name(spec, name)
    files, held_back = scan_holding_back(
        spec.workdir_path, [*spec.sync.exclude, f"/{spec.checkpoint.dir.strip('/')}/"], spec.sync.include
    )
    total = sum(f.size for f in files)
    recovering_group = recovering.applies(spec)
    if recovering_group:
        recovering.check(spec)
    elif keep_waiting:
        raise BadInput("--keep-waiting: only for a run with recovery on AWS (its Auto Scaling group keeps trying)")
    # Read before anything exists: a missing variable is bad input, and nothing is created.
    secret_values = job_secrets.local_values(spec.secrets)
    rows = [("run", run), ("provider", spec.provider)]
    offline = False
    try:
        rows += provider.plan(spec, run)
    except NoCredentials as error:
        shown = provider.plan_offline(spec, run) if dry_run else None
        if shown is None:
            raise
        ui.warn(f"{error}. The plan below needs no AWS; what needs credentials says 'not resolved'")
        rows += shown
        offline = True
    resume_text: str | None = None
    setup_skipped: str | None = None
    try:
        source = find_resume_source(spec, store_url, resume, ui.warn)
    except Exception as error:
        if not offline:
            raise
        source, resume_text = None, f"not resolved ({type(error).__name__}: reading the store needs credentials)"
    if not offline:
        # The machine image already holds what setup would install (same setup hash): no setup on the machine.
        setup_skipped = provider.setup_skipped(spec, run) if spec.setup else None
    rows += [
        ("code", f"{spec.workdir_path} ({len(files)} files, {human_bytes(total)})"),
        *([("held back", _held_back_text(held_back))] if held_back else []),
        *([("secrets", job_secrets.describe(spec.secrets))] if spec.secrets else []),
        ("setup", f"skipped: {setup_skipped}" if setup_skipped else spec.setup or "-"),
        ("run", spec.run),
        (
            "checkpoints",
            f"{spec.checkpoint.dir} -> {store_url}/{run} every {format_duration(spec.checkpoint.every)}, keep {spec.checkpoint.keep}",
        ),
        ("resume", resume_text or (f"from {source['run']} snapshot {source['seq']}" if source else "no (fresh start)")),
    ]
    if spec.checkpoint.every < 10:
        ui.warn(
            f"checkpoint.every is {format_duration(spec.checkpoint.every)}: each snapshot re-reads changed files; "
            "1m or more is usual (the spot notice and the job's exit always trigger one)"
        )
    for key in job_secrets.secret_like_env(spec):
        ui.warn(
            f"env.{key} looks like a secret: env values are kept in the run record, the store and job.sh; "
            f"put it under secrets: (secrets: [{key}], with the value exported here) to keep it out of them"
        )
    if held_back:
        ui.warn(
            f"not syncing {_held_back_text(held_back)}: they look like credentials; "
            "sync.include sends one on purpose, secrets: passes a value to the job"
        )
    if dry_run:
        return {"run": run, "dry_run": True, "plan": [{"item": label, "value": value} for label, value in rows]}
    if total > LARGE_SYNC_BYTES:
        largest = ", ".join(f"{f.path} ({human_bytes(f.size)})" for f in sorted(files, key=lambda f: -f.size)[:5])
        ui.warn(
            f"the code to sync is {human_bytes(total)}; largest: {largest}. Exclude data with sync.exclude or .gpurunignore"
        )

    if create_bucket and store_url.startswith("s3://"):
        from gpurun.store.s3 import create_bucket as make_bucket

        options = common.store_options(spec)
        if make_bucket(store_url, options.get("region"), profile=options.get("profile")):
            ui.say(
                f"created bucket for {store_url} (Block Public Access, SSE-S3 encryption); teardown never deletes it"
            )
    store = open_store(store_url, **common.store_options(spec))
    store.check_writable()
    record: RunRecord = {
        "run": run,
        "provider": spec.provider,
        "state": "launching",
        "exit_code": None,
        "created_at": runs.now_iso(),
        "owner": _owner(),
        "store": store_url,
        "spec": spec.to_record(),
        "machines": [],
        "resources": {},
        "resumed_from": source,
        "last_checkpoint": None,
        "cost_usd": None,
        "jobs": [],
        # Who is launching: `status` tells a launch still in progress from one whose process died.
        "launcher": runs.this_process(),
    }
    lock = threading.Lock()

    def on_change(updated: RunRecord) -> None:
        with lock, runs.locked(run):
            runs.save(updated)

    step = "acquiring machines"
    started: list[tuple[Any, Machine]] = []
    with runs.locked(run):
        # Checked again under the lock: two launches of one --name at once must not share a record.
        replaced = _check_name_free(run)
        if replaced is not None:
            runs.archive(replaced)
            record["jobs_before"] = runs.last_job_number(replaced)
            record["replaces"] = {"created_at": replaced.get("created_at"), "ended_at": replaced.get("ended_at")}
        runs.save(record)
    try:
        ui.say(f"launching {run} on {spec.provider}")
        if setup_skipped:
            ui.say(f"setup skipped: {setup_skipped}")
            record["setup_skipped"] = setup_skipped
        if recovering_group:
            record["keep_waiting"] = keep_waiting
            step = "staging code and agent in the store"
            recovering.stage(spec, record, store, files, source, ui, setup_skipped=setup_skipped)
            step = "acquiring machines"
        machines = provider.acquire(spec, record, on_change, ui.say, connect=conns.connect)
        record["machines"] = machines
        setup_hash = fingerprints.setup_hash(spec.setup, spec.workdir_path, files)
        if provider.capabilities.run_dir_here:
            step = "preparing this project's venv"
            record["job_env"] = local_python.prepare(record, ui.say)
            if spec.setup and not setup_skipped and local_python.setup_done_before(record, setup_hash):
                setup_skipped = "this project's venv already went through this setup (same command and files)"
                ui.say(f"setup skipped: {setup_skipped}")
                record["setup_skipped"] = setup_skipped
        runs.add_job(
            record,
            command=spec.run,
            code=fingerprints.code_hash(files),
            setup_hash=setup_hash,
            setup_ran=bool(spec.setup) and not setup_skipped,
        )
        on_change(record)
        if recovering_group:
            # The machine sets itself up from the store; nothing connects to it.
            step = "waiting for the first machine's job"
            recovering.wait_for_first_job(store, run, ui)
        else:
            step = "preparing machines"
            _prepare_all(provider, conns, record, files, source, ui, started, secret_values)
            if spec.setup and not setup_skipped:
                step = "running setup"
                wait_for_setup(record, started, ui)
                local_python.note_setup_done(record, setup_hash)
        record["state"] = "running"
        on_change(record)
        snaps.put_run_record(store, run, record)
        if not provider.capabilities.run_dir_here:
            from gpurun.app.remote_access import write_ssh_config

            write_ssh_config(record)
    except StillWaiting:
        # --keep-waiting: the group goes on trying; the record and the store say how it goes.
        record["launcher"] = None
        on_change(record)
        snaps.put_run_record(store, run, record)
        raise
    except BaseException as error:
        raise rolled_back(error, provider, conns, record, started, ui, on_change, step) from None
    ui.say(f"{run} is running: `gpurun logs {run} -f` follows it, `gpurun teardown {run}` ends it")
    return runs.public_view(record)


def _owner() -> str:
    try:
        return getpass.getuser()
    except Exception:
        return "unknown"


def _prepare_all(
    provider: Provider,
    conns: Connections,
    record: RunRecord,
    files: list[WalkedFile],
    source: ResumeSource | None,
    ui: Reporter,
    started: Started,
    secret_values: dict[str, str],
) -> None:
    machines = record["machines"]
    agents = {id(m) for m in common.agent_machines(record)}
    if len(machines) == 1:
        _prepare(
            provider, conns, record, machines[0], files, source, ui, started, id(machines[0]) in agents, secret_values
        )
        return
    with ThreadPoolExecutor(max_workers=min(16, len(machines))) as pool:
        futures = [
            pool.submit(
                _prepare,
                provider,
                conns,
                record,
                machine,
                files,
                source,
                ui,
                started,
                id(machine) in agents,
                secret_values,
            )
            for machine in machines
        ]
        for future in futures:
            future.result()


def _prepare(
    provider: Provider,
    conns: Connections,
    record: RunRecord,
    machine: Machine,
    files: list[WalkedFile],
    source: ResumeSource | None,
    ui: Reporter,
    started: Started,
    with_agent: bool,
    secret_values: dict[str, str],
) -> None:
    spec = record["spec"]
    prefix = f"[node {machine['rank']}] " if len(record["machines"]) > 1 else ""
    transport = conns.connect(record, machine)
    started.append((transport, machine))
    if capabilities_of(record).run_dir_under_login_home:
        # The login's real home, whatever the AMI's user layout is.
        home = transport.check('printf %s "$HOME"', what="finding the home directory").strip()
        machine["run_dir"] = f"{home}/{paths.machine_run_dir(record['run'])}"
    run_dir = machine["run_dir"]
    qdir = shlex.quote(run_dir)
    transport.check(f"mkdir -p {qdir}/work && chmod 700 {qdir}", what="creating the run directory")
    total = sum(f.size for f in files)
    with ui.progress(f"{prefix}syncing code", total) as advance:
        last = [0]

        def progress(_files: int, sent: int) -> None:
            advance(sent - last[0])
            last[0] = sent

        for attempt in range(3):
            try:
                result = sync_tree(
                    transport,
                    Path(spec["workdir"]),
                    common.work_dir(machine),
                    f"{run_dir}/sync.manifest.json",
                    files=files,
                    progress=progress,
                )
                break
            except ConnectionLost as error:
                # The manifest moves only after a complete unpack: a retry resends what is missing.
                if attempt == 2:
                    raise
                ui.warn(f"{prefix}the connection dropped during sync ({error}); syncing again")
    ui.say(f"{prefix}synced {result.files_sent} files ({human_bytes(result.bytes_sent)}) to {transport.label}")
    python = ""  # needed only by the agent and the restore below
    if with_agent or source:
        python = connections.agent_python(record, transport, ui.say)
    resume_from = None
    if source:
        # Every node gets the snapshot it needs: rank 0's, or its own with checkpoint.nodes=all.
        rank = machine.get("rank", 0)
        own = spec["checkpoint"].get("nodes") == "all" and rank > 0
        source_run = common.rank_run_name(source["run"], rank if own else 0)
        into = common.checkpoint_dir(record, machine)
        # The checkpoint dir becomes exactly the snapshot; anything already there is kept beside it, never mixed.
        arguments = [
            "--to", source["store"], "--restore-from", source_run, "--seq", str(source["seq"]), "--into", into, "--force",
        ]  # fmt: skip
        region = common.store_options(record).get("region")
        if region:
            arguments += ["--region", region]
        transport.check(
            common.agent_command(python, arguments), what=f"restoring snapshot {source['seq']} of {source['run']}"
        )
        ui.say(f"{prefix}restored snapshot {source['seq']} of {source['run']} into {spec['checkpoint']['dir']}")
        resume_from = into
    if with_agent:
        machine["agent_pid"] = jobs.start_agent(transport, run_dir, python, common.agent_arguments(record, machine))
    if spec.get("secrets"):
        if not python and job_secrets.machine_references(spec["secrets"]):
            python = connections.agent_python(record, transport, ui.say)
        job_secrets.install(transport, run_dir, record, secret_values, python)
    env = common.job_environment(record, machine, resume_from)
    env.update(provider.machine_env(record, machine))
    restarts = common.job_restarts(record, machine, python) if with_agent else None
    setup = None if record.get("setup_skipped") else spec.get("setup")
    machine["job_pid"] = jobs.start_job(transport, run_dir, common.work_dir(machine), env, setup, spec["run"], restarts)


def wait_for_setup(record: RunRecord, started: Started, ui: Reporter, poll: float = 0.5) -> None:
    """Wait until every node is past `setup`; one node failing fails the whole launch."""
    import time

    pending = {machine["rank"]: (transport, machine) for transport, machine in started}
    with ui.spinner(f"running setup on {len(pending)} node(s)") as update:
        while pending:
            last_line = None
            for rank, (transport, machine) in list(pending.items()):
                state = jobs.read_state(transport, machine["run_dir"])
                if state["phase"] == "run":
                    del pending[rank]
                elif state["exit_code"] is not None or (state["job_started"] and not state["job_alive"]):
                    raise _setup_failed(record, transport, machine, state)
                else:
                    last_line = last_line or state.get("last_line")
            if pending:
                # The spinner shows setup's latest output line (escaped by the ui); piped, nothing is printed.
                update(f"running setup on {len(pending)} node(s)" + (f": {last_line[:120]}" if last_line else ""))
                time.sleep(poll)


SETUP_TAIL_LINES = 20


def _setup_failed(record: RunRecord, transport: Transport, machine: Machine, state: jobs.JobReading) -> GpurunError:
    """The error for a failed setup: its last lines under it, its whole output kept in the store first."""
    import time

    from gpurun.store.logs import chunk_key

    run, rank = record["run"], machine.get("rank", 0)
    log = f"{shlex.quote(machine['run_dir'])}/job.log"
    # Only the end of the log is read back: the machine's output is untrusted.
    tail = transport.run(f"tail -c 65536 {log} | tail -n {SETUP_TAIL_LINES + 1}").text.splitlines()
    lines = [line for line in tail if not line.startswith("[gpurun] setup failed")][-SETUP_TAIL_LINES:]
    job = runs.current_job(record)
    number = job["number"] if job else 1
    where_run = common.rank_run_name(run, rank)
    kept = f"{record['store']}/{where_run}/logs/job-{number:04d}/"
    if machine in common.agent_machines(record):
        # The agent ships the job's output when the job ends: let it finish before anything is removed.
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and jobs.read_state(transport, machine["run_dir"])["agent_alive"]:
            time.sleep(0.3)
    else:
        try:
            data = transport.run(f"tail -c 1048576 {log}", timeout=120).stdout
            common.open_run_store(record).put_bytes(chunk_key(where_run, number, 0), data)
        except GpurunError:
            kept = ""
    where = f" on node {rank}" if len(record["machines"]) > 1 else ""
    shown = f"its last {len(lines)} lines below" if lines else "it printed nothing"
    stored = f"; its whole output is kept in {kept} (`gpurun logs {run} --store {record['store']}`)" if kept else ""
    return GpurunError(
        f"setup failed{where} with exit status {state['exit_code']} ({shown}){stored}",
        details=[f"| {line[:400]}" for line in lines],
    )


@contextlib.contextmanager
def sigint_deferred() -> Iterator[None]:
    """Hold Ctrl-C while rolling back (main thread only; elsewhere signals cannot be set).

    A second Ctrl-C must not cut the rollback short: a half-done rollback is what leaks money.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    try:
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    except (ValueError, OSError):
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def rolled_back(
    error: BaseException,
    provider: Provider,
    conns: Connections,
    record: RunRecord,
    started: Started,
    ui: Reporter,
    on_change: Callable[[RunRecord], None],
    step: str,
) -> BaseException:
    """Remove what the launch made (the one rollback); the error to raise, saying what happened.

    The first line says what failed and whether everything is gone; the error's
    own lines (a capacity table) and the list of what was removed follow it.
    """
    run = record["run"]
    interrupted = isinstance(error, (KeyboardInterrupt, Interrupted))
    ui.say("interrupted, removing what it created…" if interrupted else f"launch failed: removing what {run} created")
    with sigint_deferred():
        complete, removed = roll_back(provider, conns, record, started, ui, on_change)
    outcome = (
        "everything it created was removed"
        if complete
        else f"some of what it created is left: run `gpurun teardown {run}` to remove it"
    )
    details = list(error.details) if isinstance(error, GpurunError) else []
    if removed:
        details.append(f"removed: {', '.join(removed)}")
    if interrupted:
        # The provider names the step it was in ("interrupted while waiting for SSH").
        what = str(error) if isinstance(error, Interrupted) and str(error) else f"interrupted while {step}"
        return Interrupted(f"launch of {run} {what}; {outcome}", details=details)
    if isinstance(error, GpurunError):
        error.args = (f"launch of {run} failed while {step}: {error}; {outcome}",)
        error.details = details
        return error
    return error


def roll_back(
    provider: Provider,
    conns: Connections,
    record: RunRecord,
    started: Started,
    ui: Reporter,
    on_change: Callable[[RunRecord], None],
) -> tuple[bool, list[str]]:
    """Remove what the launch made: (complete, what was removed). When something is left, the
    record stays (state failed) for `gpurun teardown`; else it is deleted."""
    removed: list[str] = []
    for transport, machine in started:
        try:
            for name in ("job", "agent"):
                jobs.signal_group(transport, machine["run_dir"], name, "KILL")
            if not capabilities_of(record).machines_disposable:
                transport.run(f"rm -rf {shlex.quote(machine['run_dir'])}", timeout=60)
                removed.append(f"run directory {machine['run_dir']} on {transport.label}")
        except BaseException as error:  # keep rolling back what else we can
            ui.warn(f"could not clean {machine.get('run_dir')} on {transport.label}: {error}")
    try:
        removed += provider.release(record, on_change, ui.say)
        conns.close(record["run"])
    except BaseException as error:
        ui.error(
            f"rollback of {record['run']} is incomplete: {error}. Run `gpurun teardown {record['run']}` to finish it"
        )
        record["state"] = "failed"
        on_change(record)
        return False, removed
    if capabilities_of(record).run_dir_here:
        shutil.rmtree(paths.local_runs_dir() / record["run"], ignore_errors=True)
    runs.delete(record["run"])
    return True, removed
