"""The transport interface: run a shell command on the machine, stream, send bytes.

Commands are POSIX shell text run by `bash -c` on the machine; callers quote
every value they interpolate with `shlex.quote`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from gpurun.errors import TransportError


@dataclass(frozen=True)
class CommandResult:
    exit_code: int
    stdout: bytes
    stderr: bytes

    @property
    def text(self) -> str:
        return self.stdout.decode("utf-8", "replace")

    @property
    def ok(self) -> bool:
        return self.exit_code == 0


class Transport(ABC):
    #: How the machine is named in messages ("local", "ubuntu@1.2.3.4:22").
    label: str = "machine"
    #: Commands run on this computer: a reader may open the machine's files directly (no round trip).
    runs_here: bool = False
    #: Seconds the first connection keeps being tried (a machine still booting); 0: nothing is dialled.
    connect_retry_for: float = 0.0

    @abstractmethod
    def run(self, command: str, *, input: bytes | None = None, timeout: float | None = None) -> CommandResult:
        """Run to completion and collect its output."""

    @abstractmethod
    def stream(self, command: str, on_output: Callable[[bytes], None], *, timeout: float | None = None) -> int:
        """Run and hand each chunk of combined stdout/stderr to `on_output`; returns the exit status."""

    @abstractmethod
    def send(self, command: str, chunks: Iterable[bytes], *, timeout: float | None = None) -> CommandResult:
        """Run `command` with `chunks` as its standard input (one channel, streamed)."""

    def check(self, command: str, *, what: str, input: bytes | None = None, timeout: float | None = None) -> str:
        """Run, and raise TransportError naming `what` when it fails."""
        result = self.run(command, input=input, timeout=timeout)
        if not result.ok:
            detail = (result.stderr or result.stdout).decode("utf-8", "replace").strip().splitlines()
            last = detail[-1] if detail else f"exit status {result.exit_code}"
            raise TransportError(f"{what} on {self.label} failed: {last}")
        return result.text

    @property
    def server_key_line(self) -> str | None:
        """The host key the machine showed ("type base64"); None where no key is exchanged."""
        return None

    def connect(self) -> None:
        """Open the connection now, where there is one (otherwise the first command opens it)."""

    def close(self) -> None:
        """Release the connection; a closed transport may reconnect on next use."""

    def __enter__(self) -> Transport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
