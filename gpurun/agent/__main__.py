"""The checkpoint agent's command line: one parser for `python -m gpurun.agent`, `gpurun agent`
and `gpurun checkpoint-sync --watch`, so the three never drift apart.

It uses argparse, not click: on a machine the agent runs from a virtual
environment that holds gpurun and at most boto3. Bad input is one `error:`
line and exit status 2, as everywhere in gpurun.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

from gpurun.durations import parse_duration
from gpurun.errors import BadInput, GpurunError

PROG = "gpurun agent"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise BadInput(f"{self.prog}: {message}")


def parser() -> argparse.ArgumentParser:
    """Every option of the agent; `gpurun agent --help` prints them."""
    parser = _Parser(
        prog=PROG, description="Snapshot a checkpoint directory into a store on a schedule, or restore one."
    )
    parser.add_argument("--watch", type=Path, metavar="DIR", help="checkpoint directory to snapshot")
    parser.add_argument("--to", dest="store", metavar="URL", help="store URL: s3://bucket/prefix or file:///path")
    parser.add_argument("--run", help="run name, the folder under the store (default: DIR's name)")
    parser.add_argument("--every", default="5m", help="interval: 90s, 5m, 1h (default: 5m)")
    parser.add_argument("--keep", type=int, default=3, help="snapshots to keep (default: 3)")
    parser.add_argument("--run-dir", type=Path, help="the run directory on this machine (status, requests)")
    parser.add_argument("--spot-notice", action="store_true", help="watch for the spot interruption notice")
    parser.add_argument("--once", action="store_true", help="one snapshot, then exit")
    parser.add_argument("--job", type=int, help="ship this job's output (job.log) to <store>/<run>/logs/")
    parser.add_argument("--logs-every", default="5s", help="how often to ship the job's output (default: 5s)")
    parser.add_argument("--region", help="the S3 bucket's region")
    parser.add_argument("--restore-from", metavar="RUN", help="restore this run's snapshot into --into, then exit")
    parser.add_argument("--seq", type=int, help="with --restore-from: which snapshot (default: LATEST)")
    parser.add_argument("--into", type=Path, metavar="DIR", help="with --restore-from: where to restore")
    parser.add_argument("--force", action="store_true", help="with --restore-from: replace a non-empty --into")
    return parser


def _seconds(flag: str, text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as error:
        raise BadInput(f"{flag}: {error}") from None


def main(argv: list[str] | None = None) -> int:
    """Run the agent (or a restore) as `argv` asks; returns the exit status."""
    try:
        args = parser().parse_args(argv)
        if not args.store:
            needs = "--restore-from" if args.restore_from else "--watch"
            raise BadInput(f"{needs} needs --to URL (s3://bucket/prefix or file:///path)")
        if not args.store.startswith(("s3://", "file://")):
            raise BadInput(f"--to {args.store}: use s3://bucket/prefix or file:///absolute/path")
        store_options = {"region": args.region} if args.region and args.store.startswith("s3://") else {}
        if args.restore_from:
            return _restore(args, store_options)
        if args.watch is None:
            raise BadInput("--watch DIR is required (or --restore-from RUN --into DIR)")
        if args.keep < 1:
            raise BadInput(f"--keep {args.keep}: keep at least 1 snapshot")
        every = _seconds("--every", args.every)
        if every <= 0:
            raise BadInput(f"--every {args.every}: give a positive interval, like 5m")
        if every < 10:
            print(
                f"warning: --every {args.every} is shorter than 10s: each snapshot re-reads changed files; "
                "consider 1m or more",
                file=sys.stderr,
            )
        from gpurun.agent.loop import AgentOptions, run_agent

        watch = args.watch.resolve()
        options = AgentOptions(
            watch=watch,
            store_url=args.store,
            run=args.run or watch.name,
            every=every,
            keep=args.keep,
            run_dir=args.run_dir.resolve() if args.run_dir else None,
            spot_notice=args.spot_notice,
            once=args.once,
            store_options=store_options,
            job=args.job if args.job is not None and args.job > 0 else None,
            logs_every=max(_seconds("--logs-every", args.logs_every), 1.0),
        )
        return run_agent(options)
    except GpurunError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code


def _restore(args: argparse.Namespace, store_options: dict[str, str]) -> int:
    from gpurun.store import open_store
    from gpurun.store.snapshots import download_snapshot

    if args.into is None:
        raise BadInput("--restore-from needs --into DIR")
    store = open_store(args.store, **store_options)
    info = download_snapshot(store, args.restore_from, args.into, seq=args.seq, force=args.force)
    print(f"restored snapshot {info['seq']} ({info['files']} files, {info['bytes']} bytes) into {args.into}")
    if info.get("previous"):
        print(f"the previous content of {args.into} is now in {info['previous']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
