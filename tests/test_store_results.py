"""Every refusal the store once answered with a bare integer comes back as its typed result, against a
real redis-server: create (-1 taken, -2 at the limit), fork (-1 no source, -2 target taken, -3 offset,
-4 at the limit, -5 another model), reset (-1 gone, -2 fenced, -3 offset), delete (gone), publish
(-1 gone, -2 fenced, -3 reset meanwhile, -4 ahead of the log, -5 too late / swept), append (gone, fenced,
mismatch, duplicate), the lease (no session, held elsewhere), a load's take (no session, another model,
held elsewhere) and a metadata update (gone, an expected
entry differs, too many entries)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable

from service_fixtures import RedisServer, redis_server  # noqa: F401 (fixture)

from memoryd.store import heads, leases, snapshots, tokenlog
from memoryd.store.db import Store
from memoryd.store.redis_client import connect
from memoryd.store.results import (
    EntryDiffers,
    HeldElsewhere,
    Leased,
    Logged,
    OffsetDiffers,
    Ok,
    OtherModel,
    Refusal,
    Taken,
    TooManyEntries,
)

DIGEST = "sha256:model-a"


def run(server: RedisServer, body: Callable[[Store], Awaitable[None]]) -> None:
    async def main() -> None:
        r = connect(server.url, 5)
        try:
            await body(Store(r, prefix=f"r{uuid.uuid4().hex[:8]}"))
        finally:
            await r.aclose()

    asyncio.run(main())


async def session(st: Store, sid: str, tokens: list[int], owner: str = "d1") -> int:
    """A session holding `tokens`, leased to `owner`; returns the fence."""
    assert await heads.create(st, "t", sid, {}, DIGEST) == Ok()
    lease = await leases.acquire(st, "t", sid, owner, 30)
    assert isinstance(lease, Leased)
    if tokens:
        assert await tokenlog.append(st, "t", sid, lease.fence, 0, [tokens]) == Logged(0, len(tokens))
    return lease.fence


async def take_over(st: Store, sid: str) -> int:
    """Another daemon takes the session after this one's lease ran out; returns its fence."""
    await st.r.delete(st.keys.lease("t", sid))
    lease = await leases.acquire(st, "t", sid, "d2", 30)
    assert isinstance(lease, Leased)
    return lease.fence


def test_create(redis_server: RedisServer) -> None:  # noqa: F811
    async def body(st: Store) -> None:
        assert await heads.create(st, "t", "a", {}, DIGEST, max_sessions=2) == Ok()
        assert await heads.create(st, "t", "a", {}, DIGEST, max_sessions=2) is Refusal.TAKEN
        assert await heads.create(st, "t", "b", {}, DIGEST, max_sessions=2) == Ok()
        assert await heads.create(st, "t", "c", {}, DIGEST, max_sessions=2) is Refusal.AT_LIMIT
        assert await heads.read(st, "t", "c") is None

    run(redis_server, body)


def test_fork(redis_server: RedisServer) -> None:  # noqa: F811
    async def body(st: Store) -> None:
        await session(st, "src", [1, 2, 3])
        assert await heads.fork(st, "t", "nope", "x", None, None, 0) is Refusal.NOT_FOUND
        assert await heads.fork(st, "t", "src", "x", None, 2, 0) == OffsetDiffers(3)
        assert await heads.fork(st, "t", "src", "x", None, 3, 0, DIGEST) == Ok(3)
        assert await heads.fork(st, "t", "src", "x", None, None, 0) is Refusal.TAKEN
        assert await heads.fork(st, "t", "src", "y", None, None, 0, "sha256:model-b") is Refusal.FOREIGN_MODEL
        assert await heads.fork(st, "t", "src", "y", None, None, 2) is Refusal.AT_LIMIT
        assert await heads.read(st, "t", "y") is None
        assert (await heads.read(st, "t", "x")).offset == 3

    run(redis_server, body)


def test_reset(redis_server: RedisServer) -> None:  # noqa: F811
    async def body(st: Store) -> None:
        old = await session(st, "s", [1, 2, 3])
        assert await heads.reset(st, "t", "nope", old, None) is Refusal.NOT_FOUND
        assert await heads.reset(st, "t", "s", old, 2) == OffsetDiffers(3)
        new = await take_over(st, "s")
        assert await heads.reset(st, "t", "s", old, None) is Refusal.FENCED
        assert (await heads.read(st, "t", "s")).offset == 3, "a refused reset changes nothing"
        assert await heads.reset(st, "t", "s", new, 3) == Ok()
        assert (await heads.read(st, "t", "s")).offset == 0

    run(redis_server, body)


def test_delete(redis_server: RedisServer) -> None:  # noqa: F811
    async def body(st: Store) -> None:
        await session(st, "s", [1, 2, 3, 4])
        assert await heads.delete(st, "t", "s") == Ok(4)
        assert await heads.delete(st, "t", "s") is Refusal.NOT_FOUND

    run(redis_server, body)


def test_publish(redis_server: RedisServer) -> None:  # noqa: F811
    async def body(st: Store) -> None:
        fence = await session(st, "s", [1, 2, 3])

        async def attempt(sid: str, fence: int, gen: int, position: int, swept: bool = False) -> object:
            snap = await snapshots.write(st, b"state" * 10, DIGEST, position)
            if swept:  # the sweep took the unpublished snapshot (its writer's pin is gone)
                await snapshots.drop(st, snap)
            got = await snapshots.publish(st, "t", sid, fence, gen, snap, position)
            if not isinstance(got, Ok):
                await snapshots.drop(st, snap)
            return got

        assert await attempt("nope", fence, 0, 3) is Refusal.NOT_FOUND
        assert await attempt("s", fence, 0, 4) is Refusal.AHEAD_OF_LOG
        assert await attempt("s", fence, 1, 3) is Refusal.RESET_MEANWHILE
        assert await attempt("s", fence, 0, 3, swept=True) is Refusal.TOO_LATE
        assert (await heads.read(st, "t", "s")).snap == "", "nothing refused was published"
        assert await attempt("s", fence, 0, 3) == Ok()
        await take_over(st, "s")
        assert await attempt("s", fence, 0, 3) is Refusal.FENCED
        assert await snapshots.journal_size(st) == 0

    run(redis_server, body)


def test_append_and_find(redis_server: RedisServer) -> None:  # noqa: F811
    async def body(st: Store) -> None:
        fence = await session(st, "s", [])
        assert await tokenlog.append(st, "t", "nope", fence, 0, [[1]]) is Refusal.NOT_FOUND
        first = await tokenlog.append(st, "t", "s", fence, 0, [[1, 2]], "id-1", "rec")
        assert first == Logged(0, 2, tokenlog.tokens_hash([[1, 2]]), "rec", duplicate=False)
        again = await tokenlog.append(st, "t", "s", fence, 2, [[1, 2]], "id-1")
        assert again == Logged(0, 2, tokenlog.tokens_hash([[1, 2]]), "rec", duplicate=True)
        assert await tokenlog.find_append(st, "t", "s", "id-1") == again
        assert await tokenlog.find_append(st, "t", "s", "id-2") is None
        assert await tokenlog.append(st, "t", "s", fence, 5, [[3]]) == OffsetDiffers(2)
        await take_over(st, "s")
        assert await tokenlog.append(st, "t", "s", fence, 2, [[3]]) is Refusal.FENCED
        assert await tokenlog.read(st, "t", "s", 0, 2) == [[1, 2]]

    run(redis_server, body)


def test_lease(redis_server: RedisServer) -> None:  # noqa: F811
    async def body(st: Store) -> None:
        assert await leases.acquire(st, "t", "nope", "d1", 30) is Refusal.NOT_FOUND
        first = await session(st, "s", [])
        again = await leases.acquire(st, "t", "s", "d1", 30)
        assert again == Leased(first + 1), "taking one's own lease again bumps the fence"
        other = await leases.acquire(st, "t", "s", "d2", 30)
        assert isinstance(other, HeldElsewhere) and other.holder == "d1" and 0 < other.ttl_ms <= 30_000

    run(redis_server, body)


def test_take(redis_server: RedisServer) -> None:  # noqa: F811
    """A load's one step: the lease, the head under the new fence and the log tail, or why not (another
    model's session is refused before its lease is taken)."""

    async def body(st: Store) -> None:
        assert await leases.take(st, "t", "nope", "d1", 30, DIGEST) is Refusal.NOT_FOUND
        fence = await session(st, "s", [1, 2])
        assert await tokenlog.append(st, "t", "s", fence, 2, [[3]]) == Logged(2, 3)
        assert await leases.take(st, "t", "s", "d1", 30, "sha256:model-b") == OtherModel(await heads.read(st, "t", "s"))
        assert await st.r.get(st.keys.lease("t", "s")) == b"d1"  # untouched by the refusal
        taken = await leases.take(st, "t", "s", "d1", 30, DIGEST)
        assert isinstance(taken, Taken) and taken.pieces == [[1, 2], [3]]
        assert taken.head == await heads.read(st, "t", "s") and taken.head.fence == fence + 1
        other = await leases.take(st, "t", "s", "d2", 30, DIGEST)
        assert isinstance(other, HeldElsewhere) and other.holder == "d1" and 0 < other.ttl_ms <= 30_000

    run(redis_server, body)


def test_update_metadata(redis_server: RedisServer) -> None:  # noqa: F811
    async def body(st: Store) -> None:
        assert await heads.create(st, "t", "s", {"a": "1"}, DIGEST) == Ok()
        assert await heads.update_metadata(st, "t", "nope", {"b": "2"}, {}, 4) is Refusal.NOT_FOUND
        assert await heads.update_metadata(st, "t", "s", {"b": "2"}, {"a": "0"}, 4) == EntryDiffers("a")
        assert await heads.update_metadata(st, "t", "s", {"b": "2", "c": "3"}, {}, 2) == TooManyEntries(3)
        assert (await heads.read(st, "t", "s")).metadata == {"a": "1"}, "a refused update changes nothing"
        assert await heads.update_metadata(st, "t", "s", {"b": "2", "a": ""}, {"a": "1"}, 2) == Ok()
        assert (await heads.read(st, "t", "s")).metadata == {"b": "2"}

    run(redis_server, body)
