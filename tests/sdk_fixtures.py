"""Fixtures of the SDK tests: one real redis-server + `memoryd serve` (tiny model, auth on) for the
whole run, and a TCP proxy that can swallow the daemon's answers and cut connections.

Loaded as a plugin (`pytest_plugins = ["sdk_fixtures"]` in each tests/test_sdk_*.py), so the
session-scoped daemon starts once however many SDK test files run.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from service_fixtures import Daemon, RedisServer, tiny_checkpoint  # noqa: F401 (fixture)

TOKENS = {"alice": "tok-alice", "bob": "tok-bob"}
MAX_APPEND = 512
MAX_GENERATE = 64


@contextlib.contextmanager
def auth_daemon(tmp: pytest.TempPathFactory, checkpoint: Path, name: str, *extra: str) -> Iterator[Daemon]:
    """redis-server + `memoryd serve` with the test tenants' tokens (and `extra` flags), torn down after."""
    redis_server = RedisServer(tmp.mktemp(f"{name}-redis"))
    redis_server.start()
    tokens = ",".join(f"{tok}={tenant}" for tenant, tok in TOKENS.items())
    d = Daemon(tmp.mktemp(f"{name}-memoryd"), checkpoint, redis_server.url, "--auth-tokens", tokens, *extra)
    try:
        d.start()
        yield d
    finally:
        d.close()
        redis_server.kill(signal.SIGTERM)


@pytest.fixture(scope="session")
def sdk_daemon(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Iterator[Daemon]:  # noqa: F811
    limits = ("--snapshot-interval", "4", "--max-append-tokens", str(MAX_APPEND))
    limits += ("--max-generate-tokens", str(MAX_GENERATE), "--max-sessions-per-tenant", "200")
    with auth_daemon(tmp_path_factory, tiny_checkpoint, "sdk", *limits) as d:
        yield d


class TcpProxy:
    """127.0.0.1 proxy to a daemon that can drop what the daemon sends back and then cut the connections.

    `drop_responses()`: from now on, bytes from the daemon are read and thrown away (the
    client's requests still go through, so the daemon does the work).  `cut()`: close
    every connection (the client sees UNAVAILABLE) and forward normally again.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream = ("127.0.0.1", upstream_port)
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.dropping = threading.Event()
        self.dropped_bytes = 0
        self.connections = 0
        self._conns: list[tuple[socket.socket, socket.socket]] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns.append((client, server))
                self.connections += 1
            threading.Thread(target=self._pump, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, from_daemon: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if from_daemon and self.dropping.is_set():
                    with self._lock:
                        self.dropped_bytes += len(data)
                    continue
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def drop_responses(self) -> None:
        self.dropping.set()

    def cut(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        for pair in conns:
            for s in pair:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
        self.dropping.clear()

    def close(self) -> None:
        self._closed = True
        self.sock.close()
        self.cut()


@pytest.fixture
def proxy(sdk_daemon: Daemon) -> Iterator[TcpProxy]:
    p = TcpProxy(sdk_daemon.port)
    yield p
    p.close()
