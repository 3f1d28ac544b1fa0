"""Text read back from a store or a machine, made safe to print.

The one escaping function: `gpurun.ui` passes everything it shows through
`printable`, and the other layers use it where they print or log on their own.
"""

from __future__ import annotations

import re

# C0 and C1 controls, DEL, and the Unicode line separators and bidirectional overrides
# (text that reorders what follows it on the screen): a terminal acts on them.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_CONTROL_KEEPING_LINES = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def printable(text: str, *, one_line: bool = False) -> str:
    """`text` with every control character written out as an escape (ESC as `\\x1b`).

    Host names, run names, file names and error texts may come from a store or a
    machine, and a terminal obeys what it is sent. Tabs and newlines are kept
    unless `one_line` (table cells, one-line messages).
    """
    pattern = _CONTROL if one_line else _CONTROL_KEEPING_LINES
    return pattern.sub(_escaped, text)


def _escaped(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_controls(text: str) -> str:
    """`text` with every control character written as an escape (one line stays one line)."""
    return printable(text, one_line=True)


def escape_log(text: str) -> str:
    """Log text with control characters escaped, keeping newlines and tabs."""
    return printable(text)
