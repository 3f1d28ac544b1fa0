"""`provider: local` with a setup: setup and job run in the project's own venv under the state directory."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.helpers import gpurun, write_spec


def tiny_wheel(directory: Path) -> Path:
    """A one-module wheel, installable without an index."""
    wheel = directory / "tinypkg_gpurun-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("tinypkg_gpurun.py", "WHERE = __file__\n")
        info = "tinypkg_gpurun-1.0.dist-info"
        archive.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: tinypkg-gpurun\nVersion: 1.0\n")
        archive.writestr(
            f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
        )
        archive.writestr(f"{info}/RECORD", "")
    return wheel


@pytest.mark.slow
def test_setup_installs_into_the_projects_venv_which_later_launches_reuse(tmp_path: Path, gpurun_home: Path) -> None:
    (tmp_path / "code").mkdir()
    (tmp_path / "code" / "requirements.txt").write_text(f"{tiny_wheel(tmp_path)}\n")
    spec = write_spec(
        tmp_path,
        "name: iso\nworkdir: code\n"
        f"setup: command -v pip > {tmp_path}/setup-pip.txt; pip install -q --no-index -r requirements.txt; echo set up\n"
        "run: python -c \"import sys, tinypkg_gpurun, click; print('prefix', sys.prefix, tinypkg_gpurun.WHERE)\"\n",
    )
    first = gpurun("launch", str(spec), "--follow")
    [venv] = list((gpurun_home / "venvs").iterdir())
    assert f"the job runs with {venv}/bin/python (this project's venv)" in first.stderr
    assert f"prefix {venv} {venv}/lib/" in first.stdout, "the job's python is the venv's, with what setup installed"
    assert (tmp_path / "setup-pip.txt").read_text().strip() == f"{venv}/bin/pip"
    untouched = subprocess.run([sys.executable, "-c", "import tinypkg_gpurun"], capture_output=True)
    assert untouched.returncode != 0, "gpurun's own environment is left alone"

    second = gpurun("launch", str(spec), "--follow")
    assert "setup skipped: this project's venv already went through this setup" in second.stderr
    assert "set up" not in second.stdout and f"prefix {venv}" in second.stdout
    assert list((gpurun_home / "venvs").iterdir()) == [venv], "one venv per project, reused"

    (tmp_path / "code" / "requirements.txt").write_text(f"# changed\n{tiny_wheel(tmp_path)}\n")
    third = gpurun("launch", str(spec), "--follow")
    assert "set up" in third.stdout, "a changed requirements file runs setup again, in the same venv"


def test_without_setup_the_job_uses_the_python_on_path(tmp_path: Path, gpurun_home: Path) -> None:
    (tmp_path / "code").mkdir()
    spec = write_spec(tmp_path, "name: plain\nworkdir: code\nrun: echo ok\n")
    done = gpurun("launch", str(spec), "--follow")
    assert "the job runs with the python on PATH: " in done.stderr
    assert not (gpurun_home / "venvs").exists()
