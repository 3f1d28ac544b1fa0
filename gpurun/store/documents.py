"""The documents gpurun reads back from a store or a machine: their schemas, and the one reader for them.

A store and a machine are untrusted: anyone who can write the bucket can plant a
run.json, a LATEST or a manifest, and a machine writes its own agent.status.json.
Every such document goes through `read`: a size limit (checked on the bytes, before
parsing; `ObjectStore.get_bytes(limit=)` fetches no more), a nesting limit (a
100,000-deep document is refused, never a RecursionError), then its schema with
strict types (`{"seq": true}` is not snapshot 1, `"5"` is not a number). What fails
raises `InvalidDocument`, a StoreError that names the object; listings skip it with
one line and go on with the others.

The schemas are TypedDicts, checked by `_checker` below rather than by pydantic: the
checkpoint agent reads these documents on the machine, from a virtual environment
that holds gpurun and at most boto3, and `gpurun status` reads agent.status.json on
its fast path, where importing pydantic doubled its time (bench/cli_startup.py:
0.43 s to 0.85 s with 100 runs). A field a schema does not name is kept as it is,
so a newer writer can add an optional field without breaking an older reader;
readers hand back the document as it was stored. `version` is absent in documents
written before it existed (read as 1); a document of a newer schema is refused by name.
"""

from __future__ import annotations

import functools
import json
import types
import typing
from collections.abc import Callable
from typing import Annotated, Any, TypedDict, Union

from gpurun.errors import InvalidDocument, NewerSchema
from gpurun.models import SCHEMA_VERSION, Count, Minimum, RunDocument, RunRecord, Seq, Versioned

__all__ = [
    "SCHEMA_VERSION",
    "Count",
    "Minimum",
    "RunDocument",
    "RunRecord",
    "Seq",
    "Versioned",
]

#: Deeper than any document gpurun writes (a run record's spec is about 5 levels).
MAX_DEPTH = 32

KiB = 1024
MiB = 1024 * KiB
#: Byte limits per kind of document: generous for what gpurun writes, small enough to parse at once.
LATEST_LIMIT = 64 * KiB
RUN_RECORD_LIMIT = 4 * MiB
MANIFEST_LIMIT = 64 * MiB
AGENT_STATUS_LIMIT = 1 * MiB
#: Where the checkpoint agent keeps its status, in the run directory on the machine.
AGENT_STATUS_FILE = "agent.status.json"
#: One line of metrics.jsonl: an epoch's numbers, never near this.
METRICS_LINE_LIMIT = 64 * KiB
#: image_prep.py's answer line: counts, a path and a list of problems (one per file at most).
PREP_ANSWER_LIMIT = 1 * MiB


class Pointer(Versioned):
    """The least of a LATEST that names a snapshot: enough when its manifest is read next."""

    seq: Seq


class Latest(Pointer):
    """`<run>/LATEST`: which snapshot is the newest complete one, and its summary."""

    at: str
    files: Count
    bytes: Count


class _ManifestEntryOptional(TypedDict, total=False):
    sha256: str | None
    seq: Seq  # the earlier snapshot whose folder holds this unchanged file (snapshots.stored_in)


class ManifestEntry(_ManifestEntryOptional):
    """One file of a snapshot. A restore checks more (a safe relative path, a sha256): see restore.py."""

    path: str
    size: Count


class ManifestLink(TypedDict):
    """A symbolic link of the checkpoint directory whose target is inside it. A restore checks
    more (a safe path, a relative target that stays inside): see restore.checked_links."""

    path: str
    target: str


class _ManifestOptional(Versioned, total=False):
    run: str | None
    sent_bytes: Count | None
    links: list[ManifestLink]


class Manifest(_ManifestOptional):
    """`<run>/snapshots/NNNNNN.manifest.json`: every file of one snapshot; written after the files."""

    seq: Seq
    at: str
    files: list[ManifestEntry]
    bytes: Count


class AgentStatus(Versioned, total=False):
    """`agent.status.json` on the machine: what the checkpoint agent last did (gpurun.agent.loop)."""

    pid: int | None
    host: str | None
    state: str | None
    run: str | None
    store: str | None
    last_seq: Seq | None
    last_at: str | None
    last_bytes: Count | None
    last_files: Count | None
    last_sent_bytes: Count | None
    last_error: str | None
    last_error_at: str | None
    last_warning: str | None  # what snapshots leave out, such as links pointing outside the directory
    failures: Count | None
    handled_request: str | None
    interrupted: str | None
    updated_at: str | None


class MetricsRecord(TypedDict, total=False):
    """One line of `metrics.jsonl` in a snapshot: any JSON object; app.metrics keeps only its finite numbers."""


class PrepAnswer(TypedDict, total=False):
    """The last line image_prep.py prints on the machine: a stash, a restore, or an error."""

    stash: str
    moved: Count
    truncated: Count
    keys_removed: Count
    bytes: Count
    watchdog: int
    by: str
    problems: list[str]
    error: str


class Attempts(Versioned):
    """`<run>/attempts.json`: a recovering run's machines and restarts, written by the machines (gpurun.bootstrap)."""

    machines: list[dict[str, Any]]


_KINDS: dict[type, str] = {
    Pointer: "LATEST pointer",
    Latest: "LATEST pointer",
    Manifest: "snapshot manifest",
    RunDocument: "run record",
    RunRecord: "run record",
    AgentStatus: "agent status",
    MetricsRecord: "metrics record",
    PrepAnswer: "image preparation answer",
    Attempts: "restart ledger",
}


def read(data: bytes, schema: type, *, name: str, limit: int, non_finite: bool = False) -> dict[str, Any]:
    """The document in `data`, as stored, once it fits `schema` (one of the TypedDicts above).

    `name` says where it came from (`s3://bucket/prefix/run/LATEST`); every failure
    is InvalidDocument naming it, with `reason` saying what is wrong, on one line.
    `non_finite` accepts NaN and Infinity, which Python's json.dumps writes for a
    diverged loss: refusing them would drop that epoch's other metrics.
    """
    what = _KINDS.get(schema, schema.__name__)
    if len(data) > limit:
        size = f"larger than {limit // KiB} KiB"
        raise _invalid(name, size, f"is {size}; a {what} is never that big")
    deep = f"nested deeper than {MAX_DEPTH} levels"
    try:
        parsed = json.loads(data, parse_constant=None if non_finite else _no_constant)
    except RecursionError:
        raise _invalid(name, deep, f"is {deep}; not a {what}") from None
    except ValueError:  # JSONDecodeError, UnicodeDecodeError, NaN and Infinity
        raise _invalid(name, "not valid JSON", "is not valid JSON") from None
    if _depth_exceeds(parsed, MAX_DEPTH):
        raise _invalid(name, deep, f"is {deep}; not a {what}")
    if not isinstance(parsed, dict):
        kind = f"a JSON {_json_type(parsed)}"
        raise _invalid(name, kind, f"is {kind}, not a {what}")
    # The version first: a newer schema may have reshaped any field, so it is named as newer, not
    # as malformed. Only a versioned schema has one; in a metrics line it is the job's own field.
    version = parsed.get("version") if "version" in _fields(schema) else None
    if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
        reason = f"written by a newer gpurun (schema version {version}; this one reads up to {SCHEMA_VERSION}): upgrade gpurun"
        raise NewerSchema(f"{name} was {reason}", name=name, reason=reason)
    return check(parsed, schema, name=name)


def check(document: dict[str, Any], schema: type, *, name: str) -> dict[str, Any]:
    """`document`, already parsed (and read through one schema), once it also fits `schema`;
    else InvalidDocument naming it. A store's run.json is read as a RunDocument, then, to be
    shown or ended, checked as a RunRecord."""
    try:
        _checker(schema)(document)
    except _Mismatch as mismatch:
        raise _invalid(
            name, str(mismatch), f"is not a valid {_KINDS.get(schema, schema.__name__)} ({mismatch})"
        ) from None
    return document


class _Mismatch(Exception):
    """Where a document leaves its schema: `field.path: what was expected`.

    Raised with what was expected; each enclosing object or array adds its key on the way out,
    so a document that fits (the usual case) builds no path at all."""

    def __init__(self, expected: str) -> None:
        super().__init__(expected)
        self.expected = expected
        self.path: list[str] = []  # innermost key first

    def __str__(self) -> str:
        keys = [key if len(key) <= 40 else key[:37] + "..." for key in reversed(self.path)]
        return f"{'.'.join(keys) or 'document'}: {self.expected}"


Checker = Callable[[Any], None]


@functools.cache
def _checker(hint: Any) -> Checker:
    """A function that checks a value against `hint`, built once per type: status checks every
    record it lists, and walking the typing machinery for each value cost ten times the reading."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return _anything
    if origin is Annotated:
        base, *extras = typing.get_args(hint)
        inner = _checker(base)
        least = max((extra.value for extra in extras if isinstance(extra, Minimum)), default=None)
        if least is None:
            return inner

        def at_least(value: Any) -> None:
            inner(value)
            if value is not None and value < least:
                raise _Mismatch(f"should be {least} or more")

        return at_least
    if origin in (Union, types.UnionType):
        options = typing.get_args(hint)
        nullable = type(None) in options
        checkers = [_checker(option) for option in options if option is not type(None)]

        def one_of(value: Any) -> None:
            if value is None and nullable:
                return
            first = None
            for check in checkers:
                try:
                    check(value)
                    return
                except _Mismatch as mismatch:
                    first = first or mismatch
            assert first is not None
            raise first

        return one_of
    if typing.is_typeddict(hint):
        required = sorted(hint.__required_keys__)
        fields = [(key, _checker(field_hint)) for key, field_hint in _fields(hint).items()]

        def an_object(value: Any) -> None:
            if not isinstance(value, dict):
                raise _Mismatch("should be a JSON object")
            for key in required:
                if key not in value:
                    mismatch = _Mismatch("missing")
                    mismatch.path.append(key)
                    raise mismatch
            for key, check in fields:
                if key in value:
                    try:
                        check(value[key])
                    except _Mismatch as mismatch:
                        mismatch.path.append(key)
                        raise

        return an_object
    if origin is list:
        (item,) = typing.get_args(hint)
        check_item = _checker(item)

        def an_array(value: Any) -> None:
            if not isinstance(value, list):
                raise _Mismatch("should be a JSON array")
            for index, element in enumerate(value):
                try:
                    check_item(element)
                except _Mismatch as mismatch:
                    mismatch.path.append(str(index))
                    raise

        return an_array
    if origin is dict:
        _key, item = typing.get_args(hint)
        check_value = _checker(item)

        def a_mapping(value: Any) -> None:
            if not isinstance(value, dict):
                raise _Mismatch("should be a JSON object")
            if check_value is _anything:
                return
            for key, element in value.items():
                try:
                    check_value(element)
                except _Mismatch as mismatch:
                    mismatch.path.append(key)
                    raise

        return a_mapping
    if hint is int:
        return _whole_number
    if hint is bool:
        return _true_or_false
    if hint is float:
        return _number
    if hint is str:
        return _string
    raise TypeError(f"documents: no check for {hint!r}")  # a schema above uses a type _checker lacks


def _anything(value: Any) -> None:
    return


def _whole_number(value: Any) -> None:
    # bool is an int to Python, never to a document
    if not isinstance(value, int) or isinstance(value, bool):
        raise _Mismatch("should be a whole number")


def _true_or_false(value: Any) -> None:
    if not isinstance(value, bool):
        raise _Mismatch("should be true or false")


def _number(value: Any) -> None:
    # JSON has one kind of number: 2 is as good a price as 2.0 (never true, never NaN from a store)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise _Mismatch("should be a number")


def _string(value: Any) -> None:
    if not isinstance(value, str):
        raise _Mismatch("should be a string")


@functools.cache
def _fields(schema: type) -> dict[str, Any]:
    return typing.get_type_hints(schema, include_extras=True)


def _invalid(name: str, reason: str, says: str) -> InvalidDocument:
    return InvalidDocument(f"{name} {says}", name=name, reason=reason)


def _no_constant(token: str) -> Any:
    raise ValueError(f"{token} is not a JSON number")


def _depth_exceeds(value: Any, limit: int) -> bool:
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def _json_type(value: Any) -> str:
    if isinstance(value, list):
        return "array"
    if isinstance(value, str):
        return "string"
    if isinstance(value, bool):
        return "boolean"
    if value is None:
        return "null"
    return "number"
