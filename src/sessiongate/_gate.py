"""The gate: at most ``capacity`` sessions at once, a FIFO queue, a deadline on waiting.

Theory of operation
-------------------
A session is one ``async with gate.session() as ticket:`` block:

1. *Arrival.* The ticket is stamped with an arrival sequence number (its place in the
   FIFO) and the Trio clock. A closed gate refuses it (:class:`GateClosed`), so does a
   full queue (:class:`QueueFull`). Nothing has been taken yet.
2. *Wait.* The gate makes a cancel scope with deadline ``arrived_at + max_wait`` (the
   ``move_on_at`` of the design) and the backend's ``hold(ticket)`` enters it around
   the wait: queue the ticket, wait until it is the head and a slot is free, take the
   slot (the in-memory backend borrows a token of its ``trio.CapacityLimiter`` on the
   ticket's behalf; a waiter parks in the backend's own FIFO, which a release hands the
   token to directly). Then the deadline is lifted
   (``deadline = math.inf``) before the session's body runs, so the deadline covers
   waiting only. A slot handed over at the very instant the deadline fires is either
   kept (the session is admitted, and the deadline no longer applies) or handed straight
   on (the session expires), as the backend has it: never lost, and the body is never
   started under a cancelled scope, nor cancelled half-way by it. If the scope caught its
   cancellation, the ticket never got a slot: :class:`QueueTimeout`, or
   :class:`GateClosed` when a drain cut the wait short. An outer cancellation (the
   caller went away) leaves the queue at once through the same scopes.
3. *Run.* The body runs inside ``hold``; leaving the block by any exit (return,
   exception, cancellation) leaves ``hold``'s ``async with``, which gives the token
   back and hands the slot straight to the head of the queue.

No slot or queue place is released by hand: each is owned by a scope.
"""

from __future__ import annotations

import inspect
import math
import reprlib
import secrets
import warnings
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from itertools import count
from types import TracebackType
from typing import TypeVar, TypeVarTuple

import attrs
import trio

from ._errors import AdmissionError, GateClosed, LeaseLost, QueueFull, QueueTimeout
from ._limits import check_capacity, check_int, check_seconds
from ._stats import GateStats, HandoffRate, WaitQuantiles
from .backends._base import Backend
from .backends.memory import MemoryBackend

T = TypeVar("T")
Ts = TypeVarTuple("Ts")

#: The capacity of a gate made without one.
DEFAULT_CAPACITY = 50

#: Tickets' sequence numbers, one count for the whole process: two gates sharing a
#: backend never give two tickets stamped at the same instant the same place.
_sequence = count()


def is_cancellation_only(error: BaseException) -> bool:
    """Whether ``error`` is Trio's cancellation, or a group of nothing else (what a
    cancelled body that opened a nursery raises)."""
    if isinstance(error, trio.Cancelled):
        return True
    if isinstance(error, BaseExceptionGroup):
        return error.split(trio.Cancelled)[1] is None
    return False


def cancellation_pending() -> bool:
    """Whether the current task is being cancelled (an enclosing scope was cancelled, or
    its deadline passed). A ``trio.Cancelled`` raised while none is pending was made by
    the code itself (a handler raising one): an error like any other, not a
    cancellation to pass on."""
    return trio.current_effective_deadline() <= trio.current_time()


def _new_id() -> str:
    # 128 random bits: knowing a session's id is what lets a client read or cancel it.
    return secrets.token_urlsafe(16)


@attrs.define(eq=False)
class Ticket:
    """One session's pass through the gate.

    Times are on the Trio clock (``trio.current_time()``).
    """

    seq: int
    arrived_at: float
    _gate: Gate = attrs.field(repr=False, alias="gate")
    _id: str | None = attrs.field(default=None, alias="id")
    #: When the session got its slot; None while queued (or if it never did). A backend
    #: that hands a freed slot straight to a parked ticket sets it at that instant (the
    #: task runs a scheduler pass later), so a hand-off's gap is the gate's, not the
    #: scheduler's; otherwise the gate sets it as the session enters.
    admitted_at: float | None = None
    #: When the session gave its slot back (left ``session()``); None until then.
    released_at: float | None = None
    #: Distributed mode: the lease's fencing token, a number that only grows. A
    #: downstream store that remembers the highest token it has seen can refuse a late
    #: writer whose lease has lapsed. None on the in-memory backend.
    fencing_token: int | None = None
    #: True once the backend parked this ticket in the queue to wait for a slot; an
    #: admission after that is a hand-off (what the ETA and Retry-After estimate from).
    queued: bool = False
    #: True once a session entered the gate with this ticket (it can enter once).
    entered: bool = False
    #: True once its place was given up with :meth:`Gate.withdraw` before it entered:
    #: it can no longer enter.
    withdrawn: bool = False
    #: When its wait ended without a slot (expired, refused, cancelled); None otherwise.
    wait_ended_at: float | None = None

    @property
    def place(self) -> tuple[float, int]:
        """The ticket's place in the FIFO: its arrival stamp, then its sequence number
        (a stamp the web layer takes from the kernel's receive time can be earlier than
        one taken a moment before it; tickets stamped at the same instant keep their
        sequence)."""
        return (self.arrived_at, self.seq)

    def handed_over(self, *, counted: bool = True, now: float | None = None) -> None:
        """For backends: a releaser handed this parked ticket a slot, now (``now``: the
        clock as the releaser read it to check the ticket's deadline, so that the stamp
        is the instant of that decision). Stamps ``admitted_at`` and counts the hand-off
        at once (unless not ``counted``: a slot that no holder gave back): the ticket's
        task resumes a scheduler pass later, and whatever reads the ETA meanwhile (an
        event stream woken by the same release) must already see this hand-off."""
        if now is None:
            now = trio.current_time()
        self.admitted_at = now
        gate = self._gate
        if counted and gate._counts_handoffs:
            gate._handoffs.add(now, self.arrived_at)

    def mark_queued(self) -> None:
        """For backends: the ticket now waits in the queue, so its admission will be a
        hand-off; the gate's :attr:`Gate.on_queued` hook hears of it at once."""
        self.queued = True
        hook = self._gate.on_queued
        if hook is not None:
            hook(self)

    @property
    def id(self) -> str:
        """An unguessable id (at least 128 random bits), made on first use."""
        if self._id is None:
            self._id = _new_id()
        return self._id

    @property
    def waited(self) -> float:
        """Seconds spent queued: until admission, until the wait ended without a slot
        (expired, refused, cancelled), or until now while still queued."""
        end = self.admitted_at if self.admitted_at is not None else self.wait_ended_at
        return (end if end is not None else trio.current_time()) - self.arrived_at

    @property
    def position(self) -> int | None:
        """1 for the next to be admitted; None unless waiting in the queue. O(log n)."""
        if self.admitted_at is not None:
            return None
        return self._gate._backend.position(self)

    @property
    def eta(self) -> float | None:
        """Estimated seconds left to wait, from the recent hand-off rate; None if unknown."""
        position = self.position
        if position is None:
            return None
        return self._gate.estimate_wait(position)


def _shown(value: object) -> str:
    """``value`` for an error message, shortened (a 400-digit number is not shown whole;
    one over Python's 4 300 digits cannot be)."""
    try:
        return reprlib.repr(value)
    except ValueError:
        return "a number too long to show"


def _finite(number: float) -> bool:
    """Whether ``number`` is a finite float (an int too large for one is not)."""
    try:
        return math.isfinite(number)
    except OverflowError:
        return False


class Gate:
    """A session admission gate: a cap, a FIFO queue, a deadline on waiting.

    Args:
        capacity: most sessions active at once (1 to 10**9; 50 by default). A gate given
            a ``backend`` takes the backend's capacity (a Redis gate's lives in Redis):
            a different ``capacity`` here is ignored, with a warning.
        max_wait: most seconds a session may wait for a slot (>= 0; 0 never waits).
        max_queue: most sessions waiting at once (>= 0; 0 has no queue).
        backend: where slots and the queue live; the in-memory backend by default.
    """

    def __init__(
        self,
        capacity: int | None = None,
        max_wait: float = 60.0,
        max_queue: int = 10_000,
        *,
        backend: Backend | None = None,
    ) -> None:
        if capacity is not None:
            check_capacity(capacity)
        self.max_wait = max_wait
        self.max_queue = max_queue
        if backend is None:
            backend = MemoryBackend(DEFAULT_CAPACITY if capacity is None else capacity)
        elif not isinstance(backend, Backend):
            # A URL string is an easy mistake (the CLI's --backend takes one); it failed
            # only at the first session, as an AttributeError.
            raise TypeError(
                f"backend must be a sessiongate backend (MemoryBackend, or "
                f"open_redis_backend(...)'s), not {type(backend).__name__}"
            )
        elif capacity is not None and capacity != backend.capacity:
            warnings.warn(
                f"Gate(capacity={capacity}) is ignored: its backend's capacity "
                f"({backend.capacity}) is in force; give the capacity to the backend",
                stacklevel=2,
            )
        self._backend: Backend = backend
        self._closed = False
        # Wait scopes of this process's queued tickets, so a drain can end them.
        self._waiting: dict[Ticket, trio.CancelScope] = {}
        # Tickets entering (waiting, or taking a slot), with or without a wait scope:
        # one handed a slot is busy until it has entered or handed the slot on.
        self._entering: set[Ticket] = set()
        self._local_active = 0
        #: Sessions giving their slot back (a Redis release is a round trip): no longer
        #: counted in ``local_active`` (their successor may hold the slot already, in
        #: another process), but a drain still waits for them.
        self._releasing = 0
        self._idle: trio.Event | None = None
        self._admitted = 0
        self._completed = 0
        self._failed = 0
        self._expired = 0
        self._rejected = 0
        self._cancelled = 0
        self._waits = WaitQuantiles()
        # The hand-off rate behind every ETA: a shared backend's own (every process's
        # hand-offs, as it learns of them), else counted here.
        shared_rate = getattr(backend, "handoffs", None)
        self._counts_handoffs = not isinstance(shared_rate, HandoffRate)
        self._handoffs = shared_rate if isinstance(shared_rate, HandoffRate) else HandoffRate()
        # Where nobody can queue (max_queue or max_wait 0) no slot is ever handed on and
        # the hand-off rate stays unknown: how soon a slot frees is then the pace at
        # which a full gate's sessions give theirs back (this process's, in Redis mode),
        # counted from the first refusal since a slot last came back.
        self._full_releases = HandoffRate()
        self._refused_since: float | None = None
        #: Called, synchronously, when one of this gate's tickets starts waiting in the
        #: queue (the web layer wakes its event streams and async answers with it).
        #: It must not block or raise, and must not change the gate (resize it, enter or
        #: close it): the ticket is not parked yet when it runs.
        self.on_queued: Callable[[Ticket], None] | None = None

    # -- sizes ------------------------------------------------------------------------

    @property
    def max_wait(self) -> float:
        """Most seconds a session may wait for a slot. Settable, checked; a new value
        applies to sessions that enter from then on."""
        return self._max_wait

    @max_wait.setter
    def max_wait(self, value: float) -> None:
        self._max_wait = check_seconds("max_wait", value)

    @property
    def max_queue(self) -> int:
        """Most sessions waiting at once. Settable, checked; nobody queued is refused
        when it shrinks, only arrivals past it."""
        return self._max_queue

    @max_queue.setter
    def max_queue(self, value: int) -> None:
        self._max_queue = check_int("max_queue", value, 0)

    @property
    def capacity(self) -> int:
        """Sessions allowed at once. Settable: growing admits waiters at once, shrinking
        never cancels an active session (they finish; admissions resume below the cap)."""
        return self._backend.capacity

    @capacity.setter
    def capacity(self, value: int) -> None:
        self._backend.set_capacity(check_capacity(value))

    async def resize(self, capacity: int) -> None:
        """Set ``capacity`` and wait until it is in force (everywhere, for Redis)."""
        await self._backend.resize(check_capacity(capacity))

    @property
    def backend(self) -> Backend:
        return self._backend

    @property
    def closed(self) -> bool:
        """True once ``aclose()`` began: nothing new is admitted."""
        return self._closed

    @property
    def active(self) -> int:
        return self._backend.active

    @property
    def queued(self) -> int:
        return self._backend.queued

    @property
    def local_active(self) -> int:
        """Sessions of this gate object holding a slot (the backend's share, for Redis)."""
        return self._local_active

    @property
    def local_queued(self) -> int:
        """Sessions of this gate object waiting."""
        return len(self._waiting)

    # -- arrival ------------------------------------------------------------------------

    def arrive(
        self, *, reserve: bool = False, id: str | None = None, at: float | None = None
    ) -> Ticket:
        """Take a place in the FIFO now, for a session that will enter a little later.

        A web request stamps its arrival as its head reaches the host (``at``), and its session's
        task enters ``session(arrival=ticket)`` once the body has been read and checked;
        its place among the queued, and its deadline, are fixed by the stamp, not by
        the order in which Trio happens to run the tasks. The ticket returned is the
        session's own: its ``position`` and ``eta`` are live while it waits. A stamp that
        never enters costs nothing, unless it was reserved.

        Args:
            reserve: also admit no later arrival ahead of this one until it enters, even
                into a free slot (the same as :meth:`reserve` at once).
            id: the ticket's id (the HTTP session id); a fresh random one by default.
            at: when the session really arrived (Trio clock), if earlier than now: the
                web layer passes the kernel's receive stamp of the request, so time a
                request spent waiting to be read counts towards its queue deadline, and
                a burst's places follow the order its requests reached the host. A
                time in the future counts as now; one more than ``max_wait`` ago as
                ``max_wait`` ago. A session whose wait is used up by the time it enters
                expires as it enters, even with a slot free (``max_wait`` 0 excepted:
                it never waits, and takes a free slot), so no session ever runs after
                waiting past its deadline.

        A closed (draining) gate still gives a ticket: its session is refused with
        :class:`GateClosed` as it enters (counted once in ``rejected``).

        Raises:
            ValueError: ``at`` is not a finite number.
        """
        if id is not None and not isinstance(id, str):
            raise TypeError(f"id must be a str, not {type(id).__name__}")
        now = trio.current_time()
        if at is None:
            arrived_at = now
        elif not isinstance(at, (int, float)) or isinstance(at, bool):
            raise TypeError(f"at must be a time on the Trio clock, not {_shown(at)}")
        elif _finite(at):
            # No older than max_wait ago; the bound taken so that its deadline
            # (arrived_at + max_wait, as the session computes it) is not after now: in
            # floating point now - max_wait + max_wait may be one ulp above now, and a
            # stamp clamped there was admitted with its wait used up (an outside review).
            floor = now - self.max_wait
            while floor + self.max_wait > now:
                floor = math.nextafter(floor, -math.inf)
            arrived_at = max(min(at, now), floor)
        else:
            raise ValueError(f"at must be a finite time on the Trio clock, not {_shown(at)}")
        ticket = Ticket(next(_sequence), arrived_at, gate=self, id=id)
        if reserve:
            self._backend.reserve(ticket)
        return ticket

    def reserve(self, arrival: Ticket) -> None:
        """Admit no later arrival ahead of ``arrival`` (taken with :meth:`arrive`) until
        it enters, even into a free slot: a burst of arrivals is then admitted exactly
        in stamp order, whatever order their tasks run in. A reserved arrival that will
        not enter after all must be given back with :meth:`withdraw`, or later arrivals
        wait for it. Reserve only just before entering: a reservation held while, say, a
        slow client uploads would keep free slots from everyone stamped after it.
        Idempotent; a no-op for a ticket that has entered already.

        Raises:
            ValueError: ``arrival`` was taken at another gate.
        """
        self._own(arrival)
        if not arrival.entered and not arrival.withdrawn:
            self._backend.reserve(arrival)

    def withdraw(self, arrival: Ticket) -> None:
        """Give up a place taken with :meth:`arrive` that will not enter after all (the
        request was refused before its session started): its reservation, if any, is
        given back, and it can no longer enter. Idempotent; a no-op for a ticket that
        has entered already.

        Raises:
            ValueError: ``arrival`` was taken at another gate.
        """
        self._own(arrival)
        if not arrival.entered:
            arrival.withdrawn = True
        self._backend.unreserve(arrival)

    def _own(self, arrival: Ticket) -> None:
        if arrival._gate is not self:
            # Its reservation lives with the other gate (its backend): entered here, it
            # would hold every later arrival there back for good (an outside review).
            raise ValueError("this arrival ticket was taken at another gate")

    def _check_open(self) -> None:
        if self._closed:
            self._rejected += 1
            raise GateClosed()

    # -- sessions -----------------------------------------------------------------------

    def session(
        self, *, arrival: Ticket | None = None, id: str | None = None
    ) -> AbstractAsyncContextManager[Ticket]:
        """Wait FIFO for a slot (at most ``max_wait``), hold it for the block.

        ``async with gate.session() as ticket:`` enters once admitted; leaving the block,
        by any exit, gives the slot to the head of the queue.

        Args:
            arrival: the ticket of a place taken earlier with :meth:`arrive` (the same
                object is yielded); a place taken now, by default.
            id: the ticket's id (the HTTP session id), for a place taken now; a fresh
                random one by default.

        Raises:
            QueueFull: the queue already holds ``max_queue`` sessions.
            QueueTimeout: no slot within ``max_wait`` seconds of arrival.
            GateClosed: the gate is draining, before or while this session waited.
            RuntimeError: ``arrival`` has entered already, or was withdrawn.
            ValueError: ``arrival`` was taken at another gate; or both ``arrival`` and
                ``id`` were given (the arrival is then withdrawn: it cannot enter).
        """
        if arrival is not None and id is not None:
            self.withdraw(arrival)  # its reservation must not hold the others back
            raise ValueError("give id to arrive(), not with an arrival: its id is taken")
        return _Session(self, arrival, id)

    def _on_admitted(self, ticket: Ticket) -> None:
        now = ticket.admitted_at  # set by the backend at a hand-off (``handed_over``)
        if now is None:
            now = ticket.admitted_at = trio.current_time()
            if ticket.queued and self._counts_handoffs:
                self._handoffs.add(now, ticket.arrived_at)
        waited = now - ticket.arrived_at
        # A slot was free: a wait for one (where nobody queues) is over, however it
        # came free (a grown gate frees one with no release: the countdown ran on).
        self._refused_since = None
        self._admitted += 1
        self._waits.add(waited)
        self._local_active += 1

    def _count_end(self, error: BaseException) -> None:
        """Count an admitted session that ended by ``error``."""
        if is_cancellation_only(error) and cancellation_pending():
            self._cancelled += 1  # the caller went away
        else:
            self._failed += 1  # the session's own error (a lost lease included)

    def _on_released(self) -> None:
        """An admitted session has given its slot back (the backend's release done)."""
        self._releasing -= 1
        self._note_idle()

    def _busy(self) -> bool:
        """Whether a session of this gate holds a slot or is still entering. A drain
        has cancelled every wait it could, so an entering session is one being given
        a slot (its task resumes a scheduler pass after a hand-off, the fast path's
        slot, a reserved arrival served as it enters), one whose Redis enqueue is on
        its way (``max_wait`` 0 has no wait to cancel), or one leaving: each resolves
        promptly, admitted or not. Looking only for a slot already stamped missed the
        reserved arrival and the enqueue on its way (an outside review)."""
        return self._local_active > 0 or self._releasing > 0 or bool(self._entering)

    def _note_idle(self) -> None:
        """Wake a drain waiting for the last slot back, if that was it."""
        if self._idle is not None and not self._busy():
            self._idle.set()

    def _wait_ended(self, ticket: Ticket, max_wait: float) -> AdmissionError:
        """The error for a wait that ended without a slot: drained, or timed out.
        ``max_wait`` is the one the session entered with (a change since applies to
        later sessions only)."""
        waited = trio.current_time() - ticket.arrived_at
        if self._closed and waited < max_wait:
            self._rejected += 1
            return GateClosed("the gate closed while this session waited")
        self._expired += 1
        self._note_refusal()
        return QueueTimeout(waited, max_wait)

    def _nobody_queues(self) -> bool:
        return self._max_queue == 0 or self._max_wait == 0

    def _note_refusal(self) -> None:
        """An arrival found the gate full and could not queue: from now until a slot
        comes back, a newcomer's wait counts down (:meth:`estimate_wait`). One refused
        with slots free (stamped too long ago to enter) starts no wait for a slot."""
        if self._refused_since is None and self._nobody_queues() and self.active >= self.capacity:
            self._refused_since = trio.current_time()

    def _note_release(self, ticket: Ticket) -> None:
        """``ticket`` is giving its slot back (it still counts as active). Counted
        only where nobody can queue: elsewhere the hand-off rate says it all, and a
        saturated gate's every release paid for it (the day's regression review)."""
        if not self._nobody_queues():
            return
        admitted = ticket.admitted_at
        released = ticket.released_at
        if admitted is not None and released is not None and self.active >= self.capacity:
            self._full_releases.add(released, admitted)
            self._refused_since = None

    async def run(
        self,
        async_fn: Callable[[*Ts], Awaitable[T]],
        *args: *Ts,
        arrival: Ticket | None = None,
    ) -> T:
        """Run ``await async_fn(*args)`` inside a session and return its result.

        Raises the same admission errors as :meth:`session`; whatever ``async_fn``
        raises propagates unchanged.

        Args:
            arrival: a place taken earlier with :meth:`arrive`, as for :meth:`session`.
                Tasks started together (``nursery.start_soon(gate.run, ...)``) reach the
                gate in whatever order Trio runs them, often the reverse of the order
                they were started in; to admit them in start order, take each one's
                place with ``arrive()`` before starting its task and pass it here.
        """
        if self._backend.queued or self.active >= self.capacity:
            # It will likely wait: a call with the wrong arguments fails now, not once it
            # has waited for a slot (or timed out waiting, hiding the mistake: an outside
            # review). Not checked when a slot is free (the call comes at once, and the
            # check costs as much as an uncontended run).
            self._check_call(async_fn, args, arrival)
        async with self.session(arrival=arrival):
            # Called once admitted, as the session's body: calling it first (to refuse a
            # plain function before it took a slot) ran a plain function with no slot at
            # all, and a call that raised left a reserved arrival holding its slot for
            # good (an outside review). A plain function is told apart afterwards.
            body = async_fn(*args)
            if not inspect.isawaitable(body):
                name = getattr(async_fn, "__qualname__", repr(async_fn))
                raise TypeError(
                    f"gate.run() needs an async function; {name} returned "
                    f"{type(body).__name__}, not an awaitable (and ran as a plain call)"
                )
            return await body

    def _check_call(
        self, async_fn: Callable[..., object], args: tuple[object, ...], arrival: Ticket | None
    ) -> None:
        """Raise TypeError if ``args`` do not fit ``async_fn``'s own signature (not a
        wrapped one's: a decorator made with functools.wraps may take other arguments);
        a reserved ``arrival`` is withdrawn first. No signature, no check."""
        try:
            signature = inspect.signature(async_fn, follow_wrapped=False)
        except Exception:  # none to be had (builtins, odd proxies): no check
            return
        try:
            signature.bind(*args)
        except TypeError:
            if arrival is not None and arrival._gate is self:
                self.withdraw(arrival)  # its reservation must not hold others back
            raise

    # -- figures ------------------------------------------------------------------------

    def estimate_wait(self, position: int) -> float | None:
        """Seconds a waiter at ``position`` is likely to wait, from the hand-off rate,
        or None before any hand-off. ``estimate_wait(gate.queued + 1)`` is a refused
        arrival's honest Retry-After.

        Where nobody can queue (``max_queue`` or ``max_wait`` 0) no slot is ever handed
        on: the estimate then follows the pace at which a full gate's slots come back
        (None before one has), counting down from the first refusal since the last one
        came back, and slowing past a typical gap (a slot held far longer than usual is
        not promised back at the old pace). It said 1 for ever otherwise, and a client
        honouring it was refused 3-4 times while a 4 s session held the slot (an outside
        review of the HTTP service).
        """
        now = trio.current_time()
        estimate = self._handoffs.eta(position, now, waiting_since=self._waiting_since())
        if estimate is None and self._nobody_queues():
            estimate = self._full_releases.eta(position, now, waiting_since=self._refused_since)
        return estimate

    def handoff_rate(self) -> float | None:
        """Slots handed to waiters per second over the minute of hand-offs up to the
        latest one (a stall while someone waits slows it), or None before any."""
        return self._handoffs.per_second(trio.current_time(), waiting_since=self._waiting_since())

    def _waiting_since(self) -> float | None:
        """When the oldest of this process's waiters arrived; ``-inf`` when only other
        processes' waiters queue (their arrivals are not known here); None: nobody."""
        for ticket in self._waiting:  # insertion order: the oldest first
            return ticket.arrived_at
        return -math.inf if self.queued > 0 else None

    def stats(self) -> GateStats:
        p50, p90, p99 = self._waits.quantiles(0.5, 0.9, 0.99)
        backend = self._backend
        return GateStats(
            capacity=backend.capacity,
            active=backend.active,
            queued=backend.queued,
            max_wait=self.max_wait,
            max_queue=self.max_queue,
            admitted=self._admitted,
            completed=self._completed,
            failed=self._failed,
            expired=self._expired,
            rejected=self._rejected,
            cancelled=self._cancelled,
            wait_p50=p50,
            wait_p90=p90,
            wait_p99=p99,
        )

    # -- draining -----------------------------------------------------------------------

    async def aclose(self) -> None:
        """Drain: refuse new sessions, end queued ones (:class:`GateClosed`), and wait
        for the active ones to finish. Idempotent. Bound it with a cancel scope to give
        active sessions a grace period."""
        self._closed = True
        for scope in list(self._waiting.values()):
            scope.cancel()
        # A session handed a slot a moment ago has not entered yet: it counts too (it
        # enters, or hands the slot straight on, when its task runs).
        if self._busy():
            # One event for every concurrent aclose(): each waits for the same drain.
            if self._idle is None or self._idle.is_set():
                self._idle = trio.Event()
            await self._idle.wait()
        else:
            await trio.lowlevel.checkpoint()
        await self._backend.aclose()


class _Session:
    """One ``async with gate.session()``.

    A class, not an ``@asynccontextmanager``: a queued session then costs no generator
    frame, no ``contextlib`` wrapper and no entry in Trio's async-generator registry
    (about 0.45 KiB per waiter and 2 µs per session, by the core benchmark's profile).
    """

    __slots__ = ("_arrival", "_gate", "_hold", "_id", "_ticket")

    def __init__(self, gate: Gate, arrival: Ticket | None, id: str | None) -> None:
        self._gate = gate
        self._arrival = arrival
        self._id = id
        self._ticket: Ticket | None = None
        self._hold: AbstractAsyncContextManager[None] | None = None

    async def __aenter__(self) -> Ticket:
        gate, arrival = self._gate, self._arrival
        if self._ticket is not None or (arrival is not None and arrival.entered):
            # A second entry would take a second slot under the first one's bookkeeping,
            # and one of the two would never be given back.
            raise RuntimeError("a gate.session() (or an arrival ticket) can be entered once")
        if arrival is not None:
            gate._own(arrival)
            if arrival.withdrawn:
                raise RuntimeError("a withdrawn arrival ticket cannot enter")
        if gate._closed and arrival is not None:
            gate.withdraw(arrival)
        gate._check_open()
        ticket = arrival if arrival is not None else gate.arrive(id=self._id)
        ticket.entered = True
        self._ticket = ticket
        # The queue deadline: a cancel scope the backend enters around the wait only.
        # max_wait == 0 asks the backend not to wait at all (a deadline scope that is
        # already due would cancel even an admission into a free slot).
        max_wait = gate.max_wait  # this session's, whatever the gate's becomes
        wait_scope = (
            trio.CancelScope(deadline=ticket.arrived_at + max_wait) if max_wait > 0 else None
        )
        if wait_scope is not None:
            # Registered so that a drain can end the wait; admission unregisters.
            gate._waiting[ticket] = wait_scope
        hold = gate._backend.hold(ticket, deadline_scope=wait_scope, max_queue=gate.max_queue)
        entered = False
        gate._entering.add(ticket)
        try:
            if wait_scope is not None and wait_scope.deadline <= trio.current_time():
                # Its wait was used up before it entered (stamped max_wait ago or more:
                # a request that reached the app that late): it has waited max_wait
                # without a slot, so it expires now, free slot or not. Admitted, it ran
                # after waiting past its deadline (an outside load test: up to 312 ms
                # past a 0.2 s max_wait while the loop stalled).
                gate._backend.unreserve(ticket)
                raise trio.TooSlowError
            await hold.__aenter__()
            entered = True
        except (trio.TooSlowError, trio.WouldBlock):
            raise gate._wait_ended(ticket, max_wait) from None
        except trio.Cancelled:
            gate._cancelled += 1  # the caller went away while queued
            raise
        except AdmissionError as refused:
            gate._rejected += 1  # refused by the backend (queue full, unreachable)
            if isinstance(refused, QueueFull):
                gate._note_refusal()
            raise
        except LeaseLost:
            gate._failed += 1  # granted, but the lease lapsed before the body could run
            raise
        finally:
            gate._waiting.pop(ticket, None)  # admitted or not, it waits no more
            gate._entering.discard(ticket)
            if not entered:
                ticket.wait_ended_at = trio.current_time()
                gate._note_idle()  # a slot handed over at a deadline went straight on
        self._hold = hold
        gate._on_admitted(ticket)  # no checkpoint since the pop: a drain sees it active
        return ticket

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool:
        gate, ticket, hold = self._gate, self._ticket, self._hold
        assert ticket is not None and hold is not None
        # Stamped before the backend hands the slot on, so a successor's admission
        # never precedes this release.
        ticket.released_at = trio.current_time()
        gate._note_release(ticket)
        # The outcome is classified once ``hold`` has exited, so that what the backend
        # made of the body's exit counts (a Redis lease lost mid-session turns the
        # body's cancellation into LeaseLost: a failure, not a cancellation). A drain
        # (``aclose``) returns only once every slot is back with the backend (a Redis
        # release is a round trip); ``local_active`` no longer counts it meanwhile: Redis
        # may have handed the slot to another process's session already, and two
        # processes' shares added up to more than the cap (an outside test).
        gate._local_active -= 1
        gate._releasing += 1
        try:
            suppressed = bool(await hold.__aexit__(exc_type, exc, tb))
        except BaseException as raised:
            gate._count_end(raised)
            raise
        finally:
            gate._on_released()
        if exc is None or suppressed:
            gate._completed += 1
        else:
            gate._count_end(exc)
        return suppressed
