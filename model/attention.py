"""RoPE and causal sliding-window attention over a key/value cache.

Every attention call in memoryd has the same shape: `n` new queries at absolute
positions `[start, start + n)` look at `m` keys at positions
`[start + n - m, start + n)` (the cache followed by the new keys), and query `i`
may see key `j` when `i - window < j <= i`.  Three kernels compute it:

- `math`: plain PyTorch. Slowest, but it has a double backward everywhere, so
  meta-learning (gradients of gradients) uses it.
- `sdpa`: `scaled_dot_product_attention` with a boolean mask. Single backward
  only on CPU, so it serves inference and the test-time step.  One query
  (decoding) takes no mask: the keys it sees are sliced (`decode_attention`).
- `flash`: flash-attn's kernel with its native `window_size`, CUDA only, used
  when the package imports.

RoPE angles are computed in float64 from absolute positions and only then cast,
so a key cached at position 10^6 is rotated exactly as it would be in one shot,
whatever the chunking.  Pairs are (i, i + head_dim/2), the Llama/Hugging Face
layout; the authors' JAX code pairs (2i, 2i+1), which is a fixed permutation of
the q/k projection rows.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

from model.config import RopeScaling

AttnImpl = Literal["math", "sdpa", "flash"]

try:  # pragma: no cover - GPU only
    from flash_attn import flash_attn_func as _flash_attn_func
except Exception:  # noqa: BLE001 - any import failure means "not available"
    _flash_attn_func = None


def flash_available(device: torch.device) -> bool:
    return _flash_attn_func is not None and device.type == "cuda"


def default_impl(device: torch.device, needs_double_backward: bool = False) -> AttnImpl:
    """The fastest kernel that supports what the caller needs on `device`."""
    if needs_double_backward:
        return "math"
    if flash_available(device):
        return "flash"
    return "sdpa"


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> torch.Tensor:
    """Float64 inverse frequencies [head_dim/2], with Llama 3.1 scaling when given."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    if scaling is None:
        return inv_freq
    wavelen = 2 * math.pi / inv_freq
    orig = scaling.original_max_position_embeddings
    low_wavelen, high_wavelen = orig / scaling.low_freq_factor, orig / scaling.high_freq_factor
    smooth = (orig / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    mixed = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
    out = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    middle = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(middle, mixed, out)


def rope_cos_sin(
    positions: torch.Tensor,
    head_dim: int,
    theta: float,
    dtype: torch.dtype,
    scaling: RopeScaling | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables [n, head_dim/2] for absolute integer positions."""
    inv_freq = rope_inv_freq(head_dim, theta, scaling).to(positions.device)
    angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., n, head_dim] by the per-position angles [n, head_dim/2]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def key_positions(q_start: int, n: int, m: int, sinks: int, device: torch.device) -> torch.Tensor:
    """Absolute positions [m] of the keys attended over by queries at [q_start, q_start+n).

    The keys are the cache then the n new ones.  The cache is contiguous
    ([q_start - c, q_start)) unless it had to drop positions while keeping sinks:
    then it is the first `sinks` positions followed by the most recent ones.
    """
    end = q_start + n
    if m == end or sinks == 0 or m - n <= sinks:
        return torch.arange(end - m, end, device=device)
    return torch.cat((torch.arange(sinks, device=device), torch.arange(end - (m - sinks), end, device=device)))


def window_mask(q_start: int, n: int, m: int, window: int | None, device: torch.device, sinks: int = 0) -> torch.Tensor:
    """Boolean [n, m] mask: True where query may attend to key.

    Query i sees key j when j <= i and (i - window < j or j < sinks).
    """
    qpos = torch.arange(q_start, q_start + n, device=device)[:, None]
    kpos = key_positions(q_start, n, m, sinks, device)[None, :]
    allowed = kpos <= qpos
    if window is not None:
        allowed &= (kpos > qpos - window) | (kpos < sinks)
    return allowed


SinkRope = tuple[int, float, "RopeScaling | None"]
"""(horizon, rope theta, rope scaling) of a model whose queries see the sinks at most `horizon` back."""


def sink_columns(q_start: int, n: int, m: int, sinks: int) -> int:
    """How many leading key columns (`key_positions`) are at positions below `sinks`: every query
    past them sees them, whatever its window.  `sinks` when the cache starts with the sinks (from
    position 0, or sinks then recent keys), else those of a contiguous run that reaches below."""
    if sinks == 0:
        return 0
    end = q_start + n
    if m != end and m - n > sinks:  # sinks, then the most recent positions
        return sinks
    return max(0, min(m, sinks - (end - m)))


def holds_sinks(q_start: int, n: int, m: int, sinks: int) -> bool:
    """Whether the first `sinks` key columns are the sink positions 0..sinks-1 (`key_positions`)."""
    return sinks > 0 and sink_columns(q_start, n, m, sinks) == sinks


def decode_columns(q_start: int, m: int, window: int | None, sinks: int) -> tuple[int, int]:
    """(lead, cut): the keys one query at q_start sees are columns [0, lead) and [cut, m), exactly
    where `window_mask` allows (checked in tests/test_model_streaming.py).  One query has nothing
    after it to hide, so its window is a slice: the sinks below the window, then its last
    `window` keys (no mask; cut == lead when it sees every key)."""
    lead = sink_columns(q_start, 1, m, sinks)
    return lead, lead if window is None else max(lead, m - window)


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_start: int,
    window: int | None,
    sinks: int,
    far: SinkRope | None,
) -> torch.Tensor:
    """One query (decoding) over the keys it sees, sliced, never masked: `decode_columns`.

    A mask over m keys cost as much as the attention (7 small ops per layer per token), and a
    cache past the window (pending tokens past window - 1 - sinks, a frozen copy's read) made
    it attend over keys it then threw away.  Visible keys in one run (no sinks apart) go to
    one mask-free SDPA call on a view; sinks apart from the window are scored on their own and
    on a view of the window, the scores joined (H x (sinks + window) numbers, not the keys:
    copying the window's keys cost more than the mask).  `far` (the sinks seen from the
    horizon, `far_sinks`): their keys are rotated on by q_start - horizon (q . R(a) k_j is the
    query of position p - a against the key of position j: the same product), a new tensor of
    `sinks` keys; the cache is never written."""
    m = k.shape[-2]
    lead, cut = decode_columns(q_start, m, window, sinks)
    front = k[:, :, :lead]
    if far is not None:
        horizon, theta, scaling = far
        cos, sin = rope_cos_sin(
            torch.tensor([q_start - horizon], device=q.device), q.shape[-1], theta, torch.float64, scaling
        )
        front = apply_rope(front, cos.to(k.dtype), sin.to(k.dtype))
    scale = q.shape[-1] ** -0.5
    gqa = k.shape[1] != q.shape[1]
    if cut == lead and far is None:  # every key
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa, scale=scale)
    if lead == 0:  # the last `window` keys, a view
        return F.scaled_dot_product_attention(q, k[:, :, cut:], v[:, :, cut:], enable_gqa=gqa, scale=scale)
    b, h, _, hd = q.shape
    qg = q.reshape(b, k.shape[1], h // k.shape[1], hd)  # query heads grouped by their key head (GQA)
    recent = k[:, :, cut:]
    scores = torch.cat((qg @ front.transpose(-1, -2), qg @ recent.transpose(-1, -2)), -1) * scale
    probs = torch.softmax(scores.to(torch.promote_types(scores.dtype, torch.float32)), -1).to(v.dtype)
    out = probs[..., :lead] @ v[:, :, :lead] + probs[..., lead:] @ v[:, :, cut:]
    return out.reshape(b, h, 1, hd)


def far_sinks(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_start: int, sinks: int, sink_rope: SinkRope
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v widened so one attention call scores the sinks from at most the horizon back
    (config.sink_horizon); the output's first head_dim columns are the result.

    A query at position p sees sink j at distance min(p, horizon) - j: for the sink columns the
    query is rotated back to position min(p, horizon) (RoPE rotations add, so rotating a query of
    position p by min(p, horizon) - p makes it the query of that position).  Those few scores
    S [n, sinks] are computed here, and carried by `extra` more columns: q' = [q, S, 0],
    k' = [k, 0] for the other keys and [0, e_j] for sink j (e_j: one-hot), so q' . k' is q . k or
    exactly S[:, j] (the other products are exact zeros).  v is padded with zeros to the same
    width, because CPU SDPA takes its fused (flash) kernel only when q, k and v have one head
    dim; a first version widened q and k to 2 * head_dim and fell back to the unfused kernel,
    3 to 5 times slower (a mini-batch step at 16K tokens, a 400-token frozen read at 64K).
    `extra` is `sinks` rounded up to 8, a head dim fused kernels take.  The scale stays
    head_dim ** -0.5 (the caller's)."""
    horizon, theta, scaling = sink_rope
    b, h, n, hd = q.shape
    kv = k.shape[1]
    extra = -(-sinks // 8) * 8
    pos = torch.arange(q_start, q_start + n, device=q.device)
    cos, sin = rope_cos_sin(pos.clamp(max=horizon) - pos, hd, theta, torch.float64, scaling)
    q_far = apply_rope(q, cos.to(q.dtype), sin.to(q.dtype))
    sink_keys = k[:, :, :sinks]
    scores = q_far.reshape(b, kv, h // kv, n, hd) @ sink_keys[:, :, None].transpose(-1, -2)
    q_wide = torch.cat((q, F.pad(scores.reshape(b, h, n, sinks), (0, extra - sinks))), -1)
    one_hot = torch.eye(sinks, extra, dtype=k.dtype, device=k.device).expand(b, kv, sinks, extra)
    k_wide = torch.cat((torch.cat((torch.zeros_like(sink_keys), one_hot), -1), F.pad(k[:, :, sinks:], (0, extra))), 2)
    return q_wide, k_wide, F.pad(v, (0, extra))


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_start: int,
    window: int | None,
    impl: AttnImpl,
    sinks: int = 0,
    sink_rope: SinkRope | None = None,
) -> torch.Tensor:
    """Causal sliding-window attention (plus `sinks` leading positions always visible, seen at
    most `sink_rope`'s horizon back when given: `far_sinks`).

    q [B, H, n, hd]; k, v [B, Hkv, m, hd] with m >= n, the last n keys being the
    queries' own.  Returns [B, H, n, hd].
    """
    n, m = q.shape[-2], k.shape[-2]
    if m < n:
        raise ValueError(f"attention needs the queries' own keys: {m} keys < {n} queries")
    hd = q.shape[-1]
    scale = hd**-0.5
    far = (
        sink_rope
        if sink_rope is not None and holds_sinks(q_start, n, m, sinks) and q_start + n - 1 > sink_rope[0]
        else None
    )
    if impl == "flash" and sinks:
        impl = "sdpa"  # flash-attn's window has no sinks
    if impl == "flash":
        if _flash_attn_func is None:
            raise RuntimeError("attention kernel 'flash' requested but flash_attn is not importable")
        # flash-attn aligns the causal mask bottom-right, which is our layout.
        out = _flash_attn_func(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            causal=True,
            window_size=(window - 1 if window is not None else -1, 0),
        )
        return out.transpose(1, 2)
    if impl == "sdpa" and n == 1:
        return decode_attention(q, k, v, q_start, window, sinks, far)
    if far is not None:
        q, k, v = far_sinks(q, k, v, q_start, sinks, far)
    gqa = k.shape[1] != q.shape[1]
    mask = window_mask(q_start, n, m, window, q.device, sinks)
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa, scale=scale)[..., :hd]
    if impl != "math":
        raise ValueError(f"unknown attention kernel {impl!r}; use math, sdpa or flash")
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32)).masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return (probs @ v)[..., :hd]
