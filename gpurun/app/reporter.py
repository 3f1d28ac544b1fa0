"""What the workflows need from whoever shows their progress (the CLI passes its `ui.Ui`).

The app layer sits below `ui`, so it names only this protocol.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Protocol


class Reporter(Protocol):
    def say(self, message: str) -> None: ...

    def warn(self, message: str) -> None: ...

    def error(self, message: str) -> None: ...

    def table(
        self,
        columns: list[str],
        rows: list[list[str]],
        *,
        title: str | None = None,
        styles: dict[str, str] | None = None,
    ) -> None: ...

    def spinner(self, text: str) -> AbstractContextManager[Callable[[str], None]]: ...

    def progress(
        self, description: str, total: int | None, unit: str = "bytes"
    ) -> AbstractContextManager[Callable[[int], None]]: ...
