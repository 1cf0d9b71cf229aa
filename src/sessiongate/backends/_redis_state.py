"""What one process knows about a Redis gate: answers, waiters, leases, clocks, queue.

These are plain values and small structures used by :mod:`.redis`; nothing here talks
to Redis.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, Final

import attrs
import trio
from sortedcontainers import SortedList

from .._stats import HandoffRate

if TYPE_CHECKING:
    from .._gate import Ticket


@attrs.frozen
class Figures:
    """The head of every script answer and published message (see the script)."""

    ver: int
    active: int
    queued: int
    capacity: int
    #: The nearest lease expiry or recovery end (Redis ms), -1 for none.
    next_deadline: int
    #: Redis ``TIME`` when the step ran (ms).
    now: int
    #: The gate's epoch; empty in published messages.
    epoch: str
    #: The step's change lines (``E``/``D``/``G``), newline-separated.
    events: str

    @classmethod
    def from_answer(cls, raw: Sequence[Any]) -> Figures:
        return cls(
            int(raw[0]),
            int(raw[1]),
            int(raw[2]),
            int(raw[3]),
            int(raw[4]),
            int(raw[5]),
            str(raw[6]),
            str(raw[7]),
        )

    @classmethod
    def from_message(cls, data: str) -> Figures:
        head, _, events = data.partition("\n")
        v = head.split(" ")
        return cls(int(v[1]), int(v[2]), int(v[3]), int(v[4]), int(v[5]), int(v[6]), "", events)

    def lines(self) -> list[list[str]]:
        return [line.split(" ") for line in self.events.split("\n") if line]


@attrs.frozen
class Grant:
    """A slot handed to a member: its fencing token and lease expiry (Redis ms)."""

    fence: int
    expires: int


@attrs.define(eq=False)
class Waiter:
    """One ticket on its way through the queue, in this process."""

    member: str
    #: Orders this process's arrivals: (arrival time, arrival number, member).
    key: tuple[float, int, str]
    wait: bool
    max_queue: int
    #: Set once the enqueue step answered; ``status`` says how: 'G' granted, 'Q'
    #: queued, 'W' would wait, 'F' queue full, 'error'. 'sent' while in flight.
    answered: trio.Event = attrs.field(factory=trio.Event)
    status: str = ""
    error: BaseException | None = None
    #: The Redis arrival number, once queued.
    seq: str | None = None
    #: Being enqueued again (its place lapsed, or Redis lost the gate).
    requeue: bool = False
    #: Set when a slot was handed over (``grant`` holds it).
    granted: trio.Event = attrs.field(factory=trio.Event)
    grant: Grant | None = None
    grant_seen_at: float = 0.0
    #: The session's ticket, stamped at the instant its grant is seen (a hand-off).
    ticket: Ticket | None = None


@attrs.define(eq=False)
class Lease:
    """A slot held by a session of this process."""

    member: str
    fence: int
    #: The gate epoch the slot belongs to (a new epoch means Redis lost it).
    epoch: str
    #: Local time by which the body must have been cancelled.
    valid_until: float
    #: Local time the lease was last confirmed (grant seen, or a renewal sent).
    basis: float


class ClockBound:
    """Where a Redis instant falls on the local Trio clock, within round-trip bounds.

    A Redis ``TIME`` read by a call sent at local ``ts`` and answered at ``tr``
    happened in ``[ts, tr]``, so the offset ``d = redis - local`` lies in
    ``[redis - tr, redis - ts]``. Intersecting recent samples narrows it; only the last
    :attr:`WINDOW` seconds count, so the clocks' drift never accumulates.
    """

    WINDOW: Final = 30.0

    def __init__(self) -> None:
        # (answered at, lowest offset, highest offset), in seconds.
        self._samples: deque[tuple[float, float, float]] = deque(maxlen=64)
        # The latest local time mapped by ``arrival_us``, and where it went.
        self._last_arrival: tuple[float, int] | None = None

    def sample(self, redis_ms: int, ts: float, tr: float) -> None:
        redis_s = redis_ms / 1000
        self._samples.append((tr, redis_s - tr, redis_s - ts))

    def _recent(self) -> list[tuple[float, float, float]]:
        now = trio.current_time()
        recent = [s for s in self._samples if now - s[0] <= self.WINDOW]
        return recent or list(self._samples)[-1:]

    def earliest(self, redis_ms: int) -> float | None:
        """The earliest local time ``redis_ms`` can come at (where leases must end)."""
        recent = self._recent()
        if not recent:
            return None
        return redis_ms / 1000 - min(s[2] for s in recent)

    def redis_at_most(self, local: float) -> int | None:
        """The latest Redis time (ms) that local time ``local`` can be."""
        recent = self._recent()
        if not recent:
            return None
        return math.ceil((local + min(s[2] for s in recent)) * 1000)

    def redis_us(self, local: float) -> int | None:
        """Local time ``local`` on Redis's clock (µs), best estimate: the middle of the
        offset's bounds, plus half a millisecond (``TIME`` is read in whole ms, so each
        sample's Redis instant is up to 1 ms later than it says). None before any call."""
        recent = self._recent()
        if not recent:
            return None
        lowest = max(s[1] for s in recent)
        highest = min(s[2] for s in recent)
        return round((local + (lowest + highest) / 2 + 0.0005) * 1e6)

    def arrival_us(self, local: float) -> int | None:
        """:meth:`redis_us` for arrivals, kept in their local order as they are sent: a
        stamp never maps before an earlier one sent before it. The estimate moves as
        samples narrow the offset (most in a process's first calls), and a new
        process's first burst had its later arrivals queued ahead of its own earlier
        ones, sent a batch before (an outside review: one stamped 0.14 ms after five
        others admitted first). A stamp sent after a later one (its body took longer
        to read) maps through the estimate of the moment: placed among them within
        the estimate's movement since (~0.1 ms once warm), not exactly."""
        mapped = self.redis_us(local)
        if mapped is None:
            return None
        last = self._last_arrival
        if last is not None:
            last_local, last_mapped = last
            if local >= last_local and mapped <= last_mapped:
                mapped = last_mapped + 1  # just after it (1 µs: the finest Redis keeps)
            elif local < last_local:
                return mapped  # an older arrival sent late: the latest stays the mark
        self._last_arrival = (local, mapped)
        return mapped

    def latest(self, redis_ms: int) -> float | None:
        """The latest local time ``redis_ms`` can come at (when lapsed leases are due)."""
        recent = self._recent()
        if not recent:
            return None
        return redis_ms / 1000 - max(s[1] for s in recent)


#: How many departed queue entries the mirror remembers (see ``QueueMirror._gone``).
GONE_KEPT: Final = 4096


class QueueMirror:
    """This process's copy of the global queue, for exact positions without a round trip,
    and the global queue's hand-off rate, for every process's ETA.

    Fed in order by the published changes (each carries the gate's ``ver``); rebuilt
    from a snapshot after (re)subscribing or when a change was missed. Each hand-off
    (``G`` of a mirrored entry) counts in :attr:`handoffs` with the time its entry was
    seen entering the queue: every process sees every hand-off, so each estimates from
    the whole queue's pace. Counting only its own hand-offs, a process of N estimated
    waits about N times too long (an outside review: 1.5x and 2.6x with two workers).
    """

    def __init__(self) -> None:
        # Member -> (queue sequence number, when it was seen entering: Trio clock).
        self._seq_of: dict[str, tuple[int, float]] = {}
        self._seqs: SortedList = SortedList()
        # Entries seen leaving (member -> its seq), the latest few thousand: an enqueue
        # answer read after its entry has already left must not put it back.
        self._gone: OrderedDict[str, int] = OrderedDict()
        self.ver = -1
        self.ok = False
        self.handoffs = HandoffRate()

    def reset(self, entries: Iterable[tuple[str, int]], ver: int) -> None:
        now = trio.current_time()  # when they entered is not known: since the snapshot
        self._seq_of = {member: (seq, now) for member, seq in entries}
        self._seqs = SortedList(seq for seq, _ in self._seq_of.values())
        self.ver = ver
        self.ok = True

    def apply(self, figures: Figures) -> bool:
        """Apply one published change; False if one was missed (take a snapshot)."""
        if not self.ok or figures.ver <= self.ver:
            return True  # not built yet, or already in the snapshot
        if figures.ver != self.ver + 1:
            self.ok = False
            return False
        self.ver = figures.ver
        now = trio.current_time()
        entered: set[str] = set()
        for parts in figures.lines():
            if parts[0] == "E":
                seq, member = int(parts[1]), parts[2]
                if self._enter(member, seq, now):
                    entered.add(member)
            else:  # 'D' left, 'G' granted: either way out of the queue
                member = parts[1]
                gone = self._seq_of.pop(member, None)
                if gone is not None:
                    self._seqs.remove(gone[0])
                    self._note_gone(member, gone[0])
                    # A hand-off, unless the entry entered in this same change (it
                    # went through a free slot without waiting).
                    if parts[0] == "G" and member not in entered:
                        self.handoffs.add(now, gone[1])
        return True

    def note_entered(self, member: str, seq: int) -> None:
        """This process's own entry, as the enqueue script answered: mirrored now, not
        only once its published change arrives. After a stall or a lost subscription
        the change comes later (or only with the next snapshot), and two waiters of
        this process both missing from the mirror were both told position 1 (an
        outside chaos test)."""
        if self._gone.get(member) != seq:  # not an entry that has left already
            self._enter(member, seq, trio.current_time())

    def _enter(self, member: str, seq: int, now: float) -> bool:
        """Mirror ``member`` at ``seq``; False if it was there already at that seq. A
        member there at another seq (enqueued again after its place lapsed) moves."""
        known = self._seq_of.get(member)
        if known is not None:
            if known[0] == seq:
                return False
            self._seqs.remove(known[0])
        self._seq_of[member] = (seq, now if known is None else known[1])
        self._seqs.add(seq)
        return known is None

    def _note_gone(self, member: str, seq: int) -> None:
        self._gone[member] = seq
        if len(self._gone) > GONE_KEPT:
            self._gone.popitem(last=False)

    def rank(self, seq: int) -> int:
        """1 + how many queued entries arrived before ``seq``. O(log n)."""
        index: int = self._seqs.bisect_left(seq)
        return index + 1
