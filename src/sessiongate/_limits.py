"""Argument checks shared by the gate and its backends (one rule for each figure)."""

from __future__ import annotations

import math
import re

#: The largest capacity a gate takes. Far beyond any real gate, and exact where a
#: capacity travels as a float (Prometheus gauges, Redis's Lua numbers): a 400-digit
#: capacity once broke ``/metrics`` and, in Redis mode, every process sharing the gate.
MAX_CAPACITY = 1_000_000_000


def check_int(name: str, value: object, minimum: int, maximum: int | None = None) -> int:
    """``value`` if it is an int (not a bool) in ``[minimum, maximum]``.

    Raises:
        TypeError: not an int.
        ValueError: out of range.
    """
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < minimum or (maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"
        raise ValueError(f"{name} must be {bound}, got {value}")
    return value


def check_capacity(value: object) -> int:
    """A gate's capacity: a whole number from 1 to :data:`MAX_CAPACITY`."""
    return check_int("capacity", value, 1, MAX_CAPACITY)


def check_seconds(name: str, value: object, *, positive: bool = False) -> float:
    """``value`` as float seconds: a finite or infinite number >= 0 (> 0 if ``positive``).

    Raises:
        TypeError: not a number.
        ValueError: NaN, negative (or zero, if ``positive``).
    """
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}")
    if value < 0:
        shown = value if isinstance(value, float) or value.bit_length() < 64 else "a huge int"
        raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'}, got {shown}")
    try:
        seconds = float(value)
    except OverflowError:  # an int too large for a float (10**400)
        raise ValueError(f"{name} is too large for seconds (beyond a float)") from None
    if math.isnan(seconds) or (positive and seconds == 0):
        raise ValueError(f"{name} must be {'> 0' if positive else '>= 0'}, got {value}")
    return seconds


#: A gate's name: what Redis keys and the CLI's ``--gate-name`` take.
GATE_NAME = re.compile(r"[A-Za-z0-9_.-]+")


def check_gate_name(value: object) -> str:
    """A gate's name: letters, digits, ``_``, ``.`` and ``-`` (it goes into Redis keys,
    inside a cluster hash tag: braces or an empty name would break the tag).

    Raises:
        TypeError: not a str.
        ValueError: empty, or another character.
    """
    if not isinstance(value, str):
        raise TypeError(f"gate_name must be a str, not {type(value).__name__}")
    if GATE_NAME.fullmatch(value) is None:
        raise ValueError(f"gate_name must match [A-Za-z0-9_.-]+, got {value!r}")
    return value
