"""oneDNN's fp32 products for batched decode on a CPU: the static weights through packed copies.

A batched decode forward multiplies its rows (one per session, 16 at the served maximum) by
every static weight: the attention projections, the static MLPs and the output head.  The
plain product (`F.linear`, MKL) re-arranges each weight into its kernel's blocked layout on
every call, and at a few to 16 rows that work is a large share of the product (the weights
come from DRAM either way).  `linear` keeps each weight's arranged copy, made once by oneDNN
(`torch.ops.mkldnn._reorder_linear_weight`, the pass inductor's CPU freezing uses), and
multiplies by it (`torch.ops.mkldnn._linear_pointwise`).  A session's fast weights change at
every test-time step, so `fast_linear` multiplies by them as they are: packing them would copy
74 MB per session every 64 tokens and keep a second copy of each.

Measured on one core of this project's CPU (AMD EPYC, AVX-512; weights cycled so that each
comes from DRAM, as in a forward), 16 rows: the head [16, 576] x [576, 49152] 23.5 -> 11.7 ms,
the 23 static MLPs' products 13.9 -> 8.3 ms (w1, and w3 alike) and 12.6 -> 8.2 ms (w2), the 60
attention projections 13.8 -> 9.8 ms (q and o) and 4.7 -> 3.5 ms (k and v); and as fast from 2
to 15 rows, where MKL's plain product takes its slower small-M paths (hence no padding to 16
here, `network.tile_rows`).  A session's fast MLP per row, `fast_linear`: 1.19 GB in 90-94 ms
against 103 ms.  A whole 16-row forward of the default model, in-process, alternating in one
process over 7 rounds: 248 ms with MKL's packed copies of the MLPs and the head (before), 219
with oneDNN's, 213 with the projections too, 204 with the fast MLPs too; one row 56-61 ms
either way.  `bench/pooled_attention.py` measures the forward with it on and off: 16 rows 244 ->
208 ms, 4 rows 106 -> 81, one row 63 -> 61 (2026-12-07).  Results differ from `F.linear`'s in
the last bits (about 1e-6 relative): only batched decode uses these products, whose activations
are provisional (model/batch.py), so no persisted bit depends on them.

What it costs: a second copy of every static weight it multiplies by (the embedding table
only where it is the head), made when a server starts (`prepare`) or else on a weight's first
batched product, and kept while the weight lives: for the default model 464 MB (the resident
memory grew by 445 MB), made in 0.4 s.  `TTTModel.packed_decode = False` turns it off (`memoryd
serve --packed-decode false`): then batched decode runs the plain product, padding 9-15 rows to
16 (`network.tile_rows`).

Where oneDNN is missing (another build of torch, another device or dtype) `usable` is false and
the plain product runs.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterable

import torch
import torch.nn.functional as F

HINT_ROWS = 16
"""The row count oneDNN is told to arrange the copies for: the served maximum of sessions per forward
(they serve any row count; from 1 to 32 rows none was slower than the plain product)."""

_lock = threading.Lock()
_packed: dict[int, tuple[tuple[int, int], torch.Tensor]] = {}
"""id(weight) -> ((data_ptr, version) when packed, the packed copy); an entry goes with its weight."""


_ONEDNN = (
    torch.backends.mkldnn.is_available()
    and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    and hasattr(torch.ops.mkldnn, "_linear_pointwise")
)
"""Whether this torch has oneDNN and the two ops used here (checked once: `usable` runs on every product)."""


def packable(weight: torch.Tensor) -> bool:
    """Whether oneDNN multiplies by `weight`: fp32 on a CPU, not trained, a torch built with oneDNN."""
    return _ONEDNN and weight.device.type == "cpu" and weight.dtype == torch.float32 and not weight.requires_grad


def usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear` and `fast_linear` run on oneDNN for x (`packable`, x on its device and dtype)."""
    return x.device == weight.device and x.dtype == weight.dtype and packable(weight)


def prepare(weights: Iterable[torch.Tensor]) -> int:
    """Make the packed copies of `weights` now (those oneDNN takes), as a server does at its start so that
    its first decode does not wait for them (the default model's take 0.4 s; made in the first 16-session
    decode instead, MKL's copies stalled it 1.7 s); returns the bytes of all copies kept."""
    for w in weights:
        if packable(w):
            _copy_of(w)
    return packed_bytes()


def _copy_of(weight: torch.Tensor) -> torch.Tensor:
    """The packed copy of `weight`, made now if it is new or was written since (`_version`)."""
    key = (weight.data_ptr(), weight._version)
    with _lock:
        have = _packed.get(id(weight))
        if have is not None and have[0] == key:
            return have[1]
        if have is None:
            weakref.finalize(weight, _packed.pop, id(weight), None)
        copy = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), HINT_ROWS)
        _packed[id(weight)] = (key, copy)
        return copy


def _product(x: torch.Tensor, weight: torch.Tensor, out_features: int) -> torch.Tensor:
    flat = x.reshape(-1, x.shape[-1])
    return torch.ops.mkldnn._linear_pointwise(flat, weight, None, "none", [], "").view(*x.shape[:-1], out_features)


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T for x [..., in] through the weight's packed copy (`usable`), else plain."""
    if not usable(x, weight):
        return F.linear(x, weight)
    return _product(x, _copy_of(weight), weight.shape[0])


def fast_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T for one session's fast weight [1, out, in] or [out, in] as it is (no copy), on
    oneDNN where `usable`, else the plain product."""
    w = weight.reshape(weight.shape[-2:]) if weight.dim() == 3 and weight.shape[0] == 1 else weight
    if w.dim() != 2 or not w.is_contiguous() or not usable(x, w):
        return x @ weight.to(x.dtype).transpose(-1, -2)
    return _product(x, w, w.shape[0])


def packed_bytes() -> int:
    """Bytes the packed copies take now."""
    with _lock:
        return sum(c.numel() * c.element_size() for _, c in _packed.values())
