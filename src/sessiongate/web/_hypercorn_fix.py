"""Four fixes to Hypercorn 0.18's Trio connection handler (``TCPServer.protocol_send``).

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

**Scheduling passes on every request's path.** ``trio.Lock`` yields to the scheduler
after acquiring even when nobody holds it (Trio's rule: every ``await`` of a Trio
primitive is a schedule point), and ``nursery.start`` waits until the new task has run.
Hypercorn takes a lock for every write (``send_lock``: the head and the body of an answer
are two writes) and for every keep-alive timer change (``TrioSingleTask``: stopped when a
request's head arrives, restarted with ``nursery.start`` after each answer). Under a
burst each schedule point costs a whole pass over every runnable task (~20 ms with a few
hundred clients), so a request's head reached the app a pass later than needed, and an
answer's body left two passes after its head. Here a free lock is taken without that
extra yield (after the same cancellation check) and the keep-alive timer is restarted
with ``start_soon``; a lock that is held is still waited for as before, so the two tasks
that write one connection stay serialised exactly as Hypercorn means them to be.

**A client that stops reading held the process for ever.** Hypercorn shields every
write from cancellation (a response must not be cut off half-way by its request's own
cancellation), so a write to a client that reads nothing (a paused tab, a stalled
event-stream subscriber) waited for as long as the client kept the connection open:
its connection and task for ever, and on SIGTERM the process never exited, whatever the
grace (outside review). A write is still shielded, but bounded: one the client takes
nothing of for :data:`SEND_STALL_LIMIT` seconds (or for Hypercorn's graceful timeout,
once the server is shutting down) is abandoned and its connection closed, and
:func:`cut_stalled_sends` abandons every write still waiting when ``sessiongate serve``'s
grace is over.

**An idle keep-alive connection held the exit for the whole graceful timeout.** After
an answer Hypercorn restarts the connection's keep-alive timer (which also closes the
connection when the server shuts down) from the app's task, as its last send finishes;
by then Quart-Trio's message task has often heard the stream close and cancelled that
task, so the restart met the cancellation and never happened: the connection stayed
open, with no timer, until Hypercorn's graceful timeout (``--shutdown-grace``) ran out
(outside review: 30 s to exit with one idle client). The timer is now updated whatever
the calling task's state.

Applied once, by :func:`sessiongate.web.create_app`, so it covers ``sessiongate serve``
and plain ``hypercorn`` alike. The test suite reproduces the crash; the benchmark's
``--split-lateness`` run shows the passes saved. Drop this module when Hypercorn catches
``BusyResourceError`` there and its Trio worker stops yielding on free locks.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable

import trio
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.trio.tcp_server import TCPServer


async def _acquire(lock: trio.Lock) -> None:
    """``lock.acquire()`` without the schedule point after taking a free lock."""
    await trio.lowlevel.checkpoint_if_cancelled()
    if lock.locked():
        await lock.acquire()
    else:
        lock.acquire_nowait()


async def _run_idle_timer(scope: trio.CancelScope, action: Callable[[], Awaitable[None]]) -> None:
    with scope:
        await action()


#: Seconds a client may take nothing of one write before its connection is closed (a
#: write timeout; nginx's ``send_timeout`` is the same idea).
SEND_STALL_LIMIT = 10.0

#: The shielded scopes of the writes in progress, for :func:`cut_stalled_sends`.
_sends: set[trio.CancelScope] = set()


def cut_stalled_sends() -> None:
    """Abandon every write still waiting for its client (the grace is over)."""
    for scope in list(_sends):
        scope.cancel()


async def protocol_send(self: TCPServer, event: Event) -> None:
    """Hypercorn's ``TCPServer.protocol_send`` with the fixes (module docstring)."""
    if isinstance(event, RawData):
        await _acquire(self.send_lock)
        limit = SEND_STALL_LIMIT
        if self.context.terminated.is_set():
            limit = min(limit, self.config.graceful_timeout)
        scope = trio.CancelScope(shield=True, deadline=trio.current_time() + limit)
        _sends.add(scope)
        try:
            with scope:
                await self.stream.send_all(event.data)
            stalled = scope.cancelled_caught
            closed = stalled
            if stalled:  # the client took nothing for too long: it gets nothing more
                with trio.CancelScope(shield=True):
                    await self._close()
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
            # Gone, or being closed by the other task: the send is moot.
            closed = True
        finally:
            _sends.discard(scope)
            self.send_lock.release()
        if closed:
            await self.protocol.handle(Closed())
    elif isinstance(event, Closed):
        await self._close()
        await self.protocol.handle(Closed())
    elif isinstance(event, Updated):
        # Bookkeeping that must happen even in a cancelled task: the answer's last
        # send reaches here after Quart-Trio's message task has heard the stream close
        # and cancelled the request, and a keep-alive connection left without its timer
        # is never closed at shutdown (it held the exit for the whole graceful timeout).
        timer = self.idle_task
        if timer._lock.locked():
            with trio.CancelScope(shield=True):
                await timer._lock.acquire()
        else:
            timer._lock.acquire_nowait()
        try:
            if timer._handle is not None:
                timer._handle.cancel()
            timer._handle = None
            if event.idle:
                timer._handle = trio.CancelScope()
                self._task_group.spawn(_run_idle_timer, timer._handle, self._idle_timeout)
        finally:
            timer._lock.release()


@functools.cache  # once per process, however many apps are made
def apply() -> None:
    """Replace ``TCPServer.protocol_send``."""
    TCPServer.protocol_send = protocol_send  # type: ignore[method-assign]
