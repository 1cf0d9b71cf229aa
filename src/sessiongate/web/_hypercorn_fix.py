"""Fixes to Hypercorn 0.18's Trio connection handler (``TCPServer``'s
``protocol_send``, ``_idle_timeout`` and ``_read_data``, and ``H11Protocol``'s
``_send_error_response``), and the kernel's receive time of each request.

**A race that crashed the server.** Hypercorn closes a connection (``TCPServer._close``:
``send_eof``, which checkpoints while it holds the stream's send side, then ``aclose``)
from whichever task learns that the connection is done, *outside* its ``send_lock``.
When the app's task closes it after an answer (``Connection: close``, a 413 with the
body still arriving) while the connection's reading task answers bytes that arrived
after the request (h11: "Got data when expecting EOF") with its own 400, the two sends
meet and trio raises ``BusyResourceError`` in ``protocol_send``. Hypercorn catches it in
``_close`` but not there: in the reading task it escaped to the server's nursery and
**stopped the whole process** (an outside review: an oversized body, two stray bytes and
``Connection: close``, with ``--max-body 4096``, crashed it within four requests); in an
app's task it logged a traceback per request. A send that meets the connection being
closed is now answered as a closed connection, as ``protocol_send`` already does for
``BrokenResourceError`` / ``ClosedResourceError``.

**Scheduling passes and tasks on every request's path.** ``trio.Lock`` yields to the
scheduler after acquiring even when nobody holds it (Trio's rule: every ``await`` of a
Trio primitive is a schedule point). Hypercorn takes a lock for every write
(``send_lock``: the head and the body of an answer are two writes) and for every
keep-alive timer change, and it runs the keep-alive timer as a new task for every idle
spell (``TrioSingleTask``: cancelled when a request's head arrives, started again with
``nursery.start`` after each answer). Under a burst each schedule point costs a whole
pass over every runnable task (~20 ms with a few hundred clients), so a request's head
reached the app a pass later than needed and an answer's body left two passes after its
head; and each request paid for a task spawn and two task steps of its timer. Here a
free lock is taken without that extra yield (after the same cancellation check; a lock
that is held is still waited for, so the tasks that write one connection stay
serialised), and each connection has one keep-alive task for its whole life, which
reads the idle state the ``Updated`` events leave and sleeps until the connection could
have been idle long enough; it ends when the connection's read loop does
(``_read_data``), so a connection its client closed is closed at once. Together with
running Quart-Trio's request in the ASGI task (``_app.py``), 13 % fewer instructions per
request (callgrind: 3.45 M before, 2.99 M).

**A client that stops reading held the process for ever.** Hypercorn shields every
write from cancellation (a response must not be cut off half-way by its request's own
cancellation), so a write to a client that reads nothing (a paused tab, a stalled
event-stream subscriber) waited for as long as the client kept the connection open:
its connection and task for ever, and on SIGTERM the process never exited, whatever the
grace (outside review). A write is still shielded, but bounded by progress: it is made
in slices of :data:`SEND_SLICE` bytes, and a slice the client takes nothing of for
:data:`SEND_STALL_LIMIT` seconds (or for Hypercorn's graceful timeout, once the server is
shutting down) abandons the write and closes the connection; a slow reader that keeps
reading gets every byte. :func:`cut_stalled_sends` abandons every write still waiting
when ``sessiongate serve``'s grace is over.

**An idle keep-alive connection held the exit for the whole graceful timeout.** After
an answer Hypercorn restarted the connection's keep-alive timer (which also closes an
idle connection when the server shuts down) from the app's task, as its last send
finished; by then Quart-Trio's message task has often heard the stream close and
cancelled that task, so the restart met the cancellation and never happened: the
connection stayed open, with no timer, until Hypercorn's graceful timeout
(``--shutdown-grace``) ran out (outside review: 30 s to exit with one idle client). The
``Updated`` events are now only noted, whatever the calling task's state.

**Answers without a schedule point per write.** Trio's ``send_all`` yields a whole
scheduler pass after every write, even one that never waited; an answer is three writes
(head, body, an empty end), so under a wave of answers each left one pass after the
other. A write now goes straight to the socket when its buffer has room
(:func:`_write_at_once`); only the rest, if any, waits as above.

**The arrival stamp.** The read loop reads with ``recvmsg`` and asks the kernel for
each read's receive time (``SO_TIMESTAMPNS``); the app stamps a request's arrival with
the time the read that completed its head reached the host
(:func:`request_received_at`), so time a request spends unread behind a burst counts
towards its queue deadline (docs/architecture.md).

**Unparsable requests get a JSON error.** Hypercorn answered a request h11 cannot parse
(a malformed request line or header, an oversized head, an unknown transfer coding)
with an empty body; now it is ``{"error": "invalid_request", "detail": ...}`` with h11's
status (400, 431, 501), like every other error.

Applied once, by :func:`sessiongate.web.create_app`, so it covers ``sessiongate serve``
and plain ``hypercorn`` alike. The test suite reproduces the crash, the stalled and the
slow reader, the idle connection at shutdown and the closed connections;
``benchmarks/bench_instructions.py`` measures the work saved. Drop the parts Hypercorn
fixes upstream (it catching ``BusyResourceError`` in ``protocol_send``, writes bounded,
its keep-alive timer restarted whatever the calling task's state).
"""

from __future__ import annotations

import atexit
import functools
import json
import math
import os
import socket
import struct
import time
import weakref
from contextvars import ContextVar
from typing import cast

import attrs
import h11
import trio
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio.tcp_server import MAX_RECV, TCPServer


async def _acquire(lock: trio.Lock) -> None:
    """``lock.acquire()`` without the schedule point after taking a free lock."""
    await trio.lowlevel.checkpoint_if_cancelled()
    if lock.locked():
        await lock.acquire()
    else:
        lock.acquire_nowait()


#: Seconds a client may take nothing of one write before its connection is closed (a
#: write timeout; nginx's ``send_timeout`` is the same idea).
SEND_STALL_LIMIT = 10.0

#: The shielded scopes of the writes in progress, for :func:`cut_stalled_sends`.
_sends: set[trio.CancelScope] = set()


def cut_stalled_sends() -> None:
    """Abandon every write still waiting for its client (the grace is over)."""
    for scope in list(_sends):
        scope.cancel()


#: A write is made in slices of this size, each with its own SEND_STALL_LIMIT: a slow
#: reader that keeps taking bytes gets the whole answer, one that takes nothing does not.
SEND_SLICE = 64 * 1024


def _write_at_once(stream: object, view: memoryview) -> int:
    """Write what the socket's buffer takes now, without a schedule point; how many
    bytes that was (0 for TLS, or a full buffer: the caller waits and writes the rest).

    Trio's ``send_all`` yields to the scheduler after every successful write, even one
    that never waited: an answer is three writes (head, body, and an empty end), so
    under a wave of answers each one left a whole scheduler pass after the previous
    (the expiry wave bench: ~15 ms a pass with 250 answers due at once)."""
    if not isinstance(stream, trio.SocketStream) or stream.socket.did_shutdown_SHUT_WR:
        return 0  # TLS, or closing: the caller's send_all reports it as Trio does
    fd = stream.socket.fileno()
    if fd == -1 or not view:
        return 0
    try:
        return os.write(fd, view)  # Trio's sockets are non-blocking
    except BlockingIOError:
        return 0
    except OSError as error:
        raise trio.BrokenResourceError from error


async def _send_in_slices(self: TCPServer, data: bytes) -> bool:
    """Write ``data``, shielded; True if the client stalled and was cut off."""
    view = memoryview(data)
    if not view and isinstance(self.stream, trio.SocketStream):
        # Nothing to write (h11's end of a sized body): only whether it is still open.
        if self.stream.socket.fileno() == -1 or self.stream.socket.did_shutdown_SHUT_WR:
            raise trio.ClosedResourceError
        return False
    written = _write_at_once(self.stream, view)
    if written and written == len(view):
        return False
    view = view[written:]
    for start in range(0, max(len(view), 1), SEND_SLICE):
        limit = SEND_STALL_LIMIT
        if self.context.terminated.is_set():
            limit = min(limit, self.config.graceful_timeout)
        scope = trio.CancelScope(shield=True, deadline=trio.current_time() + limit)
        _sends.add(scope)
        try:
            with scope:
                await self.stream.send_all(view[start : start + SEND_SLICE])
        finally:
            _sends.discard(scope)
        if scope.cancelled_caught:  # the client took nothing for too long: no more
            with trio.CancelScope(shield=True):
                await self._close()
            return True
    return False


def _stop_idle_timer(self: TCPServer) -> None:
    """End the connection's keep-alive task: the connection is closing or closed, and
    its task group (which the socket's close waits for) must not wait for the task."""
    handle = self.idle_task._handle
    if handle is not None:
        handle.cancel()


#: The latest read of the connection the current task serves: when its bytes reached
#: this host (the kernel's receive stamp, on the Trio clock; None where the kernel gave
#: none) and the connection's state. Set by the read loop before Hypercorn parses the
#: bytes, so the app's task for a request they complete inherits it (a task starts with
#: a copy of its spawner's context).
_latest_read: ContextVar[tuple[float | None, _ConnectionState] | None] = ContextVar(
    "sessiongate_latest_read", default=None
)


def request_received_at() -> float | None:
    """When the request the current task serves reached this host (Trio clock), from
    the kernel's receive stamp of the read that completed its head; None if unknown
    (TLS, no stamp, not served by Hypercorn's Trio worker).

    Never earlier than the moment the connection was ready for this request: a
    pipelined request, read while the one before it was still being answered, counts
    from when that answer was done."""
    latest = _latest_read.get()
    if latest is None:
        return None
    stamp, state = latest
    return None if stamp is None else max(stamp, state.recycled_at)


#: ``SO_TIMESTAMPNS`` (Linux): each read also returns when its last segment arrived.
_SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
_TIMESPEC = struct.Struct("@qq")
_ANCILLARY = socket.CMSG_SPACE(_TIMESPEC.size)

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


def _keep_the_kernel_stamping() -> None:
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
        keeper.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
    except OSError:
        keeper.close()
        return
    atexit.register(keeper.close)


def _stamped_socket(self: TCPServer) -> trio.socket.SocketType | None:
    """The connection's socket with receive stamps switched on; None for TLS, or where
    the kernel refuses."""
    stream = self.stream
    if not isinstance(stream, trio.SocketStream):
        return None
    sock = stream.socket
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
    except OSError:
        return None
    return sock


def _received(ancillary: list[tuple[int, int, bytes]]) -> float | None:
    """A read's receive stamp on the Trio clock, from its ancillary data (None if it
    has none): the kernel stamps with the wall clock. Never later than now, never older
    than :data:`MAX_STAMP_AGE`."""
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS:
            sec, nsec = cast(tuple[int, int], _TIMESPEC.unpack_from(data))
            now = trio.current_time()
            stamp = sec + nsec * 1e-9 - _wall_minus_trio(now)
            return min(max(stamp, now - MAX_STAMP_AGE), now)
    return None


async def _read_stamped(self: TCPServer, sock: trio.socket.SocketType) -> None:
    """Hypercorn's read loop (``stream.receive_some``), reading with ``recvmsg`` to
    learn each read's receive stamp."""
    read_timeout = self.config.read_timeout or math.inf
    state = _connection_state(self)
    while True:
        try:
            with trio.fail_after(read_timeout):
                data, ancillary, _, _ = await sock.recvmsg(MAX_RECV, _ANCILLARY)
        except (OSError, trio.ClosedResourceError, trio.TooSlowError):
            break  # as Hypercorn's: gone (BrokenResourceError there), closed, timed out
        _latest_read.set((_received(ancillary), state))
        await self.protocol.handle(RawData(data))
        if not data:
            break
    await self.protocol.handle(Closed())


async def _read_data(self: TCPServer) -> None:
    """Hypercorn's read loop; when it ends (the client closed, or the connection is
    being closed) the keep-alive task ends too, so the socket is closed at once instead
    of when the task next wakes, or never while the connection was busy (an outside
    review: thousands of CLOSE-WAIT sockets and "Too many open files")."""
    try:
        sock = _stamped_socket(self)
        if sock is None:
            await _original_read_data(self)
        else:
            await _read_stamped(self, sock)
    finally:
        _stop_idle_timer(self)


_original_read_data = TCPServer._read_data


async def protocol_send(self: TCPServer, event: Event) -> None:
    """Hypercorn's ``TCPServer.protocol_send`` with the fixes (module docstring)."""
    if isinstance(event, RawData):
        await _acquire(self.send_lock)
        try:
            closed = await _send_in_slices(self, event.data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
            # Gone, or being closed by the other task: the send is moot.
            closed = True
        finally:
            self.send_lock.release()
        if closed:
            await self.protocol.handle(Closed())
    elif isinstance(event, Closed):
        _stop_idle_timer(self)
        await self._close()
        await self.protocol.handle(Closed())
    elif isinstance(event, Updated):
        # Only noted: the connection's one keep-alive task (below) reads it when it
        # wakes. Bookkeeping that must happen even in a cancelled task (the answer's
        # last send gets here after Quart-Trio cancelled the finished request).
        state = _connection_state(self)
        if event.idle:
            state.since = state.recycled_at = trio.current_time()
        else:
            state.since = None


@attrs.define
class _ConnectionState:
    #: Since when the connection has been idle (Trio clock); None while busy.
    since: float | None
    #: When the connection was last ready for a next request (an answer done).
    recycled_at: float = -math.inf


_states: weakref.WeakKeyDictionary[TCPServer, _ConnectionState] = weakref.WeakKeyDictionary()


def _connection_state(server: TCPServer) -> _ConnectionState:
    state = _states.get(server)
    if state is None:  # a new connection is idle from its start
        state = _states[server] = _ConnectionState(trio.current_time())
    return state


async def _idle_timeout(self: TCPServer) -> None:
    """Hypercorn's keep-alive task, one per connection for its whole life.

    It closes the connection once it has been idle for ``keep_alive_timeout``, or at
    once when the server shuts down while it is idle (a busy one is closed by Hypercorn
    after its answer). Hypercorn started a new task for every idle spell and cancelled
    it at the next request (a spawn and two task steps per request); this one sleeps
    until the earliest moment the connection could have been idle long enough, and
    looks again.
    """
    keep_alive = self.config.keep_alive_timeout
    state = _connection_state(self)
    terminated = self.context.terminated
    while True:
        since = state.since
        wake_at = (trio.current_time() if since is None else since) + keep_alive
        with trio.move_on_at(wake_at):
            await terminated.wait()
        since = state.since
        if since is None:  # busy
            if terminated.is_set():
                return
            continue
        if terminated.is_set() or trio.current_time() >= since + keep_alive:
            with trio.CancelScope(shield=True):
                await self._initiate_server_close()
            return


#: Hypercorn's own answers to requests h11 cannot parse, by the status h11 suggests.
_PROTOCOL_ERRORS = {
    400: "malformed HTTP request",
    431: "request head too large",
    501: "unsupported transfer coding",
}


async def _send_error_response(self: H11Protocol, status_code: int) -> None:
    """Hypercorn's answer to a request h11 cannot parse (a malformed request line or
    header, a head over h11's limit), with a JSON body like every other error (SPEC:
    no error without one); Hypercorn sent an empty body."""
    detail = _PROTOCOL_ERRORS.get(status_code, "malformed HTTP request")
    body = json.dumps({"error": "invalid_request", "detail": detail}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"connection", b"close"),
        *self.config.response_headers("h11"),
    ]
    await self._send_h11_event(h11.Response(status_code=status_code, headers=headers))
    await self._send_h11_event(h11.Data(data=body))
    await self._send_h11_event(h11.EndOfMessage())


@functools.cache  # once per process, however many apps are made
def apply() -> None:
    """Replace ``TCPServer.protocol_send``, ``_idle_timeout`` and ``_read_data``, and
    ``H11Protocol._send_error_response``."""
    _keep_the_kernel_stamping()
    TCPServer.protocol_send = protocol_send  # type: ignore[method-assign]
    TCPServer._idle_timeout = _idle_timeout  # type: ignore[method-assign]
    TCPServer._read_data = _read_data  # type: ignore[method-assign]
    H11Protocol._send_error_response = _send_error_response  # type: ignore[method-assign]
