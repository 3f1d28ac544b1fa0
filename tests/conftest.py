"""Shared fixtures. Fixture modules in tests/plugins/ are loaded as plugins."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import isolate

pytest_plugins = sorted(
    f"tests.plugins.{path.stem}" for path in (Path(__file__).parent / "plugins").glob("*.py") if path.stem != "__init__"
)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own state directory and no real AWS."""
    return isolate(tmp_path_factory, monkeypatch)


@pytest.fixture
def gpurun_home() -> Path:
    return Path(os.environ["GPURUN_HOME"])
