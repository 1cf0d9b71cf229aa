"""The in-memory backend: slots are one ``trio.CapacityLimiter``; the queue is ordered.

Theory of operation
-------------------
``trio.CapacityLimiter`` already hands a released token straight to its oldest waiter,
so it gives us direct hand-off and no barging. What it cannot give is *arrival* order:
its waiters are ordered by when their tasks reach ``acquire()``, and Trio may run a batch
of woken tasks in reverse. So only one ticket at a time (the *turn holder*) waits inside
the limiter; the rest wait in a ``SortedList`` keyed by their arrival stamp, each on its
own ``trio.Event``. When the turn holder is admitted or leaves, the lowest stamp left
gets the turn. Invariant: the turn holder, if any, is the ticket with the lowest stamp
at the time the turn was given, and every ticket in the queue either holds the turn or
waits for it.

Positions are O(log n) (``SortedList.bisect_left``), so asking for a waiter's place in a
queue of 10 000 never walks the queue.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING

import trio
from sortedcontainers import SortedList

from .._errors import QueueFull

if TYPE_CHECKING:
    from .._gate import Ticket


class MemoryBackend:
    """One process's slots (a ``trio.CapacityLimiter``) and its FIFO queue."""

    def __init__(self, capacity: int) -> None:
        self._limiter = trio.CapacityLimiter(capacity)
        # Arrival stamps of every queued ticket, lowest (oldest) first.
        self._queue: SortedList = SortedList()
        # Stamp -> event, only for tickets parked waiting for their turn.
        self._turn_events: dict[int, trio.Event] = {}
        # The stamp that may wait inside the limiter; None when nobody does.
        self._turn: int | None = None

    # -- sizes ------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return int(self._limiter.total_tokens)

    def set_capacity(self, capacity: int) -> None:
        # Growing wakes the limiter's waiter at once; the turn then passes down the
        # queue one admission at a time. Shrinking lets current holders finish.
        self._limiter.total_tokens = capacity

    async def resize(self, capacity: int) -> None:
        self.set_capacity(capacity)
        await trio.lowlevel.checkpoint()

    @property
    def active(self) -> int:
        return self._limiter.borrowed_tokens

    @property
    def queued(self) -> int:
        return len(self._queue)

    def position(self, ticket: Ticket) -> int | None:
        index: int = self._queue.bisect_left(ticket.seq)
        if index < len(self._queue) and self._queue[index] == ticket.seq:
            return index + 1
        return None

    # -- the queue --------------------------------------------------------------------

    def _would_wait(self) -> bool:
        limiter = self._limiter
        return bool(self._queue) or limiter.borrowed_tokens >= limiter.total_tokens

    @contextmanager
    def _place(self, seq: int) -> Iterator[None]:
        """Hold a place in the queue for the ``with`` body; leaving it passes the turn on."""
        self._queue.add(seq)
        if self._turn is None:
            self._turn = seq
        try:
            yield
        finally:
            self._leave(seq)

    def _leave(self, seq: int) -> None:
        # Idempotent: called once on admission and again when the place's scope exits.
        if seq not in self._queue:
            return
        self._queue.remove(seq)
        self._turn_events.pop(seq, None)
        if self._turn == seq:
            self._turn = None
            if self._queue:
                self._give_turn(self._queue[0])

    def _give_turn(self, seq: int) -> None:
        self._turn = seq
        event = self._turn_events.get(seq)
        if event is not None:
            event.set()

    async def _wait_turn(self, seq: int) -> None:
        if self._turn == seq:
            return
        event = self._turn_events[seq] = trio.Event()
        await event.wait()

    @asynccontextmanager
    async def hold(
        self, ticket: Ticket, *, wait: bool = True, max_queue: int
    ) -> AsyncIterator[None]:
        if self._would_wait():
            if not wait:
                raise trio.WouldBlock
            if len(self._queue) >= max_queue:
                raise QueueFull(max_queue)
        seq = ticket.seq
        with self._place(seq):
            await self._wait_turn(seq)
            # The turn holder is the limiter's only waiter, so the limiter's own FIFO
            # hand-off on release goes to the oldest arrival.
            async with self._limiter:
                # Admitted: give the next ticket its turn now, not when the session ends.
                self._leave(seq)
                yield

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()
