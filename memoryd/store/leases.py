"""Leases, handovers and the daemons' addresses: who serves a session, and where it is reached.

A session is served by the daemon holding its lease (`md:s:{t/s}:lease`, PX lease_seconds). Taking
the lease bumps the head's fencing token, and every head write checks that token, so a daemon that
lost its lease can no longer write. Another daemon asks for a session with `md:s:{t/s}:want`; each
daemon publishes the address it is reached at under `md:daemon:{id}:addr`, so a lease's holder name
leads to an address. Keys: docs/service.md, "The Redis layout".
"""

from __future__ import annotations

import asyncio
import logging
from typing import Literal

from memoryd.store import snapshots
from memoryd.store.db import Store
from memoryd.store.heads import head_of
from memoryd.store.redis_client import UNAVAILABLE_ERRORS
from memoryd.store.results import HeldElsewhere, Leased, OtherModel, Refusal, Taken
from memoryd.store.tokenlog import pieces_of

log = logging.getLogger("memoryd.store.leases")


async def acquire(
    st: Store, tenant: str, sid: str, owner: str, seconds: float
) -> Leased | HeldElsewhere | Literal[Refusal.NOT_FOUND]:
    """The session's lease for `owner` (taken or renewed; the fencing token bumped), or who holds it."""
    keys = [st.keys.head(tenant, sid), st.keys.lease(tenant, sid)]
    res = await st.write("lease", keys, [owner, int(seconds * 1000)])
    code = int(res[0])  # scripts._LEASE: {1, fence}, {-1} no head, {-2, holder, pttl}
    if code == 1:
        return Leased(int(res[1]))
    if code == -1:
        return Refusal.NOT_FOUND
    return HeldElsewhere(res[1].decode(), int(res[2]))


async def take(
    st: Store, tenant: str, sid: str, owner: str, seconds: float, digest: str
) -> Taken | OtherModel | HeldElsewhere | Literal[Refusal.NOT_FOUND]:
    """A load's reads and its lease in one script (scripts._TAKE, one round trip): another model's session
    is refused before its lease is taken; else the lease (fencing token bumped), the head as it is then,
    the log from its snapshot to its offset, and (with ttl_seconds) the session's and its snapshot's TTLs
    refreshed. Atomic: the head and log are the ones the new fencing token guards."""
    keys = [*st.keys.session_keys(tenant, sid), st.keys.lease(tenant, sid)]
    res = await st.write("take", keys, [owner, int(seconds * 1000), digest, st.ttl])
    code = int(res[0])
    if code == -1:
        return Refusal.NOT_FOUND
    if code == -2:
        return HeldElsewhere(res[1].decode(), int(res[2]))
    head = head_of(tenant, sid, dict(zip(res[1][::2], res[1][1::2], strict=True)))
    if code == -3:
        return OtherModel(head)
    pieces = pieces_of(sid, res[2], head.snap_off, head.offset)
    if st.ttl > 0 and head.snap:
        await snapshots.touch(st, head.snap)
    return Taken(head, pieces)


async def renew(st: Store, sessions: list[tuple[str, str]], owner: str, seconds: float) -> list[bool]:
    """Renew (seconds > 0) or release (seconds == 0) leases; False where the lease is no longer ours."""
    if not sessions:
        return []
    ms = int(seconds * 1000)
    calls = [([st.keys.lease(tenant, sid)], [owner, ms]) for tenant, sid in sessions]
    return [bool(x) for x in await st.call_many("renew", calls)]


async def request_handoff(st: Store, tenant: str, sid: str, seconds: float = 10.0) -> None:
    """Ask the daemon holding the session's lease to write it out and let go of it."""
    await st.r.set(st.keys.want(tenant, sid), 1, px=int(seconds * 1000))


async def take_handoff_requests(st: Store, sessions: list[tuple[str, str]]) -> list[bool]:
    """Which of these sessions another daemon asked for (each request is consumed)."""
    if not sessions:
        return []
    async with st.r.pipeline(transaction=False) as pipe:
        for tenant, sid in sessions:
            pipe.delete(st.keys.want(tenant, sid))
        return [bool(x) for x in await pipe.execute()]


# -- the daemons' addresses ------------------------------------------------------------------------


async def publish_address(st: Store, daemon_id: str, address: str, seconds: float) -> None:
    await st.r.set(st.keys.daemon_address(daemon_id), address, px=int(seconds * 1000))


async def withdraw_address(st: Store, daemon_id: str) -> None:
    await st.r.delete(st.keys.daemon_address(daemon_id))


async def address_of(st: Store, daemon_id: str) -> str | None:
    """The published address of a daemon (None if it never published one or stopped renewing it)."""
    raw = await st.r.get(st.keys.daemon_address(daemon_id))
    return raw.decode() if raw is not None else None


async def publish_forever(st: Store, daemon_id: str, address: str, lease_seconds: float) -> None:
    """Keep this daemon's address published while it lives (it outlasts a lease, so a holder is always found)."""
    every = max(0.2, min(1.0, lease_seconds / 3))
    while True:
        try:
            await publish_address(st, daemon_id, address, max(10.0, 3 * lease_seconds))
        except UNAVAILABLE_ERRORS as e:  # Redis away: leases lapse too; publishing resumes with it
            log.warning("could not publish this daemon's address: %s", e)
        await asyncio.sleep(every)
