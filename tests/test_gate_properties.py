"""Hypothesis drives random arrivals (some stamped up to two seconds in the past, as the
web layer stamps a request with its kernel receive time), run times, cancellations,
resizes and clock steps through a gate, checking the core's invariants after every step
against a plain model of who is waiting."""

from __future__ import annotations

import attrs
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sessiongate import AdmissionError, Gate, QueueFull, QueueTimeout, Ticket

MAX_WAIT = 5.0


@attrs.define
class Visitor:
    arrival: Ticket
    run_for: int
    scope: trio.CancelScope = attrs.Factory(trio.CancelScope)
    state: str = "queued"  # queued, active, done, expired, refused, cancelled
    admitted_at: float | None = None
    reserved: bool = False
    go: trio.Event = attrs.Factory(trio.Event)
    entered: bool = False

    @property
    def seq(self) -> int:
        return self.arrival.seq

    @property
    def place(self) -> tuple[float, int]:
        # The model's own FIFO order: the earlier stamp first, then the earlier sequence.
        return (self.arrival.arrived_at, self.arrival.seq)

    @property
    def arrived_at(self) -> float:
        return self.arrival.arrived_at


# arg % 7: run time (odd: reserved); arg // 7: seconds the stamp is backdated.
arrive = st.tuples(st.just("arrive"), st.integers(min_value=0, max_value=20))
cancel = st.tuples(st.just("cancel"), st.integers(min_value=0, max_value=40))
resize = st.tuples(st.just("resize"), st.integers(min_value=1, max_value=4))
step = st.tuples(st.just("step"), st.integers(min_value=1, max_value=3))
operations = st.lists(st.one_of(arrive, arrive, cancel, resize, step, step), max_size=60)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    capacity=st.integers(min_value=1, max_value=3),
    max_queue=st.integers(min_value=0, max_value=6),
    ops=operations,
)
def test_gate_invariants(capacity: int, max_queue: int, ops: list[tuple[str, int]]) -> None:
    clock = trio.testing.MockClock()  # moved by hand, one whole second at a time
    trio.run(_drive, capacity, max_queue, ops, clock, clock=clock)


async def _drive(
    capacity: int, max_queue: int, ops: list[tuple[str, int]], clock: trio.testing.MockClock
) -> None:
    gate = Gate(capacity=capacity, max_wait=MAX_WAIT, max_queue=max_queue)
    visitors: list[Visitor] = []
    violations: list[str] = []

    def waiting() -> list[Visitor]:
        return [v for v in visitors if v.state == "queued" and v.entered]

    def reserved_before(place: tuple[float, int]) -> int:
        # Earlier places reserved and about to enter: each may claim a free slot first.
        return sum(
            w.state == "queued" and not w.entered and w.reserved and w.place < place
            for w in visitors
        )

    def held_back() -> bool:
        # Every free slot is spoken for by an earlier reservation: the head may wait.
        backend = gate.backend
        queue = backend._queue  # type: ignore[attr-defined]
        if not queue:
            return False
        free = gate.capacity - gate.active
        return reserved_before(queue.peekitem(0)[0]) >= free

    async def visit(v: Visitor) -> None:
        with v.scope:
            # A reserved arrival's task reaches the gate only at the next clock step,
            # so its reservation spans releases, resizes and later arrivals.
            await v.go.wait()
            v.entered = True
            try:
                async with gate.session(arrival=v.arrival):
                    now = trio.current_time()
                    # Admitted: into a gate that had room, in FIFO order, in time.
                    if gate.active > gate.capacity:
                        violations.append(f"{v.seq} admitted over the cap")
                    # No earlier stamp may still be waiting for a slot (one handed a
                    # slot in this same step is fine), and the slots left must cover
                    # every earlier reservation about to enter.
                    backend = gate.backend
                    earlier = [
                        w.seq
                        for w in visitors
                        if w.state == "queued" and w.place < v.place and w.place in backend._queue  # type: ignore[attr-defined]
                    ]
                    if earlier:
                        violations.append(f"{v.seq} admitted before {earlier}")
                    if reserved_before(v.place) > gate.capacity - gate.active:
                        violations.append(f"{v.seq} took a slot an earlier arrival needs")
                    if now - v.arrived_at > MAX_WAIT:
                        violations.append(f"{v.seq} admitted after waiting too long")
                    v.state, v.admitted_at = "active", now
                    await trio.sleep(v.run_for)
                v.state = "done"
            except QueueTimeout as exc:
                if exc.waited != MAX_WAIT:
                    violations.append(f"{v.seq} expired after {exc.waited}")
                v.state = "expired"
            except QueueFull:
                v.state = "refused"
            except AdmissionError as exc:  # pragma: no cover - nothing else is expected
                violations.append(f"{v.seq}: unexpected {exc!r}")
        if v.scope.cancelled_caught:
            v.state = "cancelled"
            if not v.entered:
                gate.withdraw(v.arrival)  # the request gave up before its session began

    async with trio.open_nursery() as nursery:
        for op, arg in ops:
            if op == "arrive":
                # Odd run times reserve their place: they hold back later arrivals
                # until their task enters (on the next settle).
                run_for, backdate = arg % 7, arg // 7
                reserve = bool(run_for % 2)
                at = trio.current_time() - backdate
                v = Visitor(gate.arrive(reserve=reserve, at=at), run_for, reserved=reserve)
                if not reserve:
                    v.go.set()
                visitors.append(v)
                nursery.start_soon(visit, v)
            elif op == "cancel":
                live = [v for v in visitors if v.state in ("queued", "active")]
                if live:
                    live[arg % len(live)].scope.cancel()
            elif op == "resize":
                gate.capacity = arg
            else:
                for v in visitors:
                    v.go.set()
                await trio.testing.wait_all_tasks_blocked()
                for _ in range(arg):
                    clock.jump(1.0)
                    await trio.testing.wait_all_tasks_blocked()
            await trio.testing.wait_all_tasks_blocked()
            assert not violations, violations
            # No idle slot while someone waits.
            if gate.queued and not held_back():
                assert gate.active >= gate.capacity
            assert gate.queued == len(waiting())
            assert gate.active == sum(v.state == "active" for v in visitors)
        for v in visitors:
            v.scope.cancel()
    # Nothing leaked: no slot, no queue place, no reservation.
    assert gate.active == 0
    assert gate.queued == 0
    backend = gate.backend
    assert not backend._queue  # type: ignore[attr-defined]
    assert not backend._reserved  # type: ignore[attr-defined]
    stats = gate.stats()
    assert stats.admitted == sum(v.admitted_at is not None for v in visitors)
    assert stats.completed == sum(v.state == "done" for v in visitors)
    assert stats.expired == sum(v.state == "expired" for v in visitors)
    assert stats.rejected == sum(v.state == "refused" for v in visitors)
