"""The service behind the app: the gate, the sessions nursery, the drain.

Theory of operation
-------------------
One *owner* task, started in ``before_serving`` with ``await app.nursery.start(...)``,
opens everything long-lived (the Redis backend, the handler's lifespan, the gate) and a
*sessions nursery* of its own. Every session, synchronous or asynchronous, is a task in
that nursery, started with ``nursery.start`` so that the request learns at once whether
its session was refused, and every session task handles its own exceptions, so no
session can take the nursery (or the app) down. A synchronous request only waits for
its session's ``done`` event; if the request is cancelled (its client went away) it
cancels the session's scope.

Draining (SIGTERM through the CLI, or the app's ``after_serving``): the gate closes
(new arrivals are refused with ``shutting_down``, queued sessions end as ``rejected``),
active sessions get ``shutdown_grace`` seconds, then their scopes are cancelled
(``cancelled`` / ``shutting_down``). The listener stays open all along. After the drain
the owner leaves the sessions nursery and closes the long-lived resources, in that order:
no resource vanishes under a live session.
"""

from __future__ import annotations

import importlib
import logging
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import trio

from .. import _errors as errors
from .._gate import Gate, Ticket, cancellation_pending
from ..backends.memory import MemoryBackend
from ..config import Settings
from ..metrics import Metrics
from ._errors import REFUSAL_CODES, ApiError, dumps, retry_after
from ._handlers import Handler, load
from ._idle import log_when_idle, write_logs_now
from ._peers import Peers
from ._sessions import (
    ACTIVE,
    CANCELLED,
    COMPLETED,
    EXPIRED,
    FAILED,
    QUEUED,
    REJECTED,
    Registry,
    SessionRecord,
)

log = logging.getLogger("sessiongate.web")

#: How long cancelled sessions get to finish after the grace cut (longer than a Redis
#: release's own bound), and synchronous callers to take their answers, before the
#: owner stops waiting for them.
CUT_BOUND = 1.5
ANSWER_BOUND = 1.0
#: How long start-up waits for a Redis backend to report itself healthy.
STARTUP_HEALTH_WAIT = 2.0
#: How long an asynchronous request waits for a shared backend to queue or refuse it.
SETTLE_BOUND = 1.0
#: Most seconds a GET or an event stream's first event waits for a session between two
#: states (taking its queue place, or leaving it) to settle.
SETTLE_WAIT = 0.25


class _HandlerFailed(Exception):
    """What a handler raised (its ``__cause__``), whatever its type. A handler may guard
    a resource with a Gate of its own: its QueueFull or QueueTimeout is the session
    failing, not this gate refusing it (an outside review)."""


def is_cancellation(error: BaseException) -> bool:
    """Whether ``error`` is a cancellation to pass on: Trio's cancellation (or a group
    carrying one) while the task really is being cancelled.

    Anything else a handler raises fails its session only: SystemExit, KeyboardInterrupt
    (the service's own signals arrive through Trio's signal receiver, never as
    KeyboardInterrupt), GeneratorExit, any BaseException subclass, and a
    ``trio.Cancelled`` the handler raised itself with no cancellation pending. None of
    them may take the sessions nursery, and with it every later session, down.
    """
    if not cancellation_pending():
        return False
    if isinstance(error, trio.Cancelled):
        return True
    return isinstance(error, BaseExceptionGroup) and error.subgroup(trio.Cancelled) is not None


#: The ASGI scope key under which a ``POST`` request carries its arrival stamp.
ARRIVAL_KEY = "sessiongate.arrival"

_DETAILS = {
    "cancelled": "the session was cancelled (DELETE)",
    "client_disconnected": "the synchronous caller went away",
    "shutting_down": "the server is shutting down",
    "session_failed": "the session's handler raised an error",
    "lease_lost": "the session's slot lease was lost",
}


def _error(code: str, detail: str | None = None) -> dict[str, Any]:
    return {"error": code, "detail": detail if detail is not None else _DETAILS[code]}


class NotStarted(Exception):
    """The app's lifespan has not started (use ``app.test_app()`` or a server)."""


class StartRefused(Exception):
    """The service cannot start, for a reason one line tells (no traceback is logged for
    it): ``setting`` names the setting at fault (the command line names it as given), or
    is None when the fault is elsewhere (the handler's own start-up)."""

    def __init__(self, reason: str, *, setting: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.setting = setting


@asynccontextmanager
async def open_backend(settings: Settings) -> AsyncIterator[Any]:
    """The Redis backend, for the service's lifetime (imported only in Redis mode).

    Raises:
        RuntimeError: the Redis backend is not installed in this build.
        StartRefused: Redis answered and refused the configuration (a password, a
            database out of range): a setting to correct, not an outage to wait out.
    """
    try:
        module = importlib.import_module("sessiongate.backends.redis")
    except ImportError as error:
        raise RuntimeError(f"the redis backend is not available: {error}") from error
    try:
        async with module.open_redis_backend(
            settings.backend,
            gate_name=settings.gate_name,
            capacity=settings.capacity,
            lease_ttl=settings.lease_ttl,
        ) as backend:
            yield backend
    except module.RedisRefused as error:  # only ever raised as the backend opens
        raise StartRefused(str(error), setting="backend") from None


class Service:
    """The gate and its sessions, owned by one task in the app's nursery."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.handler_fn = load(settings.handler)
        self.metrics = Metrics()
        self.backend: Any = None
        self._gate: Gate | None = None
        self._registry: Registry | None = None
        self._handler: Handler | None = None
        self._sessions: trio.Nursery | None = None
        self.wall_offset = 0.0
        self.draining = False
        #: Why the service could not start, if it could not (for the command line).
        self.start_refused: StartRefused | None = None
        #: Sibling workers of ``serve --workers N`` (None when this is the only one).
        self.peers: Peers | None = None
        self._closed = False
        self._drain_started = False
        # The drain's wait for active sessions (the grace); a cut ends it at once.
        self._grace: trio.CancelScope | None = None
        self._drained = trio.Event()
        self._stop = trio.Event()
        self._stopped = trio.Event()
        self._sync_waiters = 0
        self._answered = trio.Event()

    # -- accessors --------------------------------------------------------------------

    @property
    def gate(self) -> Gate:
        if self._gate is None:
            raise NotStarted("the app is not serving yet")
        return self._gate

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            raise NotStarted("the app is not serving yet")
        return self._registry

    @property
    def started(self) -> bool:
        return self._sessions is not None

    @property
    def serving(self) -> bool:
        """Started and not stopped: sessions can still be admitted (readiness)."""
        return self._sessions is not None and not self._closed

    @property
    def backend_healthy(self) -> bool:
        return bool(getattr(self.backend, "healthy", True))

    @property
    def shared_backend(self) -> bool:
        return not isinstance(self.backend, MemoryBackend)

    def retry_after(self) -> str:
        """An honest Retry-After: a newcomer's likely wait at the recent hand-off rate
        (where nobody can queue, at the pace a full gate's slots come back: the gate's
        own estimate).

        While a shared backend is unreachable the queue's figures are stale (and its
        stall would grow the estimate by the second): 1, since the service takes
        arrivals again within a second of the backend's return, and when that will be
        is not known here.
        """
        if not self.backend_healthy:
            return "1"
        gate = self.gate
        return retry_after(gate.estimate_wait(gate.queued + 1))

    # -- the owner task ---------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the long-lived resources and the sessions nursery until stopped."""
        settings = self.settings
        try:
            async with AsyncExitStack() as stack:
                if settings.redis:
                    self.backend = await stack.enter_async_context(open_backend(settings))
                    # Start serving once Redis answers (and its hand-off listener is
                    # subscribed), but never hang start-up on a Redis that is down: the
                    # service comes up refusing with backend_unavailable, and recovers.
                    with trio.move_on_after(STARTUP_HEALTH_WAIT):
                        await self.backend.wait_healthy()
                    # Other processes move the global queue too: their changes, as
                    # published, wake the event streams that show positions.
                    self.backend.on_change = self._on_backend_change
                else:
                    self.backend = MemoryBackend(settings.capacity)
                # The backend has the capacity (a Redis gate's may be another process's).
                self._gate = Gate(
                    max_wait=settings.max_wait, max_queue=settings.max_queue, backend=self.backend
                )
                self._registry = Registry(self._gate, settings.result_ttl, settings.result_max)
                # A session taking its queue place wakes event streams and async answers.
                self._gate.on_queued = self._on_queued
                self._handler = Handler(
                    self.handler_fn,
                    settings.max_duration,
                    trio.CapacityLimiter(settings.thread_limit),
                )
                lifespan = self._handler.lifespan()
                if lifespan is not None:
                    try:
                        await stack.enter_async_context(lifespan)
                    except Exception as error:
                        # The handler's own code: its traceback is worth a look, logged
                        # once here; the command line then says one line and exits 1.
                        log.exception("the handler's lifespan failed at start-up")
                        raise StartRefused(
                            f"the handler's lifespan failed at start-up: "
                            f"{type(error).__name__}: {error} (traceback in the log)"
                        ) from error
                self.wall_offset = time.time() - trio.current_time()
                # The result store's sweeper, outside the sessions (a drain waits for
                # those); cancelled once they are done, as the service stops.
                housekeeping = await stack.enter_async_context(trio.open_nursery())
                housekeeping.start_soon(self._registry.sweep)
                async with trio.open_nursery() as sessions:
                    self._sessions = sessions
                    task_status.started()
                    await self._stop.wait()
                    await self.drain()
                    self._closed = True
                    # Backstop: nothing should be left, but never hang the exit on it.
                    sessions.cancel_scope.deadline = trio.current_time() + CUT_BOUND
                housekeeping.cancel_scope.cancel()
                await self.gate.aclose()
        except StartRefused as refused:
            self.start_refused = refused  # for the command line, past Hypercorn's wrapping
            raise
        finally:
            self._closed = True
            write_logs_now()
            self._stopped.set()

    async def shutdown(self) -> None:
        """Drain (if not done yet), stop the owner and wait for it (``after_serving``)."""
        self._stop.set()
        await self._stopped.wait()

    async def drain(self) -> None:
        """Refuse new sessions, end queued ones, give active ones the grace, then cut.

        Idempotent; a second caller waits for the first drain to finish.
        """
        if self._drain_started:
            await self._drained.wait()
            return
        self._drain_started = True
        self.draining = True
        gate, registry = self.gate, self.registry
        log.info(
            "draining: %d active, %d queued, grace %gs",
            gate.local_active,
            gate.local_queued,
            self.settings.shutdown_grace,
        )
        with trio.move_on_after(self.settings.shutdown_grace) as self._grace:
            await gate.aclose()
        for record in list(registry.live.values()):
            record.cancel("shutting_down")
        with trio.move_on_after(CUT_BOUND):
            while registry.live:
                await registry.idle.wait()
        for record in list(registry.live.values()):
            self._abandon(record)
        # Let synchronous callers take their answers before the server stops.
        with trio.move_on_after(ANSWER_BOUND):
            while self._sync_waiters:
                await self._answered.wait()
        log.info("drained")
        self._drained.set()

    def _abandon(self, record: SessionRecord) -> None:
        """End a session that is still running ``CUT_BOUND`` after it was cancelled (its
        handler ignores cancellation: a shielded wait, a lifespan that blocks): its
        caller is answered now, as cancelled with the cancellation's reason; its task
        keeps its slot until the handler returns, and at a drain the process exits
        without it (``sessiongate serve`` bounds the exit). An outside review saw such
        a session hold the exit until it returned (30 s with a grace of 2), its caller's
        connection cut with no answer, and then count as completed."""
        reason = record.cancel_reason or "shutting_down"
        log.error(
            "session %s still running %gs after it was cancelled (its handler ignores "
            "cancellation): ended as cancelled (%s); its slot stays taken until it returns",
            record.id,
            CUT_BOUND,
            reason,
        )
        record.abandoned = True  # it ran (and still runs): its admission stays shown
        self._end(record, CANCELLED, error=_error(reason))

    def cut(self) -> None:
        """End the grace now: cancel every live session (a second SIGTERM). The drain
        stops waiting for the grace at once, so a session that ignores its
        cancellation is abandoned ``CUT_BOUND`` after this, not after the grace (an
        outside review: a second signal did not shorten such a stop)."""
        if self._grace is not None:
            self._grace.cancel()
        if self._registry is not None:
            for record in list(self._registry.live.values()):
                record.cancel("shutting_down")

    # -- sessions ---------------------------------------------------------------------

    def stamp(self, at: float | None = None) -> Ticket | None:
        """A request's arrival (its FIFO place and the start of its queue deadline):
        ``at``, when its head reached the host, else now; None before the service has
        started. It reserves nothing: a request that never becomes a session costs
        nothing."""
        gate = self._gate
        return gate.arrive(id=self._session_id(), at=at) if gate is not None else None

    def _session_id(self) -> str | None:
        """A sibling worker's session ids carry its number (``_peers``); else the
        gate's own 128 random bits, made when first asked for."""
        return self.peers.new_session_id() if self.peers is not None else None

    def owner_of(self, session_id: str) -> int | None:
        """The sibling worker that has this session, if another one does."""
        return self.peers.owner_of(session_id) if self.peers is not None else None

    @staticmethod
    def stamp_of(scope: Mapping[str, Any]) -> Ticket | None:
        """The arrival stamp a request's ASGI scope carries, if any."""
        stamp = scope.get(ARRIVAL_KEY)
        return stamp if isinstance(stamp, Ticket) else None

    def arrive(self, stamp: Ticket | None = None) -> Ticket:
        """The FIFO place of a checked request, reserved until its session enters the
        gate (a scheduler pass later), so no later arrival is admitted ahead of it:
        ``stamp`` if the request was stamped on arrival, else one taken now. The ticket
        is the session's own; its id (128 random bits) is the session id."""
        gate = self.gate
        if stamp is None:
            return gate.arrive(reserve=True, id=self._session_id())
        gate.reserve(stamp)
        return stamp

    def validate(self, body: dict[str, Any]) -> None:
        if self._handler is None:
            raise NotStarted("the app is not serving yet")
        self._handler.validate(body)

    def new_session(self, arrival: Ticket, body: dict[str, Any]) -> SessionRecord:
        """A session record for a valid request (not started yet, not registered)."""
        return SessionRecord(
            id=arrival.id,
            arrival=arrival,
            body=body,
            wall_offset=self.wall_offset,
        )

    async def start_session(self, record: SessionRecord, *, answer_now: bool = False) -> None:
        """Start the session's task; on return it is queued, active or ended.

        ``answer_now`` (an asynchronous request, answered as soon as this returns): on
        the in-memory backend the task has then run up to its first wait, so a refusal
        at once (queue full, draining) is already known, and a session handed a free
        slot is already active. Without it, the task is only started: a synchronous
        caller waits for the session's end anyway.
        """
        if self._closed or self._sessions is None:
            self.gate.withdraw(record.arrival)
            record.refused_at_once = True
            self._end(record, REJECTED, error=_error("shutting_down"))
            return
        registry = self.registry
        registry.add(record)
        if not answer_now:
            # A synchronous caller only waits for the end (a refusal at once included):
            # no need to wait for the task's first step.
            self._sessions.start_soon(self._session_task, record)
            return
        try:
            # Shielded: a request cancelled meanwhile (its client closed at once, as
            # wrk does at the end of a run) would have Trio leave the task where it
            # was started, in the cancelled request, instead of moving it to the
            # sessions nursery; the asynchronous session must outlive its request (an
            # outside review: such sessions never ran and stayed "queued" for good).
            # The shield covers only the task's first step, up to ``started()``.
            with trio.CancelScope(shield=True):
                await self._sessions.start(self._session_task, record)
        except BaseException:
            self.gate.withdraw(record.arrival)  # idempotent: the task may have entered
            raise
        if self.shared_backend:
            await self._settle(record)
        elif record.state == QUEUED:
            # A session handed a free slot is rescheduled in the same batch as this
            # task: one more checkpoint lets it reach "active".
            await trio.lowlevel.checkpoint()

    async def _settle(self, record: SessionRecord) -> None:
        # A shared backend queues over the network: give it up to 1 s to say whether
        # the session is queued (with its position, which arrives with the published
        # change), admitted or refused, so a refusal is answered as one. Each of those
        # pokes the registry (``_on_queued``, ``_on_backend_change``, ``_admitted``,
        # ``_end``).
        with trio.move_on_after(SETTLE_BOUND):
            while record.state == QUEUED and record.position() is None:
                await self.registry.pulse.wait()

    def _on_queued(self, ticket: Ticket) -> None:
        self.registry.poke()

    def _on_backend_change(self) -> None:
        if self._registry is not None:
            self._registry.poke()

    async def settled(self, record: SessionRecord) -> None:
        """Return once ``record`` is not between two states (``settling``), or after
        :data:`SETTLE_WAIT` seconds: what a GET and an event stream's first event show
        must not be "queued" with no position (an outside chaos test)."""
        if record.settling:
            with trio.move_on_after(SETTLE_WAIT):
                while record.settling:
                    await self.registry.pulse.wait()

    async def wait_sync(self, record: SessionRecord) -> None:
        """Wait for a synchronous caller's session to end."""
        self._sync_waiters += 1
        try:
            await record.done.wait()
        finally:
            self._sync_waiters -= 1
            if not self._sync_waiters:
                answered, self._answered = self._answered, trio.Event()
                answered.set()

    async def cancel(self, record: SessionRecord) -> bool:
        """DELETE: cancel a live session and wait for it to end; False if it had ended.

        The wait is bounded: a session still running ``CUT_BOUND`` after it was
        cancelled (its handler ignores cancellation, or waits for an uninterruptible
        thread) is ended as cancelled there and answered; it keeps its slot until its
        handler really returns, so the cap holds. An outside review saw such a DELETE
        wait 2.7 s and then answer 409 ``already_ended`` (completed).
        """
        if not record.cancel("cancelled"):
            return False
        with trio.move_on_after(CUT_BOUND):
            await record.done.wait()
        if not record.ended:
            self._abandon(record)
        return record.state == CANCELLED

    async def _session_task(
        self,
        record: SessionRecord,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        # Every exception is handled here: a session never takes the nursery down.
        try:
            await self._run_session(record, task_status)
        except BaseException as error:
            if is_cancellation(error):
                if not record.ended:
                    # Cancelled from outside its own scope (the sessions nursery): it
                    # still ends, once, so nothing is left "live" for good.
                    reason = record.cancel_reason or "shutting_down"
                    self._end(record, CANCELLED, error=_error(reason))
                raise
            log.exception("session %s: internal error", record.id)
            if not record.ended:
                self._end(record, FAILED, error=_error("session_failed"))

    async def _run_session(self, record: SessionRecord, task_status: trio.TaskStatus[None]) -> None:
        gate = self.gate
        handler = self._handler
        assert handler is not None
        state: str | None = None
        error: dict[str, Any] | None = None
        result: Any = None
        with trio.CancelScope() as scope:
            record.scope = scope
            if record.cancel_reason is not None:
                scope.cancel()  # cancelled before its task ran (the caller went away)
            task_status.started()
            closed_at_arrival = gate.closed
            try:
                async with gate.session(arrival=record.arrival) as ticket:
                    self._admitted(record)
                    try:
                        value = await handler(record.body, ticket)
                        # Cancelled (DELETE, its caller gone, the drain's cut) while it
                        # ran, it ends cancelled, also when its handler returned all
                        # the same (it ignores cancellation, or waited for a thread that
                        # cannot be interrupted): the DELETE came while it was live, and
                        # was answered "already ended" (an outside review).
                        await trio.lowlevel.checkpoint_if_cancelled()
                        if handler.fn is not None:  # the sleep demo returns parsed JSON
                            dumps(value)  # the result must be JSON, or the session failed
                    except BaseException as exc:
                        if is_cancellation(exc):
                            raise
                        # Through the gate's exit (it counts the session failed), told
                        # apart from the gate's own refusals below.
                        raise _HandlerFailed from exc
                    state, result = COMPLETED, value
            except _HandlerFailed as failed:
                record.exception = failed.__cause__  # for the log line, never the client
                state, error = FAILED, _error("session_failed")
            except errors.QueueTimeout as exc:
                record.waited = exc.waited
                state, error = EXPIRED, _error("queue_timeout", str(exc))
            except errors.GateClosed as exc:
                record.refused_at_once = closed_at_arrival
                state, error = REJECTED, _error("shutting_down", str(exc))
            except errors.AdmissionError as exc:  # queue full, backend unavailable
                record.refused_at_once = True
                state, error = REJECTED, _error(exc.code, str(exc))
            except errors.LeaseLost as exc:
                state, error = FAILED, _error("lease_lost", str(exc) or None)
            except BaseException as exc:
                if is_cancellation(exc):
                    raise  # a real cancellation: the scope below (or an outer one) takes it
                record.exception = exc  # for the log line, never for the client
                state, error = FAILED, _error("session_failed")
        if scope.cancelled_caught or state is None:
            reason = record.cancel_reason or "cancelled"
            state, error, result = CANCELLED, _error(reason), None
        if record.ended:  # abandoned at the drain's cut, and answered then
            log.warning("session %s returned (%s) after it was abandoned", record.id, state)
            return
        self._end(record, state, error=error, result=result)

    def _admitted(self, record: SessionRecord) -> None:
        record.state = ACTIVE
        self.metrics.session_admitted(record.arrival.waited)
        self.registry.changed(record)

    def _end(
        self,
        record: SessionRecord,
        state: str,
        *,
        error: dict[str, Any] | None = None,
        result: Any = None,
    ) -> None:
        record.state = state
        record.error = error
        record.result = result
        # An admitted session ended when it gave its slot back (a successor may have
        # been admitted in that same instant); any other when it was refused or expired.
        released = record.arrival.released_at
        record.ended_at = released if released is not None else trio.current_time()
        if self._registry is not None:
            self._registry.finish(record)
        else:
            record.done.set()
        code = record.error_code
        if code is not None and (code in REFUSAL_CODES or code == "cancelled"):
            self.metrics.refused(code)
        elif state == CANCELLED:
            self.metrics.refused("cancelled")
        if record.refused_at_once:
            log.debug("session refused at once: %s", code)
            return
        admitted = record.admitted_at
        end = record.ended_at
        waited = (admitted if admitted is not None else end) - record.arrival.arrived_at
        ran = end - admitted if admitted is not None else None
        self.metrics.session_ended(state, ran)
        line = "session %s %s%s waited=%.3fs ran=%.3fs"
        args = (record.id, state, f" ({code})" if code is not None else "", waited, ran or 0.0)
        if record.exception is not None:
            log.error(line, *args, exc_info=record.exception)
            record.exception = None
        else:
            # Routine: written when the loop is idle (``_idle``), as of now.
            log_when_idle(log, logging.INFO, line, *args)

    def refusal(self, record: SessionRecord) -> ApiError:
        """The answer for a session that ended without completing (sync) or was refused."""
        assert record.error is not None
        code = record.error_code
        assert code is not None
        headers: dict[str, str] = {}
        extra: dict[str, Any] = {}
        if code in REFUSAL_CODES:
            headers["Retry-After"] = self.retry_after()
        if code == "queue_timeout":
            waited = record.waited
            extra["waited_s"] = waited if waited is not None else self.settings.max_wait
        if code == "client_disconnected":
            code = "cancelled"  # nobody is listening; any answer will do
        return ApiError(code, str(record.error["detail"]), headers=headers, extra=extra)
