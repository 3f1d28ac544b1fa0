"""`python -m gpurun.agent`: the agent's own entry point (no click, no pydantic).

`gpurun checkpoint-sync --watch` calls the same code.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gpurun.durations import parse_duration


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpurun.agent")
    parser.add_argument("--watch", type=Path, help="checkpoint directory to snapshot")
    parser.add_argument("--to", dest="store", required=True, help="store URL")
    parser.add_argument("--run", help="run name (the store prefix)")
    parser.add_argument("--every", type=_duration, default=300.0)
    parser.add_argument("--keep", type=int, default=3)
    parser.add_argument("--run-dir", type=Path)
    parser.add_argument("--spot-notice", action="store_true")
    parser.add_argument("--once", action="store_true")
    parser.add_argument("--job", type=int, help="ship this job's output (job.log) to <store>/<run>/logs/")
    parser.add_argument("--logs-every", type=_duration, default=5.0, help="how often to ship the job's output")
    parser.add_argument("--region")
    parser.add_argument("--restore-from", help="restore this run's snapshot into --into, then exit")
    parser.add_argument("--seq", type=int)
    parser.add_argument("--into", type=Path)
    parser.add_argument("--force", action="store_true", help="with --restore-from: replace a non-empty --into")
    args = parser.parse_args(argv)
    store_options = {"region": args.region} if args.region and args.store.startswith("s3://") else {}

    from gpurun.errors import GpurunError

    try:
        if args.restore_from:
            from gpurun.store import open_store
            from gpurun.store.snapshots import download_snapshot

            store = open_store(args.store, **store_options)
            if args.into is None:
                parser.error("--restore-from needs --into DIR")
            info = download_snapshot(store, args.restore_from, args.into, seq=args.seq, force=args.force)
            print(f"restored snapshot {info['seq']} ({info['files']} files, {info['bytes']} bytes) into {args.into}")
            if info.get("previous"):
                print(f"the previous content of {args.into} is now in {info['previous']}")
            return 0
        if args.watch is None or args.run is None:
            parser.error("--watch and --run are required")
        if args.keep < 1:
            parser.error("--keep must be at least 1")
        from gpurun.agent.loop import AgentOptions, run_agent

        options = AgentOptions(
            watch=args.watch.resolve(),
            store_url=args.store,
            run=args.run,
            every=args.every,
            keep=args.keep,
            run_dir=args.run_dir.resolve() if args.run_dir else None,
            spot_notice=args.spot_notice,
            once=args.once,
            store_options=store_options,
            job=args.job if args.job is not None and args.job > 0 else None,
            logs_every=max(args.logs_every, 1.0),
        )
        return run_agent(options)
    except GpurunError as error:
        print(f"error: {error}", file=sys.stderr)
        return error.exit_code


if __name__ == "__main__":
    sys.exit(main())
