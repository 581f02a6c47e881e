"""A batch of whole sequences through the network, mini-batch by mini-batch.

This is the one-shot path the trainer differentiates (spec: model.md,
"Meta-learning"): B sequences of T tokens with explicit targets and a loss
mask, prefix blocks once per mini-batch, then the test-time step (`inner=True`)
or a plain forward with theta_0 (`inner=False`: pretrain mode, and evaluation
with TTT off).  With `create_graph=True` the returned loss is differentiable
through every inner step into theta_0 and every static weight.

Each mini-batch is `inner.minibatch_step`, the very function `StreamState.append`
runs, so this computes exactly what the streaming state computes for one
sequence (the tests hold the two together); the state adds pending tokens and
snapshots, this adds batching and gradients.

`checkpoint=True` wraps each mini-batch's work in non-reentrant activation
checkpointing: only its inputs (theta, the caches, the tokens) are kept for the
backward pass and its activations, including the inner gradient graph, are
recomputed then.  Memory then grows with T only through the caches and theta
(a few tensors per mini-batch) instead of with T times the activations.
Non-reentrant checkpointing supports the `autograd.grad(create_graph=True)`
inside the step, and the recomputation is the same arithmetic, so gradients are
identical with and without it (tests/test_trainer_sequence.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint as _checkpoint

from model.attention import AttnImpl, default_impl
from model.cache import KV, cache_spec, extend_all
from model.inner import FastWeights, StepResult, minibatch_step
from model.network import TTTModel


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
    checkpoint: bool = False,
) -> SequenceResult:
    """Run inputs [B, T] (T a multiple of the mini-batch size) and score targets [B, T].

    `mask` (default: targets != BOS) selects the positions that count in the loss.
    `checkpoint` recomputes each mini-batch in the backward pass instead of storing
    its activations (only useful when a backward pass follows).
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
    keep = cache_spec(cfg)
    has_inner = inner and len(model.suffix_layers) > 0
    kv: list[KV | None] = [None] * cfg.num_layers
    fast: FastWeights = model.initial_fast_weights(batch=bsz)
    losses, nlls, norms = [], [], []

    def step(fast: FastWeights, past: list[KV | None], start: int) -> StepResult:
        sl = slice(start, start + b)
        return minibatch_step(
            model, fast, inputs[:, sl], targets[:, sl], mask[:, sl], past, start, lr, cfg.inner_clip, impl,
            inner=inner, create_graph=create_graph,
        )  # fmt: skip

    for start in range(0, T, b):
        if checkpoint and torch.is_grad_enabled():
            res = _checkpoint(step, fast, list(kv), start, use_reentrant=False)
        else:
            res = step(fast, list(kv), start)
        kv = extend_all(kv, res.kv, keep)
        if has_inner:
            fast = res.fast
            norms.append(res.grad_norm)
        losses.append(res.loss)
        nlls.append(res.nll)
    mb = torch.stack(losses, 1)
    return SequenceResult(
        loss=mb.mean(),
        minibatch_loss=mb,
        nll=torch.cat(nlls, 1),
        fast=fast,
        grad_norm=torch.stack(norms, 1) if norms else None,
    )
