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


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`--dist loadgroup`: keep each `xdist_group` on one worker with pytest 9 too.

    pytest-xdist (3.8) marks a grouped test by setting `item._nodeid`, which
    pytest 9 no longer reads (a node's id is `_id`): every test was scheduled
    alone, so class- and module-scoped stories ran once per worker. The same
    suffix (`@group`), set where pytest 9 reads it; nothing happens when xdist
    already set it, or without loadgroup (`-n 0`, or on the controller).
    """
    if not getattr(config.option, "loadgroup", False):
        return
    from _pytest.nodes import coerce_node_id

    for item in items:
        names = {
            str(m.args[0] if m.args else m.kwargs.get("name", "default")) for m in item.iter_markers("xdist_group")
        }
        if names and "@" not in item.nodeid:
            item._id = coerce_node_id(f"{item.nodeid}@{'_'.join(sorted(names))}")


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own state directory and no real AWS."""
    return isolate(tmp_path_factory, monkeypatch)


@pytest.fixture
def gpurun_home() -> Path:
    return Path(os.environ["GPURUN_HOME"])
