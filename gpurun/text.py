"""Text read back from a store or a machine, made safe to print."""

from __future__ import annotations

import re

# C0 and C1 controls and DEL: a terminal acts on them (escape sequences, carriage returns).
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_CONTROLS_BUT_LINES = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def _escaped(match: re.Match[str]) -> str:
    return f"\\x{ord(match.group()):02x}"


def escape_controls(text: str) -> str:
    """`text` with every control character written as \\xNN (one line stays one line)."""
    return _CONTROLS.sub(_escaped, text)


def escape_log(text: str) -> str:
    """Log text with control characters escaped, keeping newlines and tabs."""
    return _CONTROLS_BUT_LINES.sub(_escaped, text)
