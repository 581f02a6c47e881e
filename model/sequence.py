"""A batch of whole sequences through the network, mini-batch by mini-batch.

This is the one-shot path the trainer differentiates (spec: model.md,
"Meta-learning"): B sequences of T tokens with explicit targets and a loss
mask, prefix blocks once per mini-batch, then the test-time step (`inner=True`)
or a plain forward with theta_0 (`inner=False`: pretrain mode, and evaluation
with TTT off).  With `create_graph=True` the returned loss is differentiable
through every inner step into theta_0 and every static weight.

It computes exactly what `StreamState.append` computes for one sequence (the
tests hold the two together); the state adds pending tokens and snapshots, this
adds batching and gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from model.attention import AttnImpl, default_impl
from model.cache import cache_keep, extend_all
from model.inner import FastWeights, inner_step, masked_mean, suffix_loss, token_nll
from model.network import KV, TTTModel


@dataclass
class SequenceResult:
    loss: torch.Tensor
    """Scalar: mean over sequences and mini-batches of the mini-batch losses (the outer loss)."""
    minibatch_loss: torch.Tensor
    """[B, T/b] each mini-batch's loss under the weights before its own step."""
    nll: torch.Tensor
    """[B, T] per-position NLL (masked positions included)."""
    fast: FastWeights
    """Fast weights after the last step, [B, out, in]."""
    grad_norm: torch.Tensor | None
    """[B, T/b] unclipped inner-gradient norms (None without inner steps)."""


def run_sequence(
    model: TTTModel,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    inner: bool = True,
    inner_lr: float | torch.Tensor | None = None,
    create_graph: bool = False,
    impl: AttnImpl | None = None,
) -> SequenceResult:
    """Run inputs [B, T] (T a multiple of the mini-batch size) and score targets [B, T].

    `mask` (default: targets != BOS) selects the positions that count in the loss.
    """
    cfg = model.cfg
    b = cfg.mini_batch_size
    bsz, T = inputs.shape
    if T == 0 or T % b:
        raise ValueError(f"sequence length {T} must be a positive multiple of mini_batch_size {b}")
    if targets.shape != inputs.shape:
        raise ValueError(f"targets shape {tuple(targets.shape)} != inputs shape {tuple(inputs.shape)}")
    if mask is None:
        mask = targets != cfg.bos_token_id
    lr = cfg.inner_lr if inner_lr is None else inner_lr
    impl = impl or default_impl(inputs.device, needs_double_backward=create_graph)
    keep = cache_keep(cfg.window_size)
    prefix, suffix = model.prefix_layers, model.suffix_layers
    kv: list[KV | None] = [None] * cfg.num_layers
    fast: FastWeights = model.initial_fast_weights(batch=bsz)
    losses, nlls, norms = [], [], []
    for start in range(0, T, b):
        sl = slice(start, start + b)
        tgt, m = targets[:, sl], mask[:, sl]
        h, new = model.run_blocks(model.embed_tokens(inputs[:, sl]), prefix, kv[: len(prefix)], start, None, impl)
        kv[: len(prefix)] = extend_all(kv[: len(prefix)], new, keep)
        if len(suffix) == 0:
            nll = token_nll(model.head(h), tgt)
            loss = masked_mean(nll, m)
        elif inner:
            res = inner_step(model, fast, h, tgt, m, kv[suffix.start :], start, lr, cfg.inner_clip, impl, create_graph)
            fast, loss, nll, new = res.fast, res.loss, res.nll, res.kv
            norms.append(res.grad_norm)
            kv[suffix.start :] = extend_all(kv[suffix.start :], new, keep)
        else:
            loss, nll, new = suffix_loss(model, fast, h, tgt, m, kv[suffix.start :], start, impl)
            kv[suffix.start :] = extend_all(kv[suffix.start :], new, keep)
        losses.append(loss)
        nlls.append(nll)
    mb = torch.stack(losses, 1)
    return SequenceResult(
        loss=mb.mean(),
        minibatch_loss=mb,
        nll=torch.cat(nlls, 1),
        fast=fast,
        grad_norm=torch.stack(norms, 1) if norms else None,
    )
