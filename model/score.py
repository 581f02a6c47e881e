"""Per-position NLL of a token sequence through a fresh streaming session.

This is how anyone checks this model against another implementation: the NLL at
position t is that of predicting token t+1 from tokens <= t, with the fast weights
the session had before the mini-batch holding t was learned.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from model.network import TTTModel
from model.state import StreamState, validate_tokens


def score_tokens(
    model: TTTModel,
    tokens: torch.Tensor | np.ndarray,
    append_size: int | None = None,
    inner_lr: float | None = None,
    progress: bool = False,
) -> np.ndarray:
    """NLL [len(tokens) - 1] of each next token, fed in appends of `append_size`.

    float32 (float64 for a float64 model)."""
    ids = validate_tokens(torch.as_tensor(np.asarray(tokens)), model.cfg.vocab_size)
    if ids.numel() < 2:
        raise ValueError("scoring needs at least 2 tokens (one prediction)")
    size = append_size or ids.numel()
    if size < 1:
        raise ValueError(f"append size must be >= 1, got {size}")
    state = StreamState.fresh(model, inner_lr=inner_lr)
    parts: list[torch.Tensor] = []
    with tqdm(total=ids.numel(), unit="tok", disable=not progress, desc="score") as bar:
        for i in range(0, ids.numel(), size):
            piece = ids[i : i + size]
            parts.extend(state.append(piece).nll)
            bar.update(piece.numel())
    with torch.no_grad():
        tail = F.cross_entropy(state.pending_logits()[:-1], state.pending_tokens[1:], reduction="none")
    parts.append(tail)
    return torch.cat([p.cpu() for p in parts]).numpy()
