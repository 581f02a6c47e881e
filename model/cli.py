"""Command line of the model package (see `python -m model --help`)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

from model.checkpoint import CheckpointError, init_model, load_checkpoint, save_checkpoint
from model.config import PRESETS, ModelConfig, preset
from model.convert import add_convert_command
from model.score import score_tokens
from model.state import InputError
from model.tokenizer import load_tokenizer


def _parse_value(text: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def cmd_init(args: argparse.Namespace) -> int:
    overrides = {}
    for item in args.set or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--set expects KEY=VALUE, got {item!r}")
        overrides[key] = _parse_value(value)
    cfg = preset(args.preset, **overrides)
    model = init_model(cfg, seed=args.seed)
    digest = save_checkpoint(model, args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: {cfg.model_type} preset {args.preset}, {n:,} parameters, {digest}")
    return 0


def _read_tokens(args: argparse.Namespace, ckpt: Path, model_cfg: ModelConfig) -> np.ndarray:
    if args.tokens:
        arr = np.load(args.tokens, allow_pickle=False)
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise InputError(f"{args.tokens} must hold a 1-D integer array, got {arr.dtype} {arr.shape}")
        return arr.astype(np.int64)
    tok = load_tokenizer(model_cfg, ckpt)
    text = Path(args.text).read_text(encoding="utf-8")
    return np.asarray([tok.bos_id, *tok.encode(text)], dtype=np.int64)


def cmd_score(args: argparse.Namespace) -> int:
    ckpt = Path(args.checkpoint)
    model = load_checkpoint(ckpt, device=args.device)
    tokens = _read_tokens(args, ckpt, model.cfg)
    nll = score_tokens(model, tokens, args.append_size, inner_lr=args.inner_lr, progress=True)
    np.save(args.out, nll.astype(np.float32))
    mean = float(nll.mean())
    print(json.dumps({"tokens": int(tokens.size), "mean_nll": mean, "bits_per_token": mean / math.log(2)}))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m model", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    i = sub.add_parser("init", help="write a randomly initialised checkpoint")
    i.add_argument("--preset", required=True, choices=sorted(PRESETS))
    i.add_argument("--out", required=True)
    i.add_argument("--seed", type=int, default=0)
    i.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key (JSON value)")
    i.set_defaults(fn=cmd_init)

    s = sub.add_parser("score", help="per-position NLL of a token sequence through a fresh session")
    s.add_argument("--checkpoint", required=True)
    src = s.add_mutually_exclusive_group(required=True)
    src.add_argument("--tokens", help="1-D int64 .npy file")
    src.add_argument("--text", help="UTF-8 text file (tokenized with the checkpoint's tokenizer, BOS first)")
    s.add_argument("--out", required=True, help="where to write the NLL (.npy, float32, length len-1)")
    s.add_argument("--append-size", type=int, default=None, help="feed in appends of N tokens (default: all)")
    s.add_argument("--inner-lr", type=float, default=None, help="override the test-time step size (0: TTT off)")
    s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    s.set_defaults(fn=cmd_score)

    add_convert_command(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (CheckpointError, InputError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
