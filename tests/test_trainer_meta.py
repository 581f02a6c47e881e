"""Meta-learning: the outer gradient is the true gradient, and a short meta run learns."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from trainer_helpers import prepared_data, tiny_config

from model import init_model, preset
from model.sequence import run_sequence
from trainer.config import build_config
from trainer.metrics import read_metrics
from trainer.train import train

torch.set_num_threads(1)


def _outer_loss(model, toks: torch.Tensor, create_graph: bool = True) -> torch.Tensor:
    return run_sequence(model, toks[:, :-1], toks[:, 1:], inner=True, create_graph=create_graph).loss


def test_outer_gradient_matches_finite_differences() -> None:
    """<grad, v> against a central difference along random directions v over every parameter (float64)."""
    model = init_model(preset("tiny", inner_lr=1.0), seed=3).double()
    toks = torch.randint(0, 256, (2, 33), generator=torch.Generator().manual_seed(5))
    params = list(model.parameters())
    grads = torch.autograd.grad(_outer_loss(model, toks), params)
    no_inner = run_sequence(model, toks[:, :-1], toks[:, 1:], inner=False).loss
    plain = torch.autograd.grad(no_inner, params)
    gen = torch.Generator().manual_seed(7)
    eps = 1e-6
    for _ in range(3):
        v = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
        norm = torch.sqrt(sum(d.pow(2).sum() for d in v))
        v = [d / norm for d in v]  # a unit direction: eps is the real step length
        with torch.no_grad():
            for p, d in zip(params, v, strict=True):
                p.add_(eps * d)
            up = float(_outer_loss(model, toks, create_graph=False))
            for p, d in zip(params, v, strict=True):
                p.sub_(2 * eps * d)
            down = float(_outer_loss(model, toks, create_graph=False))
            for p, d in zip(params, v, strict=True):
                p.add_(eps * d)
        fd = (up - down) / (2 * eps)
        exact = float(sum((g * d).sum() for g, d in zip(grads, v, strict=True)))
        assert abs(exact - fd) <= 1e-7 + 1e-6 * abs(fd), (exact, fd)
        # The gradient without the inner steps is measurably different: the comparison can fail.
        approx = float(sum((g * d).sum() for g, d in zip(plain, v, strict=True)))
        assert abs(approx - fd) > 1e-4 * abs(fd), (approx, fd)


def test_short_meta_run_lowers_the_loss(tmp_path: Path) -> None:
    data = prepared_data(tmp_path)
    raw = tiny_config(data, tmp_path / "run", steps=30, global_batch=2, probe_every=10)
    raw["optim"] = {"warmup_steps": 3, "lr": 1e-2}
    final = train(build_config(raw))
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert len(rows) == 30
    first = sum(r["loss"] for r in rows[:5]) / 5
    last = sum(r["loss"] for r in rows[-5:]) / 5
    assert last < first - 0.3, (first, last)
    assert rows[0]["inner_lr"] < rows[-1]["inner_lr"] == 1.0  # the inner step size warmed up
    assert {"inner_loss_before", "inner_loss_after", "inner_grad_norm", "grad_norm", "tokens_per_s"} <= set(rows[9])
    state = json.loads((final / "trainer.json").read_text())
    assert state["step"] == 30 and state["tokens_seen"] == 30 * 2 * 32
