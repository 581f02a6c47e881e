"""`eval`: per-position NLL curves of checkpoints on validation documents.

Every checkpoint reads the same sequences: windows of T+1 tokens inside
validation documents (`TokenShards.document_sequences`), so position t always
has exactly t tokens of the same document before it.  The NLL
at each position is averaged over the sequences; the curve, its means over the
position buckets [0,k), [k,2k), [2k,4k), ... (k the attention window) and a
plot go to the output.

Test-time training: a ttt-e2e checkpoint trained in `meta` mode (or with no
trainer record) runs its inner steps; one trained in `pretrain` mode runs with
theta_0 fixed unless `naive_ttt` is set, which turns its steps on: the paper's
"naive TTT" baseline, a network that was never meta-learned to be updated.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from model.checkpoint import load_checkpoint
from model.network import TTTModel
from model.sequence import run_sequence
from trainer.data import TokenShards
from trainer.prepare import DataError
from trainer.resume import TRAINER_FILE


@dataclass
class EvalTarget:
    name: str
    path: Path


def parse_targets(items: list[str]) -> list[EvalTarget]:
    """`DIR` or `NAME=DIR`; the default name is the directory's parent/name."""
    out = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            path, p = item, Path(item)
            name = f"{p.parent.name}/{p.name}" if p.parent.name else p.name
        out.append(EvalTarget(name, Path(path)))
    names = [t.name for t in out]
    if len(set(names)) != len(names):
        raise ValueError(f"checkpoint names must be unique, got {names}: use NAME=DIR")
    return out


def trainer_record(path: Path) -> dict[str, Any]:
    f = path / TRAINER_FILE
    return json.loads(f.read_text()) if f.is_file() else {}


def ttt_enabled(model: TTTModel, record: dict[str, Any], naive_ttt: bool, ttt: str) -> bool:
    """Whether the checkpoint runs test-time steps (see the module docstring)."""
    if model.cfg.model_type != "ttt-e2e" or ttt == "off":
        return False
    if ttt == "on":
        return True
    return record.get("mode", "meta") == "meta" or naive_ttt


def bucket_edges(seq_len: int, window: int) -> list[tuple[int, int]]:
    """[0,k), [k,2k), [2k,4k), ... cut at seq_len."""
    edges, lo, hi = [], 0, window
    while lo < seq_len:
        edges.append((lo, min(hi, seq_len)))
        lo, hi = hi, hi * 2
    return edges


@torch.no_grad()
def sequence_nll(
    model: TTTModel, seqs: torch.Tensor, ttt: bool, batch: int, inner_lr: float | None, desc: str
) -> np.ndarray:
    """NLL [N, T] of every position of every sequence [N, T+1] (NaN where the target is BOS)."""
    rows = []
    for i in tqdm(range(0, seqs.shape[0], batch), desc=desc, unit="batch"):
        w = seqs[i : i + batch].to(next(model.parameters()).device)
        res = run_sequence(model, w[:, :-1], w[:, 1:], inner=ttt, inner_lr=inner_lr, create_graph=False)
        nll = res.nll.double().masked_fill(w[:, 1:] == model.cfg.bos_token_id, float("nan"))
        rows.append(nll.cpu())
    return torch.cat(rows).numpy()


def evaluate(
    checkpoints: list[str],
    data: str,
    seq_len: int,
    max_sequences: int | None = None,
    batch: int = 4,
    naive_ttt: bool = False,
    ttt: str = "auto",
    window: int | None = None,
    inner_lr: float | None = None,
    device: str = "cpu",
) -> dict[str, Any]:
    """Evaluate every checkpoint on the same validation sequences; a JSON-ready dict."""
    targets = parse_targets(checkpoints)
    shards = TokenShards(data, "val")
    seqs = shards.document_sequences(seq_len + 1, max_sequences)
    models: dict[str, Any] = {}
    windows, minis = [], []
    for t in targets:
        model = load_checkpoint(t.path, device=device)
        if seq_len % model.cfg.mini_batch_size:
            raise DataError(f"--seq-len {seq_len} is not a multiple of {t.name}'s mini_batch_size")
        record = trainer_record(t.path)
        on = ttt_enabled(model, record, naive_ttt, ttt)
        per_seq = sequence_nll(model, seqs, on, batch, inner_lr, desc=f"eval {t.name}")
        curve = np.nanmean(per_seq, axis=0)
        if model.cfg.window_size is not None:
            windows.append(model.cfg.window_size)
        minis.append(model.cfg.mini_batch_size)
        models[t.name] = {
            "checkpoint": str(t.path),
            "model_type": model.cfg.model_type,
            "train_mode": record.get("mode"),
            "ttt": on,
            "params": sum(p.numel() for p in model.parameters()),
            "train_tokens": record.get("tokens_seen"),
            "mean_nll": float(curve.mean()),
            "curve": [round(float(x), 5) for x in curve],
            "_per_seq": per_seq,
        }
    k = window or (min(windows) if windows else seq_len)
    edges = bucket_edges(seq_len, k)
    for m in models.values():
        c, per_seq = np.asarray(m["curve"]), m.pop("_per_seq")
        m["buckets"] = {f"{lo}-{hi}": float(c[lo:hi].mean()) for lo, hi in edges}
        # Each sequence's mean per bucket: paired comparisons between models (same sequences).
        m["sequence_buckets"] = {
            f"{lo}-{hi}": [round(float(x), 5) for x in np.nanmean(per_seq[:, lo:hi], axis=1)] for lo, hi in edges
        }
    return {
        "seq_len": seq_len,
        "window": k,
        "mini_batch": min(minis) if minis else None,
        "sequences": int(seqs.shape[0]),
        "data": str(data),
        "models": models,
    }


def bucket_table(result: dict[str, Any]) -> str:
    """A Markdown table of mean NLL (nats/token) per position bucket, one row per model."""
    names = list(result["models"])
    keys = list(result["models"][names[0]]["buckets"]) if names else []
    lines = ["| model | " + " | ".join(f"[{k.replace('-', ', ')})" for k in keys) + " | all |"]
    lines.append("|" + "---|" * (len(keys) + 2))
    for n in names:
        m = result["models"][n]
        cells = [f"{m['buckets'][k]:.4f}" for k in keys]
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {m['mean_nll']:.4f} |")
    return "\n".join(lines)


def paired_table(result: dict[str, Any], pairs: list[tuple[str, str]]) -> str:
    """Markdown: mean NLL difference a - b per bucket over the same sequences, +- 2 standard errors.

    The models read identical windows, so the per-sequence difference removes the
    (large) variation between documents; a difference whose interval excludes 0 is
    more than noise in which windows were drawn.
    """
    models = result["models"]
    keys = list(next(iter(models.values()))["buckets"])
    lines = [
        "| a - b | " + " | ".join(f"[{k.replace('-', ', ')})" for k in keys) + " |",
        "|" + "---|" * (len(keys) + 1),
    ]
    for a, b in pairs:
        if a not in models or b not in models:
            raise ValueError(f"cannot compare {a!r} with {b!r}: models are {sorted(models)}")
        cells = []
        for k in keys:
            d = np.asarray(models[a]["sequence_buckets"][k]) - np.asarray(models[b]["sequence_buckets"][k])
            se = d.std(ddof=1) / math.sqrt(d.size) if d.size > 1 else float("nan")
            cells.append(f"{d.mean():+.4f} ± {2 * se:.4f}")
        lines.append(f"| {a} - {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def log_binned(curve: np.ndarray, bins: int = 48) -> tuple[np.ndarray, np.ndarray]:
    """Means of the curve over log-spaced position bins (a per-byte curve is too noisy to read)."""
    T = curve.size
    edges = np.unique(np.round(np.logspace(0, math.log10(T), bins + 1)).astype(int))
    edges = np.concatenate(([0], edges))
    edges[-1] = T
    x, y = [], []
    for lo, hi in itertools.pairwise(edges):
        if hi > lo:
            x.append(math.sqrt(max(lo, 1) * hi))
            y.append(float(curve[lo:hi].mean()))
    return np.asarray(x), np.asarray(y)


def merge_results(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One result from several `evaluate` runs on the same sequences (checkpoints evaluated apart,
    e.g. each as soon as its training ends); refuses results that are not comparable."""
    if not results:
        raise ValueError("nothing to merge")
    first = results[0]
    keys = ("seq_len", "window", "sequences", "data")
    merged = {k: first[k] for k in keys}
    merged["mini_batch"] = min(r["mini_batch"] for r in results if r.get("mini_batch"))
    merged["models"] = {}
    for r in results:
        for k in keys:
            if r[k] != first[k]:
                raise ValueError(f"results differ in {k}: {r[k]!r} vs {first[k]!r}; evaluate with the same settings")
        for name, m in r["models"].items():
            if name in merged["models"]:
                raise ValueError(f"model {name!r} appears in two results")
            merged["models"][name] = m
    return merged
