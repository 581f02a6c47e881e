"""The Redis layout on its own, against a real redis-server: fencing, snapshot publication,
chunk checksums, shared snapshots' reference counts, the log's contiguity."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from service_fixtures import RedisServer, redis_server  # noqa: F401 (fixture)

from memoryd.errors import DataLoss
from memoryd.store import Store


def run(redis_server: RedisServer, fn, **kw) -> object:  # noqa: F811
    async def main() -> object:
        r = aioredis.Redis(port=redis_server.port)
        try:
            return await fn(Store(r, **kw), r)
        finally:
            await r.aclose()

    return asyncio.run(main())


def test_fencing_refuses_a_stale_daemon(redis_server) -> None:  # noqa: F811
    async def body(st: Store, r: aioredis.Redis) -> None:
        assert await st.create("t", "s", {}, "sha256:x") == 1
        old = (await st.acquire_lease("t", "s", "daemon-a", 30)).fence
        held = await st.acquire_lease("t", "s", "daemon-b", 30)
        assert held.fence is None and held.holder == "daemon-a"
        await r.delete(st._k("t", "s", "lease"))  # a's lease expired while it was paused
        new = (await st.acquire_lease("t", "s", "daemon-b", 30)).fence
        assert new == old + 1
        assert (await st.append("t", "s", old, 0, [[1, 2]])).status == "fenced"
        assert (await st.append("t", "s", new, 0, [[1, 2]])).status == "ok"
        assert (await st.append("t", "s", new, 0, [[3]])).status == "mismatch"  # CAS on the offset
        assert await st.renew_leases([("t", "s")], "daemon-a", 30) == [False]
        assert await st.read_log("t", "s", 0, 2) == [[1, 2]]

    run(redis_server, body)


def test_snapshot_publish_is_all_or_nothing(redis_server) -> None:  # noqa: F811
    async def body(st: Store, r: aioredis.Redis) -> None:
        await st.create("t", "s", {}, "sha256:x")
        fence = (await st.acquire_lease("t", "s", "d", 30)).fence
        await st.append("t", "s", fence, 0, [[1] * 5, [2] * 3])
        data = bytes(range(256)) * 40  # 10 KiB in 1 KiB chunks
        snap = await st.write_snapshot(data, "sha256:x", 8)
        assert (await st.head("t", "s")).snap == ""  # written, not yet visible
        assert await st.publish_snapshot("t", "s", fence, 0, snap, 8) == 1
        head = await st.head("t", "s")
        assert (head.snap, head.snap_off) == (snap, 8)
        assert await st.read_snapshot(snap) == data
        assert await r.llen(st._k("t", "s", "log")) == 0  # the log before the snapshot is trimmed
        # a reset in between makes a late publication fail (generation changed)
        late = await st.write_snapshot(data, "sha256:x", 8)
        assert (await st.reset("t", "s", fence, None))[0] == 1
        assert await st.publish_snapshot("t", "s", fence, 0, late, 8) == -3
        assert not await r.exists(st.snap_key(snap, "m")), "the reset dropped the last reference"
        # a corrupted chunk is caught by its checksum
        await r.set(st.snap_key(late, "c:3"), b"x" * 1024)
        with pytest.raises(DataLoss, match="chunk 3"):
            await st.read_snapshot(late)

    run(redis_server, body, chunk_bytes=1024)


def test_forks_share_snapshots_by_reference(redis_server) -> None:  # noqa: F811
    async def body(st: Store, r: aioredis.Redis) -> None:
        await st.create("t", "a", {"k": "v"}, "sha256:x")
        fence = (await st.acquire_lease("t", "a", "d", 30)).fence
        await st.append("t", "a", fence, 0, [[1, 2, 3]])
        snap = await st.write_snapshot(b"state" * 100, "sha256:x", 3)
        await st.publish_snapshot("t", "a", fence, 0, snap, 3)
        await st.append("t", "a", fence, 3, [[4], [5, 6]])
        assert await st.fork("t", "a", "b", None, 6, 0) == (1, 6)
        assert await st.fork("t", "a", "c", None, 5, 0) == (-3, 6)
        b = await st.head("t", "b")
        assert (b.snap, b.snap_off, b.offset, b.metadata) == (snap, 3, 6, {"k": "v"})
        assert await st.read_log("t", "b", 3, 6) == [[4], [5, 6]]
        assert await r.get(st.snap_key(snap, "r")) == b"2"
        await st.delete("t", "a")
        assert await st.read_snapshot(snap) == b"state" * 100  # still b's
        await st.delete("t", "b")
        assert await r.keys("*snap*") == []

    run(redis_server, body)


def test_log_gap_is_data_loss(redis_server) -> None:  # noqa: F811
    async def body(st: Store, r: aioredis.Redis) -> None:
        await st.create("t", "s", {}, "sha256:x")
        fence = (await st.acquire_lease("t", "s", "d", 30)).fence
        await st.append("t", "s", fence, 0, [[1, 2], [3]])
        await r.lset(st._k("t", "s", "log"), 1, b'{"o":5,"t":[3]}')
        with pytest.raises(DataLoss, match="gap"):
            await st.read_log("t", "s", 0, 3)

    run(redis_server, body)
