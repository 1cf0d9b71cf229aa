"""Hypothesis drives random steps through the gate script on a real Redis and checks
every answer against a plain model: the cap, FIFO hand-off, the queue bound, resizes,
leaves and tombstones. (Leases are long here: expiry is covered by the other tests.)"""

from __future__ import annotations

import uuid

import attrs
import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sessiongate.backends.redis import open_redis_backend

from .conftest import RedisServer


@attrs.define
class Model:
    capacity: int
    max_queue: int
    queue: list[str] = attrs.Factory(list)
    holders: set[str] = attrs.Factory(set)
    gone: set[str] = attrs.Factory(set)
    granted: list[str] = attrs.Factory(list)

    def admit(self) -> None:
        while self.queue and len(self.holders) < self.capacity:
            member = self.queue.pop(0)
            self.holders.add(member)
            self.granted.append(member)

    def enqueue(self, member: str, wait: bool) -> str:
        if member in self.gone:
            return "X"
        if not self.queue and len(self.holders) < self.capacity:
            self.holders.add(member)
            return "G"
        if not wait:
            return "W"
        if len(self.queue) >= self.max_queue:
            return "F"
        self.queue.append(member)
        return "Q"

    def leave(self, member: str, forget: bool) -> None:
        self.holders.discard(member)
        if member in self.queue:
            self.queue.remove(member)
        if forget:
            self.gone.add(member)
        self.admit()


enqueue = st.tuples(st.just("enqueue"), st.integers(0, 2), st.booleans())
leave = st.tuples(st.just("release"), st.integers(0, 30), st.booleans())
resize = st.tuples(st.just("resize"), st.integers(1, 4), st.booleans())
operations = st.lists(st.one_of(enqueue, enqueue, leave, leave, resize), max_size=40)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    capacity=st.integers(1, 3),
    max_queue=st.integers(0, 5),
    ops=operations,
)
def test_script_matches_the_model(
    redis_server: RedisServer, capacity: int, max_queue: int, ops: list[tuple[str, int, bool]]
) -> None:
    trio.run(_drive, redis_server.url, capacity, max_queue, ops)


async def _drive(url: str, capacity: int, max_queue: int, ops: list[tuple[str, int, bool]]) -> None:
    model = Model(capacity, max_queue)
    members: list[str] = []
    with trio.fail_after(20):
        async with open_redis_backend(
            url, gate_name=f"model-{uuid.uuid4().hex[:10]}", capacity=capacity, lease_ttl=60
        ) as backend:
            for op, n, flag in ops:
                if op == "enqueue":
                    batch = [f"m:{len(members) + i}" for i in range(n + 1)]
                    members += batch
                    args = [str(len(batch))]
                    for member in batch:
                        args += [member, "1" if flag else "0", str(max_queue), "0"]
                    figures, answer = await backend._call_figures("enqueue", args, limit=5)
                    expected = [model.enqueue(member, flag) for member in batch]
                    assert [answer[3 * i] for i in range(len(batch))] == expected
                elif op == "release":
                    if not members:
                        continue
                    member = members[n % len(members)]
                    verb = "forget" if flag else "release"
                    figures, _ = await backend._call_figures(verb, [member], limit=5)
                    model.leave(member, forget=flag)
                else:
                    model.capacity = n
                    figures, _ = await backend._call_figures("resize", [str(n)], limit=5)
                    model.admit()
                # The hand-offs this step made, in order, are the model's.
                grants = [p[1] for p in (line.split(" ") for line in figures.events.split("\n"))
                          if p[0] == "G"]  # fmt: skip
                assert grants == model.granted
                model.granted.clear()
                assert (figures.active, figures.queued) == (len(model.holders), len(model.queue))
                assert figures.capacity == model.capacity
