"""One expiry wave (issue 3's "expiry within 50 ms"): many sessions due at one instant.

Under the overload scenario of ``bench_http.py`` the clients' expiry lateness is set by
waves: clients that arrive together expire together, and every answer costs the server
CPU. This script isolates one wave: ``sessiongate serve --capacity 1`` with one long
session holding the slot, N keep-alive connections opened first, then one
``POST /sessions`` on each at the same instant; all of them expire ``--max-wait`` later.
It prints, per round, how late each client got its ``queue_timeout`` answer after its
own send + max-wait (min / p50 / p99 / max), the server's CPU time per answer (from
half-way through the wait to the last answer: the wave's whole cost, so the maximum is
about clients x CPU per answer) and the generator's CPU. Nothing here asserts on time.

    .venv/bin/python benchmarks/bench_expiry_wave.py                  # 250 clients, 3 rounds
    .venv/bin/python benchmarks/bench_expiry_wave.py --clients 50 --rounds 5
    .venv/bin/python benchmarks/bench_expiry_wave.py --resend     # answered clients send again
    PYTHONPATH=/path/to/other/tree/src .venv/bin/python benchmarks/bench_expiry_wave.py

The last form measures another tree's code (an A/B). The minimum is how long the first
answer waited for the whole wave's first step; the maximum, the wave's whole cost.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _loadgen import build_request, open_stamped_connection, read_response  # noqa: E402
from _metrics import git_rev, loadavg  # noqa: E402

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def start_server(port: int, max_wait: float, log: Path) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "sessiongate.cli", "serve", "--bind", f"{HOST}:{port}"]
    cmd += ["--capacity", "1", "--max-wait", f"{max_wait:g}", "--max-queue", "100000"]
    cmd += ["--shutdown-grace", "1", "--max-duration", "100000"]
    with open(log, "wb") as out:
        server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=out)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection((HOST, port), timeout=1).close()
            return server
        except OSError:
            time.sleep(0.1)
    server.kill()
    raise SystemExit(f"the server did not start; see {log}")


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def cpu_seconds(pid: int) -> float:
    """A process's CPU time so far (user + system), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def one_wave(
    port: int, clients: int, max_wait: float, resend: bool, server_pid: int
) -> tuple[list[float], float]:
    """Lateness (ms) of every client's expiry answer in one wave (with ``resend``, each
    client sends its next request as soon as it has its answer, as a closed-loop client
    does; those requests are left to expire after the wave), and the server's CPU
    seconds from half-way through the wait to the last answer."""
    request = build_request("POST", HOST, port, "/sessions", b'{"duration": 0}')
    conns = [await open_stamped_connection(HOST, port) for _ in range(clients)]
    await asyncio.sleep(0.3)  # every connection accepted and idle
    sent: list[float] = []
    for conn in conns:
        conn.expect()
        conn.write(request)
        sent.append(time.time())

    async def answer(i: int) -> float:
        conn = conns[i]
        status, _, _ = await read_response(conn.reader)
        if status != 503:
            raise SystemExit(f"expected 503 queue_timeout, got {status}")
        # As its first bytes were read (``_loadgen``: not after the generator's work).
        late = ((conn.first_bytes_at or time.time()) - sent[i] - max_wait) * 1000
        if resend:
            conn.expect()
            conn.write(request)
        return late

    await asyncio.sleep(max_wait / 2)
    server_cpu = cpu_seconds(server_pid)
    late = await asyncio.gather(*(answer(i) for i in range(len(conns))))
    server_cpu = cpu_seconds(server_pid) - server_cpu
    for conn in conns:
        conn.close()
    return list(late), server_cpu


async def run(
    clients: int, rounds: int, max_wait: float, port: int, resend: bool, server_pid: int
) -> None:
    hold = build_request("POST", HOST, port, "/sessions", b'{"duration": 100000}')
    _, holder = await asyncio.open_connection(HOST, port)
    holder.write(hold)  # takes the only slot for the whole run
    await asyncio.sleep(0.3)
    print("| round | clients | min | p50 | p99 | max | server CPU per answer | generator CPU |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for n in range(1, rounds + 1):
        me0 = resource.getrusage(resource.RUSAGE_SELF)
        w0 = time.time()
        late, server_cpu = await one_wave(port, clients, max_wait, resend, server_pid)
        me1 = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (me1.ru_utime - me0.ru_utime + me1.ru_stime - me0.ru_stime) / (time.time() - w0)
        print(
            f"| {n} | {clients} | {min(late):.1f} ms | {quantile(late, 0.5):.1f} ms "
            f"| {quantile(late, 0.99):.1f} ms | {max(late):.1f} ms "
            f"| {server_cpu / clients * 1e6:.0f} us | {cpu * 100:.0f} % |"
        )
        await asyncio.sleep(0.3)
    holder.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=250)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-wait", type=float, default=1.0)
    parser.add_argument(
        "--resend",
        action="store_true",
        help="each client sends its next request on its answer (the overload's closed loop)",
    )
    a = parser.parse_args()
    import sessiongate

    source = Path(sessiongate.__file__).resolve().parent
    print(
        f"# bench_expiry_wave: Python {sys.version.split()[0]}, load average {loadavg()}, "
        f"tree {git_rev(str(source))}, sessiongate from {source}"
    )
    port = free_port()
    log = Path(os.environ.get("TMPDIR", "/tmp")) / "sessiongate-bench-wave.log"
    server = start_server(port, a.max_wait, log)
    try:
        asyncio.run(run(a.clients, a.rounds, a.max_wait, port, a.resend, server.pid))
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()


if __name__ == "__main__":
    main()
