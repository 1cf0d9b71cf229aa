"""Fixtures for the Redis backend: a real ``redis-server`` that the test run starts itself.

The server listens on a free loopback port with no persistence (``--save ""
--appendonly no``); the Redis on 6379 is never used. Without the binary these tests
are skipped, unless ``SESSIONGATE_TEST_REDIS=require`` (as in CI), which fails them.
"""

from __future__ import annotations

import gc
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

REDIS_BINARY = os.environ.get("SESSIONGATE_REDIS_SERVER", "/usr/bin/redis-server")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.redis)


@pytest.fixture(autouse=True)
def _collect_coredis_garbage() -> Iterator[None]:
    """coredis 6.9 makes a connection's memory streams before connecting and never
    closes them when the attempt fails (Redis down). They are garbage, not a leak of
    ours, but collected later under ``filterwarnings = error`` each would fail the run:
    collect them here, where their ResourceWarning is expected."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Unclosed <MemoryObject", ResourceWarning)
        yield
        gc.collect()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """One ``redis-server`` process on a fixed loopback port; can be killed and restarted."""

    def __init__(self, binary: str, tmp: Path) -> None:
        self.binary = binary
        self.tmp = tmp
        self.port = _free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert self.process is None
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.tmp),
                "--loglevel", "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.1) as sock:
                    sock.sendall(b"PING\r\n")
                    if sock.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def kill(self) -> None:
        """SIGKILL: the data goes with it (no persistence)."""
        if self.process is not None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()
            self.process = None

    def pause(self) -> None:
        """SIGSTOP: Redis stalls with every command sent to it still queued."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process is not None:
            self.process.send_signal(signal.SIGCONT)
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None

    def command(self, *args: str) -> bytes:
        """Run one command with a blocking socket (for inspecting state from a test)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as sock:
            parts = [f"${len(a.encode())}\r\n{a}\r\n" for a in args]
            sock.sendall(f"*{len(args)}\r\n{''.join(parts)}".encode())
            return sock.recv(1 << 16)


def _binary() -> str:
    found = shutil.which(REDIS_BINARY) or shutil.which("redis-server")
    if found is None:
        if os.environ.get("SESSIONGATE_TEST_REDIS") == "require":
            pytest.fail("redis-server not found and SESSIONGATE_TEST_REDIS=require")
        pytest.skip("redis-server not found (set SESSIONGATE_TEST_REDIS=require to fail)")
    return found


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server shared by the whole run (tests use their own gate names)."""
    server = RedisServer(_binary(), tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server for one test that kills and restarts it."""
    server = RedisServer(_binary(), tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def gate_name() -> str:
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def open_backend(redis_server: RedisServer, gate_name: str):  # type: ignore[no-untyped-def]
    """``open_backend(capacity=..., lease_ttl=...)``: a backend on the shared server."""
    from sessiongate.backends.redis import open_redis_backend

    @asynccontextmanager
    async def opener(
        capacity: int = 2, lease_ttl: float = 1.0, url: str | None = None, name: str | None = None
    ) -> AsyncIterator[object]:
        async with open_redis_backend(
            url or redis_server.url,
            gate_name=name or gate_name,
            capacity=capacity,
            lease_ttl=lease_ttl,
        ) as backend:
            yield backend

    return opener
