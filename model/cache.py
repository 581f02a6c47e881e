"""Rolling key/value caches: what each layer keeps of the past."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from model.network import KV


def cache_keep(window: int | None) -> int | None:
    """How many past keys a query block needs: window - 1 (None: all, full attention).

    The first new query at position p sees keys (p - window, p]; p itself is new, so
    the cache must hold the window - 1 positions before p.
    """
    return None if window is None else window - 1


def extend(past: KV | None, new: KV, keep: int | None) -> KV:
    """Append `new` keys/values to `past` and keep the last `keep` positions.

    Never writes into existing tensors, so a state that shares them (a fork) is safe.
    """
    if past is None or past[0].shape[2] == 0:
        k, v = new
    else:
        k, v = torch.cat((past[0], new[0]), 2), torch.cat((past[1], new[1]), 2)
    if keep is not None and k.shape[2] > keep:
        k, v = k[:, :, k.shape[2] - keep :], v[:, :, v.shape[2] - keep :]
    return k, v


def join(a: KV | None, b: KV | None) -> KV | None:
    """Concatenate two adjacent caches (either may be None)."""
    if a is None:
        return b
    if b is None:
        return a
    return torch.cat((a[0], b[0]), 2), torch.cat((a[1], b[1]), 2)


def extend_all(past: Sequence[KV | None], new: Sequence[KV], keep: int | None) -> list[KV]:
    return [extend(p, n, keep) for p, n in zip(past, new, strict=True)]
