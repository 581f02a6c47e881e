"""Rolling key/value caches: what each layer keeps of the past.

A cache holds, per layer, the rotated keys and values of the positions a future
query can still see: the last window - 1 positions, and with attention sinks the
first `sinks` positions too (in front).  Its layout is therefore either
contiguous (positions [start - m, start)) or sinks-then-recent; `key_positions`
recovers which absolute position each cached key has.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from model.config import ModelConfig
from model.network import KV


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
