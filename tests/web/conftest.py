"""Fixtures for the HTTP service's tests.

Semantics run through Quart's test app and client under ``MockClock(autojump_threshold=0)``
(``autojump_clock``); real-socket tests serve on 127.0.0.1 port 0 on the real clock, each
bounded by ``trio.fail_after``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from sessiongate.config import Settings
from sessiongate.web import SessionGateApp, create_app

HERE = Path(__file__).parent


@pytest.fixture
def sample_handlers(monkeypatch: pytest.MonkeyPatch) -> str:
    """Make ``web_sample_handlers`` importable; returns its module name."""
    monkeypatch.syspath_prepend(str(HERE))
    sys.modules.pop("web_sample_handlers", None)
    return "web_sample_handlers"


@asynccontextmanager
async def running(**overrides: Any) -> AsyncIterator[SessionGateApp]:
    """An app with its lifespan running (sessions nursery up)."""
    from quart_trio.testing import TrioTestApp

    app = create_app(Settings(**overrides))
    # The lifespan shutdown drains: give it the grace and then some.
    timeout = int(app.service.settings.shutdown_grace) + 60
    async with TrioTestApp(app, startup_timeout=timeout, shutdown_timeout=timeout):
        yield app


@asynccontextmanager
async def real_server(**overrides: Any) -> AsyncIterator[tuple[SessionGateApp, str]]:
    """Hypercorn on 127.0.0.1, port 0; yields the app and its base URL."""
    from hypercorn.config import Config
    from hypercorn.trio import serve

    app = create_app(Settings(**overrides))
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.graceful_timeout = 1.0
    config.backlog = 1024
    config.errorlog = None
    async with trio.open_nursery() as nursery:
        binds: list[str] = await nursery.start(serve, app, config)
        yield app, binds[0]
        nursery.cancel_scope.cancel()


def port_of(base: str) -> int:
    return int(base.rsplit(":", 1)[1])


async def raw_request(port: int, data: bytes) -> trio.SocketStream:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(data)
    return stream


async def read_response(stream: trio.SocketStream) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length, read from a raw socket."""
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        chunk = await stream.receive_some()
        if not chunk:
            raise EOFError(buffer)
        buffer += chunk
    head, _, rest = buffer.partition(b"\r\n\r\n")
    lines = head.decode("latin1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {
        k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])
    }
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = await stream.receive_some()
        if not chunk:
            raise EOFError(rest)
        rest += chunk
    return status, headers, rest[:length]


def request_bytes(
    method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: test"]
    all_headers = {"Content-Length": str(len(body))} if body or method in ("POST", "PUT") else {}
    all_headers.update(headers or {})
    lines += [f"{k}: {v}" for k, v in all_headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def jbody(value: Any) -> bytes:
    return json.dumps(value).encode()


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A private redis-server on a free loopback port for this run (never 6379)."""
    import os
    import shutil
    import socket
    import subprocess
    import time

    binary = shutil.which(os.environ.get("SESSIONGATE_REDIS_SERVER", "redis-server"))
    if binary is None:
        if os.environ.get("SESSIONGATE_TEST_REDIS") == "require":
            pytest.fail("redis-server not found and SESSIONGATE_TEST_REDIS=require")
        pytest.skip("redis-server not found")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    directory = tmp_path_factory.mktemp("web-redis")
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(directory), "--loglevel", "warning"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(16).startswith(b"+PONG"):
                        break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(10)
