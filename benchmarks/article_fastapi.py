"""The first article's FastAPI service, re-implemented for the HTTP benchmark.

Served by plain uvicorn, as the article would be::

    ARTICLE_SESSION_SECONDS=1 ARTICLE_RTO=5 \\
        .venv/bin/uvicorn article_fastapi:app --app-dir benchmarks --port 8001

The endpoint is the article's ``POST /session`` line for line (``asyncio.Semaphore``, a
``locked()`` check, an unread ``asyncio.Queue``, a 1 s polling loop, ``HTTPException(408)``
past the RTO), with the article's constants read from the environment so the benchmark
can scale them (``ARTICLE_MAX_ACTIVE`` 50, ``ARTICLE_RTO`` 60, ``ARTICLE_POLL`` 1,
``ARTICLE_SESSION_SECONDS`` 5). One addition, for measurement only: the answer carries
the server's own stamps (``time.time()``) of arrival, admission and end, in the JSON
body on success and in ``X-Bench-*`` headers on expiry, so that hand-off gaps and FIFO
order are measured on the server's side, as they are for sessiongate.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from fastapi import FastAPI, HTTPException

from article_baseline import SessionManager

MAX_ACTIVE_SESSIONS = int(os.environ.get("ARTICLE_MAX_ACTIVE", "50"))
RTO_LIMIT_SECONDS = float(os.environ.get("ARTICLE_RTO", "60"))
POLL_SECONDS = float(os.environ.get("ARTICLE_POLL", "1"))
SESSION_SECONDS = float(os.environ.get("ARTICLE_SESSION_SECONDS", "5"))


app = FastAPI()
# The article's SessionManager, as article_baseline.py writes it (same directory).
session_manager = SessionManager(MAX_ACTIVE_SESSIONS)


@app.post("/session")
async def create_session(data: dict[str, Any]) -> dict[str, Any]:
    start_wait = time.time()

    # Slot available then start immediately
    if session_manager.semaphore.locked() is False:
        await session_manager.acquire_slot()
        return await run_session(data, start_wait)

    # Slot full then enter queue
    await session_manager.enqueue(data)

    # Wait until slot becomes available or timeout occurs
    while time.time() - start_wait < RTO_LIMIT_SECONDS:
        if session_manager.semaphore.locked() is False:
            await session_manager.acquire_slot()
            return await run_session(data, start_wait)

        await asyncio.sleep(POLL_SECONDS)

    # Timeout then RTO exceeded
    raise HTTPException(
        status_code=408,
        detail=f"Session expired: RTO limit ({RTO_LIMIT_SECONDS:g}s) exceeded",
        headers={"X-Bench-Arrived": repr(start_wait), "X-Bench-Expired": repr(time.time())},
    )


async def run_session(data: dict[str, Any], arrived: float) -> dict[str, Any]:
    admitted = time.time()
    try:
        # Simulate session workload
        await asyncio.sleep(SESSION_SECONDS)

        return {
            "status": "running",
            "data": data,
            "bench": {"arrived": arrived, "admitted": admitted, "ended": time.time()},
        }

    finally:
        # Slot must always be released
        session_manager.release_slot()


@app.get("/queue-size")
async def queue_size() -> dict[str, int]:
    """For the benchmark: how many payloads the unread queue holds."""
    return {"qsize": session_manager.queue.qsize()}
