"""Safe retries for real: a TCP proxy lets the request reach the daemon, swallows the answer, then
cuts the connection (or the client's deadline runs out first).  The SDK retries with the same
append id / session id, and the daemon's state shows the work landed exactly once (issue 4)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest
from memoryd_sdk import AsyncMemoryClient, MemoryClient, RetryPolicy

pytest.register_assert_rewrite("sdk_fixtures")
from sdk_fixtures import TOKENS, TcpProxy  # noqa: E402
from service_fixtures import Daemon  # noqa: E402

pytest_plugins = ["sdk_fixtures"]

POLICY = RetryPolicy(max_attempts=8, initial_backoff=0.05, max_backoff=0.5)


@pytest.fixture
def direct(sdk_daemon: Daemon):
    """A client that bypasses the proxy: the observer of what really landed."""
    with MemoryClient(sdk_daemon.address, token=TOKENS["alice"]) as c:
        yield c


@pytest.fixture
def via_proxy(proxy: TcpProxy):
    with MemoryClient(proxy.address, token=TOKENS["alice"], retry=POLICY, timeout=20) as c:
        yield c


def in_thread(fn: Callable[[], Any]) -> Future:
    """Run the SDK call in the background while the test plays the network."""
    pool = ThreadPoolExecutor(1)
    fut = pool.submit(fn)
    pool.shutdown(wait=False)
    return fut


def wait_until(cond: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def finish(fut: Future) -> Any:
    return fut.result(timeout=30)


def retried(caplog: pytest.LogCaptureFixture, code: str) -> bool:
    return any("retrying" in r.getMessage() and code in r.getMessage() for r in caplog.records)


def test_append_after_a_dropped_response_lands_once(
    proxy: TcpProxy, via_proxy: MemoryClient, direct: MemoryClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="memoryd_sdk")
    s = via_proxy.create_session()
    s.append("before ")
    proxy.drop_responses()
    fut = in_thread(lambda: s.append([7] * 10))
    wait_until(lambda: direct.get_session(s.id).offset == 17, "the append to land on the daemon")
    assert proxy.dropped_bytes > 0 and not fut.done()  # the answer was swallowed: the client still waits
    proxy.cut()
    r = finish(fut)
    assert r.duplicate and (r.start_offset, r.offset, r.tokens) == (7, 17, 10)
    assert retried(caplog, "UNAVAILABLE") and proxy.connections >= 2
    assert direct.get_session(s.id).offset == 17  # read once, not twice
    assert s.offset == 17 and s.append("after").start_offset == 17


def test_deadline_shorter_than_the_call_then_retry_lands_once(
    proxy: TcpProxy, via_proxy: MemoryClient, direct: MemoryClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="memoryd_sdk")
    s = via_proxy.create_session()
    proxy.drop_responses()
    fut = in_thread(lambda: s.append("landed but unanswered", timeout=1.0))
    wait_until(lambda: direct.get_session(s.id).offset == 21, "the append to land on the daemon")
    wait_until(lambda: retried(caplog, "DEADLINE_EXCEEDED"), "a retry after the client's deadline")
    proxy.cut()  # the retry's answer is swallowed too; the next one gets through
    r = finish(fut)
    assert r.duplicate and r.offset == 21
    assert direct.get_session(s.id).offset == 21


def test_append_stream_retry_resends_and_lands_once(
    proxy: TcpProxy, via_proxy: MemoryClient, direct: MemoryClient
) -> None:
    s = via_proxy.create_session()
    pieces = ["obs 1\n", [1, 2, 3], "obs 2\n", [4]]
    proxy.drop_responses()
    fut = in_thread(lambda: s.append_stream(iter(pieces)))
    wait_until(lambda: direct.get_session(s.id).offset == 16, "the stream to land")
    proxy.cut()
    r = finish(fut)
    assert r.duplicate and (r.start_offset, r.offset, r.tokens) == (0, 16, 16)
    assert direct.get_session(s.id).offset == 16


def test_committed_generation_retry_lands_once(proxy: TcpProxy, via_proxy: MemoryClient, direct: MemoryClient) -> None:
    s = via_proxy.create_session()
    s.append("context")
    proxy.drop_responses()
    fut = in_thread(lambda: s.complete("?", max_tokens=8, commit=True))
    wait_until(lambda: direct.get_session(s.id).offset == 7 + 1 + 8, "the generation to be committed")
    proxy.cut()
    r = finish(fut)
    assert r.duplicate and r.committed and r.offset == 16
    assert direct.get_session(s.id).offset == 16  # not sampled and committed a second time
    assert s.offset == 16
    # the retry's answer carries the original output (the server resends it from its record)
    twin = direct.create_session()
    twin.append("context")
    original = twin.complete("?", max_tokens=8)  # greedy: what the first attempt sampled
    assert (r.tokens, r.text, r.generated_tokens) == (original.tokens, original.text, 8)


def test_create_session_retry_makes_one_session(proxy: TcpProxy, via_proxy: MemoryClient, direct: MemoryClient) -> None:
    before = {i.session_id for i in direct.list_sessions()}
    next(via_proxy.list_sessions(), None)  # connect first: a swallowed HTTP/2 handshake would send nothing
    proxy.drop_responses()
    fut = in_thread(lambda: via_proxy.create_session(metadata={"n": "1"}))
    wait_until(lambda: len({i.session_id for i in direct.list_sessions()} - before) == 1, "the create to land")
    proxy.cut()
    s = finish(fut)  # the retry met ALREADY_EXISTS for its own id: that is success
    after = {i.session_id for i in direct.list_sessions()}
    assert after - before == {s.id} and s.offset == 0


def test_generate_stream_retried_before_its_first_message(
    proxy: TcpProxy, sdk_daemon: Daemon, via_proxy: MemoryClient, direct: MemoryClient
) -> None:
    s = via_proxy.create_session()
    s.append("prompt text")
    expected = direct.complete(s.id, max_tokens=10).tokens
    log = sdk_daemon.log_path
    generations = log.read_text().count('"call": "Generate"')
    proxy.drop_responses()
    stream = s.generate(max_tokens=10)
    fut = in_thread(lambda: (list(stream), stream.result))
    wait_until(lambda: log.read_text().count('"call": "Generate"') > generations, "the generation to finish")
    wait_until(lambda: proxy.dropped_bytes > 0, "the answer to be swallowed")
    assert not fut.done()
    proxy.cut()  # the whole answer was lost before its first message reached us: start again
    deltas, result = finish(fut)
    assert result is not None and result.tokens == expected and "".join(deltas) == result.text
    assert proxy.connections >= 2  # it was answered on a new connection
    assert direct.get_session(s.id).offset == 11


@pytest.mark.asyncio
async def test_async_retries_land_once(proxy: TcpProxy, direct: MemoryClient) -> None:
    async def landed(sid: str, offset: int) -> None:
        deadline = time.monotonic() + 20
        while direct.get_session(sid).offset != offset:
            assert time.monotonic() < deadline, "the call never landed"
            await asyncio.sleep(0.02)

    async with AsyncMemoryClient(proxy.address, token=TOKENS["alice"], retry=POLICY, timeout=20) as c:
        s = await c.create_session()
        proxy.drop_responses()
        task = asyncio.create_task(s.append_stream(["a\n", [1, 2], "b\n"]))
        await landed(s.id, 6)
        assert not task.done()
        proxy.cut()
        r = await task
        assert r.duplicate and (r.offset, r.tokens) == (6, 6)

        proxy.drop_responses()
        task2 = asyncio.create_task(s.append("xyz"))
        await landed(s.id, 9)
        assert not task2.done()
        proxy.cut()
        r2 = await task2
        assert r2.duplicate and r2.start_offset == 6 and r2.offset == 9 == s.offset
        assert direct.get_session(s.id).offset == 9
