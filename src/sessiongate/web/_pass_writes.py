"""The writes of one scheduler pass, made together as the pass ends.

A write that wakes a sleeping client costs the server far more than its bytes: on
loopback the sender's system call runs the receiver's TCP input and wakes its process
(25-45 us on the 2-core VM here, against ~5 us for a write made right after another,
while the client is still awake). Under a wave of expiry answers Trio runs the answers'
tasks one after another in one scheduler pass, each building its answer (~130 us) and
then writing it, so every write found its client asleep again and paid the full price.

Here a connection's write is noted instead, and its task yields; the run loop calls the
:class:`_PassWrites` instrument's ``before_io_wait`` hook between one pass and the next
(always: a task that yielded is runnable, so the loop goes round at once), and the hook
makes every write noted in the pass that just ended, back to back. The writing task
resumes in the next pass and learns how much of its bytes the socket took; the rest, if
any, it writes itself as before (waiting for the client). It holds its connection's send
lock throughout, so a connection's bytes keep their order, and the yield is shielded: a
write once noted is made.

Used for HTTP/1.1 connections; HTTP/2 writes at once (see ``_hypercorn_fix``). An
answer leaves at most one pass later than it would have (under a wave: once every
answer of the pass is built). Measured on the overload of ``bench_http.py`` (400
clients, capacity 50, 3 s deadline): clients' expiry lateness p99 45.9-65.7 ms over the
day's runs (one at 111 ms on a shared machine), against 63.7-84.6 ms with each write
made at once (``benchmarks/README.md``).
"""

from __future__ import annotations

import os

import attrs
import trio


def write_now(stream: object, view: memoryview) -> int:
    """Write what the socket's buffer takes now, without a schedule point; how many
    bytes that was (0 for TLS, a closing socket, or a full buffer: the caller waits and
    writes the rest as Trio does, and learns there of a close).

    Raises:
        trio.BrokenResourceError: the connection failed (reset, broken pipe).
    """
    if not isinstance(stream, trio.SocketStream) or stream.socket.did_shutdown_SHUT_WR:
        return 0
    fd = stream.socket.fileno()
    if fd == -1:  # closed: checked at the write, so a reused number is never written to
        return 0
    try:
        return os.write(fd, view)  # Trio's sockets are non-blocking
    except BlockingIOError:
        return 0
    except OSError as error:
        raise trio.BrokenResourceError from error


#: A pass whose end makes this many writes or more made a wave of answers: each of its
#: writing tasks yields one more pass before it goes on with its request's ending.
#: Sessions expiring together are not all due in the same pass (their clients' requests
#: reached the host over a few milliseconds); the answers of the ones due a pass later
#: (a wave's stragglers) are made in the pass after the wave's writes, and there they
#: waited for every ending of the wave's requests (recycling, teardown: ~50 us each),
#: 20-30 ms after the rest (overload runs: 14-34 answers of the first wave). With the
#: yield they go out at that pass's end; the endings follow a pass later.
WAVE = 32


@attrs.define(eq=False)
class _Write:
    stream: trio.SocketStream
    view: memoryview
    #: Bytes written; None until the write has been made.
    written: int | None = None
    error: trio.BrokenResourceError | None = None
    #: When the write was made (Trio clock).
    made_at: float = 0.0
    #: Made with :data:`WAVE` or more others at one pass's end (see there).
    in_wave: bool = False

    def make(self) -> None:
        """Write now; never raises (an instrument that raises is dropped by Trio)."""
        self.made_at = trio.current_time()
        try:
            self.written = write_now(self.stream, self.view)
        except trio.BrokenResourceError as error:
            self.written, self.error = 0, error
        except Exception as error:  # not expected: the connection is as good as broken
            self.written, self.error = 0, trio.BrokenResourceError(repr(error))
            self.error.__cause__ = error


class _PassWrites(trio.abc.Instrument):
    """The writes noted in the current pass, made as it ends."""

    def __init__(self) -> None:
        self.noted: list[_Write] = []

    def before_io_wait(self, timeout: float) -> None:
        noted, self.noted = self.noted, []
        in_wave = len(noted) >= WAVE
        for write in noted:
            write.in_wave = in_wave
            write.make()


_PASS_WRITES: trio.lowlevel.RunVar[_PassWrites] = trio.lowlevel.RunVar("sessiongate_writes")


def pass_writes() -> _PassWrites:
    """This run's instrument (added on first use: instruments added later run after it
    as each pass ends, so they find the pass's answers written)."""
    try:
        return _PASS_WRITES.get()
    except LookupError:
        writes = _PassWrites()
        trio.lowlevel.add_instrument(writes)
        _PASS_WRITES.set(writes)
        return writes


async def write_at_pass_end(stream: object, view: memoryview) -> tuple[int, float]:
    """:func:`write_now`, made as the current scheduler pass ends (module docstring):
    how many bytes the socket took, and when (Trio clock).

    Raises:
        trio.BrokenResourceError: the connection failed (reset, broken pipe).
    """
    if not isinstance(stream, trio.SocketStream):
        return 0, trio.current_time()  # TLS: the caller's send_all writes it
    writes = pass_writes()
    write = _Write(stream, view)
    writes.noted.append(write)
    # Runnable again at once, so the loop ends the pass without waiting for I/O, and the
    # hook makes the write before the next pass begins; no cancellation lands here.
    await trio.lowlevel.cancel_shielded_checkpoint()
    if write.written is None:  # the hook did not run (the instrument is gone): now
        if write in writes.noted:
            writes.noted.remove(write)
        write.make()
    if write.error is not None:
        raise write.error
    assert write.written is not None
    if write.in_wave:  # the answers due next go out first (``WAVE``)
        await trio.lowlevel.cancel_shielded_checkpoint()
    return write.written, write.made_at
