"""`wait_ready`: a script that starts `memoryd serve` and talks to it at once waits for the daemon
(its first start converts the model, longer than the ~30 s other calls retry UNAVAILABLE for), and
is told which address did not answer.

A real daemon (tiny preset, real Redis) started only after the real client has begun waiting.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from memoryd_sdk import DeadlineExceeded, MemoryClient, Unavailable
from memoryd_sdk.retry import NO_RETRY
from service_fixtures import Daemon, RedisServer, free_port, redis_server, tiny_checkpoint  # noqa: F401 (fixtures)


def test_wait_ready_waits_for_a_daemon_that_starts_later(
    tmp_path: Path,
    tiny_checkpoint: Path,  # noqa: F811
    redis_server: RedisServer,  # noqa: F811
) -> None:
    d = Daemon(tmp_path / "d", tiny_checkpoint, redis_server.url)
    try:
        with MemoryClient(d.address, timeout=5.0, retry=NO_RETRY) as c, ThreadPoolExecutor(1) as pool:
            with pytest.raises(Unavailable):
                c.model_info()  # another call does not wait: nothing listens yet, so it fails fast
            waiting = pool.submit(c.wait_ready, 90.0)
            time.sleep(1.0)
            assert not waiting.done(), "it waits while nothing listens"
            d.start(wait=False)
            info = waiting.result(timeout=120)
            assert info.name and info.vocab_size > 0
            assert c.create_session().info().offset == 0
    finally:
        d.kill()


def test_wait_ready_names_the_address_that_did_not_answer() -> None:
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    with MemoryClient(address) as c:
        t0 = time.monotonic()
        with pytest.raises(DeadlineExceeded, match=address):
            c.wait_ready(1.0)
        assert time.monotonic() - t0 < 10
