"""Data preparation, extension fine-tuning and the evaluation outputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from trainer_helpers import prepared_data, tiny_config, write_corpus

from model import load_checkpoint
from trainer.cli import main
from trainer.config import build_config
from trainer.data import TokenShards
from trainer.evaluate import bucket_edges
from trainer.prepare import prepare
from trainer.train import train

torch.set_num_threads(1)


def test_prepare_writes_documents_with_bos_and_a_stable_split(tmp_path: Path) -> None:
    src = write_corpus(tmp_path, docs=10, words=40)
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": f"row {i} é"}) + "\n" for i in range(5)))
    meta = prepare([src, rows], tmp_path / "a", val_fraction=0.3, shard_tokens=500, progress=False)
    again = prepare([rows, src], tmp_path / "b", val_fraction=0.3, shard_tokens=500, progress=False)
    assert meta["splits"]["train"]["documents"] + meta["splits"]["val"]["documents"] == 15
    assert meta["splits"]["val"]["tokens"] == again["splits"]["val"]["tokens"]  # order-independent split
    assert len(meta["splits"]["train"]["shards"]) > 1  # sharded
    train_ = TokenShards(tmp_path / "a", "train")
    toks = np.concatenate([np.asarray(a) for a in train_.arrays])
    assert toks[0] == train_.bos and (toks == train_.bos).sum() == meta["splits"]["train"]["documents"]
    text = bytes(int(t) for t in toks[toks != train_.bos]).decode("utf-8")
    assert "row" in text or "the" in text or "cat" in text
    s1, s2 = train_.sample(0, 7, 3, 17), train_.sample(0, 7, 3, 17)
    assert torch.equal(s1, s2) and s1.shape == (3, 17)
    assert not torch.equal(s1, train_.sample(0, 8, 3, 17))


def test_document_sequences_stay_inside_documents(tmp_path: Path) -> None:
    data = prepared_data(tmp_path)
    seqs = TokenShards(data, "val").document_sequences(65)
    assert seqs.shape[1] == 65
    assert (seqs[:, 1:] != 256).all()  # no document boundary inside a window
    assert len(TokenShards(data, "val").document_sequences(65, limit=2)) == 2


def test_bucket_edges() -> None:
    assert bucket_edges(4096, 512) == [(0, 512), (512, 1024), (1024, 2048), (2048, 4096)]
    assert bucket_edges(96, 32) == [(0, 32), (32, 64), (64, 96)]


def test_extension_finetune_and_eval_outputs(tmp_path: Path) -> None:
    data = prepared_data(tmp_path)
    meta = train(build_config(tiny_config(data, tmp_path / "meta", steps=3)))
    pre = train(build_config(tiny_config(data, tmp_path / "pre", steps=3, mode="pretrain")))
    # Extension: continue meta-training at twice the sequence length from the checkpoint.
    ext_cfg = tiny_config(data, tmp_path / "ext", steps=2, seq_len=64)
    ext_cfg["model"] = {"init_from": str(meta), "preset": None}
    ext_cfg["optim"] = {"warmup_steps": 0, "inner_lr_init": 1.0}
    ext = train(build_config(ext_cfg))
    before, after = load_checkpoint(meta), load_checkpoint(ext)
    assert before.cfg == after.cfg
    assert any(not torch.equal(a, b) for a, b in zip(before.parameters(), after.parameters(), strict=True))

    out = tmp_path / "eval"
    args = ["eval", "--checkpoint", f"meta={meta}", f"naive={pre}", f"ext={ext}", "--data", str(data)]
    assert main([*args, "--seq-len", "64", "--out", str(out), "--naive-ttt", "--max-sequences", "3"]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert (out / "nll_by_position.png").stat().st_size > 1000
    assert result["window"] == 32 and set(result["models"]) == {"meta", "naive", "ext"}
    assert result["models"]["naive"]["ttt"] and result["models"]["meta"]["ttt"]
    assert list(result["models"]["meta"]["buckets"]) == ["0-32", "32-64"]
    assert "| meta |" in (out / "buckets.md").read_text()
    # Without --naive-ttt a pretrain-mode checkpoint runs with theta_0 fixed, and that changes its NLL.
    only_naive = ["eval", "--checkpoint", f"naive={pre}", "--data", str(data), "--max-sequences", "3"]
    assert main([*only_naive, "--seq-len", "64", "--out", str(tmp_path / "e2"), "--no-plot"]) == 0
    off = json.loads((tmp_path / "e2" / "eval.json").read_text())["models"]["naive"]
    assert not off["ttt"] and off["mean_nll"] != result["models"]["naive"]["mean_nll"]


def _result(names: list[str], window: int = 32) -> dict:
    curve = [1.0] * 64
    models = {n: {"curve": curve, "mean_nll": 1.0, "buckets": {"0-32": 1.0, "32-64": 1.0}} for n in names}
    return {"seq_len": 64, "window": window, "mini_batch": 8, "sequences": 3, "data": "d", "models": models}


def test_merge_joins_comparable_results_and_refuses_others(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    a.write_text(json.dumps(_result(["x"])))
    b.write_text(json.dumps(_result(["y"])))
    c.write_text(json.dumps(_result(["z"], window=16)))
    assert main(["merge", str(a), str(b), "--out", str(tmp_path / "m"), "--no-plot"]) == 0
    assert list(json.loads((tmp_path / "m" / "eval.json").read_text())["models"]) == ["x", "y"]
    assert main(["merge", str(a), str(c), "--out", str(tmp_path / "m2")]) == 2
    assert main(["merge", str(a), str(a), "--out", str(tmp_path / "m3")]) == 2


def test_split_does_not_depend_on_where_the_corpus_lies(tmp_path: Path) -> None:
    """Documents are split by their path inside the input directory, not on disk."""
    src = write_corpus(tmp_path / "a")
    shutil.copytree(src, tmp_path / "b" / "elsewhere" / "corpus")
    metas = [
        prepare([d], tmp_path / f"out{i}", val_fraction=0.3, progress=False)
        for i, d in enumerate((src, tmp_path / "b" / "elsewhere" / "corpus"))
    ]
    assert metas[0]["splits"] == metas[1]["splits"]
    assert metas[0]["splits"]["val"]["documents"] > 0
