"""Session records: what the HTTP service knows about each session, and where it keeps them.

Theory of operation
-------------------
A :class:`SessionRecord` is made when a valid ``POST /sessions`` has read its body; it is
*live* (``queued``, then ``active``) until its task ends it with one terminal state
(``completed``, ``failed``, ``expired``, ``cancelled``, ``rejected``). Each change of
state is appended to ``transitions`` as a snapshot of the session object (while an event
stream follows the session), so a stream that wakes late still sends one event per
change, in order.

The :class:`Registry` keeps live records by id, and ended sessions for ``result_ttl``
seconds, at most ``result_max`` of them, oldest evicted first: memory stays flat under
any load. An ended session is kept as an :class:`EndedSession`: its final session
object, encoded once (nothing in it changes any more), instead of the live record with
its ticket, cancel scope, event and body (about 0.6 KiB a session instead of 1.5 KiB, by
tracemalloc: under overload the store fills at about one session per second and slot).
A completed session's document is encoded as it ends (it is its synchronous caller's
answer, and holds the handler's result as it was then); any other's when the run loop
is next idle (``_idle``), or when it is first read if that is sooner: under overload a
few hundred queued sessions expire at once, each answered with its error, not its
document, and encoding those documents first made every answer of the wave later.
Ended sessions are kept in the order they ended, so expiry only ever looks at the
front. A refusal at once (queue full, draining, backend down) is *forgotten*: no
session object is kept for it.

Every change also sets the registry's ``pulse`` event (and replaces it): an event
stream of a queued session waits on it to notice when its position may have moved
(any queued session leaving the queue moves the ones behind it).
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any, Final

import attrs
import trio

from .._gate import Gate, Ticket
from ._errors import dumps
from ._idle import call_when_idle

QUEUED = "queued"
ACTIVE = "active"
COMPLETED = "completed"
FAILED = "failed"
EXPIRED = "expired"
CANCELLED = "cancelled"
REJECTED = "rejected"
LIVE_STATES = (QUEUED, ACTIVE)
TERMINAL_STATES = (COMPLETED, FAILED, EXPIRED, CANCELLED, REJECTED)


@attrs.define(eq=False)
class SessionRecord:
    """One session as the service sees it. Times are on the Trio clock."""

    id: str
    #: The session's ticket from its arrival on (the gate yields the same object on
    #: admission): its stamp, and its position while queued.
    arrival: Ticket
    body: dict[str, Any]
    #: Unix time minus Trio time, to show times as Unix time.
    wall_offset: float
    state: str = QUEUED
    ended_at: float | None = None
    result: Any = None
    error: dict[str, Any] | None = None
    #: Refused at once (queue full, draining, backend down): answered, then forgotten.
    refused_at_once: bool = False
    #: Why the session was cancelled, set by whoever cancels first.
    cancel_reason: str | None = None
    #: Seconds waited when the queue deadline passed (for ``waited_s``).
    waited: float | None = None
    scope: trio.CancelScope | None = None
    #: What the handler raised, until the session's end is logged.
    exception: BaseException | None = None
    #: Ended by the drain while its handler, ignoring cancellation, still ran.
    abandoned: bool = False
    done: trio.Event = attrs.Factory(trio.Event)
    transitions: list[dict[str, Any]] = attrs.Factory(list)
    #: Event streams following this session; snapshots are kept only while there are.
    watchers: int = 0
    #: The final session object, encoded once (:meth:`final_document`).
    document: bytes | None = None
    #: Set at this session's next change of state (see :meth:`next_change`).
    _change: trio.Event | None = None

    def next_change(self) -> trio.Event:
        """An event set at this session's next change of state."""
        if self._change is None:
            self._change = trio.Event()
        return self._change

    def note_change(self) -> None:
        """Wake whatever waits for this session's next change."""
        change, self._change = self._change, None
        if change is not None:
            change.set()

    @property
    def shown_state(self) -> str:
        """The state as clients see it. A releaser hands a queued session its slot at
        once (``admitted_at`` is stamped, the gate counts the slot) and the session's
        task starts it a scheduler pass later: from the hand-off on it shows as
        ``active``, so state, position and ``admitted_at`` never disagree."""
        if self.state == QUEUED and self.arrival.admitted_at is not None:
            return ACTIVE
        return self.state

    @property
    def admitted_at(self) -> float | None:
        """When the session got its slot (Trio clock): the gate sets it on the ticket.
        None for a session that ended without running (a slot handed over at the very
        instant its deadline fired goes straight on): an ended session ran if it gave a
        slot back."""
        ticket = self.arrival
        if self.state in LIVE_STATES or ticket.released_at is not None or self.abandoned:
            return ticket.admitted_at
        return None

    @property
    def ended(self) -> bool:
        return self.state in TERMINAL_STATES

    @property
    def error_code(self) -> str | None:
        return None if self.error is None else str(self.error["error"])

    def position(self) -> int | None:
        return self.arrival.position if self.state == QUEUED else None

    @property
    def settling(self) -> bool:
        """Queued, yet not in the queue: still taking its place (a Redis enqueue on its
        way, a task that has not run yet), or leaving it (expired, cancelled or refused,
        its task not run yet). For a few milliseconds its object would say ``queued``
        with no position (an outside chaos test), and one about to be refused
        ``queue_full`` was listed as queued."""
        return self.state == QUEUED and self.arrival.admitted_at is None and self.position() is None

    def cancel(self, reason: str) -> bool:
        """Cancel the session's task (queued or active); False if it already ended.

        A session whose task has not run yet is cancelled as soon as it does.
        """
        if self.ended:
            return False
        if self.cancel_reason is None:
            self.cancel_reason = reason
        if self.scope is not None:
            self.scope.cancel()
        return True

    def to_json(self, gate: Gate) -> dict[str, Any]:
        """The session object, exactly as the SPEC names its fields."""
        now = trio.current_time()
        arrived = self.arrival.arrived_at
        position = self.position()
        eta = gate.estimate_wait(position) if position is not None else None
        queue_end = self.admitted_at if self.admitted_at is not None else self.ended_at
        queued_s = (queue_end if queue_end is not None else now) - arrived
        if self.admitted_at is None:
            active_s = 0.0
        else:
            active_s = (self.ended_at if self.ended_at is not None else now) - self.admitted_at
        return {
            "id": self.id,
            "state": self.shown_state,
            "position": position,
            "eta_s": eta,
            "created_at": self._wall(arrived),
            "admitted_at": self._wall(self.admitted_at),
            "ended_at": self._wall(self.ended_at),
            "queued_s": max(0.0, queued_s),
            "active_s": max(0.0, active_s),
            "result": self.result if self.state == COMPLETED else None,
            "error": self.error,
        }

    def encode(self, gate: Gate) -> bytes:
        """The session object as JSON: the final one once ended, else as of now."""
        if self.ended:
            return self.final_document(gate)
        return dumps(self.to_json(gate))

    def final_document(self, gate: Gate) -> bytes:
        """The ended session's object as JSON, encoded on first use."""
        assert self.ended
        if self.document is None:
            self.document = dumps(self.to_json(gate))
        return self.document

    def _wall(self, t: float | None) -> float | None:
        return None if t is None else t + self.wall_offset


@attrs.define(eq=False)
class EndedSession:
    """An ended session as the registry keeps it: its final session object, encoded
    (on first use, or when the loop is next idle: module docstring)."""

    id: str
    state: str
    #: When it ended (Trio clock), for the result TTL.
    ended_at: float
    #: The document, once encoded.
    _document: bytes | None = attrs.field(default=None, alias="document")
    #: What encodes it until then (dropped once it has: the live record goes with it).
    _encode: Callable[[], bytes] | None = attrs.field(default=None, alias="encode", repr=False)

    @property
    def ended(self) -> bool:
        return True

    @property
    def document(self) -> bytes:
        """The final session object, encoded."""
        self.settle()
        assert self._document is not None
        return self._document

    def settle(self) -> None:
        """Encode the document now, if that has not been done."""
        if self._document is None:
            assert self._encode is not None
            self._document, self._encode = self._encode(), None

    def encode(self, gate: Gate) -> bytes:
        return self.document


#: What the registry finds by id.
Session = SessionRecord | EndedSession


#: Seconds the sweeper may free an ended session after its ``result_ttl`` ran out.
SWEEP_LATENESS: Final = 1.0


@attrs.define
class Registry:
    """Live sessions by id, and ended ones for a while (bounded by TTL and count)."""

    gate: Gate
    result_ttl: float
    result_max: int
    live: dict[str, SessionRecord] = attrs.Factory(dict)
    #: Ended sessions by id, oldest end first.
    ended: OrderedDict[str, EndedSession] = attrs.Factory(OrderedDict)
    _pulse: trio.Event = attrs.Factory(trio.Event)
    #: True once someone took the current pulse (so a change must set it).
    _pulse_taken: bool = False
    #: Set (and replaced) when the last live session ends.
    idle: trio.Event = attrs.Factory(trio.Event)
    #: Set when an ended session is kept (the sweeper waits for it with nothing kept).
    _kept: trio.Event = attrs.Factory(trio.Event)

    async def sweep(self) -> None:
        """Forget ended sessions as their ``result_ttl`` runs out, on a quiet server too:
        they went only at the next read or session end, so a server gone quiet held up to
        ``result_max`` results for ever (an outside soak test; ~1 GB of large ones)."""
        while True:
            oldest = next(iter(self.ended.values()), None)
            if oldest is None:
                await self._kept.wait()
                self._kept = trio.Event()
            else:
                # A second late at most: reads stay exact (``get`` evicts first), and a
                # busy server's sweeper wakes once a second, not at every session's end.
                await trio.sleep_until(oldest.ended_at + self.result_ttl + SWEEP_LATENESS)
                self._evict()

    def add(self, record: SessionRecord) -> None:
        self.live[record.id] = record
        self.changed(record)

    def changed(self, record: SessionRecord) -> None:
        """Record a change of state: a snapshot for event streams, and a pulse."""
        if record.watchers:
            record.transitions.append(record.to_json(self.gate))
        record.note_change()
        self.poke()

    @property
    def pulse(self) -> trio.Event:
        """An event set at the next change of any session (take it before looking)."""
        self._pulse_taken = True
        return self._pulse

    def poke(self) -> None:
        """Wake everything waiting on the pulse (a session took its queue place)."""
        if self._pulse_taken:  # nobody took it: no event to spend
            pulse, self._pulse, self._pulse_taken = self._pulse, trio.Event(), False
            pulse.set()

    def finish(self, record: SessionRecord) -> None:
        """Move an ended record from live to ended (or forget a refusal at once)."""
        self.live.pop(record.id, None)
        completed = record.state == COMPLETED
        if completed:
            # Encoded at once: the answer of a synchronous caller, and the result as the
            # handler returned it (module docstring).
            record.final_document(self.gate)
        if not record.refused_at_once and self.result_max > 0 and self.result_ttl > 0:
            assert record.ended_at is not None
            if completed:
                kept = EndedSession(record.id, record.state, record.ended_at, record.document)
            else:
                # The record is held until then: not its request body (up to --max-body),
                # which nothing reads once the session has ended (an outside review).
                record.body = {}
                encode = functools.partial(record.final_document, self.gate)
                kept = EndedSession(record.id, record.state, record.ended_at, encode=encode)
                call_when_idle(kept.settle)
            self.ended[record.id] = kept
            self._evict()
            self._kept.set()
        record.done.set()
        self.changed(record)
        if not self.live:
            idle, self.idle = self.idle, trio.Event()
            idle.set()

    def get(self, session_id: str) -> Session | None:
        record = self.live.get(session_id)
        if record is not None:
            return record
        self._evict()
        return self.ended.get(session_id)

    def list_live(self, state: str | None, limit: int) -> list[SessionRecord]:
        """Live sessions, oldest arrival first, optionally of one state."""
        records: Iterator[SessionRecord] = iter(self.live.values())
        if state is not None:
            records = (r for r in records if r.shown_state == state)
        # A settling session is not in the queue at this instant (see ``settling``).
        return sorted((r for r in records if not r.settling), key=lambda r: r.arrival.place)[:limit]

    def _evict(self) -> None:
        ended = self.ended
        while len(ended) > self.result_max:
            ended.popitem(last=False)
        horizon = trio.current_time() - self.result_ttl
        while ended:
            if next(iter(ended.values())).ended_at > horizon:
                break
            ended.popitem(last=False)
