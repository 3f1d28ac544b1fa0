"""Durations as people write them: 90s, 5m, 12h, 1d (or plain seconds)."""

from __future__ import annotations

import math
import re

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_PATTERN = re.compile(r"[ ]*([0-9]{1,30}(?:\.[0-9]{1,9})?)[ ]*([smhd]?)[ ]*", re.ASCII)
MAX_SECONDS = 366 * 86400


def _show(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


def parse_duration(value: object) -> float:
    """Seconds for `value`; raises ValueError (one line) with what is accepted."""
    if isinstance(value, bool):
        raise ValueError(f"expected a duration like 90s, 5m, 12h or 1d, got {value!r}")
    if isinstance(value, (int, float)):
        if isinstance(value, int) and abs(value) > MAX_SECONDS:
            raise ValueError("a duration must be at most 366d")
        seconds = float(value)
        if math.isnan(seconds):
            raise ValueError("expected a duration like 90s, 5m, 12h or 1d, got nan")
    elif isinstance(value, str):
        match = _PATTERN.fullmatch(value)
        if not match:
            raise ValueError(f"{_show(value)} is not a duration; use a number with s, m, h or d, like 90s, 5m, 12h, 1d")
        seconds = float(match.group(1)) * _UNITS[match.group(2) or "s"]
    else:
        raise ValueError(f"expected a duration like 90s, 5m, 12h or 1d, got {type(value).__name__}")
    if seconds <= 0:
        raise ValueError("a duration must be greater than zero, like 90s, 5m, 12h or 1d")
    if seconds > MAX_SECONDS:
        raise ValueError("a duration must be at most 366d")
    return seconds


def format_duration(seconds: float) -> str:
    """Short human form: 45s, 5m, 2h10m, 3d."""
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        minutes, rest = divmod(seconds, 60)
        return f"{minutes}m" + (f"{rest}s" if rest else "")
    if seconds < 86400:
        hours, rest = divmod(seconds, 3600)
        return f"{hours}h" + (f"{rest // 60}m" if rest >= 60 else "")
    days, rest = divmod(seconds, 86400)
    return f"{days}d" + (f"{rest // 3600}h" if rest >= 3600 else "")
