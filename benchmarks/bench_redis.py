"""Distributed mode under load: N worker processes share one cap through Redis.

Each worker process runs a ``Gate`` on the Redis backend with closed-loop clients (a
client starts its next session as soon as the last one ends); sessions last
``--session`` seconds. The run reports, per worker count, and against one in-memory
worker with the same load in the same run:

* utilisation: slot-seconds used / (capacity x window), after a warm-up;
* hand-off gap p50/p99: from a slot's release (the session body's end, in any
  process) to the next admission of a waiting session (in any process);
* FIFO inversions: pairs admitted out of Redis arrival order (by fencing token, which
  Redis hands out in grant order);
* cap violations: more than ``capacity`` holders, sampled from Redis every 5 ms, and
  more than ``capacity`` overlapping session bodies by the sessions' own timings;
* Redis round trips per admission (script calls of all workers / admissions);
* throughput (admissions per second).

Run: ``python benchmarks/bench_redis.py`` (starts its own redis-server on a free port;
``--redis URL`` to use another). Issue 4's targets: utilisation >= 98 %, hand-off p99
< 10 ms, zero violations, <= 3 round trips per admission.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from bisect import bisect_right
from pathlib import Path
from typing import Any

import trio

import sessiongate

# -- one worker process -------------------------------------------------------------------


async def worker(args: argparse.Namespace) -> None:
    from sessiongate.backends.redis import open_redis_backend

    records: list[dict[str, Any]] = []
    calls_before = 0

    async def client(gate: sessiongate.Gate, backend: Any, stop_at: float) -> None:
        if args.stagger:
            # Clients start spread over one session length, so releases do not all
            # fall in the same millisecond (as real traffic; --no-stagger: waves).
            await trio.sleep(random.random() * args.session)
        while time.time() < stop_at:
            async with gate.session() as ticket:
                start = time.time()
                waiter = backend._by_ticket.get(ticket) if backend is not None else None
                seq = waiter.seq if waiter is not None else None
                await trio.sleep(args.session)
                end = time.time()
            records.append(
                {
                    "arrived": start - ticket.waited,
                    "start": start,
                    "end": end,
                    "waited": ticket.waited,
                    "fence": ticket.fencing_token,
                    "seq": int(seq) if seq else None,
                }
            )

    async def run(gate: sessiongate.Gate, backend: Any) -> None:
        stop_at = args.start_at + args.duration
        await trio.sleep(max(0.0, args.start_at - time.time()))
        async with trio.open_nursery() as nursery:
            for _ in range(args.clients):
                nursery.start_soon(client, gate, backend, stop_at)

    if args.backend == "memory":
        await run(sessiongate.Gate(args.capacity, max_wait=120), None)
        calls = 0
    else:
        async with open_redis_backend(
            args.backend, gate_name=args.gate, capacity=args.capacity, lease_ttl=10
        ) as backend:
            gate = sessiongate.Gate(args.capacity, max_wait=120, backend=backend)
            calls_before = backend.calls
            await run(gate, backend)
            calls = backend.calls - calls_before
    print(json.dumps({"records": records, "calls": calls}), flush=True)


# -- the driver ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_redis() -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server not found (or pass --redis URL)")
    port = free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", tempfile.gettempdir(), "--loglevel", "warning"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    for _ in range(200):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.1):
                break
        except OSError:
            time.sleep(0.02)
    return process, f"redis://127.0.0.1:{port}/0"


def redis_zcard(sock: socket.socket, key: str) -> int:
    sock.sendall(f"*2\r\n$5\r\nZCARD\r\n${len(key)}\r\n{key}\r\n".encode())
    return int(sock.recv(64)[1:].strip())


def quantile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def inversions(pairs: list[tuple[int, int]]) -> int:
    """Pairs (a, b) with a.seq < b.seq but a granted after b (fence order)."""
    from sortedcontainers import SortedList

    seen: SortedList = SortedList()
    count = 0
    for _, fence in sorted(pairs):
        count += len(seen) - seen.bisect_right(fence)
        seen.add(fence)
    return count


def analyse(
    records: list[dict[str, Any]], capacity: int, window: tuple[float, float]
) -> dict[str, Any]:
    lo, hi = window
    used = sum(max(0.0, min(r["end"], hi) - max(r["start"], lo)) for r in records)
    utilisation = used / (capacity * (hi - lo))
    ends = sorted(r["end"] for r in records)
    gaps = []
    for r in records:
        if r["waited"] > 0.002 and lo <= r["start"] <= hi:
            i = bisect_right(ends, r["start"])
            if i:
                gaps.append(r["start"] - ends[i - 1])
    events = sorted([(r["start"], 1) for r in records] + [(r["end"], -1) for r in records])
    running = most = 0
    for _, delta in events:
        running += delta
        most = max(most, running)
    queued = [(r["seq"], r["fence"]) for r in records if r["seq"] is not None and r["fence"]]
    admitted_in_window = sum(1 for r in records if lo <= r["start"] <= hi)
    return {
        "utilisation": utilisation,
        "handoff_p50_ms": quantile(gaps, 0.5) * 1000,
        "handoff_p99_ms": quantile(gaps, 0.99) * 1000,
        "most_overlapping": most,
        "fifo_inversions": inversions(queued) if queued else 0,
        "throughput_per_s": admitted_in_window / (hi - lo),
        "admissions": len(records),
    }


async def run_config(
    script: Path, backend: str, workers: int, args: argparse.Namespace, port: int | None
) -> dict[str, Any]:
    gate = "bench-" + uuid.uuid4().hex[:8]
    start_at = time.time() + 2.0  # every worker starts its clients at the same instant
    argv = [
        sys.executable, str(script), "--worker", "--backend", backend, "--gate", gate,
        "--capacity", str(args.capacity), "--clients", str(args.clients // workers),
        "--session", str(args.session), "--duration", str(args.duration),
        "--start-at", str(start_at), "--stagger" if args.stagger else "--no-stagger",
    ]  # fmt: skip
    outputs: list[dict[str, Any]] = []
    samples: list[int] = []

    async def one() -> None:
        result = await trio.run_process(argv, capture_stdout=True)
        outputs.append(json.loads(result.stdout))

    async def sample() -> None:
        assert port is not None
        key = f"sg:{{{gate}}}:holders"
        with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
            while True:
                samples.append(await trio.to_thread.run_sync(redis_zcard, sock, key))
                await trio.sleep(0.005)

    async with trio.open_nursery() as nursery:
        if port is not None:
            nursery.start_soon(sample)
        async with trio.open_nursery() as runners:
            for _ in range(workers):
                runners.start_soon(one)
        nursery.cancel_scope.cancel()
    records = [r for out in outputs for r in out["records"]]
    window = (start_at + 1.5 * args.session, start_at + args.duration)
    figures = analyse(records, args.capacity, window)
    figures["redis_cap_violations"] = sum(1 for n in samples if n > args.capacity)
    figures["redis_samples"] = len(samples)
    calls = sum(out["calls"] for out in outputs)
    figures["round_trips_per_admission"] = calls / max(1, len(records))
    return figures


async def driver(args: argparse.Namespace) -> None:
    script = Path(__file__).resolve()
    redis_process = None
    url = args.redis
    if url is None:
        redis_process, url = start_redis()
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    try:
        results = {"memory x1": await run_config(script, "memory", 1, args, None)}
        for workers in args.workers:
            results[f"redis x{workers}"] = await run_config(script, url, workers, args, port)
    finally:
        if redis_process is not None:
            redis_process.terminate()
            redis_process.wait()
    base = results["memory x1"]["throughput_per_s"]
    print(
        f"capacity {args.capacity}, {args.clients} closed-loop clients, "
        f"{args.session:g} s sessions, {args.duration:g} s per run"
    )
    header = (
        f"{'config':<11} {'util':>6} {'gap p50':>8} {'gap p99':>8} {'inv':>4} "
        f"{'over cap':>8} {'redis>cap':>9} {'rt/adm':>6} {'adm/s':>6} {'vs mem':>6}"
    )
    print(header)
    for name, f in results.items():
        print(
            f"{name:<11} {f['utilisation']:>6.1%} {f['handoff_p50_ms']:>6.2f}ms "
            f"{f['handoff_p99_ms']:>6.2f}ms {f['fifo_inversions']:>4} "
            f"{max(0, f['most_overlapping'] - args.capacity):>8} "
            f"{f.get('redis_cap_violations', 0):>9} "
            f"{f.get('round_trips_per_admission', 0):>6.2f} "
            f"{f['throughput_per_s']:>6.1f} {f['throughput_per_s'] / base:>6.2f}"
        )
    if args.json:
        print(json.dumps(results, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--backend", default="memory", help=argparse.SUPPRESS)
    parser.add_argument("--gate", default="bench", help=argparse.SUPPRESS)
    parser.add_argument("--start-at", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--redis", help="use this Redis instead of starting one")
    parser.add_argument("--capacity", type=int, default=50)
    parser.add_argument("--clients", type=int, default=100, help="in total, split over workers")
    parser.add_argument("--session", type=float, default=1.0, help="session length, seconds")
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run")
    parser.add_argument("--workers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--json", action="store_true", help="also print the raw figures")
    parser.add_argument(
        "--stagger",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="spread the clients' first sessions over one session length",
    )
    args = parser.parse_args()
    trio.run(worker if args.worker else driver, args)


if __name__ == "__main__":
    main()
