"""A lean closed-loop HTTP/1.1 load generator: asyncio streams, no HTTP library.

Each client owns one keep-alive connection and sends the same request again as soon as
the previous answer is in, until ``stop_at``. The parser understands exactly what the
servers under test send (a status line, headers, a ``Content-Length`` or chunked body),
which keeps the generator's own cost to a few tens of microseconds per exchange; the
caller prints its CPU so a reader can tell it was not the bottleneck.

An answer's receive time is taken as its first bytes are read from the socket (the
connection's protocol, :class:`StampedProtocol`), before it is parsed: when a few
hundred answers arrive at once (an overload's expiry wave), asyncio reads them all in
one pass of its loop, then runs the clients one after another, each parsing its answer
and sending its next request (~60 us on the 2-core VM here). Stamped after that, the
last answer of a wave of 250 carried ~15 ms of the generator's own work.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass


@dataclass(slots=True)
class Exchange:
    client: int
    t_send: float  # time.time(): comparable with the servers' own stamps
    t_recv: float
    status: int
    body: bytes
    headers: dict[bytes, bytes]


def build_request(method: str, host: str, port: int, path: str, body: bytes) -> bytes:
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("ascii") + body


class StampedProtocol(asyncio.StreamReaderProtocol):
    """asyncio's stream protocol, noting when the first bytes since :meth:`expect` came."""

    first_bytes_at: float | None = None

    def expect(self) -> None:
        """An answer is due: the next bytes read are its first."""
        self.first_bytes_at = None

    def data_received(self, data: bytes) -> None:
        if self.first_bytes_at is None:
            self.first_bytes_at = time.time()
        super().data_received(data)


async def open_stamped_connection(
    host: str, port: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, StampedProtocol]:
    """``asyncio.open_connection`` (as it is made), with a :class:`StampedProtocol`."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=2**16, loop=loop)
    protocol = StampedProtocol(reader, loop=loop)
    transport, _ = await loop.create_connection(lambda: protocol, host, port)
    writer = asyncio.StreamWriter(transport, protocol, reader, loop)
    return reader, writer, protocol


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[bytes, bytes], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
    length = headers.get(b"content-length")
    if length is not None:
        body = await reader.readexactly(int(length))
    elif headers.get(b"transfer-encoding", b"").lower() == b"chunked":
        parts = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                break
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)
        body = b"".join(parts)
    else:
        body = b""
    return status, headers, body


async def closed_loop(
    index: int,
    host: str,
    port: int,
    request: bytes,
    start: asyncio.Event,
    stop_at: list[float],
    out: list[Exchange],
    errors: list[str],
) -> None:
    """One client: connect, wait for ``start``, then send/receive until ``stop_at[0]``."""
    reader, writer, protocol = await open_stamped_connection(host, port)
    await start.wait()
    try:
        while time.time() < stop_at[0]:
            t_send = time.time()
            try:
                protocol.expect()
                writer.write(request)
                status, headers, body = await read_response(reader)
            except (OSError, asyncio.IncompleteReadError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                writer.close()
                await asyncio.sleep(0.01)
                reader, writer, protocol = await open_stamped_connection(host, port)
                continue
            t_recv = protocol.first_bytes_at or time.time()
            out.append(Exchange(index, t_send, t_recv, status, body, headers))
            if headers.get(b"connection", b"").lower() == b"close":
                writer.close()
                reader, writer, protocol = await open_stamped_connection(host, port)
    finally:
        writer.close()


async def run_clients(
    host: str, port: int, request: bytes, clients: int, window: float, tail: float
) -> tuple[list[Exchange], list[str], float]:
    """Run ``clients`` closed-loop clients for ``window`` seconds (no new request after
    that; answers still coming are awaited for at most ``tail`` more seconds).

    Returns the exchanges, the errors, and the start time (``time.time()``).
    """
    out: list[Exchange] = []
    errors: list[str] = []
    start = asyncio.Event()
    stop_at = [float("inf")]
    tasks = [
        asyncio.create_task(closed_loop(i, host, port, request, start, stop_at, out, errors))
        for i in range(clients)
    ]
    # Let every client connect first, so that they all start together.
    await asyncio.sleep(0.2)
    t0 = time.time()
    stop_at[0] = t0 + window
    start.set()
    done, pending = await asyncio.wait(tasks, timeout=window + tail)
    for task in pending:
        task.cancel()
    if pending:
        errors.append(f"{len(pending)} clients still waiting {tail:g} s after the window")
        await asyncio.gather(*pending, return_exceptions=True)
    for task in done:
        if task.exception() is not None:
            errors.append(repr(task.exception()))
    return out, errors, t0
