"""The job's output into the store, so it outlives the machine.

`<store>/<run>/logs/job-0003/000012.log`: job 3's output (setup's included) in
ordered chunks of CHUNK_BYTES, since an object store has no append. Chunk k
holds bytes [k * CHUNK_BYTES, (k + 1) * CHUNK_BYTES) of job.log: the last one
is put again, longer, each time the log grew, so a job's log is a few objects,
not one per interval. What was shipped is remembered in `logs.shipped.json`
in the run directory, so an agent that starts again (or `--once`) goes on
from there; a put repeated after a crash writes the same bytes again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from gpurun import paths
from gpurun.store.base import ObjectStore
from gpurun.store.logs import CHUNK_BYTES, chunk_key

LOG_FILE = "job.log"
STATE_FILE = "logs.shipped.json"
SHIP_EVERY = 5.0


class LogShipper:
    def __init__(self, store: ObjectStore, run: str, run_dir: Path, job: int) -> None:
        self.store = store
        self.run = run
        self.job = job
        self.log = run_dir / LOG_FILE
        self.state_path = run_dir / STATE_FILE
        self.offset = 0
        self.index = 0
        try:
            state = json.loads(self.state_path.read_text())
            if state.get("job") == job and state.get("run") == run:
                self.offset, self.index = int(state["offset"]), int(state["next"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            pass

    def ship(self) -> int:
        """Put what job.log gained since the last call; returns the bytes shipped."""
        shipped = 0
        try:
            handle = open(self.log, "rb")
        except FileNotFoundError:
            return 0
        with handle:
            size = os.fstat(handle.fileno()).st_size
            while size > self.offset:
                start = self.index * CHUNK_BYTES
                handle.seek(start)
                data = handle.read(CHUNK_BYTES)
                self.store.put_bytes(chunk_key(self.run, self.job, self.index), data)
                shipped += start + len(data) - self.offset
                self.offset = start + len(data)
                if len(data) == CHUNK_BYTES:
                    self.index += 1
                self._remember()
                if len(data) < CHUNK_BYTES:
                    break
        return shipped

    def _remember(self) -> None:
        state = {"run": self.run, "job": self.job, "offset": self.offset, "next": self.index}
        paths.atomic_write(self.state_path, json.dumps(state).encode(), 0o644)
