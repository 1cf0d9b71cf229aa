"""The Redis backend's per-process structures, without Redis."""

from __future__ import annotations

import trio

from sessiongate.backends._redis_state import ClockBound, Figures, QueueMirror


def message(ver: int, *lines: str) -> Figures:
    return Figures.from_message("\n".join([f"V {ver} 1 {len(lines)} 2 -1 1000", *lines]))


async def test_mirror_follows_changes_in_order_and_detects_a_gap() -> None:
    mirror = QueueMirror()
    assert mirror.apply(message(5, "E 10 a:1"))  # not built yet: ignored
    mirror.reset([("a:1", 10), ("b:1", 20)], ver=5)
    assert mirror.apply(message(5, "E 10 a:1"))  # already in the snapshot
    assert mirror.apply(message(6, "E 30 a:2"))
    assert [mirror.rank(s) for s in (10, 20, 30)] == [1, 2, 3]
    assert mirror.apply(message(7, "G a:1 99 5000", "D b:1"))
    assert mirror.rank(30) == 1
    assert mirror.rank(25) == 1  # a waiter not yet mirrored: everyone before it, + 1
    assert not mirror.apply(message(9, "E 40 c:1"))  # 8 was missed
    assert not mirror.ok


async def test_clock_bound_brackets_redis_instants() -> None:
    clock = ClockBound()
    assert clock.earliest(1000) is None
    now = trio.current_time()
    # Redis read 50.000 s somewhere between now and now + 0.002 (local).
    clock.sample(50_000, now, now + 0.002)
    earliest = clock.earliest(51_000)
    latest = clock.latest(51_000)
    assert earliest is not None and latest is not None
    # One Redis second later falls within the round trip's width of now + 1 s.
    assert abs(earliest - (now + 1)) < 1e-9
    assert abs(latest - (now + 1.002)) < 1e-9
    # A tighter sample narrows the bracket.
    clock.sample(50_010, now + 0.0095, now + 0.0105)
    earliest, latest = clock.earliest(51_000), clock.latest(51_000)
    assert earliest is not None and latest is not None
    assert latest - earliest < 0.0011


async def test_mirror_counts_every_hand_off_of_the_global_queue() -> None:
    """Every process counts every published hand-off (its own and others'), so each
    estimates from the whole queue's pace (an outside review: with two workers each
    counted its own share and estimated waits 1.5x and 2.6x too long)."""
    mirror = QueueMirror()
    mirror.reset([("a:1", 10)], ver=1)
    assert mirror.apply(message(2, "E 20 b:1", "E 30 c:1"))
    await trio.sleep(0.01)
    assert mirror.apply(message(3, "G a:1 1 5000"))  # another process's hand-off
    assert mirror.apply(message(4, "D b:1"))  # left without a slot: not a hand-off
    await trio.sleep(0.01)
    assert mirror.apply(message(5, "G c:1 2 5000"))
    # Entered and granted in one change: through a free slot, never waited.
    assert mirror.apply(message(6, "E 40 d:1", "G d:1 3 5000"))
    # Two hand-offs, 10 ms apart (a:1 waited since the snapshot, 10 ms before).
    assert len(mirror.handoffs._handoffs) == 2
    rate = mirror.handoffs.per_second(trio.current_time())
    assert rate is not None and 50 < rate < 110


async def test_clock_bound_maps_local_times_onto_redis_microseconds() -> None:
    clock = ClockBound()
    assert clock.redis_us(trio.current_time()) is None  # nothing measured yet
    now = trio.current_time()
    # TIME read 50.000 s (whole ms) somewhere in [now, now + 0.002].
    clock.sample(50_000, now, now + 0.002)
    mapped = clock.redis_us(now + 0.010)
    assert mapped is not None
    # The middle of the bracket, plus half of TIME's truncated millisecond.
    assert mapped == round((50.000 + 0.010 - 0.001 + 0.0005) * 1e6)


async def test_arrivals_keep_their_order_as_the_clock_estimate_moves() -> None:
    """A narrower sample moves the offset's estimate back: a later arrival must still
    map after an earlier one already sent (a new process's first burst queued its own
    later arrivals ahead, an outside review)."""
    clock = ClockBound()
    now = trio.current_time()
    clock.sample(50_000, now, now + 0.004)  # a wide first sample (the connect)
    first = clock.arrival_us(now + 0.0100)
    clock.sample(49_998, now + 0.0012, now + 0.0013)  # narrower, and earlier
    plain = clock.redis_us(now + 0.0101)
    later = clock.arrival_us(now + 0.0101)
    assert first is not None and plain is not None and later is not None
    assert plain < first  # the estimate alone would put it ahead
    assert later == first + 1
    # An older arrival sent late maps as it is and moves no mark.
    older = clock.arrival_us(now + 0.005)
    assert older == clock.redis_us(now + 0.005)
    assert clock.arrival_us(now + 0.0102) == later + 1
    # Once the estimate has passed the mark, arrivals map as they are.
    far = clock.arrival_us(now + 0.020)
    assert far == clock.redis_us(now + 0.020)


async def test_an_entry_noted_from_its_answer_is_not_put_back_after_it_left() -> None:
    # A process's own entry is mirrored from its enqueue answer too; read late (after its
    # place lapsed and the reaper's D was taken in) it must not come back, and an entry
    # enqueued again at a new seq moves (an outside review: a stale seq stayed for the
    # whole wait, and a waiter at the head was told position 2).
    mirror = QueueMirror()
    mirror.reset([("other:1", 10)], ver=1)
    assert mirror.apply(message(2, "E 20 me:1"))
    assert mirror.apply(message(3, "D me:1"))  # its place lapsed
    mirror.note_entered("me:1", 20)  # the enqueue's answer, read late
    assert mirror.rank(30) == 2  # only other:1 ahead
    assert mirror.apply(message(4, "E 25 me:1"))  # enqueued again, a new seq
    mirror.note_entered("me:1", 25)
    assert (mirror.rank(10), mirror.rank(25), mirror.rank(30)) == (1, 2, 3)
    assert mirror.apply(message(5, "E 5 me:1"))  # moved again by a published change
    assert (mirror.rank(5), mirror.rank(10), mirror.rank(30)) == (1, 2, 3)
