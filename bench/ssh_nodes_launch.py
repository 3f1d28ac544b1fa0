"""Launch wall time for 1, 2 and 8 `provider: ssh` nodes (all the same loopback sshd).

    python bench/ssh_nodes_launch.py [--repeat 3]

Sync, agent install and job start run on all nodes in parallel, so the
wall time should grow far slower than the node count. Each launch syncs a
small project (200 files, 2 MB) and starts a job that sleeps; teardown
is not timed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.plugins.sshd import make_sshd  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="gpurun-nodes-bench-"))
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
    for index in range(200):
        path = code / f"pkg{index % 10}" / f"m{index}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(10_000))

    from gpurun.app.launch import launch
    from gpurun.app.teardown import teardown
    from gpurun.spec import validate_spec
    from gpurun.ui import Ui

    ui = Ui()
    ui.say = lambda message: None  # type: ignore[method-assign]
    results = {}
    try:
        for nodes in (1, 2, 8):
            samples = []
            for _ in range(args.repeat):
                spec = validate_spec(
                    {
                        "name": "nodes",
                        "provider": "ssh",
                        "workdir": str(code),
                        "run": "sleep 30",
                        "ssh": {"hosts": ["node"] * nodes},
                        "checkpoint": {"store": f"file://{root / 'store'}", "resume": "never"},
                    },
                    source="bench",
                    spec_dir=root,
                )
                started = time.perf_counter()
                run = launch(spec, ui)["run"]
                samples.append(time.perf_counter() - started)
                teardown(run, ui, final_sync=False)
            results[nodes] = statistics.median(samples)
    finally:
        sshd.stop()
    base = results[1]
    print(f"{'nodes':>5}  {'launch wall':>11}  {'x 1 node':>8}")
    for nodes, seconds in results.items():
        print(f"{nodes:>5}  {seconds:>10.2f}s  {seconds / base:>8.2f}")


if __name__ == "__main__":
    main()
