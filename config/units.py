"""Human units in settings: sizes (``200GiB``) and durations (``30d``)."""

from __future__ import annotations

import re

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgtp]?i?b?)?\s*", re.IGNORECASE)
_SIZE_FACTORS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "ki": 1024, "kib": 1024,
    "m": 1000**2, "mb": 1000**2, "mi": 1024**2, "mib": 1024**2,
    "g": 1000**3, "gb": 1000**3, "gi": 1024**3, "gib": 1024**3,
    "t": 1000**4, "tb": 1000**4, "ti": 1024**4, "tib": 1024**4,
    "p": 1000**5, "pb": 1000**5, "pi": 1024**5, "pib": 1024**5,
}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d|w)")
_DURATION_FACTORS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_size(value: object) -> int:
    """``200GiB`` -> bytes. Plain numbers are bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 200GiB")
    if isinstance(value, int | float):
        return int(value)
    match = _SIZE.fullmatch(str(value))
    if not match:
        raise ValueError(f"expected a size such as 200GiB, got {value!r}")
    number, unit = match.groups()
    return int(float(number) * _SIZE_FACTORS[(unit or "").lower()])


def parse_duration(value: object) -> float:
    """``1h30m`` / ``30d`` / ``300`` (seconds) -> seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 5m")
    if isinstance(value, int | float):
        return float(value)
    text = str(value).strip().lower()
    try:
        return float(text)
    except ValueError:
        pass
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"expected a duration such as 5m or 30d, got {value!r}")
    return sum(float(n) * _DURATION_FACTORS[u] for n, u in parts)


def format_size(size: float) -> str:
    """Docker's human size: 1000-based, 3 significant digits (``7.8MB``)."""
    units = ["B", "kB", "MB", "GB", "TB", "PB"]
    i = 0
    while size >= 1000 and i < len(units) - 1:
        size /= 1000
        i += 1
    return f"{size:.4g}{units[i]}"
