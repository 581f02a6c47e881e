"""Ordering: one session's calls apply one at a time, in arrival order.

An asyncio.Lock per session is FIFO (waiters are woken in the order they asked), so
two appends to one session land in the order they arrived, while calls to different
sessions proceed concurrently (and meet again in the engine's batches).
"""

from __future__ import annotations

import asyncio

Key = tuple[str, str]
"""(tenant, session id)."""


class SessionLocks:
    def __init__(self) -> None:
        self._locks: dict[Key, asyncio.Lock] = {}

    def __call__(self, key: Key) -> asyncio.Lock:
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        return lock

    def forget(self, key: Key) -> None:
        """A deleted session's lock (only when nobody waits on it)."""
        lock = self._locks.get(key)
        if lock is not None and not lock.locked():
            del self._locks[key]
