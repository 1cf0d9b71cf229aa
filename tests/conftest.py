"""Fixtures shared by the whole suite.

Timed semantics run on ``MockClock(autojump_threshold=0)`` (pytest-trio's
``autojump_clock`` fixture): a 60 s expiry takes milliseconds and times are exact.
"""

from __future__ import annotations
