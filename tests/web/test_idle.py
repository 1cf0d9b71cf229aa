"""Work done when the run loop is idle (``web/_idle.py``): routine log lines, calls
(ended sessions' documents), and the garbage collector's young collections."""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Iterator
from typing import Any

import pytest
import trio
import trio.testing

from sessiongate.web import _idle


class Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    @property
    def messages(self) -> list[str]:
        return [r.getMessage() for r in self.records]


async def always_runnable() -> None:
    """A task that keeps the loop from ever waiting with nothing to run."""
    while True:
        await trio.lowlevel.checkpoint()


@pytest.fixture
def lines() -> Iterator[tuple[logging.Logger, Lines]]:
    logger = logging.getLogger("test.sessiongate.idle")
    handler = Lines()
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    yield logger, handler
    logger.handlers[:] = []


async def test_a_line_is_written_when_the_loop_is_idle_with_its_own_time(
    lines: tuple[logging.Logger, Lines],
) -> None:
    logger, written = lines
    before = time.time()
    _idle.log_when_idle(logger, logging.INFO, "session %s %s", "a1", "expired")
    after = time.time()
    for _ in range(3):  # busy: other tasks run, the loop is never idle
        await trio.lowlevel.checkpoint()
    assert written.messages == []
    await trio.sleep(0.05)  # the loop is idle for a while
    assert written.messages == ["session a1 expired"]
    (record,) = written.records
    assert before <= record.created <= after  # when noted, not when written
    assert record.msecs == int((record.created - int(record.created)) * 1000)
    assert time.strftime("%H:%M:%S", time.localtime(record.created)) in logging.Formatter(
        "%(asctime)s"
    ).format(record)


async def test_lines_keep_their_order_and_levels_below_the_loggers_are_not_kept(
    lines: tuple[logging.Logger, Lines],
) -> None:
    logger, written = lines
    for n in range(5):
        _idle.log_when_idle(logger, logging.INFO, "line %d", n)
    _idle.log_when_idle(logger, logging.DEBUG, "not shown")
    work = _idle._IDLE_WORK.get()
    assert len(work.lines) == 5  # the DEBUG line was never kept
    await trio.sleep(0.01)
    assert written.messages == [f"line {n}" for n in range(5)]


async def test_a_loop_never_idle_still_writes_after_the_bounds(
    lines: tuple[logging.Logger, Lines], monkeypatch: pytest.MonkeyPatch
) -> None:
    logger, written = lines
    monkeypatch.setattr(_idle, "MAX_LINES", 10)
    monkeypatch.setattr(_idle, "MAX_DELAY", 0.05)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(always_runnable)
        for n in range(10):
            _idle.log_when_idle(logger, logging.INFO, "count %d", n)
        await trio.lowlevel.checkpoint()
        await trio.lowlevel.checkpoint()
        assert len(written.messages) == 10  # MAX_LINES reached
        _idle.log_when_idle(logger, logging.INFO, "old")
        await trio.lowlevel.checkpoint()
        assert written.messages[-1] == "count 9"
        noted = time.monotonic()
        while written.messages[-1] != "old":
            await trio.lowlevel.checkpoint()
        assert time.monotonic() - noted >= 0.04  # written once it had waited MAX_DELAY
        nursery.cancel_scope.cancel()


async def test_a_near_deadline_limits_the_lines_written(
    lines: tuple[logging.Logger, Lines],
) -> None:
    logger, written = lines
    for n in range(20):
        _idle.log_when_idle(logger, logging.INFO, "line %d", n)
    work = _idle._IDLE_WORK.get()
    work.line_cost = 0.01  # as if each line took 10 ms to write
    # Idle with the next deadline 50 ms away: what fits in half of it (2 lines).
    await trio.sleep(0.05)
    assert 1 <= len(written.messages) <= 3
    assert written.messages == [f"line {n}" for n in range(len(written.messages))]
    await trio.sleep(0.05)  # the cost measured now is a real line's: the rest goes
    assert len(written.messages) == 20


def test_the_lines_left_are_written_on_demand_and_as_the_run_ends(
    lines: tuple[logging.Logger, Lines],
) -> None:
    logger, written = lines

    async def note_and_return() -> None:
        _idle.log_when_idle(logger, logging.INFO, "first")
        _idle.write_logs_now()
        assert written.messages == ["first"]
        _idle.log_when_idle(logger, logging.INFO, "last")

    trio.run(note_and_return)  # no idle moment before it ends
    assert written.messages == ["first", "last"]


def test_outside_trio_a_line_is_written_at_once(lines: tuple[logging.Logger, Lines]) -> None:
    logger, written = lines
    _idle.log_when_idle(logger, logging.INFO, "now %s", "please")
    assert written.messages == ["now please"]
    _idle.write_logs_now()  # nothing to do, and no error


def test_a_failing_handler_loses_its_line_only(
    lines: tuple[logging.Logger, Lines], capsys: pytest.CaptureFixture[str]
) -> None:
    logger, written = lines

    class Refuses(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            if record.msg == "bad":
                raise RuntimeError("a filter's fault")
            return True

    logger.addFilter(refuses := Refuses())
    try:

        async def note() -> None:
            _idle.log_when_idle(logger, logging.INFO, "bad")
            _idle.log_when_idle(logger, logging.INFO, "good")
            await trio.sleep(0.01)

        trio.run(note)
    finally:
        logger.removeFilter(refuses)
    assert written.messages == ["good"]
    assert "a filter's fault" in capsys.readouterr().err


async def test_a_call_is_made_when_the_loop_is_idle_in_turn_with_the_lines(
    lines: tuple[logging.Logger, Lines],
) -> None:
    logger, written = lines
    _idle.log_when_idle(logger, logging.INFO, "before")
    _idle.call_when_idle(lambda: written.records.append(logging.makeLogRecord({"msg": "call"})))
    _idle.log_when_idle(logger, logging.INFO, "after")
    for _ in range(3):  # busy: other tasks run, the loop is never idle
        await trio.lowlevel.checkpoint()
    assert written.messages == []
    await trio.sleep(0.01)
    assert written.messages == ["before", "call", "after"]


def test_calls_left_are_made_as_the_run_ends_and_at_once_outside_trio() -> None:
    made: list[str] = []

    async def note_and_return() -> None:
        _idle.call_when_idle(lambda: made.append("in the run"))

    trio.run(note_and_return)  # no idle moment before it ends
    assert made == ["in the run"]
    _idle.call_when_idle(lambda: made.append("outside"))
    assert made == ["in the run", "outside"]


def test_a_failing_call_is_reported_not_raised(capsys: pytest.CaptureFixture[str]) -> None:
    made: list[str] = []

    def fails() -> None:
        raise RuntimeError("a call's fault")

    async def note() -> None:
        _idle.call_when_idle(fails)
        _idle.call_when_idle(lambda: made.append("next"))
        await trio.sleep(0.01)

    trio.run(note)
    assert made == ["next"]
    assert "a call's fault" in capsys.readouterr().err


@pytest.fixture
def collections() -> Iterator[list[int]]:
    """The generations collected while the test runs, with CPython's own threshold
    out of the way (as ``sessiongate serve``'s backstop is, for these few objects)."""
    seen: list[int] = []

    def note(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            seen.append(info["generation"])

    saved = gc.get_threshold()
    gc.collect()
    gc.set_threshold(10**8, *saved[1:])
    gc.callbacks.append(note)
    try:
        yield seen
    finally:
        gc.callbacks.remove(note)
        gc.set_threshold(*saved)


def make_cycles(count: int) -> None:
    for _ in range(count):
        a: list[Any] = []
        a.append(a)


async def test_garbage_is_collected_when_the_loop_is_idle(collections: list[int]) -> None:
    _idle.collect_garbage_when_idle(1000)
    make_cycles(2000)
    for _ in range(3):  # busy
        await trio.lowlevel.checkpoint()
    assert collections == []
    assert gc.get_count()[0] >= 2000
    await trio.sleep(0.05)
    assert collections == [0]  # a young collection, at the idle moment
    assert gc.get_count()[0] < 1000


async def test_a_collection_waits_for_an_idle_moment_long_enough(
    collections: list[int],
) -> None:
    _idle.collect_garbage_when_idle(1000)
    work = _idle._IDLE_WORK.get()
    work.gc_pauses = [0.2, 0.2, 0.2]  # as if each generation took 200 ms
    make_cycles(2000)
    await trio.sleep(0.05)  # idle, but a deadline 50 ms away
    assert collections == []
    await trio.sleep(1)  # idle for a second: time enough
    assert collections == [0]
    assert work.gc_pauses[0] < 0.2  # the collection's own time, measured


async def test_older_generations_in_turn_as_cpython_would(collections: list[int]) -> None:
    _idle.collect_garbage_when_idle(100)
    for _ in range(gc.get_threshold()[1] + 1):
        make_cycles(200)
        await trio.sleep(0.05)
    assert collections[: gc.get_threshold()[1]] == [0] * gc.get_threshold()[1]
    assert collections[gc.get_threshold()[1]] == 1


def test_collections_are_left_to_cpython_unless_asked(collections: list[int]) -> None:
    async def idle_with_garbage() -> None:
        _idle.log_when_idle(logging.getLogger("test.sessiongate.idle"), logging.INFO, "x")
        make_cycles(2000)
        await trio.sleep(0.05)

    trio.run(idle_with_garbage)
    assert collections == []


async def test_serve_collects_garbage_when_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    """``sessiongate serve`` hands young collections to the idle loop (its GC settings
    raise CPython's own threshold to a backstop)."""
    from sessiongate import cli
    from sessiongate.config import Settings

    async with trio.open_nursery() as nursery:
        binds = await nursery.start(cli.serve, Settings(bind="127.0.0.1:0"))
        assert binds
        assert _idle._IDLE_WORK.get().gc_young == cli.GC_IDLE_YOUNG
        nursery.cancel_scope.cancel()
    assert cli.GC_THRESHOLDS[0] > cli.GC_IDLE_YOUNG


async def test_a_line_logged_at_once_comes_after_the_lines_waiting(
    lines: tuple[logging.Logger, Lines],
) -> None:
    """The log keeps the order of events: an error logged at once by a logger with
    lines waiting is written after them (it came before sessions that had ended
    earlier: an outside review)."""
    logger, written = lines
    _idle.log_when_idle(logger, logging.INFO, "ended first")
    _idle.log_when_idle(logger, logging.INFO, "ended second")
    logger.error("failed third")
    assert written.messages == ["ended first", "ended second", "failed third"]
    assert [r.created for r in written.records] == sorted(r.created for r in written.records)


async def test_under_a_mock_clock_lines_are_written_when_the_loop_is_idle(
    autojump_clock: Any, lines: tuple[logging.Logger, Lines]
) -> None:
    logger, written = lines
    _idle.log_when_idle(logger, logging.INFO, "answered")
    await trio.lowlevel.checkpoint()
    assert written.messages == []  # busy
    await trio.sleep(1)  # idle: the clock jumps
    assert written.messages == ["answered"]


async def test_a_loop_never_idle_writes_a_slice_per_pass(
    lines: tuple[logging.Logger, Lines], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past a bound on a busy loop, lines go a slice per pass (a thousand lines at once
    held a pass's answers ~20 ms)."""
    logger, written = lines
    monkeypatch.setattr(_idle, "MAX_LINES", 10)
    monkeypatch.setattr(_idle, "FORCED_SLICE", 4)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(always_runnable)
        for n in range(14):
            _idle.log_when_idle(logger, logging.INFO, "count %d", n)
        await trio.lowlevel.checkpoint()
        assert len(written.messages) == 4  # 10 left: still at the bound
        await trio.lowlevel.checkpoint()
        assert len(written.messages) == 8
        await trio.lowlevel.checkpoint()
        assert len(written.messages) == 8  # 6 left: under it, they wait (or for 1 s)
        nursery.cancel_scope.cancel()


async def test_an_older_generation_due_is_not_replaced_by_a_younger_one(
    collections: list[int],
) -> None:
    """When the generation due does not fit before the next deadline, nothing is
    collected: a young collection instead reset the young count each time, so the
    older generations were never collected, here or by CPython's backstop (an outside
    review: uncollected garbage grew without bound under a timer every 8 ms)."""
    _idle.collect_garbage_when_idle(100)
    work = _idle._IDLE_WORK.get()
    work.gc_pauses = [0.0001, 10.0, 10.0]  # generation 1 never fits
    for _ in range(gc.get_threshold()[1]):
        gc.collect(0)  # as many young collections as make generation 1 due
    collections.clear()
    make_cycles(200)
    await trio.sleep(0.05)
    assert collections == []
    assert gc.get_count()[0] >= 200  # left for a longer idle moment, or the backstop
