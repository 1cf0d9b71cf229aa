"""The in-memory backend: slots are one ``trio.CapacityLimiter``; the queue is ordered.

Theory of operation
-------------------
Slots are the limiter's tokens, borrowed on behalf of tickets. Waiters park in a
``SortedDict`` keyed by their place (:attr:`Ticket.place`: arrival stamp, then
sequence number). Whoever frees a slot (a holder leaving, a
resize) hands it on in the same step: it borrows tokens *on behalf of the queue's
heads*, oldest stamp first, as many as are free, and reschedules their tasks. So every
slot freed in a scheduler pass is handed over in that pass, in arrival order, whatever
order Trio then runs the woken tasks in; no one polls, and no newcomer can take a slot
while anyone waits (the uncontended fast path is taken only when the queue is empty).

Arrival order is the stamp's order, not the order in which tasks reach the gate: a
ticket stamped earlier that enters later simply sorts ahead. A stamp taken with
``reserve`` (the web layer stamps a request before it starts the session's task) also
keeps a slot for itself against later stamps until it enters or is withdrawn: a later
stamp takes a free slot only if enough are left for every earlier reservation, so a
burst of arrivals is admitted in stamp order even when Trio runs their tasks in
reverse, and a burst smaller than the free slots never waits at all.

Invariants (checked by the property tests):

* a queued ticket is never left waiting while a token is free, unless every free
  token is spoken for by an earlier reserved stamp about to enter;
* tokens are only ever handed to the lowest stamps queued;
* a parked waiter's abort succeeds only while it is still queued, so a waiter is either
  handed a token or leaves the queue, never both.

Positions are O(log n) (``SortedDict.index``), so asking for a waiter's place in a
queue of 10 000 never walks the queue.
"""

from __future__ import annotations

import itertools
from collections import deque
from types import TracebackType
from typing import TYPE_CHECKING, Final

import trio
from sortedcontainers import SortedDict, SortedList

from .._errors import QueueFull
from .._limits import check_capacity

if TYPE_CHECKING:
    from .._gate import Ticket

#: Admissions past reserved arrivals remembered for those arrivals' stamps.
PASSES_KEPT: Final = 512


class MemoryBackend:
    """One process's slots (a ``trio.CapacityLimiter``) and its FIFO queue."""

    def __init__(self, capacity: int) -> None:
        self._limiter = trio.CapacityLimiter(check_capacity(capacity))
        # Place (arrival stamp, sequence number) -> the parked waiter, oldest first.
        self._queue: SortedDict = SortedDict()
        # Places reserved by ``reserve`` whose sessions have not entered yet, and the
        # order number of each reservation (in reservation order).
        self._reserved: SortedList = SortedList()
        self._reserved_order: dict[tuple[float, int], int] = {}
        # (place, when, order number) of admissions past earlier reservations still to
        # enter, oldest first; forgotten once no reservation is left (bounded all the
        # same).
        self._passes: deque[tuple[tuple[float, int], float, int]] = deque(maxlen=PASSES_KEPT)
        # Orders reservations and passes, also those of one clock reading (MockClock, a
        # coarse clock): a pass in the same instant but before a reservation was not
        # past it (an outside review).
        self._order = itertools.count()

    # -- sizes ------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        return int(self._limiter.total_tokens)

    def set_capacity(self, capacity: int) -> None:
        # Growing hands the new slots to the queue's heads at once; shrinking lets the
        # current holders finish (the limiter lends no token above its total).
        self._limiter.total_tokens = check_capacity(capacity)
        self._passes.clear()  # a shrink may take the slots set aside
        self._hand_on()

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
        """1 = next. Earlier reserved arrivals still to enter count too, those that no
        free slot will take: they go first (it said 1, then 2 as one entered: an
        outside review)."""
        place = ticket.place
        if place not in self._queue:
            return None
        return int(self._queue.index(place)) + self._claimed_before(place) + 1

    def _claimed_before(self, place: tuple[float, int]) -> int:
        """Earlier reserved arrivals still to enter that no free slot will take: they
        will queue ahead of ``place``."""
        if not self._reserved:
            return 0
        limiter = self._limiter
        free = max(0, limiter.total_tokens - limiter.borrowed_tokens)
        return max(0, int(self._reserved.bisect_left(place)) - int(free))

    # -- arrival order ----------------------------------------------------------------

    def reserve(self, ticket: Ticket) -> None:
        place = ticket.place
        if place not in self._reserved:  # idempotent: one reservation per place
            self._reserved.add(place)
            self._reserved_order[place] = next(self._order)

    def unreserve(self, ticket: Ticket) -> None:
        place = ticket.place
        if place in self._reserved:
            self._reserved.remove(place)
            del self._reserved_order[place]
            self._prune_passes()
            self._hand_on()

    def _note_admission(self, place: tuple[float, int], now: float) -> None:
        """An arrival at ``place`` was admitted at ``now``: if earlier reserved arrivals
        are still to enter, it passed them, their slots set aside for them. If fewer
        slots are free than reservations owed one, a slot set aside was taken (by an
        earlier stamp that was not reserved then): no pass vouches for a free slot any
        more, and a stamp dated back to one came before the release that really freed
        its slot (the day's regression review)."""
        reserved = self._reserved
        passes = self._passes
        if not reserved:
            passes.clear()  # nobody is owed a slot
            return
        if passes:
            # The reservations owed a slot: those before the latest place that passed.
            owed = reserved.bisect_left(max(passes)[0])
            if self._limiter.total_tokens - self._limiter.borrowed_tokens < owed:
                passes.clear()
        if reserved.bisect_left(place) > 0:
            self._prune_passes()
            passes.append((place, now, next(self._order)))

    def _prune_passes(self) -> None:
        """Forget the passes no reservation can be owed from: those before the oldest
        reservation still held was made (a later one is made later still). Under a
        steady load some reservation is nearly always held, and the passes kept piling
        up to their bound, scanned at every reserved admission (+5 % instructions per
        request, measured)."""
        passes = self._passes
        oldest = next(iter(self._reserved_order.values()), None)
        if oldest is None:
            passes.clear()
            return
        while passes and passes[0][2] < oldest:
            passes.popleft()

    def _admit_entering(
        self, place: tuple[float, int], now: float, reserved_order: int | None
    ) -> float:
        """The admission stamp of an arrival taking a slot as it enters, now (its pass
        noted): for one that was reserved, when the first later arrival passed it while
        it was reserved, if one did, its slot set aside for it since then. Tasks
        entering in one scheduler batch run in any order, and a burst's admission stamps
        came out reversed by tens of microseconds, though the slots went in arrival
        order (an outside review). Stamped before its own pass is noted: noting prunes
        the passes by the reservations still held, its own no longer among them."""
        stamp = now
        if reserved_order is not None:
            for passed, at, order in self._passes:
                if passed > place and order > reserved_order:  # passed after it was reserved
                    stamp = min(at, now)
                    break
        self._note_admission(place, now)
        return stamp

    def _free_for(self, place: tuple[float, int]) -> bool:
        """A slot is free for ``place`` once each earlier reserved place, about to
        enter, can have one too: those go first, and FIFO holds whatever order they
        enter in."""
        limiter = self._limiter
        free = limiter.total_tokens - limiter.borrowed_tokens
        return free > 0 and free > self._reserved.bisect_left(place)

    def _over_max_queue(self, place: tuple[float, int], max_queue: int) -> bool:
        """Whether more than ``max_queue`` would wait with ``place`` queued (itself
        included): the queue, and the earlier reserved places still to enter that no
        free slot will take. Those claim their queue places first, as they claim free
        slots: a later arrival whose task entered first took the last place, and the
        earlier one was refused queue_full (an outside review). Waits that ran out
        unseen (a busy loop) fill nothing: dropped before a refusal."""
        claimed = self._claimed_before(place)
        if len(self._queue) + claimed <= max_queue:
            return False
        self._drop_lapsed_heads()
        return len(self._queue) + claimed > max_queue

    def _drop_lapsed_heads(self) -> None:
        """Take out of the queue the heads whose wait has run out but whose expiry Trio
        has not delivered yet (the loop was busy past their deadline): as when a slot is
        handed on, each expires at Trio's next look at the clock and its abort finds it
        gone. Counted as waiting, they had an arrival refused queue_full with nobody
        really waiting (an outside review). Heads only: deadlines follow the queue's
        order while max_wait stays the same."""
        queue = self._queue
        now = trio.current_time()
        while queue:
            waiter = queue.peekitem(0)[1]
            scope = waiter._scope
            if scope is None or scope.deadline > now:
                return
            del queue[waiter.ticket.place]
            waiter.expired = True

    def _hand_on(self, *, released: bool = False) -> None:
        """Hand every free slot to the queue's heads, oldest stamp first.

        ``released``: a holder has just given its slot back. Only that slot's hand-off
        counts towards the hand-off rate (what ETAs and Retry-After estimate from): a
        slot that was free all along and kept for an earlier reservation (a burst) says
        nothing about how fast holders leave. Counted, those made Retry-After climb to
        20 s in a burst's first second, before any session had ended (outside review).
        """
        limiter, queue = self._limiter, self._queue
        while queue and limiter.borrowed_tokens < limiter.total_tokens:
            place, waiter = queue.peekitem(0)
            if not self._free_for(place):
                return
            del queue[place]
            # One clock reading for the deadline's check and the admission stamp.
            now = trio.current_time()
            scope = waiter._scope
            if scope is not None and scope.deadline <= now:
                # Its queue deadline has passed. Parked, Trio delivers the expiry at its
                # next look at the clock (the loop was busy): it expires then and must
                # not be admitted now (outside review: 158 sessions under an overload ran
                # up to 24 ms past it); its abort finds it gone. Entering (this is its
                # own task), it expires as it enters.
                waiter.expired = True
                continue
            limiter.acquire_on_behalf_of_nowait(waiter.ticket)
            task = waiter.task
            if task is None:
                # Served as it enters (its own task, not parked yet): stamped at this
                # decision, not a scheduler pass later when its task resumes (a busy
                # pass made it look admitted past max_wait: an outside review).
                waiter.ticket.admitted_at = self._admit_entering(place, now, waiter.reserved_order)
                continue
            self._note_admission(place, now)
            waiter.ticket.handed_over(counted=released, now=now)  # the hand-off's instant
            released = False  # one slot given back, one hand-off
            trio.lowlevel.reschedule(task)

    # -- holding a slot ---------------------------------------------------------------

    def hold(
        self, ticket: Ticket, *, deadline_scope: trio.CancelScope | None, max_queue: int
    ) -> _Hold:
        return _Hold(self, ticket, deadline_scope, max_queue)

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


class _Hold:
    """``async with`` holds one slot: entering waits FIFO for it, leaving hands it on.

    Entering parks the task under the gate's deadline scope; the slot is borrowed on
    the ticket's behalf, by the releaser that hands it over or by the fast path.
    """

    __slots__ = ("_backend", "_max_queue", "_scope", "expired", "reserved_order", "task", "ticket")

    def __init__(
        self,
        backend: MemoryBackend,
        ticket: Ticket,
        scope: trio.CancelScope | None,
        max_queue: int,
    ) -> None:
        self._backend = backend
        self.ticket = ticket
        self._scope = scope
        self._max_queue = max_queue
        self.task: trio.lowlevel.Task | None = None
        #: Set by the releaser when it found this ticket's wait run out.
        self.expired = False
        #: The order number of this ticket's reservation, if it was reserved.
        self.reserved_order: int | None = None

    async def __aenter__(self) -> None:
        backend, ticket = self._backend, self.ticket
        place = ticket.place
        # Entering ends this stamp's reservation, in the same step as it takes its place
        # (no checkpoint in between), so no later stamp can slip ahead.
        was_reserved = place in backend._reserved
        if was_reserved:
            backend._reserved.remove(place)
            self.reserved_order = backend._reserved_order.pop(place)
        queue = backend._queue
        if not queue and backend._free_for(place):
            # Uncontended: nobody waits and a slot is free.
            await trio.lowlevel.checkpoint_if_cancelled()
            now = trio.current_time()
            scope = self._scope
            if scope is not None and scope.deadline <= now:
                # Its wait ran out between the gate's look at the clock and this one
                # (microseconds on the real clock): admitted, it would show a wait past
                # max_wait (an outside review). It expires as it enters.
                if was_reserved:
                    backend._hand_on()
                raise trio.TooSlowError
            backend._limiter.acquire_on_behalf_of_nowait(ticket)
            # Stamped now, with the clock the deadline was checked against: through the
            # pass below a drain (``aclose``) must see that it holds a slot (an outside
            # review: aclose returned while it then ran).
            ticket.admitted_at = backend._admit_entering(place, now, self.reserved_order)
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        scope = self._scope
        queue[place] = self
        # This stamp may sort first, or its reservation may have held others back (they
        # may go now). A slot free for it is its own, however long the queue: refused
        # queue_full first, a burst's earliest arrival saw its free slot go to a later
        # one queued before it entered (an outside review).
        backend._hand_on()
        if place in queue and (scope is None or backend._over_max_queue(place, self._max_queue)):
            # It would have to wait, and may not: refused, holding nothing. Its place
            # held nobody back (it was not served, so nobody behind it could be).
            del queue[place]
            if scope is None:
                raise trio.WouldBlock
            raise QueueFull(self._max_queue)
        if scope is None:  # served as it entered (max_wait 0)
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        with scope:
            if place in queue:
                ticket.mark_queued()  # it waits: its admission will be a hand-off
                self.task = trio.lowlevel.current_task()
                await trio.lowlevel.wait_task_rescheduled(self._abort)
            elif self.expired:
                raise trio.TooSlowError  # out of the queue, holding nothing
            else:
                await trio.lowlevel.cancel_shielded_checkpoint()
        # Handed a slot unless the park was aborted: the abort succeeds only while the
        # waiter is still queued, so a hand-off and a deadline cannot both happen. The
        # scope is closed now, so the session's body never runs under the deadline.
        if scope.cancelled_caught:
            raise trio.TooSlowError

    def _abort(self, _: object) -> trio.lowlevel.Abort:
        # Cancelled while parked (deadline, drain, caller gone): leave the queue (a
        # waiter found past its deadline by a releaser has left it already).
        self._backend._queue.pop(self.ticket.place, None)
        return trio.lowlevel.Abort.SUCCEEDED

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        backend = self._backend
        backend._limiter.release_on_behalf_of(self.ticket)
        backend._hand_on(released=True)
