"""A lean closed-loop HTTP/1.1 load generator: asyncio streams, no HTTP library.

Each client owns one keep-alive connection and sends the same request again as soon as
the previous answer is in, until ``stop_at``. The parser understands exactly what the
servers under test send (a status line, headers, a ``Content-Length`` or chunked body),
which keeps the generator's own cost to a few tens of microseconds per exchange; the
caller prints its CPU so a reader can tell it was not the bottleneck.

An answer's receive time is taken as its first bytes are read from the socket
(:class:`StampedConnection`), before it is parsed: when a few hundred answers arrive at
once (an overload's expiry wave), the loop reads the ones ready in one pass, then runs
the clients one after another, each parsing its answer and sending its next request
(~60 us on the 2-core VM here). Stamped after that, the last answer of a wave of 250
carried ~15 ms of the generator's own work. An answer that arrives while the generator
is busy with earlier ones is still read late; each read therefore also takes the
kernel's receive stamp of its bytes (``SO_TIMESTAMPNS``, as the server stamps its
requests): when the answer reached the client's host, whatever the generator was doing.
"""

from __future__ import annotations

import asyncio
import socket
import struct
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
    #: The kernel's receive stamp of the answer's first bytes (time.time()), if known.
    t_kernel: float | None = None


def build_request(method: str, host: str, port: int, path: str, body: bytes) -> bytes:
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode("ascii") + body


#: Linux's SO_TIMESTAMPNS (the socket module may not name it), and room for its message.
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
_TIMESPEC = struct.Struct("@qq")
_ANCILLARY = socket.CMSG_SPACE(_TIMESPEC.size)


class StampedConnection:
    """A client connection read with ``recvmsg`` into an asyncio ``StreamReader``,
    noting when the first bytes since :meth:`expect` were read (``first_bytes_at``)
    and the kernel's receive stamp of those bytes (``kernel_at``)."""

    def __init__(self, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        self.sock = sock
        self.reader = asyncio.StreamReader(limit=2**16, loop=loop)
        self.first_bytes_at: float | None = None
        self.kernel_at: float | None = None
        self._loop = loop
        self._sending: set[asyncio.Task[None]] = set()
        loop.add_reader(sock.fileno(), self._readable)

    def expect(self) -> None:
        """An answer is due: the next bytes read are its first."""
        self.first_bytes_at = self.kernel_at = None

    def _readable(self) -> None:
        try:
            data, ancillary, _, _ = self.sock.recvmsg(65536, _ANCILLARY)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            self._loop.remove_reader(self.sock.fileno())
            self.reader.set_exception(error)
            return
        if self.first_bytes_at is None:
            self.first_bytes_at = time.time()
            for level, kind, stamp in ancillary:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    sec, nsec = _TIMESPEC.unpack_from(stamp)
                    self.kernel_at = sec + nsec * 1e-9
        if not data:
            self._loop.remove_reader(self.sock.fileno())
            self.reader.feed_eof()
            return
        self.reader.feed_data(data)

    def write(self, data: bytes) -> None:
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        if sent < len(data):  # a full buffer (not with these small requests)
            task = self._loop.create_task(self._loop.sock_sendall(self.sock, data[sent:]))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    def close(self) -> None:
        if self.sock.fileno() != -1:
            self._loop.remove_reader(self.sock.fileno())
            self.sock.close()


async def open_stamped_connection(host: str, port: int) -> StampedConnection:
    """A connected :class:`StampedConnection` (``TCP_NODELAY``, as asyncio's own)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await loop.sock_connect(sock, (host, port))
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    except BaseException:
        sock.close()
        raise
    return StampedConnection(sock, loop)


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
    conn = await open_stamped_connection(host, port)
    await start.wait()
    try:
        while time.time() < stop_at[0]:
            t_send = time.time()
            try:
                conn.expect()
                conn.write(request)
                status, headers, body = await read_response(conn.reader)
            except (OSError, asyncio.IncompleteReadError) as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                conn.close()
                await asyncio.sleep(0.01)
                conn = await open_stamped_connection(host, port)
                continue
            t_recv = conn.first_bytes_at or time.time()
            out.append(Exchange(index, t_send, t_recv, status, body, headers, conn.kernel_at))
            if headers.get(b"connection", b"").lower() == b"close":
                conn.close()
                conn = await open_stamped_connection(host, port)
    finally:
        conn.close()


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
