"""The code keeps the design's layers: scripts/check_layers.py reads every import under gpurun/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_import_follows_the_layer_table() -> None:
    checked = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "check_layers.py"), str(ROOT / "gpurun")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "no layer violations" in checked.stdout


def test_the_check_catches_a_lower_layer_importing_a_higher_one(tmp_path: Path) -> None:
    package = tmp_path / "gpurun"
    (package / "store").mkdir(parents=True)
    (package / "app").mkdir()
    (package / "store" / "bad.py").write_text("from gpurun.app import launch\n")
    checked = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "check_layers.py"), str(package)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert checked.returncode == 1 and "gpurun.app" in checked.stdout, checked.stdout + checked.stderr


def test_the_check_catches_app_branching_on_a_provider_name(tmp_path: Path) -> None:
    package = tmp_path / "gpurun"
    (package / "app").mkdir(parents=True)
    (package / "app" / "fine.py").write_text("def f(record):\n    return record['provider'] == record['other']\n")
    (package / "app" / "bad.py").write_text(
        "def f(record):\n    if record['provider'] == 'aws':\n        return 1\n    return record['p'] in ('ssh', 'local')\n"
    )
    # No file of app/ is exempt, not even those that once were.
    (package / "app" / "doctor.py").write_text("def f(spec):\n    return spec.provider == 'ssh'\n")
    checked = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "check_layers.py"), str(package)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert checked.returncode == 1, checked.stdout + checked.stderr
    assert "bad.py: 2 provider-name branch(es) (lines 2, 4)" in checked.stdout
    assert "doctor.py: 1 provider-name branch(es) (lines 2)" in checked.stdout
    assert "fine.py" not in checked.stdout


def test_the_check_catches_the_cli_branching_on_a_provider_name(tmp_path: Path) -> None:
    package = tmp_path / "gpurun"
    package.mkdir()
    (package / "cli.py").write_text(
        "def where(record):\n    return 'here' if record['provider'] == 'local' else 'there'\n"
    )
    checked = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "check_layers.py"), str(package)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert checked.returncode == 1, checked.stdout + checked.stderr
    assert "cli.py: 1 provider-name branch(es) (lines 2); ask the provider's capabilities" in checked.stdout
