"""Checks of settings that need no data: every entry point calls them first, so a bad value is refused before any
dataset is read or any feature extracted (issue 21, item 7). Covered by tests/test_arguments.py.

Each check raises :class:`~instdisc.errors.InstdiscError` with a one-line message naming the option as the CLI
spells it and the value that was wrong.
"""
from __future__ import annotations

import math
import numbers

from .errors import InstdiscError

__all__ = ["check_int", "check_positive", "check_non_negative", "check_choice"]


def check_int(value, name: str, minimum: int, *, optional: bool = False) -> None:
    """``value`` is an integer >= ``minimum`` (or None when ``optional``)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise InstdiscError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_positive(value, name: str, *, optional: bool = False) -> None:
    """``value`` is a finite number > 0 (or None when ``optional``)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < math.inf:
        raise InstdiscError(f"{name} must be a finite number > 0, got {value!r}")


def check_non_negative(value, name: str) -> None:
    """``value`` is a finite number >= 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value < math.inf:
        raise InstdiscError(f"{name} must be a finite number >= 0, got {value!r}")


def check_choice(value, name: str, allowed) -> None:
    """``value`` is one of ``allowed``."""
    if value not in tuple(allowed):
        raise InstdiscError(f"{name} must be one of {', '.join(map(str, allowed))}, got {value!r}")
