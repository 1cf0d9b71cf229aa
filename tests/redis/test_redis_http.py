"""The HTTP service in Redis mode, for real: Redis down and back, two servers, one cap."""

from __future__ import annotations

from typing import Any

import httpx
import trio
from tests.web.conftest import real_server
from tests.web.test_cli import serve_process, until
from tests.web.test_real import read_events

from sessiongate import Gate
from sessiongate.backends.redis import open_redis_backend

from .conftest import RedisServer

PREFER_ASYNC = {"Prefer": "respond-async"}


async def test_http_redis_down_fails_fast_and_recovers(
    own_redis: RedisServer, gate_name: str
) -> None:
    with trio.fail_after(30):
        async with (
            real_server(backend=own_redis.url, gate_name=gate_name, capacity=2, lease_ttl=1.0) as (
                _app,
                base,
            ),
            httpx.AsyncClient(base_url=base, timeout=10) as client,
        ):

            async def ready(expected: int) -> bool:
                return (await client.get("/readyz")).status_code == expected

            await until(lambda: ready(200))
            running = await client.post("/sessions", json={"duration": 30}, headers=PREFER_ASYNC)
            assert running.status_code == 202
            session_id = running.json()["id"]
            assert running.json()["state"] == "active"

            own_redis.kill()
            await until(lambda: ready(503))
            assert (await client.get("/healthz")).status_code == 200
            start = trio.current_time()
            refused = await client.post("/sessions", json={"duration": 0})
            assert trio.current_time() - start < 1.0
            assert refused.status_code == 503
            assert refused.json()["error"] == "backend_unavailable"
            assert int(refused.headers["Retry-After"]) >= 1

            # The running session could not renew: it failed before its lease lapsed.
            async def lost() -> bool:
                body: dict[str, Any] = (await client.get(f"/sessions/{session_id}")).json()
                return body["state"] == "failed"

            await until(lost)
            ended = (await client.get(f"/sessions/{session_id}")).json()
            assert ended["error"]["error"] == "lease_lost"

            own_redis.start()
            await until(lambda: ready(200))
            done = await client.post("/sessions", json={"duration": 0})
            assert done.status_code == 200
            assert done.json()["state"] == "completed"
            stats = (await client.get("/stats")).json()
            assert stats["rejected_total"] >= 1


async def test_two_server_processes_share_one_cap(
    redis_server: RedisServer, gate_name: str
) -> None:
    common = [
        "--backend", redis_server.url, "--gate-name", gate_name, "--capacity", "2",
        "--admin-token", "sesame",
    ]  # fmt: skip
    with trio.fail_after(40):
        async with (
            serve_process(*common, "--lease-ttl", "2") as (first, base_one),
            serve_process(*common, "--lease-ttl", "2") as (second, base_two),
            httpx.AsyncClient(base_url=base_one, timeout=30) as one,
            httpx.AsyncClient(base_url=base_two, timeout=30) as two,
        ):
            clients = [one, two]
            seen_active: list[int] = []
            answers: list[httpx.Response] = []

            async def sample() -> None:
                while True:
                    for client in clients:
                        stats = (await client.get("/stats")).json()
                        seen_active.append(stats["active"])
                        assert stats["capacity"] == 2
                    await trio.sleep(0.02)

            async def session(n: int) -> None:
                answers.append(await clients[n % 2].post("/sessions", json={"duration": 0.4}))

            start = trio.current_time()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(sample)
                async with trio.open_nursery() as sessions:
                    for n in range(6):
                        sessions.start_soon(session, n)
                nursery.cancel_scope.cancel()
            elapsed = trio.current_time() - start
            assert [a.status_code for a in answers] == [200] * 6
            assert max(seen_active) == 2
            # Six 0.4 s sessions through two global slots: three waves, not one.
            assert elapsed >= 1.2
            waits = sorted(a.json()["queued_s"] for a in answers)
            assert waits[-1] >= 0.7
            # PUT /admin/capacity on one server changes the cap for both.
            resized = await one.put(
                "/admin/capacity",
                json={"capacity": 3},
                headers={"Authorization": "Bearer sesame"},
            )
            assert resized.status_code == 200
            assert resized.json()["capacity"] == 3

            async def resized_everywhere() -> bool:
                return bool((await two.get("/stats")).json()["capacity"] == 3)

            await until(resized_everywhere)
            # serve_process drains stderr until the process ends: end them here.
            first.kill()
            second.kill()


async def test_event_stream_follows_a_position_moved_by_another_process(
    redis_server: RedisServer, gate_name: str
) -> None:
    # The queue ahead of the followed session belongs to another backend (as if another
    # host's): its waiter leaving moves the position only through Redis's published
    # change, so the event stream must be woken by that, not by anything local.
    with trio.fail_after(20):
        async with (
            open_redis_backend(
                redis_server.url, gate_name=gate_name, capacity=1, lease_ttl=2.0
            ) as other,
            real_server(backend=redis_server.url, gate_name=gate_name, capacity=1) as (
                app,
                base,
            ),
            httpx.AsyncClient(base_url=base, timeout=10) as client,
            trio.open_nursery() as nursery,
        ):
            gate = Gate(1, max_wait=30, backend=other)
            release = trio.Event()
            ahead_queued = trio.Event()

            async def holder(task_status: trio.TaskStatus[None]) -> None:
                async with gate.session():
                    task_status.started()
                    await release.wait()

            async def ahead() -> None:
                gate.on_queued = lambda _ticket: ahead_queued.set()
                async with gate.session():
                    pass

            await nursery.start(holder)
            ahead_scope = trio.CancelScope()

            async def run_ahead() -> None:
                with ahead_scope:
                    await ahead()

            nursery.start_soon(run_ahead)
            await ahead_queued.wait()
            created = await client.post("/sessions", json={"duration": 0}, headers=PREFER_ASYNC)
            assert created.status_code == 202
            session_id = created.json()["id"]
            async with client.stream("GET", f"/sessions/{session_id}/events") as response:
                events = read_events(response)
                first = await events.__anext__()
                while first["data"]["position"] != 2:  # until the server's mirror has it
                    first = await events.__anext__()
                assert first["event"] == "queued"
                ahead_scope.cancel()  # the other process's waiter leaves the queue
                moved = await events.__anext__()
                assert moved["event"] == "queued" and moved["data"]["position"] == 1
                release.set()  # the slot comes free: the followed session runs and ends
                states = [moved["event"]]
                async for event in events:
                    states.append(event["event"])
                assert states[-1] == "completed"
            assert app.service.gate.stats().admitted == 1
            nursery.cancel_scope.cancel()
