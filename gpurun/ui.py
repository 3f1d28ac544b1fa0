"""Output for people and for scripts.

Messages go to stderr; tables and JSON go to stdout. rich is used in a
terminal, plain text when piped, and NO_COLOR is honoured (rich reads it).
rich is imported only when something is shown, to keep start-up fast.
"""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from gpurun.sizes import human_bytes  # noqa: F401  (ui's callers format sizes with it)
from gpurun.text import printable as printable  # the one escaping function; every output below uses it

if TYPE_CHECKING:
    from rich.console import Console


class Ui:
    def __init__(self, *, json_mode: bool = False, debug: bool = False) -> None:
        self.json_mode = json_mode
        self.debug = debug
        self.interactive = sys.stderr.isatty()
        self._err: Console | None = None
        self._out: Console | None = None

    # rich consoles, created on first use
    @property
    def err(self) -> Console:
        if self._err is None:
            from rich.console import Console

            self._err = Console(stderr=True, highlight=False, soft_wrap=True)
        return self._err

    @property
    def out(self) -> Console:
        if self._out is None:
            from rich.console import Console

            self._out = Console(highlight=False, soft_wrap=True)
        return self._out

    def say(self, message: str) -> None:
        message = printable(message)
        if self.interactive:
            self.err.print(message, markup=False)
        else:
            print(message, file=sys.stderr, flush=True)

    def warn(self, message: str) -> None:
        message = printable(message)
        if self.interactive:
            self.err.print(f"[yellow]warning:[/] {_escape(message)}")
        else:
            print(f"warning: {message}", file=sys.stderr, flush=True)

    def error(self, message: str) -> None:
        message = printable(message)
        if self.interactive:
            self.err.print(f"[red]error:[/] {_escape(message)}")
        else:
            print(f"error: {message}", file=sys.stderr, flush=True)

    def result(self, message: str) -> None:
        """A line of the command's answer (stdout), suppressed in --json mode."""
        if self.json_mode:
            return
        print(printable(message), flush=True)

    def emit_json(self, data: Any) -> None:
        sys.stdout.write(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
        sys.stdout.flush()

    def table(
        self,
        columns: list[str],
        rows: list[list[str]],
        *,
        title: str | None = None,
        styles: dict[str, str] | None = None,
    ) -> None:
        if self.json_mode:
            return
        columns = [printable(column, one_line=True) for column in columns]
        rows = [[printable(str(cell), one_line=True) for cell in row] for row in rows]
        if sys.stdout.isatty():
            from rich.table import Table

            table = Table(title=title, header_style="bold", box=None, pad_edge=False)
            for column in columns:
                table.add_column(column)
            for row in rows:
                table.add_row(*[_escape(str(cell)) for cell in row])
            self.out.print(table)
            return
        widths = [max([len(c)] + [len(str(r[i])) for r in rows]) for i, c in enumerate(columns)]
        if title:
            print(title)
        print("  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip())
        for row in rows:
            print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip())

    def rows(self, rows: list[tuple[str, str]]) -> None:
        """Label/value lines (plans)."""
        width = max((len(label) for label, _ in rows), default=0)
        for label, value in rows:
            self.result(f"{label.ljust(width)}  {value}")

    @contextlib.contextmanager
    def spinner(self, text: str) -> Iterator[Callable[[str], None]]:
        """A long step. In a terminal: a spinner with the latest message and the time so far.

        Piped: one line when it starts and one when it ends, with the time it took;
        the updates in between are not printed (a log file gets two lines, not one
        per poll).
        """
        import time

        started = time.monotonic()
        latest = [text]
        if self.interactive and not self.json_mode:
            import threading

            done = threading.Event()
            with self.err.status(_escape(printable(text))) as status:

                def show() -> None:
                    status.update(_escape(printable(f"{latest[0]} ({_elapsed(time.monotonic() - started)})")))

                def update(message: str) -> None:
                    latest[0] = message
                    show()

                def tick() -> None:
                    while not done.wait(1.0):
                        show()

                ticker = threading.Thread(target=tick, name="spinner-clock", daemon=True)
                ticker.start()
                try:
                    yield update
                finally:
                    done.set()
                    ticker.join()
            return
        self.say(f"{text}...")
        yield lambda message: latest.__setitem__(0, message)
        self.say(f"{text}: done in {_elapsed(time.monotonic() - started)}")

    @contextlib.contextmanager
    def progress(self, description: str, total: int | None, unit: str = "bytes") -> Iterator[Callable[[int], None]]:
        """A progress bar in a terminal; a closing line when piped. Yields advance(n)."""
        if self.interactive and not self.json_mode:
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            columns = [TextColumn("{task.description}"), BarColumn()]
            if unit == "bytes":
                columns += [DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn()]
            with Progress(*columns, console=self.err, transient=True) as bar:
                task = bar.add_task(_escape(printable(description)), total=total)
                yield lambda n: bar.advance(task, n)
        else:
            yield lambda n: None

    def confirm(self, question: str) -> bool:
        import click

        return click.confirm(question, default=False, err=True)


def _elapsed(seconds: float) -> str:
    from gpurun.durations import format_duration

    return f"{seconds:.1f}s" if seconds < 10 else format_duration(seconds)


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)
