"""Rolling key/value caches: what each layer keeps of the past.

A cache holds, per layer, the rotated keys and values of the positions a future
query can still see: the last window - 1 positions, and with attention sinks the
first `sinks` positions too (in front).  Its layout is therefore either
contiguous (positions [start - m, start)) or sinks-then-recent; `key_positions`
recovers which absolute position each cached key has.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from model.config import ModelConfig

KV = tuple[torch.Tensor, torch.Tensor]
"""One layer's keys and values, each [B, kv_heads, m, head_dim]; keys already rotated."""


@dataclass(frozen=True)
class CacheSpec:
    keep: int | None
    """Recent positions kept: window - 1 (None: all, full attention).  The first new
    query at position p sees keys (p - window, p]; p itself is new, so the cache must
    hold the window - 1 positions before p."""
    sinks: int = 0
    """Leading positions kept forever (attention sinks)."""

    def length(self, positions: int) -> int:
        """Cached keys after `positions` tokens."""
        if self.keep is None:
            return positions
        return min(positions, self.sinks + self.keep)


def cache_spec(cfg: ModelConfig) -> CacheSpec:
    keep = None if cfg.window_size is None else cfg.window_size - 1
    return CacheSpec(keep, cfg.attention_sinks)


def trim(k: torch.Tensor, v: torch.Tensor, spec: CacheSpec) -> KV:
    """Keep the sinks and the last `keep` positions of contiguous-or-sinked keys/values."""
    n = k.shape[2]
    if spec.keep is None or n <= spec.sinks + spec.keep:
        return k, v
    s, r = spec.sinks, spec.keep
    if s == 0:
        return k[:, :, n - r :], v[:, :, n - r :]
    return torch.cat((k[:, :, :s], k[:, :, n - r :]), 2), torch.cat((v[:, :, :s], v[:, :, n - r :]), 2)


def extend(past: KV | None, new: KV, spec: CacheSpec) -> KV:
    """Append `new` keys/values to `past` and trim to what the spec keeps.

    Never writes into existing tensors, so a state that shares them (a fork) is safe.
    """
    if past is None or past[0].shape[2] == 0:
        k, v = new
    else:
        k, v = torch.cat((past[0], new[0]), 2), torch.cat((past[1], new[1]), 2)
    return trim(k, v, spec)


def join(a: KV | None, b: KV | None) -> KV | None:
    """Concatenate two adjacent caches (either may be None)."""
    if a is None:
        return b
    if b is None:
        return a
    return torch.cat((a[0], b[0]), 2), torch.cat((a[1], b[1]), 2)


def extend_all(past: Sequence[KV | None], new: Sequence[KV], spec: CacheSpec) -> list[KV]:
    return [extend(p, n, spec) for p, n in zip(past, new, strict=True)]


class KVBuffer:
    """Keys and values [1, Hkv, capacity, hd] that grow in place, shared copy-on-write.

    Decoding one token must not copy the whole window (a `torch.cat` per token per
    layer did).  A buffer is allocated once per mini-batch with room for every
    pending token, and each new token's keys are written into the next free slot.

    Forks share a buffer (`StreamState.clone` copies only the handle), so writing in
    place needs a rule: `used` is the high-water mark anyone has written.  A holder
    whose own length equals `used` may write past it (no sharer can see those slots:
    every sharer's length is <= used); any other holder copies its prefix into a new
    buffer first.  Slots a holder can see are therefore never written again.
    """

    __slots__ = ("capacity", "k", "lock", "used", "v")

    def __init__(self, k: torch.Tensor, v: torch.Tensor, capacity: int) -> None:
        n = k.shape[2]
        self.capacity = max(capacity, n)
        shape = (*k.shape[:2], self.capacity, k.shape[3])
        self.k = k.new_empty(shape)
        self.v = v.new_empty(shape)
        self.k[:, :, :n], self.v[:, :, :n] = k, v
        self.used = n
        self.lock = threading.Lock()
        """Makes claiming the tail one step: forks may extend from two threads at once (the
        engine's decode and compute lanes), and two holders of the same length must not both
        see themselves as the owner of the next slot."""

    def claim(self, n: int, m: int) -> bool:
        """Take slots [n, n + m) for a holder of length n, if it owns the tail and they fit."""
        with self.lock:
            if self.used != n or n + m > self.capacity:
                return False
            self.used = n + m
            return True


@dataclass(frozen=True)
class LiveKV:
    """One layer's growing cache as one holder sees it: the first `length` slots of `buf`."""

    buf: KVBuffer
    length: int

    @staticmethod
    def start(past: KV | None, like: torch.Tensor, room: int) -> LiveKV:
        """A buffer holding `past` (or nothing, shaped like `like`) with `room` free slots."""
        k, v = past if past is not None else (like[:, :, :0], like[:, :, :0])
        return LiveKV(KVBuffer(k, v, k.shape[2] + room), k.shape[2])

    def keys(self) -> KV:
        return self.buf.k[:, :, : self.length], self.buf.v[:, :, : self.length]

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> LiveKV:
        """Append k, v [1, Hkv, m, hd]: in place when this holder owns the tail, else into a copy."""
        n, m = self.length, k.shape[2]
        buf = self.buf
        if not buf.claim(n, m):
            old_k, old_v = self.keys()
            buf = KVBuffer(old_k, old_v, max(n + m, buf.capacity))
            buf.used = n + m  # private until returned: nobody else can claim it
        buf.k[:, :, n : n + m], buf.v[:, :, n : n + m] = k, v
        return LiveKV(buf, n + m)

    def nbytes(self) -> int:
        return 2 * self.buf.k.numel() * self.buf.k.element_size()


Past = KV | LiveKV | None
"""What a layer attends over besides the new keys: an immutable cache, or a growing one."""


def combine(past: Past, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, KV | LiveKV]:
    """(keys, values) to attend over (the past, then k and v) and what a caller keeps of them.

    An immutable past is concatenated (a new tensor: nothing shared is written); a
    growing one takes the new keys in place (see KVBuffer).
    """
    if isinstance(past, LiveKV):
        live = past.extend(k, v)
        keys, values = live.keys()
        return keys, values, live
    if past is None:
        return k, v, (k, v)
    keys, values = torch.cat((past[0], k), 2), torch.cat((past[1], v), 2)
    return keys, values, (keys, values)
