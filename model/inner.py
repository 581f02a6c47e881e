"""The test-time training step (spec: model.md, "Test-time training").

For one mini-batch: run the suffix blocks on its prefix activations with the
current fast weights theta, take the mean next-token NLL over its unmasked
targets, differentiate w.r.t. theta only, clip to global norm `clip` and take
one SGD step.  The predictions come from the weights *before* the step.

Everything is batched: each of the B sequences has its own theta [B, out, in].
Because the sequences are independent, the gradient of the *sum* of their
losses w.r.t. the batched theta is each sequence's own gradient, and the clip
is computed per sequence.

With `create_graph=True` the step stays differentiable (gradients of
gradients), which is what meta-learning backpropagates through.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.attention import AttnImpl
from model.cache import KV
from model.network import TTTModel, upcast

FastWeights = dict[str, torch.Tensor]


@dataclass
class StepResult:
    fast: FastWeights
    """theta after the step (the input theta when lr == 0)."""
    loss: torch.Tensor
    """[B] mean NLL of the mini-batch under the pre-step theta."""
    nll: torch.Tensor
    """[B, n] per-position NLL under the pre-step theta (masked positions included)."""
    kv: list[KV]
    """The suffix layers' keys/values of the mini-batch, computed with the pre-step theta."""
    grad_norm: torch.Tensor
    """[B] global norm of the unclipped gradient."""


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-position NLL [B, n] from float logits [B, n, V]."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)


def masked_mean(nll: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over unmasked positions per sequence [B]; 0 when all are masked."""
    m = mask.to(nll.dtype)
    return (nll * m).sum(-1) / m.sum(-1).clamp_min(1.0)


def suffix_loss(
    model: TTTModel,
    fast: Mapping[str, torch.Tensor],
    h_prefix: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    past: Sequence[KV | None],
    start: int,
    impl: AttnImpl,
) -> tuple[torch.Tensor, torch.Tensor, list[KV]]:
    """The suffix blocks and the head on one mini-batch: (loss [B], nll [B, n], new kv)."""
    h, kv = model.run_blocks(h_prefix, model.suffix_layers, past, start, fast, impl)
    nll = token_nll(model.head(h), targets)
    return masked_mean(nll, mask), nll, kv


def clipped_sgd(
    fast: Mapping[str, torch.Tensor],
    grads: Sequence[torch.Tensor],
    lr: float | torch.Tensor,
    clip: float,
) -> tuple[FastWeights, torch.Tensor]:
    """theta - lr * clip_by_global_norm(g, clip), the norm taken per sequence (dim 0).

    The scale is clip / sqrt(max(|g|^2, clip^2)): it equals min(1, clip/|g|) and stays
    differentiable at g = 0, where a plain sqrt would give NaN second derivatives.
    """
    sq = sum(upcast(g).pow(2).flatten(1).sum(1) for g in grads)
    scale = clip / sq.clamp_min(clip * clip).sqrt()
    new = {}
    for (name, w), g in zip(fast.items(), grads, strict=True):
        s = (lr * scale).view(-1, *([1] * (g.dim() - 1)))
        new[name] = w - (s * g).to(w.dtype)
    return new, sq.sqrt()


def inner_step(
    model: TTTModel,
    fast: Mapping[str, torch.Tensor],
    h_prefix: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    past: Sequence[KV | None],
    start: int,
    lr: float | torch.Tensor,
    clip: float,
    impl: AttnImpl,
    create_graph: bool = False,
) -> StepResult:
    """One test-time step on a mini-batch h_prefix [B, n, d] at positions [start, start+n).

    With `create_graph=False` the step is plain inference: theta is detached first, so
    the result carries no graph.  With `create_graph=True`, `fast` may be graph nodes
    (theta_0 or an earlier step's output) and the step stays differentiable.
    """
    if not create_graph:
        fast = {k: v.detach().requires_grad_(True) for k, v in fast.items()}
    with torch.enable_grad():
        loss, nll, kv = suffix_loss(model, fast, h_prefix, targets, mask, past, start, impl)
        grads = torch.autograd.grad(loss.sum(), list(fast.values()), create_graph=create_graph)
    new_fast, grad_norm = clipped_sgd(fast, grads, lr, clip)
    if not create_graph:
        new_fast = {k: v.detach() for k, v in new_fast.items()}
        loss, nll, kv = loss.detach(), nll.detach(), [(k.detach(), v.detach()) for k, v in kv]
    return StepResult(new_fast, loss, nll, kv, grad_norm.detach())


def minibatch_step(
    model: TTTModel,
    fast: Mapping[str, torch.Tensor],
    tokens: torch.Tensor,
    targets: torch.Tensor,
    mask: torch.Tensor,
    past: Sequence[KV | None],
    start: int,
    lr: float | torch.Tensor,
    clip: float,
    impl: AttnImpl,
    inner: bool = True,
    create_graph: bool = False,
) -> StepResult:
    """The whole network on one mini-batch tokens [B, b] at [start, start+b): prefix, then step.

    `past` holds every layer's cache; the result's `kv` is every layer's new keys and
    values.  The prefix runs once and the test-time gradient only through the suffix.
    With `inner=False` (pretrain mode, or TTT off) theta is used but not updated.
    This exact sequence of operations is shared by the streaming state and the
    trainer, so both produce bit-identical fast weights and caches.
    """
    prefix, suffix = model.prefix_layers, model.suffix_layers
    h, kv = model.run_blocks(model.embed_tokens(tokens), prefix, past[: len(prefix)], start, None, impl)
    if len(suffix) == 0:
        nll = token_nll(model.head(h), targets)
        zero = torch.zeros(tokens.shape[0], device=tokens.device)
        return StepResult(dict(fast), masked_mean(nll, mask), nll, kv, zero)
    if inner:
        res = inner_step(model, fast, h, targets, mask, past[len(prefix) :], start, lr, clip, impl, create_graph)
        res.kv = kv + res.kv
        return res
    loss, nll, skv = suffix_loss(model, fast, h, targets, mask, past[len(prefix) :], start, impl)
    zero = torch.zeros(tokens.shape[0], device=tokens.device)
    return StepResult(dict(fast), loss, nll, kv + skv, zero)
