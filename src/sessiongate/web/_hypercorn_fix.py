"""Fixes to Hypercorn 0.18's Trio connection handler (``TCPServer``'s ``run``,
``protocol_send``, ``_idle_timeout`` and ``_read_data``, ``H11Protocol``'s
``stream_send``, ``_send_error_response`` and ``can_read``, ``H2Protocol``'s streams
and request count, its WebSocket handshake check and refusals, and h11's reader of a
request's head), and the kernel's receive time of each request.

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
waits in a cancel scope whose deadline the ``Updated`` events move (to when the
connection will have been idle long enough, to none while it is busy), so a connection
busy with request after request never wakes it; it ends when the connection's read loop does
(``_read_data``), so a connection its client closed is closed at once. Together with
running Quart-Trio's request in the ASGI task (``_app.py``), 13 % fewer instructions per
request (callgrind: 3.45 M before, 2.99 M). Trio's socket read and its channels yield a
pass too: after a read, also one that had just waited for its bytes (``_receive`` takes
no second pass then), and on every put or take of the app's messages (a
request's body, a disconnect: ``_spawn_app`` passes them at once while the channel has
room, or a message). A zero-length session took ~16 task steps, now ~10, and 5.4 % fewer
instructions (callgrind: 2.68 M, 2.53 M).

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
other. A write now goes to the socket as the pass it was made in ends, with the other
writes of that pass (``_pass_writes``: one wake-up of a sleeping client is dearer than
the bytes); only the rest, if the socket's buffer was full, waits as above.

**An answer in one write.** Hypercorn writes an answer's head as soon as the app starts
it, then its body, then its end: two writes for every JSON answer. A write that wakes
the client costs the server far more than the bytes (on the 2-core VM here ~45 us
against ~12 us for one that finds the client awake; the expiry wave bench's clients
are asleep between answers), so a wave of expiry answers paid it twice each. The
head of an answer with a ``Content-Length`` is now held until its body is whole (the
app sends them back to back) and written with it and its end (``stream_send``); a
body that comes in parts is written as it comes, the held head with its first part.
What is left of the request once its answer is out and logged (the connection's
recycling, the app's teardown: about a quarter of an expiry answer's step) runs once
the other answers due in the same pass are out: the last write waited for the pass to
end (``_pass_writes``). A sized answer that h11 is sure to write as it is (a keep-alive
HTTP/1.1 exchange, valid fields, one ``Content-Length``: ``_head_as_h11_writes``, whose
heads a property test compares with h11's) is made without h11, and h11 is never told
of it: once it is written the exchange is over, and a new h11 connection, given the
bytes read behind the request, takes the connection's next one (what h11's
``start_next_cycle`` makes of the old one). h11's checks and state changes were a third
of an expiry answer's step before its write, and under a wave every answer of the pass
waits for all of them to be made (expiry wave bench: 89 us a step before the write, 58
after); with its recycling, ~13 % of a zero-length request's instructions (callgrind:
1.829 M before, 1.638 M).

**One connection's fault stopped the server.** An exception while Hypercorn handles
what a client sent escaped the connection's task to the server's nursery and stopped
the whole process: an HTTP/2 request (prior knowledge) whose body was still arriving
when the app answered it early (a 413, a 404) did it every time, since Hypercorn looked
up the closed stream for the next DATA frame (an outside review). Such a DATA frame is
now ignored, as Hypercorn already ignores a closed stream's end; and a fault in any
task of a connection (its read loop, or Hypercorn's HTTP/2 send task, where a second
review's HTTP/2 fuzzing found one) is logged and closes that connection only, its app
tasks cancelled as for a client that went away. The first few faults are logged with
their traceback, later ones in one line: any client can cause one.

**A client gone behind a pipelined request was never noticed.** Anything a client sends
after a request (a pipelined request, a stray CRLF) before its answer pauses h11, and
Hypercorn stopped reading until the answer was out: a synchronous caller that went away
meanwhile kept its session's slot or queue place until the session ended (an outside
review). The connection now reads on while h11 is paused, keeping what it reads for
h11 (up to ``h11_max_incomplete_size``), so the end of the connection is seen at once;
past that size it reads no more but looks for the client's hang-up (``POLLRDHUP``, which
the kernel reports whatever is left unread) every :data:`HANGUP_CHECK` seconds.

**A dropped HTTP/2 connection's streams are closed newest first**, so its queued
sessions leave the queue before its active ones free their slots (oldest first, each
freed slot went to a queued session of the same connection, admitted and cancelled at
once: an outside review counted 20 admissions for 2 slots).

**Empty lines before a request** are ignored (up to :data:`EMPTY_LINES_IGNORED`), as
RFC 9112 says a server should: h11 answered a CRLF sent after a POST's body with a 400
and closed the connection (an outside review).

**WebSocket handshakes.** The service has none; the app refuses every handshake with a
JSON error, the admin token checked first on ``/admin`` paths. Hypercorn refused a
malformed handshake itself before the app saw it (400, empty body, no token check):
every handshake now reaches the app, and Hypercorn's own WebSocket refusals have a JSON
body.

**The arrival stamp.** The read loop reads with ``recvmsg`` and asks the kernel for
each read's receive time (``SO_TIMESTAMPNS``), for the app's arrival stamps
(``_receive_stamps``).

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

import functools
import itertools
import logging
import math
import re
import select
import socket
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import h11
import trio
from h11._readers import READERS, maybe_read_from_IDLE_client
from h11._receivebuffer import ReceiveBuffer
from hypercorn.config import Config
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.protocol.events import Body, EndBody, Response, StreamClosed
from hypercorn.protocol.events import Event as StreamEvent
from hypercorn.protocol.h2 import H2Protocol
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.protocol.http_stream import ASGIHTTPState, HTTPStream
from hypercorn.protocol.ws_stream import Handshake, WSStream
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.task_group import TaskGroup
from hypercorn.trio.task_group import _handle as _handle_app
from hypercorn.trio.tcp_server import MAX_RECV, TCPServer
from hypercorn.typing import AppWrapper, ASGIReceiveEvent, ASGISendEvent, ResponseSummary, Scope
from hypercorn.typing import Event as HypercornEvent
from hypercorn.utils import LifespanFailureError

from . import _receive_stamps
from ._errors import dumps, json_head
from ._pass_writes import write_at_pass_end, write_now

log = logging.getLogger("sessiongate.web")


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


async def _send_in_slices(self: TCPServer, data: bytes) -> bool:
    """Write ``data``, shielded; True if the client stalled and was cut off."""
    view = memoryview(data)
    state = _connection_state(self)
    if not view and isinstance(self.stream, trio.SocketStream):
        # Nothing to write (h11's end of a sized body): only whether it is still open.
        if self.stream.socket.fileno() == -1 or self.stream.socket.did_shutdown_SHUT_WR:
            raise trio.ClosedResourceError
        # The answer's end all the same (its last part may have been written long
        # before): a request pipelined behind it counts from here (an outside review).
        state.wrote_at = trio.current_time()
        return False
    if isinstance(getattr(self.protocol, "protocol", None), H11Protocol):
        written, state.wrote_at = await write_at_pass_end(self.stream, view)
    else:
        # HTTP/2 writes at once, as before: its connection's one sending task writes every
        # stream's frames in turn, and a yield per write let a stream's close (the last
        # one, at a drain) send GOAWAY ahead of other streams' ends, which strict clients
        # then lost (a regression review: 3 of 4 answers in 3 runs of 27).
        written = write_now(self.stream, view)
        state.wrote_at = trio.current_time()
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
    state.wrote_at = trio.current_time()
    return False


def _stop_idle_timer(self: TCPServer) -> None:
    """End the connection's keep-alive task: the connection is closing or closed, and
    its task group (which the socket's close waits for) must not wait for the task."""
    handle = self.idle_task._handle
    if handle is not None:
        handle.cancel()


def _stamped_socket(self: TCPServer) -> trio.socket.SocketType | None:
    """The connection's socket with receive stamps switched on; None for TLS, or where
    the kernel refuses."""
    stream = self.stream
    if not isinstance(stream, trio.SocketStream):
        return None
    sock = stream.socket
    try:
        sock.setsockopt(socket.SOL_SOCKET, _receive_stamps.SO_TIMESTAMPNS, 1)
    except OSError:
        return None
    return sock


#: How often a connection whose pipelined bytes filled h11's buffer is checked for its
#: client having gone (seconds).
HANGUP_CHECK = 0.1

_HANGUP = getattr(select, "POLLRDHUP", 0x2000) | select.POLLHUP | select.POLLERR


def _hung_up(sock: trio.socket.SocketType) -> bool:
    """Whether the client closed or reset the connection, whatever it left unread (or
    the server closed it meanwhile: a drain closes a connection as its exchange ends)."""
    fileno = sock.fileno()
    if fileno == -1:
        return True
    poller = select.poll()
    poller.register(fileno, _HANGUP)
    return bool(poller.poll(0))


class _ClientGone(Exception):
    """The client closed or reset its connection while h11 held a pipelined request."""


class _ReadWhilePaused:
    """An HTTP/1 connection's ``can_read`` (Hypercorn's event that h11's pause waits on),
    reading on while it waits.

    When a client sends anything after a request (a pipelined request, or one stray
    CRLF) before that request is answered, h11 pauses, and Hypercorn's read loop waits
    on ``can_read`` until the answer is out: it stopped reading, so a client that went
    away meanwhile was never noticed, and a synchronous session kept its slot or queue
    place for a client long gone (an outside review: a session ran its whole length for
    a client that had reset its connection). Here the wait goes on reading: the bytes
    go to h11's buffer (stamped, as the read loop stamps), up to Hypercorn's
    ``h11_max_incomplete_size`` (then it reads no more, as Hypercorn did, and only looks
    for the client hanging up); the end of the connection raises :class:`_ClientGone`
    to the read loop, which closes the connection's stream as for any client that went
    away. Only while the answer is still to come: once it is out there is nothing left
    to cancel, and the wait is Hypercorn's.
    """

    def __init__(
        self, event: Any, protocol: H11Protocol, sock: trio.socket.SocketType, server: TCPServer
    ) -> None:
        self._event = event
        self._protocol = protocol
        self._sock = sock
        self._server = server
        self._reading: trio.CancelScope | None = None

    async def clear(self) -> None:
        await self._event.clear()

    async def set(self) -> None:
        await self._event.set()
        if self._reading is not None:
            self._reading.cancel()  # the answer is out: h11 takes up what was read

    def is_set(self) -> bool:
        return bool(self._event.is_set())

    async def wait(self) -> None:
        connection = self._protocol.connection
        if (
            self._event.is_set()
            or not isinstance(connection, h11.Connection)
            # The answer is out: the connection is recycled within a scheduler pass (a
            # closed-loop client's next request often comes first), and there is no
            # session left to cancel. Reading on here cost 6 % of a request.
            or _answer_is_out(self._protocol)
        ):
            await self._event.wait()
            return
        try:
            with trio.CancelScope() as self._reading:
                await self._read_until_set()
        finally:
            self._reading = None

    async def _read_until_set(self) -> None:
        limit = self._server.config.h11_max_incomplete_size
        state = _connection_state(self._server)
        protocol = self._protocol
        # The protocol's h11 connection as it is at each step, not as it was when the
        # wait began: an answer h11 was not told of gives the next exchange a new one
        # (``_recycle``), and a read that had taken its bytes from the kernel
        # by then still ends (Trio yields after a read, and this scope's cancellation
        # does not undo it). Fed to the old connection, those bytes were lost (an
        # outside review: pipelined requests went unanswered, 3 rounds of 5).
        while len(protocol.connection.trailing_data[0]) < limit:
            try:
                data, ancillary, _, _ = await self._sock.recvmsg(
                    MAX_RECV, _receive_stamps.ANCILLARY
                )
            except (OSError, trio.ClosedResourceError):
                raise _ClientGone from None
            if not data:
                raise _ClientGone
            _receive_stamps.latest_read.set((_receive_stamps.received(ancillary), state))
            protocol.connection.receive_data(data)
        # As much as h11 may hold: read no more (back-pressure, as Hypercorn does), but
        # still notice the client going away, which the kernel reports with the
        # unread bytes still queued (POLLRDHUP); Trio has no wait for that, so it is
        # looked at every HANGUP_CHECK seconds, in this rare state only.
        while True:
            with trio.move_on_after(HANGUP_CHECK):
                await self._event.wait()
                return
            if _hung_up(self._sock):
                raise _ClientGone


async def _receive(
    sock: trio.socket.SocketType, ancillary_size: int
) -> tuple[bytes, list[tuple[int, int, bytes]]]:
    """``sock.recvmsg``, without the second scheduler pass Trio's takes when it had to
    wait: Trio's yields after every read that found bytes, also right after waiting for
    them (a pass of every runnable task's step before a request is parsed). A read that
    finds bytes waiting at once yields as Trio's does: a client that keeps the buffer
    full (an HTTP/2 PING flood; HTTP/2 has no per-request pause) cannot hold the loop
    (an outside review: a flood froze the server, SIGTERM included, for as long as it
    lasted)."""
    raw = getattr(sock, "_sock", None)  # Trio's socket wraps the standard library's
    if not isinstance(raw, socket.socket):
        data, ancillary, _, _ = await sock.recvmsg(MAX_RECV, ancillary_size)
        return data, ancillary
    await trio.lowlevel.checkpoint_if_cancelled()
    try:
        data, ancillary, _, _ = raw.recvmsg(MAX_RECV, ancillary_size)
    except BlockingIOError:
        pass
    else:
        await trio.lowlevel.cancel_shielded_checkpoint()  # bytes were waiting: a pass
        return data, ancillary
    while True:
        await trio.lowlevel.wait_readable(raw)  # the pass this read takes
        try:
            data, ancillary, _, _ = raw.recvmsg(MAX_RECV, ancillary_size)
        except BlockingIOError:
            continue
        return data, ancillary


async def _read_stamped(self: TCPServer, sock: trio.socket.SocketType) -> None:
    """Hypercorn's read loop (``stream.receive_some``), reading with ``recvmsg`` to
    learn each read's receive stamp, and reading on while h11 is paused
    (:class:`_ReadWhilePaused`)."""
    read_timeout = self.config.read_timeout
    ancillary_size = _receive_stamps.ANCILLARY
    state = _connection_state(self)
    protocol = self.protocol.protocol
    if isinstance(protocol, H11Protocol):
        protocol.can_read = _ReadWhilePaused(protocol.can_read, protocol, sock, self)
    while True:
        try:
            if read_timeout:
                with trio.fail_after(read_timeout):
                    data, ancillary = await _receive(sock, ancillary_size)
            else:  # Hypercorn's default: no read timeout, so no cancel scope per read
                data, ancillary = await _receive(sock, ancillary_size)
        except (OSError, trio.ClosedResourceError, trio.TooSlowError):
            break  # as Hypercorn's: gone (BrokenResourceError there), closed, timed out
        _receive_stamps.latest_read.set((_receive_stamps.received(ancillary), state))
        try:
            await self.protocol.handle(RawData(data))
        except _ClientGone:
            break
        if not data:
            break
    await self.protocol.handle(Closed())


async def _read_data(self: TCPServer) -> None:
    """Hypercorn's read loop; when it ends (the client closed, or the connection is
    being closed) the keep-alive task ends too, so the socket is closed at once instead
    of when the task next wakes, or never while the connection was busy (an outside
    review: thousands of CLOSE-WAIT sockets and "Too many open files"). An error in it
    ends the connection only (:func:`_run`)."""
    try:
        sock = _stamped_socket(self)
        if sock is None:
            await _original_read_data(self)
        else:
            await _read_stamped(self, sock)
    finally:
        _stop_idle_timer(self)


async def _run(self: TCPServer) -> None:
    """Hypercorn's connection handler, whose faults end that connection only: an error
    in any of its tasks (the read loop, the HTTP/2 send task) escaped to the server's
    nursery and stopped the process (outside reviews: one HTTP/2 request answered early;
    then, fuzzing, a KeyError in Hypercorn's HTTP/2 ``send_task``). The connection is
    closed (Hypercorn closes it on the way out) and its app tasks are cancelled with it:
    their sessions end as for any client that went away."""
    try:
        await _original_run(self)
    except* Exception as group:  # Trio's Cancelled (a BaseException) goes on up
        _log_fault(self, group.exceptions[0])


_original_run = TCPServer.run

#: Faults logged with their traceback; after that, one line each (any client can cause
#: one, and the log must not be theirs to fill).
FAULT_TRACEBACKS = 5
_faults_logged = itertools.count()


def _log_fault(self: TCPServer, error: BaseException) -> None:
    if next(_faults_logged) < FAULT_TRACEBACKS:
        log.error(
            "connection from %s: error in the HTTP protocol; closing it",
            _peer(self),
            exc_info=error,
        )
    else:
        log.error(
            "connection from %s: error in the HTTP protocol (%r); closing it",
            _peer(self),
            error,
        )


def _peer(self: TCPServer) -> str:
    client = getattr(getattr(self, "protocol", None), "client", None)
    return f"{client[0]}:{client[1]}" if client and len(client) == 2 else repr(client)


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
        # Only noted, and the keep-alive task's timer moved (below): bookkeeping that
        # must happen even in a cancelled task (the answer's last send gets here after
        # Quart-Trio cancelled the finished request).
        state = _connection_state(self)
        if event.idle:
            state.since = trio.current_time()
            # Ready for the next request since its answer's last write, not since this
            # bookkeeping, which runs a scheduler pass after that write at the soonest
            # (``_pass_writes``), 10-25 ms later in an overload's wave: a request the
            # client sent on its answer counted its queue deadline from here, and its
            # expiry came that much late to it.
            state.recycled_at = max(state.recycled_at, min(state.wrote_at, state.since))
            if state.timer is not None:
                state.timer.deadline = state.since + self.config.keep_alive_timeout
        else:
            state.since = None
            if state.timer is not None:
                state.timer.deadline = math.inf


@attrs.define
class _ConnectionState:
    #: Since when the connection has been idle (Trio clock); None while busy.
    since: float | None
    #: When the connection was last ready for a next request (an answer done).
    recycled_at: float = -math.inf
    #: When the connection's latest write was made (Trio clock).
    wrote_at: float = -math.inf
    #: The keep-alive task's wait: its deadline is when the connection will have been
    #: idle for the keep-alive timeout (none while it is busy).
    timer: trio.CancelScope | None = None


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
    it at the next request (a spawn and two task steps per request). This one waits in
    a cancel scope whose deadline the connection's changes move (``protocol_send``):
    to when it will have been idle long enough as it goes idle, to none as it gets busy.
    A connection that serves request after request never wakes it. (It woke every
    keep-alive timeout to look while the connection was busy: under an overload,
    connections opened together woke together, a few hundred task steps at once every
    5 s; then at each answer, as the connection went idle: a task step per request.)
    """
    keep_alive = self.config.keep_alive_timeout
    state = _connection_state(self)
    terminated = self.context.terminated
    while True:
        since = state.since
        with trio.CancelScope(
            deadline=math.inf if since is None else since + keep_alive
        ) as state.timer:
            await terminated.wait()
        state.timer = None
        since = state.since
        if since is None:  # busy
            if terminated.is_set():
                return  # Hypercorn closes the connection after its answer
            continue
        if terminated.is_set() or trio.current_time() >= since + keep_alive:
            with trio.CancelScope(shield=True):
                await self._initiate_server_close()
            return


@attrs.define
class _HeldAnswer:
    #: The answer's bytes so far (its head, then its body once whole).
    data: bytes
    #: Body bytes still to come, by its ``Content-Length``.
    body_left: int
    #: The answer's status, header fields and body (once whole) as h11 has not been told
    #: of them yet: ``data`` was made without h11, as it writes them
    #: (:func:`_head_as_h11_writes`); None once h11 has made ``data`` itself.
    untold: tuple[int, list[tuple[bytes, bytes]], bytes] | None = None


#: Each HTTP/1 connection's answer held back to be written in one piece (see above).
_held: weakref.WeakKeyDictionary[H11Protocol, _HeldAnswer] = weakref.WeakKeyDictionary()


def _content_length(headers: list[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name.lower() == b"content-length":
            return int(value) if value.isdigit() else None
    return None


#: Hypercorn's own response headers (``Date``, ``Server``), with the second and the
#: configuration they were made for: the date is formatted once a second, not for every
#: answer (``wsgiref``'s ``format_date_time``, ~3 % of an expiry answer's step).
_server_headers: tuple[int, Config | None, list[tuple[bytes, bytes]]] = (0, None, [])


def _response_headers(config: Config) -> list[tuple[bytes, bytes]]:
    """``config.response_headers("h11")``, made at most once a second (do not change
    the list)."""
    global _server_headers
    second = int(time.time())
    made_at, made_for, headers = _server_headers
    if made_at != second or made_for is not config:
        headers = config.response_headers("h11")
        _server_headers = (second, config, headers)
    return headers


def _serialise(self: H11Protocol, event: h11.Response | h11.Data | h11.EndOfMessage) -> bytes:
    """h11's bytes for ``event``, as Hypercorn's ``_send_h11_event`` gets them (nothing
    when the client's side has already failed)."""
    try:
        return self.connection.send(event) or b""
    except h11.LocalProtocolError:
        if self.connection.their_state != h11.ERROR:
            raise
        return b""


#: A header field name as h11 takes it (RFC 9110's token), and a field value as h11
#: takes it, narrowed to visible ASCII (h11 also takes bytes 0x80-0xff): a field that
#: matches both is one h11 writes unchanged.
_FIELD_NAME = re.compile(rb"[-!#$%&'*+.^_`|~0-9a-zA-Z]+")
_FIELD_VALUE = re.compile(rb"(?:[\x21-\x7e]+(?:[ \t]+[\x21-\x7e]+)*)?")
#: Fields h11 adds, changes or puts first, on either side: an answer with one is left
#: to h11 (as is one to a request with ``Connection``, or to a HEAD).
_FIELDS_H11_MAY_CHANGE = frozenset((b"connection", b"transfer-encoding", b"host"))
#: h11's limit on a ``Content-Length`` (digits).
_LENGTH_DIGITS_MAX = 20
#: What a field is to :func:`_head_as_h11_writes`.
_WRITTEN_AS_IS, _ONE_LENGTH, _LEFT_TO_H11 = 0, 1, 2
#: Fields already looked at, by what they are (most answers' fields are the same few),
#: at most this many.
_FIELDS_SEEN_MAX = 4096
_fields_seen: dict[tuple[bytes, bytes], int] = {}


def _kind_of_field(field: tuple[bytes, bytes]) -> int:
    name, value = field
    if not (_FIELD_NAME.fullmatch(name) and _FIELD_VALUE.fullmatch(value)):
        return _LEFT_TO_H11
    name = name.lower()
    if name == b"content-length":
        if value.isdigit() and len(value) <= _LENGTH_DIGITS_MAX:
            return _ONE_LENGTH
        return _LEFT_TO_H11
    return _LEFT_TO_H11 if name in _FIELDS_H11_MAY_CHANGE else _WRITTEN_AS_IS


def _head_as_h11_writes(
    self: H11Protocol, status: int, headers: list[tuple[bytes, bytes]]
) -> bytes | None:
    """The head h11 would write for a sized answer, made without it; None unless h11 is
    sure to write it exactly so: a keep-alive HTTP/1.1 exchange whose request is all
    in, with no ``Connection`` field either way, one ``Content-Length``, and every field
    valid (h11 refuses, or may change, anything else). See :func:`stream_send`."""
    connection = self.connection
    stream = self.stream
    if (
        not isinstance(stream, HTTPStream)
        or connection.our_state is not h11.SEND_RESPONSE
        or connection.their_state is not h11.DONE
        or connection.their_http_version != b"1.1"
        or not 200 <= status < 1000
        or status in (204, 304)
        or stream.scope["method"] == "HEAD"
    ):
        return None
    for name, _ in stream.scope["headers"]:
        if name.lower() == b"connection":  # h11 may answer with "Connection: close"
            return None
    lengths = 0
    seen = _fields_seen
    for field in headers:
        kind = seen.get(field)
        if kind is None:
            kind = _kind_of_field(field)
            if len(seen) >= _FIELDS_SEEN_MAX:
                seen.clear()
            seen[field] = kind
        if kind:
            if kind == _LEFT_TO_H11:
                return None
            lengths += 1
    if lengths != 1:
        return None
    fields = b"".join([b"%s: %s\r\n" % field for field in headers])
    return b"HTTP/1.1 %d \r\n%s\r\n" % (status, fields)


#: HTTP/1 connections whose answer was written without h11 (``stream_send``), until
#: their recycling.
_answered_untold: weakref.WeakSet[H11Protocol] = weakref.WeakSet()


async def _close_shielded(self: H11Protocol) -> None:
    """Close the connection once its exchange has ended, shielded: in a drain the app's
    task is being cancelled (Quart-Trio cancels a finished request, the server's
    shutdown cancels the rest), and an unshielded close met that cancellation and never
    happened: the client, its pipelined requests unanswered, kept the connection open
    until the shutdown grace ran out, and the process's exit waited for it (an outside
    review: 8 pipelining connections, SIGTERM, exit after the whole 5 s grace)."""
    with trio.CancelScope(shield=True):
        await self.can_read.set()
        await self.send(Closed())


async def _recycle(self: H11Protocol) -> None:
    """Hypercorn's ``_maybe_recycle``, as an exchange ends: the connection's next
    exchange, or the connection closed (shielded: :func:`_close_shielded`; also when
    telling the app its stream closed fails, which a shield would let block for ever).

    After an answer h11 was never told of (``_answered_untold``), the next exchange goes
    to a new h11 connection: what ``start_next_cycle`` makes of the old one, both sides
    idle, with the bytes already read behind the request."""
    untold = self in _answered_untold
    _answered_untold.discard(self)
    try:
        await self._close_stream()
    except BaseException:
        await _close_shielded(self)
        raise
    connection = self.connection
    if (
        self.context.terminated.is_set()
        or connection.their_state is not h11.DONE
        or not (untold or connection.our_state is h11.DONE)  # h11 MUST_CLOSE, or unsent
    ):
        await _close_shielded(self)
        return
    if untold:
        after, closed = connection.trailing_data
        connection = h11.Connection(
            h11.SERVER, max_incomplete_event_size=self.config.h11_max_incomplete_size
        )
        if after:
            connection.receive_data(after)
        if closed:
            connection.receive_data(b"")
        # Swapped and the reading told in one go (no schedule point): a read still going
        # on for the old connection (``_ReadWhilePaused``) feeds the new one.
        self.connection = connection
    else:
        connection.start_next_cycle()  # both sides are DONE: it cannot refuse
    await self.can_read.set()
    await self.send(Updated(idle=True))


def _answer_is_out(protocol: H11Protocol) -> bool:
    """Whether ``protocol``'s current answer has been written (all of it)."""
    connection = protocol.connection
    return connection.our_state is h11.DONE or protocol in _answered_untold


def _tell_h11(self: H11Protocol, held: _HeldAnswer) -> bytes:
    """Tell h11 of what ``held`` holds that it has not been told of; h11's bytes for
    everything held (the same as ``held.data``)."""
    if held.untold is None:
        return held.data
    status, headers, body = held.untold
    held.untold = None
    data = _serialise(self, h11.Response(headers=headers, status_code=status))
    if body:
        data += _serialise(self, h11.Data(data=body))
    return data


async def stream_send(self: H11Protocol, event: StreamEvent) -> None:
    """Hypercorn's ``H11Protocol.stream_send``, writing a sized answer in one piece.

    A sized answer's bytes are made without h11 where h11 would write them unchanged
    (:func:`_head_as_h11_writes`: a keep-alive HTTP/1.1 exchange), and h11 is never told
    of it: once it is written the exchange is over, and a new h11 connection takes the
    connection's next one (:func:`_recycle`). h11's part (its checks and state
    changes for the answer, and its recycling: ~20 us of a request on the VM here) was a
    third of an expiry answer's step before its write, and under a wave every answer of
    the pass waits for all of them to be made (``_pass_writes``).

    An answer after which the server closes the connection (h11's MUST_CLOSE) is written,
    and the connection closed, shielded from its request's cancellation. The app
    shields the answers it knows close (the client's or its own ``Connection: close``,
    see ``_app.py``), but not the one Hypercorn itself closes after, its
    ``keep_alive_max_requests``-th on the connection (1000): Quart-Trio's cancellation of
    the finished request then landed in the close, and the socket stayed open with the
    client waiting for EOF (an outside review: 5 runs of 9, once for 47 s)."""
    if isinstance(event, EndBody) and isinstance(self.stream, HTTPStream):
        # The answer marked sent before its last write, which waits for the end of the
        # scheduler pass (``_pass_writes``): a client that closes as soon as it has the
        # answer can be read before this task resumes, and Hypercorn logged such a close
        # as an unanswered request, a second, status-less access line (outside reviews:
        # 6-44 % of such clients' requests).
        self.stream.state = ASGIHTTPState.CLOSED
    held = _held.pop(self, None)
    if held is not None:
        if isinstance(event, Body):
            if held.untold is not None and len(event.data) == held.body_left:
                # Whole: written with its end.
                status, headers, _ = held.untold
                untold = (status, headers, event.data)
                _held[self] = _HeldAnswer(held.data + event.data, 0, untold)
                return
            data = _tell_h11(self, held) + _serialise(self, h11.Data(data=event.data))
            if len(event.data) == held.body_left:  # whole: its end follows at once
                _held[self] = _HeldAnswer(data, 0)
            else:  # a body in parts: written as it comes
                await self.send(RawData(data=data))
            return
        if isinstance(event, EndBody):
            if held.untold is not None and held.body_left == 0:
                # Written as h11 would write it, and h11 never told: the exchange is
                # over, and a new h11 connection takes the next (``_recycle``).
                _answered_untold.add(self)
                try:
                    await self.send(RawData(data=held.data))
                except BaseException:
                    # Not written (cancelled before the write): h11 is not done with
                    # the exchange, so the connection closes when it ends.
                    _answered_untold.discard(self)
                    raise
                return
            # h11's bytes (it refuses an end before the whole body, as it did before).
            data = _tell_h11(self, held) + _serialise(self, h11.EndOfMessage())
            if self.connection.our_state is h11.MUST_CLOSE:
                with trio.CancelScope(shield=True):  # the connection closes after it
                    await self.send(RawData(data=data))
                return
            await self.send(RawData(data=data))
            return
        # Anything else: what is held goes first.
        await self.send(RawData(data=_tell_h11(self, held)))
    if isinstance(event, Response) and event.status_code >= 200:
        length = _content_length(event.headers)
        if length is not None:
            # As Hypercorn builds the head, but held until the body is whole.
            headers = list(itertools.chain(event.headers, _response_headers(self.config)))
            if self.keep_alive_requests >= self.config.keep_alive_max_requests:
                headers.append((b"connection", b"close"))
            status = event.status_code
            head = _head_as_h11_writes(self, status, headers)
            if head is not None:
                _held[self] = _HeldAnswer(head, length, (status, headers, b""))
            else:
                head = _serialise(self, h11.Response(headers=headers, status_code=status))
                _held[self] = _HeldAnswer(head, length)
            return
    # A StreamClosed: the answer is out and Hypercorn has marked it so (and logged it).
    # What is left (the connection's recycling, the app's teardown) runs after the other
    # answers of the pass the answer was written in went out: its last write waited for
    # that pass to end (``_pass_writes``), so there is no yield here (there was one before
    # writes were made at the pass's end; 1.6 % of a request's instructions).
    if isinstance(event, StreamClosed):
        await _recycle(self)
        return
    await _original_stream_send(self, event)


_original_stream_send = H11Protocol.stream_send


async def _h2_create_stream(self: H2Protocol, request: Any) -> None:
    """Hypercorn's ``H2Protocol._create_stream``, not counting towards
    ``keep_alive_max_requests``. Past that count Hypercorn closed the HTTP/2 connection
    right after handing the new stream to the app, with a GOAWAY that names that stream
    as taken: the app ran it (a session took its slot and ran) and its answer could never
    be sent (an outside review, with the 1001st request on an h2c connection). HTTP/2
    multiplexes: a connection is not closed for having served many requests."""
    await _original_h2_create_stream(self, request)
    self.keep_alive_requests = 0


_original_h2_create_stream = H2Protocol._create_stream


#: Hypercorn's own answers to requests h11 cannot parse, by the status h11 suggests.
_PROTOCOL_ERRORS = {
    400: "malformed HTTP request",
    431: "request head too large",
    501: "unsupported transfer coding",
}


def _closing_json_error(code: str, detail: str) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """The head and body of an error Hypercorn answers itself, as JSON like every other
    error (Hypercorn's had an empty body), closing the connection."""
    body = dumps({"error": code, "detail": detail})
    return json_head(body, {"Connection": "close"}), body


async def _send_error_response(self: H11Protocol, status_code: int) -> None:
    """Hypercorn's answer to a request h11 cannot parse (a malformed request line or
    header, a head over h11's limit), with a JSON body like every other error (SPEC:
    no error without one); Hypercorn sent an empty body."""
    detail = _PROTOCOL_ERRORS.get(status_code, "malformed HTTP request")
    headers, body = _closing_json_error("invalid_request", detail)
    headers += self.config.response_headers("h11")
    await self._send_h11_event(h11.Response(status_code=status_code, headers=headers))
    await self._send_h11_event(h11.Data(data=body))
    await self._send_h11_event(h11.EndOfMessage())


class _ClosedStream:
    """What an HTTP/2 event for a stream already closed goes to: nothing."""

    async def handle(self, event: HypercornEvent | StreamEvent) -> None:
        return None


class _Streams(dict[int, Any]):
    """An HTTP/2 connection's streams by id; an id no longer there is a closed stream.

    An app that answers before the whole body arrived (a 413, a 404, a 401) closes its
    stream; the body's next DATA frame then found no stream, and Hypercorn's KeyError
    stopped the whole server (an outside review, with ``curl --http2-prior-knowledge``
    and a large body). Hypercorn already ignores a closed stream's end; its DATA is
    ignored the same way (its flow-control credit is still given back by Hypercorn)."""

    def __missing__(self, stream_id: int) -> _ClosedStream:
        return _CLOSED_STREAM


_CLOSED_STREAM = _ClosedStream()


async def _h2_handle(self: H2Protocol, event: Event) -> None:
    """Hypercorn's ``H2Protocol.handle``, closing a lost connection's streams newest
    first. Oldest first (Hypercorn's order), the sessions that held slots were cancelled
    before the queued ones of the same connection, and each slot they freed went to a
    queued session about to be cancelled too: admitted, then cancelled (an outside
    review: 20 sessions on one dropped connection, capacity 2, counted 20 admissions).
    Newest first, the queued ones have left the queue when the slots come free."""
    if not isinstance(event, Closed):
        await _original_h2_handle(self, event)
        return
    self.closed = True
    for stream_id in sorted(self.streams, reverse=True):
        await self._close_stream(stream_id)
    await self.has_data.set()


_original_h2_handle = H2Protocol.handle


def _h2_init(self: H2Protocol, *args: Any, **kwargs: Any) -> None:
    _original_h2_init(self, *args, **kwargs)
    self.streams = _Streams(self.streams)


_original_h2_init = H2Protocol.__init__


def _every_handshake_reaches_the_app(self: Handshake) -> bool:
    """Hypercorn's ``Handshake.is_valid``: every WebSocket handshake goes to the app,
    which has no WebSocket endpoint and refuses each with a JSON error (the admin token
    checked first on ``/admin`` paths). Hypercorn refused a malformed one itself, before
    the app: 400 with an empty body, even on ``/admin`` without a token (an outside
    review). The app never accepts one, so nothing depends on the handshake's fields."""
    return True


async def _ws_send_error_response(self: WSStream, status_code: int) -> None:
    """Hypercorn's own WebSocket refusals (data before the handshake's answer, a bad
    server name), with a JSON body like every other error: its was empty."""
    code = {403: "forbidden", 404: "not_found"}.get(status_code, "invalid_request")
    headers, body = _closing_json_error(code, "this server does not speak WebSocket")
    await self.send(Response(stream_id=self.stream_id, status_code=status_code, headers=headers))
    await self.send(Body(stream_id=self.stream_id, data=body))
    await self.send(EndBody(stream_id=self.stream_id))
    answered: ResponseSummary = {"status": status_code, "headers": headers}
    await self.config.log.access(self.scope, answered, time.time() - self.start_time)


#: Empty lines a client may send before a request line, ignored (RFC 9112, section 2.2:
#: a server SHOULD ignore at least one; some clients send a CRLF after a POST's body).
EMPTY_LINES_IGNORED = 8


def _read_request_after_empty_lines(buf: ReceiveBuffer) -> h11.Request | None:
    """h11's reader of a request's head, ignoring empty lines before it: h11 refused
    them ("no request line received"), so a client that sent a CRLF after a POST's body
    got a 400 for it, and its connection closed, after the POST's answer (an outside
    review)."""
    for _ in range(EMPTY_LINES_IGNORED):
        try:
            return maybe_read_from_IDLE_client(buf)
        except h11.LocalProtocolError as error:
            if str(error) != "no request line received":  # h11 has taken the empty line
                raise
    return maybe_read_from_IDLE_client(buf)


_lifespan_send = Lifespan.asgi_send
_wait_for_startup = Lifespan.wait_for_startup


async def _lifespan_send_noting_failure(self: Lifespan, message: Any) -> None:
    if message["type"] == "lifespan.startup.failed":
        _failed_starts.add(self)
    await _lifespan_send(self, message)


async def _wait_for_startup_or_fail(self: Lifespan) -> None:
    """Hypercorn's, except that a failed start stops here: Hypercorn's lifespan task
    marks the start done as it fails, and the worker went on to bind its sockets and log
    "Running on ..." before the failure ended it (an outside review)."""
    await _wait_for_startup(self)
    if self in _failed_starts:
        raise LifespanFailureError("startup", "the app did not start")


_failed_starts: weakref.WeakSet[Lifespan] = weakref.WeakSet()

_stream_handle = HTTPStream.handle


async def _stream_handle_stamped(self: HTTPStream, event: StreamEvent) -> None:
    """Hypercorn's, noting in the request's scope when its body's end reached the host:
    the receive stamp of the read being handled (each request's own, pipelined or
    multiplexed alike; the connection's latest read can be a later request's)."""
    if type(event) is EndBody and self.scope is not None:
        latest = _receive_stamps.latest_read.get()
        if latest is not None and latest[0] is not None:
            self.scope[_receive_stamps.COMPLETED_KEY] = latest[0]  # type: ignore[literal-required]
    await _stream_handle(self, event)


async def _spawn_app(
    self: TaskGroup,
    app: AppWrapper,
    config: Config,
    scope: Scope,
    send: Callable[[ASGISendEvent | None], Awaitable[None]],
) -> Callable[[ASGIReceiveEvent], Awaitable[None]]:
    """Hypercorn's ``TaskGroup.spawn_app``, with the app's messages passed without a
    scheduler pass each: Trio's channels yield a whole pass on every send and on every
    receive that finds a message waiting (Trio's rule: every ``await`` of its primitive
    is a schedule point), so a request's body reached the app two passes after its head
    was read. Here a message is put, and taken, at once when the channel has room (or a
    message); otherwise they wait as before."""
    assert self._nursery is not None
    to_app, from_server = trio.open_memory_channel[ASGIReceiveEvent](config.max_app_queue_size)

    #: Called as the server tells the app its client has gone (``on_disconnect``).
    disconnect_hooks: list[Callable[[], None]] = []

    async def put(message: ASGIReceiveEvent) -> None:
        if message["type"] == "http.disconnect":
            for hook in disconnect_hooks:
                hook()
            disconnect_hooks.clear()
        try:
            to_app.send_nowait(message)
        except trio.WouldBlock:
            await to_app.send(message)

    async def receive() -> ASGIReceiveEvent:
        try:
            return from_server.receive_nowait()
        except trio.WouldBlock:
            return await from_server.receive()

    # For ``_plain_create``: a message already waiting, or trio.WouldBlock (the app can
    # take a body that has arrived without waiting for one that has not), and a call
    # made as the client goes away (the app learns of it without a task that waits on
    # ``receive`` for it).
    receive.nowait = from_server.receive_nowait  # type: ignore[attr-defined]
    receive.on_disconnect = disconnect_hooks.append  # type: ignore[attr-defined]

    self._nursery.start_soon(
        _handle_app,
        app,
        config,
        scope,
        receive,
        send,
        trio.to_thread.run_sync,
        trio.from_thread.run,
    )
    return put


@functools.cache  # once per process, however many apps are made
def apply() -> None:
    """Replace ``TCPServer.protocol_send``, ``_idle_timeout`` and ``_read_data``,
    ``H11Protocol.stream_send`` and ``_send_error_response``, ``H2Protocol``'s
    streams and request count, stamp ``HTTPStream``'s body ends, and stop a failed
    lifespan start before serving."""
    _receive_stamps.keep_the_kernel_stamping()
    TCPServer.protocol_send = protocol_send  # type: ignore[method-assign]
    TCPServer._idle_timeout = _idle_timeout  # type: ignore[method-assign]
    TCPServer._read_data = _read_data  # type: ignore[method-assign]
    H11Protocol.stream_send = stream_send  # type: ignore[method-assign]
    H11Protocol._send_error_response = _send_error_response  # type: ignore[method-assign]
    H2Protocol.__init__ = _h2_init  # type: ignore[method-assign]
    H2Protocol.handle = _h2_handle  # type: ignore[method-assign]
    H2Protocol._create_stream = _h2_create_stream  # type: ignore[method-assign]
    TCPServer.run = _run  # type: ignore[method-assign]
    HTTPStream.handle = _stream_handle_stamped  # type: ignore[method-assign]
    Lifespan.asgi_send = _lifespan_send_noting_failure  # type: ignore[method-assign]
    Lifespan.wait_for_startup = _wait_for_startup_or_fail  # type: ignore[method-assign]
    Handshake.is_valid = _every_handshake_reaches_the_app  # type: ignore[method-assign]
    WSStream._send_error_response = _ws_send_error_response  # type: ignore[method-assign]
    READERS[(h11.CLIENT, h11.IDLE)] = _read_request_after_empty_lines
    TaskGroup.spawn_app = _spawn_app  # type: ignore[method-assign]
