"""The kernel's receive time of each request: when its head reached this host.

The web layer stamps a request's arrival (its FIFO place and the start of its queue
deadline) as its head reaches the app. Under a burst that is late: every step of every
request of the burst runs before the next step of any, so a request can wait ~90 ms
(overload bench, p50) between reaching the host and reaching the app, and that wait
counted towards no deadline. Linux stamps every packet it receives when some socket asks
(``SO_TIMESTAMPNS``); the connection's read loop (``_hypercorn_fix``) reads with
``recvmsg``, moves each read's stamp onto the Trio clock (:func:`received`) and leaves it
in a context variable (:data:`latest_read`) that the app's task for a request inherits;
:func:`request_received_at` gives it to the app.

Kept honest: a stamp is never later than now nor older than :data:`MAX_STAMP_AGE`; one
wall-clock offset per second converts every stamp (so stamps microseconds apart keep
their order); a pipelined request counts from when its connection was ready for it.
"""

from __future__ import annotations

import atexit
import socket
import struct
import time
from collections.abc import Mapping
from contextvars import ContextVar
from typing import Any, Protocol, cast

import attrs
import trio


class Recyclable(Protocol):
    """A connection's state as this module needs it (``_hypercorn_fix``)."""

    #: When the connection was last ready for a next request (Trio clock).
    recycled_at: float


#: The latest read of the connection the current task serves: when its bytes reached
#: this host (the kernel's receive stamp, on the Trio clock; None where the kernel gave
#: none) and the connection's state. Set by the read loop before Hypercorn parses the
#: bytes, so the app's task for a request they complete inherits it (a task starts with
#: a copy of its spawner's context).
latest_read: ContextVar[tuple[float | None, Recyclable] | None] = ContextVar(
    "sessiongate_latest_read", default=None
)


def request_received_at() -> float | None:
    """When the request the current task serves reached this host (Trio clock), from
    the kernel's receive stamp of the read that completed its head; None if unknown
    (TLS, no stamp, not served by Hypercorn's Trio worker).

    Never earlier than the moment the connection was ready for this request: a
    pipelined request, read while the one before it was still being answered, counts
    from when that answer was done."""
    latest = latest_read.get()
    if latest is None:
        return None
    stamp, state = latest
    return None if stamp is None else max(stamp, state.recycled_at)


#: The ASGI scope's key for when the request's body's end reached this host (set by
#: ``_hypercorn_fix`` as Hypercorn hands the body's end to the app).
COMPLETED_KEY = "sessiongate.completed_at"


def request_completed_at(scope: Mapping[str, Any]) -> float | None:
    """When the request had reached this host in whole, once the app has read its body:
    the kernel's stamp of the read that brought its body's end (the head's own for a
    request read in one piece); None if unknown. A client's slow upload is then not
    counted as time spent waiting for a slot (an outside review: a 3 s upload on an
    idle gate expired with --max-wait 2). Not later than now."""
    stamp = scope.get(COMPLETED_KEY)
    return min(stamp, trio.current_time()) if isinstance(stamp, float) else None


#: ``SO_TIMESTAMPNS`` (Linux): each read also returns when its last segment arrived.
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
_TIMESPEC = struct.Struct("@qq")
ANCILLARY = socket.CMSG_SPACE(_TIMESPEC.size)

#: A kernel stamp counts as at most this old. A request can really be this old (a
#: server stalled for seconds): its place among the others is kept and its deadline
#: counts from then. The bound is for a stamp made before a step of the wall clock and
#: read after it, which would otherwise look as old (or as new) as the step.
MAX_STAMP_AGE = 10.0

#: How often the wall clock's offset from the Trio clock is read again (NTP slews
#: them apart by at most ~0.5 ms a second).
OFFSET_REFRESH = 1.0


@attrs.define
class _ClockOffset:
    #: ``time.time() - trio.current_time()``, read at ``read_at`` (Trio clock).
    wall_minus_trio: float
    read_at: float


# Per run: each Trio run (each test) has its own clock.
_offset: trio.lowlevel.RunVar[_ClockOffset] = trio.lowlevel.RunVar("sessiongate_clock_offset")


def _wall_minus_trio(now: float) -> float:
    """The wall clock's offset from the Trio clock, read again once a second: every
    stamp of one second is converted with the same offset, so stamps microseconds apart
    keep their order (reading both clocks per stamp added their gap as noise)."""
    try:
        offset = _offset.get()
    except LookupError:
        offset = None
    if offset is None or now - offset.read_at >= OFFSET_REFRESH:
        offset = _ClockOffset(time.time() - trio.current_time(), now)
        _offset.set(offset)
    return offset.wall_minus_trio


def keep_the_kernel_stamping() -> None:
    """Hold one socket that asks for receive stamps for as long as the process lives.

    The kernel stamps arriving packets only while some socket asks for stamps, and
    turns stamping on a moment after the first one asks (deferred work): without this,
    the first requests to a quiet server, and a request that arrives before its
    connection is accepted (a burst of new connections), would carry no stamp."""
    try:
        keeper = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    except OSError:
        return
    try:
        keeper.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    except OSError:
        keeper.close()
        return
    atexit.register(keeper.close)


def received(ancillary: list[tuple[int, int, bytes]]) -> float | None:
    """A read's receive stamp on the Trio clock, from its ancillary data (None if it
    has none): the kernel stamps with the wall clock. Never later than now, never older
    than :data:`MAX_STAMP_AGE`."""
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
            sec, nsec = cast(tuple[int, int], _TIMESPEC.unpack_from(data))
            now = trio.current_time()
            stamp = sec + nsec * 1e-9 - _wall_minus_trio(now)
            return min(max(stamp, now - MAX_STAMP_AGE), now)
    return None
