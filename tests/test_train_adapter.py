"""The GPU adapter run (scripts/train_adapter.py) end to end on a tiny CPU config (issue 9).

The same script and config as the H200 run, with a tiny backbone and corpus passed as
overrides: training runs as a child process, the adapter is exported with the
backbone check, memoryd's `apply_adapter` loads it, and the meta-learned theta_0
has a lower meta-loss than the backbone's on fixed windows.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from trainer_helpers import prepared_data

from memoryd.default_model import apply_adapter
from model import init_model, load_checkpoint, preset, save_checkpoint
from model.sequence import run_sequence
from trainer.data import TokenShards

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import train_adapter  # noqa: E402

CONFIG = ROOT / "trainer" / "configs" / "adapter_default_h200.yaml"


def meta_loss(model, windows: torch.Tensor) -> float:
    with torch.no_grad():
        return float(run_sequence(model, windows[:, :-1], windows[:, 1:]).loss)


def test_tiny_adapter_run_learns_and_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = tmp_path / "base"
    save_checkpoint(init_model(preset("tiny", inner_lr=0.3), seed=5), base)
    data = prepared_data(tmp_path, tokenizer=str(base))
    out, adapter = tmp_path / "run", tmp_path / "adapter.safetensors"
    overrides = [
        f"model.init_from={base}", f"data={data}", f"out={out}", "seq_len=32", "global_batch=4", "micro_batch=2",
        "steps=12", "checkpoint_every=5", "device=cpu", "threads=1", "progress=false", "optim.lr=3e-3",
        "optim.warmup_steps=2",
    ]  # fmt: skip
    rc = train_adapter.main(["--config", str(CONFIG), "--adapter-out", str(adapter), *overrides])
    assert rc == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["from"] == str(out / "final") and report["train_exit"] == 0
    assert report["distance_from_backbone"] > 0

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 12
    windows = TokenShards(data, "val").sample(0, 0, 8, 33)
    before = meta_loss(load_checkpoint(base), windows)
    served = apply_adapter(load_checkpoint(base), adapter)
    after = meta_loss(served, windows)
    assert after < before - 0.01, (before, after)
    trained = load_checkpoint(out / "final")
    for name, w in trained.state_dict().items():
        assert torch.equal(served.state_dict()[name], w), name
    assert served.digest != load_checkpoint(base).digest


def test_export_refuses_a_checkpoint_of_another_backbone(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    save_checkpoint(init_model(preset("tiny"), seed=1), a)
    save_checkpoint(init_model(preset("tiny"), seed=2), b)
    with pytest.raises(train_adapter.AdapterError, match="differs from the backbone's"):
        train_adapter.export_adapter(a, b, tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()
    assert train_adapter.latest_checkpoint(tmp_path / "nothing") is None


def test_the_gpu_config_is_for_the_default_model() -> None:
    """A renamed default (a new recipe) must move the GPU config with it."""
    from memoryd.default_model import DEFAULT_NAME
    from trainer.config import load_config

    cfg = load_config(CONFIG)
    assert cfg.model.init_from == f"data/models/{DEFAULT_NAME}"
    assert (cfg.mode, cfg.trainable, cfg.seq_len % 64) == ("meta", "fast", 0)
