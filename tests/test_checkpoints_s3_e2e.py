"""S3 checkpoints through the real workflow, against moto's server over HTTP.

The spot notice (fake IMDSv2), zero bytes for unchanged snapshots, the view
from a second computer (`status --store`, `--download --store`), and a bucket
that stops accepting writes showing up in `status`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest

from gpurun.store import open_store
from gpurun.store import snapshots as snaps
from tests.helpers import gpurun, gpurun_json, wait_until

JOB = """\
import json, os, sys, time
ckpt = os.environ["GPURUN_CHECKPOINT_DIR"]
os.makedirs(ckpt, exist_ok=True)
with open(os.path.join(ckpt, "frozen.bin"), "wb") as handle:
    handle.write(os.urandom(200_000))
for epoch in range(1, int(sys.argv[1]) + 1):
    with open(os.path.join(ckpt, "w.tmp"), "w") as handle:
        json.dump({"epoch": epoch}, handle)
    os.replace(os.path.join(ckpt, "w.tmp"), os.path.join(ckpt, "weights.json"))
    print(f"epoch {epoch}", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def s3_client(endpoint: str):
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


def experiment(tmp_path: Path, store: str, epochs: int, pause: float) -> Path:
    code = tmp_path / "code"
    code.mkdir(exist_ok=True)
    (code / "job.py").write_text(JOB)
    spec = tmp_path / "s3.yaml"
    spec.write_text(
        f"name: s3run\nworkdir: code\nrun: {sys.executable} job.py {epochs} {pause}\n"
        f"checkpoint: {{dir: ckpt, every: 1s, keep: 2, store: '{store}', resume: never}}\n"
    )
    return spec


@pytest.mark.slow
def test_spot_notice_lands_a_final_snapshot_and_marks_the_run_interrupted(
    s3_bucket: str, fake_imds, tmp_path: Path
) -> None:
    store = open_store(s3_bucket)
    run_dir = tmp_path / "run"
    ckpt = run_dir / "work/ckpt"
    ckpt.mkdir(parents=True)
    snaps.put_run_record(store, "spot-1", {"run": "spot-1", "state": "running", "provider": "aws"})
    (ckpt / "weights.bin").write_bytes(b"before" * 1000)
    agent = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gpurun.agent",
            "--watch",
            str(ckpt),
            "--to",
            s3_bucket,
            "--run",
            "spot-1",
            "--every",
            "1h",
            "--run-dir",
            str(run_dir),
            "--spot-notice",
        ],
        stdout=open(run_dir / "agent.log", "wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until(lambda: (run_dir / "agent.status.json").exists(), what="agent start")
        time.sleep(1.0)
        (ckpt / "weights.bin").write_bytes(b"after the notice" * 1000)
        time.sleep(0.6)
        noticed = time.monotonic()
        fake_imds.interrupt()
        pointer = wait_until(lambda: snaps.latest(store, "spot-1"), timeout=30, what="a snapshot after the notice")
        elapsed = time.monotonic() - noticed
        out = tmp_path / "restored"
        snaps.download_snapshot(store, "spot-1", out)
        assert (out / "weights.bin").read_bytes() == b"after the notice" * 1000
        # The design's 10 s is measured in bench/spot_notice.py; a 5 s poll missed on a
        # loaded CI machine must not fail the suite, a stuck agent must.
        assert elapsed < 30, f"spot notice to LATEST took {elapsed:.1f}s"
        assert json.loads((run_dir / "interrupted").read_text())["action"] == "terminate"
        assert fake_imds.token_puts >= 1, "IMDSv2 token flow used"
        # The machine goes away: the job dies, the agent records the run as interrupted in the store.
        (run_dir / "job.exit").write_text("143")
        agent.wait(timeout=30)
        assert snaps.get_run_record(store, "spot-1")["state"] == "interrupted"
        assert pointer["seq"] >= 1
    finally:
        if agent.poll() is None:
            agent.kill()


@pytest.mark.slow
def test_s3_run_seen_from_another_computer_and_unchanged_sync_sends_nothing(
    s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = experiment(tmp_path, s3_bucket, epochs=3, pause=0.3)
    run = gpurun_json("launch", str(spec))["run"]
    wait_until(lambda: gpurun_json("status", run)[0]["state"] == "succeeded", timeout=60, what="job end")
    first = gpurun_json("teardown", run, "--yes")["runs"][0]["final_checkpoint"]
    assert first is not None
    listing = gpurun_json("checkpoint-sync", run, "--list")
    latest = listing[-1]
    assert latest["files"] == 2

    # A second computer: empty state directory, same credentials.
    other = tmp_path / "other-laptop"
    monkeypatch.setenv("GPURUN_HOME", str(other))
    seen = gpurun_json("status", "--store", s3_bucket)
    assert [r["run"] for r in seen] == [run] and seen[0]["state"] in ("succeeded", "ended")
    restored = tmp_path / "restored"
    gpurun("checkpoint-sync", run, "--store", s3_bucket, "--download", str(restored))
    assert json.loads((restored / "weights.json").read_text()) == {"epoch": 3}
    assert (restored / "frozen.bin").stat().st_size == 200_000


@pytest.mark.slow
def test_a_bucket_that_stops_accepting_writes_shows_in_status(moto_server: str, s3_bucket: str, tmp_path: Path) -> None:
    spec = experiment(tmp_path, s3_bucket, epochs=200, pause=0.3)
    run = gpurun_json("launch", str(spec))["run"]
    try:
        wait_until(lambda: gpurun_json("status", run)[0]["last_checkpoint"], timeout=60, what="first snapshot")
        bucket = s3_bucket[len("s3://") :].split("/")[0]
        client = s3_client(moto_server)
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            for item in page.get("Contents", []):
                client.delete_object(Bucket=bucket, Key=item["Key"])
        client.delete_bucket(Bucket=bucket)
        view = wait_until(
            lambda: (v := gpurun_json("status", run)[0])["checkpoint_error"] and v, timeout=60, what="error"
        )
        assert (
            "NoSuchBucket" in view["checkpoint_error"]["error"] or "does not exist" in view["checkpoint_error"]["error"]
        )
        table = gpurun("status").stdout
        assert "SYNC FAILING" in table
    finally:
        gpurun("teardown", run, "--yes", "--no-final-sync")


def test_missing_bucket_is_refused_before_anything_starts(
    moto_server: str, tmp_path: Path, monkeypatch, gpurun_home
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    spec = experiment(tmp_path, "s3://no-such-bucket-gpurun/x", epochs=1, pause=0)
    done = gpurun("launch", str(spec), check=False)
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no-such-bucket-gpurun" in errors[0]
    assert not (gpurun_home / "runs").exists() or not list((gpurun_home / "runs").glob("*.json"))
    assert not (gpurun_home / "local").exists() or not os.listdir(gpurun_home / "local")


@pytest.mark.slow
def test_resume_on_another_provider_from_s3(
    moto_server: str, s3_bucket: str, sshd, ssh_client_home: Path, tmp_path: Path
) -> None:
    """A run that trained on this computer continues on an SSH machine, through the S3 store."""
    spec = experiment(tmp_path, s3_bucket, epochs=3, pause=0.1)
    first = gpurun_json("launch", str(spec))["run"]
    wait_until(lambda: gpurun_json("status", first)[0]["state"] == "succeeded", timeout=60, what="first run")
    gpurun("teardown", first, "--yes")

    # The SSH machine reaches S3 with its own credentials (an instance profile on EC2).
    (sshd.home / ".aws").mkdir(exist_ok=True)
    (sshd.home / ".aws/credentials").write_text("[default]\naws_access_key_id = m\naws_secret_access_key = m\n")
    (sshd.home / ".aws/config").write_text(f"[default]\nregion = us-east-1\nendpoint_url = {moto_server}\n")
    sshd.seed_agent_venv()
    code = tmp_path / "code"
    (code / "resume.py").write_text(
        "import os\nprint('resume from', os.environ.get('GPURUN_RESUME_FROM'))\n"
        "print('restored', open(os.path.join(os.environ['GPURUN_RESUME_FROM'], 'weights.json')).read())\n"
    )
    remote = tmp_path / "remote.yaml"
    remote.write_text(
        f"name: s3run\nprovider: ssh\nworkdir: code\nrun: {sys.executable} resume.py\n"
        "ssh: {hosts: [testbox]}\n"
        f"checkpoint: {{dir: ckpt, every: 1s, store: '{s3_bucket}', resume: never}}\n"
    )
    second = gpurun_json("launch", str(remote), "--resume", first)["run"]
    try:
        wait_until(lambda: gpurun_json("status", second)[0]["state"] != "running", timeout=60, what="resumed run")
        log = gpurun("logs", second).stdout
        assert f"resume from {sshd.home}/gpurun/{second}/work/ckpt" in log
        assert 'restored {"epoch": 3}' in log
    finally:
        gpurun("teardown", second, "--yes")


def test_create_bucket_only_when_asked(moto_server: str, tmp_path: Path, monkeypatch, gpurun_home) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    spec = experiment(tmp_path, "s3://gpurun-made-bucket/x", epochs=1, pause=0)
    assert gpurun("launch", str(spec), check=False).returncode != 0  # not created unasked
    run = gpurun_json("launch", str(spec), "--create-bucket")["run"]
    client = s3_client(moto_server)
    block = client.get_public_access_block(Bucket="gpurun-made-bucket")["PublicAccessBlockConfiguration"]
    assert all(block.values())
    rules = client.get_bucket_encryption(Bucket="gpurun-made-bucket")["ServerSideEncryptionConfiguration"]["Rules"]
    assert rules[0]["ApplyServerSideEncryptionByDefault"]["SSEAlgorithm"] == "AES256"
    gpurun("teardown", run, "--yes")
    assert client.head_bucket(Bucket="gpurun-made-bucket"), "teardown never deletes a bucket"


def test_a_second_computer_cannot_end_an_ssh_run_it_has_no_way_into(tmp_path: Path, gpurun_home: Path) -> None:
    store_url = f"file://{tmp_path / 'store'}"
    record = {
        "run": "box-abc123",
        "provider": "ssh",
        "state": "running",
        "created_at": "2026-11-26T10:00:00Z",
        "store": store_url,
        "machines": [{"rank": 0, "host": "gpu-box.lan", "run_dir": "/home/me/gpurun/box-abc123"}],
        "spec": {},
    }
    snaps.put_run_record(open_store(store_url), "box-abc123", record)
    done = gpurun("teardown", "box-abc123", "--store", store_url, "--yes", check=False)
    assert done.returncode == 2
    assert "gpu-box.lan" in done.stderr and "tear it down there" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (gpurun_home / "runs").exists() or not list((gpurun_home / "runs").glob("box-abc123*"))
    assert snaps.get_run_record(open_store(store_url), "box-abc123")["state"] == "running"
    done = gpurun("teardown", "box-abc123", "--yes", check=False)
    assert done.returncode == 2 and "unknown run" in done.stderr


def test_an_unreadable_run_record_in_the_store_is_named_and_skipped(tmp_path: Path, gpurun_home: Path) -> None:
    store_url = f"file://{tmp_path / 'store'}"
    store = open_store(store_url)
    good = {"run": "good-abc123", "provider": "aws", "state": "running", "created_at": "2026-11-26T10:00:00Z"}
    snaps.put_run_record(store, "good-abc123", {**good, "store": store_url, "machines": []})
    snaps.put_run_record(store, "thin-abc123", {"run": "thin-abc123", "state": "running"})
    store.put_bytes("torn-abc123/run.json", b'{"run": "torn-abc1')
    seen = gpurun("status", "--store", store_url, "--json", check=False)
    assert seen.returncode == 0, seen.stderr
    assert [r["run"] for r in json.loads(seen.stdout)] == ["good-abc123"]
    assert "thin-abc123/run.json is not a run record" in seen.stderr
    assert "torn-abc123/run.json is not a run record (not valid JSON)" in seen.stderr
    assert "Traceback" not in seen.stderr


def test_a_run_seen_through_the_store_shows_its_newest_snapshot(tmp_path: Path, gpurun_home: Path) -> None:
    store_url = f"file://{tmp_path / 'store'}"
    store = open_store(store_url)
    record = {"run": "far-abc123", "provider": "local", "state": "running", "created_at": "2026-11-26T10:00:00Z"}
    snaps.put_run_record(store, "far-abc123", {**record, "store": store_url, "machines": [], "last_checkpoint": None})
    weights = tmp_path / "weights.bin"
    weights.write_bytes(b"w" * 1000)
    staged = [snaps.StagedFile("weights.bin", 1000, snaps.sha256_file(weights), str(weights))]
    snaps.write_snapshot(store, "far-abc123", staged, previous=None)  # run.json is not rewritten per snapshot
    for args in (["status", "--store", store_url, "--json"], ["status", "far-abc123", "--store", store_url, "--json"]):
        [seen] = gpurun_json(*args)
        assert seen["last_checkpoint"]["seq"] == 1 and seen["last_checkpoint"]["bytes"] == 1000
