"""The agent's loop: when to take a snapshot, and how failures are made loud.

Triggers: every `every` seconds; a request file written by
`gpurun checkpoint-sync RUN`; the job exiting; SIGTERM; and the spot
interruption notice. The first three of the last kind end the loop after a
final snapshot. Every outcome lands in `agent.status.json`, which `status`
reads; a failing upload is retried with backoff and never silently dropped.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpurun import gpu, paths
from gpurun.agent.logship import SHIP_EVERY, LogShipper
from gpurun.agent.staging import HeldFileChanged, Stager
from gpurun.errors import GpurunError, InvalidDocument
from gpurun.models import CheckpointSummary
from gpurun.store import documents, open_store
from gpurun.store import snapshots as snaps
from gpurun.store.base import ObjectStore

REQUEST_FILE = "sync.request"
STATUS_FILE = documents.AGENT_STATUS_FILE
SPOT_POLL_SECONDS = 5.0
TICK = 0.2
# A launch starts the agent a moment before the job; if the job never appears
# (the launching CLI was killed in between), the agent must not live forever.
JOB_START_GRACE = 120.0


@dataclass
class AgentOptions:
    watch: Path
    store_url: str
    run: str
    every: float
    keep: int
    run_dir: Path | None = None
    spot_notice: bool = False
    once: bool = False
    store_options: dict[str, Any] | None = None
    # Which job's output to ship to <store>/<run>/logs/job-NNNN/ (None: no shipping).
    job: int | None = None
    logs_every: float = SHIP_EVERY


def log(message: str) -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    print(f"{stamp} {message}", flush=True)


class Agent:
    def __init__(self, options: AgentOptions) -> None:
        self.options = options
        self.store: ObjectStore = open_store(options.store_url, **(options.store_options or {}))
        run_dir = options.run_dir or options.watch.parent
        self.run_dir = run_dir
        self.stager = Stager(options.watch, run_dir / ".gpurun-staging")
        self.logs = (
            LogShipper(self.store, options.run, run_dir, options.job)
            if options.job is not None and options.run_dir is not None
            else None
        )
        self.previous: dict[str, Any] | None = None
        self.stop_reason: str | None = None
        self.failures = 0
        self.status: dict[str, Any] = {
            "version": documents.SCHEMA_VERSION,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "state": "running",
            "run": options.run,
            "store": options.store_url,
            "last_seq": None,
            "last_at": None,
            "last_bytes": None,
            "last_files": None,
            "last_sent_bytes": None,
            "last_error": None,
            "last_error_at": None,
            "last_warning": None,
            "failures": 0,
            "handled_request": None,
            "interrupted": None,
        }

    # -- status -----------------------------------------------------------
    def write_status(self, **changes: Any) -> None:
        self.status.update(changes, updated_at=snaps.now_iso())
        path = self.run_dir / STATUS_FILE
        try:
            paths.atomic_write(path, json.dumps(self.status).encode(), 0o644)
        except GpurunError as error:
            log(f"cannot write {path}: {error}")

    # -- snapshots --------------------------------------------------------
    def load_previous(self) -> None:
        try:
            pointer = snaps.latest(self.store, self.options.run)
        except snaps.InvalidLatest as error:
            # Left as it is, every snapshot would be a full upload and `keep` would never prune.
            pointer = snaps.repair_latest(self.store, self.options.run)
            repaired = f"LATEST now points at snapshot {pointer['seq']}" if pointer else "no complete snapshot yet"
            log(f"{error}; repaired from the manifests: {repaired}")
        if pointer:
            try:
                self.previous = snaps.read_manifest(self.store, self.options.run, pointer["seq"])
            except InvalidDocument as error:
                log(f"{error}; the next snapshot sends every file")
                self.previous = None
            if self.previous:
                self.stager.remember(self.previous)
                self.write_status(
                    last_seq=pointer["seq"],
                    last_at=pointer["at"],
                    last_bytes=pointer["bytes"],
                    last_files=pointer["files"],
                )

    def sync_once(self, reason: str) -> dict[str, Any] | None:
        """Take one snapshot if anything changed. Returns the snapshot summary or None."""
        try:
            try:
                return self._snapshot(reason)
            except HeldFileChanged as error:
                # Those files are copied to staging from now on: retry at once, no backoff.
                log(f"{reason}: {error}")
                return self._snapshot(reason)
        except (GpurunError, OSError) as error:
            self._failed(reason, str(error))
        except Exception as error:  # boto3 and friends: keep the agent alive, make it loud
            self._failed(reason, f"{type(error).__name__}: {error}")
        return None

    def _snapshot(self, reason: str) -> dict[str, Any] | None:
        staged, changed = self.stager.stage()
        self._report_outside_links()
        if not staged:
            log(f"{reason}: no checkpoint files in {self.options.watch} yet")
            self.write_status(last_error=None, failures=0)
            self.failures = 0
            return None
        if not changed and self.previous is not None:
            log(f"{reason}: nothing changed since snapshot {self.previous['seq']}")
            self.failures = 0
            self.write_status(last_error=None, failures=0)
            return snaps.summary(self.previous)
        started = time.monotonic()
        try:
            info = snaps.write_snapshot(
                self.store,
                self.options.run,
                staged,
                previous=self.previous,
                writer=self.status["host"],
                before_commit=self.stager.verify,
                links=self.stager.links,
            )
        except HeldFileChanged:
            raise
        except Exception:
            # A file rewritten in place at another size fails the upload or its
            # size check before `before_commit` runs: name it, so it is copied.
            self.stager.verify()
            raise
        self.previous = info.pop("manifest")
        self.stager.committed(self.previous)
        pruned = snaps.prune(self.store, self.options.run, self.options.keep)
        log(
            f"{reason}: snapshot {info['seq']} {info['files']} files {info['bytes']} bytes"
            f" (sent {info['sent_bytes']}) in {time.monotonic() - started:.2f}s"
            + (f"; pruned {', '.join(map(str, pruned))}" if pruned else "")
        )
        self.failures = 0
        self.write_status(
            last_seq=info["seq"],
            last_at=info["at"],
            last_bytes=info["bytes"],
            last_files=info["files"],
            last_sent_bytes=info["sent_bytes"],
            last_error=None,
            failures=0,
        )
        return info

    def _report_outside_links(self) -> None:
        outside = self.stager.outside_links
        warning = None
        if outside:
            more = f" and {len(outside) - 3} more" if len(outside) > 3 else ""
            warning = (
                f"links pointing outside {self.options.watch} are not in snapshots: {', '.join(outside[:3])}{more}"
            )
        if warning != self.status.get("last_warning"):
            if warning:
                log(warning)
            self.write_status(last_warning=warning)

    def _failed(self, reason: str, message: str) -> None:
        message = self.stager.real_names(message)  # an upload that fails names the staging link it read
        self.stager.discard()  # the links would keep old checkpoint versions on disk until the retry
        self.failures += 1
        line = message.splitlines()[0] if message else "unknown error"
        log(f"{reason}: snapshot FAILED (attempt {self.failures}): {line}")
        self.write_status(last_error=line, last_error_at=snaps.now_iso(), failures=self.failures)

    def backoff(self) -> float:
        return min(self.options.every, 5.0 * 2.0 ** min(self.failures - 1, 10))

    # -- triggers ---------------------------------------------------------
    def pending_request(self) -> str | None:
        try:
            nonce = (self.run_dir / REQUEST_FILE).read_text().strip()
        except OSError:
            return None
        if nonce and nonce != self.status["handled_request"]:
            return nonce
        return None

    def job_ended(self) -> bool:
        if self.options.run_dir is None:
            return False
        if (self.run_dir / "job.exit").exists():
            return True
        try:
            pid = int((self.run_dir / "job.pid").read_text().strip())
        except (OSError, ValueError):
            return False
        try:
            with open(f"/proc/{pid}/status") as handle:
                return any(line.startswith("State:") and line.split()[1] == "Z" for line in handle)
        except OSError:
            return not _pid_exists(pid)

    def job_never_started(self, waited: float) -> bool:
        return self.options.run_dir is not None and waited > JOB_START_GRACE and not (self.run_dir / "job.pid").exists()

    def record_job_end(self) -> None:
        """Write the job's outcome into run.json in the store, for other computers."""
        try:
            exit_text = (self.run_dir / "job.exit").read_text().strip()
            exit_code = int(exit_text) if exit_text.lstrip("-").isdigit() else None
        except OSError:
            exit_code = None
        try:
            record = snaps.get_run_record(self.store, self.options.run)
            if record is None or record.get("state") == "ended":
                return
            interrupted = self.status.get("interrupted")
            record["state"] = "interrupted" if interrupted else ("succeeded" if exit_code == 0 else "failed")
            record["exit_code"] = exit_code
            record["last_checkpoint"] = self.last_checkpoint()
            snaps.put_run_record(self.store, self.options.run, record)
        except Exception as error:  # the record is a convenience; the snapshot is what matters
            log(f"could not update run.json in the store: {error}")

    def last_checkpoint(self) -> CheckpointSummary | None:
        if self.status["last_seq"] is None:
            return None
        return {"seq": self.status["last_seq"], "at": self.status["last_at"], "bytes": self.status["last_bytes"]}

    def final_sync(self, reason: str, attempts: int = 6) -> None:
        for _attempt in range(attempts):
            self.sync_once(reason)
            if self.failures == 0:
                return
            time.sleep(min(self.backoff(), 10.0))

    def ship_logs(self, reason: str) -> None:
        """Put the job's new output into the store; a failure is logged and tried again next time."""
        if self.logs is None:
            return
        try:
            self.logs.ship()
        except Exception as error:  # the snapshot is what must not be held up
            log(f"{reason}: shipping the job's output failed: {str(error).splitlines()[0] if str(error) else error}")

    def sample_gpus(self) -> None:
        """Keep <run_dir>/gpu.csv current for `status` (nothing where nvidia-smi is missing)."""
        if self.options.run_dir is None:
            return
        text = gpu.sample()
        if text is None:
            return
        path = self.run_dir / gpu.FILE
        try:
            paths.atomic_write(path, text.encode(), 0o644)
        except GpurunError as error:
            log(f"cannot write {path}: {error}")

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self._on_term)
        signal.signal(signal.SIGINT, self._on_term)
        log(f"agent for {self.options.run}: watching {self.options.watch}, store {self.options.store_url}")
        self.write_status()
        try:
            self.load_previous()
        except Exception as error:
            self._failed("start", f"cannot read the store: {error}")
        if self.options.once:
            self.final_sync("once")
            self.ship_logs("once")
            self.write_status(state="stopped")
            return 0 if self.failures == 0 else 1
        started = time.monotonic()
        next_due = started + self.options.every
        next_spot = started
        next_ship = started + self.options.logs_every
        next_gpu = started
        spot_failures = 0
        while True:
            now = time.monotonic()
            if self.stop_reason:
                self.final_sync(self.stop_reason)
                self.ship_logs(self.stop_reason)
                break
            nonce = self.pending_request()
            if nonce:
                self.sync_once("requested")
                self.write_status(handled_request=nonce)
                next_due = time.monotonic() + (self.options.every if self.failures == 0 else self.backoff())
                continue
            if self.job_ended():
                self.ship_logs("job exited")
                self.final_sync("job exited")
                self.ship_logs("job exited")
                self.record_job_end()
                break
            if self.job_never_started(now - started):
                log(f"no job started in {self.run_dir} within {JOB_START_GRACE:.0f}s; stopping")
                break
            if self.options.spot_notice and now >= next_spot and self.status["interrupted"] is None:
                next_spot = now + SPOT_POLL_SECONDS
                notice, spot_failures = self._poll_spot(spot_failures)
                if notice is not None:
                    log(f"spot interruption notice: {notice}")
                    self.write_status(interrupted=notice)
                    (self.run_dir / "interrupted").write_text(json.dumps(notice))
                    self.ship_logs("spot notice")
                    self.final_sync("spot notice")
                    self.ship_logs("spot notice")
                    next_due = time.monotonic() + self.options.every
                    continue
            if now >= next_gpu:
                self.sample_gpus()
                next_gpu = time.monotonic() + gpu.SAMPLE_EVERY
            if now >= next_ship:
                self.ship_logs("scheduled")
                next_ship = time.monotonic() + self.options.logs_every
            if now >= next_due:
                self.sync_once("scheduled")
                next_due = time.monotonic() + (self.options.every if self.failures == 0 else self.backoff())
                continue
            time.sleep(TICK)
        self.write_status(state="stopped")
        log("agent stopped")
        return 0 if self.failures == 0 else 1

    def _poll_spot(self, failures: int) -> tuple[dict[str, Any] | None, int]:
        from gpurun.agent import imds

        notice = imds.spot_notice()
        if imds.unreachable():
            failures += 1
            if failures == 1:
                log("spot notice: the metadata service is not answering; still polling every 5 s")
        else:
            failures = 0
        return notice, failures

    def _on_term(self, signum: int, _frame: object) -> None:
        self.stop_reason = "SIGTERM" if signum == signal.SIGTERM else "SIGINT"


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def run_agent(options: AgentOptions) -> int:
    return Agent(options).run()
