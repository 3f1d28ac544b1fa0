"""`provider: local`: setup and the job run in a virtual environment of their own, never in gpurun's.

A `pip install -r requirements.txt` in setup used to land in the Python that
runs gpurun. Now a local run with a setup gets a venv per project (per
workdir) under the state directory, `<GPURUN_HOME>/venvs/<name>-<hash>`,
created once with the Python gpurun runs on and put first on the job's PATH,
so setup's `pip` and the job's `python` are the venv's. It is reused by later
launches and execs of the project; after a setup succeeded its hash is noted
in the venv, and a later setup with the same hash (same command, same
requirement files) is skipped.

The venv sees the packages of the Python that runs gpurun (read-only, after
its own: a `.pth` file names those site-packages), so a setup that checks for
torch finds it there instead of downloading it again; whatever setup installs
lands in the venv, and pip never removes anything outside it. `pip` in the
venv is a small script running the inherited pip for the venv's Python; when
gpurun's Python has no pip, the venv gets its own (ensurepip, slower).

Without a setup the job runs with the `python` on PATH, as it would in a shell.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from gpurun import paths
from gpurun.errors import GpurunError
from gpurun.models import RunRecord

SETUP_STAMP = ".gpurun-setup-hash"


def venv_dir(spec_name: str, workdir: str) -> Path:
    key = hashlib.sha256(str(Path(workdir).resolve()).encode()).hexdigest()[:12]
    return paths.home() / "venvs" / f"{spec_name}-{key}"


def _base_python() -> str:
    """The interpreter gpurun runs on, outside any venv it may be in."""
    return getattr(sys, "_base_executable", None) or sys.executable


def prepare(record: RunRecord, say: Any) -> dict[str, str]:
    """The job's environment additions for a local run (a venv when it has setup); records which Python runs it."""
    spec = record["spec"]
    if not spec.get("setup"):
        found = shutil.which("python") or shutil.which("python3")
        record["python"] = found
        say(f"the job runs with the python on PATH: {found or 'none found'} (no setup, so no venv)")
        return {}
    venv = venv_dir(spec["name"], spec["workdir"])
    python = venv / "bin" / "python"
    if not python.exists():
        say(f"creating a venv for this project in {venv} (setup installs into it, never into gpurun's)")
        paths.ensure_private(venv.parent)
        try:
            _create(venv)
        except BaseException:
            shutil.rmtree(venv, ignore_errors=True)
            raise
    record["python"] = str(python)
    record["venv"] = str(venv)
    say(f"the job runs with {python} (this project's venv)")
    return {"VIRTUAL_ENV": str(venv), "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}


def _create(venv: Path) -> None:
    import importlib.util
    import site

    has_pip = importlib.util.find_spec("pip") is not None
    command = [_base_python(), "-m", "venv", *(["--without-pip"] if has_pip else []), str(venv)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()
        raise GpurunError(
            f"creating the venv {venv} failed: {detail[-1] if detail else done.returncode}; "
            "install your Python's venv module (Debian: python3-venv)"
        )
    inherited = [path for path in site.getsitepackages() if os.path.isdir(path)]
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    own = venv / "lib" / version / "site-packages"
    # addsitedir, not a bare path: the inherited site-packages' own .pth files count too.
    (own / "gpurun-inherited.pth").write_text(
        "".join(f"import site; site.addsitedir({path!r})\n" for path in inherited)
    )
    if has_pip:
        for name in ("pip", "pip3", f"pip{sys.version_info.major}.{sys.version_info.minor}"):
            shim = venv / "bin" / name
            shim.write_text(
                f"#!{venv / 'bin' / 'python'}\n"
                "# Written by gpurun: the inherited pip, installing into this venv.\n"
                "import sys\nfrom pip._internal.cli.main import main\nsys.exit(main())\n"
            )
            shim.chmod(0o755)


def setup_done_before(record: RunRecord, setup_hash: str | None) -> bool:
    """True when this project's venv already went through a setup with this hash."""
    venv = record.get("venv")
    if not venv or not setup_hash:
        return False
    try:
        return (Path(venv) / SETUP_STAMP).read_text().strip() == setup_hash
    except OSError:
        return False


def note_setup_done(record: RunRecord, setup_hash: str | None) -> None:
    venv = record.get("venv")
    if venv and setup_hash:
        paths.atomic_write(Path(venv) / SETUP_STAMP, setup_hash.encode())
