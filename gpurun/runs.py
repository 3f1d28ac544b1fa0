"""Run records: one JSON file per run under the state directory, plus run.json in the store.

A record is a `models.RunRecord`: a plain dict with a typed schema, so that `status`
reads it without pydantic or boto3. Every record read back, from this computer or
from a store, goes through `store.documents.read` (size, depth, types) first.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import secrets
import socket
import string
import threading
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, cast

from gpurun import paths
from gpurun.errors import BadInput, GpurunError, InvalidDocument, NewerSchema, UnknownRun
from gpurun.models import SCHEMA_VERSION, CheckpointSummary, Job, Launcher, RunDocument, RunRecord, SpecDocument
from gpurun.states import JobState, RunState

# A record is a few kB; one far larger is not read whole (salvage reads its start).
MAX_RECORD_BYTES = 16 * 1024 * 1024
RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}(/rank-[0-9]+)?")
_ALPHABET = string.ascii_lowercase + string.digits


def new_run_name(spec_name: str) -> str:
    suffix = "".join(secrets.choice(_ALPHABET) for _ in range(6))
    return f"{spec_name.lower().replace('_', '-')}-{suffix}"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def this_process() -> Launcher:
    """Which process this is, to be recognised later even after its pid is reused."""
    return {"host": socket.gethostname(), "pid": os.getpid(), "started": _process_start(os.getpid())}


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot; None when it is gone (or a zombie)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rfind(")") + 2 :].split()
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    return fields[19]


def launcher_gone(record: RunRecord) -> bool:
    """A `launching` record whose launching process, on this computer, no longer runs."""
    info = record.get("launcher")
    if record.get("state") != "launching" or not isinstance(info, dict):
        return False
    pid = info.get("pid")
    if info.get("host") != socket.gethostname() or not isinstance(pid, int) or isinstance(pid, bool):
        return False  # launched elsewhere: nothing here can tell
    started = _process_start(pid)
    if started is None:
        return Path("/proc/self").exists() or not _pid_exists(pid)
    return info.get("started") not in (None, started)


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def record_path(run: str) -> Path:
    return paths.runs_dir() / f"{run}.json"


_held = threading.local()


@contextlib.contextmanager
def locked(run: str) -> Iterator[None]:
    """Serialize writers of run records across processes.

    The lock is the records' directory itself, not a lock file beside them: a
    lock file deleted while held (a clean-up of dot files) would let the next
    process create a fresh one and walk in. The directory goes only with every
    record in it. Holds are short (a read-modify-write of one record), so one
    lock for all runs costs nothing; a thread that already holds it goes on.
    """
    if getattr(_held, "depth", 0):
        _held.depth += 1
        try:
            yield
        finally:
            _held.depth -= 1
        return
    directory = paths.ensure_private(paths.runs_dir())
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        _held.depth = 1
        try:
            yield
        finally:
            _held.depth = 0
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


# A run's state only moves forward within one job; the terminal states rank alike.
# Keyed by the strings records hold (an Enum member hashes by its name, not its value).
_STATE_ORDER = {
    RunState.LAUNCHING.value: 0,
    RunState.RUNNING.value: 1,
    RunState.SUCCEEDED.value: 2,
    RunState.FAILED.value: 2,
    RunState.INTERRUPTED.value: 2,
    RunState.ENDED.value: 3,
}


def _progress(record: Any) -> tuple[bool, int, int]:
    """How far a record has come: ended beats everything, then a later job, then the state."""
    if not isinstance(record, dict):
        return (False, 0, 0)
    state = record.get("state")
    listed = record.get("jobs")
    count = len(listed) if isinstance(listed, list) else 0
    return (state == RunState.ENDED, count, _STATE_ORDER.get(state, 0) if isinstance(state, str) else 0)


def save(record: RunRecord) -> bool:
    """Write the record atomically; False (nothing written) when it would move the run back.

    A writer holding an older copy, such as `status` reading a run while `teardown`
    ends it, or while `exec` starts its next job, must not undo the newer state.
    Read-modify-write callers hold `locked(run)`.
    """
    paths.ensure_private(paths.runs_dir())
    path = record_path(record["run"])
    try:
        current = json.loads(path.read_bytes())
    except (OSError, ValueError):
        current = None
    if _progress(current) > _progress(record):
        return False
    record["version"] = SCHEMA_VERSION
    _check_writable(record)
    paths.atomic_write(path, json.dumps(record, indent=1, sort_keys=True).encode())
    return True


def copy_keys(target: RunRecord, source: RunRecord, keys: tuple[str, ...]) -> None:
    """Set `keys` of `target` to `source`'s, where `source` has them (a writer keeps its own part)."""
    into = cast(dict[str, Any], target)
    into.update((key, value) for key, value in source.items() if key in keys)


def checkpoint_summary(snapshot: dict[str, Any]) -> CheckpointSummary:
    """A snapshot (LATEST, a sync's result) as a run's `last_checkpoint`."""
    return {"seq": snapshot["seq"], "at": snapshot.get("at"), "bytes": snapshot.get("bytes")}


def shown_name(run: str) -> str:
    """A name read from outside, quoted and cut short for a message (the ui escapes what is left)."""
    return repr(run if len(run) <= 60 else run[:57] + "...")


def check_name(run: str, what: str = "run") -> str:
    """A run name as gpurun makes them; anything else is bad input, never a path."""
    if not RUN_NAME.fullmatch(run):
        shown = run if len(run) <= 60 else run[:57] + "..."
        prefix = "unknown run" if what == "run" else f"{what}: unknown run"
        raise UnknownRun(f"{prefix} {shown!r}; `gpurun status` lists runs")
    return run


def load(run: str) -> RunRecord:
    check_name(run)
    path = record_path(run)
    try:
        with open(path, "rb") as handle:
            data = _read_limited(handle)
    except FileNotFoundError:
        known = [p.stem for p in paths.runs_dir().glob("*.json")] if paths.runs_dir().exists() else []
        hint = f"; known runs: {', '.join(sorted(known)[:8])}" if known else "; `gpurun status` lists runs"
        raise UnknownRun(f"unknown run {run!r}{hint}") from None
    try:
        return _read_record(data, run, str(path))
    except NewerSchema as error:
        raise GpurunError(f"run record {path} was {error.reason}") from None
    except (InvalidDocument, _Malformed) as error:
        why = error.reason if isinstance(error, InvalidDocument) else str(error)
        raise GpurunError(
            f"run record {path} is corrupt ({why}); `gpurun teardown {run} --force` ends the run from what survives"
        ) from None


# A top-level string field as `save` writes it (indent=1: one space before a top-level key).
_TOP_LEVEL_STRING = re.compile(rb'^ "(run|provider|store|created_at|owner|state)": "((?:[^"\\\n]|\\.){0,4096})"', re.M)


def salvage(run: str) -> dict[str, str]:
    """The top-level text fields still readable in a damaged (truncated, corrupt) record of `run`."""
    check_name(run)
    try:
        data = record_path(run).read_bytes()[:MAX_RECORD_BYTES]
    except OSError:
        return {}
    found: dict[str, str] = {}
    for match in _TOP_LEVEL_STRING.finditer(data):
        key = match.group(1).decode()
        try:
            value = json.loads(b'"' + match.group(2) + b'"')
        except ValueError:
            continue
        if isinstance(value, str) and key not in found:
            found[key] = value
    return found


def set_aside(run: str) -> Path:
    """Move a damaged record out of the way (kept for a person to read); returns where it went."""
    path = record_path(run)
    aside = path.with_name(f"{path.name}.damaged-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S')}")
    os.replace(path, aside)
    return aside


def check_reachable_from_here(record: RunRecord, what: str) -> None:
    """A run adopted from a store (`teardown RUN --store`) is ended from here, never entered:
    its machines, keys and paths are what the store said, and the store may lie."""
    if record.get("adopted_from"):
        raise BadInput(
            f"run {record['run']} was launched from another computer (its record came from {record['adopted_from']}); "
            f"from here `status` and `teardown` work, not {what}"
        )


def load_from_store(run: str, store_url: str, profile: str | None = None) -> RunRecord:
    """The run.json that the computer which launched `run` keeps in its checkpoint store.

    Marked `"source": "store"`: its key and paths belong to that computer. An
    AWS `profile` given here replaces the launching computer's (its name may
    mean nothing on this one).
    """
    check_name(run)
    from gpurun.store import open_store
    from gpurun.store.snapshots import get_run_record

    try:
        options = {"profile": profile} if profile and store_url.startswith("s3://") else {}
        record = get_run_record(open_store(store_url, **options), run)
    except NewerSchema:
        raise
    except InvalidDocument as error:
        raise InvalidDocument(
            f"{error.name} is not a run record ({error.reason}); move it away to continue",
            name=error.name,
            reason=error.reason,
        ) from None
    if record is None:
        raise UnknownRun(f"unknown run {run!r}: not recorded here, and {store_url} has no {run}/run.json")
    try:
        checked = _from_store(record, run, f"{store_url}/{run}/run.json")
    except (InvalidDocument, _Malformed) as error:
        why = error.reason if isinstance(error, InvalidDocument) else str(error)
        raise GpurunError(f"{store_url}/{run}/run.json is not a run record ({why})") from None
    if profile and checked["provider"] == "aws":
        # Both places: AWS calls read the first, the checkpoint store the second.
        checked["aws"] = {**(checked.get("aws") or {}), "profile": profile}
        spec: SpecDocument = (checked.get("spec") or {}).copy()
        spec["aws"] = {**(spec.get("aws") or {}), "profile": profile}
        checked["spec"] = spec
    return checked


def load_all_from_store(store_url: str) -> tuple[list[RunRecord], list[str]]:
    """Every readable run.json in the store (marked `"source": "store"`), and a line for each unreadable one."""
    from gpurun.store import open_store
    from gpurun.store.snapshots import get_run_record

    store = open_store(store_url)
    records: list[RunRecord] = []
    problems: list[str] = []
    for run in store.list_runs():
        if not RUN_NAME.fullmatch(run):
            if store.size_of(f"{run}/run.json") is not None:
                problems.append(f"{store_url}/{shown_name(run)}/run.json: {shown_name(run)} is not a run name; skipped")
            continue
        try:
            record = get_run_record(store, run)
            if record is not None:
                records.append(_from_store(record, run, f"{store_url}/{run}/run.json"))
        except NewerSchema as error:
            problems.append(f"{error}; skipped")
        except InvalidDocument as error:
            problems.append(f"{error.name} is not a run record ({error.reason}); skipped")
        except _Malformed as error:
            problems.append(f"{store_url}/{run}/run.json is not a run record ({error}); skipped")
    return records, problems


def load_here_or_from_store(run: str, store_url: str | None, profile: str | None = None) -> RunRecord:
    """This computer's record of `run`, or else the one in `store_url` (read with `profile`)."""
    try:
        return load(run)
    except UnknownRun:
        if not store_url:
            raise
    return load_from_store(run, store_url, profile)


def update(run: str, **changes: Any) -> RunRecord:
    """Change fields of `run`'s record under the lock (the new values must fit RunRecord: save checks)."""
    with locked(run):
        record = load(run)
        cast(dict[str, Any], record).update(changes)
        save(record)
        return record


def load_all() -> tuple[list[RunRecord], list[str]]:
    """Every readable record, newest first, and a line for each unreadable one."""
    directory = paths.runs_dir()
    if not directory.exists():
        return [], []
    records: list[RunRecord] = []
    problems: list[str] = []
    for entry in os.scandir(directory):
        if not entry.name.endswith(".json") or entry.name.startswith("."):
            continue
        try:
            with open(entry.path, "rb") as handle:
                data = _read_limited(handle)
            records.append(_read_record(data, entry.name[: -len(".json")], entry.path))
        except NewerSchema as error:
            problems.append(f"run record {entry.path} was {error.reason}")
        except (InvalidDocument, _Malformed, OSError) as error:
            if isinstance(error, InvalidDocument):
                what = "corrupt or truncated" if error.reason == "not valid JSON" else f"corrupt ({error.reason})"
            else:
                what = f"corrupt ({error})" if isinstance(error, _Malformed) else "unreadable"
            problems.append(f"run record {entry.path} is {what}; move it away to clear this")
    records.sort(key=lambda r: r.get("created_at", ""), reverse=True)
    return records, problems


class _Malformed(ValueError):
    """Valid JSON, but not a run record gpurun wrote."""


def _read_limited(handle: BinaryIO) -> bytes:
    """A record file's bytes, at most one past the limit (the reader then names it too big)."""
    if os.fstat(handle.fileno()).st_size > MAX_RECORD_BYTES:
        return handle.read(MAX_RECORD_BYTES + 1)
    return handle.read()  # a buffer of the file's size, not of the limit: status reads hundreds


def _read_record(data: bytes, run: str, name: str) -> RunRecord:
    """A record file's bytes as a RunRecord of `run`; InvalidDocument or _Malformed says what is wrong."""
    from gpurun.store import documents

    record = cast(RunRecord, documents.read(data, RunRecord, name=name, limit=MAX_RECORD_BYTES))
    return _named(record, run)


def _from_store(document: RunDocument, run: str, name: str) -> RunRecord:
    """A store's run.json (already read as a RunDocument) as a RunRecord, marked `"source": "store"`."""
    from gpurun.store import documents

    record = cast(RunRecord, documents.check(dict(document), RunRecord, name=name))
    return {**_named(record, run), "source": "store"}


def _check_writable(record: RunRecord) -> None:
    """A record that `load` would refuse is never written: that would lose the run (a gpurun bug)."""
    from gpurun.store import documents

    try:
        documents.check(cast(dict[str, Any], record), RunRecord, name=f"run record of {record['run']}")
    except InvalidDocument as error:
        raise GpurunError(f"{error}; not saved (a bug in gpurun: please report it)") from None


def _named(record: RunRecord, run: str) -> RunRecord:
    if record["run"] != run:
        raise _Malformed(f"it describes run {record['run'][:60]!r}")
    return record


_JOB_KEYS = ("number", "command", "code", "setup_hash", "setup_ran", "started_at", "ended_at", "exit_code", "ended_by")


def jobs_of(record: RunRecord | RunDocument) -> list[Job]:
    """The run's jobs, oldest first. A record written before runs held jobs has its one job made up from it."""
    listed = record.get("jobs")
    if isinstance(listed, list):
        return listed
    spec: SpecDocument = record.get("spec") or {}
    terminal = record.get("state") in ("succeeded", "failed", "interrupted", "ended")
    ended_by = None
    if terminal:
        ended_by = "interrupted" if record.get("state") == "interrupted" else "exited"
        if record.get("exit_code") is None:
            ended_by = "killed" if record.get("state") != "interrupted" else "interrupted"
    return [
        {
            "number": 1,
            "command": str(spec.get("run") or ""),
            "code": None,
            "setup_hash": None,
            "setup_ran": bool(spec.get("setup")),
            "started_at": record.get("created_at"),
            "ended_at": record.get("ended_at") if terminal else None,
            "exit_code": record.get("exit_code"),
            "ended_by": ended_by,
        }
    ]


def current_job(record: RunRecord) -> Job | None:
    listed = jobs_of(record)
    return listed[-1] if listed else None


def add_job(record: RunRecord, *, command: str, code: str | None, setup_hash: str | None, setup_ran: bool) -> Job:
    """Append the next job (number, command, code hash, start) and make it the run's current one."""
    listed = jobs_of(record)
    job: Job = {
        # A reused name goes on from the jobs of the run it replaced: their logs in the store stay apart.
        "number": (listed[-1]["number"] + 1) if listed else _jobs_before(record) + 1,
        "command": command,
        "code": code,
        "setup_hash": setup_hash,
        "setup_ran": setup_ran,
        "started_at": now_iso(),
        "ended_at": None,
        "exit_code": None,
        "ended_by": None,
    }
    record["jobs"] = [*listed, job]
    record["exit_code"] = None
    return job


def end_job(
    record: RunRecord, ended_by: JobState | str, exit_code: int | None = None, ended_at: str | None = None
) -> Job | None:
    """Mark the current job ended (first ending wins: a later reading must not rewrite it)."""
    ending = JobState(ended_by)  # ValueError for a string that names no ending
    listed = jobs_of(record)
    if not listed:
        return None
    job = listed[-1]
    if job.get("ended_by") is None:
        job["ended_by"] = ending.value
        job["exit_code"] = exit_code
        job["ended_at"] = ended_at or now_iso()
    record["jobs"] = listed
    return job


def job_view(job: Job) -> dict[str, Any]:
    """The documented JSON shape of one job."""
    return {key: job.get(key) for key in _JOB_KEYS}


def _jobs_before(record: RunRecord) -> int:
    value = record.get("jobs_before")
    return value if value is not None and value > 0 else 0


def delete(run: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        record_path(run).unlink()


def archive_dir() -> Path:
    return paths.runs_dir() / "archive"


def archive(record: RunRecord) -> Path:
    """Move an ended run's record out of the list (runs/archive/<run>.<when>.json), so its name can be used again."""
    directory = paths.ensure_private(archive_dir())
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%f")
    target = directory / f"{record['run']}.{stamp}.json"
    os.replace(record_path(record["run"]), target)
    return target


def last_job_number(record: RunRecord) -> int:
    listed = jobs_of(record)
    return int(listed[-1]["number"]) if listed else _jobs_before(record)


def public_view(record: RunRecord) -> dict[str, Any]:
    """The documented JSON shape of a run (see the design's list of fields)."""
    return {
        "run": record["run"],
        "provider": record["provider"],
        "state": record["state"],
        "exit_code": record.get("exit_code"),
        "created_at": record["created_at"],
        "store": record["store"],
        "last_checkpoint": record.get("last_checkpoint"),
        "instances": [
            {
                "id": m.get("instance_id"),
                "type": m.get("instance_type"),
                "public_ip": m.get("public_ip"),
                "state": m.get("state"),
                "spot": m.get("spot", False),
            }
            for m in record.get("machines", [])
            if record["provider"] != "local"
        ],
        "cost_usd": record.get("cost_usd"),
        "job": record.get("job"),
        "checkpoint_error": record.get("checkpoint_error"),
        "checkpoint_warning": record.get("checkpoint_warning"),
        "jobs": [job_view(job) for job in jobs_of(record)],
        "gpus": _gpus_view(record),
        "restarts": restarts_view(record),
        "generations": record.get("generations"),
        "launcher_gone": bool(record.get("launcher_gone")),
    }


def _gpus_view(record: RunRecord) -> list[dict[str, Any]] | None:
    """Per node, the GPUs as status last saw them; None when no node reported any."""
    nodes: list[dict[str, Any]] = [
        {"node": machine.get("rank", 0), "gpus": gpus}
        for machine in record.get("machines", [])
        if (gpus := machine.get("gpus")) is not None
    ]
    return nodes or None


def restarts_view(record: RunRecord) -> dict[str, int] | None:
    """Restarts used of the budget; None when recovery is off."""
    budget = record.get("spec", {}).get("recovery", {}).get("max_restarts")
    if not isinstance(budget, int) or budget <= 0:
        return None
    used = record.get("restarts_used")
    return {"used": used if isinstance(used, int) else 0, "max": budget}
