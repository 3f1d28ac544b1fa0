"""The checkpoint agent: staging while training writes, triggers, and loud failures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from gpurun.agent.staging import Stager
from gpurun.store import open_store
from gpurun.store import snapshots as snaps
from tests.helpers import process_alive, wait_until


def _written_a_while_ago(path: Path) -> None:
    # With settle=0 the stager does not wait; kernels before 6.13 advance mtimes
    # only once per tick, so a rewrite a few ms later could keep the mtime the
    # settle window would otherwise have put in the past.
    then = time.time() - 5
    os.utime(path, (then, then))


def _agent_watching_one_checkpoint(tmp_path: Path):
    """An agent (settle 0) over a checkpoint directory holding weights.bin, written a while ago."""
    from gpurun.agent.loop import Agent, AgentOptions

    watch = tmp_path / "run/work/checkpoints"
    watch.mkdir(parents=True)
    (watch / "weights.bin").write_bytes(b"1" * 200_000)
    _written_a_while_ago(watch / "weights.bin")
    agent = Agent(AgentOptions(watch, f"file://{tmp_path / 'store'}", "r1", every=60, keep=3, run_dir=tmp_path / "run"))
    agent.stager.settle = 0
    return agent, watch


def test_staging_never_takes_a_file_half_written(tmp_path: Path) -> None:
    watch = tmp_path / "ckpt"
    watch.mkdir()
    store = open_store(f"file://{tmp_path / 'store'}")
    stop = threading.Event()

    def writer() -> None:
        # Writes in place, slowly, the way a careless training loop would.
        index = 0
        while not stop.is_set():
            index += 1
            data = bytes([index % 256]) * 300_000
            with open(watch / "weights.bin", "wb") as handle:
                for start in range(0, len(data), 50_000):
                    handle.write(data[start : start + 50_000])
                    handle.flush()
                    time.sleep(0.002)
            time.sleep(0.8)  # the end of an epoch

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    stager = Stager(watch, tmp_path / "staging")
    previous = None
    taken = 0
    try:
        # On a loaded machine the writer thread may not have created the file yet.
        wait_until((watch / "weights.bin").exists, timeout=30, interval=0.01, what="the first write")
        for _ in range(6):
            try:
                staged, _changed = stager.stage(attempts=10)
                info = snaps.write_snapshot(store, "r", staged, previous=previous, before_commit=stager.verify)
            except OSError:
                continue  # "kept changing" or "written in place": the agent retries later
            previous = snaps.read_manifest(store, "r", info["seq"])
            stager.committed(previous)
            restored = tmp_path / f"restored-{info['seq']}"
            snaps.download_snapshot(store, "r", restored, seq=info["seq"])  # verifies every sha256
            content = (restored / "weights.bin").read_bytes()
            assert len(content) == 300_000, "a half-written file was committed"
            assert len(set(content)) == 1
            taken += 1
    finally:
        stop.set()
        thread.join()
    assert taken > 0


def test_a_renamed_checkpoint_is_uploaded_from_a_hard_link_not_copied(tmp_path: Path) -> None:
    watch = tmp_path / "ckpt"
    watch.mkdir()
    (watch / "weights.bin").write_bytes(b"v1" * 50_000)
    stager = Stager(watch, tmp_path / "staging", settle=0)
    staged, _changed = stager.stage()
    held = Path(staged[0].local_path)
    # The same inode as the checkpoint: no second copy of the weights on disk.
    assert held.stat().st_ino == (watch / "weights.bin").stat().st_ino
    # The training loop saves the next epoch by rename; the held inode keeps epoch 1.
    (watch / "weights.bin.tmp").write_bytes(b"v2" * 50_000)
    os.replace(watch / "weights.bin.tmp", watch / "weights.bin")
    store = open_store(f"file://{tmp_path / 'store'}")
    info = snaps.write_snapshot(store, "r", staged, previous=None, before_commit=stager.verify)
    manifest = snaps.read_manifest(store, "r", info["seq"])
    snaps.download_snapshot(store, "r", tmp_path / "restored")
    assert (tmp_path / "restored/weights.bin").read_bytes() == b"v1" * 50_000
    assert manifest["files"][0]["sha256"] == snaps.sha256_file(tmp_path / "restored/weights.bin")


def test_files_written_in_place_during_upload_are_not_committed_and_then_copied(tmp_path: Path) -> None:
    watch = tmp_path / "ckpt"
    watch.mkdir()
    shards = ["shard-0.bin", "shard-1.bin", "shard-2.bin"]
    for name in shards:
        (watch / name).write_bytes(b"a" * 100_000)
        _written_a_while_ago(watch / name)
    store = open_store(f"file://{tmp_path / 'store'}")
    stager = Stager(watch, tmp_path / "staging", settle=0)
    staged, _changed = stager.stage()

    def written_in_place_meanwhile() -> None:
        for name in shards[:2]:  # torch.save(obj, path) and np.save write the same inode like this
            with open(watch / name, "r+b") as handle:
                handle.write(b"b" * 50_000)
        stager.verify()

    with pytest.raises(OSError, match="written in place"):
        snaps.write_snapshot(store, "r", staged, previous=None, before_commit=written_in_place_meanwhile)
    assert snaps.latest(store, "r") is None, "LATEST moved to a snapshot read while it was written"
    stager.discard()
    assert not (tmp_path / "staging").exists(), "the links of an abandoned snapshot stay on disk"
    # From now on both changed paths are copied to staging: a later in-place write cannot reach the upload.
    staged, _changed = stager.stage()
    by_path = {item.path: item for item in staged}
    for name in shards[:2]:
        assert ".links" not in by_path[name].local_path and by_path[name].sha256
        assert Path(by_path[name].local_path).stat().st_ino != (watch / name).stat().st_ino
    assert ".links" in by_path["shard-2.bin"].local_path  # never written in place: still linked
    info = snaps.write_snapshot(store, "r", staged, previous=None, before_commit=stager.verify)
    snaps.download_snapshot(store, "r", tmp_path / "restored", seq=info["seq"])
    assert (tmp_path / "restored/shard-0.bin").read_bytes() == b"b" * 50_000 + b"a" * 50_000
    assert (tmp_path / "restored/shard-2.bin").read_bytes() == b"a" * 100_000


@pytest.mark.parametrize(
    "rewrite",
    [
        pytest.param("same size", id="same-size"),  # np.save into an open file, mmap writes
        pytest.param("new size", id="another-size"),  # torch.save(obj, path) truncates and writes a new size
    ],
)
def test_agent_retries_at_once_as_a_copy_when_a_file_is_written_in_place_during_its_upload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, rewrite: str
) -> None:
    agent, watch = _agent_watching_one_checkpoint(tmp_path)
    new = b"2" * (200_000 if rewrite == "same size" else 250_000)
    uploads = []
    real_put_file = type(agent.store).put_file

    def put_file(store, key, path, **kwargs):  # the training loop rewrites the file in place mid-upload
        uploads.append(path)
        if len(uploads) == 1:
            with open(watch / "weights.bin", "r+b") as handle:
                handle.write(new)
        return real_put_file(store, key, path, **kwargs)

    monkeypatch.setattr(type(agent.store), "put_file", put_file)
    info = agent.sync_once("scheduled")
    # Another size fails the upload's size check before the commit check: the agent still sees why.
    assert info is not None and info["seq"] == 2, "the abandoned snapshot 1 was not followed by snapshot 2 at once"
    assert agent.failures == 0 and agent.status["last_error"] is None
    assert ".links" in uploads[0] and ".links" not in uploads[1]  # linked first, then copied
    assert agent.stager.copied_paths == {"weights.bin"}
    snaps.download_snapshot(agent.store, "r1", tmp_path / "restored")
    assert (tmp_path / "restored/weights.bin").read_bytes() == new
    assert snaps.latest(agent.store, "r1")["seq"] == 2


def test_unchanged_files_are_not_read_again(tmp_path: Path) -> None:
    watch = tmp_path / "ckpt"
    watch.mkdir()
    (watch / "a").write_bytes(b"1" * 10)
    store = open_store(f"file://{tmp_path / 'store'}")
    stager = Stager(watch, tmp_path / "staging")
    staged, changed = stager.stage()
    assert changed and staged[0].local_path
    info = snaps.write_snapshot(store, "r", staged, previous=None, before_commit=stager.verify)
    stager.committed(info["manifest"])
    assert not (tmp_path / "staging").exists(), "links kept after the snapshot landed"
    staged, changed = stager.stage()
    assert not changed and staged[0].local_path is None


def start_agent(tmp_path: Path, store_url: str, *extra: str) -> tuple[subprocess.Popen, Path]:
    run_dir = tmp_path / "run"
    (run_dir / "work/checkpoints").mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gpurun.agent",
            "--watch",
            str(run_dir / "work/checkpoints"),
            "--to",
            store_url,
            "--run",
            "r1",
            "--every",
            "1s",
            "--keep",
            "2",
            "--run-dir",
            str(run_dir),
            *extra,
        ],
        stdout=open(run_dir / "agent.log", "ab"),
        stderr=subprocess.STDOUT,
    )
    return process, run_dir


def agent_status(run_dir: Path) -> dict:
    try:
        return json.loads((run_dir / "agent.status.json").read_text())
    except (OSError, ValueError):
        return {}


def test_agent_snapshots_on_schedule_request_and_job_exit(tmp_path: Path) -> None:
    store_url = f"file://{tmp_path / 'store'}"
    process, run_dir = start_agent(tmp_path, store_url)
    ckpt = run_dir / "work/checkpoints"
    try:
        (ckpt / "w.bin").write_bytes(b"epoch1")
        wait_until(lambda: agent_status(run_dir).get("last_seq") == 1, what="scheduled snapshot")
        (ckpt / "w.bin").write_bytes(b"epoch2")
        (run_dir / "sync.request").write_text("nonce-1")
        wait_until(lambda: agent_status(run_dir).get("handled_request") == "nonce-1", what="requested snapshot")
        assert agent_status(run_dir)["last_seq"] == 2
        (ckpt / "w.bin").write_bytes(b"final")
        (run_dir / "job.exit").write_text("0")
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    store = open_store(store_url)
    out = tmp_path / "restored"
    info = snaps.download_snapshot(store, "r1", out)
    assert (out / "w.bin").read_bytes() == b"final"
    assert agent_status(run_dir)["state"] == "stopped"
    assert [s["seq"] for s in snaps.list_snapshots(store, "r1")][-1] == info["seq"]
    assert len(snaps.list_snapshots(store, "r1")) <= 2  # keep 2


def test_sigterm_takes_a_final_snapshot(tmp_path: Path) -> None:
    store_url = f"file://{tmp_path / 'store'}"
    process, run_dir = start_agent(tmp_path, store_url, "--every", "1h")
    (run_dir / "work/checkpoints/w.bin").write_bytes(b"last words")
    wait_until(lambda: agent_status(run_dir).get("state") == "running", what="agent start")
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=30) == 0
    out = tmp_path / "restored"
    snaps.download_snapshot(open_store(store_url), "r1", out)
    assert (out / "w.bin").read_bytes() == b"last words"


def test_failing_store_is_loud_and_retried(tmp_path: Path) -> None:
    blocked = tmp_path / "blocked"
    blocked.write_text("not a directory")
    process, run_dir = start_agent(tmp_path, f"file://{blocked}/store")
    try:
        (run_dir / "work/checkpoints/w.bin").write_bytes(b"data")
        status = wait_until(
            lambda: agent_status(run_dir).get("failures", 0) >= 2 and agent_status(run_dir), what="failures"
        )
        assert "blocked/store" in status["last_error"] and "Not a directory" in status["last_error"]
        assert process_alive(process.pid), "the agent must keep retrying, not give up"
        assert "FAILED" in (run_dir / "agent.log").read_text()
    finally:
        process.kill()
        process.wait()


@pytest.mark.parametrize("signal_to_send", [signal.SIGKILL])
def test_agent_killed_mid_snapshot_leaves_latest_complete(tmp_path: Path, signal_to_send: int) -> None:
    store_url = f"file://{tmp_path / 'store'}"
    store = open_store(store_url)
    ckpt = tmp_path / "run/work/checkpoints"
    ckpt.mkdir(parents=True)
    for round_number in range(12):
        for index in range(20):
            (ckpt / f"part-{index}.bin").write_bytes(os.urandom(20_000 + round_number))
        process, run_dir = start_agent(tmp_path, store_url, "--every", "0.05s")
        time.sleep(0.05 + 0.03 * (round_number % 5))
        process.send_signal(signal_to_send)
        process.wait()
        pointer = snaps.latest(store, "r1")
        if pointer is not None:
            out = tmp_path / f"restore-{round_number}"
            info = snaps.download_snapshot(store, "r1", out)  # verifies every sha256
            assert info["files"] == 20


def test_agent_stops_when_no_job_ever_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A launch killed between starting the agent and the job must not leave the agent running forever."""
    from gpurun.agent import loop

    monkeypatch.setattr(loop, "JOB_START_GRACE", 0.5)
    run_dir = tmp_path / "run"
    (run_dir / "work/checkpoints").mkdir(parents=True)
    options = loop.AgentOptions(
        watch=run_dir / "work/checkpoints",
        store_url=f"file://{tmp_path / 'store'}",
        run="r1",
        every=3600.0,
        keep=1,
        run_dir=run_dir,
    )
    started = time.monotonic()
    assert loop.run_agent(options) == 0
    assert time.monotonic() - started < 10
    assert agent_status(run_dir)["state"] == "stopped"


def test_whole_second_mtimes_still_reveal_a_rewrite_in_place(tmp_path: Path) -> None:
    # FAT, ext4 with 128-byte inodes and some network mounts keep whole-second
    # mtimes: os.utime below does what such a file system would do on each write.
    watch = tmp_path / "ckpt"
    watch.mkdir()
    checkpoint = watch / "weights.bin"

    def write_on_a_coarse_file_system(data: bytes) -> None:
        with open(checkpoint, "r+b" if checkpoint.exists() else "wb") as handle:
            handle.write(data)
        second = int(time.time())
        os.utime(checkpoint, ns=(second * 10**9, second * 10**9))

    write_on_a_coarse_file_system(b"1" * 100_000)
    written_in = int(checkpoint.stat().st_mtime)
    stager = Stager(watch, tmp_path / "staging", settle=0.5)
    staged, _changed = stager.stage()
    # Not taken while the clock is still in the mtime's span: a write then would keep the same mtime.
    assert time.time() >= written_in + 2
    assert ".links" in staged[0].local_path
    write_on_a_coarse_file_system(b"2" * 100_000)  # same size, the moment after staging
    store = open_store(f"file://{tmp_path / 'store'}")
    with pytest.raises(OSError, match="written in place"):
        snaps.write_snapshot(store, "r", staged, previous=None, before_commit=stager.verify)
    assert snaps.latest(store, "r") is None


def test_a_failed_upload_stops_hashing_its_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gpurun.errors import StoreError

    # A FIFO stands for a big checkpoint: the test decides how much of it there is.
    fifo = tmp_path / "weights.bin"
    os.mkfifo(fifo)
    store = open_store(f"file://{tmp_path / 'store'}")
    hashing_started = threading.Event()

    def put_files(*_args, **_kwargs):
        hashing_started.wait(10)
        raise StoreError("the network went away")

    monkeypatch.setattr(store, "put_files", put_files)
    chunks_taken = []

    def feed() -> None:
        with open(fifo, "wb") as writer:
            hashing_started.set()
            try:
                for index in range(2_000):  # about 2 GB if nobody stops reading
                    writer.write(b"x" * (1 << 20))
                    writer.flush()
                    chunks_taken.append(index)
            except BrokenPipeError:
                pass

    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    staged = [snaps.StagedFile("weights.bin", 2_000 << 20, None, str(fifo))]
    with pytest.raises(StoreError, match="network went away"):
        snaps.write_snapshot(store, "r", staged, previous=None)
    feeder.join(30)
    assert not feeder.is_alive() and len(chunks_taken) < 2_000, "the hash of a failed snapshot kept reading"
