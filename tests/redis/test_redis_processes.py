"""Failure tests with real processes: a holder killed or paused, a waiter killed.

The other party is ``holder_proc.py`` run as a subprocess on the same gate. Every test
is bounded with ``trio.fail_after``; TTLs are 1 s to keep the suite fast.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import trio

import sessiongate
from sessiongate.backends.redis import open_redis_backend

from .conftest import RedisServer
from .test_redis_backend import wait_until, zcard

HELPER = Path(__file__).with_name("holder_proc.py")


@attrs.frozen
class Line:
    event: str
    at: float  # unix time
    detail: str


@attrs.define
class Helper:
    process: trio.Process
    lines: list[Line] = attrs.field(factory=list)
    _buffer: bytes = b""

    async def expect(self, event: str) -> Line:
        """Read until a line with ``event`` (earlier lines are kept in ``lines``)."""
        assert self.process.stdout is not None
        while True:
            for line in self.lines:
                if line.event == event and not getattr(line, "_seen", False):
                    return line
            while b"\n" not in self._buffer:
                chunk = await self.process.stdout.receive_some()
                if not chunk:
                    raise AssertionError(f"helper ended before {event!r}: {self.lines}")
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\n", 1)
            parts = raw.decode().split(" ", 2)
            self.lines.append(Line(parts[0], float(parts[1]), parts[2] if len(parts) > 2 else ""))

    def count(self, event: str) -> int:
        return sum(1 for line in self.lines if line.event == event)

    def signal(self, signum: int) -> None:
        self.process.send_signal(signum)


@asynccontextmanager
async def helper(url: str, gate: str, *args: str) -> AsyncIterator[Helper]:
    process = await trio.lowlevel.open_process(
        [sys.executable, str(HELPER), url, gate, *args],
        stdout=subprocess.PIPE,
    )
    try:
        yield Helper(process)
    finally:
        process.send_signal(signal.SIGCONT)
        process.kill()
        with trio.move_on_after(5, shield=True):
            await process.wait()


async def sample_cap(server: RedisServer, key: str, cap: int, seen: list[int]) -> None:
    """Check the holders set in Redis never exceeds the cap (sampled every 10 ms)."""
    while True:
        n = await trio.to_thread.run_sync(zcard, server, key)
        seen.append(n)
        assert n <= cap, f"{n} holders for capacity {cap}"
        await trio.sleep(0.01)


async def test_killed_holder_process_slots_come_back(
    redis_server: RedisServer, gate_name: str
) -> None:
    ttl = 1.0
    with trio.fail_after(20):
        async with helper(
            redis_server.url, gate_name, "--capacity", "2", "--ttl", str(ttl), "--hold", "2"
        ) as other:
            await other.expect("admitted")
            await other.expect("admitted")
            async with open_redis_backend(
                redis_server.url, gate_name=gate_name, capacity=2, lease_ttl=ttl
            ) as backend:
                gate = sessiongate.Gate(2, max_wait=10, backend=backend)
                admitted: list[float] = []
                done = trio.Event()

                async def waiter() -> None:
                    async with gate.session():
                        admitted.append(time.time())
                        await done.wait()

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(waiter)
                    nursery.start_soon(waiter)
                    await wait_until(lambda: gate.queued == 2)
                    killed_at = time.time()
                    other.signal(signal.SIGKILL)
                    await wait_until(lambda: len(admitted) == 2)
                    # Back within the TTL of the last renewal (+ the reaper's slack).
                    assert max(admitted) - killed_at < ttl + 0.3
                    assert backend.active == 2
                    done.set()


async def test_killed_waiter_process_leaves_the_queue(
    redis_server: RedisServer, gate_name: str
) -> None:
    ttl = 1.0
    with trio.fail_after(20):
        async with open_redis_backend(
            redis_server.url, gate_name=gate_name, capacity=1, lease_ttl=ttl
        ) as backend:
            gate = sessiongate.Gate(1, max_wait=10, backend=backend)
            release = trio.Event()
            order: list[str] = []

            async def session(name: str) -> None:
                async with gate.session():
                    order.append(name)
                    await release.wait()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(session, "holder")
                await wait_until(lambda: gate.active == 1)
                async with helper(redis_server.url, gate_name, "--ttl", str(ttl)) as other:
                    await other.expect("queued")
                    await wait_until(lambda: gate.queued == 1)
                    nursery.start_soon(session, "behind")
                    await wait_until(lambda: gate.queued == 2)
                    killed_at = time.time()
                    other.signal(signal.SIGKILL)
                    release.set()
                    await wait_until(lambda: order == ["holder", "behind"])
                    # The dead head lapsed within its TTL; the queue moved on.
                    assert time.time() - killed_at < ttl + 0.3
                    assert gate.queued == 0


async def test_paused_holder_cancels_its_own_session(
    redis_server: RedisServer, gate_name: str
) -> None:
    ttl = 1.0
    holders_key = f"sg:{{{gate_name}}}:holders"
    seen: list[int] = []
    with trio.fail_after(20):
        async with (
            helper(redis_server.url, gate_name, "--ttl", str(ttl)) as other,
            open_redis_backend(
                redis_server.url, gate_name=gate_name, capacity=1, lease_ttl=ttl
            ) as backend,
            trio.open_nursery() as nursery,
        ):
            first = await other.expect("admitted")
            nursery.start_soon(sample_cap, redis_server, holders_key, 1, seen)
            gate = sessiongate.Gate(1, max_wait=10, backend=backend)
            admitted = trio.Event()
            release = trio.Event()
            ours: list[int] = []

            async def session() -> None:
                async with gate.session() as ticket:
                    assert ticket.fencing_token is not None
                    ours.append(ticket.fencing_token)
                    admitted.set()
                    await release.wait()

            nursery.start_soon(session)
            await wait_until(lambda: gate.queued == 1)
            stopped_at = time.time()
            other.signal(signal.SIGSTOP)
            await admitted.wait()
            assert time.time() - stopped_at < ttl + 0.3
            # The fencing token only grows: a store can refuse the paused writer.
            assert ours[0] > int(first.detail)
            await trio.sleep(0.5)  # keep it paused well past its TTL
            resumed_at = time.time()
            other.signal(signal.SIGCONT)
            lost = await other.expect("lease_lost")
            assert lost.at - resumed_at < 0.2
            # It learned locally: no renewal was sent between resuming and giving up.
            renewals = [
                line
                for line in other.lines
                if line.event == "call" and line.detail == "renew" and line.at >= resumed_at
            ]
            assert all(line.at > lost.at for line in renewals)
            assert backend.active == 1  # ours, untouched by its release
            release.set()
            nursery.cancel_scope.cancel()
    assert max(seen) <= 1


async def test_paused_waiter_does_not_block_the_head(
    redis_server: RedisServer, gate_name: str
) -> None:
    ttl = 1.0
    with trio.fail_after(20):
        async with open_redis_backend(
            redis_server.url, gate_name=gate_name, capacity=1, lease_ttl=ttl
        ) as backend:
            gate = sessiongate.Gate(1, max_wait=15, backend=backend)
            release = trio.Event()
            order: list[str] = []

            async def session(name: str, until: trio.Event | None) -> None:
                async with gate.session():
                    order.append(name)
                    if until is not None:
                        await until.wait()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(session, "holder", release)
                await wait_until(lambda: gate.active == 1)
                async with helper(redis_server.url, gate_name, "--ttl", str(ttl)) as other:
                    await other.expect("queued")  # the head of the queue
                    nursery.start_soon(session, "behind", None)
                    await wait_until(lambda: gate.queued == 2)
                    other.signal(signal.SIGSTOP)
                    await trio.sleep(ttl + 0.3)  # its queue lease lapses
                    await wait_until(lambda: gate.queued == 1)
                    release.set()
                    await wait_until(lambda: order == ["holder", "behind"])
                    # Resumed, it takes its place again (at its own arrival number) and
                    # is admitted next.
                    other.signal(signal.SIGCONT)
                    await other.expect("admitted")
