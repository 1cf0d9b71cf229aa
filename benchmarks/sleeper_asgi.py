"""A plain sleeping backend for HAProxy's column: no framework, one ASGI function.

``POST`` anything with a JSON body ``{"duration": seconds}``: it sleeps that long and
answers ``{"arrived", "admitted", "ended"}`` (``time.time()`` stamps: when the request
reached this backend, i.e. when HAProxy let it through, and when the sleep ended)::

    .venv/bin/uvicorn sleeper_asgi:app --app-dir benchmarks --port 8002
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    admitted = time.time()
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    try:
        duration = float(json.loads(body or b"{}").get("duration", 0.0))
    except (ValueError, AttributeError):
        duration = 0.0
    if duration > 0:
        await asyncio.sleep(duration)
    out = json.dumps({"admitted": admitted, "ended": time.time()}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", b"%d" % len(out)),
            ],
        }
    )
    await send({"type": "http.response.body", "body": out})
