"""Leases: this daemon's hold on its hot sessions, kept alive, handed over, let go.

Once a second at most: renew the lease of every hot session and of every session being
loaded (a load queued behind other work may take longer than a lease; a hot session with
calls queued for it is pinned, so it stays hot and renewed) (a lost lease means another
daemon took the session: drop the hot copy), hand over the sessions another
daemon asked for (snapshot, drop, release), refresh the Redis TTLs of sessions in
use, and let go of sessions idle past their TTL (Redis has expired them by then).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from memoryd import metrics
from memoryd.sessions.ordering import Key
from memoryd.sessions.residency import Residency
from memoryd.settings import Settings
from memoryd.store import heads, leases
from memoryd.store.db import Store
from memoryd.store.redis_client import UNAVAILABLE_ERRORS

log = logging.getLogger("memoryd.sessions.leases")


def redis_errors() -> tuple[type[BaseException], ...]:
    return UNAVAILABLE_ERRORS  # cluster failovers and slot moves included


async def maintain_forever(
    hot: Residency, store: Store, owner: str, s: Settings, hand_over: Callable[[Key], Awaitable[None]]
) -> None:
    every = max(0.2, min(1.0, s.lease_seconds / 3, s.ttl_seconds / 4 or 60.0))
    background: set[asyncio.Task[None]] = set()
    while True:
        await asyncio.sleep(every)
        try:
            if s.ttl_seconds:
                await _refresh_ttls(hot, store, owner, s.ttl_seconds)
            keys = hot.resident()
            for key, wanted in zip(keys, await leases.take_handoff_requests(store, keys), strict=True):
                if wanted:  # another daemon has a call for it: snapshot, drop, release
                    task = asyncio.get_running_loop().create_task(hand_over(key))
                    background.add(task)
                    task.add_done_callback(background.discard)
            held = hot.leased()
            before = [hot.peek(key) for key in held]
            ok = await leases.renew(store, held, owner, s.lease_seconds)
            still = set(hot.leased())
            for key, was, fine in zip(held, before, ok, strict=True):
                # an eviction that released the lease while the renewal was on its way is not a loss
                if not fine and key in still and hot.peek(key) is was:
                    log.warning("lost the lease of %s; dropping it", key)
                    hot.drop(key)
            metrics.SESSIONS_STORED.set(await heads.count(store))
        except redis_errors() as e:
            log.warning("session maintenance: Redis unavailable (%s)", e)
        except Exception:  # a bug here must not stop lease renewal for good
            log.exception("session maintenance failed; trying again")


async def _refresh_ttls(hot: Residency, store: Store, owner: str, ttl: int) -> None:
    """Used sessions get their TTL (snapshot keys included) refreshed; idle ones are let go."""
    now = time.monotonic()
    for key in hot.resident():
        h = hot.peek(key)
        if h is None:
            continue
        if now - h.used > ttl:  # expired in Redis by now: forget it, do not resurrect it
            hot.drop(key)
            await leases.renew(store, [key], owner, 0)
        elif h.used > h.touched and now - h.touched > min(60.0, ttl / 4):
            h.touched = now
            await heads.touch(store, *key)
