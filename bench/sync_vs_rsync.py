"""Code sync over SSH: gpurun's `sync_tree` vs `rsync -a -e ssh` and `scp`, one loopback sshd.

    python bench/sync_vs_rsync.py [--repeat 5] [--files 5000] [--tree-mb 30] [--big-mb 100] [--dir /dev/shm]

--dir puts the trees and the sshd's HOME there (tmpfs keeps other work's
disk writeback out of the timings); the default is the temp directory.

One real OpenSSH sshd (tests/plugins/sshd.py: its own host key and client
key) serves every tool in the same run. Each step is the median of --repeat
runs, gpurun and the reference tool interleaved:

1. cold: a generated tree (nested dirs, mixed file sizes) into an empty
   target, a fresh target each run. gpurun = `sync_tree` over a new
   `SshTransport` (scan, connect, read manifest, one tar stream, write
   manifest, close). "incl. connect" times all of it, which is what rsync
   pays (it starts its own ssh); "excl. connect" opens the connection first.
2. re-sync with nothing changed (same targets, already in sync); time and
   payload bytes each way, as in 3.
3. re-sync after changing 10 files (new contents, same sizes, new mtimes):
   time and payload bytes each way (gpurun: bytes written to remote
   commands' stdin / read from their output; rsync: "Total bytes sent" /
   "Total bytes received" of --stats). Neither counts SSH framing.
4. one big file into an empty target: `sync_tree` of a one-file tree vs `scp`.

gpurun runs in this process, with paramiko already imported; the one-off
import cost is printed for scale. rsync and scp use the system ssh with its
default cipher; gpurun's transport prefers AES-GCM. After each step the target
trees are compared with the source (relative path, size, mtime, content
hash) outside the timings.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

_import_started = time.perf_counter()
import paramiko  # noqa: E402,F401

PARAMIKO_IMPORT_S = time.perf_counter() - _import_started

from gpurun.sync.push import sync_tree  # noqa: E402
from gpurun.transport.base import CommandResult, Transport  # noqa: E402
from gpurun.transport.ssh import SshTransport  # noqa: E402
from tests.plugins.sshd import Sshd, make_sshd  # noqa: E402

# ---- the tree ------------------------------------------------------------------------


def make_tree(root: Path, files: int, total_bytes: int, seed: int = 0) -> list[Path]:
    """`files` files under nested directories, sizes mixed (mostly small, a few large), `total_bytes` in all."""
    rng = random.Random(seed)
    dirs = [Path("")]
    for top in range(12):
        top_dir = Path(f"pkg{top:02d}")
        dirs.append(top_dir)
        for sub in range(rng.randint(3, 7)):
            sub_dir = top_dir / f"mod{sub}"
            dirs.append(sub_dir)
            for leaf in range(rng.randint(0, 5)):
                dirs.append(sub_dir / f"part{leaf}" / ("deep" if leaf % 2 else ""))
    weights = []
    for _ in range(files):
        roll = rng.random()
        if roll < 0.80:
            weights.append(rng.uniform(0.05, 1.0))  # source files
        elif roll < 0.97:
            weights.append(rng.uniform(2.0, 12.0))  # bigger modules, notebooks, configs
        else:
            weights.append(rng.uniform(20.0, 80.0))  # small data files, images
    scale = total_bytes / sum(weights)
    sizes = [max(1, int(weight * scale)) for weight in weights]
    sizes[-1] += total_bytes - sum(sizes)
    paths = []
    blob = rng.randbytes(max(sizes) + 4096)
    for index, size in enumerate(sizes):
        directory = rng.choice(dirs)
        suffix = rng.choice((".py", ".py", ".py", ".yaml", ".json", ".txt", ".ipynb", ".bin"))
        relative = directory / f"f{index:05d}{suffix}"
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        offset = rng.randrange(4096)
        path.write_bytes(blob[offset : offset + size])
        paths.append(relative)
    return paths


def tree_digest(root: Path) -> dict[str, tuple[int, int, str]]:
    """relative path -> (size, mtime in whole seconds, sha1) of every regular file."""
    found = {}
    for directory, _dirs, names in os.walk(root):
        for name in names:
            path = Path(directory) / name
            info = path.lstat()
            relative = path.relative_to(root).as_posix()
            found[relative] = (info.st_size, int(info.st_mtime), hashlib.sha1(path.read_bytes()).hexdigest())
    return found


def check_same(source: Path, target: Path, what: str) -> None:
    want, got = tree_digest(source), tree_digest(target)
    if want != got:
        missing = sorted(set(want) - set(got))[:3]
        extra = sorted(set(got) - set(want))[:3]
        differ = sorted(name for name in set(want) & set(got) if want[name] != got[name])[:3]
        raise SystemExit(f"{what}: target differs from source (missing {missing}, extra {extra}, differ {differ})")


# ---- the tools -----------------------------------------------------------------------


class Counting(Transport):
    """Delegates to a transport and counts the bytes handed to remote commands' stdin."""

    def __init__(self, inner: SshTransport) -> None:
        self.inner = inner
        self.label = inner.label
        self.sent = 0
        self.received = 0
        self.commands = 0

    def run(self, command: str, *, input: bytes | None = None, timeout: float | None = None) -> CommandResult:
        self.commands += 1
        self.sent += len(input or b"")
        result = self.inner.run(command, input=input, timeout=timeout)
        self.received += len(result.stdout) + len(result.stderr)
        return result

    def stream(self, command: str, on_output: Callable[[bytes], None], *, timeout: float | None = None) -> int:
        self.commands += 1
        return self.inner.stream(command, on_output, timeout=timeout)

    def send(self, command: str, chunks: Iterable[bytes], *, timeout: float | None = None) -> CommandResult:
        self.commands += 1

        def counted() -> Iterable[bytes]:
            for chunk in chunks:
                self.sent += len(chunk)
                yield chunk

        result = self.inner.send(command, counted(), timeout=timeout)
        self.received += len(result.stdout) + len(result.stderr)
        return result

    def close(self) -> None:
        self.inner.close()


def transport_for(server: Sshd) -> SshTransport:
    return SshTransport(
        server.host,
        port=server.port,
        user=server.user,
        key_filename=server.key_path,
        pinned_keys=[server.host_key_line],
    )


def gpurun_sync(server: Sshd, source: Path, target: Path, *, connect_first: bool) -> tuple[float, float, int, int]:
    """(seconds incl. connect, seconds excl. connect, (payload bytes sent, received), remote commands)."""
    started = time.perf_counter()
    transport = Counting(transport_for(server))
    try:
        if connect_first:
            transport.inner.connect()
        connected = time.perf_counter()
        sync_tree(transport, source, str(target), f"{target}.manifest.json")
        done = time.perf_counter()
    finally:
        transport.close()
    return done - started, done - connected, (transport.sent, transport.received), transport.commands


def ssh_options(server: Sshd) -> list[str]:
    known = server.directory / "client_known_hosts"
    known.write_text(server.known_hosts_line + "\n")
    return [
        "-F", "/dev/null", "-i", server.key_path,
        "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={known}", "-o", "BatchMode=yes",
    ]  # fmt: skip


def rsync(server: Sshd, source: Path, target: Path) -> tuple[float, int]:
    """(seconds, ("Total bytes sent", "Total bytes received"))."""
    ssh = " ".join(["ssh", "-p", str(server.port), *ssh_options(server)])
    argv = ["rsync", "-a", "--stats", "-e", ssh, f"{source}/", f"{server.user}@{server.host}:{target}/"]
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"rsync failed: {done.stderr.strip()}")
    counts = {"sent": 0, "received": 0}
    for line in done.stdout.splitlines():
        for name in counts:
            if line.startswith(f"Total bytes {name}:"):
                counts[name] = int(line.split(":")[1].strip().replace(",", ""))
    return elapsed, (counts["sent"], counts["received"])


def scp(server: Sshd, source: Path, target: Path) -> float:
    argv = [
        "scp",
        "-q",
        "-P",
        str(server.port),
        *ssh_options(server),
        str(source),
        f"{server.user}@{server.host}:{target}",
    ]
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"scp failed: {done.stderr.strip()}")
    return elapsed


# ---- the run -------------------------------------------------------------------------


def change_files(source: Path, paths: list[Path], count: int, rng: random.Random) -> None:
    for relative in rng.sample(paths, count):
        path = source / relative
        size = path.stat().st_size
        path.write_bytes(rng.randbytes(size))
        later = time.time_ns() + rng.randrange(1, 10**9)
        os.utime(path, ns=(later, later))


def spread(values: list[float]) -> str:
    """ "median s (min-max)"."""
    return f"{statistics.median(values):.3f} s ({min(values):.2f}-{max(values):.2f})"


def ratio(values: list[float], reference: list[float], target: str = "") -> str:
    value = statistics.median(values) / statistics.median(reference)
    return f"{value:.2f}" + (f" (target {target})" if target else "")


def traffic(counts: list[tuple[int, int]]) -> str:
    """Median payload bytes "sent / received"."""
    sent = int(statistics.median(count[0] for count in counts))
    received = int(statistics.median(count[1] for count in counts))
    return f"{sent:,} B sent / {received:,} B received"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--tree-mb", type=float, default=30.0)
    parser.add_argument("--big-mb", type=float, default=100.0)
    parser.add_argument("--changed", type=int, default=10)
    parser.add_argument("--dir", help="where the trees and the sshd's HOME go (default: the temp dir; /dev/shm: tmpfs)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="gpurun-bench-sync-", dir=args.dir))
    server = make_sshd(work / "sshd")
    rows: list[tuple[str, str, str, str]] = []
    try:
        source = work / "src"
        paths = make_tree(source, args.files, int(args.tree_mb * 1e6))
        total_mb = sum((source / p).stat().st_size for p in paths) / 1e6
        remote = server.home / "bench"
        remote.mkdir()
        rng = random.Random(1)

        # 1. cold, into empty targets (the last pair stays for the re-syncs)
        incl, excl, ref = [], [], []
        g_target = r_target = remote
        for run in range(args.repeat):
            g_target = remote / f"g-cold-{run}"
            incl.append(gpurun_sync(server, source, g_target, connect_first=False)[0])
            excl.append(gpurun_sync(server, source, remote / f"g-cold-x-{run}", connect_first=True)[1])
            r_target = remote / f"r-cold-{run}"
            ref.append(rsync(server, source, r_target)[0])
        check_same(source, g_target, "gpurun cold")
        check_same(source, r_target, "rsync cold")
        step = f"cold: {len(paths):,} files / {total_mb:.0f} MB, empty target"
        rows.append((step, "rsync -a -e ssh", spread(ref), "1.00"))
        rows.append(("", "gpurun incl. connect", spread(incl), ratio(incl, ref, "<= 0.70")))
        rows.append(("", "gpurun excl. connect", spread(excl), ratio(excl, ref)))

        # 2. nothing changed
        incl, excl, ref, sent_g, sent_r = [], [], [], [], []
        for _run in range(args.repeat):
            seconds, _excl, sent, commands = gpurun_sync(server, source, g_target, connect_first=False)
            incl.append(seconds)
            sent_g.append(sent)
            excl.append(gpurun_sync(server, source, g_target, connect_first=True)[1])
            seconds, sent = rsync(server, source, r_target)
            ref.append(seconds)
            sent_r.append(sent)
        print(f"gpurun, nothing changed: {commands} remote command(s)", flush=True)
        rows.append(("re-sync, nothing changed", "rsync -a -e ssh", f"{spread(ref)}; {traffic(sent_r)}", "1.00"))
        rows.append(("", "gpurun incl. connect", f"{spread(incl)}; {traffic(sent_g)}", ratio(incl, ref, "<= 1.00")))
        rows.append(("", "gpurun excl. connect", spread(excl), ratio(excl, ref)))

        # 3. a few files changed
        incl, ref, sent_g, sent_r = [], [], [], []
        for _run in range(args.repeat):
            change_files(source, paths, args.changed, rng)
            seconds, _excl, sent, commands = gpurun_sync(server, source, g_target, connect_first=False)
            incl.append(seconds)
            sent_g.append(sent)
            seconds, sent = rsync(server, source, r_target)
            ref.append(seconds)
            sent_r.append(sent)
        print(f"gpurun, {args.changed} files changed: {commands} remote command(s)", flush=True)
        check_same(source, g_target, "gpurun re-sync")
        check_same(source, r_target, "rsync re-sync")
        step = f"re-sync, {args.changed} files changed"
        rows.append((step, "rsync -a -e ssh", f"{spread(ref)}; {traffic(sent_r)}", "1.00"))
        rows.append(("", "gpurun incl. connect", f"{spread(incl)}; {traffic(sent_g)}", ratio(incl, ref)))

        # 4. one big file
        big_source = work / "big"
        big_source.mkdir()
        size = int(args.big_mb * 1e6)
        with open(big_source / "model.bin", "wb") as handle:
            for offset in range(0, size, 1 << 20):
                handle.write(rng.randbytes(min(1 << 20, size - offset)))
        incl, excl, ref = [], [], []
        for run in range(args.repeat):
            names = (f"g-big-{run}", f"g-big-x-{run}", f"s-big-{run}")
            incl.append(gpurun_sync(server, big_source, remote / names[0], connect_first=False)[0])
            excl.append(gpurun_sync(server, big_source, remote / names[1], connect_first=True)[1])
            (remote / names[2]).mkdir()
            ref.append(scp(server, big_source / "model.bin", remote / names[2] / "model.bin"))
            check_same(big_source, remote / names[0], "gpurun big file")
            for name in names:
                shutil.rmtree(remote / name)
        mb = size / 1e6

        def rate(values: list[float]) -> str:
            return f"{statistics.median(values):.3f} s = {mb / statistics.median(values):.0f} MB/s"

        def throughput(values: list[float], target: str = "") -> str:
            value = statistics.median(ref) / statistics.median(values)
            return f"{value:.2f}" + (f" (target {target})" if target else "")

        rows.append((f"one {mb:.0f} MB file (throughput)", "scp", rate(ref), "1.00"))
        rows.append(("", "gpurun incl. connect", rate(incl), throughput(incl, ">= 0.90")))
        rows.append(("", "gpurun excl. connect", rate(excl), throughput(excl)))
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)

    print()
    print(
        f"median of {args.repeat} (min-max); {os.cpu_count()} CPUs; load average {os.getloadavg()[0]:.1f}; "
        f"files under {args.dir or tempfile.gettempdir()}; paramiko import (once, not timed) {PARAMIKO_IMPORT_S:.3f} s"
    )
    print()
    print("| step | tool | time | ratio to reference |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
