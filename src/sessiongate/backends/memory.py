"""The in-memory backend: slots are one ``trio.CapacityLimiter``; the queue is ordered.

Theory of operation
-------------------
``trio.CapacityLimiter`` already hands a released token straight to its oldest waiter,
so it gives us direct hand-off and no barging. What it cannot give is *arrival* order:
its waiters are ordered by when their tasks reach ``acquire()``, and Trio may run a batch
of woken tasks in reverse. So only one ticket at a time (the *turn holder*) waits inside
the limiter; the rest wait in a ``SortedList`` keyed by their arrival stamp, each task
parked until it is given the turn. When the turn holder is admitted or leaves, the lowest stamp left
gets the turn. Invariant: the turn holder, if any, is the queued ticket with the lowest
stamp, and every other queued ticket waits for the turn. A ticket stamped earlier that
registers late (its task ran after a later one's) takes the turn back, unless the limiter
has already handed the turn holder a slot.

Positions are O(log n) (``SortedList.bisect_left``), so asking for a waiter's place in a
queue of 10 000 never walks the queue.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
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
        # Stamp -> task, only for tickets parked waiting for their turn.
        self._turn_waiters: dict[int, trio.lowlevel.Task] = {}
        # The stamp that may wait inside the limiter; None when nobody does.
        self._turn: int | None = None
        # The turn holder's task and its cancel scope while it waits in the limiter.
        self._turn_task: trio.lowlevel.Task | None = None
        self._turn_scope: trio.CancelScope | None = None

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

    def _enter(self, seq: int) -> None:
        """Take a place in the queue (``_Place`` calls this; its exit calls ``_leave``)."""
        self._queue.add(seq)
        if self._turn is None:
            self._give_turn(seq)
        elif seq < self._turn and not self._turn_is_served():
            # An earlier arrival reached the gate after a later one took the turn (Trio
            # ran their tasks out of order): the earlier one takes the turn back.
            if self._turn_scope is not None:
                self._turn_scope.cancel()
            self._give_turn(seq)

    def _turn_is_served(self) -> bool:
        # True once the limiter has handed the turn holder its token: from then on it is
        # admitted, whether or not its task has run yet, and must not be disturbed.
        task = self._turn_task
        return task is not None and task in self._limiter.statistics().borrowers

    def _leave(self, seq: int) -> None:
        # Idempotent: called once on admission and again when the place's scope exits.
        if seq not in self._queue:
            return
        self._queue.remove(seq)
        self._turn_waiters.pop(seq, None)
        if self._turn == seq:
            self._turn = None
            self._turn_scope = self._turn_task = None
            if self._queue:
                self._give_turn(self._queue[0])

    def _give_turn(self, seq: int) -> None:
        self._turn = seq
        self._turn_scope = self._turn_task = None
        task = self._turn_waiters.pop(seq, None)
        if task is not None:
            trio.lowlevel.reschedule(task)

    async def _wait_turn(self, seq: int) -> None:
        # Parks the task itself rather than a trio.Event per waiter: with 100 000
        # waiters the difference is most of the memory a waiter costs.
        waiters = self._turn_waiters
        while self._turn != seq:
            waiters[seq] = trio.lowlevel.current_task()

            def abort(_: object) -> trio.lowlevel.Abort:
                waiters.pop(seq, None)
                return trio.lowlevel.Abort.SUCCEEDED

            await trio.lowlevel.wait_task_rescheduled(abort)

    @asynccontextmanager
    async def hold(
        self, ticket: Ticket, *, deadline_scope: trio.CancelScope | None, max_queue: int
    ) -> AsyncIterator[None]:
        if not self._would_wait():
            # Uncontended: nobody queued and a slot free. The limiter admits at once
            # (its lot is empty: only a turn holder ever waits there), so no queue
            # place, turn or deadline is needed.
            async with self._limiter:
                yield
            return
        if deadline_scope is None:
            raise trio.WouldBlock
        if len(self._queue) >= max_queue:
            raise QueueFull(max_queue)
        wait_scope = deadline_scope
        seq = ticket.seq
        with _Place(self, seq), wait_scope:
            while True:
                await self._wait_turn(seq)
                # The turn holder is the limiter's only waiter, so the limiter's own FIFO
                # hand-off on release goes to the oldest arrival. The turn scope lets an
                # earlier arrival take the turn back while this one is still parked.
                with trio.CancelScope() as turn_scope:
                    self._turn_scope = turn_scope
                    self._turn_task = trio.lowlevel.current_task()
                    async with self._limiter:
                        # Served: the next ticket gets its turn now, not at our exit.
                        self._leave(seq)
                        if not wait_scope.cancel_called:
                            # The deadline covers waiting only: lift it for the session.
                            wait_scope.deadline = math.inf
                            yield
                            return
                        # Served at the very instant the wait ended (deadline or drain):
                        # leaving the limiter hands the slot straight on.
                if not turn_scope.cancelled_caught:
                    break
        raise trio.TooSlowError

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


class _Place:
    """A ticket's place in the queue, held for a ``with`` block; leaving passes the turn."""

    __slots__ = ("_backend", "_seq")

    def __init__(self, backend: MemoryBackend, seq: int) -> None:
        self._backend = backend
        self._seq = seq

    def __enter__(self) -> None:
        self._backend._enter(self._seq)

    def __exit__(self, *exc_info: object) -> None:
        self._backend._leave(self._seq)
