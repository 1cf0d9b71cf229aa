"""The first article's session manager, re-implemented faithfully for the benchmarks.

This is the baseline sessiongate must beat ("Handling Multi-Session Load in FastAPI",
``shared/seeds/000_*.txt``). The algorithm is kept exactly as the article gives it:

* an ``asyncio.Semaphore(MAX_ACTIVE_SESSIONS)`` as the cap;
* a ``locked()`` check on arrival: a free slot is taken at once, whoever is waiting
  (a newcomer can jump the queue);
* otherwise the payload is put into an ``asyncio.Queue`` that nothing ever reads (it
  grows by one payload per queued request, forever);
* a polling loop that checks ``locked()`` and sleeps 1 s, until ``RTO`` seconds have
  passed since the request arrived (measured with ``time.time()``); then the request
  expires (the article raises ``HTTPException(408)``);
* ``run_session`` releases the slot in ``try/finally``.

The only changes are knobs for scaled runs (capacity, RTO, poll interval, session length)
and an optional ``on_admit`` / ``on_release`` hook pair, called where the article's own
code starts and ends a session, so the benchmark can time hand-offs. asyncio is used
here and only here: it is the article's runtime, not ours.

Note on the "untimed ``acquire()``": in a single-threaded event loop the article's
``locked()`` check and the ``acquire()`` right after it cannot be separated by another
task (nothing awaits in between), so ``acquire()`` never actually blocks; the baseline's
waits past its RTO come from the 1 s polling granularity instead (the last poll can
start up to 1 s before the RTO and the expiry answer comes one sleep later).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

MAX_ACTIVE_SESSIONS = 50
RTO_LIMIT_SECONDS = 60
POLL_SECONDS = 1.0
SESSION_SECONDS = 5.0


class SessionExpired(Exception):
    """The article's ``HTTPException(status_code=408, detail="Session expired: ...")``."""

    status_code = 408

    def __init__(self, rto: float) -> None:
        super().__init__(f"Session expired: RTO limit ({rto:g}s) exceeded")
        self.rto = rto


class SessionManager:
    """The article's ``SessionManager``: a semaphore and a queue nobody reads."""

    def __init__(self, max_active: int = MAX_ACTIVE_SESSIONS) -> None:
        self.semaphore = asyncio.Semaphore(max_active)
        self.queue: asyncio.Queue[Any] = asyncio.Queue()

    async def acquire_slot(self) -> None:
        await self.semaphore.acquire()

    def release_slot(self) -> None:
        self.semaphore.release()

    async def enqueue(self, payload: Any) -> None:
        await self.queue.put(payload)


Hook = Callable[[], None]


def _noop() -> None:
    pass


class ArticleService:
    """The article's endpoint and ``run_session``, with the scale knobs as attributes."""

    def __init__(
        self,
        max_active: int = MAX_ACTIVE_SESSIONS,
        rto: float = RTO_LIMIT_SECONDS,
        poll: float = POLL_SECONDS,
        session_seconds: float = SESSION_SECONDS,
        *,
        on_admit: Hook = _noop,
        on_release: Hook = _noop,
        work: Callable[[dict[str, Any]], Awaitable[None]] | None = None,
    ) -> None:
        self.session_manager = SessionManager(max_active)
        self.rto = rto
        self.poll = poll
        self.session_seconds = session_seconds
        self.on_admit = on_admit
        self.on_release = on_release
        self.work = work

    async def create_session(self, data: dict[str, Any]) -> dict[str, Any]:
        """``POST /session`` as the article writes it."""
        session_manager = self.session_manager
        start_wait = time.time()

        # Slot available then start immediately
        if session_manager.semaphore.locked() is False:
            await session_manager.acquire_slot()
            return await self.run_session(data)

        # Slot full then enter queue
        await session_manager.enqueue(data)

        # Wait until slot becomes available or timeout occurs
        while time.time() - start_wait < self.rto:
            if session_manager.semaphore.locked() is False:
                await session_manager.acquire_slot()
                return await self.run_session(data)

            await asyncio.sleep(self.poll)

        # Timeout then RTO exceeded
        raise SessionExpired(self.rto)

    async def run_session(self, data: dict[str, Any]) -> dict[str, Any]:
        self.on_admit()
        try:
            # Simulate session workload
            if self.work is not None:
                await self.work(data)
            else:
                await asyncio.sleep(self.session_seconds)

            return {"status": "running", "data": data}

        finally:
            self.on_release()
            # Slot must always be released
            self.session_manager.release_slot()
