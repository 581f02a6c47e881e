"""Gradients of gradients are right, and test-time training actually learns."""

from __future__ import annotations

import pytest
import torch
from model_configs import micro
from torch import nn

from model import init_model, preset
from model.score import score_tokens
from model.sequence import run_sequence


class _OuterLoss(nn.Module):
    """Wraps run_sequence so torch.func.functional_call can substitute weights."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return run_sequence(self.m, inputs, targets, inner=True, create_graph=True).loss


@pytest.mark.parametrize("clip", [100.0, 1e-3], ids=["unclipped", "clipped"])
def test_gradcheck_through_three_inner_steps(clip):
    """Outer loss over 4 mini-batches (the last predicted after 3 inner steps) w.r.t.
    theta_0 and a static weight: analytic gradients (through the inner gradients,
    i.e. second derivatives) equal finite differences in float64."""
    cfg = micro(vocab_size=260, inner_clip=clip, inner_lr=0.5)
    model = init_model(cfg, seed=7).double()
    wrapper = _OuterLoss(model)
    b = cfg.mini_batch_size
    toks = torch.randint(0, 256, (1, 4 * b + 1))
    fast_name = f"blocks.{cfg.num_layers - 1}.fast_mlp.w2.weight"
    static_name = "blocks.0.attn.q.weight"
    params = dict(model.named_parameters())

    def loss(theta0: torch.Tensor, static: torch.Tensor) -> torch.Tensor:
        subs = {f"m.{fast_name}": theta0, f"m.{static_name}": static}
        return torch.func.functional_call(wrapper, subs, (toks[:, :-1], toks[:, 1:]))

    theta0 = params[fast_name].detach().clone().requires_grad_(True)
    static = params[static_name].detach().clone().requires_grad_(True)
    # The inner steps really move theta (else this would only check a plain forward).
    res = run_sequence(model, toks[:, :-1], toks[:, 1:], inner=True)
    assert (res.fast[fast_name][0] - params[fast_name]).abs().max() > 1e-6
    # fast_mode compares random projections u^T J v (analytic vs finite differences).
    assert torch.autograd.gradcheck(loss, (theta0, static), eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


def test_meta_gradient_differs_from_first_order():
    """The outer gradient w.r.t. theta_0 includes the second-order path through the steps."""
    cfg = micro(vocab_size=260, inner_lr=1.0)
    model = init_model(cfg, seed=2).double()
    toks = torch.randint(0, 256, (1, 4 * cfg.mini_batch_size + 1))
    name = f"blocks.{cfg.num_layers - 1}.fast_mlp.w1.weight"
    p = dict(model.named_parameters())[name]
    full = torch.autograd.grad(run_sequence(model, toks[:, :-1], toks[:, 1:], create_graph=True).loss, p)[0]
    no_inner = torch.autograd.grad(run_sequence(model, toks[:, :-1], toks[:, 1:], inner=False).loss, p)[0]
    assert (full - no_inner).abs().max() > 1e-6 * full.abs().max()


def repeat_sequence(seed: int, segment: int, gap: int, repeat: bool = True) -> tuple[torch.Tensor, slice]:
    """BOS, a random segment, a random gap, then the segment again (or a fresh one)."""
    g = torch.Generator().manual_seed(seed)
    seg = torch.randint(0, 256, (segment,), generator=g)
    gap_toks = torch.randint(0, 256, (gap,), generator=g)
    second = seg if repeat else torch.randint(0, 256, (segment,), generator=g)
    toks = torch.cat([torch.tensor([256]), seg, gap_toks, second])
    n = toks.numel()
    return toks, slice(n - 1 - segment, n - 1)  # NLL positions predicting the second segment


@pytest.mark.parametrize("variant", [{}, {"post_norm": False}], ids=["reference", "pre-norm-only"])
def test_test_time_training_remembers_beyond_the_window(variant):
    """A segment of two mini-batches repeats after a gap longer than the window: only the
    fast weights can carry it across, so TTT on must beat TTT off (inner_lr 0) on the repeat."""
    cfg = preset("tiny", **variant)
    b, k = cfg.mini_batch_size, cfg.window_size
    model = init_model(cfg, seed=0).requires_grad_(False)
    gains, control = [], []
    for seed in range(6):
        toks, rep = repeat_sequence(seed, 2 * b, k + 8)
        on, off = score_tokens(model, toks), score_tokens(model, toks, inner_lr=0.0)
        gains.append(float(off[rep].mean() - on[rep].mean()))
        toks, rep = repeat_sequence(seed, 2 * b, k + 8, repeat=False)
        on, off = score_tokens(model, toks), score_tokens(model, toks, inner_lr=0.0)
        control.append(float(off[rep].mean() - on[rep].mean()))
    assert all(g > 0 for g in gains), gains
    # It is memory of the segment, not a generic drift: a fresh segment gains far less.
    assert sum(gains) > 2 * max(sum(control), 0.0), (gains, control)
