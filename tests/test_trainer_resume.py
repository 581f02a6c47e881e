"""Resuming from a checkpoint reproduces the uninterrupted run bit for bit (CPU)."""

from __future__ import annotations

from pathlib import Path

import safetensors.torch
import torch
from trainer_helpers import prepared_data, tiny_config

from trainer.config import build_config
from trainer.metrics import read_metrics
from trainer.resume import OPTIMIZER_FILE, read_trainer_state
from trainer.train import train

torch.set_num_threads(1)


def _tensors(ckpt: Path, name: str) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(ckpt / name))


def test_resume_is_bit_exact(tmp_path: Path) -> None:
    data = prepared_data(tmp_path)
    whole = train(build_config(tiny_config(data, tmp_path / "whole", steps=5, global_batch=2, micro_batch=1)))
    cut_cfg = tiny_config(data, tmp_path / "cut", steps=5, global_batch=2, micro_batch=1)
    first = train(build_config({**cut_cfg, "stop_at": 2}))
    assert read_trainer_state(first)["step"] == 2
    resumed = train(build_config(cut_cfg), resume=str(first))
    assert read_trainer_state(resumed)["step"] == 5
    for name in ("model.safetensors", OPTIMIZER_FILE):
        a, b = _tensors(whole, name), _tensors(resumed, name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), f"{name}:{k} differs after resume"
    # The logs agree too: the same losses at the same steps.
    la = [r["loss"] for r in read_metrics(tmp_path / "whole" / "metrics.jsonl")]
    lb = [r["loss"] for r in read_metrics(tmp_path / "cut" / "metrics.jsonl")]
    assert la == lb


def test_resume_changes_nothing_when_weights_differ(tmp_path: Path) -> None:
    """Guard against a vacuous comparison: two different seeds do not give equal weights."""
    data = prepared_data(tmp_path)
    a = train(build_config(tiny_config(data, tmp_path / "a", steps=2, global_batch=1)))
    b = train(build_config(tiny_config(data, tmp_path / "b", steps=2, global_batch=1, seed=1)))
    ta, tb = _tensors(a, "model.safetensors"), _tensors(b, "model.safetensors")
    assert any(not torch.equal(ta[k], tb[k]) for k in ta)
