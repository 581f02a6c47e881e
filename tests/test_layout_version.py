"""The Redis layout's version (`md:layout`, docs/service.md "The Redis layout") is stored by the first daemon
to start on a Redis, and a daemon of another layout refuses to start there, before the model loads.

A real redis-server; the refusal is the real `memoryd serve` command (as in test_service_startup.py: exit
code 1, one line naming the key and the fix, no model converted).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from service_fixtures import RedisServer, child_env, free_port

from memoryd.server import check_layout
from memoryd.store.layout import LAYOUT_VERSION
from memoryd.store.redis_client import connect


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.kill()


def _check(url: str) -> None:
    async def go() -> None:
        r = connect(url, 5.0)
        try:
            await check_layout(r)
        finally:
            await r.aclose()

    asyncio.run(go())


def test_first_start_stores_the_version_and_the_same_version_starts(redis_server: RedisServer) -> None:
    r = redis_server.client()
    assert r.get("md:layout") is None
    _check(redis_server.url)
    assert r.get("md:layout") == str(LAYOUT_VERSION).encode() and r.ttl("md:layout") == -1  # kept, no TTL
    _check(redis_server.url)  # a second daemon of this layout (or a restart) starts
    assert r.get("md:layout") == str(LAYOUT_VERSION).encode()


def test_a_redis_of_another_layout_is_refused_before_the_model(redis_server: RedisServer, tmp_path: Path) -> None:
    other = str(LAYOUT_VERSION + 1)
    redis_server.client().set("md:layout", other)
    data = tmp_path / "data"
    args = [sys.executable, "-m", "memoryd", "serve", "--data-dir", str(data), "--metrics-port", "0"]
    args += ["--listen", f"127.0.0.1:{free_port()}", "--redis-url", redis_server.url]
    t0 = time.monotonic()
    out = subprocess.run(args, capture_output=True, env=child_env(), timeout=300, stdin=subprocess.DEVNULL)
    err = out.stderr.decode()
    assert out.returncode == 1, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("memoryd: ") and all(w in last for w in ("md:layout", other, "--redis-url")), last
    assert not (data / "models").exists(), "the model was loaded (or converted) before the check"
    assert time.monotonic() - t0 < 60.0
    assert redis_server.client().get("md:layout") == other.encode()  # left as it was
