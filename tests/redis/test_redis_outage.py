"""Redis itself fails: killed, restarted empty. Fail fast, recover, never over the cap."""

from __future__ import annotations

import logging
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

import sessiongate
from sessiongate.backends.redis import (
    RELEASE_WAIT,
    RedisBackend,
    RedisRefused,
    check_redis,
    open_redis_backend,
)
from sessiongate.cli import QUIET_LOGGERS, quiet_library_loggers

from .conftest import RedisServer, _binary, _free_port
from .test_redis_backend import CapWatch, wait_until, zcard


async def sample_holders(server: RedisServer, key: str, cap: int) -> None:
    """Fail if Redis ever shows more holders than the cap (sampled every 10 ms)."""
    while True:
        try:
            n = await trio.to_thread.run_sync(zcard, server, key)
        except OSError:
            n = 0  # Redis is down: nobody holds anything
        assert n <= cap, f"{n} holders for capacity {cap}"
        await trio.sleep(0.01)


@asynccontextmanager
async def redis_gate(
    server: RedisServer, gate_name: str, *, capacity: int, lease_ttl: float, max_wait: float
) -> AsyncIterator[tuple[RedisBackend, sessiongate.Gate]]:
    """A backend on ``server`` and a gate on it, once Redis answers: the tests' setup."""
    async with open_redis_backend(
        server.url, gate_name=gate_name, capacity=capacity, lease_ttl=lease_ttl
    ) as backend:
        await wait_until(lambda: backend.healthy)
        yield backend, sessiongate.Gate(capacity, max_wait=max_wait, backend=backend)


async def expect_lease_lost(session: Callable[[], Awaitable[None]], ttl: float) -> None:
    start = trio.current_time()
    with pytest.raises(sessiongate.LeaseLost):
        await session()
    # Cancelled before the lease could lapse (the last renewal was at most ttl/3 ago).
    assert trio.current_time() - start < ttl


async def test_redis_down_fails_fast_then_recovers(own_redis: RedisServer, gate_name: str) -> None:
    ttl = 1.0
    watch = CapWatch()
    with trio.fail_after(20):
        async with redis_gate(own_redis, gate_name, capacity=1, lease_ttl=ttl, max_wait=10) as (
            backend,
            gate,
        ):

            async def running() -> None:
                async with gate.session():
                    watch.enter("running")
                    await trio.sleep_forever()

            # A session holds the slot when Redis dies: it cannot renew, so it is
            # cancelled before its lease could have lapsed.
            async with trio.open_nursery() as nursery:
                nursery.start_soon(expect_lease_lost, running, ttl)
                await wait_until(lambda: len(watch.order) == 1)
                own_redis.kill()
            watch.leave()
            await wait_until(lambda: not backend.healthy)
            for _ in range(3):
                start = trio.current_time()
                with pytest.raises(sessiongate.BackendUnavailable):
                    async with gate.session():
                        raise AssertionError("admitted without Redis")
                assert trio.current_time() - start < 1.0
            assert gate.stats().rejected == 3
            own_redis.start()
            await wait_until(lambda: backend.healthy)

            async def session(n: int) -> None:
                async with gate.session():
                    watch.enter(f"s{n}")
                    await trio.sleep(0.05)
                    watch.leave()

            async with trio.open_nursery() as nursery:
                for n in range(5):
                    nursery.start_soon(session, n)
            assert len(watch.order) == 6
            assert watch.most == 1


async def test_a_body_that_outlived_its_lease_unaware_fails_with_lease_lost(
    own_redis: RedisServer, gate_name: str
) -> None:
    """A body busy where the lease's cancellation cannot reach it (shielded here; a
    thread or a CPU stretch alike) that returns normally after the lease was lost has
    run on a slot another process may hold by then: LeaseLost, counted failed, never
    completed (an outside review: "1 completed, 0 failed")."""
    ttl = 1.0
    with trio.fail_after(20):
        async with redis_gate(own_redis, gate_name, capacity=1, lease_ttl=ttl, max_wait=10) as (
            backend,
            gate,
        ):

            async def unaware() -> None:
                async with gate.session():
                    own_redis.kill()
                    with trio.CancelScope(shield=True):
                        await trio.sleep(ttl * 1.5)  # the lease is lost meanwhile

            with pytest.raises(sessiongate.LeaseLost):
                await unaware()
            # Busy without a checkpoint at all (a CPU stretch, a blocking call): Trio
            # never cancelled the body's scope, and it counted as completed.
            own_redis.start()
            await wait_until(lambda: backend.healthy)
            with pytest.raises(sessiongate.LeaseLost):
                async with gate.session():
                    time.sleep(ttl * 1.2)  # noqa: ASYNC251 - the point of the test
            stats = gate.stats()
            assert (stats.completed, stats.failed, gate.local_active) == (0, 2, 0)


async def test_a_slot_on_its_way_back_is_no_longer_counted_locally(
    own_redis: RedisServer, gate_name: str
) -> None:
    """While a session's release is on its way to Redis, Redis may have handed the slot
    to another process already: counted by both, two servers' ``local_active`` added up
    to more than the cap (an outside test). It is not counted; a drain still waits."""
    with trio.fail_after(20):
        async with redis_gate(own_redis, gate_name, capacity=1, lease_ttl=5.0, max_wait=5) as (
            _backend,
            gate,
        ):
            entered, proceed, left = trio.Event(), trio.Event(), trio.Event()

            async def session() -> None:
                async with gate.session():
                    entered.set()
                    await proceed.wait()
                    own_redis.pause()  # the release will wait for Redis
                left.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(session)
                await entered.wait()
                assert gate.local_active == 1
                proceed.set()
                await wait_until(lambda: gate.local_active == 0 or left.is_set())
                assert not left.is_set()  # its release is still on its way
                with trio.move_on_after(0.05):
                    await gate.aclose()  # waits for the release, not for local_active
                assert not left.is_set()
                own_redis.resume()
            await gate.aclose()


async def test_an_idle_process_sees_a_stalled_redis_within_about_a_second(
    own_redis: RedisServer, gate_name: str
) -> None:
    """With no traffic, ``healthy`` (``/readyz``) turned false up to 2.2 s into a Redis
    stall, while arrivals were refused from 0.46 s (an outside review)."""
    with trio.fail_after(30):
        async with open_redis_backend(
            own_redis.url, gate_name=gate_name, capacity=1, lease_ttl=5.0
        ) as backend:
            for _ in range(3):
                await wait_until(lambda: backend.healthy)
                await trio.sleep(0.3)
                own_redis.pause()
                start = trio.current_time()
                try:
                    await wait_until(lambda: not backend.healthy)
                    assert trio.current_time() - start < 1.3
                finally:
                    own_redis.resume()


async def test_redis_restarted_empty_rebuilds_from_live_holders(
    own_redis: RedisServer, gate_name: str
) -> None:
    ttl = 2.0
    with trio.fail_after(20):
        async with (
            open_redis_backend(
                own_redis.url, gate_name=gate_name, capacity=1, lease_ttl=ttl
            ) as one,
            open_redis_backend(
                own_redis.url, gate_name=gate_name, capacity=1, lease_ttl=ttl
            ) as two,
        ):
            holder = sessiongate.Gate(1, max_wait=30, backend=one)
            newcomer = sessiongate.Gate(1, max_wait=30, backend=two)
            held = trio.Event()
            release = trio.Event()
            admitted_at: list[float] = []

            async def hold() -> None:
                async with holder.session():
                    held.set()
                    await release.wait()

            async def arrive() -> None:
                async with newcomer.session():
                    admitted_at.append(trio.current_time())

            async with trio.open_nursery() as nursery:
                nursery.start_soon(hold)
                await held.wait()
                await wait_until(lambda: two.active == 1)
                own_redis.kill()
                own_redis.start()  # empty: no gate, no holders, no queue
                nursery.start_soon(sample_holders, own_redis, f"sg:{{{gate_name}}}:holders", 1)
                # A newcomer arrives at the empty Redis: it must not get the slot the
                # live holder still uses.
                await wait_until(lambda: two.healthy)
                nursery.start_soon(arrive)
                # Two TTLs: the holder re-registered by renewing, and kept its slot.
                await trio.sleep(2 * ttl)
                assert not admitted_at
                assert one.active == 1
                release.set()
                await wait_until(lambda: bool(admitted_at))
                nursery.cancel_scope.cancel()


async def test_starting_while_redis_is_down(own_redis: RedisServer, gate_name: str) -> None:
    own_redis.kill()
    with trio.fail_after(15):
        async with open_redis_backend(
            own_redis.url, gate_name=gate_name, capacity=3, lease_ttl=1.0
        ) as backend:
            gate = sessiongate.Gate(3, max_wait=10, backend=backend)
            assert not backend.healthy
            start = trio.current_time()
            with pytest.raises(sessiongate.BackendUnavailable):
                async with gate.session():
                    raise AssertionError("admitted without Redis")
            assert trio.current_time() - start < 1.0
            with trio.move_on_after(0.3):
                await backend.wait_healthy()  # Redis is still down: it must not return
                raise AssertionError("wait_healthy() returned while Redis was down")
            own_redis.start()
            await backend.wait_healthy()  # woken by the recovery, no polling
            assert backend.healthy
            async with gate.session() as ticket:
                assert ticket.fencing_token is not None
                assert backend.capacity == 3


async def test_through_redis_sentinel(
    own_redis: RedisServer, gate_name: str, tmp_path: Path
) -> None:
    """open_redis_backend(client=...) with a client from coredis's Sentinel."""
    import coredis
    from coredis.connection import TCPLocation

    port = _free_port()
    config = tmp_path / "sentinel.conf"
    config.write_text(
        f"port {port}\nbind 127.0.0.1\n"
        f"sentinel monitor primary 127.0.0.1 {own_redis.port} 1\n"
        "sentinel down-after-milliseconds primary 1000\n"
    )
    sentinel_process = await trio.lowlevel.open_process(
        [own_redis.binary, str(config), "--sentinel", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with trio.fail_after(15):
            while True:  # until the sentinel listens
                try:
                    await (await trio.open_tcp_stream("127.0.0.1", port)).aclose()
                    break
                except OSError:
                    await trio.sleep(0.05)
            sentinel = coredis.Sentinel([TCPLocation("127.0.0.1", port)], decode_responses=True)
            async with (
                sentinel,
                open_redis_backend(
                    None,
                    client=sentinel.primary_for("primary", connect_timeout=0.2),
                    gate_name=gate_name,
                    capacity=1,
                    lease_ttl=1.0,
                ) as backend,
            ):
                await wait_until(lambda: backend.healthy)
                gate = sessiongate.Gate(1, max_wait=5, backend=backend)
                async with gate.session() as ticket:
                    assert ticket.fencing_token is not None
                    await trio.sleep(1.5)  # renewed through the Sentinel's primary
                assert backend.active == 0
    finally:
        sentinel_process.kill()
        with trio.move_on_after(5, shield=True):
            await sentinel_process.wait()


async def test_stalled_redis_leaves_no_ghost_in_the_queue(
    own_redis: RedisServer, gate_name: str
) -> None:
    """An enqueue that times out may still run when Redis wakes: it must not leave a
    place that nobody waits for at the head of the queue (for a whole TTL)."""
    ttl = 5.0
    queue_key = f"sg:{{{gate_name}}}:queue"
    with trio.fail_after(20):
        async with open_redis_backend(
            own_redis.url, gate_name=gate_name, capacity=1, lease_ttl=ttl
        ) as backend:
            gate = sessiongate.Gate(1, max_wait=10, backend=backend)
            release = trio.Event()

            async def hold() -> None:
                async with gate.session():
                    await release.wait()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(hold)
                await wait_until(lambda: gate.active == 1)
                own_redis.pause()
                start = trio.current_time()
                with pytest.raises(sessiongate.BackendUnavailable):
                    async with gate.session():
                        raise AssertionError("admitted by a stalled Redis")
                assert trio.current_time() - start < 1.0
                own_redis.resume()
                resumed = trio.current_time()
                await wait_until(lambda: backend.healthy)
                # The late enqueue ran and was undone, or was refused: no ghost.
                await wait_until(lambda: zcard(own_redis, queue_key) == 0)
                assert trio.current_time() - resumed < 2.0
                release.set()
            # The slot is free for the next arrival at once.
            with trio.fail_after(1):
                async with gate.session() as ticket:
                    assert ticket.waited < 0.5


async def test_a_short_max_wait_with_redis_stalled_is_refused_not_expired(
    own_redis: RedisServer, gate_name: str
) -> None:
    """An arrival whose max_wait (0.3 s) runs out before a Redis known to be unreachable
    ever answered was never queued: backend_unavailable, not queue_timeout (an outside
    review counted every such arrival expired)."""
    with trio.fail_after(20):
        async with redis_gate(own_redis, gate_name, capacity=2, lease_ttl=5.0, max_wait=10) as (
            backend,
            gate,
        ):
            own_redis.pause()
            try:
                with pytest.raises(sessiongate.BackendUnavailable):
                    async with gate.session():
                        raise AssertionError("admitted by a stalled Redis")
                assert not backend.healthy
                gate.max_wait = 0.3
                for _ in range(3):
                    start = trio.current_time()
                    with pytest.raises(sessiongate.BackendUnavailable):
                        async with gate.session():
                            raise AssertionError("admitted by a stalled Redis")
                    assert trio.current_time() - start < 0.35
            finally:
                own_redis.resume()
            stats = gate.stats()
            assert (stats.rejected, stats.expired) == (4, 0)


async def test_a_stalled_redis_refuses_within_1_s_of_the_arrival_stamp(
    own_redis: RedisServer, gate_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis stalls (SIGSTOP): an arrival is refused ``ANSWER_BY`` after its stamp, even
    when its session reaches the backend late (behind a burst's other requests) while
    another batch's call is in flight. It waited up to 0.9 s from reaching the backend,
    and an outside review saw a burst's refusals take up to 1.32 s."""
    caplog.set_level(logging.INFO, logger="sessiongate.redis")
    with trio.fail_after(20):
        async with redis_gate(own_redis, gate_name, capacity=1, lease_ttl=5.0, max_wait=10) as (
            backend,
            gate,
        ):
            own_redis.pause()
            refused_after: dict[str, float] = {}

            async def arrive(name: str, ticket: sessiongate.Ticket) -> None:
                with pytest.raises(sessiongate.BackendUnavailable):
                    async with gate.session(arrival=ticket):
                        raise AssertionError("admitted by a stalled Redis")
                refused_after[name] = trio.current_time() - ticket.arrived_at

            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(arrive, "first", gate.arrive())
                    await trio.sleep(0.2)  # its enqueue is in flight
                    late = gate.arrive(at=trio.current_time() - 0.3)  # stamped 0.3 s ago
                    nursery.start_soon(arrive, "late", late)
            finally:
                own_redis.resume()
            assert refused_after["first"] < 0.8
            assert 0.7 <= refused_after["late"] < 0.85
            assert gate.stats().rejected == 2
            await wait_until(lambda: backend.healthy)
    # The outage is told from when the unanswered call went out (it said 0.0 s).
    (back,) = [r.getMessage() for r in caplog.records if "reachable again" in r.getMessage()]
    seconds = float(back.rsplit("for ", 1)[1].split(" s)")[0])
    assert seconds >= 0.5, back


async def test_a_server_started_while_redis_stalls_warns_of_the_stored_capacity_later(
    own_redis: RedisServer, gate_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The stored capacity wins over a later server's own, and the later server says so
    once it reaches Redis: also when Redis was unreachable as it started (an outside
    review: no warning at all then)."""
    with trio.fail_after(20):
        async with open_redis_backend(
            own_redis.url, gate_name=gate_name, capacity=2, lease_ttl=5.0
        ) as first:
            await wait_until(lambda: first.healthy)
            own_redis.pause()
            try:
                async with open_redis_backend(
                    own_redis.url, gate_name=gate_name, capacity=7, lease_ttl=5.0
                ) as later:
                    assert not later.healthy
                    own_redis.resume()
                    await wait_until(lambda: later.healthy)
                    assert later.capacity == 2
            finally:
                own_redis.resume()
    warnings = [r.getMessage() for r in caplog.records if "already has capacity" in r.getMessage()]
    assert warnings == [f"gate {gate_name!r} already has capacity 2 in Redis; using it, not 7"]


async def test_a_resize_that_failed_at_start_is_not_the_capacity_warned_of(
    own_redis: RedisServer, gate_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Opened with capacity 4 while Redis is down, a resize to 6 is refused (unchanged);
    Redis starts, and this process makes the gate with 4. It then warned that the gate
    "already has capacity 4 in Redis; using it, not 6" (an outside review)."""
    with trio.fail_after(20):
        own_redis.stop()
        async with open_redis_backend(
            own_redis.url, gate_name=gate_name, capacity=4, lease_ttl=5.0
        ) as backend:
            with pytest.raises(sessiongate.BackendUnavailable):
                await backend.resize(6)
            # Two at once, both refused: the first to fail must not leave its own.
            refused: list[int] = []

            async def resize(capacity: int) -> None:
                try:
                    await backend.resize(capacity)
                except sessiongate.BackendUnavailable:
                    refused.append(capacity)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(resize, 7)
                nursery.start_soon(resize, 8)
            assert sorted(refused) == [7, 8]
            own_redis.start()
            await wait_until(lambda: backend.healthy)
            assert backend.capacity == 4
    messages = [r.getMessage() for r in caplog.records]
    # The outage's records hold coredis's failed connection (in their arguments): let
    # them go before _collect_coredis_garbage collects it.
    caplog.clear()
    assert not [m for m in messages if "already has capacity" in m]


async def test_an_arrival_stamped_long_ago_still_gets_one_call_of_time(
    own_redis: RedisServer, gate_name: str
) -> None:
    """A place taken long before it enters (``arrive()`` then slow work; a request whose
    body came slowly) still waits one call's whole timeout for Redis: Redis pausing
    0.3 s is not unreachable. With 0.15 s it was refused (an outside review)."""
    with trio.fail_after(20):
        async with redis_gate(own_redis, gate_name, capacity=1, lease_ttl=5.0, max_wait=10) as (
            _backend,
            gate,
        ):
            place = gate.arrive(at=trio.current_time() - 2.0)
            own_redis.pause()
            try:
                async with trio.open_nursery() as nursery:

                    async def resume_soon() -> None:
                        await trio.sleep(0.3)
                        own_redis.resume()

                    nursery.start_soon(resume_soon)
                    async with gate.session(arrival=place) as ticket:
                        assert ticket.admitted_at is not None
            finally:
                own_redis.resume()
            assert gate.stats().rejected == 0


def stored(server: RedisServer, key: str, field: str) -> str | None:
    """One field of a hash, as Redis holds it now (None if missing)."""
    reply = server.command("HGET", key, field)
    if reply.startswith(b"$-1"):
        return None
    return reply.split(b"\r\n")[1].decode()


@pytest.mark.parametrize("recreator", ["first", "second"])
async def test_a_lost_gate_comes_back_with_its_last_capacity(
    own_redis: RedisServer, gate_name: str, recreator: str
) -> None:
    """FLUSHALL after a resize: the gate is re-created with the resized capacity, not
    with the --capacity of whichever server touches it first."""
    meta = f"sg:{{{gate_name}}}:meta"
    with trio.fail_after(15):
        async with (
            open_redis_backend(
                own_redis.url, gate_name=gate_name, capacity=3, lease_ttl=1.0
            ) as first,
            open_redis_backend(
                own_redis.url, gate_name=gate_name, capacity=7, lease_ttl=1.0
            ) as second,
        ):
            assert (first.capacity, second.capacity) == (3, 3)  # the stored one wins
            await first.resize(5)
            await wait_until(lambda: second.capacity == 5)
            epoch = stored(own_redis, meta, "epoch")
            assert own_redis.command("FLUSHALL").startswith(b"+OK")
            assert stored(own_redis, meta, "cap") is None
            # One tick of the chosen backend re-creates the gate (the other's background
            # ticks may beat it to it: either way the capacity must be the resized one).
            backend = first if recreator == "first" else second
            await backend._call("release", [], limit=1.0)
            assert stored(own_redis, meta, "epoch") not in (None, epoch)
            assert stored(own_redis, meta, "cap") == "5"
            # Both learn the re-created gate from their next answers, and agree.
            await wait_until(lambda: first.capacity == second.capacity == 5)
            assert stored(own_redis, meta, "cap") == "5"


@pytest.fixture
def service_logging() -> Iterator[None]:
    """The library log levels ``sessiongate serve`` sets, undone after the test."""
    saved = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    saved_filters = list(logging.getLogger("coredis").filters)
    quiet_library_loggers()
    yield
    for name, level in saved.items():
        logging.getLogger(name).setLevel(level)
    logging.getLogger("coredis").filters[:] = saved_filters


@pytest.mark.usefixtures("service_logging")
async def test_an_outage_logs_its_two_transitions_not_every_retry(
    own_redis: RedisServer, gate_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    down_for = 2.0
    with trio.fail_after(20):
        async with open_redis_backend(
            own_redis.url, gate_name=gate_name, capacity=1, lease_ttl=1.0
        ) as backend:
            await backend.wait_healthy()
            caplog.clear()
            own_redis.kill()
            # The measurement is "what is logged over this much time": no event to wait on.
            await trio.sleep(down_for)
            assert not backend.healthy
            during = [(r.name, r.levelname, r.getMessage()) for r in caplog.records]
            # The backend's own line, and the listener's; coredis's retries (about 8 a
            # second at INFO) are not among them.
            assert len(during) <= 4, during
            unreachable = [m for _, _, m in during if m.startswith("Redis unreachable")]
            assert len(unreachable) == 1, during
            assert not [r for r in during if r[0].startswith("coredis")], during
            caplog.clear()
            own_redis.start()
            await backend.wait_healthy()
            messages = [r.getMessage() for r in caplog.records]
            recovered = [m for m in messages if m.startswith("Redis reachable again")]
            assert len(recovered) == 1, messages
            assert not [m for m in messages if m.startswith("Redis unreachable")], messages


async def test_a_stalled_redis_does_not_delay_an_expiry_or_a_cancellation(
    own_redis: RedisServer, gate_name: str
) -> None:
    """A queued session's deadline and its cancellation end it on time with Redis
    stalled (SIGSTOP): its queue place is forgotten in the background, not waited for
    (an outside review saw a 3 s deadline end after 4.002 s, a DELETE take 1.04 s)."""
    queue_key = f"sg:{{{gate_name}}}:queue"
    with trio.fail_after(20):
        async with open_redis_backend(
            own_redis.url, gate_name=gate_name, capacity=1, lease_ttl=5.0
        ) as backend:
            gate = sessiongate.Gate(1, max_wait=1.0, backend=backend)
            release = trio.Event()
            ended: dict[str, float] = {}

            async def hold() -> None:
                async with gate.session():
                    await release.wait()

            async def wait(name: str, scope: trio.CancelScope) -> None:
                with scope:
                    try:
                        async with gate.session():
                            raise AssertionError("admitted by a stalled Redis")
                    except sessiongate.QueueTimeout:
                        pass
                ended[name] = trio.current_time()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(hold)
                await wait_until(lambda: gate.active == 1)
                expiring, cancelled = trio.CancelScope(), trio.CancelScope()
                start = trio.current_time()
                nursery.start_soon(wait, "expiring", expiring)
                nursery.start_soon(wait, "cancelled", cancelled)
                await wait_until(lambda: gate.queued == 2)
                own_redis.pause()
                cancelled.cancel()
                cancelled_at = trio.current_time()
                await wait_until(lambda: len(ended) == 2)
                assert ended["cancelled"] - cancelled_at < 0.1
                assert ended["expiring"] - start < 1.0 + 0.1
                own_redis.resume()
                # Forgotten once Redis answers again: nothing left in the queue.
                await wait_until(lambda: zcard(own_redis, queue_key) == 0)
                release.set()


@pytest.mark.usefixtures("service_logging")
async def test_a_stalled_redis_logs_no_connection_tracebacks(
    own_redis: RedisServer, gate_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """coredis logs each connection attempt that a stalled Redis (SIGSTOP) times out
    at ERROR with a ~60-line traceback; the service keeps those out, and logs the
    outage once itself (outside review)."""
    caplog.set_level(logging.INFO)
    with trio.fail_after(20):
        async with open_redis_backend(
            own_redis.url, gate_name=gate_name, capacity=1, lease_ttl=1.0
        ) as backend:
            gate = sessiongate.Gate(max_wait=1, backend=backend)
            await backend.wait_healthy()
            caplog.clear()
            own_redis.pause()
            try:
                # Arrivals during the stall make the backend try fresh connections.
                await wait_until(lambda: not backend.healthy)
                for _ in range(3):
                    with pytest.raises(sessiongate.AdmissionError):
                        await gate.run(trio.sleep, 0)
                # The measurement is "what is logged over this much time".
                await trio.sleep(1.5)
            finally:
                own_redis.resume()
            records = [(r.name, r.levelname, r.getMessage()) for r in caplog.records]
            assert not [r for r in records if r[0].startswith("coredis")], records
            unreachable = [m for _, _, m in records if m.startswith("Redis unreachable")]
            assert len(unreachable) == 1, records


async def test_a_stalled_redis_does_not_delay_the_end_of_an_active_session(
    own_redis: RedisServer, gate_name: str
) -> None:
    """An active session cancelled with Redis stalled ends at once; its slot goes back
    once Redis answers (outside review: the end waited 1 s for the release)."""
    holders_key = f"sg:{{{gate_name}}}:holders"
    with trio.fail_after(20):
        async with open_redis_backend(
            own_redis.url, gate_name=gate_name, capacity=1, lease_ttl=5.0
        ) as backend:
            gate = sessiongate.Gate(max_wait=1.0, backend=backend)
            scope = trio.CancelScope()
            ended: list[float] = []

            async def hold() -> None:
                with scope:
                    async with gate.session():
                        await trio.sleep_forever()
                ended.append(trio.current_time())

            async with trio.open_nursery() as nursery:
                nursery.start_soon(hold)
                await wait_until(lambda: gate.active == 1)
                own_redis.pause()
                try:
                    cancelled_at = trio.current_time()
                    scope.cancel()
                    await wait_until(lambda: len(ended) == 1)
                    assert ended[0] - cancelled_at < RELEASE_WAIT + 0.1
                finally:
                    own_redis.resume()
                await wait_until(lambda: zcard(own_redis, holders_key) == 0)


def _commands(server: RedisServer, *commands: tuple[str, ...]) -> bytes:
    """Several commands on one connection (the first can authenticate the others)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=2) as sock:
        for args in commands:
            parts = [f"${len(a.encode())}\r\n{a}\r\n" for a in args]
            sock.sendall(f"*{len(args)}\r\n{''.join(parts)}".encode())
        time.sleep(0.1)
        return sock.recv(1 << 16)


async def test_a_redis_that_refuses_is_not_called_silent(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A Redis that wants a password (set while the backend runs, its connections then
    # dropped) answers at once, with an error: arrivals said "Redis did not answer in
    # time" (an outside review). They name the kind of refusal now, never its text; the
    # log has the rest.
    server = RedisServer(_binary(), tmp_path)
    server.start()
    try:
        with trio.fail_after(10):
            async with open_redis_backend(
                server.url, gate_name="refusing", capacity=1, lease_ttl=2.0
            ) as backend:
                await wait_until(lambda: backend.healthy)
                _commands(
                    server,
                    ("CONFIG", "SET", "requirepass", "s3cret"),
                    ("CLIENT", "KILL", "TYPE", "normal"),
                    ("CLIENT", "KILL", "TYPE", "pubsub"),
                )
                gate = sessiongate.Gate(max_wait=5, backend=backend)
                with pytest.raises(sessiongate.BackendUnavailable) as refused:
                    async with gate.session():
                        raise AssertionError("admitted by a Redis that refuses")
        detail = str(refused.value)
        assert "refused" in detail and "Authentication" in detail
        assert "s3cret" not in detail
    finally:
        server.stop()


@pytest.mark.parametrize("refusal", ["password", "database", "acl"])
async def test_a_redis_that_refuses_the_configuration_refuses_the_opening(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, refusal: str
) -> None:
    """A Redis that answers, refusing the password or the database, is a setting to
    correct: the opening raises RedisRefused (no outage logged, no retrying). It opened,
    refused every arrival as backend_unavailable and logged "retrying" for ever."""
    server = RedisServer(_binary(), tmp_path)
    server.start()
    try:
        url = server.url
        if refusal == "password":
            server.command("CONFIG", "SET", "requirepass", "s3cret")
        elif refusal == "acl":  # a user that may connect, but not run scripts
            server.command("ACL", "SETUSER", "noscript", "on", ">s3cret", "~*", "&*", "+@all")
            server.command("ACL", "SETUSER", "noscript", "-@scripting")
            url = url.replace("redis://", "redis://noscript:s3cret@")
        else:
            url = url.rsplit("/", 1)[0] + "/99"  # redis-server has 16 databases
        caplog.set_level(logging.INFO, logger="sessiongate")
        with trio.fail_after(10):
            with pytest.raises(RedisRefused) as raised:
                async with open_redis_backend(url, gate_name="refusing", capacity=1, lease_ttl=2):
                    raise AssertionError("opened on a Redis that refuses it")
            with pytest.raises(RedisRefused) as checked:
                await check_redis(url, gate_name="refusing")
        expected = {"password": "Authentication", "database": "DB index", "acl": "Authorization"}
        for error in (raised.value, checked.value):
            assert expected[refusal] in str(error)
            assert "s3cret" not in str(error)
        assert not [r for r in caplog.records if r.name.startswith("sessiongate")]
    finally:
        server.stop()


async def test_the_configuration_check_passes_a_redis_that_answers_or_is_down(
    redis_server: RedisServer,
) -> None:
    with socket.socket() as probe:  # a port where nothing listens
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with trio.fail_after(5):
        await check_redis(redis_server.url)
        start = trio.current_time()
        await check_redis(f"redis://127.0.0.1:{port}/0", limit=0.5)
        assert trio.current_time() - start < 1.0


async def test_a_read_only_replica_at_the_start_is_an_outage_not_a_refusal(
    tmp_path: Path,
) -> None:
    """A Redis that answers READONLY (a replica, during a failover) is not refused at
    the start: the backend opens unhealthy and waits for it, as for an outage."""
    server = RedisServer(_binary(), tmp_path)
    server.start()
    try:
        server.command("REPLICAOF", "127.0.0.1", str(_free_port()))  # a primary that is not there
        with trio.fail_after(10):
            await check_redis(server.url, gate_name="replica")  # no RedisRefused
            async with open_redis_backend(
                server.url, gate_name="replica", capacity=1, lease_ttl=2.0
            ) as backend:
                assert not backend.healthy
    finally:
        server.stop()


async def test_a_slow_release_is_not_an_outage(
    own_redis: RedisServer, gate_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A release answered later than its short wait (Redis slow, not down) goes to the
    forgetter without turning the backend unhealthy: with a 250 ms round trip /readyz
    went 503 and back every few seconds (an outside review)."""
    holders_key = f"sg:{{{gate_name}}}:holders"
    with trio.fail_after(20):
        async with redis_gate(own_redis, gate_name, capacity=1, lease_ttl=5.0, max_wait=1) as (
            backend,
            gate,
        ):
            real_script = backend._script

            async def slow_release(*, keys: Any, args: Any) -> Any:
                if args[5] == "release" and len(args) > 6:
                    await trio.sleep(RELEASE_WAIT + 0.1)
                return await real_script(keys=keys, args=args)

            backend._script = slow_release  # type: ignore[method-assign]
            health: list[bool] = []

            async def watch() -> None:
                while True:
                    health.append(backend.healthy)
                    await trio.sleep(0.01)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch)
                async with gate.session():
                    pass
                await wait_until(lambda: zcard(own_redis, holders_key) == 0)
                nursery.cancel_scope.cancel()
    assert health and all(health)
    assert "unreachable" not in caplog.text
