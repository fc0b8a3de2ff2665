"""Durations and sizes as written in the config (SPEC §3): ``500ms``, ``30s``, ``5m``, ``1h``,
``10MiB``, ``100kB``.

Both are plain numbers underneath so the runtime can use them without unwrapping:
``Duration`` is a ``float`` of seconds, ``Size`` an ``int`` of bytes. Each accepts its text
form in the constructor (``Duration("5m") == 300.0``) and prints back in it (``str``).
``retry_after_delay`` reads the wait an HTTP ``Retry-After`` header asks for.
Imports only the standard library.
"""

from __future__ import annotations

import re
import time
from datetime import UTC
from email.utils import parsedate_to_datetime

__all__ = ["Duration", "Size", "retry_after_delay"]

_DURATION_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*")
_SIZE_UNITS = {
    "": 1, "B": 1,
    "kB": 1000, "KB": 1000, "MB": 1000**2, "GB": 1000**3,
    "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3,
}  # fmt: skip


def _number(value: object, what: str) -> float | None:
    """A YAML int/float as-is; ``None`` for strings (parsed by the caller); else an error."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"expected {what}, got {type(value).__name__}")
    if isinstance(value, str):
        return None
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"a number of {len(str(value))} digits is too large") from None


class Duration(float):
    """Seconds, as a float. ``Duration("500ms")``, ``Duration("30s")``, ``Duration(30)``.

    Units: ``ms``, ``s``, ``m``, ``h``, ``d``; a bare number is seconds. Must be positive:
    no duration in the config means anything at zero.
    """

    def __new__(cls, value: object) -> Duration:
        seconds = _number(value, "a duration like 500ms, 30s, 5m, 1h")
        if seconds is None:
            match = _DURATION_RE.fullmatch(str(value))
            if match is None:
                raise ValueError(f"invalid duration {value!r} (expected e.g. 500ms, 30s, 5m, 1h)")
            seconds = float(match[1]) * _DURATION_UNITS[match[2] or "s"]
        if not seconds > 0 or seconds == float("inf"):
            raise ValueError(f"duration must be positive and finite, got {value!r}")
        return super().__new__(cls, seconds)

    def __str__(self) -> str:
        for unit in ("d", "h", "m", "s"):
            count = float(self) / _DURATION_UNITS[unit]
            if count >= 1 and count.is_integer():
                return f"{int(count)}{unit}"
        return f"{float(self) * 1000:g}ms"

    def __repr__(self) -> str:
        return f"Duration({str(self)!r})"


class Size(int):
    """Bytes, as an int. ``Size("10MiB")``, ``Size("100kB")``, ``Size(1024)``.

    Units: ``B``, ``kB``/``KB``, ``MB``, ``GB`` (powers of 1000) and ``KiB``, ``MiB``, ``GiB``
    (powers of 1024); a bare number is bytes. Must be positive.
    """

    def __new__(cls, value: object) -> Size:
        number = _number(value, "a size like 512KiB, 10MiB, 1GiB")
        if number is not None and not number.is_integer():
            raise ValueError(f"a size in bytes must be a whole number, got {value!r}")
        if number is None:
            match = _SIZE_RE.fullmatch(str(value))
            if match is None or match[2] not in _SIZE_UNITS:
                units = ", ".join(unit for unit in _SIZE_UNITS if unit)
                raise ValueError(f"invalid size {value!r} (units: {units})")
            number = float(match[1]) * _SIZE_UNITS[match[2]]
        if number < 1:
            raise ValueError(f"size must be positive, got {value!r}")
        return super().__new__(cls, int(number))

    def __str__(self) -> str:
        for unit in ("GiB", "MiB", "KiB"):
            count, rest = divmod(int(self), _SIZE_UNITS[unit])
            if count and not rest:
                return f"{count}{unit}"
        return f"{int(self)}B"

    def __repr__(self) -> str:
        return f"Size({str(self)!r})"


def retry_after_delay(value: str | None) -> float | None:
    """A Retry-After header's delay in seconds (delay-seconds or an HTTP-date), else None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if moment.tzinfo is None:  # "-0000": UTC, RFC 5322 section 3.3
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, moment.timestamp() - time.time())
