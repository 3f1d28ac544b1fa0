"""Ctrl-C at every step: afterwards the run is either fully up and recorded, or everything is gone.

Local provider: a real SIGINT is sent to a real `gpurun launch` child process.
The child is the CLI with one function wrapped to write a marker file and wait
at a chosen stage (planning, machine acquired, mid-sync, agent started, job
started); the setup stage and `--follow` need no wrapping. After the signal:
exit status 130, a message that says what was removed, no record, no run
directory, and no process of the run left.

AWS on moto (in-process): the signal is raised with os.kill from botocore
handlers right after a resource exists (its answer lost), while waiting for
the instances, while reading host keys, during the code sync of a whole
`launch`, and once more during the rollback itself. tests/test_aws_provider.py
already covers Ctrl-C before CreateSecurityGroup and CreateInstanceProfile,
after RunInstances, before DescribeInstances and while waiting for SSH.

Teardown: interrupted while it waits out the job's SIGTERM grace period, then
run again; the second one finishes the job.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from gpurun import paths
from gpurun.errors import GpurunError, Interrupted
from gpurun.transport.local import LocalTransport
from tests.helpers import REPO, gpurun, gpurun_json, live_processes, process_alive, wait_until
from tests.plugins.aws_fake import (
    STORE,
    FakeAws,
    Saves,
    acquire,
    key_dir,
    leftovers,
    make_provider,
    make_spec,
    new_record,
    text,
)


@pytest.fixture
def recorder() -> FakeAws:
    """Records every request body; serves the DLAMI parameters and placement groups moto lacks."""
    return FakeAws()


# The CLI, with one function wrapped so that the child stops at a known stage until SIGINT arrives.
CHILD = r"""
import sys, time
stage, marker, argv = sys.argv[1], sys.argv[2], sys.argv[3:]

def pause():
    open(marker, "w").close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(0.01)
    raise SystemExit("no SIGINT came")

def before(owner, name):
    original = getattr(owner, name)
    def wrapped(*args, **kwargs):
        pause()
        return original(*args, **kwargs)
    setattr(owner, name, wrapped)

def after(owner, name):
    original = getattr(owner, name)
    def wrapped(*args, **kwargs):
        result = original(*args, **kwargs)
        pause()
        return result
    setattr(owner, name, wrapped)

if stage == "planning":
    from gpurun.providers.local import LocalProvider
    after(LocalProvider, "plan")
elif stage == "acquired":
    from gpurun.providers.local import LocalProvider
    after(LocalProvider, "acquire")
elif stage == "syncing":
    from gpurun.transport.local import LocalTransport
    original_send = LocalTransport.send
    def send(self, command, chunks, **kwargs):
        def first_then_pause():
            for index, chunk in enumerate(chunks):
                yield chunk
                if index == 0:
                    pause()
        return original_send(self, command, first_then_pause(), **kwargs)
    LocalTransport.send = send
elif stage == "agent-started":
    from gpurun import jobs
    before(jobs, "start_job")
elif stage == "job-started":
    from gpurun.store import snapshots
    before(snapshots, "put_run_record")
from gpurun.cli import main
main(argv)
"""


def _experiment(tmp_path: Path, *, run: str = "sleep 30", setup: str | None = None) -> Path:
    code = tmp_path / "code"
    code.mkdir(exist_ok=True)
    for index in range(20):
        (code / f"module_{index}.py").write_text(f"# {index}\n" + "x = 1\n" * 2000)
    spec = tmp_path / "experiment.yaml"
    lines = ["name: intr", "workdir: code", f"run: {run}", "checkpoint: {every: 1h, resume: never}"]
    if setup:
        lines.append(f"setup: {setup}")
    spec.write_text("\n".join(lines) + "\n")
    return spec


def _run_processes(run: str) -> list[int]:
    """Live processes of the run: its environment names it, or its command line names its directory."""
    run_dir = str(paths.local_runs_dir() / run).encode()
    return live_processes(lambda cmdline, environ: f"GPURUN_RUN={run}".encode() in environ or run_dir in cmdline)


def _pids(run_dir: Path) -> list[int]:
    pids = []
    for name in ("job.pid", "agent.pid"):
        try:
            pids.append(int((run_dir / name).read_text()))
        except (OSError, ValueError):
            pass
    return pids


def _interrupt(proc: subprocess.Popen, ready, what: str) -> tuple[str, str]:
    wait_until(lambda: ready() or proc.poll() is not None, timeout=60, what=what)
    assert proc.poll() is None, f"gpurun ended before {what}: {proc.communicate()}"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    return out, err


def _start(stage: str, marker: Path, *argv: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, stage, str(marker), *argv],
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def _assert_all_gone(run: str, pids: list[int]) -> None:
    assert not paths.runs_dir().exists() or not list(paths.runs_dir().glob("*.json")), "a record was left"
    assert not (paths.local_runs_dir() / run).exists(), "the run directory was left"
    wait_until(lambda: not any(process_alive(pid) for pid in pids), timeout=10, what="the job and agent to end")
    wait_until(lambda: not _run_processes(run), timeout=10, what=f"every process of {run} to end")


# -- local provider: a real SIGINT to a real gpurun launch ----------------------------------------

STAGES = {
    # stage: (a record exists by then, what the message names)
    "planning": (False, None),
    "acquired": (True, "acquiring machines"),
    "syncing": (True, "preparing machines"),
    "agent-started": (True, "preparing machines"),
    "job-started": (True, "preparing machines"),
}


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(STAGES))
def test_sigint_at_each_stage_of_a_local_launch_leaves_nothing(stage, tmp_path):
    spec = _experiment(tmp_path)
    run = f"intr-{stage}"
    marker = tmp_path / "paused"
    proc = _start(stage, marker, "launch", str(spec), "--name", run, cwd=tmp_path)
    wait_until(lambda: marker.exists() or proc.poll() is not None, timeout=60, what=f"the {stage} stage")
    pids = _pids(paths.local_runs_dir() / run)
    if stage in ("agent-started", "job-started"):
        assert len(pids) == (1 if stage == "agent-started" else 2) and all(map(process_alive, pids))
    out, err = _interrupt(proc, marker.exists, stage)
    assert proc.returncode == 130, err
    last = err.strip().splitlines()[-1]
    recorded, step = STAGES[stage]
    if recorded:
        lines = err.strip().splitlines()
        assert "interrupted, removing what it created…" in lines, err
        error_line = next(line for line in lines if line.startswith("error:"))
        assert error_line == f"error: launch of {run} interrupted while {step}; everything it created was removed"
        if stage != "acquired":
            assert lines[-1] == f"  removed: run directory {paths.local_runs_dir() / run} on local", err
    else:
        assert last == "error: interrupted", err
    assert out == ""
    _assert_all_gone(run, pids)


@pytest.mark.slow
def test_sigint_during_setup_stops_setup_and_removes_the_run(tmp_path):
    spec = _experiment(tmp_path, setup="echo installing; sleep 30")
    run = "intr-setup"
    proc = _start("none", tmp_path / "unused", "launch", str(spec), "--name", run, cwd=tmp_path)
    phase = paths.local_runs_dir() / run / "job.phase"

    def in_setup() -> bool:
        try:
            return phase.read_text().strip() == "setup" and "installing" in (phase.parent / "job.log").read_text()
        except OSError:
            return False

    wait_until(lambda: in_setup() or proc.poll() is not None, timeout=60, what="setup to start")
    pids = _pids(phase.parent)
    assert pids and _run_processes(run)
    _out, err = _interrupt(proc, in_setup, "setup")
    assert proc.returncode == 130, err
    assert err.strip().splitlines()[-2] == (
        f"error: launch of {run} interrupted while running setup; everything it created was removed"
    )
    assert err.strip().splitlines()[-1].startswith("  removed: run directory ")
    _assert_all_gone(run, pids)


@pytest.mark.slow
def test_sigint_while_following_leaves_the_run_up_and_recorded(tmp_path):
    spec = _experiment(tmp_path, run="echo job-started; sleep 30")
    run = "intr-follow"
    proc = _start("none", tmp_path / "unused", "launch", str(spec), "--name", run, "--follow", cwd=tmp_path)
    log = paths.local_runs_dir() / run / "job.log"
    _out, err = _interrupt(proc, lambda: log.exists() and "job-started" in log.read_text(), "the job's output")
    assert proc.returncode == 130
    last = err.strip().splitlines()[-1]
    assert "the job goes on" in last and f"gpurun teardown {run}" in last, err
    [status] = gpurun_json("status", run)
    assert status["state"] == "running" and status["job"]["alive"]
    pids = _pids(log.parent)
    assert all(map(process_alive, pids))
    gpurun("teardown", run, "--yes", "--no-final-sync")
    wait_until(lambda: not _run_processes(run), timeout=10, what="the run's processes to end")
    assert gpurun_json("status", run)[0]["state"] == "ended"


# -- teardown interrupted halfway, then run again ---------------------------------------------------

PATIENT_JOB = """\
import signal, sys, time
count = 0
def on_term(*_):
    global count
    count += 1
    print(f"got TERM {count}", flush=True)
    if count >= 2:
        sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
print("started", flush=True)
while True:
    time.sleep(0.05)
"""


@pytest.mark.slow
def test_teardown_interrupted_while_waiting_for_the_job_then_run_again_finishes(tmp_path):
    spec = _experiment(tmp_path, run=f"{shlex.quote(sys.executable)} patient.py; echo after-the-job")
    (tmp_path / "code" / "patient.py").write_text(PATIENT_JOB)
    run = gpurun_json("launch", str(spec))["run"]
    run_dir = paths.local_runs_dir() / run
    log = run_dir / "job.log"
    wait_until(lambda: "started" in log.read_text(), timeout=20, what="the job to start")
    pids = _pids(run_dir)
    assert len(pids) == 2

    first = subprocess.Popen(
        [sys.executable, "-m", "gpurun", "teardown", run, "--yes"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # The job took the first TERM and keeps going: teardown is now in its grace period.
    _out, err = _interrupt(first, lambda: "got TERM 1" in log.read_text(), "the job to get SIGTERM")
    assert first.returncode == 130, err
    assert err.strip().splitlines()[-1] == (
        f"error: teardown of {run} interrupted; run `gpurun teardown {run}` again to finish it"
    )
    record = json.loads((paths.runs_dir() / f"{run}.json").read_text())
    assert record["state"] != "ended" and run_dir.exists()
    assert all(map(process_alive, pids)), "an interrupted teardown leaves the job to the next one"

    again = gpurun_json("teardown", run, "--yes")["runs"][0]
    assert again["run"] == run and any("job" in item for item in again["removed"])
    text = gpurun_json("status", run)[0]
    assert text["state"] == "ended" and text["exit_code"] == 0
    wait_until(lambda: not any(process_alive(pid) for pid in pids), timeout=10, what="the job and agent to end")
    assert not _run_processes(run) and not run_dir.exists()


def test_a_job_saving_on_sigterm_is_waited_for_even_behind_a_compound_command(tmp_path):
    """`run: a; b`: the shell around `a` must not die first and let teardown skip `a`'s save."""
    spec = _experiment(tmp_path, run=f"{shlex.quote(sys.executable)} saver.py; echo after-the-job")
    (tmp_path / "code" / "saver.py").write_text(
        "import signal, sys, time\n"
        "def on_term(*_):\n"
        "    time.sleep(0.5)\n"
        "    open('saved', 'w').write('yes')\n"
        "    sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, on_term)\n"
        "print('started', flush=True)\n"
        "while True:\n"
        "    time.sleep(0.05)\n"
    )
    run = gpurun_json("launch", str(spec))["run"]
    run_dir = paths.local_runs_dir() / run
    wait_until(lambda: "started" in (run_dir / "job.log").read_text(), timeout=20, what="the job to start")
    down = gpurun_json("teardown", run, "--yes", "--keep-files")["runs"][0]
    assert down["run"] == run
    assert (run_dir / "work" / "saved").read_text() == "yes", "teardown went on before the job had saved"
    log = (run_dir / "job.log").read_text()
    assert "after-the-job" not in log.splitlines(), "the next command must not start after SIGTERM"
    assert gpurun_json("status", run)[0]["exit_code"] == 0
    assert not _run_processes(run)


# -- AWS on moto: SIGINT raised inside botocore handlers ------------------------------------------


class SigintAt:
    """botocore handlers: send this process SIGINT once, before or after the named call."""

    def __init__(self, where: str, operation: str) -> None:
        self.where, self.operation, self.fired = where, operation, False

    def handlers(self) -> list[tuple[str, Any]]:
        return [("before-call", self.before), ("after-call", self.after)]

    def _fire(self, model) -> None:
        if model.name == self.operation and not self.fired:
            self.fired = True
            os.kill(os.getpid(), signal.SIGINT)

    def before(self, model, **_: Any) -> None:
        if self.where == "before":
            self._fire(model)

    def after(self, model, **_: Any) -> None:
        if self.where == "after":
            self._fire(model)


@pytest.fixture
def python_sigint(monkeypatch):
    """Python's own SIGINT handler (KeyboardInterrupt), whatever ran before."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def _outcome(call) -> BaseException | None:
    """Run `call`; return what it raised. A KeyboardInterrupt must never reach pytest itself."""
    try:
        call()
    except BaseException as error:  # noqa: BLE001 - that is the point
        return error
    return None


AWS_STEPS = [
    ("after", "ImportKeyPair", "importing the key pair"),  # the key pair exists, its id never arrived
    ("after", "CreateSecurityGroup", "creating the security group"),
    ("after", "CreateRole", "creating the IAM role"),
    ("after", "CreatePlacementGroup", "creating the placement group"),
    ("after", "DescribeInstances", "waiting for instances to run"),
    ("before", "GetConsoleOutput", "reading host keys"),  # from a worker thread: lands in the main one
]


@pytest.mark.parametrize("where, operation, step", AWS_STEPS, ids=[f"{w}-{o}" for w, o, _ in AWS_STEPS])
def test_sigint_at_an_aws_step_removes_everything(session, recorder, python_sigint, tmp_path, where, operation, step):
    provider = make_provider(recorder)
    sigint = SigintAt(where, operation)
    provider.event_handlers[:0] = sigint.handlers()
    record, saves, said = new_record(), Saves(), []
    error = _outcome(lambda: acquire(provider, make_spec(tmp_path, nodes=2), record, saves, said))
    assert sigint.fired
    assert isinstance(error, Interrupted), repr(error)
    assert error.exit_code == 130
    message = text(error)
    assert message.startswith(f"launch of exp-abc123 interrupted while {step}"), message
    assert "removed:" in message and "everything it created was removed" in message, message
    assert "COULD NOT REMOVE" not in message
    assert leftovers(session, recorder) == []
    assert not key_dir().exists()
    assert record["resources"] == {} and saves.records[-1]["resources"] == {}


def test_a_second_sigint_during_the_rollback_is_held_until_it_is_done(session, recorder, python_sigint, tmp_path):
    provider = make_provider(recorder)
    first, second = SigintAt("after", "RunInstances"), SigintAt("before", "TerminateInstances")
    provider.event_handlers[:0] = first.handlers() + second.handlers()
    record = new_record()
    error = _outcome(lambda: acquire(provider, make_spec(tmp_path, nodes=2), record, Saves(), []))
    assert first.fired and second.fired
    assert isinstance(error, Interrupted) and "removed: instance" in text(error), repr(error)
    assert leftovers(session, recorder) == []
    assert not key_dir().exists()


class _InterruptingTransport(LocalTransport):
    """This computer as the instance; SIGINT arrives while the code streams to it."""

    def send(self, command, chunks, **kwargs):
        def interrupted():
            for index, chunk in enumerate(chunks):
                if index == 1:
                    os.kill(os.getpid(), signal.SIGINT)
                yield chunk

        return super().send(command, interrupted(), **kwargs)


@pytest.fixture
def aws_launch(session, recorder, monkeypatch, tmp_path):
    """The whole `launch` workflow on moto, the machine being this computer (HOME moved)."""
    from gpurun.app import connections
    from gpurun.app import launch as launch_module
    from gpurun.ui import Ui

    machine_home = tmp_path / "machine-home"
    machine_home.mkdir()
    monkeypatch.setenv("HOME", str(machine_home))
    session.client("s3").create_bucket(Bucket=STORE[len("s3://") :].split("/")[0])
    provider = make_provider(recorder)
    monkeypatch.setattr(connections, "open_transport", lambda record, machine, **_: _InterruptingTransport())
    monkeypatch.setattr(launch_module, "get_provider", lambda name: provider)
    code = tmp_path / "code"
    code.mkdir()
    for index in range(40):
        (code / f"part_{index}.py").write_text("y = 2\n" * 20000)
    spec = make_spec(code)

    def run() -> BaseException | None:
        return _outcome(lambda: launch_module.launch(spec, Ui(json_mode=True), name="exp-intr01"))

    return provider, run, machine_home


def test_sigint_during_the_code_sync_of_an_aws_launch_removes_everything(aws_launch, session, recorder, python_sigint):
    _provider, run, machine_home = aws_launch
    error = run()
    assert isinstance(error, Interrupted), repr(error)
    assert str(error) == "launch of exp-intr01 interrupted while preparing machines; everything it created was removed"
    assert "TerminateInstances" in recorder.calls
    assert leftovers(session, recorder) == []
    assert not key_dir("exp-intr01").exists()
    assert not (paths.runs_dir() / "exp-intr01.json").exists()


def test_a_second_sigint_during_the_launch_rollback_does_not_leak(aws_launch, session, recorder, python_sigint):
    provider, run, _machine_home = aws_launch
    second = SigintAt("before", "TerminateInstances")
    provider.event_handlers[:0] = second.handlers()
    error = run()
    assert second.fired
    assert isinstance(error, (Interrupted, GpurunError)), repr(error)
    assert leftovers(session, recorder) == [], str(error)
    assert "everything it created was removed" in str(error)
    assert not (paths.runs_dir() / "exp-intr01.json").exists()
