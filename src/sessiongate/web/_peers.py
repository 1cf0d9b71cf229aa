"""Sibling workers of ``sessiongate serve --workers N``: whose session is this?

The workers share one listening socket, so the kernel hands a connection to any of them,
while a session's object (its state, its event stream, its cancel scope) lives in the
worker that created it. So that the URLs of an asynchronous session answer whichever
worker takes the connection, each worker also serves on a private Unix socket in a
directory the supervisor made, and puts its worker number in the ids of the sessions it
creates (``w<n>.`` before the 128 random bits). A request for another worker's session
is passed to that worker's socket as it came, and its answer (an event stream too)
passed back. Only ``GET``, ``DELETE`` and ``/events`` of one session travel this way;
everything else (and every synchronous answer) stays in the worker that has it.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import socket
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import attrs
import httpx
import trio
from quart import Response, request

#: Where the supervisor tells its workers about each other (not settings: internal).
PEERS_ENV = "_SESSIONGATE_PEERS"
WORKER_ENV = "_SESSIONGATE_WORKER"

#: Request headers that belong to the client's connection, not to the request.
_HOP_BY_HOP = frozenset(
    {
        "host",
        "connection",
        "keep-alive",
        "transfer-encoding",
        "te",
        "upgrade",
        "content-length",
        "expect",
    }
)
#: A session id made by a sibling worker: ``w<number>.<128 random bits, url-safe>``.
_SIBLING_ID = re.compile(r"w([0-9]{1,4})\.[A-Za-z0-9_-]{22}")
#: Seconds between looks at whether the sibling workers have drained.
DRAIN_LOOK_EVERY = 0.1
#: The file the supervisor makes in the workers' directory as it stops them all.
STOPPING = "stopping"
#: Answer headers worth passing back from the worker that has the session.
_PASSED_HEADERS = ("content-type", "cache-control", "x-accel-buffering", "retry-after", "allow")


class OwnerGone(Exception):
    """The worker that has the session went away while its answer was passed on."""


@attrs.define
class Peers:
    """This worker's number, and where every worker's private socket is."""

    directory: Path
    index: int
    _clients: dict[int, httpx.AsyncClient] = attrs.Factory(dict)
    _in_flight: int = 0
    #: The supervisor is gone (its lifeline closed): nobody else removes the directory.
    orphaned: bool = False
    _idle: trio.Event = attrs.Factory(trio.Event)

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> Peers | None:
        directory, index = environ.get(PEERS_ENV), environ.get(WORKER_ENV)
        if directory is None or index is None or not index.isdigit():
            return None
        return cls(Path(directory), int(index))

    def socket_path(self, index: int | None = None) -> Path:
        return self.directory / f"w{self.index if index is None else index}.sock"

    def _drained_path(self, index: int) -> Path:
        return self.directory / f"w{index}.drained"

    def note_running(self) -> None:
        """Forget a drain of this worker's previous life (a restarted worker)."""
        self._drained_path(self.index).unlink(missing_ok=True)

    def note_drained(self) -> None:
        """Tell the siblings this worker's drain is over."""
        self._drained_path(self.index).touch()

    def all_stopping(self) -> bool:
        """Whether the supervisor is stopping every worker (not this one alone)."""
        return (self.directory / STOPPING).exists()

    async def wait_siblings_drained(self) -> None:
        """Return once every live sibling has drained.

        When the supervisor stops them all, a worker whose drain is over keeps serving
        until then: a sibling still draining passes it the requests for its sessions,
        which a worker that had exited answered 404 (an outside review: 6 of 10 drained
        sessions unreadable through the port still serving, though the SPEC keeps them
        readable). Workers are separate processes with no channel between them but this
        directory, so it is looked at every :data:`DRAIN_LOOK_EVERY` seconds; a sibling
        whose socket takes no connection is dead (killed, it left its socket behind)
        and not waited for. The caller bounds the wait.
        """
        while True:
            waiting = [
                path
                for path in self.directory.glob("w*.sock")
                if path != self.socket_path() and not path.with_suffix(".drained").exists()
            ]
            if not any(map(_listening, waiting)):
                return
            await trio.sleep(DRAIN_LOOK_EVERY)

    def leave(self) -> None:
        """This worker's files gone; the directory too, by the last worker out, but only
        once the supervisor is gone (``orphaned``): while it lives it restarts workers
        into the directory and removes it itself (a regression review: every worker
        stopped by hand at once took the directory, and each restart then failed).
        """
        self.socket_path().unlink(missing_ok=True)
        self._drained_path(self.index).unlink(missing_ok=True)
        if not self.orphaned:
            return
        with contextlib.suppress(OSError):
            left = list(self.directory.iterdir())
            if all(path.name == STOPPING for path in left):
                for path in left:
                    path.unlink(missing_ok=True)
                self.directory.rmdir()

    def new_session_id(self) -> str:
        return f"w{self.index}.{secrets.token_urlsafe(16)}"

    def owner_of(self, session_id: str) -> int | None:
        """The worker whose session this is, if another worker's. Only an id of the
        shape this module makes counts (anything else is looked up here, and is 404)."""
        match = _SIBLING_ID.fullmatch(session_id)
        if match is None:
            return None
        owner = int(match.group(1))
        return owner if owner != self.index else None

    async def forward(self, owner: int, path: str, *, stream: bool) -> Response | None:
        """The owner's answer to this request for ``path`` (built from the checked id,
        never the client's raw path); None if the owner cannot be reached (a worker
        that died took its sessions with it). ``stream``: pass the answer on as it
        comes (an event stream); otherwise whole, with its length."""
        client = self._clients.get(owner)
        if client is None:
            transport = httpx.AsyncHTTPTransport(uds=os.fspath(self.socket_path(owner)))
            client = self._clients[owner] = httpx.AsyncClient(
                transport=transport, base_url="http://worker", timeout=None
            )
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP]
        outgoing = client.build_request(request.method, path, headers=headers)
        self._in_flight += 1
        try:
            answer = await client.send(outgoing, stream=True)
        except httpx.TransportError:
            self._done()
            return None
        passed = {k: v for k, v in answer.headers.items() if k.lower() in _PASSED_HEADERS}
        if not stream:
            try:
                data = await answer.aread()
            except httpx.TransportError:
                return None
            finally:
                await answer.aclose()
                self._done()
            response = Response(data, status=answer.status_code, headers=passed)
            length = answer.headers.get("content-length")
            if request.method == "HEAD" and length is not None and length.isdigit():
                response.content_length = int(length)  # the GET's, as the owner said
            return response

        async def body() -> AsyncIterator[bytes]:
            try:
                async for chunk in answer.aiter_raw():
                    yield chunk
            except httpx.TransportError as error:
                # The owner went away mid-stream. Ending the stream here would read as
                # a stream that ended (an outside review: no terminal event, yet a
                # clean end); the client's connection is cut instead, as the owner's
                # own connections were.
                raise OwnerGone(f"worker {owner} went away while passing on {path}") from error
            finally:
                await answer.aclose()
                self._done()

        response = Response(body(), status=answer.status_code, headers=passed)
        response.timeout = None  # an event stream lasts as long as its session
        return response

    def _done(self) -> None:
        self._in_flight -= 1
        if self._in_flight == 0:
            idle, self._idle = self._idle, trio.Event()
            idle.set()

    async def wait_idle(self) -> None:
        """Return once no forwarded request is in flight (a drain waits for the owners'
        final events to pass through before this worker's server stops)."""
        while self._in_flight:
            await self._idle.wait()

    async def aclose(self) -> None:
        for client in self._clients.values():
            await client.aclose()
        self._clients.clear()


def note_stopping(directory: str | Path) -> None:
    """Every worker stops (the supervisor stops them, or is gone): each waits for its
    siblings' drains. Never fails the stop: a directory gone is nothing to note in."""
    with contextlib.suppress(OSError):
        (Path(directory) / STOPPING).touch()


def _listening(path: Path) -> bool:
    """Whether a process listens on the Unix socket ``path`` (a connect is immediate;
    non-blocking, so a full backlog never blocks the loop: it means someone listens)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)
        try:
            probe.connect(os.fspath(path))
        except BlockingIOError:
            return True
        except OSError:
            return False
    return True
