"""`gpurun logs`: the job's output, followed until the job ends, across dropped connections."""

from __future__ import annotations

import shlex
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gpurun import jobs, runs
from gpurun.app import common, connections
from gpurun.errors import BadInput, GpurunError, TransportError, UnknownRun
from gpurun.models import Generation, Job, Machine, RunDocument, RunRecord
from gpurun.providers.capabilities import capabilities_of
from gpurun.states import MACHINE_GONE, MACHINE_NOT_RUNNING
from gpurun.text import escape_controls, escape_log

q = shlex.quote


def _follow_command(run_dir: str, offset: int | None, tail: int | None, follow: bool) -> str:
    log = q(f"{run_dir}/job.log")
    pid = q(f"{run_dir}/job.pid")
    if offset is None:
        # Start `tail` lines back (or at 0) and report the byte offset first, so a
        # reconnect can continue exactly where the stream stopped.
        start = (
            f"s=$(stat -c %s {log} 2>/dev/null || echo 0); t=$(tail -n {int(tail)} {log} 2>/dev/null | wc -c); o=$((s - t))"
            if tail is not None
            else "o=0"
        )
    else:
        start = f"o={int(offset)}"
    exit_file = q(f"{run_dir}/job.exit")
    if follow:
        # The exit status is read in the same command, right after the job ends:
        # teardown may remove the run directory a moment later.
        reader = (
            f'tail -s 0.2 -c +$((o + 1)) -f --pid="$p" {log} 2>/dev/null; '
            f"printf '\\000@@gpurun-exit %s\\n' \"$(cat {exit_file} 2>/dev/null || {{ [ -d {q(run_dir)} ] || echo gone; }})\""
        )
    else:
        reader = f"tail -c +$((o + 1)) {log} 2>/dev/null"
    return f'{start}; echo "@@gpurun-offset $o"; p=$(cat {pid} 2>/dev/null || echo 1); {reader}'


def show_logs(
    run: str,
    *,
    follow: bool,
    tail: int | None,
    node: int | None,
    write: Callable[[bytes], None] | None = None,
    job: int | None = None,
    store_url: str | None = None,
) -> dict[str, Any]:
    """One node's output; with several nodes and no `node`, all of them merged with a rank prefix.

    From the machine while the run lives; from the store (`<run>/logs/`) once it
    has ended, or always with `store_url`. What is shown has its control
    characters escaped: it comes from a machine or a store.
    """
    write = _escaping(write or _stdout)
    if store_url is not None:
        runs.check_name(run)
        try:
            record: RunRecord | None = runs.load(run)
        except BadInput:
            record = None
        return _from_store(run, record, store_url, job=job, node=node, tail=tail, follow=follow, write=write)
    try:
        record = runs.load(run)
    except UnknownRun as error:
        raise UnknownRun(
            f"{error}; for a run launched elsewhere or rolled back: `gpurun logs RUN --store URL`"
        ) from None
    if record.get("bootstrap") and record.get("store"):
        # A recovering AWS run: its machines come and go, each ships its output as job N (its generation).
        return _from_store(run, record, record["store"], job=job, node=node, tail=tail, follow=follow, write=write)
    machines = record.get("machines", [])
    if not machines:
        raise BadInput(f"run {run} has no machine (it never started); nothing to show")
    if record.get("state") == "ended" or _all_machines_gone(record):
        from gpurun.store.logs import stored_jobs

        try:
            in_store = stored_jobs(_store_of(record, record["store"], node), _store_run(run, node))
        except GpurunError:
            in_store = []
        if in_store:
            return _from_store(run, record, record["store"], job=job, node=node, tail=tail, follow=follow, write=write)
        _check_logs_outlived_teardown(record)
    current = runs.current_job(record)
    if job is not None and (current is None or job != current["number"]):
        return _earlier_job(record, job, current, node=node, follow=follow, tail=tail, write=write)
    if node is None and len(machines) > 1:
        return _merged(run, record, machines, follow=follow, tail=tail, write=write)
    return _show_node(run, record, node or 0, follow=follow, tail=tail, write=write)


def _all_machines_gone(record: RunRecord) -> bool:
    machines = record.get("machines") or []
    return bool(machines) and all(m.get("state") in MACHINE_GONE for m in machines)


def _store_run(run: str, node: int | None) -> str:
    """Where a node's output is in the store (the same place as its snapshots)."""
    return common.rank_run_name(run, node)


def _store_of(record: RunRecord | None, store_url: str, node: int | None) -> Any:
    from gpurun.store import open_store

    options = common.store_options(record) if record is not None and record.get("store") == store_url else {}
    return open_store(store_url, **options)


def _from_store(
    run: str,
    record: RunRecord | None,
    store_url: str,
    *,
    job: int | None,
    node: int | None,
    tail: int | None,
    follow: bool,
    write: Callable[[bytes], None],
) -> dict[str, Any]:
    """A job's output as the agent shipped it to the store; following, how the job ended as recorded."""
    from gpurun.store.logs import read_job_log, stored_jobs

    store = _store_of(record, store_url, node)
    where = _store_run(run, node)
    if follow and (record is None or record.get("bootstrap")):
        from gpurun.app import recovering

        attempts = recovering.read_attempts(store, run)
        if attempts is None and record is not None:
            # Still waiting for the group's first machine (launch --keep-waiting): wait for it too.
            attempts = {"state": "running", "machines": []}
        if attempts is not None:
            # A recovering run: follow its machines one after the other, as the group replaces them.
            return _follow_recovering(run, record, store, where, attempts, job=job, tail=tail, write=write)
    numbers = stored_jobs(store, where)
    if not numbers:
        raise BadInput(f"{store_url} has no output of {where} (nothing under {where}/logs/)")
    number = job if job is not None else numbers[-1]
    if number not in numbers:
        listed = ", ".join(str(n) for n in numbers)
        raise BadInput(f"--job {number}: {store_url} has the output of job(s) {listed} of {where}")
    data, problems = read_job_log(store, where, number)
    if tail is not None:
        lines = data.splitlines(keepends=True)
        data = b"".join(lines[-tail:]) if tail else b""
    write(data)
    if data and not data.endswith(b"\n"):
        write(b"\n")
    for problem in problems:
        print(f"[gpurun] {escape_controls(problem)}", file=sys.stderr, flush=True)
    outcome: dict[str, Any] = {"run": run, "from_store": True}
    if follow:
        outcome.update(_recorded_outcome(record, store, run, number))
    return outcome


def _recorded_outcome(record: RunRecord | RunDocument | None, store: Any, run: str, number: int) -> dict[str, Any]:
    """How job `number` ended, from this computer's record, else the store's run.json."""
    if record is None:
        from gpurun.store.snapshots import get_run_record

        try:
            record = get_run_record(store, run)
        except (ValueError, GpurunError):
            record = None
        if not isinstance(record, dict):
            return {"exit_code": None, "unknown": True}
    listed = runs.jobs_of(record) if isinstance(record.get("jobs", []), list) else []
    job = next((j for j in listed if j.get("number") == number), None)
    ended_by = job.get("ended_by") if job else None
    code = job.get("exit_code") if job else None
    if ended_by is None and listed and job is listed[-1]:
        # The agent records the last job's end in the store's run.json as the run's state.
        state = record.get("state")
        if state in ("succeeded", "failed", "interrupted"):
            ended_by = "interrupted" if state == "interrupted" else "exited"
            code = record.get("exit_code")
    if not isinstance(code, int):
        code = None
    return {
        "exit_code": code,
        "interrupted": ended_by == "interrupted",
        "lost": ended_by == "machine_lost",
        "unknown": ended_by is None,
    }


#: How often `logs -f` of a recovering run reads its store (each machine's agent ships every 5 s).
RECOVERING_POLL_SECONDS = 2.0
#: How often it also reads run.json, which a teardown (from any computer) marks ended.
RUN_RECORD_POLL_SECONDS = 10.0
#: attempts.json still `running` this long after the max_runtime guard: the guard ended the group.
GUARD_SLACK_SECONDS = 300.0


def _follow_recovering(
    run: str,
    record: RunRecord | None,
    store: Any,
    where: str,
    attempts: dict[str, Any],
    *,
    job: int | None,
    tail: int | None,
    write: Callable[[bytes], None],
    poll: float = RECOVERING_POLL_SECONDS,
) -> dict[str, Any]:
    """Follow a recovering run's output in the store, machine after machine, until the run ends.

    Machine N's output is job N. When a later machine has started the job, what
    is left of the current one's is shown and a line says which machine took
    over; the follow ends when attempts.json says the run ended (or a teardown
    marked run.json ended, or the max_runtime guard has passed).
    """
    from gpurun.app import recovering
    from gpurun.store.logs import read_job_log_from, stored_jobs

    listed = recovering.generations(attempts)
    started = [item["generation"] for item in listed if item.get("job_started_at")]
    stored = stored_jobs(store, where)
    if job is not None and job not in stored and not 1 <= job <= len(listed):
        raise BadInput(f"--job {job}: run {run} has had {len(listed)} machine(s); machine N's output is job N")
    current = job if job is not None else max(started + stored, default=1)
    offset, first, at_line_start = 0, True, True
    said: set[str] = set()
    guard_at = _guard_deadline(record, store, run)
    next_record_check = 0.0
    while True:
        # attempts.json before the output: once it says the run ended, the output read next is complete.
        attempts = recovering.read_attempts(store, run) or attempts
        listed = recovering.generations(attempts)
        data, offset, problems = read_job_log_from(store, where, current, offset)
        if first and tail is not None:
            data = b"".join(data.splitlines(keepends=True)[-tail:]) if tail else b""
        first = False
        if data:
            write(data)
            at_line_start = data.endswith(b"\n")
        for problem in problems:
            if problem not in said:
                said.add(problem)
                print(f"[gpurun] {escape_controls(problem)}", file=sys.stderr, flush=True)
        successor = next((g for g in listed if g["generation"] > current and g.get("job_started_at")), None)
        if successor is not None:
            write((b"" if at_line_start else b"\n") + _took_over_line(attempts, successor).encode())
            current, offset, at_line_start = successor["generation"], 0, True
            continue
        if attempts.get("state") != "running":
            if not at_line_start:
                write(b"\n")
            return {"run": run, "from_store": True, **_recovering_outcome(attempts, listed)}
        if time.monotonic() >= next_record_check:
            next_record_check = time.monotonic() + RUN_RECORD_POLL_SECONDS
            if _torn_down(run, record, store):
                return {"run": run, "from_store": True, "exit_code": None, "gone": True}
            if guard_at is not None and time.time() > guard_at + GUARD_SLACK_SECONDS:
                return {"run": run, "from_store": True, "exit_code": None, "lost": True, "note": "max_runtime passed"}
        time.sleep(poll)


def _took_over_line(attempts: dict[str, Any], successor: Generation) -> str:
    """`--- machine 2 (i-..., g5.xlarge, us-east-1b) took over: resumed from LATEST ---` (fields escaped)."""
    number = successor["generation"]
    raw = attempts.get("machines", [])[number - 1]
    resumed = isinstance(raw, dict) and raw.get("resumed") is True
    names = ", ".join(str(successor[key]) for key in ("instance_id", "type", "zone") if successor.get(key))
    how = "resumed from LATEST" if resumed else "started the job from the beginning (no snapshot to resume)"
    return f"--- machine {number} ({names}) took over: {how} ---\n"


def _recovering_outcome(attempts: dict[str, Any], listed: list[Generation]) -> dict[str, Any]:
    """How a recovering run ended, from attempts.json (its last machine says why)."""
    state = attempts.get("state")
    used, most = attempts.get("restarts_used"), attempts.get("max_restarts")
    counted = all(isinstance(value, int) and not isinstance(value, bool) for value in (used, most))
    restarts = f"{used} of {most} restarts used" if counted else None
    final = listed[-1] if listed else {}
    if state == "succeeded":
        return {"exit_code": 0, "note": restarts if counted and used else None}
    budget = f"no restart left: {restarts}" if state == "budget_spent" and restarts else None
    if not final.get("job_started_at"):
        from gpurun.app.recovering import state_text

        return {"exit_code": None, "failed_to_start": final.get("why") or f"the run ended ({state_text(attempts)})"}
    why, code = final.get("why"), final.get("exit_code")
    if why == "spot interruption":
        return {"exit_code": code, "interrupted": True, "note": budget}
    if code is None and why in (None, "replaced"):
        # The machine went (reclaimed without a notice) and nothing took its place.
        return {"exit_code": None, "lost": True, "note": budget}
    return {"exit_code": code, "note": budget}


def _torn_down(run: str, record: RunRecord | None, store: Any) -> bool:
    """Teardown marks the record here, and run.json in the store for every other computer, ended."""
    if record is not None:
        try:
            if runs.load(run).get("state") == "ended":
                return True
        except GpurunError:
            pass
    from gpurun.store.snapshots import get_run_record

    try:
        stored = get_run_record(store, run)
    except GpurunError:
        return False
    return isinstance(stored, dict) and stored.get("state") == "ended"


def _guard_deadline(record: RunRecord | RunDocument | None, store: Any, run: str) -> float | None:
    """When the group's max_runtime guard ends it at the latest (epoch seconds): created_at + max_runtime."""
    from datetime import datetime

    if record is None:
        from gpurun.store.snapshots import get_run_record

        try:
            record = get_run_record(store, run)
        except GpurunError:
            record = None
    if not isinstance(record, dict):
        return None
    spec = record.get("spec")
    aws = spec.get("aws") if isinstance(spec, dict) else None
    limit = aws.get("max_runtime") if isinstance(aws, dict) else None
    created = record.get("created_at")
    if not isinstance(limit, (int, float)) or isinstance(limit, bool) or not isinstance(created, str):
        return None
    try:
        return datetime.fromisoformat(created).timestamp() + float(limit)
    except ValueError:
        return None


def _escaping(write: Callable[[bytes], None]) -> Callable[[bytes], None]:
    """`write`, fed UTF-8 text with control characters escaped (bytes split mid-character are held back)."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")("replace")

    def escaped(chunk: bytes) -> None:
        text = decoder.decode(chunk)
        if text:
            write(escape_log(text).encode())

    return escaped


def _earlier_job(
    record: RunRecord,
    job: int,
    current: Job | None,
    *,
    node: int | None,
    follow: bool,
    tail: int | None,
    write: Callable[[bytes], None],
) -> dict[str, Any]:
    """A job before the current one: its output was set aside under jobs/ on each node when the next started."""
    from gpurun.app.execute import job_log_name

    run = record["run"]
    last = current["number"] if current else 0
    if not 1 <= job <= last:
        raise BadInput(f"--job {job}: run {run} has jobs 1..{last}" if last else f"--job {job}: run {run} has no job")
    if follow:
        raise BadInput(f"--job {job} has ended; -f follows the current job ({last})")
    machines = record["machines"]
    ranks = [node or 0] if node is not None or len(machines) == 1 else list(range(len(machines)))
    if ranks[0] >= len(machines):
        raise BadInput(f"--node {ranks[0]}: run {run} has nodes 0..{len(machines) - 1}")
    conns = connections.Connections()
    path = job_log_name(job)
    for rank in ranks:
        machine = machines[rank]
        reader = f"tail -n {int(tail)}" if tail is not None else "cat"
        with conns.connect(record, machine) as transport:
            result = transport.run(f"cd {q(machine['run_dir'])} && {reader} {q(path)}", timeout=120)
        if not result.ok:
            raise GpurunError(f"job {job}'s output is not on node {rank} ({path} is missing)")
        data = result.stdout
        if len(ranks) > 1:
            data = b"".join(b"[node %d] %s\n" % (rank, line) for line in data.splitlines())
        write(data)
    return {"run": run}


def _check_logs_outlived_teardown(record: RunRecord) -> None:
    """An ended run's logs exist only where teardown kept its run directory."""
    run, machines = record["run"], record["machines"]
    if capabilities_of(record).machines_disposable:
        raise BadInput(f"run {run} has ended and its machines are terminated; the job's output went with them")
    if capabilities_of(record).run_dir_here:
        kept = any(Path(machine["run_dir"]).is_dir() for machine in machines)
    else:
        # Records from before teardown noted this say nothing: try the machine.
        kept = any(machine.get("files_kept", True) for machine in machines)
    if not kept:
        raise BadInput(f"run {run} has ended; its logs were removed at teardown (`teardown --keep-files` keeps them)")


def _merged(
    run: str,
    record: RunRecord,
    machines: list[Machine],
    *,
    follow: bool,
    tail: int | None,
    write: Callable[[bytes], None],
) -> dict[str, Any]:
    lock = threading.Lock()
    outcomes: dict[int, dict[str, Any]] = {}
    failures: list[BaseException] = []

    def one(rank: int) -> None:
        pending = bytearray()

        def prefixed(chunk: bytes) -> None:
            pending.extend(chunk)
            *lines, rest = bytes(pending).split(b"\n")
            pending[:] = rest
            if lines:
                with lock:
                    write(b"".join(b"[node %d] %s\n" % (rank, line) for line in lines))

        try:
            outcomes[rank] = _show_node(run, record, rank, follow=follow, tail=tail, write=prefixed)
        except BaseException as error:  # reported after the other nodes finish
            failures.append(error)
        if pending:
            with lock:
                write(b"[node %d] %s\n" % (rank, bytes(pending)))

    threads = [threading.Thread(target=one, args=(rank,), daemon=True) for rank in range(len(machines))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]
    first = outcomes.get(0, {"run": run})
    failed = [o for o in outcomes.values() if o.get("exit_code") not in (0, None)]
    return failed[0] if failed else first


def _show_node(
    run: str,
    record: RunRecord,
    rank: int,
    *,
    follow: bool,
    tail: int | None,
    write: Callable[[bytes], None] | None,
) -> dict[str, Any]:
    machines = record["machines"]
    if rank >= len(machines):
        raise BadInput(f"--node {rank}: run {run} has nodes 0..{len(machines) - 1}")
    machine = machines[rank]
    conns = connections.Connections()
    write = write or _stdout
    offset: int | None = None
    failures = 0
    while True:
        reader = _OffsetReader(write)
        try:
            with conns.connect(record, machine) as transport:
                transport.stream(_follow_command(machine["run_dir"], offset, tail, follow), reader.feed)
                if reader.offset is not None:
                    offset = reader.offset + reader.received
                if not follow:
                    return {"run": run}
                if reader.ended:
                    job = jobs.read_state(transport, machine["run_dir"])
                    code = reader.exit_code if reader.exit_code is not None else job["exit_code"]
                    return {"run": run, "exit_code": code, "interrupted": job["interrupted"], "gone": reader.gone}
        except TransportError as error:
            if reader.offset is not None:
                offset = reader.offset + reader.received
            failures += 1
            if _machine_gone(record, machine):
                return {"run": run, "exit_code": None, "interrupted": False, "gone": False, "lost": True}
            if failures > 30:
                raise GpurunError(
                    f"lost the connection to {run} and could not reconnect: {error}", exit_code=MACHINE_LOST
                ) from None
            print(
                f"[gpurun] connection lost ({escape_controls(str(error))}); reconnecting...",
                file=sys.stderr,
                flush=True,
            )
            time.sleep(min(2.0 * failures, 10.0))


def _machine_gone(record: RunRecord, machine: Machine) -> bool:
    """A cloud machine that the provider reports ended (a spot reclaim, a guard) will not answer again."""
    if not capabilities_of(record).machines_disposable:
        return False
    from gpurun.providers import get_provider

    try:
        get_provider(record["provider"]).refresh([record])
    except GpurunError:
        return False
    return machine.get("state") in MACHINE_NOT_RUNNING


# `--follow` exit statuses besides the job's own (documented in the README and docs/json.md).
JOB_INTERRUPTED = 4  # a spot interruption notice came while the job ran
MACHINE_LOST = 5  # the machine went away (terminated, torn down) before the job recorded an exit status
JOB_KILLED = 137  # the job ended without recording an exit status, as a shell reports SIGKILL


def follow_outcome(outcome: dict[str, Any]) -> tuple[int, str]:
    """The exit status `--follow` ends with, and the line that says why."""
    code, message = _follow_status(outcome)
    note = outcome.get("note")
    return code, f"{message} ({note})" if note else message


def _follow_status(outcome: dict[str, Any]) -> tuple[int, str]:
    code = outcome.get("exit_code")
    if outcome.get("failed_to_start"):
        return 1, f"the run ended before its job started: {outcome['failed_to_start']}"
    if outcome.get("lost"):
        return MACHINE_LOST, "the job's machine is gone (terminated) before the job recorded an exit status"
    if outcome.get("gone"):
        return MACHINE_LOST, "the run was torn down while following"
    if outcome.get("interrupted"):
        return JOB_INTERRUPTED, "the job was interrupted (spot reclaim)"
    if code is None and outcome.get("unknown"):
        return 1, "how the job ended is not recorded"
    if code is None:
        return JOB_KILLED, "the job ended without recording an exit status (killed)"
    if code == 0:
        return 0, "the job exited with status 0"
    return (code if 0 < code < 256 else 1), f"the job exited with status {code}"


_END_MARK = b"\x00@@gpurun-exit "


class _OffsetReader:
    """Strips the offset header the remote command prints first and counts what follows."""

    def __init__(self, write: Callable[[bytes], None]) -> None:
        self.write = write
        self.header = bytearray()
        self.offset: int | None = None
        self.received = 0
        self.ended = False
        self.gone = False
        self.exit_code: int | None = None
        self.trailer = bytearray()

    def feed(self, chunk: bytes) -> None:
        if self.offset is None:
            self.header.extend(chunk)
            if b"\n" not in self.header:
                return
            line, _, chunk = bytes(self.header).partition(b"\n")
            self.offset = int(line.split()[-1]) if line.startswith(b"@@gpurun-offset") else 0
        if self.trailer or _END_MARK[:1] in chunk:
            before, mark, after = chunk.partition(_END_MARK[:1])
            self._write(before)
            self.trailer.extend(mark + after)
            if self.trailer.startswith(_END_MARK) and self.trailer.endswith(b"\n"):
                value = self.trailer[len(_END_MARK) :].strip()
                self.ended = True
                self.exit_code = int(value) if value.lstrip(b"-").isdigit() else None
                self.gone = value == b"gone"
            elif not _END_MARK.startswith(bytes(self.trailer[: len(_END_MARK)])):
                # A NUL that is part of the log itself.
                data, self.trailer = bytes(self.trailer), bytearray()
                self._write(data)
            return
        self._write(chunk)

    def _write(self, chunk: bytes) -> None:
        if chunk:
            self.received += len(chunk)
            self.write(chunk)


def _stdout(chunk: bytes) -> None:
    sys.stdout.buffer.write(chunk)
    sys.stdout.buffer.flush()
