"""HTTP benchmark (issue 3): sessiongate's server vs the article's FastAPI service vs HAProxy.

Run from the repository root (``pip install -e '.[bench]'`` for FastAPI and uvicorn;
HAProxy's column needs ``apt-get install haproxy`` and is skipped without it)::

    .venv/bin/python benchmarks/bench_http.py            # every scenario, ~3-4 minutes
    .venv/bin/python benchmarks/bench_http.py --quick    # short windows, ~1.5 minutes

Every system is started fresh for every scenario, on 127.0.0.1, and driven by the same
closed-loop generator (``_loadgen.py``: asyncio, no HTTP library), whose own CPU
is printed. Scenarios (scaled from the article's 50 sessions / 5 s / 60 s RTO):

* **saturation**: capacity 50, 1 s sessions, 150 clients, 5 s queue deadline;
* **overload**: capacity 50, 1 s sessions, 400 clients, 3 s queue deadline;
* **throughput**: zero-length sessions, 50 clients; sessiongate against a bare
  Quart-Trio endpoint on the same Hypercorn (``bare_quart.py``), and the others.

Systems:

* **sessiongate**: ``sessiongate serve`` (synchronous ``POST /sessions``, the built-in
  ``sleep`` handler with ``{"duration": d}``);
* **article**: the article's FastAPI service on plain uvicorn (``article_fastapi.py``);
* **haproxy**: HAProxy with ``maxconn`` on the server and ``timeout queue``, in front of
  a plain sleeping ASGI backend on uvicorn (``sleeper_asgi.py``).

Admission and release are stamped by each server itself (``time.time()``: the session
object's ``admitted_at`` / ``ended_at``; the article's and the sleeper's own stamps), so
hand-off gaps are the servers', not the network's. Nothing here asserts on time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _loadgen import Exchange, build_request, run_clients  # noqa: E402
from _metrics import (  # noqa: E402
    Record,
    analyse,
    fmt_bytes,
    fmt_ms,
    fmt_pct,
    git_rev,
    loadavg,
    median,
    quantile,
    rss_bytes,
    table,
)

PY = sys.executable
BIN = Path(PY).parent
HOST = "127.0.0.1"
LOGS = Path(tempfile.gettempdir()) / "sessiongate-bench-http"


def progress(msg: str) -> None:
    print(f"\r\033[K[bench_http] {msg}", end="", file=sys.stderr, flush=True)


def progress_done() -> None:
    print("\r\033[K", end="", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def cpu_ticks(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the systems ---------------------------------------------------------------------------


@dataclass
class Server:
    name: str
    port: int
    path: str
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    method: str = "POST"

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def rss(self) -> int:
        total = 0
        for pid in self.pids:
            with contextlib.suppress(OSError):
                total += rss_bytes(pid)
        return total

    def cpu(self) -> float:
        total = 0.0
        for pid in self.pids:
            with contextlib.suppress(OSError):
                total += cpu_ticks(pid)
        return total

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


#: Every process this run started, so that none outlives it whatever happens.
_SPAWNED: list[subprocess.Popen[bytes]] = []


def _kill_leftovers() -> None:
    for p in _SPAWNED:
        if p.poll() is None:
            p.kill()
            p.wait()


def _spawn(name: str, cmd: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    LOGS.mkdir(parents=True, exist_ok=True)
    err = open(LOGS / f"{name}.err", "wb")  # noqa: SIM115 (lives as long as the process)
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,  # access logs: written, as in production, then dropped
        stderr=err,
        env={**os.environ, **(env or {})},
        cwd=str(HERE.parent),
    )
    _SPAWNED.append(proc)
    return proc


async def wait_ready(port: int, procs: list[subprocess.Popen[bytes]], name: str) -> None:
    deadline = time.time() + 30
    while time.time() < deadline:
        for p in procs:
            if p.poll() is not None:
                log = (LOGS / f"{name}.err").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{name} exited with {p.returncode}:\n{log}")
        try:
            _, writer = await asyncio.open_connection(HOST, port)
        except OSError:
            await asyncio.sleep(0.1)
            continue
        writer.close()
        return
    raise RuntimeError(f"{name} did not listen on {port} within 30 s")


def sessiongate_cmd() -> list[str]:
    if SPLIT_LATENESS:  # the diagnostic launcher (``_sg_probe.py``), not the product's
        return [PY, str(HERE / "_sg_probe.py")]
    exe = BIN / "sessiongate"
    return [str(exe)] if exe.exists() else [PY, "-m", "sessiongate.cli"]


#: Set from --split-lateness: serve sessiongate through ``_sg_probe.py``.
SPLIT_LATENESS = False
#: Where the probe writes its scheduler passes at exit.
PROBE_OUT = LOGS / "sessiongate-passes.json"


async def start_sessiongate(capacity: int, deadline: float) -> Server:
    port = free_port()
    cmd = [*sessiongate_cmd(), "serve", "--bind", f"{HOST}:{port}"]
    cmd += ["--capacity", str(capacity), "--max-wait", f"{deadline:g}"]
    cmd += ["--max-queue", "100000", "--shutdown-grace", "1"]
    name = "sessiongate"
    if SPLIT_LATENESS:
        PROBE_OUT.unlink(missing_ok=True)
        os.environ["SG_PROBE_OUT"] = str(PROBE_OUT)
    proc = _spawn(name, cmd)
    await wait_ready(port, [proc], name)
    return Server(name, port, "/sessions", [proc])


async def start_article(capacity: int, deadline: float, session: float) -> Server:
    port = free_port()
    env = {
        "ARTICLE_MAX_ACTIVE": str(capacity),
        "ARTICLE_RTO": f"{deadline:g}",
        "ARTICLE_POLL": "1",
        "ARTICLE_SESSION_SECONDS": f"{session:g}",
    }
    cmd = [PY, "-m", "uvicorn", "article_fastapi:app", "--app-dir", str(HERE)]
    cmd += ["--host", HOST, "--port", str(port), "--backlog", "2048"]
    proc = _spawn("article", cmd, env)
    await wait_ready(port, [proc], "article")
    return Server("article", port, "/session", [proc])


HAPROXY_CFG = """\
global
    maxconn 4000
defaults
    mode http
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    timeout queue {deadline_ms}ms
frontend gate
    bind {host}:{port}
    maxconn 4000
    default_backend sleepers
backend sleepers
    server sleeper {host}:{backend_port} maxconn {capacity}
"""


async def start_haproxy(capacity: int, deadline: float) -> Server | None:
    exe = shutil.which("haproxy")
    if exe is None:
        return None
    backend_port = free_port()
    cmd = [PY, "-m", "uvicorn", "sleeper_asgi:app", "--app-dir", str(HERE)]
    cmd += ["--host", HOST, "--port", str(backend_port), "--backlog", "2048"]
    cmd += ["--no-access-log"]
    sleeper = _spawn("sleeper", cmd)
    await wait_ready(backend_port, [sleeper], "sleeper")
    port = free_port()
    LOGS.mkdir(parents=True, exist_ok=True)
    cfg = LOGS / "haproxy.cfg"
    cfg.write_text(
        HAPROXY_CFG.format(
            deadline_ms=round(deadline * 1000),
            host=HOST,
            port=port,
            backend_port=backend_port,
            capacity=capacity,
        )
    )
    proxy = _spawn("haproxy", [exe, "-db", "-f", str(cfg)])
    await wait_ready(port, [proxy, sleeper], "haproxy")
    return Server("haproxy", port, "/", [proxy, sleeper])


async def start_bare_quart(tuned: bool = False) -> Server:
    port = free_port()
    name = "bare-quart-tuned" if tuned else "bare-quart"
    cmd = [PY, str(HERE / "bare_quart.py"), f"{HOST}:{port}", *(["--tuned"] if tuned else [])]
    proc = _spawn(name, cmd)
    await wait_ready(port, [proc], name)
    return Server(name, port, "/sessions", [proc])


# -- reading the answers ---------------------------------------------------------------------


@dataclass
class Parsed:
    records: list[Record]
    latency_ok: list[float]  # client-side, answered sessions
    latency_all: list[float]
    late_client: list[float]  # expired: answer time - (send + deadline)
    late_server: list[float]  # expired: the server's own wait - deadline
    statuses: dict[int, int]
    unparsed: int
    # expired, --split-lateness only: the request reached the app (its arrival stamp) -
    # send; answer time - (arrival stamp + deadline)
    before_app: list[float] = field(default_factory=list)
    late_from_stamp: list[float] = field(default_factory=list)
    # expired: the kernel's receive stamp of the answer - (send + deadline)
    late_client_kernel: list[float] = field(default_factory=list)


#: The answers that say a session expired, by system.
EXPIRY_ANSWERS = {("sessiongate", 503), ("article", 408), ("haproxy", 503)}


def parse(system: str, exchanges: list[Exchange], deadline: float) -> Parsed:
    """Turn answers into records, with the best arrival stamp each system gives."""
    out = Parsed([], [], [], [], [], {}, 0)
    for ex in exchanges:
        out.statuses[ex.status] = out.statuses.get(ex.status, 0) + 1
        latency = ex.t_recv - ex.t_send
        out.latency_all.append(latency)
        if system not in ("sessiongate", "article", "haproxy"):
            if ex.status == 200:
                out.latency_ok.append(latency)
            continue  # a plain endpoint: nothing to admit
        rec = Record(t_arrive=ex.t_send)
        expired = (system, ex.status) in EXPIRY_ANSWERS
        if expired and ex.t_kernel is not None:
            out.late_client_kernel.append(ex.t_kernel - ex.t_send - deadline)
        try:
            if ex.status == 200:
                j = json.loads(ex.body)
                if system == "sessiongate":
                    rec.t_arrive, rec.t_admit = j["created_at"], j["admitted_at"]
                    rec.t_release = j["ended_at"]
                elif system == "article":
                    stamps = j["bench"]
                    rec.t_arrive, rec.t_admit = stamps["arrived"], stamps["admitted"]
                    rec.t_release = stamps["ended"]
                else:  # haproxy: HAProxy receives at once; the backend stamps the slot
                    rec.t_admit, rec.t_release = j["admitted"], j["ended"]
                out.latency_ok.append(latency)
            elif system == "sessiongate" and ex.status == 503:
                j = json.loads(ex.body)
                if j.get("error") != "queue_timeout":
                    raise ValueError(j.get("error"))
                rec.t_expired = ex.t_send + j["waited_s"]
                out.late_server.append(j["waited_s"] - deadline)
                out.late_client.append(latency - deadline)
                if "created_at" in j:  # the probe's (--split-lateness)
                    out.before_app.append(j["created_at"] - ex.t_send)
                    out.late_from_stamp.append(ex.t_recv - j["created_at"] - deadline)
            elif system == "article" and ex.status == 408:
                arrived = float(ex.headers[b"x-bench-arrived"])
                expired = float(ex.headers[b"x-bench-expired"])
                rec.t_arrive, rec.t_expired = arrived, expired
                out.late_server.append(expired - arrived - deadline)
                out.late_client.append(latency - deadline)
            elif system == "haproxy" and ex.status == 503:
                rec.t_expired = ex.t_recv
                out.late_client.append(latency - deadline)
            else:
                raise ValueError(ex.status)
        except (ValueError, KeyError, TypeError):
            out.unparsed += 1
            continue
        out.records.append(rec)
    return out


#: An inversion must cost the earlier arrival more than this. Sessions admitted in one
#: scheduler pass start in whatever order the server runs them (Trio may reverse a
#: batch); under load one pass of a Python server takes milliseconds, so stamps within a
#: pass can be out of order by that much without anyone having waited for anyone.
FIFO_GUARD = 0.005


def fifo_inversions_admitted(records: list[Record], guard: float) -> int:
    """Sessions admitted ahead of an earlier arrival that was admitted later (by more
    than ``guard``): judged on the servers' own arrival and admission stamps."""
    admitted = sorted((r for r in records if r.admitted), key=lambda r: r.t_arrive)
    latest = -math.inf
    count = 0
    for r in admitted:
        if latest > r.t_admit + guard:
            count += 1
        latest = max(latest, r.t_admit)
    return count


# -- scenarios -------------------------------------------------------------------------------


@dataclass
class Scenario:
    name: str
    clients: int
    capacity: int
    session: float
    deadline: float
    window: float


async def sample_rss(
    server: Server, stop: asyncio.Event, peak: list[int], samples: list[tuple[float, int]]
) -> None:
    while not stop.is_set():
        rss = server.rss()
        samples.append((time.time(), rss))
        peak[0] = max(peak[0], rss)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.2)


async def drive(
    server: Server, sc: Scenario, body: bytes, *, tail: float | None = None
) -> dict[str, Any]:
    request = build_request(server.method, HOST, server.port, server.path, body)
    # Warm up: one exchange (imports, first-request paths), not measured.
    await run_clients(HOST, server.port, request, 1, 0.01, sc.session + sc.deadline + 5)
    await asyncio.sleep(0.3)
    rss0 = server.rss()
    peak = [rss0]
    stop = asyncio.Event()
    samples: list[tuple[float, int]] = []
    sampler = asyncio.create_task(sample_rss(server, stop, peak, samples))
    me0 = resource.getrusage(resource.RUSAGE_SELF)
    srv0 = server.cpu()
    w0 = time.time()
    if tail is None:
        tail = sc.deadline + sc.session + 5
    exchanges, errors, t0 = await run_clients(
        HOST, server.port, request, sc.clients, sc.window, tail
    )
    wall = time.time() - w0
    me1 = resource.getrusage(resource.RUSAGE_SELF)
    srv1 = server.cpu()
    await asyncio.sleep(0.5)
    stop.set()
    await sampler
    rss1 = server.rss()
    gen_cpu = (me1.ru_utime - me0.ru_utime) + (me1.ru_stime - me0.ru_stime)
    in_window = [e for e in exchanges if e.t_recv <= t0 + sc.window]

    def rss_at(t: float) -> int:
        return min(samples, key=lambda ts: abs(ts[0] - t))[1] if samples else rss0

    return {
        "exchanges": exchanges,
        "errors": errors,
        "t0": t0,
        "wall": wall,
        "gen_cpu": gen_cpu / wall,
        "server_cpu": (srv1 - srv0) / wall,
        "rss0": rss0,
        "rss_growth": rss1 - rss0,
        "rss_peak_growth": max(peak[0], rss1) - rss0,
        # Flat memory shows here: the second half of the load on top of the first.
        "rss_growth_2nd_half": rss_at(t0 + sc.window) - rss_at(t0 + sc.window / 2),
        "ok_per_s": sum(1 for e in in_window if e.status == 200) / sc.window,
        "all_per_s": len(in_window) / sc.window,
    }


def summarise(system: str, sc: Scenario, run: dict[str, Any]) -> dict[str, Any]:
    parsed = parse(system, run["exchanges"], sc.deadline)
    a = analyse(parsed.records, sc.capacity, sc.deadline, tolerance=0.05)
    s = a.summary()
    # FIFO over HTTP: admitted sessions only, on the servers' stamps, with a guard (see
    # README); expired ones are judged by their lateness instead.
    s["fifo_inversions"] = fifo_inversions_admitted(parsed.records, FIFO_GUARD)
    # Sessions completed over the time from the start of the load to the last one's end
    # (requests sent in the window finish in the tail; waves make a fixed window biased).
    ends = [r.t_release for r in parsed.records if not math.isnan(r.t_release)]
    s["completed_per_s"] = len(ends) / (max(ends) - run["t0"]) if ends else math.nan
    tol = 0.05
    s["waits_past_deadline_client"] = sum(1 for x in parsed.late_client if x > tol) + sum(
        1 for r in parsed.records if r.admitted and r.t_admit - r.t_arrive > sc.deadline + tol
    )
    for key, values in (
        ("late_server", parsed.late_server),
        ("late_client", parsed.late_client),
        ("late_client_kernel", parsed.late_client_kernel),
        ("before_app", parsed.before_app),
        ("late_from_stamp", parsed.late_from_stamp),
    ):
        s[f"{key}_p50"] = quantile(values, 0.5)
        s[f"{key}_p99"] = quantile(values, 0.99)
        s[f"{key}_max"] = max(values) if values else math.nan
    # How long a slot was held beyond the session's own length: for sessiongate, the
    # time from the hand-off (its admission stamp) until the session's task runs, plus
    # the time from the handler's end to the release; the cost of a busy scheduler.
    overhold = [
        r.t_release - r.t_admit - sc.session
        for r in parsed.records
        if r.admitted and not math.isnan(r.t_release)
    ]
    s["overhold_p50"] = quantile(overhold, 0.5)
    s["overhold_p99"] = quantile(overhold, 0.99)
    for key, values in (("lat_ok", parsed.latency_ok), ("lat_all", parsed.latency_all)):
        s[f"{key}_p50"] = quantile(values, 0.5)
        s[f"{key}_p99"] = quantile(values, 0.99)
    s["statuses"] = dict(sorted(parsed.statuses.items()))
    s["unparsed"] = parsed.unparsed
    for key in (
        "t0",
        "errors",
        "gen_cpu",
        "server_cpu",
        "rss0",
        "rss_growth",
        "rss_peak_growth",
        "rss_growth_2nd_half",
        "ok_per_s",
        "all_per_s",
    ):
        s[key] = run[key]
    s["errors"] = len(run["errors"])
    s["error_sample"] = run["errors"][:3]
    return s


async def start(system: str, sc: Scenario) -> Server | None:
    if system == "sessiongate":
        return await start_sessiongate(sc.capacity, sc.deadline)
    if system == "article":
        return await start_article(sc.capacity, sc.deadline, sc.session)
    if system == "haproxy":
        return await start_haproxy(sc.capacity, sc.deadline)
    if system == "bare-quart":
        return await start_bare_quart()
    if system == "bare-quart-tuned":
        return await start_bare_quart(tuned=True)
    raise ValueError(system)


async def try_start(system: str, sc: Scenario) -> Server | str:
    """Start ``system``; on failure, the reason (its column is then skipped, not the run)."""
    before = len(_SPAWNED)
    try:
        server = await start(system, sc)
    except (RuntimeError, OSError) as exc:
        progress_done()
        print(f"[bench_http] {system} did not start: {exc}", file=sys.stderr)
        for proc in _SPAWNED[before:]:  # only what this attempt started
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        return f"did not start: {str(exc).splitlines()[0]}"
    return server if server is not None else "haproxy is not installed"


@contextlib.contextmanager
def stopping(server: Server | None) -> Iterator[None]:
    try:
        yield
    finally:
        if server is not None:
            server.stop()


async def queued_scenario(sc: Scenario, systems: list[str]) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    body = json.dumps({"duration": sc.session}).encode()
    for system in systems:
        progress(f"{sc.name}: {system} (starting)")
        server = await try_start(system, sc)
        if isinstance(server, str):
            results[system] = {"skipped": server}
            continue
        with stopping(server):
            progress(f"{sc.name}: {system}, {sc.clients} clients for {sc.window:g} s")
            run = await drive(server, sc, body)
            results[system] = summarise(system, sc, run)
            if RAW is not None:
                dump_raw(f"{sc.name}-{system}", run["exchanges"])
            if system == "article":
                results[system]["retained_items"] = await article_qsize(server.port)
        if system == "sessiongate" and SPLIT_LATENESS:
            results[system].update(pass_figures(run["t0"], sc.window))
    progress_done()
    return results


def pass_figures(t0: float, window: float) -> dict[str, float]:
    """The probe's scheduler passes during the load: how long one pass took, and how many
    task steps it ran (under a wave every request's next step waits for the whole pass)."""
    try:
        passes = json.loads(PROBE_OUT.read_text())
    except (OSError, ValueError):
        return {}
    during = [(length, steps) for start, length, steps in passes if t0 <= start <= t0 + window]
    if not during:
        return {}
    lengths = [length for length, _ in during]
    steps = [float(n) for _, n in during]
    return {
        "pass_p99": quantile(lengths, 0.99),
        "pass_max": max(lengths),
        "pass_steps_p99": quantile(steps, 0.99),
        "pass_steps_max": max(steps),
    }


async def article_qsize(port: int) -> int:
    from _loadgen import read_response

    reader, writer = await asyncio.open_connection(HOST, port)
    writer.write(f"GET /queue-size HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
    _, _, body = await read_response(reader)
    writer.close()
    return int(json.loads(body)["qsize"])


WRK_LUA = """\
wrk.method = "{method}"
wrk.body = '{body}'
wrk.headers["Content-Type"] = "application/json"
"""


async def run_wrk(server: Server, body: bytes, clients: int, seconds: float) -> dict[str, Any]:
    """The same zero-length load through wrk (C, one thread), as a cross-check that the
    Python generator was not the bottleneck."""
    exe = shutil.which("wrk")
    if exe is None:
        return {}
    script = LOGS / "wrk.lua"
    script.write_text(WRK_LUA.format(method=server.method, body=body.decode()))
    url = f"http://{HOST}:{server.port}{server.path}"
    cmd = [exe, "-t1", f"-c{clients}", f"-d{seconds:g}s", "--latency", "-s", str(script), url]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = await asyncio.create_subprocess_exec(
        *cmd, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    text = out.decode(errors="replace")
    result: dict[str, Any] = {
        "wrk_cpu": ((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime))
        / seconds
    }
    for line in text.splitlines():
        parts = line.split()
        if line.startswith("Requests/sec:"):
            result["wrk_per_s"] = float(parts[1])
        elif len(parts) == 2 and parts[0] in ("50%", "99%"):
            result[f"wrk_p{parts[0][:-1]}"] = _wrk_time(parts[1])
        elif "Non-2xx" in line:
            result["wrk_non2xx"] = int(parts[-1])
    return result


def _wrk_time(text: str) -> float:
    for unit, scale in (("us", 1e-6), ("ms", 1e-3), ("s", 1.0)):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * scale
    return math.nan


def median_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per key, the median of the runs' numbers (the first run's value otherwise)."""
    out: dict[str, Any] = {}
    for key in runs[0]:
        values = [r[key] for r in runs if key in r]
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            out[key] = median([float(v) for v in values])
        else:
            out[key] = values[0]
    out["rounds"] = len(runs)
    return out


async def throughput_scenario(
    sc: Scenario, systems: list[str], rounds: int
) -> dict[str, dict[str, Any]]:
    """Zero-length sessions. sessiongate and the bare Quart-Trio reference run side by
    side and are measured alternately, ``rounds`` times each (medians): the machine is
    shared, and alternating spreads whatever else runs over both."""
    body = json.dumps({"duration": 0}).encode()
    runs: dict[str, list[dict[str, Any]]] = {}
    # (label, system, method, path, body)
    targets: list[tuple[str, Server, str, str, bytes]] = []
    servers: list[Server] = []
    try:
        for system in ("bare-quart", "bare-quart-tuned", "sessiongate"):
            if system == "sessiongate" and system not in systems:
                continue
            progress(f"{sc.name}: {system} (starting)")
            server = await try_start(system, sc)
            if isinstance(server, str):
                runs[system] = [{"skipped": server}]
                continue
            servers.append(server)
            targets.append((system, server, "POST", server.path, body))
            if system == "sessiongate":
                # The same server's cheapest route, for scale: Hypercorn + Quart alone.
                targets.append(("sessiongate-healthz", server, "GET", "/healthz", b""))
        for i in range(rounds):
            for label, server, method, path, payload in targets:
                server.method, server.path = method, path
                progress(f"{sc.name}: round {i + 1}/{rounds}, {label}")
                run = await drive(server, sc, payload, tail=5)
                result = summarise(label, sc, run)
                if WRK:
                    progress(f"{sc.name}: round {i + 1}/{rounds}, {label}, wrk")
                    result.update(await run_wrk(server, payload, sc.clients, sc.window))
                runs.setdefault(label, []).append(result)
    finally:
        for server in servers:
            server.stop()
    order = ["bare-quart", "bare-quart-tuned", "sessiongate", "sessiongate-healthz"]
    results = {
        label: runs[label][0] if "skipped" in runs[label][0] else median_summary(runs[label])
        for label in order
        if label in runs
    }
    # The others once each, for context.
    for system in systems:
        if system == "sessiongate":
            continue
        progress(f"{sc.name}: {system} (starting)")
        other = await try_start(system, sc)
        if isinstance(other, str):
            results[system] = {"skipped": other}
            continue
        with stopping(other):
            progress(f"{sc.name}: {system}, {sc.clients} clients for {sc.window:g} s")
            run = await drive(other, sc, body, tail=5)
            results[system] = summarise(system, sc, run)
            if WRK:
                results[system].update(await run_wrk(other, body, sc.clients, sc.window))
    progress_done()
    return results


# -- report ------------------------------------------------------------------------------------

LABELS = {
    "sessiongate": "sessiongate",
    "article": "article (FastAPI/uvicorn)",
    "haproxy": "HAProxy + sleeper",
    "bare-quart": "bare Quart-Trio",
    "bare-quart-tuned": "bare Quart-Trio, tuned as sessiongate serve",
    "sessiongate-healthz": "sessiongate GET /healthz",
}


def _cell(res: dict[str, Any], key: str, kind: str) -> str:
    if "skipped" in res:
        return "skipped"
    value = res.get(key, math.nan)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if kind == "ms":
        return fmt_ms(value, 1)
    if kind == "ms3":
        return fmt_ms(value, 3)
    if kind == "pass":
        return f"{fmt_ms(value, 1)} / {fmt_ms(res['pass_max'], 1)}"
    if kind == "steps":
        return f"{value:.0f} / {res['pass_steps_max']:.0f}"
    if kind == "pct":
        return fmt_pct(value)
    if kind == "int":
        return f"{value:.0f}"
    if kind == "rate":
        return f"{value:.1f}/s"
    if kind == "bytes":
        return fmt_bytes(value)
    if kind == "core":
        return f"{value * 100:.0f} % of a core"
    return str(value)


QUEUED_ROWS = [
    ("answers (by status)", "statuses", "raw"),
    ("admitted / expired", None, "adm"),
    ("most active at once", "max_active", "int"),
    ("slot utilisation while saturated", "utilisation", "pct"),
    ("slot utilisation, saturated, after the first second", "utilisation_steady", "pct"),
    ("hand-off gap p50", "handoff_p50_s", "ms3"),
    ("hand-off gap p99", "handoff_p99_s", "ms3"),
    ("slot held beyond the session's length, p50", "overhold_p50", "ms"),
    ("slot held beyond the session's length, p99", "overhold_p99", "ms"),
    ("FIFO inversions (admitted, > 5 ms)", "fifo_inversions", "int"),
    ("waits past the deadline (> 50 ms, client view)", "waits_past_deadline_client", "int"),
    ("expiry lateness, server p50", "late_server_p50", "ms"),
    ("expiry lateness, server p99", "late_server_p99", "ms"),
    ("expiry lateness, server max", "late_server_max", "ms"),
    ("expiry lateness, client p50", "late_client_p50", "ms"),
    ("expiry lateness, client p99", "late_client_p99", "ms"),
    ("expiry lateness, client max", "late_client_max", "ms"),
    ("expiry lateness, client, kernel receive stamp p50", "late_client_kernel_p50", "ms"),
    ("expiry lateness, client, kernel receive stamp p99", "late_client_kernel_p99", "ms"),
    ("expiry lateness, client, kernel receive stamp max", "late_client_kernel_max", "ms"),
    ("(split) request reached the app after, p50", "before_app_p50", "ms"),
    ("(split) request reached the app after, p99", "before_app_p99", "ms"),
    ("(split) deadline from the stamp to the answer, p50", "late_from_stamp_p50", "ms"),
    ("(split) deadline from the stamp to the answer, p99", "late_from_stamp_p99", "ms"),
    ("(split) deadline from the stamp to the answer, max", "late_from_stamp_max", "ms"),
    ("(split) scheduler pass length, p99 / max", "pass_p99", "pass"),
    ("(split) task steps in one pass, p99 / max", "pass_steps_p99", "steps"),
    ("sessions completed per second", "completed_per_s", "rate"),
    ("latency of completed, p50", "lat_ok_p50", "ms"),
    ("latency of completed, p99", "lat_ok_p99", "ms"),
    ("server RSS at start", "rss0", "bytes"),
    ("server RSS growth, peak", "rss_peak_growth", "bytes"),
    ("server RSS growth, after", "rss_growth", "bytes"),
    ("server RSS growth, 2nd half of the load", "rss_growth_2nd_half", "bytes"),
    ("payloads left in the unread queue", "retained_items", "int"),
    ("server CPU", "server_cpu", "core"),
    ("load generator CPU", "gen_cpu", "core"),
    ("client errors (reconnects)", "errors", "int"),
]

TPUT_ROWS = [
    ("requests answered per second", "all_per_s", "rate"),
    ("latency p50", "lat_all_p50", "ms"),
    ("latency p99", "lat_all_p99", "ms"),
    ("answers (by status)", "statuses", "raw"),
    ("server CPU", "server_cpu", "core"),
    ("load generator CPU", "gen_cpu", "core"),
    ("client errors (reconnects)", "errors", "int"),
    ("wrk: requests per second", "wrk_per_s", "rate"),
    ("wrk: latency p50", "wrk_p50", "ms"),
    ("wrk: latency p99", "wrk_p99", "ms"),
    ("wrk: non-2xx answers", "wrk_non2xx", "int"),
    ("wrk: its own CPU", "wrk_cpu", "core"),
]

#: Set from --raw: a folder to write every exchange to (JSON lines), for a closer look.
RAW: Path | None = None


def dump_raw(name: str, exchanges: list[Exchange]) -> None:
    assert RAW is not None
    RAW.mkdir(parents=True, exist_ok=True)
    with open(RAW / f"{name}.jsonl", "w") as f:
        for ex in exchanges:
            row = {
                "client": ex.client,
                "t_send": ex.t_send,
                "t_recv": ex.t_recv,
                "t_kernel": ex.t_kernel,
                "status": ex.status,
                "body": ex.body.decode(errors="replace"),
                "headers": {k.decode(): v.decode(errors="replace") for k, v in ex.headers.items()},
            }
            f.write(json.dumps(row) + "\n")


#: Set from --wrk: also drive the throughput scenario with wrk, where installed.
WRK = False


def skipped_notes(results: dict[str, dict[str, Any]]) -> str:
    notes = [
        f"({LABELS.get(system, system)} skipped: {res['skipped']})"
        for system, res in results.items()
        if "skipped" in res
    ]
    return ("\n\n" + "\n".join(notes)) if notes else ""


def render(results: dict[str, dict[str, Any]], rows: list[tuple[str, Any, str]]) -> str:
    systems = list(results)
    body = []
    for label, key, kind in rows:
        cells = []
        for system in systems:
            res = results[system]
            if kind == "adm":
                cells.append(
                    "skipped"
                    if "skipped" in res
                    else f"{res['admitted']:.0f} / {res['expired']:.0f}"
                )
            elif kind == "raw":
                cells.append(
                    "skipped"
                    if "skipped" in res
                    else " ".join(f"{k}:{v}" for k, v in res.get(key, {}).items())
                )
            else:
                cells.append(_cell(res, key, kind))
        body.append((label, *cells))
    header = ("figure", *(LABELS.get(s, s) for s in systems))
    return table(header, body) + skipped_notes(results)


async def amain(a: argparse.Namespace) -> dict[str, Any]:
    systems = [s for s in a.systems.split(",") if s]
    scenarios = set(a.scenarios.split(","))
    report: dict[str, Any] = {}
    for name, clients, deadline in (
        ("saturation", a.sat_clients, 5.0),
        ("overload", a.over_clients, 3.0),
    ):
        if name not in scenarios:
            continue
        sc = Scenario(name, clients, a.capacity, a.session, deadline, a.window)
        res = await queued_scenario(sc, systems)
        report[name] = res
        print(
            f"\n## {name.capitalize()}: capacity {sc.capacity}, {sc.session:g} s sessions, "
            f"{sc.clients} closed-loop clients, {sc.deadline:g} s deadline, "
            f"{sc.window:g} s of load\n"
        )
        rows = [r for r in QUEUED_ROWS if SPLIT_LATENESS or not r[0].startswith("(split)")]
        print(render(res, rows), flush=True)
    if "throughput" in scenarios:
        sc = Scenario("throughput", a.tput_clients, a.capacity, 0.0, 5.0, a.tput_window)
        res = await throughput_scenario(sc, systems, a.tput_rounds)
        report["throughput"] = res
        print(
            f"\n## Throughput: zero-length sessions, {sc.clients} closed-loop clients, "
            f"{sc.window:g} s per run; bare Quart-Trio (stock and tuned) and sessiongate "
            f"alternated, median of {a.tput_rounds} rounds; the others one run each\n"
        )
        print(render(res, TPUT_ROWS))
        for ref, ref_label in (
            ("bare-quart", "bare Quart-Trio"),
            ("bare-quart-tuned", "bare Quart-Trio tuned as sessiongate serve"),
        ):
            for key, how in (("all_per_s", "Python generator"), ("wrk_per_s", "wrk")):
                bare = res.get(ref, {}).get(key)
                ours = res.get("sessiongate", {}).get(key)
                if bare and ours:
                    ratio = ours / bare
                    verdict = "met" if ratio >= 0.9 else "MISSED"
                    print(
                        f"\nsessiongate / {ref_label} on the same Hypercorn ({how}): "
                        f"{ratio * 100:.0f} % (target >= 90 %: {verdict})."
                    )
    return report


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="short windows (~1.5 minutes in all)")
    p.add_argument(
        "--systems",
        default="sessiongate,article,haproxy",
        help="comma-separated: sessiongate, article, haproxy (throughput adds bare-quart)",
    )
    p.add_argument("--scenarios", default="saturation,overload,throughput")
    p.add_argument("--capacity", type=int, default=50)
    p.add_argument("--session", type=float, default=1.0)
    p.add_argument("--sat-clients", type=int, default=150)
    p.add_argument("--over-clients", type=int, default=400)
    p.add_argument("--tput-clients", type=int, default=50)
    p.add_argument("--window", type=float, default=12.0, help="seconds of load per system")
    p.add_argument("--tput-window", type=float, default=4.0)
    p.add_argument("--tput-rounds", type=int, default=3, help="alternating rounds (medians)")
    p.add_argument("--json", help="also write every figure to this file")
    p.add_argument("--raw", help="a folder to write every exchange to, one file per run")
    p.add_argument(
        "--no-wrk", action="store_true", help="skip the wrk cross-check of the throughput runs"
    )
    p.add_argument(
        "--split-lateness",
        action="store_true",
        help="serve sessiongate through _sg_probe.py and split its clients' expiry lateness "
        "into before the app saw the request and after the deadline",
    )
    a = p.parse_args(argv)
    if a.quick:
        a.window, a.tput_window, a.tput_rounds = 5.0, 3.0, 1
    global WRK, RAW, SPLIT_LATENESS
    WRK = not a.no_wrk and shutil.which("wrk") is not None
    SPLIT_LATENESS = a.split_lateness
    RAW = Path(a.raw) if a.raw else None
    started = time.time()
    print(
        f"# bench_http: Python {platform.python_version()}, {len(os.sched_getaffinity(0))} CPUs, "
        f"load average {loadavg()}, haproxy {'yes' if shutil.which('haproxy') else 'no'}, "
        f"tree {git_rev(str(HERE.parent))}"
    )
    try:
        report = asyncio.run(amain(a))
    finally:
        _kill_leftovers()
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1, default=str))
    print(f"\n(total {time.time() - started:.0f} s; server logs in {LOGS})")


if __name__ == "__main__":
    main()
