"""Ship gpurun to a machine so the checkpoint agent can run there, isolated.

On the machine:

    ~/.gpurun/agent/<version>-<content hash>/gpurun/...   this package's files
    ~/.gpurun/agent/<version>-<content hash>/python       wrapper: the venv's python with PYTHONPATH set
    ~/.gpurun/venv/                                        `python3 -m venv`; boto3 only when the store is s3://

The user's Python environment is never touched. The package goes over as one
gzip'd tar stream; a second call with the same content finds the wrapper and
the venv with one quick command and sends nothing. Concurrent installs on one
machine (several nodes on one host) are serialized with flock.

This runs on the laptop, over a transport, so it belongs to the app layer;
the agent itself (`gpurun.agent`) imports only the store.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import shlex
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import gpurun
from gpurun.errors import TransportError
from gpurun.transport.base import Transport

AGENT_ROOT = ".gpurun/agent"
VENV = ".gpurun/venv"
MIN_PYTHON = (3, 10)
PIP_ARGS_ENV = "GPURUN_AGENT_PIP_ARGS"
INSTALL_TIMEOUT_S = 900.0

# Exit statuses of the install script, and what to tell the user.
_NO_PYTHON, _OLD_PYTHON, _NO_VENV, _NO_PIP, _PIP_FAILED, _EXTRACT_FAILED = 41, 42, 43, 44, 45, 46


def package_dir() -> Path:
    return Path(gpurun.__file__).resolve().parent


def _package_files() -> list[tuple[str, Path]]:
    root = package_dir()
    files = []
    for directory, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.startswith("."))
        for name in sorted(filenames):
            if name.endswith((".pyc", ".pyo")) or name.startswith("."):
                continue
            path = Path(directory) / name
            files.append((str(Path("gpurun") / path.relative_to(root)), path))
    return files


@functools.lru_cache(maxsize=1)
def agent_bundle() -> tuple[str, bytes]:
    """(`<version>-<hash>`, gzip'd tar of the package); computed once per process."""
    digest = hashlib.sha256()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=6) as tar:
        for name, path in _package_files():
            data = path.read_bytes()
            digest.update(name.encode() + b"\0" + len(data).to_bytes(8, "big") + data)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            info.mtime = int(path.stat().st_mtime)
            tar.addfile(info, io.BytesIO(data))
    return f"{gpurun.__version__}-{digest.hexdigest()[:12]}", buffer.getvalue()


def _check_script(tag: str, need_s3: bool) -> str:
    boto3 = ' && "$venv/bin/python" -c "import boto3" >/dev/null 2>&1 && echo boto3=1' if need_s3 else ""
    return f"""
agent="$HOME/{AGENT_ROOT}/{tag}"; venv="$HOME/{VENV}"
printf 'home=%s\\n' "$HOME"
[ -x "$agent/python" ] && echo agent=1
[ -f "$venv/.gpurun-ready" ] && [ -x "$venv/bin/python" ] && echo venv=1{boto3}
exit 0
"""


def _install_script(tag: str, need_s3: bool, pip_args: list[str]) -> str:
    extra = " ".join(shlex.quote(arg) for arg in pip_args)
    major, minor = MIN_PYTHON
    boto3 = ""
    if need_s3:
        boto3 = f"""
if ! "$venv/bin/python" -c 'import boto3' >/dev/null 2>&1; then
  if "$venv/bin/python" -m pip --version >/dev/null 2>&1; then
    pip() {{ "$venv/bin/python" -m pip "$@"; }}
  elif python3 -m pip --python "$venv/bin/python" --version >/dev/null 2>&1; then
    # The machine's pip, run for the venv's interpreter: installs into the venv only (no ensurepip).
    pip() {{ python3 -m pip --python "$venv/bin/python" "$@"; }}
  else
    "$venv/bin/python" -m ensurepip --default-pip >"$log" 2>&1 || {{ tail -n 3 "$log" >&2; exit {_NO_PIP}; }}
    pip() {{ "$venv/bin/python" -m pip "$@"; }}
  fi
  pip install --quiet --disable-pip-version-check --no-input {extra} boto3 >"$log" 2>&1 \\
    || {{ tail -n 5 "$log" >&2; exit {_PIP_FAILED}; }}
fi"""
    return f"""set -u
umask 022
root="$HOME/.gpurun"; agent="$HOME/{AGENT_ROOT}/{tag}"; venv="$HOME/{VENV}"; log="$root/install.log"
mkdir -p "$HOME/{AGENT_ROOT}" || exit {_EXTRACT_FAILED}
exec 9>"$root/.install.lock"
if command -v flock >/dev/null 2>&1; then flock -w 900 9; fi
if [ -x "$agent/python" ]; then
  cat >/dev/null
else
  incoming=$(mktemp -d "$HOME/{AGENT_ROOT}/.incoming.XXXXXX") || exit {_EXTRACT_FAILED}
  if ! tar --no-same-owner -xzf - -C "$incoming"; then rm -rf "$incoming"; exit {_EXTRACT_FAILED}; fi
  cat > "$incoming/python" <<'WRAPPER'
#!/bin/sh
# The gpurun agent's python: its own venv, gpurun from this directory, nothing from the user's site.
here=$(cd "$(dirname "$0")" && pwd)
PYTHONPATH="$here" PYTHONSAFEPATH=1 PYTHONNOUSERSITE=1 exec "$here/../../venv/bin/python" "$@"
WRAPPER
  chmod 755 "$incoming/python"
  rm -rf "$agent" && mv "$incoming" "$agent" || exit {_EXTRACT_FAILED}
fi
if ! [ -f "$venv/.gpurun-ready" ] || ! [ -x "$venv/bin/python" ]; then
  command -v python3 >/dev/null 2>&1 || exit {_NO_PYTHON}
  python3 -c 'import sys; sys.exit(sys.version_info < ({major}, {minor}))' || {{ python3 -V >&2; exit {_OLD_PYTHON}; }}
  rm -rf "$venv"
  python3 -m venv --without-pip "$venv" >"$log" 2>&1 || {{ tail -n 3 "$log" >&2; rm -rf "$venv"; exit {_NO_VENV}; }}
  touch "$venv/.gpurun-ready"
fi{boto3}
exit 0
"""


def ensure_agent(transport: Transport, say: Callable[[str], None], *, need_s3: bool) -> str:
    """Make sure the machine can run `python -m gpurun.agent ...`; returns that python, shell-quoted.

    The result is the absolute path of a wrapper script (quoted for the shell),
    so it can start a command line or follow `setsid`, `nohup` or `env`.
    """
    tag, bundle = agent_bundle()
    state = _parse(transport.check(_check_script(tag, need_s3), what="checking for the gpurun agent", timeout=60))
    home = state.get("home", "").strip()
    if not home.startswith("/"):
        raise TransportError(f"cannot find the home directory on {transport.label} ($HOME is {home!r})")
    wrapper = shlex.quote(f"{home}/{AGENT_ROOT}/{tag}/python")
    if state.get("agent") and state.get("venv") and (state.get("boto3") or not need_s3):
        return wrapper
    steps = []
    if not state.get("agent"):
        steps.append(f"gpurun {gpurun.__version__} ({len(bundle) // 1024} KiB)")
    if not state.get("venv"):
        steps.append(f"a venv in ~/{VENV}")
    if need_s3 and not state.get("boto3"):
        steps.append("boto3 (pip)")
    say(f"installing the checkpoint agent on {transport.label}: {', '.join(steps)}")
    pip_args = shlex.split(os.environ.get(PIP_ARGS_ENV, ""))
    result = transport.send(
        _install_script(tag, need_s3, pip_args),
        _chunks(bundle if not state.get("agent") else b""),
        timeout=INSTALL_TIMEOUT_S,
    )
    if not result.ok:
        raise TransportError(_failure(transport.label, result.exit_code, result.stderr or result.stdout))
    return wrapper


def _chunks(data: bytes, size: int = 1 << 20) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def _parse(text: str) -> dict[str, str]:
    values = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value
    return values


def _failure(label: str, code: int, output: bytes) -> str:
    lines = output.decode("utf-8", "replace").strip().splitlines()
    last = lines[-1].strip() if lines else f"exit status {code}"
    if code == _NO_PYTHON:
        return f"no python3 on {label}: the gpurun agent needs Python 3.10+; install python3 and python3-venv there"
    if code == _OLD_PYTHON:
        return f"python3 on {label} is too old ({last}): the gpurun agent needs Python 3.10 or newer"
    if code == _NO_VENV:
        return (
            f"cannot create ~/{VENV} on {label} with `python3 -m venv` ({last}); "
            f"install the python3-venv package there (apt-get install python3-venv)"
        )
    if code == _NO_PIP:
        return (
            f"no pip for ~/{VENV} on {label} (ensurepip: {last}); "
            f"install the python3-venv package there (apt-get install python3-venv)"
        )
    if code == _PIP_FAILED:
        return f"installing boto3 into ~/{VENV} on {label} failed: {last}; check the machine reaches PyPI"
    if code == _EXTRACT_FAILED:
        return f"unpacking the gpurun agent into ~/{AGENT_ROOT} on {label} failed: {last}; check the disk and ~/.gpurun"
    return f"installing the gpurun agent on {label} failed: {last}"
