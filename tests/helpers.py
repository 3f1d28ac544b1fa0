"""Small helpers the tests share."""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent


def gpurun(
    *args: str, check: bool = True, timeout: float = 120, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run the real CLI in a child process, as a user would."""
    done = subprocess.run(
        [sys.executable, "-m", "gpurun", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    if check and done.returncode != 0:
        raise AssertionError(f"gpurun {' '.join(args)} exited {done.returncode}\n{done.stdout}\n{done.stderr}")
    return done


def gpurun_json(*args: str) -> Any:
    return json.loads(gpurun(*args, "--json").stdout)


def wait_until(
    predicate: Callable[[], Any], timeout: float = 60, interval: float = 0.2, what: str = "condition"
) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def process_alive(pid: int) -> bool:
    """True unless gone or a zombie (PID 1 here reaps slowly)."""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("State:"):
                    return line.split()[1] != "Z"
    except OSError:
        return False
    return False


def live_processes(matches: Callable[[bytes, list[bytes]], Any]) -> list[int]:
    """PIDs of live processes (not this one) for which matches(command line, environment entries) holds."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                cmdline = handle.read().replace(b"\0", b" ")
            with open(f"/proc/{entry}/environ", "rb") as handle:
                environ = handle.read().split(b"\0")
        except OSError:
            continue
        if matches(cmdline, environ) and process_alive(int(entry)):
            found.append(int(entry))
    return found


def write_spec(directory: Path, text: str, name: str = "experiment.yaml") -> Path:
    path = directory / name
    path.write_text(text)
    return path


def isolate(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh state directory and no real AWS, through `monkeypatch` (also what a class-scoped
    fixture that sets up one scenario for several tests builds its world with)."""
    home = tmp_path_factory.mktemp("gpurun-home")
    monkeypatch.setenv("GPURUN_HOME", str(home))
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(home / "aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(home / "aws-credentials"))
    monkeypatch.setenv("NO_COLOR", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return home


def cli_captured(*args: str) -> tuple[int, str, str]:
    """The CLI in this process, for a fixture wider than one test (which has no capsys):
    (exit status, stdout, stderr)."""
    from gpurun.cli import main

    out_bytes, err_bytes = io.BytesIO(), io.BytesIO()
    out, err = io.TextIOWrapper(out_bytes, encoding="utf-8"), io.TextIOWrapper(err_bytes, encoding="utf-8")
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exited:
        main(list(args))
    out.flush()
    err.flush()
    return exited.value.code, out_bytes.getvalue().decode(), err_bytes.getvalue().decode()
