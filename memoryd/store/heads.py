"""Sessions' heads and the tenants' indexes: create, read, fork, reset, delete, list, touch.

A head (`md:s:{t/s}:h`) holds a session's offset, its newest snapshot and the reference it holds
on it, the generation (bumped by reset) and the fencing token. Every head write checks the
caller's fencing token, so a daemon that lost its lease can no longer write. A fork copies the
head and the log tail after the snapshot (bounded by the snapshot interval, never by the session's
length) and adds one reference to the snapshot (memoryd/store/snapshots.py says why that is safe
across slots). Keys: docs/service.md, "The Redis layout".
"""

from __future__ import annotations

import enum
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from redis.exceptions import TimeoutError as RedisTimeoutError

from memoryd.errors import DataLoss
from memoryd.store import snapshots
from memoryd.store.db import Store
from memoryd.store.results import EntryDiffers, OffsetDiffers, Ok, Refusal, TooManyEntries


@dataclass
class Head:
    """A session's head record, as stored."""

    tenant: str
    session_id: str
    created: float
    used: float
    metadata: dict[str, str]
    digest: str
    offset: int
    snap: str
    snap_off: int
    gen: int
    fence: int
    snap_ref: str = ""
    """This head's reference token on `snap` (see memoryd/store/snapshots.py)."""


class _Stalled(enum.Enum):
    """Why a new head was not written though nothing refused it (create raises, fork reads its source again)."""

    TOO_LATE = "too_late"
    """The head write came more than the window after its journal stamp."""
    SNAPSHOT_GONE = "snapshot_gone"
    """The snapshot was freed before the new head's reference was added (a newer one was published)."""


_Created = Ok | Literal[Refusal.TAKEN, Refusal.AT_LIMIT] | _Stalled


async def _forget(st: Store, tenant: str, sid: str, stamp: int | None) -> None:
    """Drop an index entry: the one with this stamp, or (None) any older than the grace period."""
    await st.write("forget", st.keys.index_keys(tenant), [sid, "" if stamp is None else stamp, st.grace_ms])


async def _create_head(
    st: Store,
    tenant: str,
    sid: str,
    *,
    metadata_json: str,
    digest: str,
    snap: str,
    token: str,
    snap_off: int,
    offset: int,
    ix: int,
    stamp: int,
    entries: Sequence[bytes] = (),
) -> Ok | Literal[Refusal.TAKEN] | _Stalled:
    keys = [st.keys.head(tenant, sid), st.keys.log(tenant, sid)]
    args = [time.time(), metadata_json, digest, st.ttl, snap, token, snap_off, offset, ix, stamp, st.window_ms]
    code = int(await st.write("create", keys, [*args, *entries]))  # scripts._CREATE: 1, -1 taken, -5 late
    return Ok() if code == 1 else Refusal.TAKEN if code == -1 else _Stalled.TOO_LATE


async def _new_session(
    st: Store,
    tenant: str,
    sid: str,
    max_sessions: int,
    *,
    metadata_json: str,
    digest: str,
    snap: str,
    snap_off: int,
    offset: int,
    entries: Sequence[bytes] = (),
) -> _Created:
    """Index entry, reference on the snapshot, head."""
    token = snapshots.new_token() if snap else ""
    entry = snapshots.journal_entry(snap, token, tenant, sid) if snap else ""
    stamp = await snapshots.journal(st, entry) if snap else None
    res = await st.write("reserve", st.keys.index_keys(tenant), [sid, max_sessions])
    out: _Created
    if int(res[0]) != 1:  # scripts._RESERVE: {-2} at the limit
        out = Refusal.AT_LIMIT
    else:
        ix, prev = int(res[1]), res[2].decode() if isinstance(res[2], bytes) else str(res[2])
        if snap and not await snapshots.addref(st, snap, token, tenant, sid):
            out = _Stalled.SNAPSHOT_GONE
        else:
            out = await _create_head(
                st,
                tenant,
                sid,
                metadata_json=metadata_json,
                digest=digest,
                snap=snap,
                token=token,
                snap_off=snap_off,
                offset=offset,
                ix=ix,
                stamp=stamp if stamp is not None else ix,
                entries=entries,
            )
        if out is Refusal.TAKEN:
            await st.write("restore", st.keys.index_keys(tenant), [sid, ix, prev])
        elif not isinstance(out, Ok):
            await _forget(st, tenant, sid, ix)
    if isinstance(out, Ok):
        await snapshots.touch(st, snap)
    elif snap and out is not _Stalled.SNAPSHOT_GONE:
        await snapshots.release(st, snap, token)
    if entry:  # not on an exception: then the outcome is unknown, and the sweep finishes it
        await st.unjournal(entry)
    return out


async def create(
    st: Store,
    tenant: str,
    sid: str,
    metadata: dict[str, str],
    digest: str,
    max_sessions: int = 0,
    snap: str = "",
    offset: int = 0,
) -> Ok | Literal[Refusal.TAKEN, Refusal.AT_LIMIT]:
    """A new session (Ok), or why not: the id is taken, the tenant is at its session limit.

    With `snap` (a snapshot from snapshots.write), the session starts from it; on success
    its writer's pin is handed over to the new head (no snapshots.drop needed), on failure
    the caller drops it as before.
    """
    out = await _new_session(
        st,
        tenant,
        sid,
        max_sessions,
        metadata_json=json.dumps(metadata),
        digest=digest,
        snap=snap,
        snap_off=offset,
        offset=offset,
    )
    if isinstance(out, Ok) and snap:
        await snapshots.unpin(st, snap)
    if isinstance(out, _Stalled):
        raise RedisTimeoutError(f"creating session {sid} took longer than {st.window_ms} ms; retry")
    return out


async def read(st: Store, tenant: str, sid: str) -> Head | None:
    raw = await st.r.hgetall(st.keys.head(tenant, sid))
    return head_of(tenant, sid, raw) if raw else None


def head_of(tenant: str, sid: str, raw: dict[bytes, bytes]) -> Head:
    """A head from its hash's fields (DataLoss if one is missing or malformed)."""
    f = {k.decode(): v.decode() for k, v in raw.items()}
    try:
        return Head(
            tenant=tenant,
            session_id=sid,
            created=float(f["created"]),
            used=float(f["used"]),
            metadata=json.loads(f["meta"]),
            digest=f["digest"],
            offset=int(f["offset"]),
            snap=f["snap"],
            snap_off=int(f["snap_off"]),
            gen=int(f["gen"]),
            fence=int(f["fence"]),
            snap_ref=f.get("snap_ref", ""),
        )
    except (KeyError, ValueError) as e:
        raise DataLoss(f"session {sid}: stored head is malformed ({e})") from e


async def stored_bytes(st: Store, head: Head) -> int:
    """Bytes a session holds here: its newest snapshot (the manifest's size: the chunks' bytes) plus its
    token log (MEMORY USAGE, Redis's own count, overhead included). Two reads; no key is scanned."""
    log = int(await st.r.memory_usage(st.keys.log(head.tenant, head.session_id)) or 0)
    if not head.snap:
        return log
    m = await st.r.get(st.keys.snap(head.snap, "m"))
    return log + (int(json.loads(m)["size"]) if m is not None else 0)


async def fork(
    st: Store,
    tenant: str,
    src: str,
    dst: str,
    metadata: dict[str, str] | None,
    expected: int | None,
    max_sessions: int,
    digest: str = "",
) -> Ok | OffsetDiffers | Literal[Refusal.NOT_FOUND, Refusal.TAKEN, Refusal.AT_LIMIT, Refusal.FOREIGN_MODEL]:
    """A copy of `src` named `dst` (Ok, with the offset it starts at), or why not: `src` is not at `expected`,
    `src` does not exist, `dst` is taken, the tenant is at its limit, or `src` belongs to another model than
    `digest` (when given: a copy would be as unusable here).

    The source is read in one step (head + log tail after its snapshot); the copy
    takes a reference on that snapshot. If the source's snapshot is freed between
    the read and the reference (a newer one was published), it reads again.
    """
    keys = [st.keys.head(tenant, src), st.keys.log(tenant, src)]
    for _ in range(8):
        res = await st.call("read_source", keys, ["" if expected is None else expected])
        code = int(res[0])  # scripts._READ_SOURCE: {-1} no source, {-3, offset}, {1, ...}
        if code == -1:
            return Refusal.NOT_FOUND
        if code == -3:
            return OffsetDiffers(int(res[1]))
        offset, snap, snap_off, meta, src_digest = (int(res[1]), res[2].decode(), int(res[3]), res[4], res[5])
        if digest and src_digest.decode() != digest:  # a session's model never changes: no race here
            return Refusal.FOREIGN_MODEL
        out = await _new_session(
            st,
            tenant,
            dst,
            max_sessions,
            metadata_json=json.dumps(metadata) if metadata else meta.decode(),
            digest=src_digest.decode(),
            snap=snap,
            snap_off=snap_off,
            offset=offset,
            entries=res[6:],
        )
        if isinstance(out, Ok):
            return Ok(offset)
        if isinstance(out, Refusal):
            return out
        if out is _Stalled.TOO_LATE:
            break
    raise RedisTimeoutError(f"fork of {src} into {dst} did not settle (the source kept changing); retry")


async def _drop_ref_of_head(st: Store, tenant: str, sid: str, step: Callable[[str, int | str], Awaitable[Any]]) -> Any:
    """Run `step(old_token, stamp)`, a head write that lets go of the head's snapshot, journaled.

    `step` returns the script's reply, a list whose first element is its code (scripts._RESET, _DELETE):
    1 done, -5 too late (raised), -6 the head's snapshot changed since it was read (retried); the others
    are the caller's to decode. The reference is released on success.
    """
    for _ in range(8):
        h = await snapshots.held(st, tenant, sid)
        if h is None:
            return [-1]
        snap, token = h
        entry = snapshots.journal_entry(snap, token, tenant, sid) if snap else ""
        stamp = await snapshots.journal(st, entry) if snap else ""
        res = await step(token, stamp)
        code = int(res[0])
        if code == 1 and snap:
            await snapshots.release(st, snap, token)
        if entry:
            await st.unjournal(entry)
        if code == -5:
            raise RedisTimeoutError(f"session {sid}: the write took longer than {st.window_ms} ms; retry")
        if code != -6:
            return res
    raise RedisTimeoutError(f"session {sid}: its snapshot kept changing; retry")


async def reset(
    st: Store, tenant: str, sid: str, fence: int, expected: int | None
) -> Ok | OffsetDiffers | Literal[Refusal.NOT_FOUND, Refusal.FENCED]:
    """The session emptied (offset 0, no snapshot, its generation bumped), or why not."""

    async def step(token: str, stamp: int | str) -> Any:
        args = [fence, "" if expected is None else expected, time.time(), token, stamp, st.window_ms]
        return await st.write("reset", st.keys.session_keys(tenant, sid), args)

    res = await _drop_ref_of_head(st, tenant, sid, step)
    code = int(res[0])  # scripts._RESET: {1}, {-1} gone, {-2} fenced, {-3, offset}
    if code == 1:
        return Ok()
    if code == -3:
        return OffsetDiffers(int(res[1]))
    return Refusal.FENCED if code == -2 else Refusal.NOT_FOUND


async def delete(st: Store, tenant: str, sid: str) -> Ok | Literal[Refusal.NOT_FOUND]:
    """The session and its keys gone (Ok, with the offset it had), or NOT_FOUND."""
    keys = [*st.keys.session_keys(tenant, sid), st.keys.lease(tenant, sid), st.keys.want(tenant, sid)]

    async def step(token: str, stamp: int | str) -> Any:
        return await st.write("delete", keys, [token, stamp, st.window_ms])

    res = await _drop_ref_of_head(st, tenant, sid, step)
    if int(res[0]) == 1:  # scripts._DELETE: {1, offset, ix} or {-1} gone
        ix = res[2].decode() if isinstance(res[2], bytes) else str(res[2])
        await _forget(st, tenant, sid, int(ix) if ix else None)
        return Ok(int(res[1]))
    await _forget(st, tenant, sid, None)
    return Refusal.NOT_FOUND


async def list_page(st: Store, tenant: str, after: str, limit: int) -> tuple[list[Head], str]:
    """Up to `limit` heads with ids > `after`, and the id to continue after ('' at the end)."""
    found: list[Head] = []
    cursor = after
    while len(found) < limit:
        lo = f"({cursor}" if cursor else "-"
        ids = await st.r.zrangebylex(st.keys.index(tenant), lo, "+", start=0, num=limit - len(found))
        if not ids:
            return found, ""
        for raw in ids:
            sid = raw.decode()
            h = await read(st, tenant, sid)
            if h is None:  # expired by TTL, or a create that crashed: forget it once it is old
                await _forget(st, tenant, sid, None)
            else:
                found.append(h)
            cursor = sid
    more = await st.r.zrangebylex(st.keys.index(tenant), f"({cursor}", "+", start=0, num=1)
    return found, cursor if more else ""


async def update_metadata(
    st: Store, tenant: str, sid: str, patch: dict[str, str], expected: dict[str, str], max_entries: int
) -> Ok | EntryDiffers | TooManyEntries | Literal[Refusal.NOT_FOUND]:
    """Metadata entries set / removed ("" removes) in one step (Ok), if every `expected` entry holds.

    Not fenced: metadata is client data, not model state, so no lease is needed to change it.
    """
    args = [time.time(), json.dumps(patch), json.dumps(expected), max_entries]
    res = await st.write("update_meta", [st.keys.head(tenant, sid)], args)
    code = int(res[0])  # scripts._UPDATE_META: {1, meta}, {-1} gone, {-3, key}, {-2, entries}
    if code == 1:
        return Ok()
    if code == -3:
        return EntryDiffers(res[1].decode())
    if code == -2:
        return TooManyEntries(int(res[1]))
    return Refusal.NOT_FOUND


async def touch(st: Store, tenant: str, sid: str) -> None:
    """Refresh the TTLs of the session's keys and of its snapshot (with ttl_seconds)."""
    if st.ttl > 0:
        snap = await st.write("touch", st.keys.session_keys(tenant, sid), [st.ttl])
        if snap:
            await snapshots.touch(st, snap.decode())


async def count(st: Store) -> int:
    """Sessions in every tenant's index."""
    n = 0
    async for key in st.r.scan_iter(match=st.keys.index_pattern(), count=1000):
        n += await st.r.zcard(key)
    return n
