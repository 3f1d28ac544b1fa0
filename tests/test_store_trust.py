"""A store cannot steer gpurun: what it holds is read, checked, and never decides where gpurun writes.

Planted records, names, pointers and file names go through the real CLI against
moto's server (S3) or a file:// store, and the tests check what lands where.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

from gpurun.store import open_store
from gpurun.store import snapshots as snaps
from tests.helpers import gpurun, wait_until

ACCOUNT = "123456789012"  # moto's


def aws_record(run: str, store: str, planted_dir: str = "/nonexistent") -> dict:
    """What a launching computer writes for an AWS run with no machine left."""
    return {
        "run": run,
        "provider": "aws",
        "state": "running",
        "created_at": "2026-11-26T10:00:00+00:00",
        "store": store,
        "machines": [
            {
                "rank": 0,
                "host": "127.0.0.1",
                "port": 1,
                "user": "ubuntu",
                "run_dir": f"/home/ubuntu/gpurun/{run}",
                "known_hosts": f"{planted_dir}/known_hosts",
                "key_path": f"{planted_dir}/id_ed25519",
            }
        ],
        "resources": {},
        "aws": {"region": "us-east-1", "account": ACCOUNT},
        "spec": {"aws": {"region": "us-east-1", "nodes": 1}, "checkpoint": {"dir": "ckpt", "every": 60, "keep": 2}},
    }


def test_teardown_from_a_store_writes_back_only_where_the_record_was_read(
    s3_bucket: str, moto_server: str, tmp_path: Path, gpurun_home: Path
) -> None:
    import boto3

    victim_dir = tmp_path / "victim"
    victim_dir.mkdir()
    s3 = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1")
    s3.create_bucket(Bucket="victim-bucket")
    bucket = s3_bucket[len("s3://") :].split("/", 1)[0]
    for planted in (f"file://{victim_dir}", "s3://victim-bucket/stolen"):
        run = "far-" + ("abc123" if planted.startswith("file") else "def456")
        snaps.put_run_record(open_store(s3_bucket), run, aws_record(run, planted, str(victim_dir)))
        done = gpurun("teardown", run, "--store", s3_bucket, "--yes", check=False)
        assert done.returncode == 0, done.stderr
        written = json.loads(s3.get_object(Bucket=bucket, Key=f"ckpt/{run}/run.json")["Body"].read())
        assert written["state"] == "ended" and written["run"] == run
        assert list(victim_dir.rglob("*")) == []
        assert "Contents" not in s3.list_objects_v2(Bucket="victim-bucket")
        # The record kept here names the store it came from: a later command writes there too.
        kept_path = gpurun_home / "runs" / f"{run}.json"
        kept = json.loads(kept_path.read_text())
        assert kept["store"] == s3_bucket
        assert [sorted(machine) for machine in kept["machines"]] == [["host", "port", "rank", "run_dir", "user"]]
        assert gpurun("teardown", run, "--yes", check=False).returncode == 0
        assert list(victim_dir.rglob("*")) == [] and "Contents" not in s3.list_objects_v2(Bucket="victim-bucket")
        # As an interrupted teardown leaves it: nothing but status and teardown uses the store's machines.
        kept_path.write_text(json.dumps({**json.loads(kept_path.read_text()), "state": "running"}))
        for command in (["exec", run, "--", "true"], ["logs", run], ["ssh", run, "--", "true"]):
            done = gpurun(*command, check=False)
            assert done.returncode == 2 and "launched from another computer" in done.stderr, (command, done.stderr)
        assert gpurun("status", run, "--json").returncode == 0
        assert list(victim_dir.rglob("*")) == []


def test_a_store_record_for_another_run_or_a_strange_name_is_refused_by_name(tmp_path: Path, gpurun_home: Path) -> None:
    store_url = f"file://{tmp_path / 'store'}"
    store = open_store(store_url)
    good = aws_record("good-abc123", store_url)
    snaps.put_run_record(store, "good-abc123", good)
    snaps.put_run_record(store, "copy-abc123", {**good})  # says it is good-abc123
    store.put_bytes("bad name!/run.json", json.dumps({**good, "run": "bad name!"}).encode())
    seen = gpurun("status", "--store", store_url, "--json", check=False)
    assert seen.returncode == 0, seen.stderr
    assert [r["run"] for r in json.loads(seen.stdout)] == ["good-abc123"]
    assert "copy-abc123/run.json is not a run record (it describes run 'good-abc123')" in seen.stderr
    assert "'bad name!'" in seen.stderr and "not a run name" in seen.stderr
    done = gpurun("teardown", "copy-abc123", "--store", store_url, "--yes", check=False)
    assert done.returncode == 1 and "describes run 'good-abc123'" in done.stderr
    assert not (gpurun_home / "runs" / "copy-abc123.json").exists()


PWNED = "\u001b[2J\u001b[31mPWNED"


def test_text_from_a_store_or_a_machine_reaches_the_terminal_escaped(tmp_path: Path, gpurun_home: Path) -> None:
    store_url = f"file://{tmp_path / 'store'}"
    store = open_store(store_url)
    record = {
        "run": "box-abc123",
        "provider": "ssh",
        "state": "running",
        "created_at": "2026-11-26T10:00:00+00:00",
        "store": store_url,
        "machines": [{"rank": 0, "host": PWNED, "run_dir": "/home/me/gpurun/box-abc123"}],
        "spec": {},
    }
    snaps.put_run_record(store, "box-abc123", record)
    store.put_bytes(f"evil{PWNED}/run.json", b"{}")
    # A snapshot whose file name is hostile and whose bytes do not match: the error names the file.
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"w" * 10)
    snaps.write_snapshot(
        store, "box-abc123", [snaps.StagedFile(f"w{PWNED}.bin", 10, "0" * 64, str(weights))], previous=None
    )
    # A local run whose agent reports an error carrying escapes: `status` shows it.
    run_dir = tmp_path / "local-run"
    run_dir.mkdir()
    (run_dir / "agent.status.json").write_text(json.dumps({"last_error": f"upload failed: {PWNED}", "failures": 2}))
    local = {**record, "run": "here-abc123", "provider": "local", "machines": [{"rank": 0, "run_dir": str(run_dir)}]}
    (gpurun_home / "runs").mkdir(mode=0o700)
    (gpurun_home / "runs" / "here-abc123.json").write_text(json.dumps(local))

    outputs = [
        gpurun("status", "--store", store_url, check=False),
        gpurun("status", "box-abc123", "--store", store_url, check=False),
        gpurun("teardown", "box-abc123", "--store", store_url, "--yes", check=False),
        gpurun("checkpoint-sync", "box-abc123", "--store", store_url, "--download", str(tmp_path / "d"), check=False),
        gpurun("status", "--store", store_url, "--json", check=False),
    ]
    shown = "".join(done.stdout + done.stderr for done in outputs)
    assert "\x1b" not in shown
    assert "\\x1b[2J\\x1b[31mPWNED" in outputs[0].stdout  # the host, in the table
    assert "SYNC FAILING: upload failed: \\x1b[2J" in outputs[0].stdout
    assert "tear it down there" in outputs[2].stderr and "\\x1b[2J" in outputs[2].stderr
    assert "failed verification" in outputs[3].stderr and "w\\x1b[2J" in outputs[3].stderr
    assert "not a run name" in outputs[0].stderr
    assert json.loads(outputs[4].stdout)  # JSON keeps the value, escaped the JSON way


def snapshot_of(store, run: str, tmp_path: Path, content: bytes = b"w" * 10) -> dict:
    weights = tmp_path / f"{run}.bin"
    weights.write_bytes(content)
    staged = [snaps.StagedFile("weights.bin", len(content), snaps.sha256_file(weights), str(weights))]
    snaps.put_run_record(store, run, {"run": run, "provider": "local", "state": "ended"})
    return snaps.write_snapshot(store, run, staged, previous=None)


@pytest.mark.parametrize("kind", ["file", "s3"])
def test_resume_auto_picks_the_run_the_store_wrote_last_not_the_newest_claim(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path, gpurun_home: Path
) -> None:
    store_url = f"file://{tmp_path / 'store'}" if kind == "file" else request.getfixturevalue("s3_bucket")
    store = open_store(store_url)
    snapshot_of(store, "exp-aaaaaa", tmp_path)
    store.put_bytes(
        "exp-aaaaaa/LATEST", json.dumps({"seq": 1, "at": "9999-12-31T00:00:00+00:00", "files": 1, "bytes": 10}).encode()
    )
    # The store's clock keeps whole seconds (S3's LastModified): let it move on.
    started = int(time.time())
    wait_until(lambda: time.time() >= started + 1.1, what="the next second")
    snapshot_of(store, "exp-bbbbbb", tmp_path, b"x" * 20)
    snapshot_of(store, "exp-cccccc", tmp_path)
    store.put_bytes("exp-cccccc/LATEST", json.dumps({"seq": 5, "at": "9999-12-31T00:00:00+00:00"}).encode())
    snaps.put_run_record(store, "exp-dddddd", {"run": "exp-dddddd", "provider": "local", "state": "ended"})
    store.put_bytes("exp-dddddd/LATEST", b"{not json")
    (tmp_path / "code").mkdir()
    spec = tmp_path / "exp.yaml"
    spec.write_text(
        f"name: exp\nworkdir: code\nrun: 'true'\ncheckpoint: {{dir: ckpt, store: '{store_url}', resume: auto}}\n"
    )
    done = gpurun("launch", str(spec), "--dry-run", "--json", check=False)
    assert done.returncode == 0, done.stderr
    plan = {row["item"]: row["value"] for row in json.loads(done.stdout)["plan"]}
    assert plan["resume"] == "from exp-bbbbbb snapshot 1"
    assert "skipping exp-cccccc" in done.stderr and "snapshot 5, which has no valid manifest" in done.stderr
    assert "skipping exp-dddddd" in done.stderr and "LATEST is not valid JSON" in done.stderr


@pytest.mark.parametrize("kind", ["file", "s3"])
def test_a_corrupt_latest_is_repaired_from_the_manifests_and_the_agent_goes_on(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    from tests.test_agent import agent_status, start_agent

    store_url = f"file://{tmp_path / 'store'}" if kind == "file" else request.getfixturevalue("s3_bucket")
    store = open_store(store_url)
    frozen, weights = tmp_path / "frozen.bin", tmp_path / "weights.bin"
    frozen.write_bytes(b"f" * 50_000)
    previous = None
    for epoch in (1, 2):
        weights.write_bytes(bytes([epoch]) * 1000)
        staged = [
            snaps.StagedFile(path.name, path.stat().st_size, snaps.sha256_file(path), str(path))
            for path in (frozen, weights)
        ]
        previous = snaps.write_snapshot(store, "r1", staged, previous=previous)["manifest"]
    store.put_bytes("r1/snapshots/000003/weights.bin", b"cut short")  # no manifest: never complete
    store.put_bytes("r1/LATEST", b'{"seq": 2, "at": "2026-')
    process, run_dir = start_agent(tmp_path, store_url, "--every", "1h")
    ckpt = run_dir / "work/checkpoints"
    try:
        os.link(frozen, ckpt / "frozen.bin")
        (ckpt / "weights.bin").write_bytes(b"\x03" * 1000)
        (run_dir / "sync.request").write_text("nonce-1")
        status = wait_until(
            lambda: agent_status(run_dir).get("handled_request") == "nonce-1" and agent_status(run_dir),
            what="the requested snapshot",
        )
    finally:
        process.kill()
        process.wait()
    log = (run_dir / "agent.log").read_text()
    assert status["last_error"] is None and status["last_seq"] == 4, log
    assert "LATEST is not valid JSON; repaired from the manifests: LATEST now points at snapshot 2" in log
    assert snaps.latest(store, "r1")["seq"] == 4
    assert status["last_sent_bytes"] == 1000, "frozen.bin is copied inside the store, not sent again"
    assert [s["seq"] for s in snaps.list_snapshots(store, "r1")] == [2, 4]  # keep 2 prunes again
    # Only what snapshot 4 still refers to (frozen.bin, unchanged since snapshot 1) stays of the older folders.
    assert [obj.key for obj in store.list("r1/snapshots/") if "/000003" in obj.key or "/000001" in obj.key] == [
        "r1/snapshots/000001/frozen.bin"
    ]


def without_root_read_override() -> None:
    """In the child: root loses CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, so mode 000 stops it as it stops a user."""
    if os.geteuid() != 0:
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):  # PR_CAPBSET_DROP: lost at the next exec, for it and its children
        if libc.prctl(24, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


LOCKED_JOB = """\
import os, pathlib, time
ckpt = pathlib.Path(os.environ["GPURUN_CHECKPOINT_DIR"])
ckpt.mkdir(parents=True, exist_ok=True)
(ckpt / "good.bin").write_bytes(b"g" * 1000)
(ckpt / "locked.bin").write_bytes(b"l" * 1000)
os.chmod(ckpt / "locked.bin", 0)
while not os.path.exists("stop"):
    time.sleep(0.2)
"""


def test_an_unreadable_checkpoint_file_is_named_and_no_partial_snapshot_is_taken(
    tmp_path: Path, gpurun_home: Path
) -> None:
    import subprocess
    import sys

    store_url = f"file://{tmp_path / 'store'}"
    (tmp_path / "code").mkdir()
    (tmp_path / "code/job.py").write_text(LOCKED_JOB)
    spec = tmp_path / "locked.yaml"
    spec.write_text(
        f"name: locked\nworkdir: code\nrun: {sys.executable} job.py\n"
        f"checkpoint: {{dir: ckpt, every: 1h, store: '{store_url}', resume: never}}\n"
    )
    launched = subprocess.run(
        [sys.executable, "-m", "gpurun", "launch", str(spec), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=without_root_read_override,
    )
    assert launched.returncode == 0, launched.stderr
    run = json.loads(launched.stdout)["run"]
    ckpt = gpurun_home / "local" / run / "work/ckpt"
    try:
        wait_until(lambda: (ckpt / "locked.bin").exists() and (ckpt / "locked.bin").stat().st_mode & 0o777 == 0)
        done = gpurun("checkpoint-sync", run, check=False)
        assert done.returncode == 1
        assert f"cannot read {ckpt / 'locked.bin'} (Permission denied)" in done.stderr, done.stderr
        assert ".gpurun-staging" not in done.stderr
        [seen] = json.loads(gpurun("status", run, "--json").stdout)
        assert "locked.bin" in seen["checkpoint_error"]["error"] and seen["last_checkpoint"] is None
        assert snaps.latest(open_store(store_url), run) is None, "no snapshot without locked.bin"
        os.chmod(ckpt / "locked.bin", 0o644)
        done = gpurun("checkpoint-sync", run, "--json")
        assert json.loads(done.stdout)["files"] == 2
    finally:
        (gpurun_home / "local" / run / "work/stop").write_text("")
        gpurun("teardown", run, "--yes", check=False)


LINKING_JOB = """\
import os, pathlib, sys, time
ckpt = pathlib.Path(os.environ["GPURUN_CHECKPOINT_DIR"])
(ckpt / "epochs/e3").mkdir(parents=True, exist_ok=True)
(ckpt / "epoch1.pt").write_bytes(b"1" * 100)
(ckpt / "epoch2.pt").write_bytes(b"2" * 100)
(ckpt / "epochs/e3/w.bin").write_bytes(b"3" * 100)
os.symlink("epoch1.pt", ckpt / "last.pt")
os.symlink("epochs/e3", ckpt / "best")
os.symlink(str(ckpt / "epoch2.pt"), ckpt / "abs.pt")
os.symlink(sys.argv[1], ckpt / "data")
pathlib.Path("ready").write_text("")
while not os.path.exists("stop"):
    time.sleep(0.2)
"""


@pytest.mark.parametrize("kind", ["file", "s3"])
def test_links_inside_the_checkpoint_dir_are_kept_as_links_and_links_outside_are_reported(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path, gpurun_home: Path
) -> None:
    store_url = f"file://{tmp_path / 'store'}" if kind == "file" else request.getfixturevalue("s3_bucket")
    outside = tmp_path / "datasets"
    outside.mkdir()
    (outside / "big.npy").write_bytes(b"d" * 1000)
    (tmp_path / "code").mkdir()
    (tmp_path / "code/job.py").write_text(LINKING_JOB)
    spec = tmp_path / "links.yaml"
    spec.write_text(
        f"name: links\nworkdir: code\nrun: {sys.executable} job.py {outside}\n"
        f"checkpoint: {{dir: ckpt, every: 1h, store: '{store_url}', resume: never}}\n"
    )
    run = json.loads(gpurun("launch", str(spec), "--json").stdout)["run"]
    work = gpurun_home / "local" / run / "work"
    try:
        wait_until((work / "ready").exists, what="the job's checkpoint directory")
        first = json.loads(gpurun("checkpoint-sync", run, "--json").stdout)
        assert first["files"] == 3
        manifest = snaps.read_manifest(open_store(store_url), run, first["seq"])
        assert [entry["path"] for entry in manifest["files"]] == ["epoch1.pt", "epoch2.pt", "epochs/e3/w.bin"]
        assert manifest["links"] == [
            {"path": "abs.pt", "target": "epoch2.pt"},
            {"path": "best", "target": "epochs/e3"},
            {"path": "last.pt", "target": "epoch1.pt"},
        ]
        [seen] = json.loads(gpurun("status", run, "--json").stdout)
        assert f"data -> {outside}" in seen["checkpoint_warning"] and "not in snapshots" in seen["checkpoint_warning"]
        assert f"data -> {outside}" in gpurun("status").stdout
        # Moving a link is a change like any other.
        os.symlink("epoch2.pt", work / "ckpt/last.tmp")
        os.replace(work / "ckpt/last.tmp", work / "ckpt/last.pt")
        second = json.loads(gpurun("checkpoint-sync", run, "--json").stdout)
        assert second["seq"] == first["seq"] + 1
        restored = tmp_path / "restored"
        gpurun("checkpoint-sync", run, "--download", str(restored))
        assert os.readlink(restored / "last.pt") == "epoch2.pt" and (restored / "last.pt").read_bytes() == b"2" * 100
        assert os.readlink(restored / "best") == "epochs/e3" and (restored / "best/w.bin").read_bytes() == b"3" * 100
        assert os.readlink(restored / "abs.pt") == "epoch2.pt"
        assert not os.path.lexists(restored / "data")
    finally:
        (work / "stop").write_text("")
        gpurun("teardown", run, "--yes", check=False)


@pytest.mark.parametrize(
    ("link", "target", "why"),
    [
        ("evil", "../../outside", "leads outside the target"),
        ("evil", "/etc", "leads outside the target"),
        ("a/b/evil", "d/../../..", "leads outside the target"),
        ("weights.bin/x", "weights.bin", "inside what is a file"),
        ("weights.bin", "other", "both a link and a file"),
        ("d/x", "../weights.bin", "written through link 'd'"),
        ("evil", 5, "is not a valid snapshot manifest"),
    ],
)
def test_a_restore_refuses_a_link_that_escapes_or_stands_in_the_way(
    link: str, target: object, why: str, tmp_path: Path, gpurun_home: Path
) -> None:
    store_url = f"file://{tmp_path / 'store'}"
    store = open_store(store_url)
    info = snapshot_of(store, "linky-abc123", tmp_path)
    manifest = info["manifest"]
    manifest["links"] = [{"path": "d", "target": "."}, {"path": link, "target": target}]
    # Planted where a restore reads it: the snapshot's manifest and its copy beside LATEST.
    for key in (f"linky-abc123/{snaps.seq_dir(info['seq'])}.manifest.json", f"linky-abc123/{snaps.LATEST_MANIFEST}"):
        store.delete([key])
        store.put_bytes(key, json.dumps(manifest).encode())
    into = tmp_path / "deep/restored"
    done = gpurun("checkpoint-sync", "linky-abc123", "--store", store_url, "--download", str(into), check=False)
    assert done.returncode == 1 and why in done.stderr, done.stderr
    assert not (tmp_path / "deep").exists() and not (tmp_path / "outside").exists()
