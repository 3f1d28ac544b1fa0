"""The job on the machine: started detached in its own session, watched through files.

    <run_dir>/job.sh      what runs: setup, then run, then the exit code is recorded
    <run_dir>/job.pid     the session leader; its process group is the job
    <run_dir>/job.phase   setup | run
    <run_dir>/job.exit    the exit status, written when the job ends
    <run_dir>/job.log     stdout and stderr
    <run_dir>/job.restarts  restarts used so far (recovery on)
    <run_dir>/secrets.env   the spec's `secrets:` as shell exports, 0600; removed at teardown

Everything goes through a Transport as shell text, so the same code drives
the local machine and an SSH host. Every interpolated value is quoted.
"""

from __future__ import annotations

import os
import shlex
import time
from dataclasses import dataclass
from typing import Any, TypedDict

from gpurun import gpu
from gpurun.errors import InvalidDocument, TransportError
from gpurun.models import Gpu
from gpurun.store import documents
from gpurun.transport.base import Transport

q = shlex.quote


def _in_workdir(workdir: str, command: str) -> str:
    # cd inside the child shell: a login's ~/.bashrc may run (and cd) before the command.
    # A trapped TERM makes this shell outlive the command it runs (which gets TERM too and
    # may take its time to save), then exit without starting the next one. Untrapped, the
    # shell of `a; b` or `a | b` died at once and left `a` running, unseen by stop().
    return f"trap 'exit $?' TERM; cd {q(workdir)} && {command}"


@dataclass(frozen=True)
class Restarts:
    """The wrapper restarts the job on this machine (recovery on ssh and local).

    A job killed by a signal (exit status above 128: the OOM killer, a person, a
    lost GPU) is restarted; one that exits non-zero only with `on_failure`.
    Before each restart the agent takes its final snapshot, then `restore`
    (a shell command) puts LATEST into `checkpoint_dir`.
    """

    max_restarts: int
    on_failure: bool
    checkpoint_dir: str
    restore: str
    # How long to wait for the agent's snapshot before restarting anyway.
    snapshot_wait: int = 300


def _restart_block(run_dir: str, restarts: Restarts) -> str:
    qdir = q(run_dir)
    restart_on = '[ "$code" -gt 128 ]' + (' || [ "$code" -ne 0 ]' if restarts.on_failure else "")
    return f"""  if [ "$code" -eq 0 ] || [ -n "$stopping" ] || ! {{ {restart_on}; }}; then break; fi
  if [ "$used" -ge {restarts.max_restarts} ]; then
    echo "[gpurun] job ended with exit status $code; restart budget spent ($used of {restarts.max_restarts})"
    break
  fi
  used=$((used + 1))
  echo "$used" > {qdir}/job.restarts
  echo "[gpurun] job ended with exit status $code; restart $used of {restarts.max_restarts} from LATEST"
  nonce="restart-$used-$$-$(date +%s%N)"
  echo "$nonce" > {qdir}/sync.request
  waited=0
  while ! grep -qF "$nonce" {qdir}/agent.status.json 2>/dev/null && [ "$waited" -lt {restarts.snapshot_wait * 10} ]; do
    p=$(cat {qdir}/agent.pid 2>/dev/null); [ -n "$p" ] && [ -d "/proc/$p" ] || break
    sleep 0.1; waited=$((waited + 1))
  done
  [ -n "$stopping" ] && break
  if ( {restarts.restore} ); then
    export GPURUN_RESUME_FROM={q(restarts.checkpoint_dir)}
    # The restore moved the dead job's directory aside; keep the newest such copy only (disk).
    ls -1d {q(restarts.checkpoint_dir)}.gpurun-old-* 2>/dev/null | sort | head -n -1 | while IFS= read -r old; do
      rm -rf -- "$old"
    done
  else
    echo "[gpurun] no snapshot to restore; restarting from the start"
  fi
"""


SECRETS_FILE = "secrets.env"


def secrets_path(run_dir: str) -> str:
    return f"{run_dir}/{SECRETS_FILE}"


def secrets_file_text(values: dict[str, str]) -> bytes:
    return "".join(f"export {name}={q(value)}\n" for name, value in sorted(values.items())).encode()


def write_secrets(transport: Transport, run_dir: str, values: dict[str, str]) -> None:
    """Put `values` in the run's secrets file (0600 from its first byte), through stdin: never
    on a command line, where `ps` and shell history would see them."""
    qfile, qtemp = q(secrets_path(run_dir)), q(f"{secrets_path(run_dir)}.tmp")
    transport.check(
        f"umask 077 && mkdir -p {q(run_dir)} && rm -f {qtemp} && cat > {qtemp} && chmod 600 {qtemp} && mv -f {qtemp} {qfile}",
        what="writing the run's secrets",
        input=secrets_file_text(values),
    )


def remove_secrets(transport: Transport, run_dir: str) -> None:
    transport.run(f"rm -f {q(secrets_path(run_dir))} {q(secrets_path(run_dir) + '.tmp')}", timeout=30)


def job_script(
    run_dir: str,
    workdir: str,
    env: dict[str, str],
    setup: str | None,
    run: str,
    restarts: Restarts | None = None,
) -> str:
    exports = "\n".join(f"export {name}={q(value)}" for name, value in sorted(env.items()))
    setup_block = ""
    if setup:
        setup_block = f"""echo setup > {q(run_dir)}/job.phase
echo "[gpurun] setup: "{q(setup)}
bash -c {q(_in_workdir(workdir, setup))}
code=$?
if [ "$code" -ne 0 ]; then
  echo "[gpurun] setup failed with exit status $code"
  record "$code"
  exit "$code"
fi
"""
    restart_block = _restart_block(run_dir, restarts) if restarts else "  break\n"
    return f"""#!/usr/bin/env bash
# Written by gpurun. Runs setup, then the job, and records how it ended.
# TERM is trapped so this shell outlives its child and can record the exit status;
# it also means "stop": a TERM never leads to a restart.
stopping=
trap 'stopping=1; echo "[gpurun] received SIGTERM"' TERM
record() {{ echo "$1" > {q(run_dir)}/job.exit.tmp && mv {q(run_dir)}/job.exit.tmp {q(run_dir)}/job.exit; }}
cd {q(workdir)} || {{ record 1; exit 1; }}
# Started from an SSH session, bash would read ~/.bashrc for every child shell.
unset SSH_CLIENT SSH2_CLIENT SSH_CONNECTION SSH_TTY
{exports}
# The spec's secrets: their values live only in this 0600 file, never in job.sh.
if [ -f {q(secrets_path(run_dir))} ]; then . {q(secrets_path(run_dir))}; fi
{setup_block}used=0
while true; do
  echo run > {q(run_dir)}/job.phase
  echo "[gpurun] run: "{q(run)}
  bash -c {q(_in_workdir(workdir, run))} &
  child=$!
  wait "$child"
  code=$?
  # A trapped TERM interrupts wait: keep waiting for the job to finish saving.
  while kill -0 "$child" 2>/dev/null; do wait "$child"; code=$?; done
{restart_block}done
record "$code"
exit "$code"
"""


def start_job(
    transport: Transport,
    run_dir: str,
    workdir: str,
    env: dict[str, str],
    setup: str | None,
    run: str,
    restarts: Restarts | None = None,
) -> int:
    script = job_script(run_dir, workdir, env, setup, run, restarts).encode()
    qdir = q(run_dir)
    # Only the setsid command goes to the background: a backgrounded `a && b` list
    # would keep a subshell holding our output pipe open.
    command = (
        f"mkdir -p {qdir} && cat > {qdir}/job.sh && rm -f {qdir}/job.exit {qdir}/job.phase {qdir}/job.restarts && cd {qdir} || exit 1\n"
        f"setsid nohup bash {qdir}/job.sh >> {qdir}/job.log 2>&1 < /dev/null &\n"
        f"echo $! > {qdir}/job.pid && echo $!"
    )
    output = transport.check(command, what="starting the job", input=script)
    return int(output.strip().splitlines()[-1])


def start_agent(transport: Transport, run_dir: str, python: str, arguments: list[str]) -> int:
    qdir = q(run_dir)
    argv = " ".join(q(argument) for argument in arguments)
    command = (
        f"cd {qdir} || exit 1\n"
        f"setsid nohup {python} -m gpurun.agent {argv} >> {qdir}/agent.log 2>&1 < /dev/null &\n"
        f"echo $! > {qdir}/agent.pid && echo $!"
    )
    output = transport.check(command, what="starting the checkpoint agent")
    return int(output.strip().splitlines()[-1])


STATUS_FILE = documents.AGENT_STATUS_FILE
#: What is read of the agent's status file at most: it is a few hundred bytes; a machine may plant more.
STATUS_LIMIT = documents.AGENT_STATUS_LIMIT

# One round trip that reports everything status needs about a run directory.
_STATE_SCRIPT = r"""
d={dir}
alive() {{ p=$(cat "$d/$1.pid" 2>/dev/null) || {{ echo none; return; }}
  s=$(sed -n 's/^State:[[:space:]]*\(.\).*/\1/p' /proc/$p/status 2>/dev/null)
  if [ -n "$s" ] && [ "$s" != Z ]; then echo "$p"; elif kill -0 "$p" 2>/dev/null && [ ! -d /proc ]; then echo "$p"; else echo dead; fi; }}
echo "job_pid=$(alive job)"
echo "agent_pid=$(alive agent)"
echo "exit=$(cat "$d/job.exit" 2>/dev/null)"
echo "exit_at=$(stat -c %Y "$d/job.exit" 2>/dev/null)"
echo "phase=$(cat "$d/job.phase" 2>/dev/null)"
echo "restarts=$(head -c 20 "$d/job.restarts" 2>/dev/null)"
echo "interrupted=$(cat "$d/interrupted" 2>/dev/null | head -c 200 | tr '\n' ' ')"
echo "agent_status=$(head -c {status_limit} "$d/agent.status.json" 2>/dev/null | tr '\n' ' ')"
{gpu}
echo "last_line=$(tail -c 2048 "$d/job.log" 2>/dev/null | tr -d '\r' | grep -v '^$' | tail -n 1 | head -c 200)"
"""


class JobReading(TypedDict):
    """How a job and its agent are doing on a machine (read_state): read fresh, never stored."""

    job_alive: bool
    job_started: bool
    agent_alive: bool
    exit_code: int | None
    phase: str | None
    restarts: int
    interrupted: bool
    ended_at: str | None
    last_line: str | None
    gpus: list[Gpu] | None
    agent: dict[str, Any] | None  # agent.status.json, checked against store.documents.AgentStatus


def _parse_state(text: str) -> JobReading:
    values = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    state: JobReading = {
        "job_alive": values.get("job_pid", "none") not in ("none", "dead", ""),
        "job_started": values.get("job_pid", "none") != "none",
        "agent_alive": values.get("agent_pid", "none") not in ("none", "dead", ""),
        "exit_code": int(values["exit"]) if values.get("exit", "").strip().lstrip("-").isdigit() else None,
        "phase": values.get("phase") or None,
        "restarts": _count(values.get("restarts", "")),
        "interrupted": bool(values.get("interrupted", "").strip()),
        "ended_at": _iso(values.get("exit_at", "")),
        "last_line": values.get("last_line", "").strip() or None,
        "gpus": gpu.parse(values.get("gpu", "")),
        "agent": None,
    }
    state["agent"] = _agent_status(values.get("agent_status", ""))
    return state


def _agent_status(text: str) -> dict[str, Any] | None:
    """agent.status.json as the agent wrote it, validated (`documents.AgentStatus`); None when
    there is none or it does not fit (a machine is untrusted: nothing it says is used unchecked)."""
    if not text.strip():
        return None
    from gpurun.store import documents

    try:
        return documents.read(text.encode(), documents.AgentStatus, name=STATUS_FILE, limit=STATUS_LIMIT)
    except InvalidDocument:
        return None


def _iso(epoch: str) -> str | None:
    """An epoch seconds text from the machine as ISO 8601 UTC; None when it is not one."""
    from datetime import datetime, timezone

    text = epoch.strip()
    if not text.isdigit() or len(text) > 12:
        return None
    return datetime.fromtimestamp(int(text), timezone.utc).isoformat(timespec="seconds")


def _count(text: str) -> int:
    text = text.strip()
    return int(text) if text.isdigit() and len(text) < 10 else 0


def read_state(transport: Transport, run_dir: str) -> JobReading:
    """How the job and the agent in `run_dir` are doing: one round trip, or none when the
    transport runs here (the files are read directly, which keeps `status` fast)."""
    if transport.runs_here:
        return _read_state_here(run_dir)
    result = transport.run(
        _STATE_SCRIPT.format(dir=q(run_dir), gpu=gpu.SHELL, status_limit=STATUS_LIMIT + 1), timeout=30
    )
    if not result.ok:
        raise TransportError(f"reading the job state on {transport.label} failed")
    return _parse_state(result.text)


def _pid_alive_here(pid_file: str) -> tuple[bool, bool]:
    """(started, alive) for a pid file on this machine; zombies count as dead."""
    try:
        with open(pid_file) as handle:
            pid = int(handle.read().strip())
    except (OSError, ValueError):
        return False, False
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("State:"):
                    return True, line.split()[1] != "Z"
    except OSError:
        return True, False
    return True, False


def _read_state_here(run_dir: str) -> JobReading:
    """The same answer as read_state, read directly (the local provider; fast for status)."""

    def read(name: str, limit: int = 4096) -> str:
        try:
            with open(os.path.join(run_dir, name), errors="replace") as handle:
                return handle.read(limit)
        except OSError:
            return ""

    job_started, job_alive = _pid_alive_here(os.path.join(run_dir, "job.pid"))
    _agent_started, agent_alive = _pid_alive_here(os.path.join(run_dir, "agent.pid"))
    exit_text = read("job.exit").strip()
    try:
        exit_at = str(int(os.stat(os.path.join(run_dir, "job.exit")).st_mtime)) if exit_text else ""
    except OSError:
        exit_at = ""
    agent = _agent_status(read(STATUS_FILE, STATUS_LIMIT + 1))
    return {
        "job_alive": job_alive,
        "job_started": job_started,
        "agent_alive": agent_alive,
        "exit_code": int(exit_text) if exit_text.lstrip("-").isdigit() else None,
        "phase": read("job.phase").strip() or None,
        "restarts": _count(read("job.restarts")),
        "interrupted": bool(read("interrupted").strip()),
        "ended_at": _iso(exit_at),
        "last_line": _last_line(os.path.join(run_dir, "job.log")),
        "gpus": gpu.read_here(run_dir),
        "agent": agent,
    }


def _last_line(path: str) -> str | None:
    """The log's last non-empty line (at most 200 characters), as the state script reports it."""
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, os.fstat(handle.fileno()).st_size - 2048))
            tail = handle.read().replace(b"\r", b"")
    except OSError:
        return None
    lines = [line for line in tail.split(b"\n") if line.strip()]
    return lines[-1][:200].decode("utf-8", "replace").strip() if lines else None


def signal_group(transport: Transport, run_dir: str, name: str, signal: str) -> None:
    """Send `signal` to the process group of `<name>.pid` (the detached session)."""
    qpid = q(f"{run_dir}/{name}.pid")
    transport.run(f"p=$(cat {qpid} 2>/dev/null) && kill -{signal} -- -$p 2>/dev/null; true", timeout=30)


def stop(transport: Transport, run_dir: str, name: str, *, grace: float = 10.0) -> bool:
    """TERM the group, then KILL after `grace` seconds. True when it had to be killed."""

    def alive() -> bool:
        state = read_state(transport, run_dir)
        return state["job_alive"] if name == "job" else state["agent_alive"]

    if not alive():
        return False
    signal_group(transport, run_dir, name, "TERM")
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        time.sleep(0.2)
        if not alive():
            return False
    signal_group(transport, run_dir, name, "KILL")
    return True
