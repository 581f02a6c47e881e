"""The asyncio client against a real daemon: 16 sessions driven concurrently through one channel,
every method, a stream cancelled midway, typed errors (issue 4)."""

from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path

import pytest
from memoryd_sdk import (
    AlreadyExists,
    AsyncMemoryClient,
    FinishReason,
    InvalidArgument,
    NotFound,
    OffsetConflict,
    ResourceExhausted,
    Unauthenticated,
)

pytest.register_assert_rewrite("sdk_fixtures")
from sdk_fixtures import MAX_GENERATE, TOKENS  # noqa: E402
from service_fixtures import Daemon  # noqa: E402

pytest_plugins = ["sdk_fixtures"]
N = 16


async def agent(client: AsyncMemoryClient, i: int) -> tuple[str, int, str]:
    """One agent's session: streamed observations, a turn, a committed reply, a fork, a peek."""
    s = await client.create_session(f"async-{i:02d}", metadata={"agent": str(i)})
    r = await s.append_stream(f"observation {i}.{k}\n" for k in range(3))
    expected = sum(len(f"observation {i}.{k}\n") for k in range(3))
    assert r.offset == expected
    expected += (await s.add_message("tool", f"result {i}")).tokens
    assert s.offset == expected
    gen = await s.complete("?", max_tokens=6, seed=i, commit=True)
    expected += 1 + gen.generated_tokens
    assert gen.offset == expected == s.offset
    fork = await s.fork(temporary=True)
    async with fork:
        await fork.append([i % 256])
        assert (await fork.info()).offset == expected + 1
    stream = s.generate(max_tokens=5, seed=i)
    text = "".join([d async for d in stream])
    assert stream.result is not None and stream.result.text == text
    return s.id, expected, text


@pytest.mark.asyncio
async def test_sixteen_concurrent_sessions(sdk_daemon: Daemon) -> None:
    async with AsyncMemoryClient(sdk_daemon.address, token=TOKENS["alice"], timeout=60) as client:
        t0 = time.monotonic()
        results = await asyncio.gather(*(agent(client, i) for i in range(N)))
        elapsed = time.monotonic() - t0
        assert len({sid for sid, _, _ in results}) == N
        for sid, offset, _ in results:  # each session holds exactly its own work, nothing of the others'
            assert (await client.get_session(sid)).offset == offset
        listed = {s.session_id async for s in client.list_sessions(page_size=5)}
        assert {sid for sid, _, _ in results} <= listed
        offsets = await asyncio.gather(*(client.delete_session(sid) for sid, _, _ in results))
        assert offsets == [off for _, off, _ in results]
        print(f"{N} concurrent agent sessions in {elapsed:.2f} s")


@pytest.mark.asyncio
async def test_async_every_method(sdk_daemon: Daemon, tmp_path: Path) -> None:
    async with AsyncMemoryClient(sdk_daemon.address, token=TOKENS["alice"]) as client:
        s = await client.create_session()
        assert (await s.append("hello ")).offset == 6
        assert (await s.append([1, 2])).offset == 8
        assert (await client.append(s.id, "x", expected_offset=8, append_id="a-1")).offset == 9
        assert (await client.append(s.id, "x", expected_offset=8, append_id="a-1")).duplicate
        h = client.session(s.id)
        assert (await h.info()).offset == 9 and h.offset == 9
        await s.info()  # `s` learns of the raw appends

        stale = client.session(s.id)
        await stale.info()
        await s.append("!")
        with pytest.raises(OffsetConflict) as e:
            await stale.append("?")
        assert e.value.offset == 10 == stale.offset

        reply = await s.chat("status?", max_tokens=6, seed=3)
        assert reply.finish_reason in (FinishReason.LENGTH, FinishReason.STOP_TOKEN)
        assert s.offset == reply.offset == (await s.info()).offset

        raw = await client.complete(s.id, max_tokens=4, seed=1)
        assert raw.generated_tokens == 4 and not raw.committed
        chunks = [c async for c in client.generate(s.id, max_tokens=3, seed=1).chunks()]
        assert chunks[-1].done and tuple(t for c in chunks for t in c.tokens) == raw.tokens[:3]

        path = tmp_path / "a.memoryd"
        header = await s.export(path)
        assert header.offset == s.offset
        copy = await client.import_session(path, session_id="async-copy")
        assert copy.offset == s.offset
        buf = io.BytesIO()
        await s.export(buf)
        buf.seek(0)
        again = await client.session("async-copy-2").import_(buf)
        assert again.offset == s.offset
        with pytest.raises(AlreadyExists):
            await client.import_session(path, session_id="async-copy")

        f = await s.fork("async-fork")
        assert f.offset == s.offset
        assert (await client.fork_session(s.id)).offset == s.offset
        assert (await s.reset()).offset == 0 and s.offset == 0
        fork_offset = f.offset
        assert await f.delete() == fork_offset
        with pytest.raises(NotFound):
            await f.info()

        with pytest.raises(InvalidArgument):
            await s.append([400])
        with pytest.raises(ResourceExhausted):
            await s.complete("x", max_tokens=MAX_GENERATE + 1)
        with pytest.raises(NotFound):
            await client.delete_session("never-was")
        async with AsyncMemoryClient(sdk_daemon.address) as anon:
            with pytest.raises(Unauthenticated):
                await anon.create_session()
        await s.delete()


@pytest.mark.asyncio
async def test_async_cancel_midway(sdk_daemon: Daemon) -> None:
    async with AsyncMemoryClient(sdk_daemon.address, token=TOKENS["alice"]) as client:
        s = await client.create_session()
        await s.append("once upon a time")
        stream = s.generate(max_tokens=MAX_GENERATE, commit=True)
        n = 0
        async for _ in stream.chunks():
            n += 1
            if n == 2:
                stream.cancel()
        assert n == 2 and stream.result is None
        async with s.generate(max_tokens=MAX_GENERATE, commit=True) as st:
            await st.chunks().__anext__()
        assert st.result is None
        await asyncio.sleep(0.2)
        assert (await s.info()).offset == 16  # nothing committed
        assert (await s.append("!")).offset == 17
