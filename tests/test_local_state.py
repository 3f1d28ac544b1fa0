"""The state on this computer when it is damaged: deleted lock files, malformed AWS files,
truncated records of live runs, a full disk."""

from __future__ import annotations

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
    with open("/proc/locks") as handle:
        return sum(1 for line in handle if "->" in line and "FLOCK" in line)


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
