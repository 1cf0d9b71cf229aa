"""The interface every backend implements, so the Redis backend plugs in behind ``Gate``.

A backend owns the two things that differ between one process and many: the slots and
the queue's order. The gate owns everything a backend can share: tickets, the queue
deadline, the queue bound, draining and statistics.
"""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from .._gate import Ticket


@runtime_checkable
class Backend(Protocol):
    """Slots and a FIFO queue of tickets.

    Theory of operation: ``hold(ticket)`` is entered under the gate's queue-deadline
    cancel scope. Its ``__aenter__`` places the ticket in the queue, waits until the
    ticket is the head *and* a slot is free, takes the slot and leaves the queue; it
    must not checkpoint after taking the slot, so that a deadline firing at the same
    instant cannot cancel a session that already holds one. The body of the
    ``async with`` runs holding the slot; leaving it, by any exit, frees the slot to the
    next head. Cancelling ``__aenter__`` leaves the queue at once.
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
        self, ticket: Ticket, *, wait: bool = True, max_queue: int
    ) -> AbstractAsyncContextManager[None]:
        """Wait FIFO for a slot, then hold it for the body.

        ``__aenter__`` raises :class:`~sessiongate.QueueFull` at once, holding nothing,
        when the ticket would have to queue behind ``max_queue`` others already waiting
        (checked atomically with the enqueue). With ``wait=False`` the ticket is admitted
        only if it would not queue at all; otherwise ``__aenter__`` raises
        :class:`trio.WouldBlock`. Other refusals (an unreachable Redis) are raised as
        :class:`~sessiongate.AdmissionError` subclasses.
        """
        ...

    async def aclose(self) -> None:
        """Release the backend's own resources (connections, listener tasks)."""
        ...
