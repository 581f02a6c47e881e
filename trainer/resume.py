"""Resumable training checkpoints: the model's own format plus optimizer and trainer state.

A training checkpoint directory is a model checkpoint (`config.json`,
`model.safetensors`, written by `model.checkpoint.save_checkpoint`, so memoryd
can serve it as is) with two more files:

- `optimizer.safetensors`: AdamW's `exp_avg`, `exp_avg_sq` and `step` per
  parameter, keyed by parameter name (never pickle: loading runs no code);
- `trainer.json`: the completed step count, tokens seen, wall time and the
  full training config.

Everything is saved in float32 exactly as held in memory, and training windows
depend only on the step number, so resuming reproduces an uninterrupted run
bit for bit on CPU.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from model.checkpoint import save_checkpoint
from model.network import TTTModel

OPTIMIZER_FILE = "optimizer.safetensors"
TRAINER_FILE = "trainer.json"
STATE_KEYS = ("exp_avg", "exp_avg_sq", "step")


class ResumeError(ValueError):
    """A training checkpoint that cannot be resumed; the message says what is missing."""


def optimizer_tensors(model: TTTModel, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, torch.Tensor] = {}
    for p, st in opt.state.items():
        name = by_id[id(p)]
        for key in STATE_KEYS:
            if key in st:
                t = st[key] if torch.is_tensor(st[key]) else torch.tensor(float(st[key]))
                out[f"{key}/{name}"] = t.detach().to("cpu").contiguous()
    return out


def load_optimizer_tensors(model: TTTModel, opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    """Put saved AdamW state back on the optimizer's parameters (same names, same shapes)."""
    params = dict(model.named_parameters())
    names = {k.split("/", 1)[1] for k in tensors}
    unknown = sorted(names - set(params))
    if unknown:
        raise ResumeError(f"optimizer state names parameters the model lacks: {unknown[:5]}")
    for name in names:
        p = params[name]
        st: dict[str, Any] = {}
        for key in STATE_KEYS:
            t = tensors.get(f"{key}/{name}")
            if t is None:
                raise ResumeError(f"optimizer state for {name} lacks {key}")
            st[key] = t.to(p.device) if key == "step" else t.to(device=p.device, dtype=p.dtype)
        if st["exp_avg"].shape != p.shape:
            raise ResumeError(
                f"optimizer state for {name} has shape {list(st['exp_avg'].shape)}, model {list(p.shape)}"
            )
        opt.state[p] = st


def save_training_checkpoint(
    out_dir: str | Path, model: TTTModel, opt: torch.optim.Optimizer, trainer_state: dict[str, Any]
) -> Path:
    """Write model, optimizer and trainer state; files are replaced one by one, the JSON last."""
    out = Path(out_dir)
    save_checkpoint(model, out)
    safetensors.torch.save_file(optimizer_tensors(model, opt), str(out / OPTIMIZER_FILE))
    (out / TRAINER_FILE).write_text(json.dumps(trainer_state, indent=2) + "\n")
    return out


def read_trainer_state(ckpt: str | Path) -> dict[str, Any]:
    f = Path(ckpt) / TRAINER_FILE
    if not f.is_file():
        raise ResumeError(f"{ckpt} is not a training checkpoint ({TRAINER_FILE} missing)")
    return json.loads(f.read_text())


def read_optimizer_tensors(ckpt: str | Path) -> dict[str, torch.Tensor]:
    f = Path(ckpt) / OPTIMIZER_FILE
    if not f.is_file():
        raise ResumeError(f"{ckpt} has no optimizer state ({OPTIMIZER_FILE} missing): it cannot be resumed")
    return safetensors.torch.load_file(str(f))
