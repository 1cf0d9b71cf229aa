"""Work that can wait for the run loop to be idle: routine log lines, ended sessions'
documents, and the garbage collector.

Under the overload of ``bench_http.py`` (400 clients, capacity 50, 3 s deadline) a few
hundred queued sessions expire within tens of milliseconds, and every answered client
sends again at once: the server's one core is busy for a while, and how late the last
expiry answer of such a wave is depends on everything else done meanwhile. Two kinds of
work done meanwhile need not be:

* the session-end line and the access line of every answer (~9 % of an expiry answer's
  instructions: the log record, its formatting, a write to a pipe for each line);
* the encoding of an ended session's final document that nobody is waiting for (an
  expired session's answer is its error, not its document: ~15 % of its session task's
  step), kept for a later ``GET`` (``_sessions.Registry.finish``);
* the cyclic garbage collector's young collections, which CPython starts at whichever
  allocation crosses its threshold: under such a wave the young generation held 46 000
  to 59 000 objects when it ran, and a collection took 7-47 ms in the middle of the
  wave (measured with ``gc.callbacks`` on ``sessiongate serve``).

All are done here instead, by a Trio instrument, when the run loop is about to wait for
I/O with no task to run and no deadline due (``before_io_wait`` with a timeout): after
the wave, and only as much as fits before the next deadline. The instrument runs after
the pass's writes (``_pass_writes``), so answers built in a pass go out first. Lines and
calls wait in one queue, oldest first. On a loop that is never idle, they go
:data:`FORCED_SLICE` a pass once :data:`MAX_LINES` are waiting or the oldest has waited
:data:`MAX_DELAY` seconds (memory stays bounded); all go before any other line of a
logger with lines waiting (an error with its traceback, a drain's:
written at once, those come after them) and when the run ends. Each keeps the time it
was noted at (``created``), so the log reads as if written at once. The collector
(only where :func:`collect_garbage_when_idle` is called: ``sessiongate serve``) keeps
CPython's automatic threshold, raised, as a backstop for a loop that is never idle; a
generation due that does not fit before the next deadline waits for a longer moment.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable
from typing import Any

import attrs
import trio
import trio.testing

from ._pass_writes import pass_writes

#: Most log lines and calls kept waiting for an idle moment, and longest wait (seconds).
MAX_LINES = 2000
MAX_DELAY = 1.0
#: Lines written (calls made) per pass once a bound is reached on a loop never idle.
FORCED_SLICE = 200
#: What writing one log line (or making one call) is taken to cost until some have been
#: (seconds).
LINE_COST = 20e-6
#: What each generation's collection is taken to last until one has been timed
#: (seconds): a collection waits for an idle moment twice as long (to the next deadline).
GC_PAUSES = (0.002, 0.005, 0.02)


@attrs.define
class _Line:
    logger: logging.Logger
    level: int
    msg: str
    args: tuple[Any, ...]
    created: float = attrs.Factory(time.time)

    def write(self) -> None:
        logger = self.logger
        record = logger.makeRecord(
            logger.name, self.level, "(unknown file)", 0, self.msg, self.args, None
        )
        # As if made when noted: logging's time fields, from the time noted.
        shift = self.created - record.created
        record.created = self.created
        record.msecs = int((self.created - int(self.created)) * 1000) + 0.0
        record.relativeCreated += shift * 1000
        logger.handle(record)

    def describe(self) -> str:
        return self.msg


@attrs.define
class _Call:
    """A call that can wait for an idle moment (its result is dropped)."""

    fn: Callable[[], object]
    created: float = attrs.Factory(time.time)

    def write(self) -> None:
        self.fn()

    def describe(self) -> str:
        return repr(self.fn)


class _IdleWork(trio.abc.Instrument):
    """The log lines waiting, and the collector's settings, of one Trio run."""

    def __init__(self) -> None:
        #: Log lines and calls waiting, oldest first.
        self.lines: list[_Line | _Call] = []
        #: Young collections from this many allocations on; None: the collector is
        #: CPython's own (not managed here).
        self.gc_young: int | None = None
        #: True while lines are being written.
        self.writing = False
        #: Trio's MockClock (tests): the loop's timeout is 0 when it is idle too.
        self.mock_clock = isinstance(trio.lowlevel.current_clock(), trio.testing.MockClock)
        #: How long a line took to write, in the last lines written (seconds).
        self.line_cost = LINE_COST
        #: How long the last collection of each generation took (seconds).
        self.gc_pauses = list(GC_PAUSES)

    def before_io_wait(self, timeout: float) -> None:
        # The loop waits ``timeout`` seconds for I/O: 0 while a task is runnable or a
        # deadline is due, else the time to the next deadline (under Trio's MockClock,
        # which jumps when the loop is idle, 0 then too: there idle is no task runnable).
        lines = self.lines
        if lines:
            if timeout == 0 and self.mock_clock:
                if trio.lowlevel.current_statistics().tasks_runnable == 0:
                    self.write_lines()
            elif timeout > 0:
                # As many as are likely written before the next deadline, oldest first.
                self.write_lines(max(1, int(min(timeout, 3600.0) / 2 / self.line_cost)))
            elif len(lines) >= MAX_LINES or time.time() - lines[0].created >= MAX_DELAY:
                # Never idle: a slice per pass (written after the pass's answers).
                self.write_lines(FORCED_SLICE)
        young = self.gc_young
        if young is not None and timeout > 0 and gc.get_count()[0] >= young:
            self.collect(timeout)

    def collect(self, room: float) -> None:
        """One collection, of the generation CPython would collect now, if it is likely
        to be over before the next deadline (``room`` seconds away); else none (a longer
        idle moment, or CPython's own threshold, comes later)."""
        # Generations 1 and 2 every so many collections of the one below, by CPython's
        # own thresholds (``gc.set_threshold``: 20 and 100 under ``sessiongate serve``).
        _, collections_0, collections_1 = gc.get_count()
        _, every_1, every_2 = gc.get_threshold()
        generation = 0
        if collections_0 >= every_1:
            generation = 2 if collections_1 >= every_2 else 1
        pauses = self.gc_pauses
        if room < 2 * pauses[generation]:
            # Not a younger one instead: each resets the young count, and an older
            # generation due would never be collected (here or by CPython's backstop).
            return
        started = time.perf_counter()
        gc.collect(generation)  # a finalizer's error is reported by gc, not raised
        pauses[generation] = time.perf_counter() - started

    def after_run(self) -> None:
        self.write_lines()

    def write_lines(self, most: int | None = None) -> None:
        """Write the lines waiting (at most ``most``, the oldest); never raises (Trio
        drops an instrument that does)."""
        if self.writing:  # a line being written asked for the rest (keep_order)
            return
        if most is None or most >= len(self.lines):
            lines, self.lines = self.lines, []
        else:
            lines, self.lines = self.lines[:most], self.lines[most:]
        if not lines:
            return
        started = time.perf_counter()
        self.writing = True
        try:
            for line in lines:
                try:
                    line.write()
                except Exception:  # a handler's or filter's fault; logging's own report
                    record = logging.makeLogRecord({"msg": line.describe()})
                    logging.Handler().handleError(record)
        finally:
            self.writing = False
        self.line_cost = max((time.perf_counter() - started) / len(lines), 1e-7)


_IDLE_WORK: trio.lowlevel.RunVar[_IdleWork] = trio.lowlevel.RunVar("sessiongate_idle")


def _idle_work() -> _IdleWork:
    """This run's instrument (added on first use). Raises RuntimeError outside Trio."""
    try:
        return _IDLE_WORK.get()
    except LookupError:
        pass_writes()  # first: the pass's answers are written before lines are
        work = _IdleWork()
        trio.lowlevel.add_instrument(work)
        _IDLE_WORK.set(work)
        return work


class _WaitingLinesFirst(logging.Filter):
    """On a logger whose routine lines wait: any other line of it is written after
    them, so the log keeps the order of events (an error's traceback came before the
    lines of sessions that had ended earlier: an outside review)."""

    def filter(self, record: logging.LogRecord) -> bool:
        write_logs_now()  # nothing while they are being written (this is one of them)
        return True


_WAITING_LINES_FIRST = _WaitingLinesFirst()


def keep_order(logger: logging.Logger) -> None:
    """Write the lines waiting before any line ``logger`` logs at once (every logger
    with lines waiting has it: a drain's lines follow its sessions' lines so)."""
    if _WAITING_LINES_FIRST not in logger.filters:
        logger.addFilter(_WAITING_LINES_FIRST)


def log_when_idle(logger: logging.Logger, level: int, msg: str, *args: Any) -> None:
    """``logger.log(level, msg, *args)``, written when the run loop is next idle (at
    once outside a Trio run)."""
    if not logger.isEnabledFor(level):
        return
    try:
        work = _idle_work()
    except RuntimeError:  # not in a Trio run
        logger.log(level, msg, *args)
        return
    keep_order(logger)
    work.lines.append(_Line(logger, level, msg, args))


def call_when_idle(fn: Callable[[], object]) -> None:
    """``fn()``, called when the run loop is next idle, in turn with the log lines
    waiting (at once outside a Trio run). An exception it raises is reported as a
    logging handler's error is (on stderr), never raised."""
    try:
        work = _idle_work()
    except RuntimeError:  # not in a Trio run
        fn()
        return
    work.lines.append(_Call(fn))


def write_logs_now() -> None:
    """Write the log lines waiting for an idle moment now, and make the calls waiting
    (a drain's start, a test)."""
    try:
        work = _IDLE_WORK.get()
    except (LookupError, RuntimeError):
        return
    work.write_lines()


def collect_garbage_when_idle(young: int) -> None:
    """From now on in this run, collect garbage when the loop is idle and at least
    ``young`` allocations have been made since the last collection; CPython's own
    threshold (set by the caller, higher) stays as the backstop."""
    _idle_work().gc_young = young
