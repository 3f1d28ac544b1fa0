"""A store cannot steer gpurun: what it holds is read, checked, and never decides where gpurun writes.

Planted records, names, pointers and file names go through the real CLI against
moto's server (S3) or a file:// store, and the tests check what lands where.
"""

from __future__ import annotations

import json
from pathlib import Path

from gpurun.store import open_store
from gpurun.store import snapshots as snaps
from tests.helpers import gpurun

ACCOUNT = "123456789012"  # moto's


def aws_record(run: str, store: str) -> dict:
    """What a launching computer writes for an AWS run with no machine left."""
    return {
        "run": run,
        "provider": "aws",
        "state": "running",
        "created_at": "2026-11-26T10:00:00+00:00",
        "store": store,
        "machines": [],
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
        snaps.put_run_record(open_store(s3_bucket), run, aws_record(run, planted))
        done = gpurun("teardown", run, "--store", s3_bucket, "--yes", check=False)
        assert done.returncode == 0, done.stderr
        written = json.loads(s3.get_object(Bucket=bucket, Key=f"ckpt/{run}/run.json")["Body"].read())
        assert written["state"] == "ended" and written["run"] == run
        assert list(victim_dir.rglob("*")) == []
        assert "Contents" not in s3.list_objects_v2(Bucket="victim-bucket")
        # The record kept here names the store it came from: a later command writes there too.
        kept = json.loads((gpurun_home / "runs" / f"{run}.json").read_text())
        assert kept["store"] == s3_bucket
        assert gpurun("teardown", run, "--yes", check=False).returncode == 0
        assert list(victim_dir.rglob("*")) == [] and "Contents" not in s3.list_objects_v2(Bucket="victim-bucket")


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
