"""Command line: `python -m trainer prepare|train|eval` (see `--help` of each)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from model.checkpoint import CheckpointError
from trainer.config import ConfigError, load_config
from trainer.prepare import DataError, prepare
from trainer.resume import ResumeError


def cmd_prepare(args: argparse.Namespace) -> int:
    meta = prepare(
        args.input, args.out, tokenizer=args.tokenizer, val_fraction=args.val_fraction,
        text_field=args.text_field, shard_tokens=args.shard_tokens, seed=args.seed,
    )  # fmt: skip
    for split, s in meta["splits"].items():
        print(f"{split}: {s['documents']} documents, {s['tokens']:,} tokens in {len(s['shards'])} shard(s)")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from trainer.train import train

    cfg = load_config(args.config, args.overrides)
    final = train(cfg, resume=args.resume)
    print(f"checkpoint: {final}")
    return 0


def write_outputs(result: dict, out: Path, plot: bool) -> None:
    """eval.json, buckets.md and (optionally) the plot, then the table on stdout."""
    from trainer.evaluate import bucket_table

    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(result) + "\n")
    table = bucket_table(result)
    (out / "buckets.md").write_text(table + "\n")
    if plot:
        from trainer.plot import plot_curves

        plot_curves(result, out / "nll_by_position.png")
    print(table)
    print(f"wrote {out}/eval.json, buckets.md" + (", nll_by_position.png" if plot else ""))


def cmd_merge(args: argparse.Namespace) -> int:
    from trainer.evaluate import merge_results

    results = []
    for f in args.results:
        p = Path(f)
        if not p.is_file():
            raise DataError(f"eval result {p} does not exist")
        results.append(json.loads(p.read_text()))
    try:
        merged = merge_results(results)
    except ValueError as e:
        raise DataError(str(e)) from e
    write_outputs(merged, Path(args.out), not args.no_plot)
    if args.compare:
        from trainer.evaluate import paired_table

        pairs = []
        for item in args.compare:
            a, sep, b = item.partition(":")
            if not sep:
                raise DataError(f"--compare expects A:B, got {item!r}")
            pairs.append((a, b))
        try:
            table = paired_table(merged, pairs)
        except ValueError as e:
            raise DataError(str(e)) from e
        (Path(args.out) / "compare.md").write_text(table + "\n")
        print(table)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from trainer.evaluate import evaluate

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    result = evaluate(
        args.checkpoint, args.data, args.seq_len, max_sequences=args.max_sequences, batch=args.batch,
        naive_ttt=args.naive_ttt, ttt=args.ttt, window=args.window, inner_lr=args.inner_lr, device=args.device,
    )  # fmt: skip
    write_outputs(result, Path(args.out), not args.no_plot)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m trainer", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    pp = sub.add_parser("prepare", help="tokenise text/markdown/reST/JSONL into token shards")
    pp.add_argument("--input", nargs="+", required=True, help="files or directories")
    pp.add_argument("--out", required=True)
    pp.add_argument("--tokenizer", default="bytes", help="'bytes', a tokenizer.json, or a checkpoint dir")
    pp.add_argument("--val-fraction", type=float, default=0.05)
    pp.add_argument("--text-field", default="text", help="JSONL field holding the text")
    pp.add_argument("--shard-tokens", type=int, default=1 << 27)
    pp.add_argument("--seed", type=int, default=0, help="salt of the document-level train/val split")
    pp.set_defaults(func=cmd_prepare)

    pt = sub.add_parser("train", help="meta-learn (TTT-E2E) or pretrain a model")
    pt.add_argument("--config", required=True, help="YAML or JSON training config")
    pt.add_argument("--resume", help="a training checkpoint directory to continue from")
    pt.add_argument("overrides", nargs="*", help="key.path=value overrides, e.g. optim.lr=1e-3 steps=200")
    pt.set_defaults(func=cmd_train)

    pe = sub.add_parser("eval", help="per-position NLL of checkpoints on validation documents")
    pe.add_argument("--checkpoint", nargs="+", required=True, help="DIR or NAME=DIR, one or more")
    pe.add_argument("--data", required=True, help="a prepared data directory (its val split)")
    pe.add_argument("--seq-len", type=int, required=True)
    pe.add_argument("--out", default="eval_out")
    pe.add_argument("--max-sequences", type=int)
    pe.add_argument("--batch", type=int, default=4)
    pe.add_argument("--naive-ttt", action="store_true", help="run test-time steps on pretrain-mode ttt-e2e checkpoints")
    pe.add_argument("--ttt", choices=["auto", "on", "off"], default="auto")
    pe.add_argument("--window", type=int, help="bucket unit k (default: the smallest window)")
    pe.add_argument("--inner-lr", type=float, help="override the checkpoints' inner_lr")
    pe.add_argument("--threads", type=int)
    pe.add_argument("--device", default="cpu", help="cpu or cuda")
    pe.add_argument("--no-plot", action="store_true")
    pe.set_defaults(func=cmd_eval)

    pm = sub.add_parser("merge", help="merge eval.json files of separate eval runs into one table and plot")
    pm.add_argument("results", nargs="+", help="eval.json files evaluated with the same settings")
    pm.add_argument("--out", required=True)
    pm.add_argument("--no-plot", action="store_true")
    pm.add_argument("--compare", nargs="*", help="A:B pairs: paired per-bucket NLL differences A - B")
    pm.set_defaults(func=cmd_merge)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DataError, ResumeError, CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
