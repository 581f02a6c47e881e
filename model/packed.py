"""MKL's packed fp32 GEMM for batched decode's 16-row products (CPU).

A batched decode forward multiplies 16 rows (`network.ROW_TILE`; 9 to 15 are padded to it,
`network.tile_rows`) by every static MLP weight and by the output head.  MKL's plain product
re-arranges each weight into its kernel's blocked layout on every call; at 16 rows that work is
a large share of the product (the weights come from DRAM either way).  `linear` keeps each
weight's arranged copy, made once by MKL (`torch.ops.mkl._mkl_reorder_linear_weight`, the
pass torch.fx's `optimize_for_inference` and inductor's CPU freezing use for fp32 linears), and
multiplies by it (`torch.ops.mkl._mkl_linear`).

Measured on one core of this project's CPU (weights cycled so that each comes from DRAM, as in
a forward; `bench/pooled_attention.py` times the whole forward): [16, 576] x [576, 1536] 0.62
times the plain product, [16, 1536] x [1536, 576] 0.91, the head [16, 576] x [576, 49152] 0.68;
a whole 16-row forward of the default model 6-9 % less (alternating with it off).  Results were
bit-identical to `F.linear`'s on these shapes, but nothing relies on that: only the batched path
uses it, whose activations are provisional (model/batch.py), so no persisted bit depends on it.

What it costs: a second, packed copy of the weights it multiplies by, made on the first 16-row
product and kept while the weight lives.  For the default model (the 23 non-zero static MLPs and
the head) the daemon's resident memory grew by 332 MB; MKL allocates 1.1 GiB for them
(`packed_bytes`) but writes only what its layout uses.  `TTTModel.packed_decode = False` turns it
off (`memoryd serve --packed-decode false`).  The attention projections are left plain: packing
them too took 1.4 % more off a 16-row forward for 102 MB more resident memory.

Where MKL's ops are missing (another build of torch, another device or dtype) `usable` is false
and the plain product runs.
"""

from __future__ import annotations

import threading
import weakref

import torch
import torch.nn.functional as F

ROWS = 16
"""The row count the copies are packed for (MKL packs for one M), and so the one batched decode pads
9-15 rows to (`network.ROW_TILE`, `network.tile_rows`)."""

_lock = threading.Lock()
_packed: dict[int, tuple[tuple[int, int], torch.Tensor]] = {}
"""id(weight) -> ((data_ptr, version) when packed, the packed copy); an entry goes with its weight."""


def usable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `linear` runs packed for x: 16 rows, fp32 on a CPU, a torch built with MKL."""
    return (
        x.numel() == ROWS * x.shape[-1]
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and not weight.requires_grad
        and torch._C.has_mkl
        and hasattr(torch.ops.mkl, "_mkl_linear")
    )


def _copy_of(weight: torch.Tensor) -> torch.Tensor:
    """The packed copy of `weight`, made now if it is new or was written since (`_version`)."""
    key = (weight.data_ptr(), weight._version)
    with _lock:
        have = _packed.get(id(weight))
        if have is not None and have[0] == key:
            return have[1]
        if have is None:
            weakref.finalize(weight, _packed.pop, id(weight), None)
        copy = torch.ops.mkl._mkl_reorder_linear_weight(weight.detach(), ROWS)
        _packed[id(weight)] = (key, copy)
        return copy


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T for x [..., in] holding 16 rows, through the packed copy (`usable`), else plain."""
    if not usable(x, weight):
        return F.linear(x, weight)
    out = torch.ops.mkl._mkl_linear(x.reshape(ROWS, -1), _copy_of(weight), weight, None, ROWS)
    return out.view(*x.shape[:-1], weight.shape[0])


def packed_bytes() -> int:
    """Bytes the packed copies take now (as allocated; MKL's buffers are larger than what it writes)."""
    with _lock:
        return sum(c.numel() * c.element_size() for _, c in _packed.values())
