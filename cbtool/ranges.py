"""Valid ranges of numeric options: one check, one wording, for the CLI and the library alike."""

from __future__ import annotations

import math

from cbtool.errors import CbtoolError


def check_range(flag: str, value: float | int | None, low: float | None = None, high: float | None = None, *,
                low_open: bool = False, high_open: bool = False) -> None:
    """Raise ``CbtoolError`` unless ``value`` (None passes) is a finite number in the range; the message names ``flag``."""
    if value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        raise CbtoolError(f"{flag} must be {_describe(low, high, low_open, high_open)}, not {value}")


def _describe(low, high, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return ("more than " if low_open else "at least ") + f"{low:g}"
    if high is not None:
        return ("less than " if high_open else "at most ") + f"{high:g}"
    return "a finite number"


# numpy's seeds are 32-bit; torch's and Python's take these too.
SEED_RANGE = (0, 2**32 - 1)


def check_seed(value: int, flag: str = "--seed") -> None:
    """Raise ``CbtoolError`` unless ``value`` is an integer seed in ``SEED_RANGE``."""
    low, high = SEED_RANGE
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise CbtoolError(f"{flag} must be an integer in [{low}, {high}], not {value!r}")
