"""The gate's figures: a frozen statistics record, wait quantiles and the hand-off rate.

Both estimators keep bounded memory whatever the load: the last ``WAIT_SAMPLES`` queue
waits, and the hand-offs of the last ``HANDOFF_WINDOW`` seconds (at most
``HANDOFF_SAMPLES`` of them).
"""

from __future__ import annotations

import math
from collections import deque

import attrs

WAIT_SAMPLES = 2048
HANDOFF_WINDOW = 60.0
HANDOFF_SAMPLES = 4096


@attrs.frozen
class GateStats:
    """A snapshot of a gate. Counts are totals since the gate was made."""

    capacity: int
    active: int
    queued: int
    max_wait: float
    max_queue: int
    admitted: int
    completed: int
    failed: int
    expired: int
    rejected: int
    cancelled: int
    #: Quantiles of the queue waits of recently admitted sessions (seconds); None
    #: before any admission.
    wait_p50: float | None
    wait_p90: float | None
    wait_p99: float | None


class WaitQuantiles:
    """Quantiles over the most recent queue waits (nearest-rank, bounded memory)."""

    def __init__(self, size: int = WAIT_SAMPLES) -> None:
        self._samples: deque[float] = deque(maxlen=size)

    def add(self, waited: float) -> None:
        self._samples.append(waited)

    def quantiles(self, *qs: float) -> tuple[float | None, ...]:
        if not self._samples:
            return tuple(None for _ in qs)
        ordered = sorted(self._samples)
        last = len(ordered) - 1
        return tuple(ordered[min(last, max(0, math.ceil(q * len(ordered)) - 1))] for q in qs)


class HandoffRate:
    """Slots handed from the queue to a waiter per second, over about the last minute."""

    def __init__(self, window: float = HANDOFF_WINDOW, size: int = HANDOFF_SAMPLES) -> None:
        self._window = window
        self._times: deque[float] = deque(maxlen=size)

    def add(self, now: float) -> None:
        self._times.append(now)

    def per_second(self, now: float) -> float | None:
        """The recent rate, or None when no hand-off has been seen in the window."""
        times = self._times
        while times and times[0] < now - self._window:
            times.popleft()
        if not times:
            return None
        # A burst at one instant still spans at least a second: an honest lower bound.
        span = max(now - times[0], 1.0)
        return len(times) / span

    def eta(self, position: int, now: float) -> float | None:
        """Seconds until a waiter at ``position`` is likely admitted, or None if unknown."""
        rate = self.per_second(now)
        if rate is None:
            return None
        return position / rate
