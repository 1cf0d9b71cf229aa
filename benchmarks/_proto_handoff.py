"""A *prototype* in-memory backend, for measurement only: FIFO hand-off done by the releaser.

Not product code. It exists so that the benchmarks can show, in the same run, what the
change suggested in ``benchmarks/README.md`` would buy over ``MemoryBackend``:

* Waiters park in a ``SortedDict`` keyed by arrival stamp (no turn, no turn scope).
* Whoever frees a slot (a holder leaving, a resize) takes tokens from the
  ``trio.CapacityLimiter`` *on behalf of the queue heads*, oldest stamp first, for as
  many heads as there are free tokens, and reschedules their tasks: every slot freed in
  a scheduler pass is handed over in that pass, in arrival order, whatever order Trio
  then runs the woken tasks in.
* A holder releases on behalf of its ticket. Slot and queue place are still owned by
  scopes: the gate's deadline scope around the park, the hold's ``async with``.

A waiter cancelled (deadline, caller gone) before it is handed a token leaves the queue
through the park's abort; once handed a token it is admitted even if its deadline fires
in the same instant (the park can no longer be aborted).
"""

from __future__ import annotations

import math
from types import TracebackType
from typing import Any

import trio
from sortedcontainers import SortedDict

from sessiongate import QueueFull


class HandoffBackend:
    def __init__(self, capacity: int) -> None:
        self._limiter = trio.CapacityLimiter(capacity)
        # stamp -> (ticket, task) of every parked waiter, oldest first.
        self._queue: SortedDict = SortedDict()

    @property
    def capacity(self) -> int:
        return int(self._limiter.total_tokens)

    def set_capacity(self, capacity: int) -> None:
        self._limiter.total_tokens = capacity
        self._grant()

    async def resize(self, capacity: int) -> None:
        self.set_capacity(capacity)
        await trio.lowlevel.checkpoint()

    @property
    def active(self) -> int:
        return self._limiter.borrowed_tokens

    @property
    def queued(self) -> int:
        return len(self._queue)

    def position(self, ticket: Any) -> int | None:
        if ticket.seq not in self._queue:
            return None
        return int(self._queue.index(ticket.seq)) + 1

    @property
    def healthy(self) -> bool:
        return True

    def hold(self, ticket: Any, *, deadline_scope: trio.CancelScope | None, max_queue: int) -> Any:
        return _Hold(self, ticket, deadline_scope, max_queue)

    def _grant(self) -> None:
        """Hand every free token to the queue heads, oldest stamp first."""
        limiter, queue = self._limiter, self._queue
        while queue and limiter.borrowed_tokens < limiter.total_tokens:
            _, (ticket, task) = queue.popitem(0)
            limiter.acquire_on_behalf_of_nowait(ticket)
            trio.lowlevel.reschedule(task)

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


class _Hold:
    __slots__ = ("_backend", "_max_queue", "_scope", "_ticket")

    def __init__(
        self,
        backend: HandoffBackend,
        ticket: Any,
        scope: trio.CancelScope | None,
        max_queue: int,
    ) -> None:
        self._backend = backend
        self._ticket = ticket
        self._scope = scope
        self._max_queue = max_queue

    async def __aenter__(self) -> None:
        backend, ticket = self._backend, self._ticket
        limiter, queue = backend._limiter, backend._queue
        if not queue and limiter.borrowed_tokens < limiter.total_tokens:
            await trio.lowlevel.checkpoint_if_cancelled()
            limiter.acquire_on_behalf_of_nowait(ticket)
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        scope = self._scope
        if scope is None:
            raise trio.WouldBlock
        if len(queue) >= self._max_queue:
            raise QueueFull(self._max_queue)
        seq = ticket.seq

        def abort(_: object) -> trio.lowlevel.Abort:
            queue.pop(seq, None)
            return trio.lowlevel.Abort.SUCCEEDED

        with scope:
            queue[seq] = (ticket, trio.lowlevel.current_task())
            # An earlier arrival that registers late simply sorts first: the next
            # release serves it.
            backend._grant()
            if seq in queue:
                await trio.lowlevel.wait_task_rescheduled(abort)
            else:
                await trio.lowlevel.cancel_shielded_checkpoint()
        # Handed a token unless the park was aborted (the abort only succeeds while the
        # waiter is still queued, so a grant and a deadline cannot both happen).
        if not scope.cancelled_caught:
            scope.deadline = math.inf
            return
        raise trio.TooSlowError

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        backend = self._backend
        backend._limiter.release_on_behalf_of(self._ticket)
        backend._grant()
