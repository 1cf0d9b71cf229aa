"""Core benchmark (issue 2): the gate's own costs, and the article's algorithm side by side.

Run from the repository root::

    .venv/bin/python benchmarks/bench_core.py            # default run, well under 2 minutes
    .venv/bin/python benchmarks/bench_core.py --quick    # a smoke run of about 20 seconds
    .venv/bin/python benchmarks/bench_core.py --profile  # + where a session's time goes

Sections:

1. *Uncontended* ``async with gate.session():`` enter+exit, as a ratio to a bare
   ``trio.CapacityLimiter`` acquire+release, interleaved in the same run (medians).
2. *Hand-off*: from a holder's last instruction in its body to the next waiter's first,
   capacity 1, a long queue, real clock; the same through a bare ``CapacityLimiter``.
3. *Memory per queued waiter* with 100 000 waiters, minus the same number of plain tasks
   parked on one ``trio.Event`` (the task itself). Each figure comes from its own child
   process (tracemalloc in one pair, RSS in another) so runs cannot share freed memory.
4. *Workload vs the article*: N arrivals in bursts through the article's algorithm
   (``article_baseline.py``, asyncio) and through sessiongate (Trio), each in its own
   child process, on scaled times (capacity 50, 1 s sessions, 5 s deadline, 1 s polling
   in the article). Slot utilisation, hand-off gap, FIFO inversions, waits past the
   deadline, expiry precision, memory growth.

Nothing here asserts on time: it prints figures and ratios.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import math
import platform
import pstats
import subprocess
import sys
import time
import tracemalloc
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from itertools import count
from pathlib import Path
from typing import Any

import trio
import trio.testing
from sortedcontainers import SortedList

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

import sessiongate  # noqa: E402
from _metrics import (  # noqa: E402
    Record,
    analyse,
    fmt_bytes,
    fmt_ms,
    fmt_pct,
    fmt_us,
    git_rev,
    loadavg,
    median,
    quantile,
    rss_bytes,
    table,
)

perf = time.perf_counter


def progress(msg: str) -> None:
    print(f"\r\033[K[bench_core] {msg}", end="", file=sys.stderr, flush=True)


def progress_done() -> None:
    print("\r\033[K", end="", file=sys.stderr, flush=True)


# -- 1. uncontended enter+exit ------------------------------------------------------------


async def _loop_limiter(n: int) -> float:
    limiter = trio.CapacityLimiter(50)
    t0 = perf()
    for _ in range(n):
        async with limiter:
            pass
    return (perf() - t0) / n


def _make_gate(capacity: int, max_wait: float, max_queue: int) -> sessiongate.Gate:
    return sessiongate.Gate(capacity=capacity, max_wait=max_wait, max_queue=max_queue)


async def _loop_gate(n: int) -> float:
    gate = _make_gate(50, 60.0, 10_000)
    t0 = perf()
    for _ in range(n):
        async with gate.session():
            pass
    return (perf() - t0) / n


async def _loop_checkpoint(n: int) -> float:
    # The floor: one trip through Trio's scheduler, which the limiter's acquire takes.
    t0 = perf()
    for _ in range(n):
        await trio.lowlevel.checkpoint()
    return (perf() - t0) / n


def bench_uncontended(n: int, repeats: int) -> dict[str, Any]:
    results: dict[str, list[float]] = {"limiter": [], "gate": [], "checkpoint": []}

    async def main() -> None:
        # Warm up both paths once.
        await _loop_limiter(1000)
        await _loop_gate(1000)
        for i in range(repeats):
            progress(f"uncontended: round {i + 1}/{repeats}")
            results["limiter"].append(await _loop_limiter(n))
            results["gate"].append(await _loop_gate(n))
            results["checkpoint"].append(await _loop_checkpoint(n))

    trio.run(main)
    progress_done()
    ratios = [g / lim for g, lim in zip(results["gate"], results["limiter"], strict=True)]
    return {
        "n": n,
        "repeats": repeats,
        "limiter_s": median(results["limiter"]),
        "gate_s": median(results["gate"]),
        "checkpoint_s": median(results["checkpoint"]),
        "ratio": median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
    }


def profile_uncontended(n: int, top: int = 25) -> str:
    """cProfile of ``n`` uncontended sessions; the functions by total (own) time."""
    profiler = cProfile.Profile()

    async def main() -> None:
        gate = sessiongate.Gate(capacity=50, max_wait=60.0, max_queue=10_000)
        profiler.enable()
        for _ in range(n):
            async with gate.session():
                pass
        profiler.disable()

    trio.run(main)
    buf = io.StringIO()
    stats = pstats.Stats(profiler, stream=buf)
    stats.sort_stats("tottime").print_stats(top)
    return buf.getvalue()


def bench_breakdown(n: int, repeats: int = 3) -> list[tuple[str, float]]:
    """What the building blocks of a session cost alone, each in a tight loop (µs)."""

    @asynccontextmanager
    async def empty_acm() -> AsyncIterator[None]:
        yield

    @contextmanager
    def empty_cm() -> Iterator[None]:
        yield

    results: dict[str, list[float]] = {}

    async def main() -> None:
        limiter = trio.CapacityLimiter(50)
        gate = sessiongate.Gate(capacity=50, max_wait=60.0, max_queue=10_000)
        stamps: SortedList = SortedList()

        async def f_gate() -> None:
            async with gate.session():
                pass

        async def f_limiter() -> None:
            async with limiter:
                pass

        async def f_checkpoint() -> None:
            await trio.lowlevel.checkpoint()

        async def f_deadline_scope() -> None:
            with trio.CancelScope(deadline=trio.current_time() + 60) as scope:
                scope.deadline = math.inf

        async def f_scope() -> None:
            with trio.CancelScope():
                pass

        async def f_acm() -> None:
            async with empty_acm():
                pass

        async def f_cm() -> None:
            with empty_cm():
                pass

        async def f_sorted() -> None:
            stamps.add(1)
            _ = 1 in stamps
            stamps.remove(1)
            _ = 1 in stamps

        async def f_ticket() -> None:
            gate.arrive()

        async def f_now() -> None:
            trio.current_time()

        cases: list[tuple[str, Callable[[], Any]]] = [
            ("async with gate.session() (whole)", f_gate),
            ("async with trio.CapacityLimiter", f_limiter),
            ("trio.lowlevel.checkpoint()", f_checkpoint),
            ("CancelScope(deadline=...) enter, lift deadline, exit", f_deadline_scope),
            ("CancelScope() enter+exit", f_scope),
            ("@asynccontextmanager, empty", f_acm),
            ("@contextmanager, empty", f_cm),
            ("SortedList add + 2x contains + remove", f_sorted),
            ("gate.arrive() (a ticket)", f_ticket),
            ("trio.current_time()", f_now),
        ]
        for _ in range(repeats):
            for name, fn in cases:
                t0 = perf()
                for _ in range(n):
                    await fn()
                results.setdefault(name, []).append((perf() - t0) / n)
        # The loop's own cost (an awaited empty coroutine), subtracted from every case.

        async def f_empty() -> None:
            pass

        for _ in range(repeats):
            t0 = perf()
            for _ in range(n):
                await f_empty()
            results.setdefault("(loop)", []).append((perf() - t0) / n)

    trio.run(main)
    loop = median(results.pop("(loop)"))
    return [(name, median(v) - loop) for name, v in results.items()]


def memory_breakdown(waiters: int, top: int = 20) -> str:
    """tracemalloc, by source line, of what ``waiters`` queued gate waiters allocate."""
    lines: list[str] = []

    async def park(gate: sessiongate.Gate) -> None:
        async with gate.session():
            pass

    async def main() -> None:
        gate = sessiongate.Gate(capacity=1, max_wait=3600.0, max_queue=waiters + 1)
        async with trio.open_nursery() as nursery, gate.session():
            gc.collect()
            tracemalloc.start()
            before = tracemalloc.take_snapshot()
            for _ in range(waiters):
                nursery.start_soon(park, gate)
            await trio.testing.wait_all_tasks_blocked()
            gc.collect()
            after = tracemalloc.take_snapshot()
            tracemalloc.stop()
            diff = after.compare_to(before, "lineno")
            total = sum(d.size_diff for d in diff)
            lines.append(f"{total / waiters:8.0f} B per waiter in all (task included)")
            for d in diff[:top]:
                frame = d.traceback[0]
                where = frame.filename.split("site-packages/")[-1].split("/work/main/")[-1]
                lines.append(
                    f"{d.size_diff / waiters:8.0f} B {d.count_diff / waiters:5.2f} blocks  "
                    f"{where}:{frame.lineno}"
                )
            nursery.cancel_scope.cancel()

    trio.run(main)
    return "\n".join(lines)


# -- 2. hand-off --------------------------------------------------------------------------


def bench_handoff(waiters: int, repeats: int) -> dict[str, Any]:
    """Capacity 1 and a queue of ``waiters``: the time from a holder's last instruction
    in its body to the next holder's first, for each hand-off.

    Two shapes: *steady*, where each holder lets every other task run before it leaves
    (as any real session does: the next waiter is parked when the slot is released), and
    *back-to-back*, zero-length bodies, where the next waiter may not have reached the
    limiter yet when the slot is released.
    """
    gaps: dict[str, list[float]] = {}

    async def chain(kind: str, steady: bool) -> None:
        if kind == "gate":
            gate = _make_gate(1, 3600.0, waiters + 1)

            def slot() -> Any:
                return gate.session()
        else:
            limiter = trio.CapacityLimiter(1)

            def slot() -> Any:
                return limiter

        last_exit = math.nan
        out = gaps.setdefault(f"{kind}-{'steady' if steady else 'b2b'}", [])

        async def waiter() -> None:
            nonlocal last_exit
            async with slot():
                t_in = perf()
                if not math.isnan(last_exit):
                    out.append(t_in - last_exit)
                if steady:
                    await trio.testing.wait_all_tasks_blocked()
                last_exit = perf()

        async with trio.open_nursery() as nursery, slot():
            for _ in range(waiters):
                nursery.start_soon(waiter)
            await trio.testing.wait_all_tasks_blocked()
            last_exit = perf()

    async def main() -> None:
        for i in range(repeats):
            progress(f"hand-off: round {i + 1}/{repeats}")
            for steady in (True, False):
                await chain("limiter", steady)
                await chain("gate", steady)

    trio.run(main)
    progress_done()
    return {
        key: {
            "n": len(values),
            "p50_s": quantile(values, 0.5),
            "p99_s": quantile(values, 0.99),
            "max_s": max(values),
        }
        for key, values in gaps.items()
    }


# -- 3. memory per queued waiter (child processes) -----------------------------------------


def child_memory(kind: str, waiters: int, method: str) -> dict[str, Any]:
    """Park ``waiters`` tasks (gate waiters, or plain tasks on one Event); measure."""
    result: dict[str, Any] = {}

    async def park_on_event(event: trio.Event) -> None:
        await event.wait()

    async def park_on_gate(gate: sessiongate.Gate) -> None:
        async with gate.session():
            pass

    async def main() -> None:
        gate = _make_gate(1, 3600.0, waiters + 1)
        event = trio.Event()
        async with trio.open_nursery() as nursery, gate.session():
            gc.collect()
            await trio.testing.wait_all_tasks_blocked()
            if method == "tracemalloc":
                tracemalloc.start()
                before = tracemalloc.get_traced_memory()[0]
            else:
                before = rss_bytes()
            t0 = perf()
            for _ in range(waiters):
                if kind == "gate":
                    nursery.start_soon(park_on_gate, gate)
                else:
                    nursery.start_soon(park_on_event, event)
            await trio.testing.wait_all_tasks_blocked()
            result["park_s"] = perf() - t0
            if kind != "event":
                result["queued"] = gate.queued
            gc.collect()
            if method == "tracemalloc":
                after = tracemalloc.get_traced_memory()[0]
                tracemalloc.stop()
            else:
                after = rss_bytes()
            result["bytes"] = after - before
            nursery.cancel_scope.cancel()

    trio.run(main)
    return result


def run_child(args: list[str], timeout: float) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, __file__, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"child {args} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_memory(waiters: int) -> dict[str, Any]:
    out: dict[str, Any] = {"waiters": waiters}
    for method in ("tracemalloc", "rss"):
        for kind in ("event", "gate"):
            progress(f"memory: {waiters} {kind} waiters, {method}")
            out[f"{kind}_{method}"] = run_child(
                [
                    "--child",
                    "memory",
                    "--kind",
                    kind,
                    "--method",
                    method,
                    "--waiters",
                    str(waiters),
                ],
                timeout=300,
            )
    progress_done()
    for method in ("tracemalloc", "rss"):
        task = out[f"event_{method}"]["bytes"] / waiters
        gate = out[f"gate_{method}"]["bytes"] / waiters
        out[f"{method}_per_task"] = task
        out[f"{method}_per_gate_waiter"] = gate
        out[f"{method}_beyond_task"] = gate - task
    return out


# -- 4. the workload, ours and the article's (child processes) -----------------------------


def _payload(i: int, size: int) -> dict[str, Any]:
    # A request body as the article's endpoint would receive it: a fresh dict each time.
    return {"user": i, "note": f"{i:08d}" * max(1, size // 8)}


def _rss_watch_interval() -> float:
    return 0.05


def child_workload(system: str, cfg: dict[str, Any]) -> dict[str, Any]:
    capacity = cfg["capacity"]
    session_s = cfg["session"]
    deadline = cfg["deadline"]
    bursts = cfg["bursts"]
    burst = cfg["burst"]
    interval = cfg["interval"]
    size = cfg["payload"]
    n = bursts * burst
    # Preallocated so the harness's own bookkeeping does not count as growth.
    records = [Record() for _ in range(n)]
    seq = count()
    gc.collect()
    rss0 = rss_bytes()
    peak = rss0
    extra: dict[str, Any] = {}

    if system == "sessiongate":
        gate = _make_gate(capacity, deadline, n + 1)

        async def client(i: int) -> None:
            rec = records[i]
            rec.seq = next(seq)
            rec.t_arrive = perf()
            data = _payload(i, size)
            try:
                async with gate.session():
                    rec.t_admit = perf()
                    await trio.sleep(session_s)
                    del data
                    rec.t_release = perf()
            except sessiongate.QueueTimeout:
                rec.t_expired = perf()

        async def watch() -> None:
            nonlocal peak
            while True:
                peak = max(peak, rss_bytes())
                await trio.sleep(_rss_watch_interval())

        async def main() -> None:
            async with trio.open_nursery() as outer:
                outer.start_soon(watch)
                async with trio.open_nursery() as nursery:
                    start = trio.current_time()
                    for b in range(bursts):
                        await trio.sleep_until(start + b * interval)
                        progress(f"workload {system}: burst {b + 1}/{bursts}")
                        for j in range(burst):
                            nursery.start_soon(client, b * burst + j)
                outer.cancel_scope.cancel()
            stats = gate.stats()
            extra["retained_items"] = stats.queued + stats.active
            extra["gate_stats"] = {
                "admitted": stats.admitted,
                "expired": stats.expired,
                "completed": stats.completed,
            }

        trio.run(main)
    else:
        import asyncio

        from article_baseline import ArticleService, SessionExpired

        async def amain() -> None:
            nonlocal peak

            async def work(data: dict[str, Any]) -> None:
                # The article's run_session awaits this in place of its asyncio.sleep(5),
                # inside its try/finally around the slot: the stamps sit where ours do.
                rec = records[data["user"]]
                rec.t_admit = perf()
                await asyncio.sleep(session_s)
                rec.t_release = perf()

            service = ArticleService(
                max_active=capacity,
                rto=deadline,
                poll=cfg["poll"],
                session_seconds=session_s,
                work=work,
            )

            async def client(i: int) -> None:
                rec = records[i]
                rec.seq = next(seq)
                rec.t_arrive = perf()
                try:
                    await service.create_session(_payload(i, size))
                except SessionExpired:
                    rec.t_expired = perf()

            async def watch() -> None:
                nonlocal peak
                while True:
                    peak = max(peak, rss_bytes())
                    await asyncio.sleep(_rss_watch_interval())

            watcher = asyncio.create_task(watch())
            loop = asyncio.get_running_loop()
            start = loop.time()
            tasks = []
            for b in range(bursts):
                await asyncio.sleep(max(0.0, start + b * interval - loop.time()))
                progress(f"workload article: burst {b + 1}/{bursts}")
                for j in range(burst):
                    tasks.append(asyncio.create_task(client(b * burst + j)))
            await asyncio.gather(*tasks)
            watcher.cancel()
            extra["retained_items"] = service.session_manager.queue.qsize()

        asyncio.run(amain())
    progress_done()
    gc.collect()
    rss1 = rss_bytes()
    summary = analyse(records, capacity, deadline).summary()
    summary.update(extra)
    summary["rss_before"] = rss0
    summary["rss_growth_after"] = rss1 - rss0
    summary["rss_growth_peak"] = max(peak, rss1) - rss0
    return summary


def bench_workload(cfg: dict[str, Any], runs: int) -> dict[str, list[dict[str, Any]]]:
    systems = ("article", "sessiongate")
    out: dict[str, list[dict[str, Any]]] = {system: [] for system in systems}
    budget = cfg["bursts"] * cfg["interval"] + cfg["deadline"] + cfg["poll"] + cfg["session"]
    for _ in range(runs):
        for system in systems:
            out[system].append(
                run_child(
                    ["--child", "workload", "--system", system, "--cfg", json.dumps(cfg)],
                    timeout=budget * 3 + 60,
                )
            )
    return out


# -- report ------------------------------------------------------------------------------


def _med(runs: list[dict[str, Any]], key: str) -> float:
    return median([float(r[key]) for r in runs])


def report_workload(cfg: dict[str, Any], results: dict[str, list[dict[str, Any]]]) -> str:
    art, ours = results["article"], results["sessiongate"]
    tol = "50 ms"

    def int_cell(runs: list[dict[str, Any]], key: str) -> str:
        return f"{_med(runs, key):.0f}"

    rows: list[tuple[str, Callable[[list[dict[str, Any]]], str]]] = [
        ("arrivals", lambda r: int_cell(r, "arrivals")),
        ("admitted / expired", lambda r: f"{_med(r, 'admitted'):.0f} / {_med(r, 'expired'):.0f}"),
        ("most active at once", lambda r: int_cell(r, "max_active")),
        ("time saturated (someone waiting)", lambda r: f"{_med(r, 'saturated_s'):.2f} s"),
        ("slot utilisation while saturated", lambda r: fmt_pct(_med(r, "utilisation"))),
        ("hand-offs measured", lambda r: int_cell(r, "handoffs")),
        ("hand-off gap p50", lambda r: fmt_ms(_med(r, "handoff_p50_s"), 3)),
        ("hand-off gap p99", lambda r: fmt_ms(_med(r, "handoff_p99_s"), 3)),
        ("hand-off gap max", lambda r: fmt_ms(_med(r, "handoff_max_s"), 3)),
        ("FIFO inversions (by > 2 ms)", lambda r: int_cell(r, "fifo_inversions")),
        ("admitted after their deadline", lambda r: int_cell(r, "admitted_past_deadline")),
        (f"waits past the deadline (> {tol})", lambda r: int_cell(r, "waits_past_deadline")),
        ("expiry lateness p50", lambda r: fmt_ms(_med(r, "expiry_late_p50_s"), 2)),
        ("expiry lateness p99", lambda r: fmt_ms(_med(r, "expiry_late_p99_s"), 2)),
        ("expiry lateness max", lambda r: fmt_ms(_med(r, "expiry_late_max_s"), 2)),
        ("items left in the gate after the run", lambda r: int_cell(r, "retained_items")),
        ("RSS growth, peak", lambda r: fmt_bytes(_med(r, "rss_growth_peak"))),
        ("RSS growth, after the run", lambda r: fmt_bytes(_med(r, "rss_growth_after"))),
    ]
    header = ("figure", "article (asyncio)", "sessiongate (trio)")
    body = [(name, fn(art), fn(ours)) for name, fn in rows]
    n = len(art)
    head = (
        f"Workload: {cfg['bursts']} bursts of {cfg['burst']} arrivals every "
        f"{cfg['interval']:g} s, capacity {cfg['capacity']}, {cfg['session']:g} s sessions, "
        f"{cfg['deadline']:g} s deadline, article polls every {cfg['poll']:g} s, "
        f"{cfg['payload']} B payloads; median of {n} run(s) each."
    )
    return head + "\n\n" + table(header, body)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smoke run of about 20 seconds")
    p.add_argument("--profile", action="store_true", help="cProfile the uncontended path")
    p.add_argument("--only", default="uncontended,handoff,memory,workload")
    p.add_argument("--uncontended-n", type=int, default=20_000)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--handoff-waiters", type=int, default=2_000)
    p.add_argument("--handoff-repeats", type=int, default=5)
    p.add_argument("--waiters", type=int, default=100_000)
    p.add_argument("--capacity", type=int, default=50)
    p.add_argument("--session", type=float, default=1.0)
    p.add_argument("--deadline", type=float, default=5.0)
    p.add_argument("--poll", type=float, default=1.0)
    p.add_argument("--bursts", type=int, default=10)
    p.add_argument("--burst", type=int, default=100)
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--payload", type=int, default=256, help="bytes of text per payload")
    p.add_argument("--runs", type=int, default=1, help="workload runs per system (median)")
    # Internal: child processes.
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--kind", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--system", help=argparse.SUPPRESS)
    p.add_argument("--cfg", help=argparse.SUPPRESS)
    a = p.parse_args(argv)

    if a.child == "memory":
        print(json.dumps(child_memory(a.kind, a.waiters, a.method)))
        return
    if a.child == "workload":
        print(json.dumps(child_workload(a.system, json.loads(a.cfg))))
        return

    if a.quick:
        a.uncontended_n, a.repeats = 2_000, 3
        a.handoff_waiters, a.handoff_repeats = 500, 2
        a.waiters = 10_000
        a.bursts, a.burst = 3, 100
    only = set(a.only.split(","))
    started = perf()
    print(
        f"# bench_core: sessiongate {sessiongate.__version__}, trio {trio.__version__}, "
        f"Python {platform.python_version()}, {platform.machine()}, "
        f"{_cpu_count()} CPUs, load average {loadavg()}, tree {git_rev(str(HERE.parent))}"
    )

    if "uncontended" in only:
        u = bench_uncontended(a.uncontended_n, a.repeats)
        print(
            f"\n## Uncontended enter+exit ({u['n']} iterations x {u['repeats']} rounds, "
            "interleaved, medians)\n"
        )
        print(
            table(
                ("path", "per enter+exit", "vs CapacityLimiter"),
                [
                    ("trio.lowlevel.checkpoint() (floor)", fmt_us(u["checkpoint_s"]), "-"),
                    ("async with trio.CapacityLimiter", fmt_us(u["limiter_s"]), "1.00x"),
                    (
                        "async with gate.session()",
                        fmt_us(u["gate_s"]),
                        f"{u['ratio']:.2f}x (rounds {u['ratio_min']:.2f}-{u['ratio_max']:.2f}x)",
                    ),
                ],
            )
        )
        verdict = "met" if u["ratio"] <= 3 else "MISSED"
        print(f"\nTarget <= 3x: {verdict}.")
    if a.profile:
        progress("profile: building blocks")
        parts = bench_breakdown(a.uncontended_n)
        progress_done()
        print("\n## Building blocks, each alone (median of 3, loop cost subtracted)\n")
        print(table(("block", "µs"), [(name, f"{cost * 1e6:.2f}") for name, cost in parts]))
        progress("profile: memory by line")
        mem = memory_breakdown(min(a.waiters, 20_000))
        progress_done()
        print("\n## tracemalloc: what queued gate waiters allocate, by line\n")
        print("```\n" + mem + "\n```")
        print("\n## cProfile: uncontended sessions, by own time\n")
        print("```\n" + profile_uncontended(a.uncontended_n).rstrip() + "\n```")

    if "handoff" in only:
        h = bench_handoff(a.handoff_waiters, a.handoff_repeats)
        print(
            f"\n## Hand-off: holder's exit -> next waiter running (capacity 1, "
            f"{a.handoff_waiters} queued, {a.handoff_repeats} rounds, real clock)\n"
        )
        ratio = h["gate-steady"]["p50_s"] / h["limiter-steady"]["p50_s"]
        print(
            "Steady: each holder yields until every other task is blocked before it "
            "leaves, so the next waiter is parked when the slot is released (any real "
            "session). Back-to-back: zero-length bodies.\n"
        )
        print(
            table(
                ("path", "hand-offs", "p50", "p99", "max"),
                [
                    (
                        label,
                        str(h[k]["n"]),
                        fmt_us(h[k]["p50_s"]),
                        fmt_us(h[k]["p99_s"]),
                        fmt_us(h[k]["max_s"]),
                    )
                    for label, k in (
                        ("trio.CapacityLimiter, steady", "limiter-steady"),
                        ("gate.session(), steady", "gate-steady"),
                        ("trio.CapacityLimiter, back-to-back", "limiter-b2b"),
                        ("gate.session(), back-to-back", "gate-b2b"),
                    )
                    if k in h
                ],
            )
        )

        print(f"\nSteady p50, gate vs bare limiter: {ratio:.2f}x.")

    if "memory" in only:
        m = bench_memory(a.waiters)
        print(f"\n## Memory per queued waiter ({a.waiters} waiters, capacity 1)\n")
        print(
            table(
                ("method", "task on an Event", "gate waiter", "beyond the task"),
                [
                    (
                        method,
                        fmt_bytes(m[f"{method}_per_task"]),
                        fmt_bytes(m[f"{method}_per_gate_waiter"]),
                        fmt_bytes(m[f"{method}_beyond_task"]),
                    )
                    for method in ("tracemalloc", "rss")
                ],
            )
        )
        beyond = m["tracemalloc_beyond_task"]
        verdict = "met" if beyond < 2048 else "MISSED"
        print(
            f"\nTarget < 2 KiB beyond the task (tracemalloc): {verdict}. Parking "
            f"{a.waiters} waiters took {m['gate_rss']['park_s']:.2f} s "
            f"(plain tasks: {m['event_rss']['park_s']:.2f} s)."
        )

    if "workload" in only:
        cfg = {
            "capacity": a.capacity,
            "session": a.session,
            "deadline": a.deadline,
            "poll": a.poll,
            "bursts": a.bursts,
            "burst": a.burst,
            "interval": a.interval,
            "payload": a.payload,
        }
        res = bench_workload(cfg, a.runs)
        print("\n## Workload: the article's algorithm vs sessiongate\n")
        print(report_workload(cfg, res))

    print(f"\n(total {perf() - started:.1f} s)")


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    main()
