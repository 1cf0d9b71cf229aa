"""The raw-speed reference: a bare Quart-Trio endpoint on the same Hypercorn.

``POST /sessions`` parses the JSON body and answers ``{"data": <body>}``, as the gate's
zero-length ``sleep`` sessions do, with no gate. Served as ``sessiongate serve`` serves
(Hypercorn's Trio worker, programmatically, access log on stdout), so that the only
difference left is the gate and the session bookkeeping::

    .venv/bin/python benchmarks/bare_quart.py 127.0.0.1:8003
    .venv/bin/python benchmarks/bare_quart.py 127.0.0.1:8003 --tuned

``--tuned`` also takes the server tuning that ``sessiongate serve`` applies and that is
not about the gate (its lighter access logger, same line; its GC and logging settings), so that the
comparison can be made against the same server with and without the gate.
"""

from __future__ import annotations

import sys
from typing import Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from quart import request
from quart_trio import QuartTrio

app = QuartTrio(__name__)


@app.post("/sessions")
async def create_session() -> Any:
    body = await request.get_json(force=True, silent=True)
    return {"data": body if isinstance(body, dict) else {}}


@app.get("/healthz")
async def healthz() -> Any:
    return {"status": "ok"}


def main() -> None:
    args = sys.argv[1:]
    tuned = "--tuned" in args
    args = [a for a in args if a != "--tuned"]
    config = Config()
    config.bind = [args[0] if args else "127.0.0.1:8003"]
    config.accesslog = "-"
    config.errorlog = "-"
    config.backlog = 2048
    if tuned:
        from sessiongate.cli import (
            _access_logger_class,
            _tune_gc,
            _tune_logging,
            collect_garbage_when_idle,
        )

        config.logger_class = _access_logger_class()
        _tune_gc()
        _tune_logging()

        async def serve_tuned() -> None:
            collect_garbage_when_idle()
            await serve(app, config)

        trio.run(serve_tuned)
        return
    trio.run(serve, app, config)


if __name__ == "__main__":
    main()
