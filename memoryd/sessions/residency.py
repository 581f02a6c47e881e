"""Residency: which sessions' states are on the device, within a byte budget.

An LRU ordered by use and bounded by bytes: when the hot states together pass the
budget, the least recently used are the ones to write out and drop (their next call
brings them back from Redis).  This module only keeps the table and picks victims;
writing a state out is the durability protocol's job (memoryd/sessions/calls.py).
"""

from __future__ import annotations

import time
from collections import OrderedDict
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
    """state.nbytes(), kept up to date on every swap (the LRU's byte count)."""
    touched: float = field(default_factory=time.monotonic)
    """When its Redis keys' TTLs were last refreshed."""
    used: float = field(default_factory=time.monotonic)
    """When a call last used it (idle sessions expire: only use refreshes TTLs)."""

    def set_state(self, state: StateHandle) -> None:
        self.state, self.nbytes = state, state.nbytes()


class Residency:
    def __init__(self, budget: int) -> None:
        self.budget = budget
        self._hot: OrderedDict[Key, Hot] = OrderedDict()

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
        self._gauges()

    def drop(self, key: Key) -> None:
        self._hot.pop(key, None)
        self._gauges()

    def changed(self) -> None:
        """A hot state was swapped (its byte count changed)."""
        self._gauges()

    def bytes(self) -> int:
        return sum(h.nbytes for h in self._hot.values())

    def over_budget(self) -> bool:
        return self.bytes() > self.budget

    def victims(self, keep: Key) -> list[Key]:
        """Least recently used first, as many as it takes to get within the budget (never `keep`)."""
        total, out = self.bytes(), []
        for key, hot in self._hot.items():
            if total <= self.budget:
                break
            if key != keep:
                out.append(key)
                total -= hot.nbytes
        return out

    def _gauges(self) -> None:
        metrics.SESSIONS_HOT.set(len(self._hot))
        metrics.HOT_BYTES.set(self.bytes())
