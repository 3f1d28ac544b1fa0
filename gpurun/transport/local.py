"""The local machine as a transport: bash in a subprocess."""

from __future__ import annotations

import io
import subprocess
import threading
from collections.abc import Callable, Iterable
from typing import IO

from gpurun.errors import TransportError
from gpurun.transport.base import CommandResult, Transport


class LocalTransport(Transport):
    label = "local"
    runs_here = True

    def run(self, command: str, *, input: bytes | None = None, timeout: float | None = None) -> CommandResult:
        try:
            done = subprocess.run(
                ["bash", "-c", command],
                input=input if input is not None else b"",
                capture_output=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            raise TransportError(f"command on {self.label} did not finish in {timeout:.0f}s") from None
        return CommandResult(done.returncode, done.stdout, done.stderr)

    def stream(self, command: str, on_output: Callable[[bytes], None], *, timeout: float | None = None) -> int:
        process = subprocess.Popen(
            ["bash", "-c", command], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        output = process.stdout
        assert isinstance(output, io.BufferedReader)  # a pipe opened in binary mode with the default buffering
        try:
            while chunk := output.read1(65536):
                on_output(chunk)
            return process.wait(timeout=timeout)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()

    def send(self, command: str, chunks: Iterable[bytes], *, timeout: float | None = None) -> CommandResult:
        process = subprocess.Popen(
            ["bash", "-c", command], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert process.stdin and process.stdout and process.stderr
        collected: dict[str, bytes] = {}

        def drain(name: str, pipe: IO[bytes]) -> None:
            collected[name] = pipe.read()

        readers = [
            threading.Thread(target=drain, args=("out", process.stdout), daemon=True),
            threading.Thread(target=drain, args=("err", process.stderr), daemon=True),
        ]
        for reader in readers:
            reader.start()
        try:
            for chunk in chunks:
                process.stdin.write(chunk)
            process.stdin.close()
        except BrokenPipeError:
            pass
        except BaseException:
            # Ctrl-C or a failing producer: do not leave the receiving shell behind.
            process.kill()
            process.wait()
            raise
        code = process.wait(timeout=timeout)
        for reader in readers:
            reader.join()
        return CommandResult(code, collected.get("out", b""), collected.get("err", b""))
