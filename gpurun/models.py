"""The run record and its parts, as typed schemas: `RunRecord`, `Job`, `Machine` and what they hold.

A run record is JSON on disk (`GPURUN_HOME/runs/<run>.json`) and in the store
(`<store>/<run>/run.json`); in between it is a plain dict. These TypedDicts give
that dict its keys and types, so that `mypy --strict` checks every access, and
`gpurun.store.documents.read` checks a record read back against the same schema
(strict types, a size and a depth limit) before anything uses it. They are
TypedDicts rather than pydantic models, as the store documents are (see
store/documents.py for why: the agent's environment has no pydantic, and
`status` reads up to hundreds of records on its fast path). A key a schema does
not name is kept as read, so an older gpurun keeps what a newer one added.

Only typing here: every layer (providers included) may import it. The keys every
record has live in total TypedDict bases (`_RunRequired`), not `typing.Required`,
and annotations are not postponed: the reader takes required keys from
`__required_keys__` at run time, on the machines' Python 3.10 too.
"""

from typing import Annotated, Any, TypedDict

#: The schema version this gpurun writes into each document (run records, run.json, LATEST,
#: manifests, agent status, attempts.json) and the newest it reads. Absent means 1.
SCHEMA_VERSION = 1


class Minimum:
    """`Annotated[int, Minimum(1)]`: the smallest number accepted."""

    def __init__(self, value: int) -> None:
        self.value = value


Count = Annotated[int, Minimum(0)]
Seq = Annotated[int, Minimum(1)]


class Versioned(TypedDict, total=False):
    version: Seq


class Gpu(TypedDict, total=False):
    """One GPU as nvidia-smi last reported it (gpurun.gpu.parse)."""

    index: int
    util_pct: int
    memory_used_mib: int
    memory_total_mib: int


class Machine(TypedDict, total=False):
    """One machine (node) of a run: how to reach it, where the run lives on it, what it is.

    A provider fills in what it knows (`providers.*.acquire`); `status` adds what it sees.
    """

    rank: Annotated[int, Minimum(0)]
    host: str | None
    alias: str
    label: str
    port: Annotated[int, Minimum(1)]
    user: str
    key_path: str | None
    proxy_jump: str | None
    known_hosts: str | None
    host_keys: list[str] | None
    trust_on_first_use: bool
    run_dir: str
    private_ip: str | None
    public_ip: str | None
    instance_id: str
    instance_type: str
    zone: str | None
    spot: bool
    state: str | None
    launch_time: str
    price_per_hour: float | None
    cost_usd: float | None
    generation: int | None
    ended_at: str | None
    agent_pid: int | None
    job_pid: int | None
    # GPUs as status last read them; the names the ssh provider's first look found, until then
    gpus: list[Gpu] | list[str] | None
    agent_alive: bool | None
    job_alive: bool | None
    unreachable: str | None
    seen_at: str | None
    cleaned: bool  # teardown stopped its job and agent (and removed its files unless files_kept)
    files_kept: bool


class _JobNumber(TypedDict):
    number: Annotated[int, Minimum(1)]


class Job(_JobNumber, total=False):
    """One job of a run (launch starts the first, each `exec` the next); `ended_by` is a JobState value."""

    command: str
    code: str | None
    setup_hash: str | None
    setup_ran: bool
    started_at: str | None
    ended_at: str | None
    exit_code: int | None
    ended_by: str | None
    files_sent: int | None
    bytes_sent: int | None


class JobPhase(TypedDict, total=False):
    """What `status` last saw of the current job on the machine (`phase`: setup or run)."""

    phase: str | None
    alive: bool
    note: str


class CheckpointSummary(TypedDict, total=False):
    """The newest snapshot as a run shows it (`last_checkpoint` in --json)."""

    seq: Seq
    at: str | None
    bytes: Count | None


class CheckpointError(TypedDict, total=False):
    """The checkpoint agent's last failure, while its uploads fail."""

    error: str | None
    at: str | None
    failures: int | None


class Generation(TypedDict, total=False):
    """One machine of a recovering run's Auto Scaling group, from attempts.json (app.recovering.generations)."""

    generation: int
    instance_id: str
    type: str | None
    zone: str | None
    started_at: str | None
    ended_at: str | None
    why: str | None
    job_started_at: str | None
    restarts: int | None
    exit_code: int | None


class Launcher(TypedDict, total=False):
    """The process that is launching the run (runs.this_process)."""

    host: str
    pid: int
    started: str | None


class ResumeSource(TypedDict, total=False):
    """The snapshot a run started from (`--resume RUN`, or `resume: auto`)."""

    run: str
    seq: Seq
    store: str
    bytes: Count | None


class AwsLocation(TypedDict, total=False):
    """Where an AWS run's resources are: what teardown and status use before the spec's defaults."""

    region: str | None
    profile: str | None
    account: str | None
    owner: str | None
    nodes: int | None


class Replaced(TypedDict, total=False):
    """The ended run whose name this one took over."""

    created_at: str | None
    ended_at: str | None


class SpecDocument(TypedDict, total=False):
    """The experiment spec as a record keeps it (spec.Spec.to_record): its sections stay plain
    dicts, validated where the spec is loaded (gpurun.spec), not again on every read."""

    name: str
    provider: str
    workdir: str
    run: str
    setup: str | None
    env: dict[str, str]
    secrets: dict[str, str]
    sync: dict[str, Any]
    checkpoint: dict[str, Any]
    aws: dict[str, Any]
    ssh: dict[str, Any]
    recovery: dict[str, Any]


class _RunFields(Versioned, total=False):
    owner: str | None
    spec: SpecDocument
    machines: list[Machine]
    past_machines: list[Machine]
    resources: dict[str, Any]
    exit_code: int | None
    ended_at: str | None
    resumed_from: ResumeSource | None
    last_checkpoint: CheckpointSummary | None
    cost_usd: float | None
    job: JobPhase | None
    jobs: list[Job] | None
    jobs_before: int | None
    replaces: Replaced | None
    launcher: Launcher | None
    launcher_gone: bool
    agent_alive: bool | None
    keep_waiting: bool | None
    setup_skipped: str | None
    job_env: dict[str, str] | None
    bootstrap: dict[str, Any] | None
    generations: list[Generation] | None
    restarts_used: int | None
    checkpoint_error: CheckpointError | None
    checkpoint_warning: str | None
    refresh_error: str | None
    recovered: str | None  # "partial": rebuilt by `teardown --force` from what survived
    aws: AwsLocation | None
    image: dict[str, Any] | None
    venv: str | None
    python: str | None
    # Set on a record read from a store rather than from this computer's runs directory.
    source: str
    adopted_from: str | None


class _RunName(TypedDict):
    run: str


class RunDocument(_RunName, _RunFields, total=False):
    """`<run>/run.json` in a store, as read back: only its name is needed to count it (resume,
    names taken); what shows or ends a run checks it as a RunRecord (runs._from_store)."""

    provider: str
    state: str
    created_at: str
    store: str


class _RunRequired(TypedDict):
    run: str
    provider: str
    state: str
    created_at: str
    store: str


class RunRecord(_RunRequired, _RunFields, total=False):
    """A run as gpurun keeps it: this computer's record, or a store's run.json with all of these.

    Keys are optional (total=False) but for the five every record has had since the first gpurun."""
