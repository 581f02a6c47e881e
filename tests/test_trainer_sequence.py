"""run_sequence's activation checkpointing: same loss, same gradients, through the inner steps."""

from __future__ import annotations

import pytest
import torch

from model import init_model, preset
from model.sequence import run_sequence

torch.set_num_threads(1)


def _grads(model, toks, checkpoint: bool, inner: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    res = run_sequence(model, toks[:, :-1], toks[:, 1:], inner=inner, create_graph=inner, checkpoint=checkpoint)
    params = list(model.parameters())
    return res.loss.detach(), torch.autograd.grad(res.loss, params)


@pytest.mark.parametrize("inner", [True, False])
def test_checkpointing_gives_identical_gradients(inner: bool) -> None:
    model = init_model(preset("tiny"), seed=1)
    toks = torch.randint(0, 256, (2, 33))
    loss0, g0 = _grads(model, toks, checkpoint=False, inner=inner)
    loss1, g1 = _grads(model, toks, checkpoint=True, inner=inner)
    assert torch.equal(loss0, loss1)
    for a, b in zip(g0, g1, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert any(g.abs().sum() > 0 for g in g0)


def test_checkpointing_reaches_theta0_through_inner_steps() -> None:
    """The outer gradient w.r.t. theta_0 differs from the no-inner-loop gradient (second order flows)."""
    model = init_model(preset("tiny"), seed=2)
    toks = torch.randint(0, 256, (1, 33))
    name = next(iter(model.initial_fast_weights()))
    p = dict(model.named_parameters())[name]
    meta = torch.autograd.grad(
        run_sequence(model, toks[:, :-1], toks[:, 1:], create_graph=True, checkpoint=True).loss, p
    )
    plain = torch.autograd.grad(run_sequence(model, toks[:, :-1], toks[:, 1:], inner=False).loss, p)
    assert not torch.allclose(meta[0], plain[0])


@pytest.mark.parametrize("create_graph", [True, False])
def test_meta_path_is_causal(create_graph: bool) -> None:
    """Changing the tokens after position p changes no NLL before p: the outer loss cannot peek."""
    model = init_model(preset("tiny"), seed=4)
    gen = torch.Generator().manual_seed(0)
    toks = torch.randint(0, 256, (1, 65), generator=gen)
    p = 21  # inside a mini-batch, so the step that sees the change is the one holding p
    other = toks.clone()
    other[:, p + 1 :] = torch.randint(0, 256, (1, 65 - p - 1), generator=gen)
    a = run_sequence(model, toks[:, :-1], toks[:, 1:], create_graph=create_graph).nll
    b = run_sequence(model, other[:, :-1], other[:, 1:], create_graph=create_graph).nll
    assert torch.equal(a[:, :p], b[:, :p])
    assert not torch.equal(a[:, p:], b[:, p:])
