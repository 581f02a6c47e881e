"""Snapshots and the journal: immutable state bytes in chunks, shared by reference across slots.

Snapshots are immutable and written before anything points at them; a Lua compare-and-set on the
head's `gen` publishes one, so a reader sees either the old snapshot or the whole new one, never
half of one. A fork adds one reference to its source's snapshot: no weights are copied.

Snapshot references across slots (why a crash at any point is safe):
- Invariant: a head that points at snapshot S with token k has k in S's `refs`.
  A snapshot is freed (all its keys deleted, in one script in its own slot) only
  when `refs` is empty, so a snapshot that a head points at is never freed.
- A reference is added before the head points at it: (1) journal entry, stamped
  by Redis's clock; (2) `HSET refs k` in S's slot, refused if S is gone; (3) the
  head write in the session's slot, which records k and is refused once the stamp
  is older than `window` seconds; (4) journal entry removed.
- A reference is dropped after the head stops pointing: (1) journal entry; (2) the
  head write (compare-and-set on the token it read, refused after `window`);
  (3) `HDEL refs k`, freeing S with the last one; (4) journal entry removed.
- A snapshot is born pinned: journal entry, then manifest + pin `w` in one script,
  then chunks, each written only while the pin is there. Publishing adds the
  head's reference first and removes the pin after; a failed publish drops it.
- The sweep takes journal entries older than `grace` (> window + clock skew
  between Redis masters): by then the head write of that operation has either
  happened or can never happen, so "does the head hold k?" has a final answer. If
  it does not, the sweep drops k (freeing S if it was the last); a pin entry drops
  the pin. Every step is idempotent (HSET/HDEL of unique tokens, DEL, ZREM), so a
  crash of the sweep itself is finished by the next one. An orphan chunk of a
  crashed write is therefore gone `grace` seconds later, not after the TTL.
- With `ttl_seconds`, keys also expire: a head that expires takes no step, so its
  snapshot (whose TTL its users refresh) lives until its own TTL runs out.

The keys (`md:snap:{id}:m`, `:refs`, `:c:{i}`, `md:gc`) are in docs/service.md, "The Redis layout".
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Literal

from redis.exceptions import TimeoutError as RedisTimeoutError

from memoryd.errors import DataLoss
from memoryd.store.db import Store
from memoryd.store.redis_client import UNAVAILABLE_ERRORS
from memoryd.store.results import Ok, Refusal

SNAPSHOT_FORMAT = "memoryd-session-state/1"
PIN = "w"
"""The writer's pin in a snapshot's refs: it keeps an unpublished snapshot alive."""


@dataclass
class SweepReport:
    """What one sweep of the journal did."""

    checked: int = 0
    """journal entries older than the grace period that were looked at"""
    dropped: int = 0
    """references (or writers' pins) no head held any more, removed"""
    freed: int = 0
    """snapshots whose last reference that was"""


def new_token() -> str:
    """A fresh reference token (unique, so adding and dropping it are idempotent)."""
    return uuid.uuid4().hex


# -- the journal and references ------------------------------------------------------------------


def journal_entry(snap: str, token: str, tenant: str = "", sid: str = "") -> str:
    entry = {"s": snap, "r": token} | ({"t": tenant, "i": sid} if sid or tenant else {})
    return json.dumps(entry, separators=(",", ":"), sort_keys=True)


async def journal(st: Store, *entries: str) -> int:
    """Record operations in flight; returns Redis's ms stamp for them."""
    return int(await st.write("journal", [st.keys.journal], list(entries)))


async def chunk_count(st: Store, snap: str) -> int:
    m = await st.r.get(st.keys.snap(snap, "m"))
    return int(json.loads(m)["n"]) if m else 0


async def release(st: Store, snap: str, token: str) -> bool:
    """Drop one reference (or the writer's pin); True if it was the last and the snapshot is freed."""
    keys = st.keys.snap_keys(snap, await chunk_count(st, snap))
    return bool(await st.write("snap_release", keys, [token]))


async def addref(st: Store, snap: str, token: str, tenant: str, sid: str) -> bool:
    keys = [st.keys.snap(snap, "m"), st.keys.snap(snap, "refs")]
    return bool(await st.write("snap_addref", keys, [token, f"{tenant}/{sid}", st.ttl]))


async def touch(st: Store, snap: str) -> None:
    """Refresh the snapshot's TTL (with ttl_seconds)."""
    if snap and st.ttl > 0:
        keys = st.keys.snap_keys(snap, await chunk_count(st, snap))
        await st.write("snap_touch", keys, [st.ttl])


async def held(st: Store, tenant: str, sid: str) -> tuple[str, str] | None:
    """(snapshot, token) the head holds ('' when none), or None if there is no head."""
    snap, ref, digest = await st.r.hmget(st.keys.head(tenant, sid), ["snap", "snap_ref", "digest"])
    if digest is None:
        return None
    return (snap or b"").decode(), (ref or b"").decode()


async def unpin(st: Store, snap: str) -> None:
    await release(st, snap, PIN)
    await st.unjournal(journal_entry(snap, PIN))


async def sweep(st: Store, limit: int = 1000) -> SweepReport:
    """Finish what crashed operations left in the journal (entries older than the grace period).

    Safe to run from every daemon at once: each step is idempotent.
    """
    rep = SweepReport()
    old = await st.call("journal_old", [st.keys.journal], [st.grace_ms, limit])
    for raw in old:
        rep.checked += 1
        e = json.loads(raw)
        snap, token = e["s"], e["r"]
        if "i" in e and await held(st, e["t"], e["i"]) == (snap, token):
            pass  # the operation got through: the head holds the reference
        else:  # never installed, or the head let go of it: drop it
            rep.dropped += 1
            rep.freed += await release(st, snap, token)
        await st.unjournal(raw.decode() if isinstance(raw, bytes) else raw)
    return rep


async def sweep_forever(st: Store, every: float = 60.0) -> None:
    """Run the journal sweep now and then (every daemon does; the steps are idempotent)."""
    log = logging.getLogger("memoryd.sweep")
    while True:
        await asyncio.sleep(every)
        try:
            rep = await sweep(st)
            if rep.dropped:
                log.info(json.dumps({"event": "sweep", **dataclasses.asdict(rep)}))
        except UNAVAILABLE_ERRORS as e:
            log.warning("snapshot sweep: Redis unavailable (%s)", e)
        except Exception:  # a bug here must not stop the sweeping for good
            log.exception("snapshot sweep failed; trying again")


async def journal_size(st: Store) -> int:
    return int(await st.r.zcard(st.keys.journal))


async def refs(st: Store, snap: str) -> dict[str, str]:
    """A snapshot's references: token -> holder ('w' -> stamp while unpublished); {} once freed."""
    raw = await st.r.hgetall(st.keys.snap(snap, "refs"))
    return {k.decode(): v.decode() for k, v in raw.items()}


# -- snapshots -------------------------------------------------------------------------------------


async def write(st: Store, data: bytes, digest: str, position: int) -> str:
    """Write an immutable snapshot, pinned until published (or dropped); returns its id.

    Journal entry, then manifest + pin in one step (so the chunk count is known before
    any chunk exists), then the chunks, each only while the pin holds.
    """
    snap = uuid.uuid4().hex
    n = max(1, -(-len(data) // st.chunk_bytes))
    chunks = [data[i * st.chunk_bytes : (i + 1) * st.chunk_bytes] for i in range(n)]
    manifest = {
        "format": SNAPSHOT_FORMAT,
        "size": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "n": n,
        "chunks": [hashlib.sha256(c).hexdigest() for c in chunks],
        "model_digest": digest,
        "position": position,
        "created": time.time(),
    }
    stamp = await journal(st, journal_entry(snap, PIN))
    keys = [st.keys.snap(snap, "m"), st.keys.snap(snap, "refs")]
    await st.write("snap_begin", keys, [json.dumps(manifest), st.ttl, stamp])
    refs_key = st.keys.snap(snap, "refs")
    for i, c in enumerate(chunks):
        if not await st.write("snap_chunk", [refs_key, st.keys.snap(snap, f"c:{i}")], [c, st.ttl]):
            raise RedisTimeoutError(
                f"snapshot {snap} took longer than the sweep's grace ({st.grace_ms} ms) to write; retry"
            )
    return snap


async def drop(st: Store, snap: str) -> None:
    """Let go of a snapshot that was not published (frees it unless something holds it)."""
    await unpin(st, snap)


Unpublished = Literal[
    Refusal.NOT_FOUND, Refusal.FENCED, Refusal.RESET_MEANWHILE, Refusal.AHEAD_OF_LOG, Refusal.TOO_LATE
]
_PUBLISH_REFUSALS = {  # scripts._PUBLISH's codes
    -1: Refusal.NOT_FOUND,
    -2: Refusal.FENCED,
    -3: Refusal.RESET_MEANWHILE,
    -4: Refusal.AHEAD_OF_LOG,
    -5: Refusal.TOO_LATE,
}


async def publish(st: Store, tenant: str, sid: str, fence: int, gen: int, snap: str, position: int) -> Ok | Unpublished:
    """The head points at `snap` now (Ok), or why not (see `Refusal`; nothing was published: the caller
    drops the snapshot, and tries again later where that makes sense).

    On Ok the writer's pin is handed over to the head.
    """
    h = await held(st, tenant, sid)
    if h is None:
        return Refusal.NOT_FOUND
    old, old_token = h
    token = new_token()
    entries = [journal_entry(snap, token, tenant, sid)]
    if old:
        entries.append(journal_entry(old, old_token, tenant, sid))
    stamp = await journal(st, *entries)
    code = -5
    if await addref(st, snap, token, tenant, sid):
        keys = [st.keys.head(tenant, sid), st.keys.log(tenant, sid)]
        args = [fence, gen, snap, token, position, old_token, stamp, st.window_ms]
        code = int(await st.write("publish", keys, args))
    if code == 1:
        if old:
            await release(st, old, old_token)
        await touch(st, snap)
        await unpin(st, snap)
    else:
        await release(st, snap, token)
    await st.unjournal(*entries)  # not on an exception: the sweep finishes what is unknown
    return Ok() if code == 1 else _PUBLISH_REFUSALS[code]


async def read(st: Store, snap: str) -> bytes:
    """The snapshot's bytes, every chunk and the whole checked against the manifest."""
    m = await st.r.get(st.keys.snap(snap, "m"))
    if m is None:
        raise DataLoss(f"snapshot {snap} is missing its manifest")
    man = json.loads(m)
    chunks = await st.r.mget([st.keys.snap(snap, f"c:{i}") for i in range(man["n"])])
    for i, (c, h) in enumerate(zip(chunks, man["chunks"], strict=True)):
        if c is None:
            raise DataLoss(f"snapshot {snap}: chunk {i} is missing")
        if hashlib.sha256(c).hexdigest() != h:
            raise DataLoss(f"snapshot {snap}: chunk {i} fails its checksum")
    data = b"".join(chunks)
    if len(data) != man["size"] or hashlib.sha256(data).hexdigest() != man["sha256"]:
        raise DataLoss(f"snapshot {snap}: bytes do not match the manifest")
    return data
