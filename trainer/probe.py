"""Inner-loop diagnostics: each mini-batch's loss before and after its own test-time step.

The outer loss only shows losses *before* each step.  Whether the step itself
helps (the loss on the same mini-batch *after* it) is the first thing to look
at when TTT does not pay off (inner lr too large or too small), so the trainer
logs both every `probe_every` steps.  Built from `model.inner.minibatch_step`,
the function the served model runs, without gradients.
"""

from __future__ import annotations

import torch

from model.cache import KV, cache_spec, extend_all
from model.inner import minibatch_step
from model.network import TTTModel


@torch.no_grad()
def inner_before_after(
    model: TTTModel, inputs: torch.Tensor, targets: torch.Tensor, inner_lr: float
) -> tuple[float, float]:
    """Mean over mini-batches of (loss before, loss after) its test-time step."""
    cfg = model.cfg
    b, keep = cfg.mini_batch_size, cache_spec(cfg)
    kv: list[KV | None] = [None] * cfg.num_layers
    fast = model.initial_fast_weights(batch=inputs.shape[0])
    before, after = [], []
    for start in range(0, inputs.shape[1], b):
        sl = slice(start, start + b)
        x, y = inputs[:, sl], targets[:, sl]
        m = y != cfg.bos_token_id
        res = minibatch_step(model, fast, x, y, m, kv, start, inner_lr, cfg.inner_clip, "sdpa", inner=True)
        post = minibatch_step(model, res.fast, x, y, m, kv, start, inner_lr, cfg.inner_clip, "sdpa", inner=False)
        before.append(res.loss.mean())
        after.append(post.loss.mean())
        kv = extend_all(kv, res.kv, keep)
        fast = res.fast
    return float(torch.stack(before).mean()), float(torch.stack(after).mean())
