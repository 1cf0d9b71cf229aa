"""The interface every backend implements, so the Redis backend plugs in behind ``Gate``.

A backend owns the two things that differ between one process and many: the slots and
the queue's order. The gate owns everything a backend can share: tickets, the queue
deadline, the queue bound, draining and statistics.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import trio

if TYPE_CHECKING:
    from .._gate import Ticket


@runtime_checkable
class Backend(Protocol):
    """Slots and a FIFO queue of tickets.

    Theory of operation: ``hold(ticket, deadline_scope=...)`` places the ticket in the
    queue, waits until it is the head *and* a slot is free, takes the slot and leaves
    the queue. The body of the ``async with`` runs holding the slot; leaving it, by any
    exit, frees the slot to the next head. Cancelling ``__aenter__`` leaves the queue
    at once.

    A backend shared by several processes may also have a ``handoffs`` attribute, a
    :class:`~sessiongate._stats.HandoffRate` that it feeds with every hand-off of the
    shared queue, whichever process's: the gate then estimates waits from it instead of
    counting its own tickets' hand-offs.
    """

    @property
    def capacity(self) -> int:
        """The slot count in force (global, for a shared backend)."""
        ...

    def set_capacity(self, capacity: int) -> None:
        """Resize at once where possible (growing admits waiters; shrinking cancels nobody)."""
        ...

    async def resize(self, capacity: int) -> None:
        """Resize and wait until the new capacity is in force everywhere."""
        ...

    @property
    def active(self) -> int:
        """Slots held now."""
        ...

    @property
    def queued(self) -> int:
        """Tickets waiting now."""
        ...

    def position(self, ticket: Ticket) -> int | None:
        """1 for the head of the queue; ``None`` unless ``ticket`` is queued."""
        ...

    def reserve(self, ticket: Ticket) -> None:
        """``ticket`` will enter ``hold`` soon: admit no later place
        (:attr:`Ticket.place`) ahead of it meanwhile. Entering ``hold`` ends the
        reservation; so does :meth:`unreserve`. A backend that orders arrivals by their
        stamps by other means may make both no-ops."""
        ...

    def unreserve(self, ticket: Ticket) -> None:
        """``ticket`` will not enter after all."""
        ...

    def hold(
        self, ticket: Ticket, *, deadline_scope: trio.CancelScope | None, max_queue: int
    ) -> AbstractAsyncContextManager[None]:
        """Wait FIFO for a slot under ``deadline_scope``, then hold it for the body.

        ``__aenter__`` enters ``deadline_scope`` (the gate's queue deadline, which the
        gate also cancels to drain) around the wait only; every scope it opens is closed
        by the time it returns, or lifted (``deadline = math.inf``) before the body runs,
        so the body never runs under the queue deadline. A slot handed over at the very
        instant the deadline fires is either kept (the session is admitted) or handed
        straight on (the session expires); it is never lost, and a session is never
        admitted into a cancelled scope. If the wait ends without a slot,
        ``__aenter__`` raises :class:`trio.TooSlowError`, holding nothing.

        ``deadline_scope=None`` means never wait: admit now or raise
        :class:`trio.WouldBlock`. ``__aenter__`` raises :class:`~sessiongate.QueueFull`
        at once, holding nothing, when the ticket would queue behind ``max_queue``
        others (checked atomically with the enqueue). Other refusals (an unreachable
        Redis) are :class:`~sessiongate.AdmissionError` subclasses. An outer
        cancellation leaves the queue at once. Leaving the body, by any exit, frees the
        slot to the head of the queue.
        """
        ...

    async def aclose(self) -> None:
        """Release the backend's own resources (connections, listener tasks)."""
        ...
