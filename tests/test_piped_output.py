"""Output when piped: a long step is one line when it starts and one when it ends, however long it takes."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import gpurun, write_spec


@pytest.mark.slow
def test_a_long_setup_prints_two_lines_when_piped(tmp_path: Path) -> None:
    (tmp_path / "code").mkdir()
    spec = write_spec(
        tmp_path,
        "name: slow\nworkdir: code\n"
        "setup: for i in $(seq 1 40); do echo installing $i; sleep 0.2; done\nrun: echo trained\n",
    )
    done = gpurun("launch", str(spec), "--follow")
    setup_lines = [line for line in done.stderr.splitlines() if line.startswith("running setup")]
    assert setup_lines[0] == "running setup on 1 node(s)..."
    assert setup_lines[1].startswith("running setup on 1 node(s): done in ")
    assert len(setup_lines) == 2, done.stderr
    assert len(done.stderr.splitlines()) < 12, "a bounded number of lines, not one per poll"
    assert "trained" in done.stdout


@pytest.mark.slow
def test_in_a_terminal_the_spinner_shows_elapsed_time_and_setups_last_line(tmp_path: Path) -> None:
    import os
    import re
    import subprocess
    import sys

    (tmp_path / "code").mkdir()
    spec = write_spec(
        tmp_path,
        "name: tty\nworkdir: code\nsetup: for i in $(seq 1 25); do echo installing $i; sleep 0.2; done\nrun: echo ok\n",
    )
    controller, terminal = os.openpty()
    child = subprocess.Popen(
        [sys.executable, "-m", "gpurun", "launch", str(spec)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=terminal,
        env={**os.environ, "COLUMNS": "200"},
    )
    os.close(terminal)
    shown = bytearray()
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # the child closed its end
            break
        if not chunk:
            break
        shown.extend(chunk)
    child.wait(timeout=120)
    os.close(controller)
    text = shown.decode("utf-8", "replace")
    assert child.returncode == 0, text
    assert re.search(r"running setup on 1 node\(s\): installing \d+ \(\d+\.\ds\)", text), text[-2000:]
