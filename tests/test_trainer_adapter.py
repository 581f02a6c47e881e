"""Adapter meta-learning: a frozen backbone, only theta_0 (the fast MLPs' initial weights) learns."""

from __future__ import annotations

import pytest
import torch
from trainer_helpers import prepared_data, tiny_config, write_corpus

from model import init_model, load_checkpoint, preset, save_checkpoint
from model.network import fast_weight_names
from trainer.config import ConfigError, build_config
from trainer.prepare import DataError, prepare
from trainer.train import train


def test_trainable_fast_changes_only_the_fast_weights(tmp_path):
    base = tmp_path / "base"
    save_checkpoint(init_model(preset("tiny"), seed=4), base)
    data = prepared_data(tmp_path, tokenizer=str(base))  # the checkpoint's tokenizer and BOS/EOS
    cfg = build_config(tiny_config(data, tmp_path / "run", model={"init_from": str(base)}, trainable="fast"))
    before = load_checkpoint(base).state_dict()
    after = load_checkpoint(train(cfg)).state_dict()
    fast = set(fast_weight_names(preset("tiny")))
    assert fast
    for name, w in before.items():
        if name in fast:
            assert not torch.equal(after[name], w), f"{name} did not learn"
        else:
            assert torch.equal(after[name], w), f"{name} changed but the backbone is frozen"


def test_trainable_fast_needs_meta_mode(tmp_path):
    data = prepared_data(tmp_path)
    cfg = build_config(tiny_config(data, tmp_path / "run", mode="pretrain", trainable="fast"))
    with pytest.raises(ConfigError, match="trainable 'fast'"):
        train(cfg)


def test_prepare_from_a_directory_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="not a usable checkpoint"):
        prepare([write_corpus(tmp_path)], tmp_path / "out", tokenizer=str(tmp_path / "empty"), progress=False)
