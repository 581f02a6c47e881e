"""The Redis layout on its own, against a real redis-server and a real Redis Cluster: fencing,
snapshot publication, chunk checksums, shared snapshots' references across slots, the log's
contiguity, a crash at every step of every cross-slot operation, and WAIT for replicas."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import Awaitable, Callable

import pytest
import redis
from cluster_fixtures import LocalCluster
from service_fixtures import RedisServer, redis_server  # noqa: F401 (fixture)

from memoryd.errors import DataLoss
from memoryd.store import heads, leases, snapshots, tokenlog
from memoryd.store.db import ReplicaTimeout, Store
from memoryd.store.redis_client import connect
from memoryd.store.results import HeldElsewhere, Leased, Logged, OffsetDiffers, Ok, Refusal
from memoryd.store.scripts import SCRIPTS

BACKENDS = ["single", "cluster"]


@pytest.fixture(params=BACKENDS)
def redis_url(request: pytest.FixtureRequest) -> str:
    """A single redis-server (fresh per test) or the session's cluster (keys under a fresh prefix)."""
    if request.param == "single":
        return request.getfixturevalue("redis_server").url
    return request.getfixturevalue("redis_cluster").url


def run(url: str, fn: Callable[[Store, object], Awaitable[object]], **kw) -> object:
    async def main() -> object:
        r = connect(url, 5)
        try:
            return await fn(Store(r, prefix=f"t{uuid.uuid4().hex[:8]}", **kw), r)
        finally:
            await r.aclose()

    return asyncio.run(main())


async def lease(st: Store, tenant: str, sid: str, owner: str, seconds: float) -> Leased:
    got = await leases.acquire(st, tenant, sid, owner, seconds)
    assert isinstance(got, Leased), got
    return got


async def snapshot_keys(st: Store) -> set[str]:
    return {k.decode() async for k in st.r.scan_iter(match=f"{st.prefix}:snap:*", count=1000)}


def test_every_script_names_every_key_in_keys() -> None:
    """On a cluster a script may touch only keys named in KEYS (so they can be routed and
    checked to share a slot); no key is built inside Lua."""
    keyed = r"redis\.call\('(?!TIME)[A-Z]+',\s*([^,)]+)"
    for name, src in SCRIPTS.items():
        assert "..  ':" not in src and ":snap:" not in src and "prefix" not in src, name
        args = re.findall(keyed, src)
        assert args, f"{name}: touches no key?"
        for arg in args:
            assert re.fullmatch(r"KEYS\[(\d+|i)\]", arg.strip()), f"{name}: key argument {arg!r} is not from KEYS"


def test_fencing_refuses_a_stale_daemon(redis_url: str) -> None:
    async def body(st: Store, r) -> None:
        assert await heads.create(st, "t", "s", {}, "sha256:x") == Ok()
        old = (await lease(st, "t", "s", "daemon-a", 30)).fence
        held = await leases.acquire(st, "t", "s", "daemon-b", 30)
        assert isinstance(held, HeldElsewhere) and held.holder == "daemon-a" and 0 < held.ttl_ms <= 30_000
        await r.delete(st.keys.session("t", "s", "lease"))  # a's lease expired while it was paused
        new = (await lease(st, "t", "s", "daemon-b", 30)).fence
        assert new == old + 1
        assert (await tokenlog.append(st, "t", "s", old, 0, [[1, 2]])) is Refusal.FENCED
        assert await tokenlog.append(st, "t", "s", new, 0, [[1, 2]]) == Logged(start=0, offset=2)
        assert (await tokenlog.append(st, "t", "s", new, 0, [[3]])) == OffsetDiffers(2)  # CAS on the offset
        assert await leases.renew(st, [("t", "s")], "daemon-a", 30) == [False]
        assert await tokenlog.read(st, "t", "s", 0, 2) == [[1, 2]]

    run(redis_url, body)


def test_snapshot_publish_is_all_or_nothing(redis_url: str) -> None:
    async def body(st: Store, r) -> None:
        await heads.create(st, "t", "s", {}, "sha256:x")
        fence = (await lease(st, "t", "s", "d", 30)).fence
        await tokenlog.append(st, "t", "s", fence, 0, [[1] * 5, [2] * 3])
        data = bytes(range(256)) * 40  # 10 KiB in 1 KiB chunks
        snap = await snapshots.write(st, data, "sha256:x", 8)
        assert (await heads.read(st, "t", "s")).snap == ""  # written, not yet visible
        assert await snapshots.publish(st, "t", "s", fence, 0, snap, 8) == Ok()
        head = await heads.read(st, "t", "s")
        assert (head.snap, head.snap_off) == (snap, 8)
        assert list(await snapshots.refs(st, snap)) == [head.snap_ref], "the writer's pin went to the head"
        assert await snapshots.read(st, snap) == data
        assert await r.llen(st.keys.session("t", "s", "log")) == 0  # the log before the snapshot is trimmed
        # a reset in between makes a late publication fail (generation changed)
        late = await snapshots.write(st, data, "sha256:x", 8)
        assert await heads.reset(st, "t", "s", fence, None) == Ok()
        assert await snapshots.publish(st, "t", "s", fence, 0, late, 8) is Refusal.RESET_MEANWHILE
        assert not await r.exists(st.keys.snap(snap, "m")), "the reset dropped the last reference"
        # a corrupted chunk is caught by its checksum
        await r.set(st.keys.snap(late, "c:3"), b"x" * 1024)
        with pytest.raises(DataLoss, match="chunk 3"):
            await snapshots.read(st, late)
        await snapshots.drop(st, late)
        assert await snapshot_keys(st) == set() and await snapshots.journal_size(st) == 0

    run(redis_url, body, chunk_bytes=1024)


def test_forks_share_snapshots_by_reference(redis_url: str) -> None:
    async def body(st: Store, r) -> None:
        await heads.create(st, "t", "a", {"k": "v"}, "sha256:x")
        fence = (await lease(st, "t", "a", "d", 30)).fence
        await tokenlog.append(st, "t", "a", fence, 0, [[1, 2, 3]])
        snap = await snapshots.write(st, b"state" * 100, "sha256:x", 3)
        await snapshots.publish(st, "t", "a", fence, 0, snap, 3)
        await tokenlog.append(st, "t", "a", fence, 3, [[4], [5, 6]])
        assert await heads.fork(st, "t", "a", "b", None, 6, 0) == Ok(6)
        assert await heads.fork(st, "t", "a", "c", None, 5, 0) == OffsetDiffers(6)
        assert await heads.fork(st, "t", "a", "b", None, None, 0) is Refusal.TAKEN
        b = await heads.read(st, "t", "b")
        assert (b.snap, b.snap_off, b.offset, b.metadata) == (snap, 3, 6, {"k": "v"})
        assert await tokenlog.read(st, "t", "b", 3, 6) == [[4], [5, 6]]
        refs = await snapshots.refs(st, snap)
        assert sorted(refs.values()) == ["t/a", "t/b"] and b.snap_ref in refs
        before = await st.bytes_used(f"{st.prefix}:snap:*")
        assert await heads.fork(st, "t", "b", "c", None, None, 0) == Ok(6)
        assert await st.bytes_used(f"{st.prefix}:snap:*") < before + 500, "a fork copies no weights"
        await heads.delete(st, "t", "a")
        await heads.delete(st, "t", "c")
        assert await snapshots.read(st, snap) == b"state" * 100  # still b's
        assert list((await snapshots.refs(st, snap)).values()) == ["t/b"]
        await heads.delete(st, "t", "b")
        assert await snapshot_keys(st) == set(), "freed with its last user"
        assert await snapshots.journal_size(st) == 0
        assert (await heads.list_page(st, "t", "", 10)) == ([], "")

    run(redis_url, body)


def test_list_pages_through_ids_created_in_any_order(redis_url: str) -> None:
    async def body(st: Store, r) -> None:
        ids = [f"s{i:02d}" for i in range(12)]
        for sid in ids[::-1][:6] + ids[:6]:  # not in id order
            assert await heads.create(st, "t", sid, {}, "sha256:x", max_sessions=12) == Ok()
        assert await heads.create(st, "t", "s03", {}, "sha256:x") is Refusal.TAKEN  # taken: the index is left as it was
        assert await heads.create(st, "t", "extra", {}, "sha256:x", max_sessions=12) is Refusal.AT_LIMIT

        async def pages() -> list[str]:
            out, after = [], ""
            while True:
                page, after = await heads.list_page(st, "t", after, 5)
                out += [h.session_id for h in page]
                if not after:
                    return out

        assert await pages() == ids
        for sid in ("s00", "s03", "s11"):
            assert isinstance(await heads.delete(st, "t", sid), Ok)
        assert await pages() == [i for i in ids if i not in ("s00", "s03", "s11")]
        assert await heads.count(st) == 9

    run(redis_url, body)


def test_log_gap_is_data_loss(redis_url: str) -> None:
    async def body(st: Store, r) -> None:
        await heads.create(st, "t", "s", {}, "sha256:x")
        fence = (await lease(st, "t", "s", "d", 30)).fence
        await tokenlog.append(st, "t", "s", fence, 0, [[1, 2], [3]])
        await r.lset(st.keys.session("t", "s", "log"), 1, b'{"o":5,"t":[3]}')
        with pytest.raises(DataLoss, match="gap"):
            await tokenlog.read(st, "t", "s", 0, 3)

    run(redis_url, body)


class Crash(Exception):
    """The daemon died here: no later step of the operation runs."""


class CrashingStore(Store):
    """A Store that dies after `budget` Redis writes (scripts and journal removals)."""

    budget = 10**9

    def _spend(self) -> None:
        if self.budget <= 0:
            raise Crash
        self.budget -= 1

    async def write(self, name, keys, args):
        self._spend()
        return await super().write(name, keys, args)

    async def unjournal(self, *entries: str) -> None:
        self._spend()
        await super().unjournal(*entries)


WINDOW, GRACE = 0.3, 0.8


async def _setup(st: Store, sid: str) -> tuple[int, str]:
    """A session with a published snapshot, a log tail, and a second snapshot written but not published."""
    await heads.create(st, "t", sid, {}, "sha256:x")
    fence = (await lease(st, "t", sid, "d", 30)).fence
    await tokenlog.append(st, "t", sid, fence, 0, [[1, 2, 3]])
    s1 = await snapshots.write(st, b"one" * 700, "sha256:x", 3)
    assert await snapshots.publish(st, "t", sid, fence, 0, s1, 3) == Ok()
    await tokenlog.append(st, "t", sid, fence, 3, [[4, 5]])
    return fence, await snapshots.write(st, b"two" * 700, "sha256:x", 5)


OPS: dict[str, Callable[[Store, str, int, str], Awaitable[object]]] = {
    "publish": lambda st, sid, fence, s2: snapshots.publish(st, "t", sid, fence, 0, s2, 5),
    "fork": lambda st, sid, fence, s2: heads.fork(st, "t", sid, sid + "-fork", None, None, 0),
    "reset": lambda st, sid, fence, s2: heads.reset(st, "t", sid, fence, None),
    "delete": lambda st, sid, fence, s2: heads.delete(st, "t", sid),
    "import": lambda st, sid, fence, s2: heads.create(st, "t", sid + "-imp", {}, "sha256:x", snap=s2, offset=5),
    "write": lambda st, sid, fence, s2: snapshots.write(st, b"three" * 900, "sha256:x", 5),
}


async def _check_consistent(st: Store, sessions: list[str]) -> None:
    """Every head's snapshot is whole and holds exactly the references of the heads on it; nothing else is left."""
    held: dict[str, set[str]] = {}
    for sid in sessions:
        h = await heads.read(st, "t", sid)
        if h is not None and h.snap:
            assert await snapshots.read(st, h.snap), sid
            held.setdefault(h.snap, set()).add(h.snap_ref)
            pieces = await tokenlog.read(st, "t", sid, h.snap_off, h.offset)
            assert h.snap_off + sum(map(len, pieces)) == h.offset
    for snap, tokens in held.items():
        assert set(await snapshots.refs(st, snap)) == tokens, f"snapshot {snap}: references != heads holding it"
    live = {st.keys.snap(s, what) for s in held for what in ("m", "refs")}
    live |= {st.keys.snap(s, f"c:{i}") for s in held for i in range(await snapshots.chunk_count(st, s))}
    assert await snapshot_keys(st) == live, "a snapshot nobody holds was left behind"
    assert await snapshots.journal_size(st) == 0


@pytest.mark.parametrize("op", sorted(OPS))
def test_a_crash_at_any_step_is_finished_by_the_sweep(redis_url: str, op: str) -> None:
    """Kill the operation after each of its Redis writes in turn (and let it finish once);
    after the grace period one sweep leaves exact references and no orphan chunk."""

    async def body(st: CrashingStore, r) -> None:
        sessions, n = [], 0
        while True:
            sid = f"s{n}"
            sessions += [sid, sid + "-fork", sid + "-imp"]
            fence, s2 = await _setup(st, sid)
            st.budget = n
            try:
                await OPS[op](st, sid, fence, s2)
                finished = True
            except Crash:
                finished = False
            st.budget = 10**9
            if op != "publish" and op != "import":
                await snapshots.drop(st, s2)  # the caller's part: s2 was only there for those two
            n += 1
            if finished:
                break
        assert n >= 3, f"{op} took only {n - 1} steps?"
        assert (await snapshots.sweep(st)).checked == 0, "nothing is swept before the grace period"
        await asyncio.sleep(GRACE + 0.1)
        rep = await snapshots.sweep(st)
        assert rep.checked > 0
        await _check_consistent(st, sessions)
        assert (await snapshots.sweep(st)).checked == 0

    async def main() -> None:
        r = connect(redis_url, 5)
        try:
            st = CrashingStore(r, prefix=f"t{uuid.uuid4().hex[:8]}", window_seconds=WINDOW, grace_seconds=GRACE)
            await body(st, r)
        finally:
            await r.aclose()

    asyncio.run(main())


def test_a_head_write_past_the_window_is_refused(redis_url: str) -> None:
    """A paused daemon cannot install a reference the sweep may already have dropped."""

    async def body(st: Store, r) -> None:
        fence, s2 = await _setup(st, "p")
        stamp = await snapshots.journal(st, "x")
        await asyncio.sleep(WINDOW + 0.1)
        keys = [st.keys.session("t", "p", "h"), st.keys.session("t", "p", "log")]
        token = (await heads.read(st, "t", "p")).snap_ref
        args = [fence, 0, s2, "late-token", 5, token, stamp, st.window_ms]
        assert await st.write("publish", keys, args) == -5
        assert (await heads.read(st, "t", "p")).snap != s2

    run(redis_url, body, window_seconds=WINDOW, grace_seconds=GRACE)


def test_wait_for_replicas(redis_cluster: LocalCluster) -> None:
    """With wait_replicas an acknowledged append is on the replica; asking for more replicas than exist fails
    (retryably) instead of acknowledging."""

    async def body(st: Store, r) -> None:
        await heads.create(st, "t", "w", {}, "sha256:x")
        fence = (await lease(st, "t", "w", "d", 30)).fence
        assert isinstance(await tokenlog.append(st, "t", "w", fence, 0, [[7, 8]], "a1"), Logged)
        key = st.keys.session("t", "w", "log")
        master = redis_cluster.master_of(key)
        replica = next(
            n
            for n in redis_cluster.live()
            if n is not master and redis_cluster._role(n) == "slave" and _follows(n, master)
        )
        with redis.Redis(port=replica.port) as c:
            c.execute_command("READONLY")
            assert c.lrange(key, 0, -1) == [b'{"o":0,"t":[7,8]}']
        greedy = Store(r, prefix=st.prefix, wait_replicas=2, wait_timeout=0.2)
        t0 = time.monotonic()
        with pytest.raises(ReplicaTimeout, match="reached 1 of 2 replicas"):
            await tokenlog.append(greedy, "t", "w", fence, 2, [[9]], "a2")
        assert time.monotonic() - t0 < 3
        dup = await tokenlog.append(st, "t", "w", fence, 2, [[9]], "a2")  # the retry finds it, and now it is replicated
        assert (dup.duplicate, dup.offset) == (True, 3)

    run(redis_cluster.url, body, wait_replicas=1)


def _follows(replica, master) -> bool:
    with redis.Redis(port=replica.port) as c:
        return int(c.info("replication")["master_port"]) == master.port


def test_wait_without_replicas_is_refused(redis_server: RedisServer) -> None:  # noqa: F811
    async def body(st: Store, r) -> None:
        with pytest.raises(ReplicaTimeout, match="reached 0 of 1 replicas"):
            await heads.create(st, "t", "x", {}, "sha256:x")

    run(redis_server.url, body, wait_replicas=1, wait_timeout=0.1)
