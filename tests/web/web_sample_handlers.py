"""User handlers for the tests (imported by path, as ``--handler`` does)."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio

from sessiongate import AdmissionError, GateClosed, LeaseLost, QueueFull, QueueTimeout, Ticket

CALLS: list[str] = []
#: Called once each (and removed) by ``stall_loop`` just before it blocks the loop.
ON_STALL: list[Callable[[], None]] = []
STARTED = threading.Event()
RELEASE = threading.Event()


async def echo(body: dict[str, Any], ticket: Ticket) -> Any:
    return {"echo": body, "id": ticket.id, "waited": ticket.waited}


async def boom(body: dict[str, Any], ticket: Ticket) -> Any:
    raise RuntimeError("secret internal detail")


def sync_echo(body: dict[str, Any], ticket: Ticket) -> Any:
    CALLS.append(threading.current_thread().name)
    return {"thread": threading.current_thread() is not threading.main_thread(), "body": body}


def sync_boom(body: dict[str, Any], ticket: Ticket) -> Any:
    raise ValueError("sync secret")


async def exits(body: dict[str, Any], ticket: Ticket) -> Any:
    raise SystemExit("secret exit")


def sync_interrupt(body: dict[str, Any], ticket: Ticket) -> Any:
    raise KeyboardInterrupt("secret interrupt")


class OddBaseError(BaseException):
    """Neither an Exception nor one of Python's own BaseExceptions."""


async def generator_exit(body: dict[str, Any], ticket: Ticket) -> Any:
    raise GeneratorExit("secret generator exit")


def sync_odd_base(body: dict[str, Any], ticket: Ticket) -> Any:
    raise OddBaseError("secret odd base")


async def odd_base_group(body: dict[str, Any], ticket: Ticket) -> Any:
    raise BaseExceptionGroup("secret group", [OddBaseError("secret odd base")])


def blocking(body: dict[str, Any], ticket: Ticket) -> Any:
    STARTED.set()
    RELEASE.wait(10)
    return "released"


async def not_json(body: dict[str, Any], ticket: Ticket) -> Any:
    return {1, 2, 3}


async def nan(body: dict[str, Any], ticket: Ticket) -> Any:
    return float("nan")


async def with_resource(body: dict[str, Any], ticket: Ticket) -> Any:
    return {"resource": RESOURCE["value"]}


RESOURCE: dict[str, Any] = {"value": None, "opened": 0}


@asynccontextmanager
async def _lifespan() -> AsyncIterator[None]:
    RESOURCE["opened"] += 1
    RESOURCE["value"] = "pool"
    await trio.lowlevel.checkpoint()
    yield
    RESOURCE["value"] = None


with_resource.lifespan = _lifespan  # type: ignore[attr-defined]


CONCURRENCY = {"now": 0, "max": 0}


async def tracked(body: dict[str, Any], ticket: Ticket) -> Any:
    CONCURRENCY["now"] += 1
    CONCURRENCY["max"] = max(CONCURRENCY["max"], CONCURRENCY["now"])
    try:
        await trio.sleep(float(body.get("duration", 0.01)))
    finally:
        CONCURRENCY["now"] -= 1
    return ticket.waited


def _stray_cancelled() -> trio.Cancelled:
    """A Cancelled that no cancel scope of the session's delivered (kept from elsewhere)."""
    try:
        return trio.Cancelled._create(source="explicit")  # type: ignore[call-arg]
    except TypeError:  # trio before 0.30 took no arguments
        return trio.Cancelled._create()


async def raises_cancelled(body: dict[str, Any], ticket: Ticket) -> Any:
    raise _stray_cancelled()


def sync_raises_cancelled(body: dict[str, Any], ticket: Ticket) -> Any:
    raise _stray_cancelled()


async def raises_cancelled_group(body: dict[str, Any], ticket: Ticket) -> Any:
    raise BaseExceptionGroup("secret group", [_stray_cancelled(), ValueError("secret")])


@asynccontextmanager
async def _slow_start() -> AsyncIterator[None]:
    print("slow lifespan entered", file=sys.stderr, flush=True)
    await trio.sleep(120)
    yield


async def slow_start(body: dict[str, Any], ticket: Ticket) -> Any:
    return body


slow_start.lifespan = _slow_start  # type: ignore[attr-defined]


async def stall_loop(body: dict[str, Any], ticket: Ticket) -> Any:
    """Blocks the whole event loop for ``body["stall"]`` seconds (a server too busy to
    read its sockets), after running the ``ON_STALL`` callbacks."""
    while ON_STALL:
        ON_STALL.pop()()
    time.sleep(float(body.get("stall", 0)))  # noqa: ASYNC251 - blocking is the point
    return "stalled"


async def ignores_cancellation(body: dict[str, Any], ticket: Ticket) -> Any:
    """A handler that cannot be cancelled (a shielded wait) for ``duration`` seconds."""
    with trio.CancelScope(shield=True):
        await trio.sleep(float(body.get("duration", 60)))
    return body


@asynccontextmanager
async def _blocks_on_close() -> AsyncIterator[None]:
    yield
    with trio.CancelScope(shield=True):
        await trio.sleep(60)


async def blocks_on_close(body: dict[str, Any], ticket: Ticket) -> Any:
    return body


blocks_on_close.lifespan = _blocks_on_close  # type: ignore[attr-defined]


@asynccontextmanager
async def _fails_to_start() -> AsyncIterator[None]:
    raise RuntimeError("the resource this handler needs is not there")
    yield  # an async generator all the same


async def fails_to_start(body: dict[str, Any], ticket: Ticket) -> Any:
    return body


fails_to_start.lifespan = _fails_to_start  # type: ignore[attr-defined]


# A handler guarding a resource with a Gate of its own may raise that gate's refusals:
# the session failed (500 session_failed), it was not refused by the service's gate.
async def own_queue_full(body: dict[str, Any], ticket: Ticket) -> Any:
    await trio.sleep(1)
    raise QueueFull(0)


async def own_queue_timeout(body: dict[str, Any], ticket: Ticket) -> Any:
    await trio.sleep(1)
    raise QueueTimeout(0.5, 0.5)


async def own_gate_closed(body: dict[str, Any], ticket: Ticket) -> Any:
    raise GateClosed("secret: the handler's own gate is closing")


async def own_admission_error(body: dict[str, Any], ticket: Ticket) -> Any:
    raise AdmissionError("secret: downstream said no")


def sync_own_lease_lost(body: dict[str, Any], ticket: Ticket) -> Any:
    raise LeaseLost("secret: the handler's own lease")
