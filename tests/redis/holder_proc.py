"""A separate process for the failure tests: it holds slots (or waits for one) on a gate.

Run as ``python holder_proc.py URL GATE --capacity N --ttl S --hold K [--wait]``. It
prints one line per event, each ``<event> <unix time> [detail]``, and flushes:
``ready``, ``admitted <fence>``, ``queued``, ``lease_lost``, ``call <op>`` (every
script call, to show what it sent to Redis and when).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import trio

import sessiongate
from sessiongate.backends.redis import RedisBackend, open_redis_backend


def say(event: str, detail: object = "") -> None:
    print(f"{event} {time.time():.6f} {detail}".rstrip(), flush=True)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("gate")
    parser.add_argument("--capacity", type=int, default=1)
    parser.add_argument("--ttl", type=float, default=1.0)
    parser.add_argument("--hold", type=int, default=1, help="sessions to open")
    args = parser.parse_args()
    async with open_redis_backend(
        args.url, gate_name=args.gate, capacity=args.capacity, lease_ttl=args.ttl
    ) as backend:
        calls = backend._call_figures

        async def traced(op: str, argv: object, *, limit: float, **options: Any) -> object:
            say("call", op)
            return await calls(op, argv, limit=limit, **options)  # type: ignore[arg-type]

        backend._call_figures = traced  # type: ignore[method-assign,assignment]
        gate = sessiongate.Gate(args.capacity, max_wait=60, backend=backend)
        say("ready")

        async def session(n: int) -> None:
            try:
                async with gate.session() as ticket:
                    say("admitted", ticket.fencing_token)
                    await trio.sleep_forever()
            except sessiongate.LeaseLost:
                say("lease_lost", n)

        async with trio.open_nursery() as nursery:
            for n in range(args.hold):
                nursery.start_soon(session, n)
            await watch_queue(backend, args.hold)

        say("done")


async def watch_queue(backend: RedisBackend, sessions: int) -> None:
    reported = False
    while not reported:
        await trio.sleep(0.01)
        if backend._by_ticket and any(w.seq for w in backend._by_ticket.values()):
            say("queued")
            reported = True


if __name__ == "__main__":
    trio.run(main)
