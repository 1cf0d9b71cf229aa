"""The gate's figures: a frozen statistics record, wait quantiles and the hand-off rate.

Both estimators keep bounded memory whatever the load: the last ``WAIT_SAMPLES`` queue
waits, and the hand-offs of the ``HANDOFF_WINDOW`` seconds up to the latest one (at most
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
    """Slots handed from the queue to a waiter per second, over the minute of hand-offs
    up to the latest one (however long ago that was).

    The rate counts *busy* time only. Each hand-off brings its service gap: the time
    since the previous hand-off, or since the waiter it served arrived if that was later
    (before then, nobody was owed a slot). So a quiet spell with nobody waiting does not
    make a busy queue look slow: short sessions handed on at 100/s between quiet spells
    estimate 100/s, where hand-offs over wall time would say far less and overstate
    every wait. While someone waits, the time since the last hand-off, or since the
    oldest waiter arrived if that was later, counts too beyond a typical gap: a queue
    whose holders stopped leaving is estimated slower and slower, not at its old pace,
    while a burst that has just arrived after a quiet spell is estimated at the pace
    the queue kept when it was last busy.
    """

    def __init__(self, window: float = HANDOFF_WINDOW, size: int = HANDOFF_SAMPLES) -> None:
        self._window = window
        # (when, service gap) of recent hand-offs, oldest first; _busy is their gaps' sum.
        self._handoffs: deque[tuple[float, float]] = deque()
        self._size = size
        self._busy = 0.0
        self._last: float | None = None

    def add(self, now: float, arrived_at: float) -> None:
        """A hand-off at ``now`` to a waiter that arrived at ``arrived_at``."""
        start = arrived_at if self._last is None else max(self._last, arrived_at)
        gap = max(0.0, now - start)
        self._last = now
        handoffs = self._handoffs
        handoffs.append((now, gap))
        self._busy += gap
        # The window ends at the latest hand-off, not at the present: after a quiet
        # spell of any length the pace the queue last kept is still known (an outside
        # review saw eta_s null again once the last hand-off was a minute old).
        while handoffs[0][0] < now - self._window or len(handoffs) > self._size:
            self._busy -= handoffs.popleft()[1]

    def per_second(self, now: float, *, waiting_since: float | None = None) -> float | None:
        """The recent rate, or None before any hand-off.

        ``waiting_since``: someone has been waiting since then (``-inf``: since before
        the last hand-off), so the time since the later of it and the last hand-off is
        busy too; None: nobody waits.
        """
        handoffs = self._handoffs
        if not handoffs:
            return None
        count = len(handoffs)
        busy = max(self._busy, 0.0)
        if waiting_since is not None and self._last is not None:
            # The open gap, beyond the typical one: a stall shows, a steady pace does not.
            busy += max(0.0, (now - max(self._last, waiting_since)) - busy / count)
        # A burst at one instant: no honest rate from it alone; assume one per millisecond.
        return count / max(busy, count * 1e-3)

    def eta(
        self, position: int, now: float, *, waiting_since: float | None = -math.inf
    ) -> float | None:
        """Seconds until a waiter at ``position`` is likely admitted, or None if unknown.

        While someone waits it counts down between hand-offs: the next one is due a
        typical gap after the last (or after the wait began, if later), so the time
        since then comes off, up to one typical gap (a waiter polling a slow queue sees
        its wait shrink, not stand still until its position moves). Past that the
        hand-off is overdue, and the open gap slows the rate instead.
        """
        rate = self.per_second(now, waiting_since=waiting_since)
        if rate is None or self._last is None:
            return None
        wait = position / rate
        if waiting_since is None:  # nobody waits: no hand-off is under way
            return wait
        typical = max(self._busy, 0.0) / len(self._handoffs)
        open_gap = max(0.0, now - max(self._last, waiting_since))
        return max(wait - min(open_gap, typical), 0.0)
