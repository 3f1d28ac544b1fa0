"""`gpurun metrics RUN`: the training metrics the job wrote, from `metrics.jsonl` in the latest snapshot.

The templates append one JSON object per epoch to `metrics.jsonl` in the
checkpoint directory, so every snapshot carries the history so far. The file
comes from the store and is untrusted: its size is capped, its sha256 must
match the manifest, lines that are not JSON objects are skipped, only numbers
count, and metric names are limited in number and length.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

from gpurun.app.checkpoints import record_and_store
from gpurun.errors import BadInput, InvalidDocument, StoreError
from gpurun.store import documents
from gpurun.store import snapshots as snaps

METRICS_FILE = "metrics.jsonl"
MAX_BYTES = 16 * 1024 * 1024
MAX_METRICS = 50
MAX_NAME = 40
KEPT_VALUES = 500
# Fields that say when, not how well.
NOT_METRICS = {"time", "seconds", "epoch", "step", "timestamp"}
_BARS = "▁▂▃▄▅▆▇█"


def read_metrics(run: str, *, store_url: str | None = None, seq: int | None = None) -> dict[str, Any]:
    """{"run", "seq", "records", "metrics": {name: {"last", "min", "max", "count", "values"}}, "skipped_lines"}."""
    _record, store = record_and_store(run, store_url)
    manifest = snaps.resolve_seq(store, run, seq)
    manifest_seq = manifest["seq"] if isinstance(manifest.get("seq"), int) else 0
    entry = next((e for e in manifest.get("files", []) if isinstance(e, dict) and e.get("path") == METRICS_FILE), None)
    if entry is None:
        raise BadInput(
            f"run {run}: snapshot {manifest_seq} has no {METRICS_FILE} "
            "(the templates' train.py writes one into the checkpoint directory, one JSON object per epoch)"
        )
    size = entry.get("size")
    if not isinstance(size, int) or size > MAX_BYTES:
        raise StoreError(f"run {run}: {METRICS_FILE} in snapshot {manifest_seq} is over {MAX_BYTES} bytes; not read")
    key = snaps.object_key(run, snaps.stored_in(entry, manifest_seq), METRICS_FILE)
    data = store.get_bytes(key)
    if data is None or hashlib.sha256(data).hexdigest() != entry.get("sha256"):
        raise StoreError(f"{store.url}/{key} is missing or does not match its manifest's sha256")
    return {"run": run, "seq": manifest_seq, **parse_metrics(data, name=f"{store.url}/{key}")}


def parse_metrics(data: bytes, *, name: str = METRICS_FILE) -> dict[str, Any]:
    """Each line through the store-document reader; a line that is not a metrics record is counted and skipped."""
    series: dict[str, list[float]] = {}
    records = skipped = 0
    for number, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            item = documents.read(
                line,
                documents.MetricsRecord,
                name=f"{name} line {number}",
                limit=documents.METRICS_LINE_LIMIT,
                non_finite=True,
            )
        except InvalidDocument:
            skipped += 1
            continue
        records += 1
        for name, value in item.items():
            if name in NOT_METRICS or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if not math.isfinite(value) or len(name) > MAX_NAME:
                continue
            if name not in series and len(series) >= MAX_METRICS:
                continue
            series.setdefault(name, []).append(float(value))
    metrics = {
        name: {
            "last": values[-1],
            "min": min(values),
            "max": max(values),
            "count": len(values),
            "values": values[-KEPT_VALUES:],
        }
        for name, values in series.items()
    }
    return {"records": records, "metrics": metrics, "skipped_lines": skipped}


def sparkline(values: list[float], width: int = 40) -> str:
    """The last `width` values as bars from lowest to highest."""
    shown = values[-width:]
    if not shown:
        return ""
    low, high = min(shown), max(shown)
    if high == low:
        return _BARS[3] * len(shown)
    return "".join(_BARS[min(7, int((v - low) / (high - low) * 7 + 0.5))] for v in shown)
