"""Raw speed as instructions per request (issue 3): deterministic where req/s is not.

The issue's raw-speed target compares requests per second of zero-length sessions with
a bare Quart-Trio endpoint on the same Hypercorn. On a shared 2-core VM those figures
move by ±20 % from one minute to the next, more than the differences being measured.
This script counts the server's CPU instructions per request instead, under
``valgrind --tool=callgrind``: the same code and load give the same count to within
~0.5 %, whatever else the machine is doing. Instrumentation is switched on only for the
measured requests (not for start-up or the warm-up), through ``callgrind_control``.

    .venv/bin/python benchmarks/bench_instructions.py              # ~3 minutes
    .venv/bin/python benchmarks/bench_instructions.py --requests 500
    .venv/bin/python benchmarks/bench_instructions.py --expiry 100  # per expiry answer

Servers measured, each serving ``POST /sessions {"duration": 0}`` over keep-alive
connections (a fixed number of requests from 50 connections, closed loop):

* **sessiongate**: ``sessiongate serve`` (the gate, the session task, the log line, the
  metrics);
* **bare**: a bare Quart-Trio endpoint on stock Hypercorn (``bare_quart.py``), parsing the
  body and answering ``{"data": body}`` as the ``sleep`` handler does;
* **bare, tuned**: the same with ``sessiongate serve``'s server tuning (``--tuned``).

Needs valgrind (``apt-get install valgrind``). Fewer instructions is faster; the ratio
``bare / sessiongate`` is the speed of sessiongate relative to the bare endpoint.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _metrics import git_rev, loadavg  # noqa: E402

PY = sys.executable
BIN = Path(PY).parent
BODY = b'{"duration": 0}'
REQUEST = (
    b"POST /sessions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return int(head.split(b" ", 2)[1]), await reader.readexactly(length)


async def drive(port: int, requests: int, connections: int) -> None:
    """Exactly ``requests`` requests, closed loop over ``connections`` keep-alive ones."""
    left = requests

    async def client() -> None:
        nonlocal left
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        while left > 0:
            left -= 1
            writer.write(REQUEST)
            await writer.drain()
            await read_answer(reader)
        writer.close()

    await asyncio.gather(*(client() for _ in range(connections)))


def wait_ready(port: int, process: subprocess.Popen[bytes], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
                if sock.recv(64).startswith(b"HTTP/1.1 200"):
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError("the server did not start")


def control(pid: int, switch: str) -> None:
    """Switch callgrind's counting on or off in a running server."""
    subprocess.run(["callgrind_control", "-i", switch, str(pid)], check=True, capture_output=True)


async def requests_workload(port: int, pid: int, requests: int) -> None:
    """Zero-length sessions: a warm-up, then ``requests`` counted."""
    await drive(port, 200, 20)  # warm-up, not counted
    control(pid, "on")
    await drive(port, requests, 50)
    control(pid, "off")


async def stats(port: int) -> dict[str, Any]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /stats HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
    body: dict[str, Any] = json.loads((await read_answer(reader))[1])
    writer.close()
    return body


async def expiry_workload(port: int, pid: int, sessions: int) -> None:
    """One expiry wave (issue 3's "expiry within 50 ms"): the only slot held, then
    ``sessions`` queued at once on their own connections; counting runs from 1 s before
    their deadline until the last ``queue_timeout`` answer is in and the server has
    finished with those requests (a warm-up wave first).
    """

    def post(duration: float) -> bytes:
        body = b'{"duration": %g}' % duration
        return (
            b"POST /sessions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )

    _, holder = await asyncio.open_connection("127.0.0.1", port)
    holder.write(post(10**6))
    for counted in (False, True):
        conns = [await asyncio.open_connection("127.0.0.1", port) for _ in range(sessions)]
        await asyncio.sleep(1.0)
        sent = time.monotonic()
        for _, writer in conns:
            writer.write(post(0))
        # Every session queued (under valgrind that takes seconds), then 1 s to go.
        while (await stats(port))["queued"] < sessions:
            await asyncio.sleep(0.5)
        lead = sent + EXPIRY_WAIT - 1.0 - time.monotonic()
        if lead <= 0:
            raise RuntimeError("the sessions took too long to queue; raise EXPIRY_WAIT")
        await asyncio.sleep(lead)
        if counted:
            control(pid, "on")
        statuses = [status for status, _ in [await read_answer(r) for r, _ in conns]]
        # What the server does after an answer is written (its request's access line,
        # recycling, teardown) counts too: a request on a new connection is answered
        # only after that work, which is runnable by then (one /stats answer counted).
        await stats(port)
        if counted:
            control(pid, "off")
        if set(statuses) != {503}:
            raise RuntimeError(f"expected queue_timeout answers only, got {set(statuses)}")
        for _, writer in conns:
            writer.close()
    holder.close()


#: The queue deadline of the expiry workload: long enough for every session to be
#: queued under valgrind (about 50 times slower) before it.
EXPIRY_WAIT = 25.0


def measure(
    name: str,
    command: list[str],
    port: int,
    workload: Callable[[int, int], Awaitable[None]],
    units: int,
) -> float:
    """Instructions per unit of ``workload`` (a request, an expiry) under callgrind."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        process = subprocess.Popen(
            ["valgrind", "--tool=callgrind", "--instr-atstart=no",
             f"--callgrind-out-file={out}", *command],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            print(f"[bench_instructions] {name}: starting under valgrind", file=sys.stderr)
            wait_ready(port, process)
            print(f"[bench_instructions] {name}: measuring", file=sys.stderr)
            asyncio.run(workload(port, process.pid))
            subprocess.run(["callgrind_control", "-d", str(process.pid)], check=True,
                           capture_output=True)  # fmt: skip
        finally:
            process.terminate()
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        totals = [
            int(line.split()[1])
            for dump in Path(tmp).glob("callgrind.out*")
            for line in dump.read_text().splitlines()
            if line.startswith("totals:")
        ]
    return max(totals) / units


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000, help="requests counted (1000)")
    parser.add_argument(
        "--expiry",
        type=int,
        metavar="N",
        help="instead: instructions per expiry answer, N sessions expiring at once",
    )
    args = parser.parse_args()
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        sys.exit("bench_instructions: valgrind is not installed (apt-get install valgrind)")
    port = free_port()
    bind = f"127.0.0.1:{port}"
    exe = BIN / "sessiongate"
    sessiongate = [str(exe)] if exe.exists() else [PY, "-m", "sessiongate.cli"]
    if args.expiry:
        print(
            f"# bench_instructions: Python {sys.version.split()[0]}, tree "
            f"{git_rev(str(HERE.parent))}, {args.expiry} sessions expiring at once"
        )
        command = [*sessiongate, "serve", "--bind", bind, "--capacity", "1"]
        command += ["--max-wait", f"{EXPIRY_WAIT:g}", "--max-duration", "1000000"]
        command += ["--max-queue", "100000"]
        sessions = args.expiry
        per_expiry = measure(
            "sessiongate",
            command,
            port,
            lambda port, pid: expiry_workload(port, pid, sessions),
            sessions,
        )
        print(f"| sessiongate | {per_expiry / 1e6:.3f} M instructions per expiry answer |")
        return
    servers = {
        "sessiongate": [*sessiongate, "serve", "--bind", bind],
        "bare": [PY, str(HERE / "bare_quart.py"), bind],
        "bare, tuned": [PY, str(HERE / "bare_quart.py"), bind, "--tuned"],
    }
    print(
        f"# bench_instructions: Python {sys.version.split()[0]}, load average {loadavg()}, "
        f"tree {git_rev(str(HERE.parent))}, "
        f"{args.requests} zero-length sessions from 50 connections"
    )
    requests = args.requests
    figures = {
        name: measure(
            name,
            command,
            port,
            lambda port, pid: requests_workload(port, pid, requests),
            requests,
        )
        for name, command in servers.items()
    }
    ours = figures["sessiongate"]
    print("| server | instructions per request | sessiongate's speed relative to it |")
    print("| --- | --- | --- |")
    for name, per_request in figures.items():
        print(f"| {name} | {per_request / 1e6:.3f} M | {per_request / ours:.2f} |")


if __name__ == "__main__":
    main()
