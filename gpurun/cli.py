"""The command line: thin click commands over gpurun.app. The one place errors are printed.

Only click is imported at start-up; each command imports what it needs, so
`gpurun --help` stays fast.
"""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from gpurun import __version__
from gpurun.errors import BadInput, GpurunError

if TYPE_CHECKING:
    from gpurun.models import Job, RunRecord
    from gpurun.ui import Ui

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _ui(json_mode: bool = False) -> Ui:
    from gpurun.ui import Ui

    ctx = click.get_current_context()
    return Ui(json_mode=json_mode, debug=bool(ctx.find_root().params.get("debug")))


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, prog_name="gpurun")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
def cli(debug: bool) -> None:
    """Rent GPU machines for training runs and give them back safely.

    \b
    gpurun launch experiment.yaml      plan, provision, sync, start job and checkpoint agent
    gpurun status                      runs, jobs, cost, last checkpoint
    gpurun exec RUN [-- CMD]           send what changed, start the run's next job on its machines
    gpurun logs RUN -f                 follow the job's output (from the store after teardown)
    gpurun checkpoint-sync RUN         snapshot now (--list, --download DIR)
    gpurun teardown RUN                final sync, stop, release everything
    """


@cli.command(context_settings=CONTEXT)
@click.argument("spec_file", metavar="SPEC", type=click.Path(dir_okay=True, path_type=Path))
@click.option("--name", help="Run name (default: <spec name>-<6 chars>).")
@click.option(
    "--set", "overrides", multiple=True, metavar="FIELD=VALUE", help="Override a spec field, e.g. aws.spot=false."
)
@click.option("--dry-run", is_flag=True, help="Print the plan; create nothing.")
@click.option("--follow", "-f", is_flag=True, help="Follow the job's output after launch.")
@click.option("--resume", metavar="RUN", help="Restore RUN's latest snapshot before the job starts.")
@click.option("--create-bucket", is_flag=True, help="Create the s3:// store's bucket if missing (private, encrypted).")
@click.option("--on", "on_run", metavar="RUN", help="Run SPEC as the next job of live run RUN (as `gpurun exec`).")
@click.option("--replace", is_flag=True, help="With --on: stop RUN's running job first (SIGTERM, final snapshot).")
@click.option(
    "--keep-waiting",
    is_flag=True,
    help="Recovery on AWS: when no machine starts within aws.capacity_wait, exit 3 but leave the group trying.",
)
@click.option("--json", "json_mode", is_flag=True, help="Print one JSON document.")
def launch(
    spec_file: Path,
    name: str | None,
    overrides: tuple[str, ...],
    dry_run: bool,
    follow: bool,
    resume: str | None,
    create_bucket: bool,
    on_run: str | None,
    replace: bool,
    keep_waiting: bool,
    json_mode: bool,
) -> None:
    """Launch the experiment described in SPEC."""
    from gpurun.app.launch import launch as do_launch
    from gpurun.spec import load_spec

    if on_run is None and replace:
        raise BadInput("--replace goes with --on RUN (or `gpurun exec RUN --replace`)")
    if on_run is not None:
        given = [flag for flag, value in (("--name", name), ("--resume", resume)) if value]
        given += [flag for flag, value in (("--dry-run", dry_run), ("--create-bucket", create_bucket)) if value]
        if given:
            raise BadInput(f"{', '.join(given)}: not with --on RUN (the run, its store and its machines exist)")
    ui = _ui(json_mode)
    spec = load_spec(spec_file, overrides)
    if on_run is not None:
        from gpurun.app.execute import exec_job

        result = exec_job(on_run, ui, spec=spec, replace=replace)
        _finish_job_command(ui, result, follow=follow, json_mode=json_mode)
        return
    result = do_launch(
        spec, ui, name=name, resume=resume, dry_run=dry_run, create_bucket=create_bucket, keep_waiting=keep_waiting
    )
    if dry_run:
        if json_mode:
            ui.emit_json(result)
        else:
            ui.rows([(row["item"], row["value"]) for row in result["plan"]])
            ui.say("dry run: nothing was created")
        return
    _finish_job_command(ui, result, follow=follow, json_mode=json_mode)


def _finish_job_command(ui: Ui, result: dict[str, Any], *, follow: bool, json_mode: bool) -> None:
    """What launch and exec print: the run; with --follow, the job's output, ending with the job's status.

    With --json the one JSON document on stdout is the run as it stands when the
    command ends: after the job, when following (its output goes to stderr then).
    """
    if not follow:
        if json_mode:
            ui.emit_json(result)
        else:
            ui.result(result["run"])
        return
    if not json_mode:
        ui.result(result["run"])
    code = _follow_logs(result["run"], tail=None, to_stderr=json_mode)
    if json_mode:
        from gpurun.app.status import collect
        from gpurun.runs import public_view

        records, _problems = collect(result["run"])
        ui.emit_json(public_view(records[0]))
    if code:
        raise SystemExit(code)


@cli.command("exec", context_settings=CONTEXT)
@click.argument("run")
@click.argument("command", nargs=-1, type=click.UNPROCESSED, metavar="[-- CMD]")
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="FIELD=VALUE",
    help="Change run, setup, env.NAME or sync for this job on.",
)
@click.option("--replace", is_flag=True, help="Stop the running job first (SIGTERM, final snapshot).")
@click.option("--follow", "-f", is_flag=True, help="Follow the new job's output.")
@click.option("--json", "json_mode", is_flag=True, help="Print one JSON document (the run).")
def exec_command(
    run: str, command: tuple[str, ...], overrides: tuple[str, ...], replace: bool, follow: bool, json_mode: bool
) -> None:
    """Sync what changed to RUN's machines and start its next job there (CMD replaces the spec's run).

    Setup runs again only when it, or a file it names, changed. A running job is
    left alone unless --replace.
    """
    from gpurun.app.execute import command_text, exec_job

    ui = _ui(json_mode)
    result = exec_job(run, ui, command=command_text(list(command)), overrides=overrides, replace=replace)
    _finish_job_command(ui, result, follow=follow, json_mode=json_mode)


@cli.command(context_settings=CONTEXT)
@click.argument("run", required=False)
@click.option(
    "--store", "store_url", metavar="URL", help="Also list runs recorded in this store (from other computers)."
)
@click.option("--jobs", "list_jobs", is_flag=True, help="With RUN: list every job of the run.")
@click.option("--all", "all_runs", is_flag=True, help="Also runs that ended more than a day ago.")
@click.option("--json", "json_mode", is_flag=True, help="Print one JSON document.")
def status(run: str | None, store_url: str | None, list_jobs: bool, all_runs: bool, json_mode: bool) -> None:
    """Runs with their state, job, machine, cost and last checkpoint (active and recent ones; --all for every one)."""
    from gpurun.app.status import collect
    from gpurun.runs import public_view

    if list_jobs and run is None:
        raise BadInput("--jobs goes with a RUN: `gpurun status RUN --jobs`")
    if all_runs and run is not None:
        raise BadInput("--all lists every run; give it without RUN")
    ui = _ui(json_mode)
    hidden: list[int] | None = None if all_runs or run is not None else []
    records, problems = collect(run, ui=ui, store_url=store_url, hidden=hidden)
    for problem in problems:
        ui.warn(problem)
    if json_mode:
        ui.emit_json([public_view(record) for record in records])
        return
    older = hidden[0] if hidden else 0
    if not records:
        ui.say(
            f"no active or recent runs ({older} older, ended: `gpurun status --all`)"
            if older
            else "no runs yet: `gpurun launch SPEC` starts one"
        )
        return
    if older:
        ui.say(f"{older} run(s) that ended more than a day ago are not shown: `gpurun status --all`")
    if list_jobs:
        _jobs_table(ui, records[0])
        return
    _status_table(ui, records)
    if run is not None:
        _current_job_line(ui, records[0])
        _generation_lines(ui, records[0])


def _job_outcome_text(job: Job) -> str:
    ended_by = str(job.get("ended_by") or "")
    if not ended_by:
        return "running"
    code = job.get("exit_code")
    if ended_by == "exited":
        return f"exit {code}"
    return ended_by.replace("_", " ") + (f" (exit {code})" if code is not None else "")


def _current_job_line(ui: Ui, record: RunRecord) -> None:
    from gpurun.app.status import age
    from gpurun.runs import jobs_of
    from gpurun.text import escape_controls

    listed = jobs_of(record)
    if not listed:
        return
    job = listed[-1]
    ui.say(
        f"job {job['number']} of {len(listed)}: {escape_controls(str(job.get('command') or ''))[:200]}, "
        f"{_job_outcome_text(job)}, started {age(job.get('started_at'))}"
        + ("" if len(listed) == 1 else f" (`gpurun status {record['run']} --jobs` lists all)")
    )


def _generation_lines(ui: Ui, record: RunRecord) -> None:
    """A recovering run's machines, one line each (values were escaped when read from the store)."""
    listed = record.get("generations")
    if not isinstance(listed, list) or not listed:
        return
    for item in listed:
        ended = f"ended {item.get('ended_at')} ({item.get('why') or '-'})" if item.get("ended_at") else "current"
        ui.say(
            f"machine {item.get('generation')}: {item.get('instance_id')} {item.get('type') or '-'} "
            f"{item.get('zone') or '-'}, started {item.get('started_at') or '-'}, {ended}"
        )


def _jobs_table(ui: Ui, record: RunRecord) -> None:
    from gpurun.app.status import age
    from gpurun.runs import jobs_of
    from gpurun.text import escape_controls

    rows = []
    for job in jobs_of(record):
        rows.append(
            [
                str(job["number"]),
                escape_controls(str(job.get("command") or ""))[:80],
                str(job.get("code") or "-")[:12],
                "yes" if job.get("setup_ran") else "no",
                age(job.get("started_at")),
                age(job.get("ended_at")) if job.get("ended_at") else "-",
                _job_outcome_text(job),
            ]
        )
    ui.table(["JOB", "COMMAND", "CODE", "SETUP", "STARTED", "ENDED", "OUTCOME"], rows)


def _status_table(ui: Ui, records: list[RunRecord]) -> None:
    from gpurun.app.status import age
    from gpurun.providers.capabilities import capabilities_of
    from gpurun.runs import restarts_view as public_restarts
    from gpurun.sizes import human_bytes

    rows = []
    for record in records:
        machines = record.get("machines", [])
        job = record.get("job") or {}
        if record["state"] in ("succeeded", "failed", "interrupted") or record.get("exit_code") is not None:
            job_text = (
                f"exit {record.get('exit_code')}" if record.get("exit_code") is not None else job.get("note", "ended")
            )
        elif job.get("alive"):
            job_text = job.get("phase") or "running"
        else:
            job_text = "-"
        listed = record.get("jobs")
        if isinstance(listed, list) and listed and isinstance(listed[-1], dict):
            job_text = f"#{listed[-1].get('number')} {job_text}"
        restarts = public_restarts(record)
        if restarts and restarts["used"]:
            job_text += f" (restart {restarts['used']}/{restarts['max']})"
        if capabilities_of(record).run_dir_here:
            where = "local"
        else:
            where = (
                ", ".join(
                    f"{m.get('instance_type') or m.get('host')} {m.get('state') or ''}".strip()
                    + (" (unreachable)" if m.get("unreachable") else "")
                    for m in machines
                )
                or "-"
            )
        checkpoint = record.get("last_checkpoint")
        text = (
            f"{age(checkpoint['at'])}, {human_bytes(checkpoint['bytes'])} (#{checkpoint['seq']})"
            if checkpoint
            else "none yet"
        )
        error = record.get("checkpoint_error")
        if error:
            text += f"; SYNC FAILING: {error['error']}"
        if record.get("checkpoint_warning"):
            text += f"; {record['checkpoint_warning']}"
        cost = record.get("cost_usd")
        rows.append(
            [
                record["run"],
                record["state"] + (" (launcher gone)" if record.get("launcher_gone") else ""),
                job_text,
                where,
                age(record.get("created_at")).replace(" ago", ""),
                f"${cost:.2f}" if isinstance(cost, (int, float)) else "-",
                text,
                _gpu_text(record),
            ]
        )
    columns = ["RUN", "STATE", "JOB", "MACHINE", "AGE", "COST", "LAST CHECKPOINT", "GPU"]
    if all(row[-1] == "-" for row in rows):
        columns, rows = columns[:-1], [row[:-1] for row in rows]  # no GPU anywhere: no empty column
    ui.table(columns, rows)


def _gpu_text(record: RunRecord) -> str:
    """Utilisation and memory per node, as status last read them (only while the run is active)."""
    from gpurun.gpu import summary

    machines = record.get("machines", [])
    if record["state"] not in ("launching", "running") or not any(m.get("gpus") for m in machines):
        return "-"
    if len(machines) == 1:
        return summary(machines[0].get("gpus"))
    return "; ".join(f"n{m.get('rank', 0)} {summary(m.get('gpus'))}" for m in machines)


@cli.command(context_settings=CONTEXT)
@click.argument("run")
@click.option("--follow", "-f", is_flag=True, help="Keep following until the job ends.")
@click.option("--tail", type=click.IntRange(min=0), help="Start with the last N lines.")
@click.option("--node", type=click.IntRange(min=0), help="Show one node's output (default: rank 0).")
@click.option("--job", type=click.IntRange(min=1), help="Which job (default: the current one).")
@click.option(
    "--store", "store_url", metavar="URL", help="Read the output the agent kept in this store (works after teardown)."
)
def logs(run: str, follow: bool, tail: int | None, node: int | None, job: int | None, store_url: str | None) -> None:
    """The job's output (stdout and stderr): from the machine while it lives, from the store after."""
    code = _follow_logs(run, tail=tail, follow=follow, node=node, job=job, store_url=store_url)
    if code:
        raise SystemExit(code)


def _follow_logs(
    run: str,
    *,
    tail: int | None,
    follow: bool = True,
    node: int | None = None,
    to_stderr: bool = False,
    job: int | None = None,
    store_url: str | None = None,
) -> int:
    """Show the job's output; following, return the exit status the command ends with."""
    from gpurun.app.logs import follow_outcome, show_logs

    try:
        outcome = show_logs(
            run,
            follow=follow,
            tail=tail,
            node=node,
            write=_stderr_bytes if to_stderr else None,
            job=job,
            store_url=store_url,
        )
    except KeyboardInterrupt:
        click.echo(
            f"\n[gpurun] stopped following; the job goes on. `gpurun logs {run} -f` follows it again, "
            f"`gpurun teardown {run}` ends it",
            err=True,
        )
        raise SystemExit(130) from None
    if not follow:
        return 0
    from gpurun.text import printable

    code, message = follow_outcome(outcome)
    click.echo(f"[gpurun] {printable(message, one_line=True)}", err=True)  # parts of it come from a store
    return code


def _stderr_bytes(chunk: bytes) -> None:
    sys.stderr.flush()
    sys.stderr.buffer.write(chunk)
    sys.stderr.buffer.flush()


@cli.command("checkpoint-sync", context_settings=CONTEXT)
@click.argument("run", required=False)
@click.option("--list", "list_mode", is_flag=True, help="List the run's snapshots.")
@click.option(
    "--download",
    type=click.Path(file_okay=False, path_type=Path),
    metavar="DIR",
    help="Download a snapshot into DIR, verified.",
)
@click.option("--seq", type=click.IntRange(min=1), help="Which snapshot (default: LATEST).")
@click.option(
    "--force", is_flag=True, help="With --download: replace a non-empty DIR (its old content is kept beside it)."
)
@click.option("--store", "store_url", metavar="URL", help="Store to read (for runs launched elsewhere).")
@click.option(
    "--watch",
    type=click.Path(file_okay=False, path_type=Path),
    metavar="DIR",
    help="Agent mode: snapshot DIR on a schedule.",
)
@click.option("--to", "to_url", metavar="URL", help="Agent mode: the store URL.")
@click.option("--every", default="5m", show_default=True, help="Agent mode: interval (90s, 5m, 1h).")
@click.option("--keep", type=click.IntRange(min=1), default=3, show_default=True, help="Agent mode: snapshots to keep.")
@click.option("--run-dir", type=click.Path(file_okay=False, path_type=Path), hidden=True)
@click.option("--spot-notice", is_flag=True, hidden=True)
@click.option("--json", "json_mode", is_flag=True, help="Print one JSON document.")
def checkpoint_sync(
    run: str | None,
    list_mode: bool,
    download: Path | None,
    seq: int | None,
    force: bool,
    store_url: str | None,
    watch: Path | None,
    to_url: str | None,
    every: str,
    keep: int,
    run_dir: Path | None,
    spot_notice: bool,
    json_mode: bool,
) -> None:
    """Sync RUN's checkpoints now, list them, or download one.

    With --watch DIR --to URL it is the checkpoint agent itself.
    """
    ui = _ui(json_mode)
    if watch is not None:
        _agent_mode(run, watch, to_url, every, keep, run_dir, spot_notice)
        return
    _reject_dropped_options(store_url=store_url, list_mode=list_mode, download=download, seq=seq)
    if force and download is None:
        raise BadInput("--force goes with --download DIR (replace what DIR holds)")
    if not run:
        raise BadInput("checkpoint-sync needs a RUN (or --watch DIR --to URL for agent mode)")
    from gpurun.app import checkpoints

    if list_mode:
        found = checkpoints.list_snapshots(run, store_url=store_url, warn=ui.warn)
        if json_mode:
            ui.emit_json(found)
            return
        from gpurun.app.status import age
        from gpurun.sizes import human_bytes

        if not found:
            ui.say(f"run {run} has no snapshot yet")
            return
        ui.table(
            ["SEQ", "TAKEN", "FILES", "SIZE"],
            [[str(s["seq"]), age(s["at"]), str(s["files"]), human_bytes(s["bytes"])] for s in found],
        )
        return
    if download is not None:
        info = checkpoints.download(run, download, seq=seq, ui=ui, store_url=store_url, force=force)
        if json_mode:
            ui.emit_json(info)
        else:
            if info.get("previous"):
                ui.say(f"the previous content of {info['dir']} is now in {info['previous']}")
            ui.result(
                f"snapshot {info['seq']}: {info['files']} files, {info['bytes']} bytes, verified, in {info['dir']}"
            )
        return
    info = checkpoints.sync_now(run, ui)
    if json_mode:
        ui.emit_json(info)
    elif info["new"]:
        ui.result(
            f"snapshot {info['seq']}: {info['files']} files, {info['bytes']} bytes (sent {info.get('sent_bytes') or 0})"
        )
    else:
        ui.result(
            f"snapshot {info['seq']}: unchanged since the last sync ({info['files']} files, {info['bytes']} bytes)"
        )


def _reject_dropped_options(*, store_url: str | None, list_mode: bool, download: Path | None, seq: int | None) -> None:
    """Options this checkpoint-sync mode would ignore are bad input, not silently dropped."""
    from click.core import ParameterSource

    ctx = click.get_current_context()
    agent_only = [
        f"--{name}"
        for name in ("to", "every", "keep")
        if ctx.get_parameter_source("to_url" if name == "to" else name) not in (None, ParameterSource.DEFAULT)
    ]
    if agent_only:
        verb = "goes" if len(agent_only) == 1 else "go"
        raise BadInput(f"{', '.join(agent_only)} {verb} with --watch DIR (agent mode: --watch DIR --to URL)")
    if store_url is not None and not list_mode and download is None:
        raise BadInput("--store goes with --list or --download (to read a run launched elsewhere)")
    if list_mode and download is not None:
        raise BadInput("--list and --download DIR: one at a time")
    if seq is not None and download is None:
        raise BadInput("--seq goes with --download DIR (which snapshot to download)")


def _agent_mode(
    run: str | None,
    watch: Path,
    to_url: str | None,
    every: str,
    keep: int,
    run_dir: Path | None,
    spot_notice: bool,
) -> None:
    """`checkpoint-sync --watch` is the agent: the same parser and code as `gpurun agent`."""
    from gpurun.agent.__main__ import main as agent_main

    argv = [f"--watch={watch}", f"--every={every}", f"--keep={keep}"]
    argv += [f"--to={to_url}"] if to_url is not None else []
    argv += [f"--run={run}"] if run else []
    argv += [f"--run-dir={run_dir}"] if run_dir is not None else []
    argv += ["--spot-notice"] if spot_notice else []
    raise SystemExit(agent_main(argv))


@cli.command(
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []},
    add_help_option=False,
)
@click.argument("arguments", nargs=-1, type=click.UNPROCESSED)
def agent(arguments: tuple[str, ...]) -> None:
    """The checkpoint agent (what runs next to the job); `gpurun agent --help` lists its options.

    The same command as `python -m gpurun.agent`, which machines run.
    """
    from gpurun.agent.__main__ import main as agent_main

    raise SystemExit(agent_main(list(arguments)))


@cli.command(context_settings=CONTEXT)
@click.argument("names", nargs=-1, metavar="RUN...")
@click.option("--all", "all_runs", is_flag=True, help="Every run that is not ended.")
@click.option("--orphans", is_flag=True, help="gpurun-tagged AWS resources that no local record knows.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask.")
@click.option("--no-final-sync", is_flag=True, help="Skip the final checkpoint sync.")
@click.option("--keep-files", is_flag=True, help="Keep the run directory on the machine (ssh and local).")
@click.option(
    "--store",
    "store_url",
    metavar="URL",
    help="End AWS runs recorded only in this store (launched from another computer); with --orphans, runs live in it are not orphans.",
)
@click.option(
    "--region",
    "regions",
    multiple=True,
    metavar="REGION",
    help="With --orphans: where to look (repeatable; default: the regions of known runs).",
)
@click.option("--profile", metavar="NAME", help="With --orphans or --store: the AWS profile to use here.")
@click.option(
    "--force",
    is_flag=True,
    help="A run whose record here is damaged: rebuild it from the store's copy or the run directory, then tear down.",
)
@click.option("--json", "json_mode", is_flag=True, help="Print one JSON document.")
def teardown(
    names: tuple[str, ...],
    all_runs: bool,
    orphans: bool,
    yes: bool,
    no_final_sync: bool,
    keep_files: bool,
    store_url: str | None,
    regions: tuple[str, ...],
    profile: str | None,
    force: bool,
    json_mode: bool,
) -> None:
    """Final sync, stop the job, release everything the run created."""
    from gpurun import runs
    from gpurun.app.teardown import check_can_end_here, recover_damaged
    from gpurun.app.teardown import teardown as do_teardown

    ui = _ui(json_mode)
    if orphans:
        from gpurun.app.orphans import teardown_orphans

        if names or all_runs:
            raise BadInput("--orphans goes alone: not with run names or --all")
        result = teardown_orphans(
            ui, yes=yes, confirm=_confirm, profile=profile, regions=list(regions) or None, store_url=store_url
        )
        if json_mode:
            ui.emit_json(result)
        return
    if regions:
        raise BadInput("--region goes with --orphans (a run's own region comes from its record)")
    if profile and not store_url:
        raise BadInput("--profile goes with --orphans or --store (a run launched here uses its spec's aws.profile)")
    if all_runs and store_url:
        raise BadInput("--store goes with run names or --orphans, not --all (only runs recorded here are all known)")
    if all_runs and names:
        raise BadInput("give run names or --all, not both")
    if all_runs:
        records, problems = runs.load_all()
        for problem in problems:
            ui.warn(f"{problem}; that run was not torn down")
        names = tuple(r["run"] for r in records if r["state"] != "ended")
        if not names:
            ui.say("no run to tear down")
            if json_mode:
                ui.emit_json({"runs": []})
            return
    if not names:
        raise BadInput("teardown needs RUN names, --all or --orphans")
    for name in names:
        if force:
            recover_damaged(name, ui)
        # Unknown names, and runs this computer cannot reach, are bad input before anything is touched.
        check_can_end_here(runs.load_here_or_from_store(name, store_url, profile))
    if not yes and not _confirm(f"Tear down {', '.join(names)}?"):
        raise BadInput("not confirmed; nothing was changed")
    results = []
    for name in names:
        result = do_teardown(
            name, ui, final_sync=not no_final_sync, keep_files=keep_files, store_url=store_url, profile=profile
        )
        results.append(result)
        if not json_mode:
            for item in result["removed"]:
                ui.say(f"removed {item}")
            ui.result(f"{name} ended")
    if json_mode:
        ui.emit_json({"runs": results})


@cli.group(context_settings=CONTEXT)
def image() -> None:
    """Bake a live aws run's machine into an AMI; later launches with the same setup skip setup."""


@image.command("create", context_settings=CONTEXT)
@click.argument("run")
@click.option("--name", help="Image name (default: <run>-<UTC time>).")
@click.option("--json", "json_mode", is_flag=True, help="Print one JSON document.")
def image_create(run: str, name: str | None, json_mode: bool) -> None:
    """Snapshot RUN's machine into an image without stopping it (its files and key are left out)."""
    from gpurun.app.images import create

    ui = _ui(json_mode)
    result = create(run, ui, name=name)
    if json_mode:
        ui.emit_json(result)
        return
    ui.result(f"image {result['name']} ({result['id']}) is available; use it with aws.ami: image:{result['name']}")


@image.command("list", context_settings=CONTEXT)
@click.option("--region", metavar="REGION", help="Where to look (default: your AWS config's region).")
@click.option("--profile", metavar="NAME", help="The AWS profile to use.")
@click.option("--json", "json_mode", is_flag=True, help="Print one JSON document.")
def image_list(region: str | None, profile: str | None, json_mode: bool) -> None:
    """gpurun images: name, size, source, age and monthly snapshot cost."""
    from gpurun.app.images import list_images
    from gpurun.providers.aws.images import age_days

    ui = _ui(json_mode)
    found = list_images(region=region, profile=profile)
    if json_mode:
        ui.emit_json([item.as_dict() for item in found])
        return
    if not found:
        ui.say("no gpurun images: `gpurun image create RUN` bakes one")
        return
    rows = []
    for item in found:
        days = age_days(item.created)
        source = item.source_ami + (f" (run {item.source_run})" if item.source_run else "")
        rows.append(
            [
                item.name,
                item.id,
                item.state,
                f"{item.size_gb} GB",
                source,
                "?" if days is None else (f"{days:.0f}d" if days >= 1 else f"{days * 24:.0f}h"),
                f"${item.monthly_usd():.2f}",
                item.setup_hash[:12],
            ]
        )
    ui.table(["NAME", "ID", "STATE", "SIZE", "SOURCE", "AGE", "$/MONTH", "SETUP HASH"], rows)


@image.command("delete", context_settings=CONTEXT)
@click.argument("names", nargs=-1, metavar="NAME...")
@click.option("--region", metavar="REGION", help="Where the images are (default: your AWS config's region).")
@click.option("--profile", metavar="NAME", help="The AWS profile to use.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask.")
@click.option("--json", "json_mode", is_flag=True, help="Print one JSON document.")
def image_delete(names: tuple[str, ...], region: str | None, profile: str | None, yes: bool, json_mode: bool) -> None:
    """Deregister gpurun images and delete their snapshots."""
    from gpurun.app.images import delete, find_for_delete

    ui = _ui(json_mode)
    aws, found = find_for_delete(list(names), region=region, profile=profile)
    if not yes and not _confirm(
        f"Delete {', '.join(f'{item.name} ({item.id})' for item in found)} and their snapshots?"
    ):
        raise BadInput("not confirmed; nothing was deleted")
    removed = delete(aws, found)
    if json_mode:
        ui.emit_json({"removed": removed})
        return
    for item in removed:
        ui.say(f"removed {item}")


@cli.command(context_settings=CONTEXT)
@click.argument("run")
@click.option("--seq", type=click.IntRange(min=1), help="Which snapshot (default: LATEST).")
@click.option("--store", "store_url", metavar="URL", help="Store to read (for runs launched elsewhere).")
@click.option("--json", "json_mode", is_flag=True, help="Print one JSON document.")
def metrics(run: str, seq: int | None, store_url: str | None, json_mode: bool) -> None:
    """The job's metrics (metrics.jsonl in the latest snapshot): last value and a sparkline each."""
    from gpurun.app.metrics import read_metrics, sparkline
    from gpurun.text import escape_controls

    ui = _ui(json_mode)
    found = read_metrics(run, store_url=store_url, seq=seq)
    if json_mode:
        ui.emit_json(found)
        return
    if found["skipped_lines"]:
        ui.warn(f"{found['skipped_lines']} line(s) of metrics.jsonl are not JSON objects; skipped")
    if not found["metrics"]:
        ui.say(f"snapshot {found['seq']} of {run}: metrics.jsonl has no numeric metrics yet")
        return
    ui.say(f"{run}, snapshot {found['seq']}: {found['records']} record(s)")
    ui.table(
        ["METRIC", "LAST", "MIN", "MAX", "TREND"],
        [
            [escape_controls(name), f"{m['last']:.6g}", f"{m['min']:.6g}", f"{m['max']:.6g}", sparkline(m["values"])]
            for name, m in found["metrics"].items()
        ],
    )


@cli.command(context_settings=CONTEXT)
@click.argument("names", nargs=-1, required=True, metavar="RUN...")
def forget(names: tuple[str, ...]) -> None:
    """Drop ended runs from this computer's list (their checkpoints and logs stay in the store)."""
    from gpurun.app.forget import forget as do_forget

    for name in do_forget(list(names)):
        click.echo(f"forgot {name}", err=True)


@cli.command(context_settings=CONTEXT)
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--template", "-t", default="pytorch", show_default=True, help="pytorch or keras.")
@click.option("--force", is_flag=True, help="Overwrite the template's files in a non-empty directory.")
def init(directory: Path, template: str, force: bool) -> None:
    """A ready experiment in DIRECTORY: train.py, experiment.yaml, requirements.txt, .gpurunignore."""
    from gpurun.app.init_project import init_project

    written = init_project(directory, template, force=force)
    for path in written:
        click.echo(f"wrote {path}", err=True)
    spec = directory / "experiment.yaml"
    click.echo(
        f"next: gpurun launch {spec} --follow   (runs here; edit provider/aws in {spec} for a rented GPU)", err=True
    )


@cli.command(context_settings=CONTEXT)
@click.argument("spec_file", metavar="[SPEC]", required=False, type=click.Path(dir_okay=True, path_type=Path))
@click.option(
    "--set", "overrides", multiple=True, metavar="FIELD=VALUE", help="Override a spec field, e.g. aws.region=us-west-2."
)
@click.option("--json", "json_mode", is_flag=True, help="Print the checks as one JSON list.")
def doctor(spec_file: Path | None, overrides: tuple[str, ...], json_mode: bool) -> None:
    """Check what a launch of SPEC needs, creating nothing; exit 0 only when all pass.

    Credentials (whose), region, AMI, instance types and GPUs, the checkpoint bucket
    (a probe object is written and deleted right after), the ssh client, your public IP;
    for provider ssh each host. Without SPEC: the ssh client and the default AWS setup.
    """
    from gpurun.app.doctor import diagnose, summary
    from gpurun.spec import load_spec

    if spec_file is None and overrides:
        raise BadInput("--set needs a SPEC to apply to")
    ui = _ui(json_mode)
    spec = load_spec(spec_file, overrides) if spec_file is not None else None
    checks = diagnose(spec)
    if json_mode:
        ui.emit_json([check.as_dict() for check in checks])
    else:
        ui.table(["CHECK", "RESULT", "DETAIL / FIX"], [[c.check, c.result.upper(), c.shown()] for c in checks])
    problem = summary(checks)
    if problem:
        raise GpurunError(problem)


def _remote_record(run: str) -> RunRecord:
    from gpurun import runs
    from gpurun.providers.capabilities import capabilities_of

    record = runs.load(run)
    if capabilities_of(record).run_dir_here:
        raise BadInput(
            f"run {run} runs on this computer; its files are in {record['machines'][0]['run_dir'] if record.get('machines') else 'GPURUN_HOME/local'}"
        )
    if record["state"] == "ended":
        raise BadInput(f"run {run} has ended; its machine is gone")
    from gpurun.app.status import with_current_machine

    return with_current_machine(record)


@cli.command(context_settings={**CONTEXT, "ignore_unknown_options": True})
@click.argument("run")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.option("--node", type=click.IntRange(min=0), default=0, help="Which node (rank).")
def ssh(run: str, command: tuple[str, ...], node: int) -> None:
    """A shell (or one command, after --) on the run's machine, with its pinned host key."""
    from gpurun.app.remote_access import ssh_argv

    argv = ssh_argv(_remote_record(run), list(command) or None, rank=node)
    os.execvp(argv[0], argv)


@cli.command(context_settings=CONTEXT)
@click.argument("run")
@click.argument("port", type=click.IntRange(1, 65535))
@click.argument("local_port", type=click.IntRange(1, 65535), required=False)
@click.option("--node", type=click.IntRange(min=0), default=0, help="Which node (rank).")
def tunnel(run: str, port: int, local_port: int | None, node: int) -> None:
    """Forward localhost:LOCAL_PORT to PORT on the run's machine (TensorBoard: 6006)."""
    from gpurun.app.remote_access import tunnel_argv

    argv = tunnel_argv(_remote_record(run), port, local_port, rank=node)
    click.echo(f"forwarding http://127.0.0.1:{local_port or port} -> {run}:{port} (Ctrl-C to stop)", err=True)
    os.execvp(argv[0], argv)


@cli.command("ssh-config", context_settings=CONTEXT)
@click.option("--install", is_flag=True, help="Add one Include line to ~/.ssh/config (asks first).")
@click.option("--yes", "-y", is_flag=True, help="Do not ask.")
def ssh_config(install: bool, yes: bool) -> None:
    """Write `Host gpurun-<run>` entries for every live remote run, so `ssh gpurun-<run>` works."""
    from gpurun import runs
    from gpurun.app.remote_access import include_line, install_ssh_config_include, ssh_config_file, write_ssh_config
    from gpurun.providers.capabilities import capabilities_of

    records, _problems = runs.load_all()
    for record in records:
        live = record["state"] != "ended" and record.get("machines") and not record.get("adopted_from")
        if not capabilities_of(record).run_dir_here and live:
            write_ssh_config(record)
    click.echo(str(ssh_config_file()))
    if install:
        if not yes and not _confirm(f"Add `{include_line()}` to the top of ~/.ssh/config?"):
            raise BadInput("not confirmed; ~/.ssh/config was not changed")
        path, changed = install_ssh_config_include()
        click.echo(f"{'added the Include line to' if changed else 'already included in'} {path}", err=True)


def _confirm(question: str) -> bool:
    if not sys.stdin.isatty():
        raise BadInput(f"{question.rstrip('?')}: not asked because input is not a terminal; pass --yes")
    return click.confirm(question, default=False, err=True)


def entry() -> None:
    """The `gpurun` command: `main`, then out of the process at once.

    On its way out Python collects every object it tracks, and botocore's service models
    are tens of thousands: 0.05 s after any command that reached AWS. Frozen, they are
    simply left to the exit (docs/benchmarks.md). Only here, not in `main`, which tests
    call in their own process.
    """
    try:
        main()
    finally:
        gc.freeze()


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; every GpurunError ends here as one line and its exit status."""
    args, debug_flag = _take_debug(list(sys.argv[1:] if argv is None else argv))
    debug = debug_flag or os.environ.get("GPURUN_DEBUG") == "1"
    if debug_flag:
        args = ["--debug", *args]  # the group's option, wherever it was given
    try:
        cli.main(args=args, prog_name="gpurun", standalone_mode=False)
    except GpurunError as error:
        if debug:
            import traceback

            traceback.print_exc()
        _print_error(str(error), error.details)
        sys.exit(error.exit_code)
    except click.exceptions.Abort:
        _print_error("interrupted")
        sys.exit(130)
    except KeyboardInterrupt:
        _print_error("interrupted")
        sys.exit(130)
    except click.UsageError as error:
        hint = f" (see `{error.ctx.command_path} --help`)" if error.ctx else ""
        _print_error(f"{error.format_message()}{hint}")
        sys.exit(2)
    except click.ClickException as error:
        _print_error(error.format_message())
        sys.exit(error.exit_code)
    except SystemExit:
        raise
    except Exception as error:
        if debug:
            raise
        _print_error(f"unexpected {type(error).__name__}: {error} (rerun with --debug for the traceback)")
        sys.exit(1)
    sys.exit(0)


# Commands whose words after the subcommand may belong to a program on the machine.
_PASS_THROUGH = ("ssh",)


def _take_debug(args: list[str]) -> tuple[list[str], bool]:
    """Remove `--debug` from anywhere before a `--` (what follows `--` is passed on untouched).

    For `gpurun ssh RUN CMD...`, CMD is the machine's: only `--debug` before `ssh` is ours.
    """
    end = args.index("--") if "--" in args else len(args)
    command = next((index for index, arg in enumerate(args[:end]) if not arg.startswith("-")), None)
    if command is not None and args[command] in _PASS_THROUGH:
        end = command
    kept = [arg for arg in args[:end] if arg != "--debug"]
    return kept + args[end:], len(kept) < end


def _print_error(message: str, details: list[str] | None = None) -> None:
    """The message's first line, then the lines an error carries (a table, a removal list), indented."""
    from gpurun.ui import printable

    first = message.strip().splitlines()[0] if message.strip() else "failed"
    click.echo(f"error: {printable(first, one_line=True)}", err=True)
    for line in details or []:
        click.echo(f"  {printable(line, one_line=True)}", err=True)


if __name__ == "__main__":
    main()
