"""Server-Sent Events of one session: its state now, then one event per change.

The event name is the state and the data is the session object. While queued, a new
``queued`` event is sent whenever the position changes (an ``eta_s`` change alone is
not an event). After the terminal event the stream ends. State changes come from the
record's ``transitions`` (so a stream that wakes late still sends each one, in order);
position changes are noticed on the registry's ``pulse``, which fires whenever any
session changes state (the only way a position moves on the in-memory backend) and,
with a shared backend, whenever a change of the global queue published by any process
has been taken in. A stream with nothing to send for :data:`HEARTBEAT` seconds sends a
comment line, so that proxies do not take it for an idle connection.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from typing import Any

import trio

from ._errors import dumps
from ._service import Service
from ._sessions import QUEUED, TERMINAL_STATES, EndedSession, Session, SessionRecord

#: Seconds of silence after which a stream sends a comment line (``: keep-alive``),
#: which clients ignore: a session can stay queued or active for minutes with nothing to
#: send, and proxies and load balancers close connections idle for 60 s or so (an
#: outside review).
HEARTBEAT = 15.0


def _event(snapshot: dict[str, Any]) -> bytes:
    return _encoded_event(str(snapshot["state"]), dumps(snapshot))


def _encoded_event(state: str, document: bytes) -> bytes:
    return b"event: " + state.encode() + b"\ndata: " + document + b"\n\n"


async def session_events(service: Service, record: Session) -> AsyncIterator[bytes]:
    if isinstance(record, EndedSession):  # its terminal event, and the stream ends
        yield _encoded_event(record.state, record.document)
        return
    record.watchers += 1
    try:
        async with aclosing(_events(service, record)) as events:
            async for event in events:
                yield event
    finally:
        record.watchers -= 1


async def _events(service: Service, record: SessionRecord) -> AsyncGenerator[bytes, None]:
    gate, registry = service.gate, service.registry
    await service.settled(record)  # a first event "queued" with no position is no use
    seen = len(record.transitions)
    snapshot = record.to_json(gate)
    yield _event(snapshot)
    if snapshot["state"] in TERMINAL_STATES:
        return
    last_state, last_position = snapshot["state"], snapshot["position"]
    while True:
        # Taken before looking, so no change is missed: any session's change while this
        # one queues (positions move), only its own once it is active.
        wakeup = registry.pulse if record.state == QUEUED else record.next_change()
        fresh = record.transitions[seen:]
        seen = len(record.transitions)
        if fresh:
            for snapshot in fresh:
                if snapshot["state"] == last_state != QUEUED:
                    continue  # already shown (a slot handed over shows as active at once)
                yield _event(snapshot)
                if snapshot["state"] in TERMINAL_STATES:
                    return
                last_state, last_position = snapshot["state"], snapshot["position"]
            continue
        if record.state == QUEUED:
            position = record.position()
            if position is not None and position != last_position:
                last_position = position
                yield _event(record.to_json(gate))
                continue
        with trio.move_on_after(HEARTBEAT):
            await wakeup.wait()
            continue
        yield b": keep-alive\n\n"  # a comment: no event, but the stream shows it lives
