"""The state on this computer when it is damaged: deleted lock files, malformed AWS files,
truncated records of live runs, a full disk."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from gpurun import paths, runs
from tests.helpers import REPO, gpurun, wait_until

HOLDER = r"""
import sys
from gpurun import runs
with runs.locked("exp-lock01"):
    print("held", flush=True)
    sys.stdin.readline()
print("released", flush=True)
"""


def _blocked_flock_waiters() -> int:
    """Processes waiting for a flock on anything in the runs directory's file system with its inode
    (/proc/locks: `N: -> FLOCK ADVISORY WRITE PID MAJ:MIN:INODE ...`), whatever gpurun locks there."""
    inodes = {str(os.stat(path).st_ino) for path in [paths.runs_dir(), *paths.runs_dir().iterdir()]}
    with open("/proc/locks") as handle:
        return sum(
            1 for line in handle if "->" in line and "FLOCK" in line and line.split()[6].rsplit(":", 1)[-1] in inodes
        )


def test_a_lock_file_deleted_while_held_lets_no_second_process_in(gpurun_home: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    try:
        assert holder.stdout and holder.stdin
        assert holder.stdout.readline().strip() == "held"
        # Whatever gpurun keeps beside the records to lock them, a clean-up removes it.
        for stray in paths.runs_dir().glob(".*"):
            stray.unlink()
        waiters_before = _blocked_flock_waiters()
        entered = threading.Event()

        def second() -> None:
            with runs.locked("exp-lock01"):
                entered.set()

        thread = threading.Thread(target=second, daemon=True)
        thread.start()
        wait_until(
            lambda: entered.is_set() or _blocked_flock_waiters() > waiters_before,
            timeout=30,
            what="the second locker to enter or to wait",
        )
        assert not entered.is_set(), "a second process got the lock while the first still held it"
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "released"
        wait_until(entered.is_set, timeout=30, what="the second locker to enter after the release")
        thread.join(timeout=30)
    finally:
        holder.kill()
        holder.wait()


MALFORMED = "[default]\naws_access_key_id = AKIAEXAMPLE\naws_secret_access_key wJalrXUtnFEMIsecretEXAMPLE\n"


@pytest.mark.parametrize(
    "command",
    [
        ["launch", str(REPO / "experiments" / "pytorch-spot.yaml"), "--dry-run"],
        ["status", "--store", "s3://some-bucket/gpurun"],
    ],
    ids=["launch-aws", "status-s3-store"],
)
def test_a_malformed_aws_credentials_file_is_one_line_naming_it(
    gpurun_home: Path, monkeypatch: pytest.MonkeyPatch, command: list[str]
) -> None:
    credentials = Path(gpurun_home / "aws-credentials")
    credentials.write_text(MALFORMED)
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    # Nothing may be reached: the file is bad before any request.
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    done = gpurun(*command, check=False)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert f"{credentials} line 3" in lines[0]
    assert "Traceback" not in done.stderr and "wJalr" not in done.stderr
    assert not paths.runs_dir().exists() or not any(paths.runs_dir().glob("*.json"))


LONG_JOB = """\
import json, os, signal, sys, time
checkpoints = os.environ["GPURUN_CHECKPOINT_DIR"]
os.makedirs(checkpoints, exist_ok=True)
with open(os.path.join(checkpoints, "state.json"), "w") as handle:
    json.dump({"epoch": 1}, handle)
print("started", flush=True)
time.sleep(600)
"""


@pytest.mark.parametrize("store_copy", ["good", "none", "planted"], ids=["store-copy", "run-dir-only", "planted-copy"])
def test_teardown_force_stops_the_live_job_of_a_truncated_record(
    tmp_path: Path, gpurun_home: Path, store_copy: str
) -> None:
    import json
    import shutil

    from tests.helpers import gpurun_json, process_alive

    code = tmp_path / "code"
    code.mkdir()
    (code / "job.py").write_text(LONG_JOB)
    spec = tmp_path / "experiment.yaml"
    spec.write_text(
        f"name: damaged\nworkdir: code\nrun: {sys.executable} job.py\ncheckpoint: {{dir: ckpt, every: 1s, resume: never}}\n"
    )
    run = gpurun_json("launch", str(spec))["run"]
    run_dir = paths.local_runs_dir() / run
    job_pid = int((run_dir / "job.pid").read_text())
    agent_pid = int((run_dir / "agent.pid").read_text())
    record_file = paths.runs_dir() / f"{run}.json"
    data = record_file.read_bytes()
    record_file.write_bytes(data[: len(data) // 3])  # cut short, as a full disk or a crash leaves it
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("not gpurun's\n")
    if store_copy == "none":
        shutil.rmtree(gpurun_home / "store" / run)
    elif store_copy == "planted":
        # The store is untrusted: a copy steering teardown's `rm -rf` elsewhere is not used.
        stored = gpurun_home / "store" / run / "run.json"
        planted = json.loads(stored.read_text())
        planted["machines"][0]["run_dir"] = str(victim)
        stored.write_text(json.dumps(planted))

    refused = gpurun("teardown", run, "--yes", check=False)
    assert refused.returncode == 1 and "--force" in refused.stderr and process_alive(job_pid)

    done = gpurun("teardown", run, "--yes", "--force", "--json", check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["runs"][0]["run"] == run
    wait_until(lambda: not process_alive(job_pid), timeout=30, what="the job to stop")
    wait_until(lambda: not process_alive(agent_pid), timeout=30, what="the agent to stop")
    warning = [line for line in done.stderr.splitlines() if "was damaged" in line]
    assert len(warning) == 1 and "not recovered:" in warning[0]
    if store_copy == "good":
        assert "run.json" in warning[0] and "changes since launch" in warning[0]
    else:
        assert str(run_dir) in warning[0] and "the spec" in warning[0] and "the job history" in warning[0]
    if store_copy == "planted":
        assert "not one gpurun makes for it; not used" in done.stderr
    assert (victim / "precious.txt").read_text() == "not gpurun's\n"
    assert [p.name for p in paths.runs_dir().glob(f"{run}.json.damaged-*")], "the damaged record is kept aside"
    assert not run_dir.exists()
    assert gpurun_json("status", run)[0]["state"] == "ended"


FILL_AND_RUN = r"""
set -e
runs="$1"; saved="$2"; shift 2
cp -a "$runs" "$saved"
mount -t tmpfs -o size=64k,mode=0700 tmpfs "$runs"
cp -a "$saved"/. "$runs"/
dd if=/dev/zero of="$runs/.filler" bs=1k 2>/dev/null || true
exec "$@"
"""


def _can_mount_tmpfs() -> bool:
    """A user and mount namespace where this user may mount a small tmpfs (a real full file system)."""
    import shutil

    if not shutil.which("unshare"):
        return False
    probe = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", "mount -t tmpfs -o size=8k tmpfs /mnt"],
        capture_output=True,
    )
    return probe.returncode == 0


def _on_a_full_disk(how: str, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """`gpurun ARGS` with the records' directory on a full file system.

    tmpfs: a 64 KiB tmpfs over $GPURUN_HOME/runs in a private mount namespace, filled up
    (ENOSPC, as a real full disk). rlimit: where no namespace may be made, RLIMIT_FSIZE=0
    fails every write of a byte (EFBIG, SIGXFSZ ignored) in the gpurun process.
    """
    command = [sys.executable, "-m", "gpurun", *args]
    if how == "tmpfs":
        command = [
            "unshare",
            "--user",
            "--map-root-user",
            "--mount",
            "sh",
            "-c",
            FILL_AND_RUN,
            "fill",
            str(paths.runs_dir()),
            str(tmp_path / "runs-before"),
            *command,
        ]
        return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO)

    def limited() -> None:
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))

    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO, preexec_fn=limited)


@pytest.mark.parametrize("how", ["tmpfs", "rlimit"])
def test_status_works_on_a_full_disk_and_launch_names_the_full_path(
    how: str, tmp_path: Path, gpurun_home: Path
) -> None:
    import json

    from tests.helpers import gpurun_json

    if how == "tmpfs" and not _can_mount_tmpfs():
        reason = "no user+mount namespace here to mount a small tmpfs"
        if os.environ.get("CI"):
            # CI runs as root on a machine that has them: a skip there would hide a real full-disk check.
            pytest.fail(f"{reason}; CI must run the real full-disk case")
        pytest.skip(f"{reason}; the rlimit case covers the write path")
    code = tmp_path / "code"
    code.mkdir()
    spec = tmp_path / "experiment.yaml"
    spec.write_text("name: fulldisk\nworkdir: code\nrun: echo done\ncheckpoint: {resume: never}\n")
    run = gpurun_json("launch", str(spec))["run"]
    # The job ends; no status has read it yet, so the record still says running: status wants to write.
    wait_until(lambda: (paths.local_runs_dir() / run / "job.exit").exists(), what="the job to end")
    assert json.loads((paths.runs_dir() / f"{run}.json").read_text())["state"] == "running"

    status = _on_a_full_disk(how, tmp_path, "status", "--json")
    assert status.returncode == 0, status.stderr
    [shown] = json.loads(status.stdout)
    assert (shown["run"], shown["state"], shown["exit_code"]) == (run, "succeeded", 0)
    assert "Traceback" not in status.stderr

    launch = _on_a_full_disk(how, tmp_path, "launch", str(spec))
    assert launch.returncode == 1, launch.stderr
    [error] = [line for line in launch.stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in launch.stderr
    if how == "tmpfs":
        assert f"cannot write {paths.runs_dir()}/" in error and "no space left on the device" in error, error
    else:
        assert "cannot write" in error and "file too large" in error, error
    gpurun("teardown", run, "--yes")


def test_teardown_force_stops_the_ssh_job_of_a_truncated_record(
    sshd, ssh_client_home: Path, tmp_path: Path, gpurun_home: Path
) -> None:
    """Over the real sshd: the store's copy names the host; the job there is found and stopped."""
    from tests.helpers import gpurun_json, process_alive

    code = tmp_path / "code"
    code.mkdir()
    (code / "job.py").write_text(LONG_JOB)
    spec = tmp_path / "experiment.yaml"
    spec.write_text(
        f"name: damaged\nprovider: ssh\nworkdir: code\nrun: {sys.executable} job.py\nssh: {{hosts: [testbox]}}\n"
        "checkpoint: {dir: ckpt, every: 1s, resume: never}\n"
    )
    run = gpurun_json("launch", str(spec))["run"]
    run_dir = sshd.home / "gpurun" / run
    job_pid = int((run_dir / "job.pid").read_text())
    record_file = paths.runs_dir() / f"{run}.json"
    record_file.write_bytes(record_file.read_bytes()[:200])

    done = gpurun("teardown", run, "--yes", "--force", check=False)
    assert done.returncode == 0, done.stderr
    assert "was damaged" in done.stderr and "not recovered:" in done.stderr
    wait_until(lambda: not process_alive(job_pid), timeout=30, what="the job on the ssh host to stop")
    assert not run_dir.exists()
    assert gpurun_json("status", run)[0]["state"] == "ended"


@pytest.mark.parametrize(
    "provider, hint",
    [
        ("aws", "`gpurun teardown --orphans` finds its AWS resources by their gpurun:run tag"),
        (None, "`gpurun teardown --orphans` finds its AWS resources by their gpurun:run tag"),
        ("ssh", "stop its job on the machine by hand"),
        ("local", "stop its job on the machine by hand"),
    ],
    ids=["aws", "no-provider-left", "ssh", "local-without-run-dir"],
)
def test_teardown_force_of_a_damaged_record_without_any_copy_says_where_to_look(
    gpurun_home: Path, tmp_path: Path, provider: str | None, hint: str
) -> None:
    """Nothing to recover from (no store copy, no run directory): the error says how to find what the run left."""
    run = "gone-abc123"
    empty_store = tmp_path / "empty-store"
    empty_store.mkdir()
    fields = {"run": run, "store": f"file://{empty_store}"} | ({"provider": provider} if provider else {})
    text = "{\n" + ",\n".join(f' "{key}": "{value}"' for key, value in fields.items()) + ',\n "machines": [{"ra'
    paths.runs_dir().mkdir(parents=True, exist_ok=True)
    (paths.runs_dir() / f"{run}.json").write_text(text)

    done = gpurun("teardown", run, "--yes", "--force", check=False)
    assert done.returncode == 1, done.stderr
    assert "is damaged" in done.stderr and hint in done.stderr and "Traceback" not in done.stderr
    assert (paths.runs_dir() / f"{run}.json").read_text() == text  # nothing recovered, nothing moved
