"""Tokens from a batch of logits [N, V], each row with its own settings, in one pass.

Inverse-CDF sampling with a uniform draw `u` per row that the caller supplies (from a
`random.Random(seed)` of its own): the result is a pure function of (logits, settings,
u), so a seeded generation repeats exactly, and no per-row generator object or
per-row device call is needed; the only host transfer is the N chosen ids at the end.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from memoryd.engine.work import Sampling


def sample_rows(logits: torch.Tensor, settings: Sequence[Sampling], u: Sequence[float]) -> list[int]:
    """One token per row: greedy at temperature 0, else top-k, then nucleus (top-p), then the draw."""
    vocab = logits.shape[-1]
    greedy = torch.tensor([s.temperature <= 0.0 for s in settings], device=logits.device)
    out = logits.argmax(-1)
    if not bool(greedy.all()):
        temp = torch.tensor([s.temperature if s.temperature > 0 else 1.0 for s in settings], device=logits.device)
        x = logits.float() / temp[:, None]
        x, order = torch.sort(x, dim=-1, descending=True)
        rank = torch.arange(vocab, device=logits.device)[None, :]
        top_k = torch.tensor([s.top_k if 0 < s.top_k < vocab else vocab for s in settings], device=logits.device)
        x = x.masked_fill(rank >= top_k[:, None], float("-inf"))
        probs = torch.softmax(x, dim=-1)
        top_p = torch.tensor([s.top_p if 0.0 < s.top_p < 1.0 else 2.0 for s in settings], device=logits.device)
        cum = torch.cumsum(probs, -1)
        probs = probs.masked_fill((cum - probs) >= top_p[:, None], 0.0)  # keep what reaches top_p; the first always
        cdf = torch.cumsum(probs, -1)
        draw = torch.tensor(list(u), dtype=cdf.dtype, device=logits.device)[:, None] * cdf[:, -1:]
        pick = torch.searchsorted(cdf, draw, right=True).clamp_max(vocab - 1)
        sampled = order.gather(1, pick)[:, 0]
        out = torch.where(greedy, out, sampled)
    return out.tolist()
