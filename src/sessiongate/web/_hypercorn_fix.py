"""A fix for a race in Hypercorn 0.18's Trio connection handler that crashed the server.

Hypercorn closes a connection (``TCPServer._close``: ``send_eof``, which checkpoints
while it holds the stream's send side, then ``aclose``) from whichever task learns that
the connection is done, *outside* its ``send_lock``. When the app's task closes it after
an answer (``Connection: close``, a 413 with the body still arriving) while the
connection's reading task answers bytes that arrived after the request (h11: "Got data
when expecting EOF") with its own 400, the two sends meet and trio raises
``BusyResourceError`` in ``TCPServer.protocol_send``. Hypercorn catches it in ``_close``
but not there: in the reading task it escaped to the server's nursery and **stopped the
whole process** (an outside review: an oversized body, two stray bytes and
``Connection: close``, with ``--max-body 4096``, crashed it within four requests); in an
app's task it logged a traceback per request.

A send that meets the connection being closed is answered as a closed connection, as
``protocol_send`` already does for ``BrokenResourceError`` / ``ClosedResourceError``.
Applied once, by :func:`sessiongate.web.create_app`, so it covers ``sessiongate serve``
and plain ``hypercorn`` alike; the test suite reproduces the crash.
"""

from __future__ import annotations

import functools

import trio
from hypercorn.events import Closed, Event
from hypercorn.trio.tcp_server import TCPServer


@functools.cache  # once per process, however many apps are made
def apply() -> None:
    """Patch ``TCPServer.protocol_send``."""
    original = TCPServer.protocol_send

    async def protocol_send(self: TCPServer, event: Event) -> None:
        try:
            await original(self, event)
        except trio.BusyResourceError:
            # The other task is closing this connection: the send is moot.
            await self.protocol.handle(Closed())

    TCPServer.protocol_send = protocol_send  # type: ignore[method-assign]
