"""Helpers for the trainer tests: a small prepared corpus and tiny training configs."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

from trainer.prepare import prepare

WORDS = ["the", "cat", "sat", "on", "a", "mat", "while", "dogs", "ran", "past", "old", "red", "barns", "under"]


def write_corpus(root: Path, docs: int = 24, words: int = 400, seed: int = 0) -> Path:
    """Text files whose documents repeat their own random phrases (learnable, with long-range reuse)."""
    rng = random.Random(seed)
    src = root / "corpus"
    src.mkdir(parents=True, exist_ok=True)
    for d in range(docs):
        phrases = [" ".join(rng.choice(WORDS) for _ in range(4)) for _ in range(6)]
        text = ". ".join(rng.choice(phrases) for _ in range(words // 4))
        (src / f"doc{d:03d}.txt").write_text(text + "\n")
    return src


def prepared_data(root: Path, **kw: Any) -> Path:
    out = root / "data"
    # 0.3: with the split keyed by name inside the corpus, 5 of its 24 documents are validation.
    prepare([write_corpus(root)], out, val_fraction=kw.pop("val_fraction", 0.3), progress=False, **kw)
    return out


def tiny_config(data: Path, out: Path, **kw: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "mode": "meta",
        "model": {"preset": "tiny"},
        "data": str(data),
        "out": str(out),
        "seq_len": 32,
        "global_batch": 4,
        "micro_batch": 1,
        "steps": 4,
        "threads": 1,
        "progress": False,
        "probe_every": 2,
        "optim": {"warmup_steps": 2, "lr": 3e-3},
    }
    cfg.update(kw)
    return cfg
