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

    def hold(
        self, ticket: Ticket, *, deadline_scope: trio.CancelScope | None, max_queue: int
    ) -> AbstractAsyncContextManager[None]:
        """Wait FIFO for a slot under ``deadline_scope``, then hold it for the body.

        ``__aenter__`` enters ``deadline_scope`` (the gate's queue deadline, which the
        gate also cancels to drain) around the wait, nested inside the backend's own
        scopes so every scope opened here is closed inside ``hold``. Once the slot is
        taken: if ``deadline_scope.cancel_called`` (the deadline fired at that very
        instant), give the slot straight back and raise :class:`trio.TooSlowError`;
        otherwise lift the deadline (``deadline = math.inf``) and run the body. If the
        scope catches its cancellation while waiting, raise :class:`trio.TooSlowError`.

        ``deadline_scope=None`` means never wait: admit now or raise
        :class:`trio.WouldBlock`. ``__aenter__`` raises :class:`~sessiongate.QueueFull`
        at once, holding nothing, when the ticket would queue behind ``max_queue``
        others (checked atomically with the enqueue). Other refusals (an unreachable
        Redis) are :class:`~sessiongate.AdmissionError` subclasses. An outer
        cancellation leaves the queue at once.
        """
        ...

    async def aclose(self) -> None:
        """Release the backend's own resources (connections, listener tasks)."""
        ...
