"""A handler module that sends its own process a signal (``SIGNALS_ON_IMPORT`` of
them) as ``sessiongate serve`` imports it: a SIGTERM (or SIGINT, from
``SIGNAL_ON_IMPORT``) that arrives while the service is starting, before its own
signal handling listens. Workers of ``serve --workers N`` (which import it too) do not."""

import os
import signal

if "_SESSIONGATE_WORKER" not in os.environ:
    for _ in range(int(os.environ.get("SIGNALS_ON_IMPORT", "1"))):
        os.kill(os.getpid(), getattr(signal, os.environ.get("SIGNAL_ON_IMPORT", "SIGTERM")))


async def handler(body: dict[str, object], ticket: object) -> object:
    return body
