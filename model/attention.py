"""RoPE and causal sliding-window attention over a key/value cache.

Every attention call in memoryd has the same shape: `n` new queries at absolute
positions `[start, start + n)` look at `m` keys at positions
`[start + n - m, start + n)` (the cache followed by the new keys), and query `i`
may see key `j` when `i - window < j <= i`.  Three kernels compute it:

- `math`: plain PyTorch. Slowest, but it has a double backward everywhere, so
  meta-learning (gradients of gradients) uses it.
- `sdpa`: `scaled_dot_product_attention` with a boolean mask. Single backward
  only on CPU, so it serves inference and the test-time step.
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


def sees_every_key(n: int, m: int, window: int | None) -> bool:
    """Whether `window_mask` would allow everything: one query (nothing after it to hide)
    over at most `window` keys (the newest m positions, or sinks then recent ones, are then
    all inside its window).  Decoding one token is this case until a session's pending
    tokens push its cache past the window; building a mask there cost as much as the
    attention itself (7 small ops per layer per session, measured in a 16-session tick)."""
    return n == 1 and (window is None or m <= window)


SinkRope = tuple[int, float, "RopeScaling | None"]
"""(horizon, rope theta, rope scaling) of a model whose queries see the sinks at most `horizon` back."""


def far_sinks(
    q: torch.Tensor, k: torch.Tensor, q_start: int, sinks: int, sink_rope: SinkRope
) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k widened so one product scores the sinks from at most the horizon back (config.sink_horizon).

    A query at position p sees sink j at distance min(p, horizon) - j: for the sink columns it is
    rotated back to position min(p, horizon) (RoPE rotations add, so rotating a query of position p
    by min(p, horizon) - p makes it the query of that position).  Returned: q' = [q, q_far] and
    k' = [k, 0] for the other keys, [0, k] for the sinks (the first `sinks` columns), so
    q' . k' is q . k or q_far . k_sink: attention with scale hd ** -0.5 over q', k' is the rule.
    One query (decode, the hot path) needs no widening: its sinks' keys are rotated on by
    p - horizon instead (a new tensor; the cache is never written)."""
    horizon, theta, scaling = sink_rope
    n, hd = q.shape[-2], q.shape[-1]
    if n == 1:  # one query (decoding): rotate the sinks' few keys on by p - horizon instead, same products
        cos, sin = rope_cos_sin(torch.tensor([q_start - horizon], device=q.device), hd, theta, torch.float64, scaling)
        rolled = apply_rope(k[:, :, :sinks], cos.to(k.dtype), sin.to(k.dtype))
        return q, torch.cat((rolled, k[:, :, sinks:]), 2)
    pos = torch.arange(q_start, q_start + n, device=q.device)
    cos, sin = rope_cos_sin(pos.clamp(max=horizon) - pos, hd, theta, torch.float64, scaling)
    q_far = apply_rope(q, cos.to(q.dtype), sin.to(q.dtype))
    k_wide = torch.cat((F.pad(k[:, :, :sinks], (hd, 0)), F.pad(k[:, :, sinks:], (0, hd))), 2)
    return torch.cat((q, q_far), -1), k_wide


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
    scale = q.shape[-1] ** -0.5
    holds_sinks = sinks > 0 and (m == q_start + n or m - n > sinks)  # the first columns are positions 0..sinks-1
    if sink_rope is not None and holds_sinks and q_start + n - 1 > sink_rope[0]:
        q, k = far_sinks(q, k, q_start, sinks, sink_rope)
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
    gqa = k.shape[1] != q.shape[1]
    if impl == "sdpa" and sees_every_key(n, m, window):
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa, scale=scale)
    mask = window_mask(q_start, n, m, window, q.device, sinks)
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa, scale=scale)
    if impl != "math":
        raise ValueError(f"unknown attention kernel {impl!r}; use math, sdpa or flash")
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32)).masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).to(v.dtype)
    return probs @ v
