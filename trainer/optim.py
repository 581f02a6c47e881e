"""The outer optimizer and its schedules (spec: model.md; the authors' ttt/optimizers.py).

- AdamW, b1 0.9, b2 0.95, weight decay 0.1, global-norm clip 1.0.  The authors
  decay every parameter (`emb_wd=True`), norms included; `decay_embedding=False`
  reproduces their only mask, which exempts the token embedding.
- Learning rate: linear warm-up from `init_lr` to `lr`, then cosine to `end_lr`
  at the last step (optax.warmup_cosine_decay_schedule).
- Inner step size (meta mode): linear from `inner_lr_init` to the model's
  `inner_lr`, reaching it at step `inner_warmup_steps` (the authors'
  get_ilr_multiplier: progress = min(1, (step + 1) / warmup)).
"""

from __future__ import annotations

import math

import torch

from model.network import TTTModel
from trainer.config import OptimSpec


def lr_at(spec: OptimSpec, step: int, total: int) -> float:
    """Outer learning rate at 0-based `step` of `total`."""
    w = spec.warmup_steps
    if w and step < w:
        return spec.init_lr + (spec.lr - spec.init_lr) * step / w
    decay = max(total - w, 1)
    progress = min(max(step - w, 0) / decay, 1.0)
    return spec.end_lr + (spec.lr - spec.end_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def inner_lr_at(spec: OptimSpec, step: int, final: float) -> float:
    """Inner (test-time) step size at 0-based outer `step`."""
    w = spec.warmup_steps if spec.inner_warmup_steps is None else spec.inner_warmup_steps
    if w == 0:
        return final
    progress = min(1.0, (step + 1) / w)
    return spec.inner_lr_init + (final - spec.inner_lr_init) * progress


def build_optimizer(model: TTTModel, spec: OptimSpec) -> torch.optim.AdamW:
    """AdamW over every trainable parameter; the embedding in its own group when it is not decayed."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if (not spec.decay_embedding and name == "embed.weight") else decay).append(p)
    groups = [{"params": decay, "weight_decay": spec.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    # foreach=False: the per-tensor loop is the same arithmetic on every process and every run.
    return torch.optim.AdamW(groups, lr=spec.lr, betas=(spec.b1, spec.b2), eps=spec.eps, foreach=False)


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr
