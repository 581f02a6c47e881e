"""Residency: which sessions' states are on the device, within a byte budget.

An LRU ordered by use and bounded by bytes: when the sessions together pass the budget,
the least recently used are the ones to write out and drop (their next call brings them
back from Redis).  This module only keeps the table, the pins and the byte count, and
picks victims; writing a state out is the durability protocol's job
(memoryd/sessions/calls.py).

What a session is charged (`charge`), so that the budget bounds what the daemon holds,
not only the states at rest:
- a hot session at rest: its state's bytes;
- a pinned one (a call is working on it or waiting for it): that plus what the call's copy
  (an append's or a generation's state, until it commits) may own: at most `copy_bytes`, a
  full state's bytes, since the copy may step and fill its window, and when the call said how
  many tokens it reads, at most what a state holds after reading them (`copy_bound`, the
  engine's `Engine.copy_bytes`): a short session's call is charged a short state's bytes;
- a session being loaded: the snapshot bytes read plus the state built from them, reserved
  before the load starts (`reserve`), as twice a full state, and brought down to what the load
  holds once it has read the session's head and snapshot (`resize`: a new
  or short session's load holds little, and 16 of them reserving two full states each while
  they wait for the compute lane evicted sessions that had just been loaded).
A pinned session is never a victim: a session loaded for a call stays hot until that call
(and any call already waiting for it) has run, so no load is paid twice.  A load waits
(in arrival order, calls.py) until the budget has room for it once the unpinned sessions
are evicted; at least one session is always admitted, so a budget smaller than one
session still serves them one at a time.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from memoryd import metrics
from memoryd.engine.handle import StateHandle
from memoryd.sessions.ordering import Key


@dataclass
class Hot:
    """A session loaded on the device."""

    state: StateHandle
    """Its model state (a handle: sessions read only its offset, steps, pending count and size)."""
    fence: int
    """The fencing token of this daemon's lease: every write to the session's head carries it."""
    gen: int
    """The head's generation (bumped by reset): a snapshot is published only over the same gen."""
    snap_pos: int
    """Offset of the newest published snapshot (or 0: none)."""
    snap_steps: int
    nbytes: int = 0
    """state.nbytes(), kept up to date on every swap (the LRU's byte count): what the session
    owns (its caches, pending tokens, and its fast weights once a step has made them its own),
    never the model's initial fast weights, which every session that has taken no step shares
    with the model (model/state.py, `initial_theta`).  So a new or short session costs the
    budget its caches only."""
    touched: float = field(default_factory=time.monotonic)
    """When its Redis keys' TTLs were last refreshed."""
    used: float = field(default_factory=time.monotonic)
    """When a call last used it (idle sessions expire: only use refreshes TTLs)."""

    def set_state(self, state: StateHandle, nbytes: int) -> None:
        """Swap `state` in; `nbytes`: its `nbytes()` as the engine measured it with the result."""
        self.state, self.nbytes = state, nbytes


class Residency:
    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._hot: OrderedDict[Key, Hot] = OrderedDict()
        self._pins: Counter[Key] = Counter()
        self._reserved: dict[Key, int] = {}
        """Bytes reserved for sessions being loaded."""
        self._loading: set[Key] = set()
        """Sessions being loaded whose lease this daemon holds (`leased` renews it)."""
        self.copy_bytes = 0
        """What a call's working copy of a state may grow to (a full state: `model.state.full_state_bytes`)."""
        self.copy_bound: Callable[[int, int, int], int] | None = None
        """(position, tokens, frozen) -> what a copy of a state at `position` may own once it has read `tokens`
        (and `frozen` more into a frozen copy, a generation's recalled context: `Engine.copy_bytes`)."""
        self._bounds: dict[tuple[int, int, int], int] = {}
        """`copy_bound`'s answers, kept: `charge` runs on every pin, unpin and budget check."""
        self._reads: dict[Key, list[tuple[int | None, int]]] = {}
        """Per pinned session, what each of its calls reads: (tokens, frozen); tokens None: not known, charged
        a full copy."""
        self._freed = asyncio.Event()
        """Set whenever bytes are released (an unpin, a drop): a waiting load looks again."""

    def __len__(self) -> int:
        return len(self._hot)

    def resident(self) -> list[Key]:
        """The hot sessions, least recently used first (a copy: safe to iterate while changing)."""
        return list(self._hot)

    def peek(self, key: Key) -> Hot | None:
        """The hot entry without counting it as a use."""
        return self._hot.get(key)

    def use(self, key: Key) -> Hot | None:
        """The hot entry, now the most recently used."""
        hot = self._hot.get(key)
        if hot is not None:
            self._hot.move_to_end(key)
            hot.used = time.monotonic()
        return hot

    def put(self, key: Key, hot: Hot) -> None:
        self._hot[key] = hot
        self._hot.move_to_end(key)
        self._reserved.pop(key, None)
        self._gauges()

    def drop(self, key: Key) -> None:
        self._hot.pop(key, None)
        self._freed.set()
        self._gauges()

    # -- pins and reservations -------------------------------------------------------------------

    def pin(self, key: Key, tokens: int | None = None, frozen: int = 0) -> None:
        """A call works on (or waits for) the session: not a victim until `unpin`.  `tokens`: what the call
        reads into its copy (0: it makes none, as a load; None: not known); `frozen`: what it reads into a
        frozen copy besides (a generation with recall)."""
        self._pins[key] += 1
        self._reads.setdefault(key, []).append((tokens, frozen))
        self._gauges()

    def unpin(self, key: Key, tokens: int | None = None, frozen: int = 0) -> None:
        self._pins[key] -= 1
        reads = self._reads.get(key, [])
        if (tokens, frozen) in reads:
            reads.remove((tokens, frozen))
        if self._pins[key] <= 0:
            del self._pins[key]
            self._reads.pop(key, None)
        self._freed.set()
        self._gauges()

    def pinned(self, key: Key) -> bool:
        return self._pins[key] > 0

    def reserve(self, key: Key, nbytes: int) -> None:
        """Bytes for a session about to be loaded (released by `put` or `unreserve`)."""
        self._reserved[key] = nbytes
        self._gauges()

    def resize(self, key: Key, snapshot_bytes: int, position: int) -> None:
        """A load has read the session's head and snapshot: its reservation comes down to what it holds,
        the snapshot's bytes and a state at `position` (what a copy of an empty state holds once it has
        read `position` tokens: `copy_bound(0, position, 0)`, kept as the charges' bounds are), if that is
        less (never up: the room was made for the larger one)."""
        held = self._reserved.get(key)
        if held is None or self.copy_bound is None:
            return
        nbytes = snapshot_bytes + self._bound(0, position, 0)
        if nbytes < held:
            self._reserved[key] = nbytes
            self._freed.set()
            self._gauges()

    def reserved(self, key: Key) -> bool:
        return key in self._reserved

    def unreserve(self, key: Key) -> None:
        if self._reserved.pop(key, None) is not None:
            self._freed.set()
            self._gauges()

    def loading(self, key: Key, leased: bool) -> None:
        """A load of `key` holds its lease (True) / has ended (False)."""
        if leased:
            self._loading.add(key)
        else:
            self._loading.discard(key)

    def leased(self) -> list[Key]:
        """Sessions whose lease this daemon must keep: the hot ones and those being loaded."""
        return [*self._hot, *(k for k in self._loading if k not in self._hot)]

    def fits(self, nbytes: int) -> bool:
        """Would `nbytes` more stay within the budget (always, when nothing else is held)?"""
        held = self.charged()
        return held == 0 or held + nbytes <= self.budget

    async def wait_freed(self) -> None:
        """Until some bytes are released."""
        self._freed.clear()
        await self._freed.wait()

    def changed(self) -> None:
        """A hot state was swapped (its byte count changed)."""
        self._gauges()

    def bytes(self) -> int:
        """Bytes of the hot states at rest."""
        return sum(h.nbytes for h in self._hot.values())

    def charge(self, key: Key) -> int:
        """A hot session's bytes, and while pinned its calls' copy (one at a time: a session's calls take
        turns, so the largest of their copies)."""
        hot = self._hot.get(key)
        if hot is None:
            return 0
        if self._pins[key] <= 0:
            return hot.nbytes
        reads = self._reads.get(key) or [(None, 0)]
        if self.copy_bound is None or any(n is None for n, _ in reads):
            return hot.nbytes + self.copy_bytes + max(self._bound(hot.state.position, 0, f) for _, f in reads)
        return hot.nbytes + max(self._bound(hot.state.position, n, f) for n, f in reads)

    def _bound(self, position: int, tokens: int, frozen: int) -> int:
        if not frozen and not tokens:
            return 0
        got = self._bounds.get((position, tokens, frozen))
        if got is None:
            if len(self._bounds) > 4096:  # positions move on: keep the recent ones
                self._bounds.clear()
            assert self.copy_bound is not None
            got = self._bounds[(position, tokens, frozen)] = self.copy_bound(position, tokens, frozen)
        return got

    def charged(self) -> int:
        """What the budget counts: every session's charge plus the reservations of loads."""
        return sum(self.charge(k) for k in self._hot) + sum(self._reserved.values())

    def over_budget(self, extra: int = 0) -> bool:
        return self.charged() + extra > self.budget

    def victims(self, keep: Key | None = None, extra: int = 0) -> list[Key]:
        """Least recently used unpinned sessions first, as many as it takes to fit `extra` more bytes
        within the budget (never `keep`)."""
        total, out = self.charged() + extra, []
        for key in self._hot:
            if total <= self.budget:
                break
            if key != keep and self._pins[key] <= 0:
                out.append(key)
                total -= self.charge(key)
        return out

    def _gauges(self) -> None:
        metrics.SESSIONS_HOT.set(len(self._hot))
        metrics.HOT_BYTES.set(self.bytes())
        metrics.CHARGED_BYTES.set(self.charged())
        metrics.SESSIONS_PINNED.set(len(self._pins))
