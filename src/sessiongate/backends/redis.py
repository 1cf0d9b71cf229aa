"""The Redis backend: one global cap and one global FIFO queue per gate name.

Theory of operation
-------------------
All shared state lives in Redis and changes only through one Lua script
(:mod:`._redis_scripts`), one atomic call per step, on Redis's own clock. This module
is the per-process half:

* **Arrival.** ``hold()`` puts its ticket in a local *pending* list ordered by the
  ticket's arrival stamp. One *enqueuer* task sends everything pending as one script
  call, in stamp order, so a process's arrivals keep their order globally and a burst
  costs one round trip. The script either grants a free slot at once, queues the
  ticket under a Redis-side arrival number, or refuses it (queue full, would wait).
  No answer within :data:`FAIL_FAST` seconds of the call that carries it, or at the
  latest :data:`ANSWER_BY` seconds after the ticket's arrival stamp:
  :class:`BackendUnavailable`.
* **Wait.** A queued ticket waits on a ``trio.Event``, never inside a Redis command.
  Every script that hands a slot over publishes the hand-off on the gate's channel;
  the process's one *listener* task receives it and sets the event. Its queue entry is
  leased: a *queue renewer* task extends the leases of all this process's waiters in
  one call every TTL/3, which doubles as the slow safety re-check (it reports hand-offs
  the listener missed, and entries that went missing, which are enqueued again at
  their own arrival times).
* **Run.** The slot is a lease with a fencing token. The body runs inside a cancel
  scope whose deadline is the moment the lease could lapse, minus a margin, on the
  local clock (bounded from Redis times by the round trips that carried them). A
  renewal task, one per session, pushes that deadline forward; if it cannot, the
  deadline cancels the body before the lease lapses, and ``hold`` raises
  :class:`LeaseLost`. A holder that was paused finds its deadline passed on resuming
  and is cancelled before the renewal task touches Redis again.
* **Leave.** Leaving the block, or cancelling the wait, runs the ``release`` step
  (shielded, bounded): the slot or the queue place goes, and the head of the queue is
  admitted in the same atomic step. A waiter that leaves without having used a slot is
  *forgotten* instead: the same, plus a tombstone that refuses any enqueue of it still
  on its way, so no place outlives its waiter.
* **Reclaim.** Every answer from Redis carries the nearest lease expiry; a *reaper*
  task sleeps until then and runs a tick, so a dead holder's slot and a dead waiter's
  place are reclaimed on time even when nothing else happens.

The sync members (``capacity``, ``active``, ``queued``, ``position``) read a cache kept
fresh by the listener (which mirrors the global queue from the published changes, so
positions are exact and O(log n)) and by every script answer.
"""

from __future__ import annotations

import logging
import math
import random
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager, suppress
from itertools import count
from typing import TYPE_CHECKING, Any, Final, cast

import coredis
import coredis.exceptions
import trio
from coredis.retry import ConstantRetryPolicy, NoRetryPolicy
from sortedcontainers import SortedDict

from .._errors import BackendUnavailable, LeaseLost, QueueFull
from .._limits import check_capacity, check_gate_name, check_seconds
from .._stats import HandoffRate
from ._redis_scripts import GATE_LUA
from ._redis_state import ClockBound, Figures, Grant, Lease, QueueMirror, Waiter

if TYPE_CHECKING:
    from .._gate import Ticket

__all__ = ["FAIL_FAST", "RedisBackend", "RedisRefused", "check_redis", "open_redis_backend"]

logger = logging.getLogger("sessiongate.redis")

#: Seconds one call of the enqueuer may wait for Redis (an arrival may wait for two:
#: the batch in flight, then its own).
FAIL_FAST: Final = 0.45
#: Seconds without an answer from Redis after which an idle process asks it anything
#: (a tick), to know it still answers.
HEALTH_QUIET: Final = 0.5
#: Seconds from an arrival's stamp by which Redis must have answered its enqueue: the
#: rest of the SPEC's "within 1 s" is for writing the refusal. Counted from the stamp
#: (when the request reached the host), not from when its session reached the backend:
#: a burst's requests reach the backend one by one, up to a few hundred milliseconds
#: after their stamps, and an outside review saw refusals take up to 1.32 s.
ANSWER_BY: Final = 0.75
#: Seconds an arrival may always wait for Redis, however late it reached the backend (a
#: request whose body came slowly, a place taken with ``arrive()`` long before it
#: enters): one call's whole timeout. With 0.15 s a Redis pausing 0.3 s, healthy,
#: refused such arrivals (an outside review).
ANSWER_AT_LEAST: Final = FAIL_FAST
#: Seconds the forgetter keeps trying (the tombstones it leaves outlive any lease).
FORGET_FOR: Final = 60.0
#: Most seconds an arrival stamp may predate its enqueue (a place is kept by arrival).
MAX_AGE: Final = 3600.0
#: Seconds a connection attempt may take (two fit in FAIL_FAST).
CONNECT_TIMEOUT: Final = 0.2
#: Calls made at start, after the first, to measure the offset between the clocks.
CLOCK_CALLS_AT_START: Final = 3
#: Seconds a clean-up step (release, leave) may take, shielded from cancellation.
CLEANUP_GRACE: Final = 1.0
#: How long a session's end waits for Redis to take its slot back (a round trip is
#: well under a millisecond here); past it the forgetter gives the slot back.
RELEASE_WAIT: Final = 0.2
#: Fraction of the TTL kept between the body's local deadline and the lease's lapse.
LEASE_MARGIN: Final = 0.2
#: The shortest lease a backend takes (seconds): renewed every third of it, a lease
#: must outlive a few round trips to Redis and a busy scheduler pass; at a millisecond
#: every session lost its lease at once (an outside review).
MIN_LEASE_TTL: Final = 0.1
#: Errors that mean "Redis did not answer" (or answered with an error we cannot use).
_REDIS_ERRORS = (coredis.exceptions.RedisError, OSError, TimeoutError, trio.TooSlowError)


class _Unreachable(Exception):
    """A script call failed or timed out."""


class RedisRefused(Exception):
    """Redis answered the backend's first call, refusing its configuration: a password
    missing or wrong, a user without the rights the gate needs, a database index out of
    range. Raised by :func:`open_redis_backend` as it opens: retrying would not help (a
    Redis that does not answer at all is an outage, and not an error at start)."""


def _refusal(error: BaseException) -> str | None:
    """Redis's reason, if ``error`` (a failed call) is a refusal of the configuration
    rather than an outage or a passing state (LOADING, READONLY during a failover)."""
    cause = error.__cause__ if isinstance(error, _Unreachable) else error
    errors = coredis.exceptions
    # "DB index is out of range" is the server's own wording (Redis 6 and 7: ERR ...).
    if isinstance(cause, (errors.AuthenticationError, errors.AuthorizationError)) or (
        isinstance(cause, errors.ResponseError) and "DB index" in str(cause)
    ):
        return f"{type(cause).__name__}: {cause}"
    return None


def _unavailable_detail(error: BaseException | None) -> str:
    """Why an arrival was refused, for its client: a Redis that answered with an error
    (NOAUTH, a database index out of range) is not one that "did not answer"; the
    error's kind is named, never its text (the log has it)."""
    cause = error.__cause__ if isinstance(error, _Unreachable) else error
    if isinstance(cause, coredis.exceptions.ResponseError):
        return f"Redis refused the gate's call ({type(cause).__name__}; see the server log)"
    return "Redis did not answer in time"


class RedisBackend:
    """Slots and a FIFO queue shared through Redis by every process using ``gate_name``.

    Made by :func:`open_redis_backend`, which owns its client and tasks; pass it to
    ``Gate(..., backend=backend)``.
    """

    def __init__(
        self,
        client: coredis.Redis[str],
        nursery: trio.Nursery,
        *,
        gate_name: str,
        capacity: int,
        lease_ttl: float,
    ) -> None:
        _check_arguments(gate_name, capacity, lease_ttl)
        self._client = client
        self._nursery = nursery
        self.gate_name = gate_name
        self.lease_ttl = float(lease_ttl)
        self._ttl_ms = max(1, round(lease_ttl * 1000))
        self._configured_capacity = capacity
        # Resizes under way, and the configured capacity from before them.
        self._resizes_unanswered = 0
        self._configured_before_resizes = capacity
        prefix = _key_prefix(gate_name)
        self._keys = [
            f"{prefix}:{k}" for k in ("meta", "queue", "qexp", "holders", "fences", "gone")
        ]
        self.channel = f"{prefix}:events"
        self._script = client.register_script(GATE_LUA)
        self._proc = secrets.token_hex(6)
        self._counter = count(1)
        self._clock = ClockBound()
        # Cached global figures (from the newest script answer or message).
        self._ver = -1
        self._capacity = capacity
        # The version a local resize was made at: only a newer state may replace the
        # capacity it set in the cache (an answer of that same version was computed
        # before the resize reached Redis).
        self._capacity_set_at = -1
        self._active = 0
        self._queued = 0
        self._epoch = ""
        self._mirror = QueueMirror()
        # This process's waiters: by member, and by ticket (for position()).
        self._waiters: dict[str, Waiter] = {}
        self._by_ticket: dict[Ticket, Waiter] = {}
        self._pending: SortedDict = SortedDict()  # Waiter.key -> Waiter, not yet sent
        self._pending_wakeup = trio.Event()
        # Members to forget (their clean-up could not reach Redis), until when to try.
        self._forgetting: dict[str, float] = {}
        self._forget_wakeup = trio.Event()
        self._healthy = False
        self._last_ok = -math.inf
        # When Redis stopped answering (None: it answers, or has not been tried yet).
        # An outage is logged once as it starts and once as it ends, never per retry.
        self._down_since: float | None = None
        # Until the first call has been tried: a refusal then stops the opening (_start).
        self._starting = True
        self._subscribed = False
        # The listener's connection dropped (and is not back): Redis is likely down,
        # often before any call has failed.
        self._listener_lost = False
        # Set while ``healthy`` holds; replaced by a fresh one when it stops holding.
        self._healthy_now = trio.Event()
        self._reap_at = math.inf
        self._reap_scope = trio.CancelScope()
        self._reap_floor = -math.inf
        self._resync_wanted = trio.Event()
        self._renew_queue_now = trio.Event()
        #: Script calls made (for measuring round trips per admission).
        self.calls = 0
        #: Called, synchronously, after a published change of the global queue has been
        #: taken in (positions may have moved, in any process); it must not block or
        #: raise. The HTTP service wakes the event streams that show positions with it.
        self.on_change: Callable[[], None] | None = None

    @property
    def handoffs(self) -> HandoffRate:
        """The global queue's hand-offs, every process's (as published): the gate
        estimates waits from these instead of counting its own."""
        return self._mirror.handoffs

    # -- the protocol's sync members --------------------------------------------------

    @property
    def capacity(self) -> int:
        return self._capacity

    def set_capacity(self, capacity: int) -> None:
        """Resize globally in the background; the cached figure changes at once.

        Raises:
            BackendUnavailable: Redis did not answer the latest call (nothing changes).
                A resize that fails later, in the background, is logged and the cached
                figure goes back to the one before; ``await resize()`` tells for sure.
        """
        # Not :attr:`healthy`, which also needs the hand-off listener subscribed: right
        # after the backend opens it is not yet (an outside review: a resize just after
        # opening was refused as "Redis unreachable" with Redis up). A listener that
        # lost its connection, though, is the first sign of Redis going down.
        if not self._healthy or self._listener_lost:
            raise BackendUnavailable("Redis unreachable: the capacity was not changed")
        before, self._capacity = self._capacity, capacity
        self._capacity_set_at = self._ver
        self._nursery.start_soon(self._resize_in_background, capacity, before)

    async def _resize_in_background(self, capacity: int, before: int) -> None:
        try:
            await self.resize(capacity)
        except BackendUnavailable:
            logger.warning("could not resize gate %r: Redis unreachable", self.gate_name)
            if self._capacity == capacity:  # nothing newer has been heard meanwhile
                self._capacity = before

    async def resize(self, capacity: int) -> None:
        if not self._resizes_unanswered:
            self._configured_before_resizes = self._configured_capacity
        if not self._epoch:
            # Resized before the first answer from the gate: the capacity that answer
            # brings back is this one, not one stored by another server.
            self._configured_capacity = capacity
        self._resizes_unanswered += 1
        try:
            await self._call("resize", [str(capacity)], limit=CLEANUP_GRACE)
        except _Unreachable as exc:
            if not self._epoch and self._resizes_unanswered == 1:
                # None made: the gate that Redis creates later has the capacity from
                # before them, which is no other server's (an outside review: "already
                # has capacity 4 in Redis; using it, not 6" from the process that made
                # it). Only the last to fail restores it (two that failed together left
                # the first one's).
                self._configured_capacity = self._configured_before_resizes
            raise BackendUnavailable(
                "Redis did not confirm the change: unchanged if Redis is down; if it is "
                "only stalled, the new capacity may still take effect when it answers"
            ) from exc
        finally:
            self._resizes_unanswered -= 1

    @property
    def active(self) -> int:
        return self._active

    @property
    def queued(self) -> int:
        return self._queued

    @property
    def healthy(self) -> bool:
        """Redis answered the latest call and the hand-off listener is subscribed."""
        return self._healthy and self._subscribed

    async def wait_healthy(self) -> None:
        """Return once :attr:`healthy` holds (at once if it does)."""
        while not self.healthy:
            await self._healthy_now.wait()

    def _health_moved(self) -> None:
        if self.healthy:
            self._healthy_now.set()
        elif self._healthy_now.is_set():
            self._healthy_now = trio.Event()

    def reserve(self, ticket: Ticket) -> None:
        """No-op: a queued place is the arrival time on Redis's clock, so an arrival
        stamped earlier keeps its place even if its enqueue reaches Redis later."""

    def unreserve(self, ticket: Ticket) -> None:
        """No-op (see :meth:`reserve`)."""

    def position(self, ticket: Ticket) -> int | None:
        waiter = self._by_ticket.get(ticket)
        if waiter is None or waiter.seq is None or waiter.granted.is_set():
            return None
        return self._mirror.rank(int(waiter.seq))

    async def aclose(self) -> None:
        # The client and tasks belong to open_redis_backend's scope.
        await trio.lowlevel.checkpoint()

    # -- talking to Redis ---------------------------------------------------------------

    async def _call(
        self, op: str, args: Sequence[str], *, limit: float, late_is_outage: bool = True
    ) -> list[Any]:
        """Run one step of the gate script; the answer's figures refresh the cache."""
        return (await self._call_figures(op, args, limit=limit, late_is_outage=late_is_outage))[1]

    async def _call_figures(
        self, op: str, args: Sequence[str], *, limit: float, late_is_outage: bool = True
    ) -> tuple[Figures, list[Any]]:
        """``late_is_outage=False``: an answer later than ``limit`` is no outage (a
        limit the caller chose for its own latency, shorter than any outage's)."""
        argv = [
            self.channel,
            # What the gate is created with if it is missing: the last global capacity
            # this process knew, not its own --capacity. Until it has seen the gate that
            # is --capacity; afterwards it is the stored one (an operator's resize, or
            # the first server's flag), so a gate that Redis lost (FLUSHALL, a restart
            # without persistence) comes back with the capacity it had, whichever
            # server happens to touch it first.
            str(self._capacity),
            str(self._ttl_ms),
            self._epoch,
            secrets.token_hex(8),
            op,
            *args,
        ]
        self.calls += 1
        sent = trio.current_time()
        try:
            with trio.fail_after(limit):
                raw: object = await self._script(keys=self._keys, args=argv)
        except _REDIS_ERRORS as exc:
            if self._starting and _refusal(exc) is not None:
                raise _Unreachable(op) from exc  # _start refuses it, no outage to log
            if isinstance(exc, trio.TooSlowError) and not late_is_outage:
                # A session's release waits 0.2 s for its own sake: Redis slower than
                # that is slow, not down (an outside review: a 250 ms round trip turned
                # /readyz 503 and back every few seconds). Renewals, the enqueuer and the
                # health tick tell an outage, renewals within a third of the lease's TTL.
                raise _Unreachable(op) from exc
            if self._down_since is None:
                # From when the unanswered call went out, not from when it timed out
                # (a 0.5 s stall was logged as "unreachable for 0.0 s").
                self._down_since = sent
                logger.warning(
                    "Redis unreachable for gate %r (%s: %r); retrying", self.gate_name, op, exc
                )
            self._healthy = False
            self._health_moved()
            raise _Unreachable(op) from exc
        answered = trio.current_time()
        if self._down_since is not None:
            logger.info(
                "Redis reachable again for gate %r (unreachable for %.1f s)",
                self.gate_name,
                answered - self._down_since,
            )
            self._down_since = None
        self._healthy = True
        self._health_moved()
        self._last_ok = answered
        result = list(cast("Sequence[Any]", raw))
        figures = Figures.from_answer(result)
        self._clock.sample(figures.now, sent, answered)
        self._absorb(figures)
        return figures, result[8:]

    def _absorb(self, figures: Figures) -> None:
        """Take in figures and hand-offs from a script answer or a message."""
        if figures.epoch and figures.epoch != self._epoch:
            # Only script answers carry the epoch. A new one: Redis lost the gate, and
            # its version numbers started again.
            if self._epoch:
                logger.warning(
                    "gate %r was re-created in Redis (state lost), with capacity %d",
                    self.gate_name,
                    figures.capacity,
                )
                self._mirror.ok = False
                self._resync_wanted.set()
                self._renew_queue_now.set()
            elif figures.capacity != self._configured_capacity:
                # The first answer from the gate: at start-up, or later if Redis was
                # unreachable then (an outside review: no warning at all in that case).
                logger.warning(
                    "gate %r already has capacity %d in Redis; using it, not %d",
                    self.gate_name,
                    figures.capacity,
                    self._configured_capacity,
                )
            self._epoch = figures.epoch
            self._ver = self._capacity_set_at = -1
        if figures.ver >= self._ver:
            self._ver = figures.ver
            self._active = figures.active
            self._queued = figures.queued
            if figures.ver > self._capacity_set_at:
                self._capacity = figures.capacity
        for parts in figures.lines():
            if parts[0] == "G":
                self._deliver(parts[1], Grant(int(parts[2]), int(parts[3])))
        self._note_deadline(figures.next_deadline)

    def _deliver(self, member: str, grant: Grant) -> None:
        waiter = self._waiters.get(member)
        if waiter is not None and not waiter.granted.is_set():
            waiter.grant = grant
            waiter.grant_seen_at = trio.current_time()
            waiter.granted.set()
            ticket = waiter.ticket
            if ticket is not None and ticket.admitted_at is None:
                # Stamped now, in the order Redis granted (one change can hand over
                # several slots), not as Trio happens to run the woken tasks; a grant
                # at once too, so that a drain (``aclose``) waits for its slot to come
                # back (an outside review: aclose returned with its release on the way).
                ticket.handed_over(counted=ticket.queued)

    def _note_deadline(self, redis_ms: int) -> None:
        if redis_ms < 0:
            return
        local = self._clock.latest(redis_ms)
        if local is None:
            return
        # A little jitter so that every process does not reap at the same instant.
        local += 0.002 + random.random() * min(0.02, self.lease_ttl * 0.01)
        if local < self._reap_at:
            self._reap_at = local
            self._reap_scope.deadline = max(local, self._reap_floor)

    # -- hold ---------------------------------------------------------------------------

    @asynccontextmanager
    async def hold(
        self, ticket: Ticket, *, deadline_scope: trio.CancelScope | None, max_queue: int
    ) -> AsyncIterator[None]:
        """Wait in the global queue for a slot, then hold it as a lease for the body.

        Sets ``ticket.fencing_token`` on admission. Raises, from ``__aenter__``:
        :class:`QueueFull` (the global queue holds ``max_queue``),
        :class:`BackendUnavailable` (Redis did not answer within 1 s),
        :class:`trio.WouldBlock` (``deadline_scope`` is None and no slot was free) and
        :class:`trio.TooSlowError` (``deadline_scope`` ended the wait). Raises
        :class:`LeaseLost` out of the ``async with`` when the lease could not be kept:
        the body was cancelled before the lease could lapse.
        """
        member = f"{self._proc}:{next(self._counter)}"
        key = (ticket.arrived_at, ticket.seq, member)
        waiter = Waiter(member, key, deadline_scope is not None, max_queue, ticket=ticket)
        async with self._place(ticket, waiter):
            if deadline_scope is None:
                await self._wait_for_grant(waiter, ticket)  # admitted now, or WouldBlock
            else:
                with deadline_scope:
                    await self._wait_for_grant(waiter, ticket)
                if deadline_scope.cancel_called:
                    if (
                        waiter.status in ("", "sent", "error")
                        and not self._healthy
                        and deadline_scope.deadline <= trio.current_time()
                    ):
                        # Its max_wait (under the 1 s answer bound) ran out before Redis,
                        # known unreachable, ever answered: never queued, it is refused
                        # as unavailable, not expired (an outside review: a stalled Redis
                        # and max_wait 0.3 counted every arrival expired).
                        raise BackendUnavailable(_unavailable_detail(waiter.error))
                    # The wait ended (deadline or drain), perhaps at the very instant a
                    # slot came: leaving _place hands any such slot straight on.
                    raise trio.TooSlowError
                deadline_scope.deadline = math.inf
            # Admitted: no checkpoint from here to the body.
            lease = self._lease_from(waiter)
            if trio.current_time() >= lease.valid_until:
                # Granted while this process was paused, and the lease lapsed before it
                # resumed (the slot has moved on): never run the body on it.
                raise LeaseLost(
                    f"the slot lease of gate {self.gate_name!r} lapsed before the session "
                    f"could start (fencing token {lease.fence})"
                )
            ticket.fencing_token = lease.fence
            with (
                trio.CancelScope(deadline=lease.valid_until) as body_scope,
                self._renewing(lease, body_scope),
            ):
                try:
                    yield
                finally:
                    # A body that never gave Trio the loop (a CPU stretch, a blocking
                    # call) past its lease's deadline was never told; it must not count
                    # as completed (an outside review). Checked here, before the
                    # release's round trip, which must not count against the lease.
                    if trio.current_time() >= body_scope.deadline:
                        body_scope.cancel()
        # cancel_called, not cancelled_caught: a body that could not be cancelled when the
        # lease went (a shielded clean-up, a thread, a CPU stretch) and then returned
        # without a checkpoint ran on a slot another process may hold by now; it
        # counted as completed (an outside review).
        if body_scope.cancel_called:
            raise LeaseLost(
                f"the slot lease of gate {self.gate_name!r} could not be kept "
                f"(fencing token {lease.fence})"
            )

    @asynccontextmanager
    async def _place(self, ticket: Ticket, waiter: Waiter) -> AsyncIterator[None]:
        """Own the ticket's queue place or slot: leaving frees whichever it holds."""
        self._waiters[waiter.member] = waiter
        self._by_ticket[ticket] = waiter
        try:
            yield
        finally:
            del self._waiters[waiter.member]
            del self._by_ticket[ticket]
            self._pending.pop(waiter.key, None)
            with trio.move_on_after(CLEANUP_GRACE, shield=True):
                await self._leave(waiter)

    async def _leave(self, waiter: Waiter) -> None:
        if waiter.status in ("", "W", "F", "X", "error"):
            return  # never queued, or the enqueuer is forgetting it already
        if waiter.granted.is_set():
            # It held the slot: give it back (the head of the queue gets it), waited for
            # so the session ends once its successor may start. With Redis unreachable
            # or slow to answer, the forgetter gives it back once Redis answers (or the
            # lease lapses), and the session's end does not wait: a lost lease's
            # session read "active" ~1 s after its body was cancelled, and a DELETE took
            # 1 s with Redis stalled (outside review). Redis answering is what counts
            # here, not the hand-off listener: before it had subscribed (a gate just
            # opened), a release went to the forgetter and ``active`` read 1 for up to
            # 0.5 s after the session (an outside review).
            if self._healthy:
                try:
                    await self._call(
                        "release", [waiter.member], limit=RELEASE_WAIT, late_is_outage=False
                    )
                except _Unreachable:
                    pass
                else:
                    return
            self._forget_later([waiter.member])
            return
        # Queued, or its enqueue is still on the way, or a slot was handed to it that
        # it never saw: the forgetter removes it (and refuses any enqueue of it that
        # runs late), a scheduler pass from now. Never awaited here: with Redis stalled
        # rather than down, an expiry, a DELETE or a client gone would otherwise wait
        # up to CLEANUP_GRACE for Redis (an outside review saw a 3 s wait end after
        # 4.002 s, and a DELETE take 1.04 s); nothing waits on it being gone.
        self._forget_later([waiter.member])

    def _forget_later(self, members: Sequence[str]) -> None:
        """Hand members to the forgetter task, which retries until Redis answers."""
        give_up = trio.current_time() + FORGET_FOR
        for member in members:
            self._forgetting[member] = give_up
        self._forget_wakeup.set()

    async def _wait_for_grant(self, waiter: Waiter, ticket: Ticket) -> None:
        self._pending[waiter.key] = waiter
        self._pending_wakeup.set()
        answer_by = max(ticket.arrived_at + ANSWER_BY, trio.current_time() + ANSWER_AT_LEAST)
        with trio.move_on_at(answer_by) as answer_scope:
            await waiter.answered.wait()
        if waiter.status == "F":
            raise QueueFull(waiter.max_queue)
        if waiter.status == "W":
            raise trio.WouldBlock
        if answer_scope.cancelled_caught or waiter.status not in ("Q", "G"):
            raise BackendUnavailable(_unavailable_detail(waiter.error)) from waiter.error
        if not waiter.granted.is_set():
            ticket.mark_queued()  # it waits: its admission will be a hand-off
        await waiter.granted.wait()

    def _lease_from(self, waiter: Waiter) -> Lease:
        grant = waiter.grant
        assert grant is not None
        seen = waiter.grant_seen_at
        return Lease(
            waiter.member, grant.fence, self._epoch, self._valid_until(grant.expires, seen), seen
        )

    def _valid_until(self, expires: int, fallback_basis: float) -> float:
        earliest = self._clock.earliest(expires)
        if earliest is None:
            earliest = fallback_basis + self.lease_ttl * (1 - LEASE_MARGIN)
        # The margin is a share of what is left of the lease, never more: a slot handed
        # over by a process with a shorter --lease-ttl comes with a shorter first lease
        # (the releaser's), and a margin taken from our own TTL would end it at once.
        left = max(earliest - fallback_basis, 0.0)
        return earliest - LEASE_MARGIN * min(self.lease_ttl, left)

    @contextmanager
    def _renewing(self, lease: Lease, body_scope: trio.CancelScope) -> Iterator[None]:
        scope = trio.CancelScope()
        self._nursery.start_soon(self._renew_lease, lease, body_scope, scope)
        try:
            yield
        finally:
            scope.cancel()

    async def _renew_lease(
        self, lease: Lease, body_scope: trio.CancelScope, scope: trio.CancelScope
    ) -> None:
        every = self.lease_ttl / 3
        next_at = min(lease.basis + every, (lease.basis + lease.valid_until) / 2)
        with scope:
            while True:
                await trio.sleep_until(next_at)
                now = trio.current_time()
                if now >= lease.valid_until:
                    # Learned locally (e.g. after a pause): never renew a lapsed lease.
                    body_scope.cancel()
                    return
                # The latest expiry this renewal may give: a TTL from the latest Redis
                # instant "now" can be, so that one Redis runs late (after a stall,
                # perhaps after this process died) extends nothing further.
                sent_at_most = self._clock.redis_at_most(now)
                bound = "" if sent_at_most is None else str(sent_at_most + self._ttl_ms)
                try:
                    answer = await self._call(
                        "renew",
                        [lease.member, lease.epoch, str(lease.fence), bound],
                        limit=max(0.01, min(every, lease.valid_until - now)),
                    )
                except _Unreachable:
                    next_at = trio.current_time() + self.lease_ttl / 10
                    continue
                if answer[0] != "OK":
                    logger.warning("lease %s (fence %d) was lost", lease.member, lease.fence)
                    body_scope.cancel()
                    return
                lease.epoch = str(answer[2])
                lease.basis = now
                lease.valid_until = self._valid_until(int(answer[1]), now)
                body_scope.deadline = lease.valid_until
                next_at = now + every

    # -- background tasks ---------------------------------------------------------------

    async def _start(self) -> None:
        try:
            await self._call("snapshot", [], limit=1.0)
        except _Unreachable as error:  # logged by the call; _health retries
            reason = _refusal(error)
            if reason is not None:
                raise RedisRefused(f"Redis refused the gate's connection ({reason})") from None
        else:
            # The first call's round trip includes connecting: its bounds on the clocks'
            # offset are wide, and a new process's first burst was placed up to 0.5 ms
            # off among another process's arrivals (an outside review). A few calls on
            # the warm connection narrow them to about half a round trip.
            with suppress(_Unreachable):
                for _ in range(CLOCK_CALLS_AT_START):
                    await self._call("release", [], limit=FAIL_FAST)
        self._starting = False
        for task in (
            self._enqueuer,
            self._listener,
            self._mirror_keeper,
            self._reaper,
            self._queue_renewer,
            self._forgetter,
            self._health,
        ):
            self._nursery.start_soon(self._keep_running, task)

    async def _keep_running(self, task: Callable[[], Awaitable[None]]) -> None:
        """Run a background loop; a bug in one must not take the service down with it."""
        while True:
            try:
                await task()
            except Exception:
                logger.exception("sessiongate redis task %s failed; restarting it", task)
                await trio.sleep(0.1)

    async def _enqueuer(self) -> None:
        """Send pending arrivals, in stamp order, one script call per batch."""
        while True:
            await self._pending_wakeup.wait()
            self._pending_wakeup = trio.Event()
            if not self._pending:
                continue
            batch: list[Waiter] = list(self._pending.values())
            self._pending.clear()
            args: list[str] = [str(len(batch))]
            now = trio.current_time()
            for waiter in batch:
                if not waiter.requeue:
                    waiter.status = "sent"
                args += [
                    waiter.member,
                    "1" if waiter.wait else "0",
                    # A waiter put back after its place lapsed was in the queue already.
                    str(10**9 if waiter.requeue else waiter.max_queue),
                    self._arrival_arg(max(waiter.key[0], now - MAX_AGE), now),
                ]
            try:
                answer = await self._call("enqueue", args, limit=FAIL_FAST)
            except _Unreachable as exc:
                fresh = [w for w in batch if not w.requeue]
                for waiter in fresh:
                    waiter.status = "error"
                    waiter.error = exc
                    waiter.answered.set()
                # The call may still run in Redis later (a stalled server): make sure
                # whatever it would make is removed, and never made afterwards. (A
                # waiter being put back stays; the next queue renewal tries again.)
                self._forget_later([w.member for w in fresh])
                for waiter in batch:
                    waiter.requeue = False
                continue
            for i, waiter in enumerate(batch):
                status, a, b = answer[3 * i : 3 * i + 3]
                waiter.requeue = False
                if status == "Q":
                    waiter.seq = str(a)
                    if waiter.member in self._waiters and not waiter.granted.is_set():
                        # Still waiting (not granted or gone by a change taken in
                        # before this answer): mirrored now (see note_entered).
                        self._mirror.note_entered(waiter.member, int(a))
                elif status == "G":
                    self._deliver(waiter.member, Grant(int(a), int(b)))
                if not waiter.answered.is_set():
                    waiter.status = str(status)
                    waiter.answered.set()
            await trio.lowlevel.checkpoint()

    def _arrival_arg(self, arrived_at: float, now: float) -> str:
        """An arrival for the enqueue script: its time on Redis's clock ('@' and µs),
        mapped through the offsets measured on every call. Not its age: the call is
        sent a scheduler pass or more after the age is read (coredis takes a lock), and
        Redis read the age against its own later clock, so every arrival of a busy
        process counted that pass as later than it was, and a process less busy
        queued its later arrivals ahead (an outside load test: 27 expiries in Redis
        mode overtaken by one session stamped 7 ms after them). The age is sent only
        before the first call has measured the clocks."""
        redis_us = self._clock.arrival_us(arrived_at)
        if redis_us is not None:
            return f"@{redis_us}"
        return str(round(max(0.0, now - arrived_at) * 1e6))

    async def _forgetter(self) -> None:
        """Forget, in batches, members whose clean-up could not reach Redis at once."""
        while True:
            await self._forget_wakeup.wait()
            self._forget_wakeup = trio.Event()
            now = trio.current_time()
            for member, give_up in list(self._forgetting.items()):
                if now > give_up:
                    del self._forgetting[member]
            if not await self._forget_pending():
                await trio.sleep(0.2)
                self._forget_wakeup.set()

    async def _forget_pending(self) -> bool:
        """One ``forget`` call for every member the forgetter holds; False if Redis
        could not be reached (they stay held)."""
        members = list(self._forgetting)
        if not members:
            return True
        try:
            await self._call("forget", members, limit=CLEANUP_GRACE)
        except _Unreachable:
            return False
        for member in members:
            self._forgetting.pop(member, None)
        return True

    async def _forget_before_exit(self) -> None:
        """On the way out, one last call for what the forgetter still holds (a slot
        given up while Redis stalled: a drain's ``lease_lost`` sessions), bounded by
        CLEANUP_GRACE. Dropped with the process, those slots waited for their leases to
        lapse; a Redis that is stalled still runs the call when it resumes."""
        left = len(self._forgetting)
        if not await self._forget_pending():
            logger.warning(
                "gate %r: %d slot(s) or queue place(s) left to their leases' lapse",
                self.gate_name,
                left,
            )

    async def _listener(self) -> None:
        """Receive published changes: hand-offs, figures and the queue mirror."""
        backoff = 0.05
        while True:
            try:
                async with self._client.pubsub(
                    channels=[self.channel],
                    ignore_subscribe_messages=True,
                    retry_policy=NoRetryPolicy(),
                ) as pubsub:
                    # Subscribed: anything published from now on reaches us, so a
                    # snapshot taken now plus the messages after it is complete.
                    self._subscribed = True
                    self._listener_lost = False
                    self._health_moved()
                    self._resync_wanted.set()
                    self._renew_queue_now.set()
                    backoff = 0.05
                    async for message in pubsub:
                        if message["type"] == "message":
                            self._on_message(str(message["data"]))
            except Exception as exc:  # any failure: reconnect (Cancelled passes through)
                if self._subscribed:
                    logger.warning("hand-off listener lost Redis: %r", exc)
                    self._listener_lost = True
            self._subscribed = False
            self._health_moved()
            self._mirror.ok = False
            await trio.sleep(backoff)
            backoff = min(backoff * 2, 0.5)

    async def _mirror_keeper(self) -> None:
        """Rebuild the queue mirror whenever the listener asks (new subscription, gap)."""
        while True:
            await self._resync_wanted.wait()
            self._resync_wanted = trio.Event()
            if not self._subscribed:
                continue
            try:
                await self._resync()
            except _Unreachable:
                await trio.sleep(0.1)
                self._resync_wanted.set()

    async def _resync(self) -> None:
        """Rebuild the queue mirror from a snapshot."""
        figures, answer = await self._call_figures("snapshot", [], limit=2.0)
        n = int(answer[0])
        queue = answer[1 : 1 + 2 * n]
        self._mirror.reset(
            ((str(queue[i]), int(queue[i + 1])) for i in range(0, len(queue), 2)), figures.ver
        )
        holders = answer[1 + 2 * n :]
        for i in range(0, len(holders), 3):
            self._deliver(str(holders[i]), Grant(int(holders[i + 1]), int(holders[i + 2])))
        self._changed()

    def _on_message(self, data: str) -> None:
        figures = Figures.from_message(data)
        self._absorb(figures)
        if not self._mirror.apply(figures):
            self._resync_wanted.set()  # missed a change: rebuild from a snapshot
        self._changed()

    def _changed(self) -> None:
        hook = self.on_change
        if hook is not None:
            hook()

    async def _reaper(self) -> None:
        """Tick at the nearest lease expiry, so lapsed leases are reclaimed on time."""
        while True:
            # Never twice within 5 ms: a deadline estimated a little early (clock drift)
            # costs a retick, not a busy loop.
            with trio.CancelScope(deadline=max(self._reap_at, self._reap_floor)) as scope:
                self._reap_scope = scope
                await trio.sleep_forever()
            self._reap_at = math.inf
            self._reap_floor = trio.current_time() + 0.005
            try:
                await self._call("release", [], limit=1.0)
            except _Unreachable:
                self._reap_at = trio.current_time() + 0.1

    async def _queue_renewer(self) -> None:
        """Extend this process's queue leases; pick up missed hand-offs; enqueue again
        the entries that went missing. One call every TTL/3 for all of its waiters."""
        every = self.lease_ttl / 3
        wait = every
        while True:
            with trio.move_on_after(wait):
                await self._renew_queue_now.wait()
            self._renew_queue_now = trio.Event()
            wait = every
            waiting = [
                w
                for w in self._waiters.values()
                if w.seq is not None and not w.granted.is_set() and not w.requeue
            ]
            if not waiting:
                continue
            # Bounded as a slot's renewal is (``_renewing``): a TTL from when it was sent.
            sent_at_most = self._clock.redis_at_most(trio.current_time())
            bound = "" if sent_at_most is None else str(sent_at_most + self._ttl_ms)
            try:
                answer = await self._call(
                    "renew_queue", [bound, *(w.member for w in waiting)], limit=every
                )
            except _Unreachable:
                wait = min(every, 0.1)  # try again soon: two misses and the places lapse
                continue
            for i, waiter in enumerate(waiting):
                status, a, b = answer[3 * i : 3 * i + 3]
                if self._waiters.get(waiter.member) is not waiter:
                    continue  # it left meanwhile (its leave forgets it)
                if status == "G":
                    self._deliver(waiter.member, Grant(int(a), int(b)))
                elif status == "M" and not waiter.granted.is_set():
                    # Its place lapsed (this process stalled) or Redis lost the gate:
                    # enqueue it again, at its own arrival time.
                    waiter.requeue = True
                    self._pending[waiter.key] = waiter
                    self._pending_wakeup.set()

    async def _health(self) -> None:
        """Tick when Redis has been quiet for :data:`HEALTH_QUIET` seconds: ``healthy``
        (and ``/readyz``) turns false within about a second of an outage even on an idle
        process (it took up to 2.2 s, with arrivals refused from 0.46 s: an outside
        review), true again once Redis is back; the clock bound always has a recent
        sample."""
        while True:
            await trio.sleep(0.25)
            if trio.current_time() - self._last_ok < HEALTH_QUIET:
                continue
            with suppress(_Unreachable):
                await self._call("release", [], limit=FAIL_FAST)


@asynccontextmanager
async def open_redis_backend(
    url: str | None,
    *,
    gate_name: str,
    capacity: int,
    lease_ttl: float,
    client: coredis.Redis[str] | None = None,
) -> AsyncIterator[RedisBackend]:
    """Connect to Redis at ``url`` and run a gate backend for ``gate_name``.

    The first process to create the gate sets its capacity; a later one with another
    ``capacity`` logs a warning and uses the stored one. If Redis loses the gate, the
    process that touches it first re-creates it with the last global capacity it knew
    (a resize included), not with its own ``capacity``. Redis being unreachable at
    start is not an error: the backend reports ``healthy == False`` and refuses
    arrivals with :class:`BackendUnavailable` until Redis answers. A Redis that answers
    and refuses the configuration (see :class:`RedisRefused`) is one.

    Args:
        url: ``redis://host:port/db`` (``rediss://`` and ``unix://`` work too); ignored
            when ``client`` is given.
        gate_name: the gate's name in Redis; processes sharing it share the cap.
        capacity: the capacity to create the gate with, if it does not exist yet.
        lease_ttl: seconds a slot or queue lease lives without renewal (at least
            :data:`MIN_LEASE_TTL`, 0.1; ``--lease-ttl`` asks for 1 or more).
        client: a coredis client made by the caller, not yet entered, with
            ``decode_responses=True`` (e.g. ``Sentinel(...).primary_for(name)``); it is
            entered here, once, for the backend's lifetime.
    """
    _check_arguments(gate_name, capacity, lease_ttl)
    logging.getLogger("coredis").addFilter(_not_a_cancelled_connect)  # added once only
    if client is None:
        if url is None:
            raise ValueError("open_redis_backend needs a url or a client")
        client = _client_for(url)
    raised: BaseException | None = None  # what the caller's block raised, if anything
    try:
        async with client, trio.open_nursery() as nursery:
            backend = RedisBackend(
                client, nursery, gate_name=gate_name, capacity=capacity, lease_ttl=lease_ttl
            )
            try:
                await backend._start()
            except RedisRefused as exc:
                raised = exc
                raise
            try:
                yield backend
            except BaseException as exc:
                raised = exc
                raise
            await backend._forget_before_exit()
            nursery.cancel_scope.cancel()
    except BaseExceptionGroup as group:
        # Our tasks and coredis's never raise out of these nurseries (they reconnect):
        # groups of one around the very exception the caller's block raised are only
        # the nurseries' wrapping, taken off so the caller gets its exception as it was
        # raised (a group the caller raised itself stays that group).
        if raised is None or not _wraps_only(group, raised):
            raise
        raise raised from raised.__cause__


def _not_a_cancelled_connect(record: logging.LogRecord) -> bool:
    """coredis logs a connection attempt cancelled from outside (the backend closing as
    a connection of its pool was still being made) at ERROR, "Connection attempt failed
    unexpectedly!" with a page of traceback: a clean exit looked like a failure (an
    outside review, 1 exit in 6 of two processes opening one new gate). A cancellation
    is not a failure; every other record passes."""
    if record.msg != "Connection attempt failed unexpectedly!" or not record.exc_info:
        return True
    error = record.exc_info[1]
    if isinstance(error, BaseExceptionGroup):
        return error.split(trio.Cancelled)[1] is not None
    return not isinstance(error, trio.Cancelled)


def _client_for(url: str) -> coredis.Redis[str]:
    """A client for ``url`` as the backend and the start's check use it."""
    # Connection attempts must end (as errors) inside every call's own time limit: a
    # connect cancelled from outside loses coredis 6.9 a pool slot for good. Two
    # attempts of at most CONNECT_TIMEOUT each fit in FAIL_FAST.
    return coredis.Redis.from_url(
        url,
        decode_responses=True,
        connect_timeout=CONNECT_TIMEOUT,
        retry_policy=ConstantRetryPolicy(
            (coredis.exceptions.ConnectionError, TimeoutError), retries=1, delay=0.01
        ),
    )


def _key_prefix(gate_name: str) -> str:
    """The gate's keys and channel start with this (one cluster hash slot per gate)."""
    return f"sg:{{{gate_name}}}"


#: What the check runs as the gate's scripts would: a script that writes a scratch key
#: of the gate's (gone a millisecond later) and reads its meta key.
_CHECK_LUA: Final = "redis.call('SET', KEYS[1], '1', 'PX', 1)\nreturn redis.call('EXISTS', KEYS[2])"


async def check_redis(url: str, *, gate_name: str | None = None, limit: float = 1.0) -> None:
    """Raise :class:`RedisRefused` if Redis at ``url`` answers and refuses the
    connection's configuration (with ``gate_name``: also a script on the gate's keys,
    as an ACL user without the rights would be refused); return otherwise, an
    unreachable Redis (within ``limit`` seconds) included: an outage is not an error at
    start. ``sessiongate serve`` checks this once before it serves."""
    if gate_name is not None:
        check_gate_name(gate_name)
    client = _client_for(url)
    try:
        with trio.move_on_after(limit):
            async with client:
                await client.ping()
                if gate_name is not None:
                    prefix = _key_prefix(gate_name)
                    keys = [f"{prefix}:check", f"{prefix}:meta"]
                    await client.eval(_CHECK_LUA, keys=keys, args=[])
    except* _REDIS_ERRORS as group:
        for error in _leaves(group):
            reason = _refusal(error)
            if reason is not None:
                raise RedisRefused(f"Redis refused the connection ({reason})") from None


def _leaves(group: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


def _wraps_only(group: BaseExceptionGroup[BaseException], inner: BaseException) -> bool:
    """Whether ``group`` is nothing but groups of one, nested around ``inner`` (or around
    the copy of it that Trio's cancel scopes derive from a group: same leaves)."""
    exc: BaseException = group
    while not _same(exc, inner):
        if not isinstance(exc, BaseExceptionGroup) or len(exc.exceptions) != 1:
            return False
        exc = exc.exceptions[0]
    return True


def _same(exc: BaseException, inner: BaseException) -> bool:
    if exc is inner:
        return True
    return (
        isinstance(exc, BaseExceptionGroup)
        and isinstance(inner, BaseExceptionGroup)
        and type(exc) is type(inner)
        and exc.message == inner.message
        and len(exc.exceptions) == len(inner.exceptions)
        and all(a is b for a, b in zip(exc.exceptions, inner.exceptions, strict=True))
    )


def _check_arguments(gate_name: str, capacity: int, lease_ttl: float) -> None:
    check_gate_name(gate_name)
    check_capacity(capacity)
    check_seconds("lease_ttl", lease_ttl, positive=True)
    if math.isinf(lease_ttl):
        raise ValueError("lease_ttl must be finite: a dead holder's slot must come back")
    if lease_ttl < MIN_LEASE_TTL:
        raise ValueError(
            f"lease_ttl must be at least {MIN_LEASE_TTL:g} s (renewed every third of it), "
            f"got {lease_ttl:g}"
        )
