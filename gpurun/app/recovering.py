"""Launch of a recovering AWS run: stage what machines bootstrap from, then wait for the first job.

The machines of such a run belong to an Auto Scaling group and set
themselves up from the store (`gpurun.bootstrap`), so launch uploads the code
and gpurun itself to `<store>/<run>/`, renders job.sh for them, and then
waits until the first machine reports its job started in
`<store>/<run>/attempts.json`. Nothing here connects to a machine.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
import time
from pathlib import Path
from typing import Any, cast

from gpurun import bootstrap, jobs
from gpurun.app import common, job_secrets
from gpurun.app.reporter import Reporter
from gpurun.errors import BadInput, GpurunError, InvalidDocument
from gpurun.models import Generation, Machine, ResumeSource, RunRecord
from gpurun.providers.aws.connect import DEFAULT_USER
from gpurun.providers.capabilities import capabilities
from gpurun.spec import Spec
from gpurun.states import JobState
from gpurun.store.base import ObjectStore
from gpurun.sync.ignore import WalkedFile

#: How long launch waits for the first machine's job to start (boot, fetch, restore, setup).
FIRST_JOB_TIMEOUT = 1800.0


def applies(spec: Spec) -> bool:
    return capabilities(spec.provider).replaces_lost_machines and (spec.recovery.max_restarts or 0) > 0


def check(spec: Spec) -> None:
    """What a recovering AWS run cannot do yet: refused before anything exists (exit 2)."""
    local = sorted(set(spec.secrets) - set(job_secrets.machine_references(spec.secrets)))
    if local:
        raise BadInput(
            f"secrets.{local[0]}: a value from this computer's environment cannot reach a machine that replaces "
            "a reclaimed one; with recovery on AWS use ssm:/parameter/path or secretsmanager:name, "
            "or recovery: {max_restarts: 0}"
        )


def code_archive(root: Path, files: list[WalkedFile]) -> tuple[str, bytes]:
    """(sha256, gzip'd tar) of the synced files; the same tree gives the same bytes."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for item in sorted(files, key=lambda f: f.path):
            archive.add(str(root / item.path), arcname=item.path, recursive=False)
    compressed = io.BytesIO()
    with gzip.GzipFile(fileobj=compressed, mode="wb", mtime=0) as handle:
        handle.write(raw.getvalue())
    data = compressed.getvalue()
    return hashlib.sha256(data).hexdigest(), data


def stage(
    spec: Spec,
    record: RunRecord,
    store: ObjectStore,
    files: list[WalkedFile],
    source: ResumeSource | None,
    ui: Reporter,
    *,
    setup_skipped: str | None = None,
) -> None:
    """Upload code and agent under `<store>/<run>/`; put the machines' settings in record["bootstrap"].

    With `setup_skipped` (the group's image was baked with this setup) no machine runs setup.
    """
    from gpurun.app.agent_install import agent_bundle

    run = record["run"]
    tag, bundle = agent_bundle()
    store.put_bytes(f"{run}/agent/{tag}.tar.gz", bundle)
    digest, archive = code_archive(spec.workdir_path, files)
    store.put_bytes(f"{run}/code/{digest}.tar.gz", archive)
    store.put_bytes(f"{run}/CODE", digest.encode())
    ui.say(f"staged code ({len(archive)} bytes, {digest[:12]}) and gpurun {tag} in {record['store']}/{run}")
    mark = bootstrap.RUN_DIR_MARK
    machine: Machine = {"rank": 0, "run_dir": mark}
    env = common.job_environment(record, machine, None)
    env["GPURUN_MASTER_ADDR"] = env["GPURUN_NODE_IPS"] = "127.0.0.1"
    work = common.work_dir(machine)
    record["bootstrap"] = {
        "run": run,
        "store": record["store"],
        "user": spec.ssh.user or DEFAULT_USER,
        "max_restarts": spec.recovery.max_restarts or 0,
        "on_failure": spec.recovery.on_failure,
        "agent_tag": tag,
        "code": digest,
        "checkpoint_dir": spec.checkpoint.dir,
        "every": spec.checkpoint.every,
        "keep": spec.checkpoint.keep,
        "spot": spec.aws.spot,
        # Seconds the machine stays after the job ends before it scales its group to 0; None: until teardown.
        "idle_timeout": spec.aws.idle_timeout,
        "resume_from": source,
        # References only: each machine reads the values itself, through the run's role.
        "secrets": job_secrets.machine_references(spec.secrets),
        "job_script": jobs.job_script(mark, work, env, None if setup_skipped else spec.setup, spec.run),
        "job_script_no_setup": jobs.job_script(mark, work, env, None, spec.run),
    }


def read_attempts(store: ObjectStore, run: str) -> dict[str, Any] | None:
    """attempts.json through its schema; None when absent or unreadable (a machine writes it: untrusted)."""
    from gpurun.store import documents

    key = f"{run}/{bootstrap.ATTEMPTS}"
    data = store.get_bytes(key, limit=bootstrap.MAX_DOCUMENT_BYTES)
    if data is None:
        return None
    try:
        document = documents.read(data, documents.Attempts, name=key, limit=bootstrap.MAX_DOCUMENT_BYTES)
    except InvalidDocument:
        return None
    if document.get("version") != bootstrap.ATTEMPTS_VERSION:
        return None
    return document


def wait_for_first_job(
    store: ObjectStore, run: str, ui: Reporter, *, timeout: float = FIRST_JOB_TIMEOUT, poll: float = 1.0
) -> dict[str, Any]:
    """attempts.json once the first machine has started the job; raises if the run ended before."""
    deadline = time.monotonic() + timeout
    with ui.spinner("waiting for the group's first machine to bootstrap and start the job") as update:
        while True:
            document = read_attempts(store, run)
            if document is not None:
                machines = [m for m in document["machines"] if isinstance(m, dict)]
                if any(m.get("job_started_at") for m in machines):
                    return document
                if document.get("state") != "running":
                    raise GpurunError(f"the run ended ({state_text(document)}) before its first job started")
                if machines:
                    update(f"machine {machines[-1].get('instance_id')} is bootstrapping")
            if time.monotonic() >= deadline:
                raise GpurunError(f"no machine of the group started the job within {timeout:.0f}s")
            time.sleep(poll)


# -- status: what any computer can read back ------------------------------------------------------

#: The states a machine writes into attempts.json.
RUN_STATES = ("running", "succeeded", "failed", "budget_spent")


def state_text(document: dict[str, Any]) -> str:
    """attempts.json's `state` for a message: a known one as is, anything else escaped and cut short."""
    from gpurun.text import escape_controls

    state = document.get("state")
    return state if state in RUN_STATES else escape_controls(str(state))[:40]


#: What a replacement machine takes over from the one it replaces: how to reach it and where the run lives.
_CARRIED_TO_A_REPLACEMENT = frozenset(
    ("rank", "port", "user", "key_path", "proxy_jump", "known_hosts", "trust_on_first_use", "run_dir", "spot")
    + ("instance_type", "price_per_hour")  # unless the group chose another type or zone (below)
)
_GENERATION_TEXT = ("instance_id", "type", "zone", "started_at", "ended_at", "why", "job_started_at")


def generations(document: dict[str, Any]) -> list[Generation]:
    """The machines of attempts.json, each field checked (the store is untrusted input)."""
    from gpurun.text import escape_controls

    found = []
    for index, entry in enumerate(document.get("machines", [])[:1000]):
        if not isinstance(entry, dict):
            continue
        fields: dict[str, Any] = {"generation": index + 1}
        for key in _GENERATION_TEXT:
            value = entry.get(key)
            fields[key] = escape_controls(str(value))[:100] if isinstance(value, str) else None
        for key in ("restarts", "exit_code"):
            value = entry.get(key)
            fields[key] = value if isinstance(value, int) and not isinstance(value, bool) else None
        found.append(cast(Generation, fields))
    return found


def apply_attempts(record: RunRecord, document: dict[str, Any]) -> None:
    """Generations, restarts used and the run's outcome from attempts.json; point the record at the
    group's current machine (so `ssh`, `logs` and the cost follow it)."""
    from gpurun import runs

    listed = generations(document)
    record["generations"] = listed
    used = document.get("restarts_used")
    if isinstance(used, int) and not isinstance(used, bool) and used >= 0:
        record["restarts_used"] = used
    state = document.get("state")
    if (
        record.get("state") == "launching"
        and record.get("keep_waiting")
        and any(item.get("job_started_at") for item in listed)
    ):
        # Launched with --keep-waiting: the group found capacity after the launch had returned.
        record["state"] = "running"
    if state == "running" and record.get("source") == "store" and record.get("state") in ("failed", "interrupted"):
        # run.json said how one machine's job ended; the group has restarted it since.
        record["state"], record["exit_code"] = "running", None
    if record.get("state") == "running" and state in ("succeeded", "failed", "budget_spent"):
        last: Generation = listed[-1] if listed else {}
        code = 0 if state == "succeeded" else last.get("exit_code")
        record["state"] = "succeeded" if state == "succeeded" else "failed"
        record["exit_code"] = code
        runs.end_job(record, JobState.EXITED, code, last.get("ended_at"))
        if state == "budget_spent":
            record["job"] = {"phase": None, "alive": False, "note": "restart budget spent"}
    # The newest generation is the group's machine now, or the last one it had: a machine whose job has
    # ended stays for idle_timeout, and ssh, logs and checkpoint-sync must reach that one.
    current = listed[-1] if listed else None
    machines = record.get("machines") or []
    reported_dir = _reported_run_dir(document, current, str(record.get("run")))
    if current and machines and current.get("instance_id") and machines[0].get("instance_id") != current["instance_id"]:
        previous = machines[0].copy()
        previous.setdefault("ended_at", runs.now_iso())
        record.setdefault("past_machines", []).append(previous)
        # Another machine: how to reach it carries over; its address, keys, state and what status
        # saw on it are its own, learned when AWS or SSH shows them.
        replacement = cast(Machine, {key: value for key, value in previous.items() if key in _CARRIED_TO_A_REPLACEMENT})
        replacement.update(
            {
                "instance_id": current["instance_id"],
                "zone": current.get("zone"),
                "generation": current["generation"],
                "state": "pending",
                "host": None,
                "public_ip": None,
                "private_ip": None,
                "host_keys": None,
            }
        )
        instance_type = current.get("type") or previous.get("instance_type")
        if instance_type:
            replacement["instance_type"] = instance_type
        if instance_type != previous.get("instance_type") or current.get("zone") != previous.get("zone"):
            # The first machine's price (a spot price in its zone) is not this one's: cost-so-far uses the
            # type's own price.
            replacement.pop("price_per_hour", None)
        launched = current.get("started_at")
        if launched:
            replacement["launch_time"] = launched
        else:
            replacement.pop("launch_time", None)
        machines[0] = replacement
    if reported_dir and machines and current and machines[0].get("instance_id") == current.get("instance_id"):
        machines[0]["run_dir"] = reported_dir


def _reported_run_dir(document: dict[str, Any], current: Generation | None, run: str) -> str | None:
    """The run directory the current machine reported in attempts.json, when it has the expected shape
    (an absolute path ending in gpurun/<run>, the characters job.sh allows): a machine wrote it."""
    if current is None:
        return None
    entries = document.get("machines", [])
    raw = entries[current["generation"] - 1] if len(entries) >= current["generation"] else None
    value = raw.get("run_dir") if isinstance(raw, dict) else None
    if not isinstance(value, str) or len(value) > 1024 or not bootstrap.RUN_DIR_SAFE.fullmatch(value):
        return None
    if ".." in value.split("/") or not value.endswith(f"/gpurun/{run}"):
        return None
    return value


def reconcile_from_store(record: RunRecord, problems: list[str]) -> bool:
    """A recovering AWS run's state from its store; False when attempts.json cannot be read."""
    from gpurun.app import common

    try:
        document = read_attempts(common.open_run_store(record), str(record["run"]))
    except GpurunError as error:
        problems.append(f"{record['run']}: cannot read attempts.json in {record.get('store')}: {error}")
        return False
    if document is None:
        return False
    apply_attempts(record, document)
    return True
