"""Jobs' output kept in the store: readable after teardown, from another GPURUN_HOME, and shipped on a spot notice."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpurun.store import open_store
from gpurun.store.logs import read_job_log, stored_jobs
from tests.helpers import gpurun, gpurun_json, wait_until, write_spec


def ended(run: str, number: int) -> bool:
    jobs = gpurun_json("status", run)[0]["jobs"]
    return len(jobs) >= number and jobs[number - 1]["ended_by"] is not None


@pytest.mark.slow
def test_logs_of_every_job_outlive_teardown_and_read_from_another_home(
    sshd, ssh_client_home: Path, tmp_path: Path
) -> None:
    (tmp_path / "code").mkdir()
    store = f"file://{tmp_path / 'store'}"
    spec = write_spec(
        tmp_path,
        "name: kept\nprovider: ssh\nworkdir: code\n"
        "setup: echo preparing the machine\n"
        "run: for i in 1 2 3; do echo job one line $i; done\n"
        "ssh: {hosts: [testbox]}\n"
        f"checkpoint: {{dir: ckpt, every: 1h, store: '{store}', resume: never}}\n",
    )
    run = gpurun_json("launch", str(spec))["run"]
    wait_until(lambda: ended(run, 1), what="job 1")
    gpurun("exec", run, "--follow", "--", "printf 'job two \\033[2J says hi\\n'; exit 3", check=False)
    wait_until(lambda: ended(run, 2), what="job 2")
    gpurun("teardown", run, "--yes")
    assert not (sshd.home / "gpurun" / run).exists(), "the machine's copy is gone"

    first = gpurun("logs", run, "--job", "1").stdout
    assert "preparing the machine" in first and "job one line 3" in first, "setup's output is kept with job 1's"
    second = gpurun("logs", run)
    assert second.stdout.strip().endswith("job two \\x1b[2J says hi"), "control characters are escaped"
    assert gpurun("logs", run, "-f", check=False).returncode == 3, "the recorded exit status of the last job"

    elsewhere = {"GPURUN_HOME": str(tmp_path / "second-home")}
    other = gpurun("logs", run, "--store", store, "--job", "1", env=elsewhere).stdout
    assert "job one line 1\njob one line 2\njob one line 3" in other
    tail = gpurun("logs", run, "--store", store, "--tail", "1", env=elsewhere).stdout
    assert tail.strip() == "job two \\x1b[2J says hi"
    missing = gpurun("logs", run, "--store", store, "--job", "9", env=elsewhere, check=False)
    assert missing.returncode == 2 and "job(s) 1, 2" in missing.stderr


def test_a_failed_setup_shows_its_last_lines_and_keeps_all_of_them(tmp_path: Path, gpurun_home: Path) -> None:
    (tmp_path / "code").mkdir()
    spec = write_spec(
        tmp_path,
        "name: broken\nworkdir: code\n"
        "setup: for i in $(seq 1 50); do echo setup line $i; done; exit 7\nrun: echo never\n",
    )
    done = gpurun("launch", str(spec), check=False)
    assert done.returncode == 1
    error = done.stderr[done.stderr.index("error:") :].splitlines()
    assert "setup failed with exit status 7 (its last 20 lines below)" in error[0]
    assert error[1:21] == [f"  | setup line {i}" for i in range(31, 51)]
    store_url = f"file://{gpurun_home / 'store'}"
    [run] = os.listdir(gpurun_home / "store")
    assert store_url + f"/{run}/logs/job-0001/" in error[0]
    kept = gpurun("logs", run, "--store", store_url).stdout
    assert [line for line in kept.splitlines() if line.startswith("setup line")] == [
        f"setup line {i}" for i in range(1, 51)
    ]


@pytest.mark.slow
def test_a_spot_notice_ships_the_log_tail(fake_imds, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    (run_dir / "work/ckpt").mkdir(parents=True)
    store_url = f"file://{tmp_path / 'store'}"
    job = subprocess.Popen(["sleep", "300"])
    (run_dir / "job.pid").write_text(str(job.pid))
    (run_dir / "job.log").write_text("epoch 1\n")
    agent = subprocess.Popen(
        [sys.executable, "-m", "gpurun.agent", "--watch", str(run_dir / "work/ckpt"), "--to", store_url]
        + ["--run", "spot-1", "--every", "1h", "--run-dir", str(run_dir), "--spot-notice", "--job", "1"]
        + ["--logs-every", "1h"],
        stdout=open(run_dir / "agent.log", "wb"),
        stderr=subprocess.STDOUT,
    )
    store = open_store(store_url)
    try:
        wait_until(lambda: (run_dir / "agent.status.json").exists(), what="agent start")
        with open(run_dir / "job.log", "a") as log:
            log.write("epoch 2: the last line before the notice\n")
        assert stored_jobs(store, "spot-1") == [], "with logs-every 1h nothing is shipped on a schedule yet"
        fake_imds.interrupt()
        wait_until(lambda: stored_jobs(store, "spot-1") == [1], timeout=30, what="the log after the notice")
        data, problems = read_job_log(store, "spot-1", 1)
        assert data == b"epoch 1\nepoch 2: the last line before the notice\n" and problems == []
    finally:
        job.kill()
        agent.kill()
        job.wait()
        agent.wait()


# -- a recovering run's output, machine after machine (what its machines write in the store) -------------

RECOVERING = "rec-a1b2c3"


def _attempts(state: str, machines: list[dict], used: int = 0) -> bytes:
    import json

    return json.dumps(
        {
            "version": 1,
            "run": RECOVERING,
            "max_restarts": 2,
            "restarts_used": used,
            "state": state,
            "machines": machines,
        }
    ).encode()


def _machine(number: int, instance: str, **fields: object) -> dict:
    started = {"job_started_at": "2026-12-04T20:00:00+00:00", "resumed": number > 1}
    return {
        "instance_id": instance,
        "type": "g5.xlarge",
        "zone": "us-east-1b",
        "generation": number,
        **started,
        **fields,
    }


@pytest.mark.slow
def test_follow_of_a_recovering_run_moves_to_the_machine_that_took_over(tmp_path: Path) -> None:
    store_url = f"file://{tmp_path / 'store'}"
    store = open_store(store_url)
    store.put_bytes(f"{RECOVERING}/logs/job-0001/000000.log", b"one\n")
    store.put_bytes(f"{RECOVERING}/attempts.json", _attempts("running", [_machine(1, "i-first")]))
    out, err = tmp_path / "out", tmp_path / "err"
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        follower = subprocess.Popen(
            [sys.executable, "-m", "gpurun", "logs", RECOVERING, "-f", "--store", store_url],
            stdout=stdout,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
        )
    try:
        wait_until(lambda: b"one" in out.read_bytes(), timeout=60, what="the first machine's output")
        # The first machine's last bytes (no newline yet); a second one takes over (its id comes from the store).
        store.put_bytes(f"{RECOVERING}/logs/job-0001/000000.log", b"one\ntwo")
        replaced = _machine(1, "i-first", ended_at="2026-12-04T20:05:00+00:00", why="replaced")
        second = _machine(2, "i-\x1b[2Jsecond")
        store.put_bytes(f"{RECOVERING}/logs/job-0002/000000.log", b"three\n")
        store.put_bytes(f"{RECOVERING}/attempts.json", _attempts("running", [replaced, second], used=1))
        wait_until(lambda: b"three" in out.read_bytes(), timeout=60, what="the second machine's output")
        store.put_bytes(f"{RECOVERING}/logs/job-0002/000000.log", b"three\nfour\n")
        store.put_bytes(f"{RECOVERING}/attempts.json", _attempts("succeeded", [replaced, second], used=1))
        assert follower.wait(60) == 0, err.read_text()
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
    assert out.read_text() == (
        "one\ntwo\n--- machine 2 (i-\\x1b[2Jsecond, g5.xlarge, us-east-1b) took over: resumed from LATEST ---\n"
        "three\nfour\n"
    )
    assert "the job exited with status 0 (1 of 2 restarts used)" in err.read_text()


@pytest.mark.parametrize(
    ("state", "last", "code", "said"),
    [
        ("budget_spent", {"why": "restart budget spent", "exit_code": 3}, 3, "status 3 (no restart left: 2 of 2"),
        ("failed", {"why": "job failed", "exit_code": None}, 137, "without recording an exit status (killed)"),
        ("budget_spent", {"why": "spot interruption", "exit_code": None}, 4, "interrupted (spot reclaim)"),
        ("budget_spent", {}, 5, "machine is gone"),
        (
            "failed",
            {"why": "bootstrap failed: RuntimeError: code missing", "job_started_at": None},
            1,
            "ended before its job started: bootstrap failed: RuntimeError: code missing",
        ),
    ],
)
def test_follow_of_an_ended_recovering_run_exits_with_how_it_ended(
    tmp_path: Path, state: str, last: dict, code: int, said: str
) -> None:
    store_url = f"file://{tmp_path / 'store'}"
    store = open_store(store_url)
    store.put_bytes(f"{RECOVERING}/logs/job-0002/000000.log", b"second machine\n")
    first = _machine(1, "i-first", ended_at="2026-12-04T20:05:00+00:00", why="replaced")
    store.put_bytes(f"{RECOVERING}/attempts.json", _attempts(state, [first, _machine(2, "i-second", **last)], used=2))
    done = gpurun("logs", RECOVERING, "-f", "--store", store_url, check=False)
    assert done.returncode == code, done.stderr
    assert said in done.stderr, done.stderr


def test_follow_of_a_recovering_run_torn_down_ends_with_5(tmp_path: Path) -> None:
    import json

    store_url = f"file://{tmp_path / 'store'}"
    store = open_store(store_url)
    store.put_bytes(f"{RECOVERING}/logs/job-0001/000000.log", b"first machine\n")
    store.put_bytes(f"{RECOVERING}/attempts.json", _attempts("running", [_machine(1, "i-first")]))
    store.put_bytes(f"{RECOVERING}/run.json", json.dumps({"run": RECOVERING, "state": "ended"}).encode())
    done = gpurun("logs", RECOVERING, "-f", "--store", store_url, check=False)
    assert done.returncode == 5 and "torn down while following" in done.stderr, done.stderr
    assert done.stdout == "first machine\n"


@pytest.mark.parametrize("following", [False, True])
def test_a_chunk_that_grows_after_the_listing_is_read_no_further_than_a_chunk(tmp_path: Path, following: bool) -> None:
    """The store is untrusted and may change between the listing and the GET: a chunk replaced by a
    giant after it was listed small costs one chunk's worth of memory, not the giant's."""
    from gpurun.store.file import FileStore
    from gpurun.store.logs import CHUNK_BYTES, chunk_key, read_job_log_from

    class GrowsAfterListing(FileStore):
        def __init__(self, url: str) -> None:
            super().__init__(url)
            self.largest_read = 0

        def list(self, prefix: str):  # type: ignore[no-untyped-def]
            listed = super().list(prefix)
            (self.root / chunk_key("r", 1, 0)).write_bytes(b"x" * (8 * CHUNK_BYTES))  # planted meanwhile
            return listed

        def get_bytes(self, key: str, *, limit: int | None = None) -> bytes | None:
            data = super().get_bytes(key, limit=limit)
            self.largest_read = max(self.largest_read, len(data or b""))
            return data

    root = tmp_path / "store"
    (root / "r" / "logs" / "job-0001").mkdir(parents=True)
    (root / chunk_key("r", 1, 0)).write_bytes(b"epoch 1\n")
    store = GrowsAfterListing(f"file://{root}")
    data = read_job_log_from(store, "r", 1, 0)[0] if following else read_job_log(store, "r", 1)[0]
    assert len(data) <= CHUNK_BYTES
    assert store.largest_read <= CHUNK_BYTES + 1, f"read {store.largest_read} bytes of a planted chunk"


def test_follow_of_a_recovering_run_escapes_and_bounds_the_state_its_store_names(tmp_path: Path) -> None:
    """attempts.json is written by machines (untrusted): a state gpurun does not know is not printed raw."""
    store_url = f"file://{tmp_path / 'store'}"
    store = open_store(store_url)
    planted = "\x1b]0;owned\x07\x1b[2J" + "x" * 5000
    never_started = _machine(1, "i-first", job_started_at=None)
    store.put_bytes(f"{RECOVERING}/attempts.json", _attempts(planted, [never_started]))
    done = gpurun("logs", RECOVERING, "-f", "--store", store_url, check=False)
    assert done.returncode == 1, done.stderr
    assert "the run ended before its job started" in done.stderr
    assert "\x1b" not in done.stderr and "\x07" not in done.stderr
    assert len(done.stderr) < 1000, f"{len(done.stderr)} characters of the store's text"
