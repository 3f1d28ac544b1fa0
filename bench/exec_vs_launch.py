"""`gpurun exec` of a one-file change vs `gpurun launch` of the same, 1 and 8 `provider: ssh` nodes.

    python bench/exec_vs_launch.py [--repeat 3] [--files 5000]

Every node is the same loopback sshd (tests/plugins/sshd.py), each with its
own run directory. The project is a generated tree of --files files (about
2 KB each, in 50 directories). Both are timed from the call to the moment
every node's job.log holds the job's first output line:

- launch: acquire (ssh checks), sync the whole tree, install or find the
  agent, run setup, start agent and job;
- exec: after one file of the tree changed, sync that file to every node,
  skip setup (unchanged), start agent and job 2.

Each figure is the median of --repeat; teardown is not timed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.plugins.sshd import make_sshd  # noqa: E402

FIRST_LINE = "first output line"


def make_tree(code: Path, files: int) -> None:
    for index in range(files):
        path = code / f"pkg{index % 50:02d}" / f"module{index}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"# generated\n" + os.urandom(1000).hex().encode())


def wait_first_line(run: str, timeout: float = 120) -> None:
    from gpurun import runs

    logs = [Path(machine["run_dir"]) / "job.log" for machine in runs.load(run)["machines"]]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(log.exists() and FIRST_LINE in log.read_text(errors="replace") for log in logs):
            return
        time.sleep(0.005)
    raise SystemExit(f"no first output line from every node of {run} within {timeout}s")


def wait_job_end(run: str, timeout: float = 60) -> None:
    from gpurun import jobs, runs
    from gpurun.transport.local import LocalTransport

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        machines = runs.load(run)["machines"]
        if all(not jobs.read_state(LocalTransport(), m["run_dir"])["job_alive"] for m in machines):
            return
        time.sleep(0.05)
    raise SystemExit(f"the job of {run} did not end within {timeout}s")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--files", type=int, default=5000)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="gpurun-exec-bench-"))
    sshd = make_sshd(root / "sshd")
    os.environ["GPURUN_HOME"] = str(root / "home")
    client = root / "client"
    (client / ".ssh").mkdir(parents=True)
    (client / ".ssh/config").write_text(
        f"Host node\n  HostName {sshd.host}\n  Port {sshd.port}\n  User {sshd.user}\n  IdentityFile {sshd.key_path}\n"
    )
    (client / ".ssh/known_hosts").write_text(sshd.known_hosts_line + "\n")
    os.environ["HOME"] = str(client)
    os.environ["GPURUN_SSH_CONFIG"] = str(client / ".ssh/config")
    code = root / "code"
    make_tree(code, args.files)
    changed = code / "pkg00" / "module0.py"

    from gpurun.app.execute import exec_job
    from gpurun.app.launch import launch
    from gpurun.app.teardown import teardown
    from gpurun.spec import validate_spec
    from gpurun.ui import Ui

    ui = Ui()
    ui.say = lambda message: None  # type: ignore[method-assign]
    results: dict[int, dict[str, float]] = {}
    try:
        for nodes in (1, 8):
            timings: dict[str, list[float]] = {"launch": [], "exec": []}
            for _ in range(args.repeat):
                spec_data: dict[str, Any] = {
                    "name": "iterate",
                    "provider": "ssh",
                    "workdir": str(code),
                    "setup": "echo setting up",
                    "run": f"echo {FIRST_LINE}",
                    "ssh": {"hosts": ["node"] * nodes},
                    "checkpoint": {"store": f"file://{root / 'store'}", "resume": "never", "every": "1h"},
                }
                spec = validate_spec(spec_data, source="bench", spec_dir=root)
                started = time.perf_counter()
                run = launch(spec, ui)["run"]
                wait_first_line(run)
                timings["launch"].append(time.perf_counter() - started)
                wait_job_end(run)
                changed.write_bytes(os.urandom(1000).hex().encode())
                started = time.perf_counter()
                exec_job(run, ui)
                wait_first_line(run)
                timings["exec"].append(time.perf_counter() - started)
                wait_job_end(run)
                teardown(run, ui, final_sync=False)
            results[nodes] = {kind: statistics.median(samples) for kind, samples in timings.items()}
    finally:
        sshd.stop()
    print(f"{args.files} files, median of {args.repeat}; wall time from the call to every node's first output line")
    print(f"{'nodes':>5}  {'launch':>8}  {'exec':>8}  {'exec / launch':>13}")
    for nodes, result in results.items():
        ratio = result["exec"] / result["launch"]
        print(f"{nodes:>5}  {result['launch']:>7.2f}s  {result['exec']:>7.2f}s  {ratio:>13.2f}")


if __name__ == "__main__":
    main()
