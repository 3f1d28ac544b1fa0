"""Documents read back from a store or a machine: validated, size- and depth-limited, never a crash.

The crash cases come from trying it: a run.json with `machines: ["x"]` or
`job: "running"`, a LATEST of `[1, 2]` or `{"seq": true}`, a 100,000-deep
run.json. Through the real CLI each is one warning line naming the object while
the other runs still list; a hypothesis property feeds random JSON to every
reader and accepts only success or gpurun's own error.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpurun import image_prep, jobs, paths, runs
from gpurun.app import images
from gpurun.app.metrics import parse_metrics
from gpurun.errors import GpurunError, InvalidDocument
from gpurun.store import documents, open_store
from gpurun.store import snapshots as snaps
from gpurun.store.snapshots import StagedFile
from gpurun.transport.local import LocalTransport
from tests.helpers import gpurun, wait_until

DEEP = ('{"a":' * 100_000 + "1" + "}" * 100_000).encode()


def record(run: str, store_url: str, **changes: Any) -> dict[str, Any]:
    """A run.json as a launching computer writes it for a local run."""
    return {
        "run": run,
        "provider": "local",
        "state": "running",
        "created_at": "2026-11-26T10:00:00+00:00",
        "store": store_url,
        "machines": [],
        "spec": {"name": run.rsplit("-", 1)[0], "checkpoint": {"dir": "ckpt", "every": 60, "keep": 2}},
        **changes,
    }


def snapshot(store_url: str, run: str, tmp_path: Path) -> dict[str, Any]:
    weights = tmp_path / f"{run}.bin"
    weights.write_bytes(b"weights")
    staged = StagedFile("model.bin", weights.stat().st_size, None, str(weights))
    return snaps.write_snapshot(open_store(store_url), run, [staged], previous=None)


@pytest.fixture
def store_url(tmp_path: Path) -> str:
    return f"file://{tmp_path / 'store'}"


def plant(store_url: str, key: str, data: bytes) -> None:
    open_store(store_url).put_bytes(key, data)


# -- the crash cases, through the CLI -------------------------------------------------------------


BAD_RUN_JSON = {
    "machines-abc123": json.dumps(record("machines-abc123", "file:///x", machines=["x"])).encode(),
    "job-abc123": json.dumps(record("job-abc123", "file:///x", job="running")).encode(),
    "deep-abc123": DEEP,
    "seq-abc123": json.dumps(record("seq-abc123", "file:///x", exit_code=True)).encode(),
}


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_status_skips_each_malformed_run_json_with_one_line_and_lists_the_others(
    store_url: str, json_flag: list[str]
) -> None:
    snaps.put_run_record(open_store(store_url), "good-abc123", record("good-abc123", store_url))
    for run, data in BAD_RUN_JSON.items():
        plant(store_url, f"{run}/run.json", data)
    shown = gpurun("status", "--store", store_url, *json_flag, check=False)
    assert shown.returncode == 0, shown.stderr
    assert "Traceback" not in shown.stderr and "unexpected" not in shown.stderr
    lines = shown.stderr.strip().splitlines()
    for run in BAD_RUN_JSON:
        mine = [line for line in lines if f"{store_url}/{run}/run.json" in line]
        assert len(mine) == 1 and mine[0].startswith("warning: ") and mine[0].endswith("; skipped"), lines
    assert any(
        "machines-abc123/run.json is not a run record (machines.0: should be a JSON object)" in line for line in lines
    )
    assert any("job: should be a JSON object" in line for line in lines)
    assert any("deep-abc123/run.json is not a run record (nested deeper than 32 levels)" in line for line in lines)
    if json_flag:
        assert [r["run"] for r in json.loads(shown.stdout)] == ["good-abc123"]
    else:
        assert "good-abc123" in shown.stdout and "machines-abc123" not in shown.stdout


@pytest.mark.parametrize(
    "latest",
    [b"[1,2]", b'{"seq": true, "at": "2026-11-26T10:00:00+00:00", "files": 1, "bytes": 7}', DEEP],
    ids=["array", "seq-true", "deep"],
)
def test_a_malformed_latest_is_named_and_the_run_still_lists(store_url: str, tmp_path: Path, latest: bytes) -> None:
    snaps.put_run_record(open_store(store_url), "good-abc123", record("good-abc123", store_url))
    snaps.put_run_record(open_store(store_url), "other-abc123", record("other-abc123", store_url))
    snapshot(store_url, "other-abc123", tmp_path)
    plant(store_url, "good-abc123/LATEST", latest)
    shown = gpurun("status", "--store", store_url, "--json", check=False)
    assert shown.returncode == 0, shown.stderr
    listed = {r["run"]: r for r in json.loads(shown.stdout)}
    assert set(listed) == {"good-abc123", "other-abc123"}
    assert listed["good-abc123"]["last_checkpoint"] is None  # never `{"seq": true}` read as snapshot 1
    assert listed["other-abc123"]["last_checkpoint"]["seq"] == 1
    warned = [line for line in shown.stderr.splitlines() if "good-abc123/LATEST" in line]
    assert len(warned) == 1 and warned[0].startswith("warning: "), shown.stderr


def test_checkpoint_list_skips_a_malformed_manifest_and_lists_the_others(store_url: str, tmp_path: Path) -> None:
    snaps.put_run_record(open_store(store_url), "good-abc123", record("good-abc123", store_url))
    snapshot(store_url, "good-abc123", tmp_path)
    snapshot(store_url, "good-abc123", tmp_path)
    plant(store_url, "good-abc123/snapshots/000002.manifest.json", b'{"seq": 2, "at": "x", "files": ["x"], "bytes": 1}')
    plant(store_url, "good-abc123/snapshots/000003.manifest.json", DEEP)
    shown = gpurun("checkpoint-sync", "--list", "good-abc123", "--store", store_url, "--json", check=False)
    assert shown.returncode == 0, shown.stderr
    assert [s["seq"] for s in json.loads(shown.stdout)] == [1]
    warned = shown.stderr.strip().splitlines()
    assert len(warned) == 2 and all(line.startswith("warning: ") for line in warned), warned
    assert any(
        "000002.manifest.json is not a valid snapshot manifest (files.0: should be a JSON object)" in line
        for line in warned
    )
    assert any("000003.manifest.json is nested deeper than 32 levels" in line for line in warned)


def test_resume_auto_skips_a_malformed_run_json_and_resumes_from_the_good_run(store_url: str, tmp_path: Path) -> None:
    workdir = tmp_path / "code"
    workdir.mkdir()
    spec = tmp_path / "experiment.yaml"
    spec.write_text(
        "name: resumer\nprovider: local\nworkdir: code\nrun: 'true'\n"
        f"checkpoint: {{dir: ckpt, store: '{store_url}', resume: auto}}\n"
    )
    snaps.put_run_record(open_store(store_url), "resumer-aaaaaa", record("resumer-aaaaaa", store_url))
    snapshot(store_url, "resumer-aaaaaa", tmp_path)
    plant(
        store_url, "resumer-bbbbbb/run.json", json.dumps(record("resumer-bbbbbb", store_url, machines=["x"])).encode()
    )
    plant(store_url, "resumer-cccccc/run.json", DEEP)
    plant(store_url, "unrelated-dddddd/run.json", b"[1,2]")
    planned = gpurun("launch", str(spec), "--dry-run", "--json", check=False)
    assert planned.returncode == 0, planned.stderr
    assert "resumer-aaaaaa" in planned.stdout
    warned = [line for line in planned.stderr.splitlines() if line.startswith("warning: resume:")]
    assert len(warned) == 2, planned.stderr
    assert "unrelated-dddddd" not in planned.stderr  # another spec's runs are not this launch's business


# -- schema versions --------------------------------------------------------------------------------


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_status_skips_a_run_json_of_a_newer_gpurun_with_one_line(store_url: str, json_flag: list[str]) -> None:
    snaps.put_run_record(open_store(store_url), "good-abc123", record("good-abc123", store_url))
    newer = record("newer-abc123", store_url, version=99, machines=[{"rank": 0, "shape": "unknown to this gpurun"}])
    plant(store_url, "newer-abc123/run.json", json.dumps(newer).encode())
    shown = gpurun("status", "--store", store_url, *json_flag, check=False)
    assert shown.returncode == 0, shown.stderr
    assert shown.stderr.strip().splitlines() == [
        f"warning: {store_url}/newer-abc123/run.json was written by a newer gpurun "
        "(schema version 99; this one reads up to 1): upgrade gpurun; skipped"
    ]
    if json_flag:
        assert [r["run"] for r in json.loads(shown.stdout)] == ["good-abc123"]
    else:
        assert "good-abc123" in shown.stdout and "newer-abc123" not in shown.stdout


def test_a_local_record_of_a_newer_gpurun_is_refused_and_left_as_it_is(gpurun_home: Path) -> None:
    runs_dir = gpurun_home / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    good = {**record("good-abc123", "file:///x"), "version": 1}
    (runs_dir / "good-abc123.json").write_text(json.dumps(good))
    newer = json.dumps({**record("newer-abc123", "file:///x"), "version": 2, "state": {"phase": "new"}})
    (runs_dir / "newer-abc123.json").write_text(newer)
    listed = gpurun("status", "--json", check=False)
    assert listed.returncode == 0, listed.stderr
    assert [r["run"] for r in json.loads(listed.stdout)] == ["good-abc123"]
    assert listed.stderr.strip().splitlines() == [
        f"warning: run record {runs_dir / 'newer-abc123.json'} was written by a newer gpurun "
        "(schema version 2; this one reads up to 1): upgrade gpurun"
    ]
    for command in (["status", "newer-abc123"], ["teardown", "newer-abc123", "--yes"]):
        refused = gpurun(*command, check=False)
        assert refused.returncode == 1, refused.stderr
        assert refused.stderr.strip().splitlines() == [
            f"error: run record {runs_dir / 'newer-abc123.json'} was written by a newer gpurun "
            "(schema version 2; this one reads up to 1): upgrade gpurun"
        ]
    assert (runs_dir / "newer-abc123.json").read_text() == newer  # never rewritten by an older gpurun


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"machines": [{"rank": 0, "port": "22"}]}, "machines.0.port: should be a whole number"),
        ({"jobs": [{"number": True, "command": "x"}]}, "jobs.0.number: should be a whole number"),
        ({"last_checkpoint": {"seq": 0}}, "last_checkpoint.seq: should be 1 or more"),
        ({"provider": None}, "provider: should be a string"),
    ],
    ids=["port-text", "job-number-bool", "seq-zero", "provider-null"],
)
def test_a_malformed_record_here_is_one_line_and_the_other_runs_list(
    gpurun_home: Path, changes: dict[str, Any], reason: str
) -> None:
    """Records on this computer are read through the same schema as a store's run.json."""
    runs_dir = gpurun_home / "runs"
    runs_dir.mkdir(parents=True, exist_ok=True)
    (runs_dir / "good-abc123.json").write_text(json.dumps(record("good-abc123", "file:///x")))
    path = runs_dir / "bad-abc123.json"
    path.write_text(json.dumps(record("bad-abc123", "file:///x", **changes)))
    listed = gpurun("status", "--json", check=False)
    assert listed.returncode == 0, listed.stderr
    assert [r["run"] for r in json.loads(listed.stdout)] == ["good-abc123"]
    assert listed.stderr.strip().splitlines() == [
        f"warning: run record {path} is corrupt ({reason}); move it away to clear this"
    ]
    named = gpurun("status", "bad-abc123", check=False)
    assert named.returncode == 1 and "Traceback" not in named.stderr
    assert named.stderr.strip().splitlines() == [
        f"error: run record {path} is corrupt ({reason}); "
        "`gpurun teardown bad-abc123 --force` ends the run from what survives"
    ]


@pytest.mark.slow
def test_launch_writes_the_schema_version_into_what_it_keeps(tmp_path: Path, store_url: str, gpurun_home: Path) -> None:
    (tmp_path / "code").mkdir()
    spec = tmp_path / "experiment.yaml"
    spec.write_text(
        "name: versioned\nprovider: local\nworkdir: code\nrun: sleep 60\n"
        f"checkpoint: {{dir: ckpt, store: '{store_url}', every: 1s}}\n"
    )
    run = json.loads(gpurun("launch", str(spec), "--json").stdout)["run"]
    try:
        assert "version" not in json.loads(gpurun("status", run, "--json").stdout)[0]  # --json is unchanged
        assert json.loads((gpurun_home / "runs" / f"{run}.json").read_text())["version"] == 1
        assert json.loads(open_store(store_url).get_bytes(f"{run}/run.json") or b"")["version"] == 1
        status_file = gpurun_home / "local" / run / documents.AGENT_STATUS_FILE
        agent_status = wait_until(lambda: status_file.exists() and json.loads(status_file.read_text()), what="agent")
        assert agent_status["version"] == 1
    finally:
        gpurun("teardown", run, "--yes")
    assert json.loads(open_store(store_url).get_bytes(f"{run}/run.json") or b"")["version"] == 1


def test_the_machines_write_the_restart_ledger_in_gpurun_s_schema_version() -> None:
    from gpurun import bootstrap

    # bootstrap.py runs on a bare machine and imports nothing of gpurun: its constant must follow.
    assert bootstrap.ATTEMPTS_VERSION == documents.SCHEMA_VERSION


# -- the readers themselves -------------------------------------------------------------------------


def test_strict_types_and_limits() -> None:
    def latest(text: str) -> dict[str, Any]:
        return documents.read(text.encode(), documents.Latest, name="s/LATEST", limit=documents.LATEST_LIMIT)

    assert latest('{"seq": 7, "at": "t", "files": 1, "bytes": 2, "future": {"x": 1}}')["future"] == {"x": 1}
    for bad in ('{"seq": true, "at": "t", "files": 1, "bytes": 2}', '{"seq": "7", "at": "t", "files": 1, "bytes": 2}'):
        with pytest.raises(
            InvalidDocument, match=r"^s/LATEST is not a valid LATEST pointer \(seq: should be a whole number\)$"
        ):
            latest(bad)
    with pytest.raises(InvalidDocument, match="schema version 2"):
        latest('{"version": 2, "seq": 7, "at": "t", "files": 1, "bytes": 2}')
    with pytest.raises(InvalidDocument, match="larger than 64 KiB"):
        latest('{"seq": 7, "at": "' + "x" * 70_000 + '", "files": 1, "bytes": 2}')
    with pytest.raises(InvalidDocument, match="not valid JSON"):
        latest('{"seq": NaN}')
    with pytest.raises(InvalidDocument, match="nested deeper than 32"):
        documents.read(DEEP, documents.RunDocument, name="r", limit=len(DEEP))


def test_a_giant_run_json_is_refused_without_reading_all_of_it(store_url: str) -> None:
    plant(store_url, "big-abc123/run.json", b" " * (documents.RUN_RECORD_LIMIT + 10))
    with pytest.raises(InvalidDocument, match="big-abc123/run.json is larger than 4096 KiB"):
        snaps.get_run_record(open_store(store_url), "big-abc123")


def test_what_gpurun_writes_reads_back(store_url: str, tmp_path: Path) -> None:
    written = snapshot(store_url, "good-abc123", tmp_path)
    store = open_store(store_url)
    assert snaps.latest(store, "good-abc123") == snaps.summary(written["manifest"])
    assert snaps.read_manifest(store, "good-abc123", 1) == written["manifest"]
    snaps.put_run_record(store, "good-abc123", record("good-abc123", store_url))
    # Each document carries the schema version it was written in (docs/json.md, "Schema versions").
    assert snaps.get_run_record(store, "good-abc123") == {**record("good-abc123", store_url), "version": 1}
    assert written["manifest"]["version"] == 1
    assert json.loads(store.get_bytes("good-abc123/LATEST") or b"")["version"] == 1


def test_agent_status_from_a_machine_is_checked(tmp_path: Path) -> None:
    (tmp_path / "agent.status.json").write_text('{"last_seq": true, "last_at": "t"}')
    assert jobs.read_state(LocalTransport(), str(tmp_path))["agent"] is None
    (tmp_path / "agent.status.json").write_bytes(DEEP)
    assert jobs.read_state(LocalTransport(), str(tmp_path))["agent"] is None
    (tmp_path / "agent.status.json").write_text('{"last_seq": 3, "last_at": "t", "last_bytes": 9, "extra": [1]}')
    assert jobs.read_state(LocalTransport(), str(tmp_path))["agent"]["last_seq"] == 3


def test_metrics_lines_that_are_not_records_are_skipped_never_a_crash() -> None:
    good = json.dumps({"epoch": 1, "loss": 0.5}).encode()
    diverged = b'{"epoch": 2, "loss": NaN, "val_loss": 0.7}'  # what json.dumps writes for a NaN loss
    big = json.dumps({"loss": 1.0, "note": "x" * (documents.METRICS_LINE_LIMIT + 1)}).encode()
    wrong = [b"[1, 2]", b'"text"', b"{not json", DEEP, big]
    parsed = parse_metrics(b"\n".join([good, *wrong, diverged]))
    assert parsed["records"] == 2 and parsed["skipped_lines"] == len(wrong)
    assert parsed["metrics"]["loss"]["values"] == [0.5] and parsed["metrics"]["val_loss"]["last"] == 0.7


def test_the_machine_s_image_prep_answer_is_checked() -> None:
    answer = {"stash": "/dev/shm/gpurun-image-x1", "moved": 3, "truncated": 0, "keys_removed": 1}
    noise = b"warning: something\n"
    assert images._last_json(noise + json.dumps(answer).encode() + b"\n") == answer
    assert images._last_json(noise) is None
    big = json.dumps({"by": "request", "problems": ["x" * documents.PREP_ANSWER_LIMIT]}).encode()
    for bad, reason in (
        (b'{"stash": "/s", "moved": true}', "moved: should be a whole number"),
        (b'{"by": "request", "problems": [1]}', "problems.0: should be a string"),
        (DEEP, "nested deeper than 32"),
        (big, "larger than 1024 KiB"),
    ):
        with pytest.raises(InvalidDocument, match=reason):
            images._last_json(noise + bad)


def run_prep(*args: str) -> subprocess.CompletedProcess[str]:
    """image_prep.py as the machine runs it: a lone script under the system python3, gpurun not importable."""
    script = Path(image_prep.__file__)
    return subprocess.run(
        ["python3", "-I", str(script), *args], capture_output=True, text=True, timeout=60, cwd="/", check=False
    )


def test_image_prep_refuses_a_malformed_plan_or_stash_before_touching_anything(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "job.log").write_text("kept")
    for plan, says in (
        (json.dumps({"run_dir": str(run_dir), "deadline": True}), "the plan: deadline has the wrong type"),
        (json.dumps({"run_dir": str(run_dir), "deadline": 9, "paths": [1]}), "the plan: paths has the wrong type"),
        (json.dumps({"deadline": 9}), "the plan lacks run_dir"),
        ("[" * 10_000 + "]" * 10_000, "the plan is nested too deep"),
        (
            json.dumps({"run_dir": str(run_dir), "deadline": 9, "x": [[[[[[[[[1]]]]]]]]]}),
            "the plan is nested deeper than 8 levels",
        ),
        ('{"run_dir": "r", "deadline": NaN}', "the plan is not valid JSON"),
    ):
        done = run_prep("stash", plan)
        assert done.returncode == 2 and json.loads(done.stdout) == {"error": says}, done.stderr
        assert (run_dir / "job.log").read_text() == "kept"
    stash = tmp_path / "gpurun-image-x"
    stash.mkdir()
    for manifest, says in (
        (json.dumps({"run_dir": "r", "pids": ["1"], "moved": [], "truncated": [], "keys": []}), "pids has the wrong"),
        (b" " * (image_prep.DOCUMENT_LIMIT + 1), "is larger than"),
    ):
        (stash / "manifest.json").write_bytes(manifest.encode() if isinstance(manifest, str) else manifest)
        (stash / "restoring").unlink(missing_ok=True)
        done = run_prep("restore", str(stash))
        assert done.returncode == 2 and says in json.loads(done.stdout)["error"], done.stderr


# -- random JSON into every reader ------------------------------------------------------------------

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=5),
    max_leaves=30,
)
FIELDS = ["seq", "at", "files", "bytes", "run", "provider", "state", "created_at", "store", "machines", "job"]
NEAR = st.dictionaries(st.sampled_from(FIELDS + ["path", "size", "sha256", "version", "last_seq"]), JSON, max_size=8)
DOCUMENT = st.one_of(
    JSON.map(lambda v: json.dumps(v).encode()), NEAR.map(lambda v: json.dumps(v).encode()), st.binary()
)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(data=DOCUMENT)
def test_every_reader_gives_a_document_or_gpurun_s_own_error(data: bytes, tmp_path_factory: Any) -> None:
    store_url = f"file://{tmp_path_factory.mktemp('store')}"
    store = open_store(store_url)
    for key in ("r-abc123/LATEST", "r-abc123/run.json", "r-abc123/snapshots/000001.manifest.json"):
        store.put_bytes(key, data)
    records = paths.runs_dir()
    records.mkdir(parents=True, exist_ok=True)
    (records / "r-abc123.json").write_bytes(data)
    readers = [
        lambda: snaps.latest(store, "r-abc123"),
        lambda: snaps.read_manifest(store, "r-abc123", 1),
        lambda: snaps.get_run_record(store, "r-abc123"),
        lambda: snaps.usable_latest(store, "r-abc123"),
        lambda: snaps.list_snapshots(store, "r-abc123", warn=lambda _line: None),
        lambda: snaps.list_run_records(store, warn=lambda _run, _line: None),
        lambda: documents.read(data, documents.AgentStatus, name="agent.status.json", limit=1 << 20),
        lambda: parse_metrics(data),
        lambda: images._last_json(data),
        lambda: runs.load_all_from_store(store_url),
        lambda: runs.load("r-abc123"),
        lambda: runs.load_all(),
    ]
    for reader in readers:
        try:
            reader()
        except GpurunError as error:
            assert "\n" not in str(error)


@pytest.mark.parametrize(
    "planted",
    [
        b"[" * 100_000 + b"]" * 100_000,  # deeper than any parser's recursion
        b'{"version": 1, "machines": "x"}',
        b'{"version": true, "machines": []}',
        b"not json",
        b'{"version": 1, "machines": []}' + b" " * 2_000_000,  # over the ledger's size limit
    ],
    ids=["deep", "machines-not-a-list", "bool-version", "not-json", "oversized"],
)
def test_a_hostile_restart_ledger_reads_as_absent_never_as_a_crash(tmp_path: Path, planted: bytes) -> None:
    """attempts.json is written by the run's machines: status reads it through its schema."""
    from gpurun.app.recovering import read_attempts

    store = open_store((tmp_path / "store").as_uri())
    store.put_bytes("run-abc123/attempts.json", planted)
    assert read_attempts(store, "run-abc123") is None
    store.put_bytes("run-abc123/attempts.json", b'{"version": 1, "machines": [{"instance": "i-1"}]}')
    assert read_attempts(store, "run-abc123") == {"version": 1, "machines": [{"instance": "i-1"}]}
