"""What a recall generation's prefill costs: a frozen read of n tokens after a full window, by n.

    python bench/prefill_cost.py --json [--lengths 1,14,27,41,55,68,96] [--rounds 5] [--history 2048]

A session's state past its attention window (`--history` tokens of the Python documentation,
read with test-time steps) reads n more tokens into a frozen copy (`StreamState.frozen_copy`:
forward only, as a generation reads its recalled context and prompt) and takes the logits of
the last one.  That is the compute between a Generate call and its first token, with recall
(context + prompt) and without (the prompt alone, where it completes no mini-batch).  Every
length is timed once per round, the lengths in a new order each round, `--rounds` rounds; the
per-length figure is the median.  One torch thread (the daemon's default).

It prints `read_ms` by n, a least-squares line through them (`fixed_ms` + `ms_per_token` x n),
and for a prompt of `--prompt` tokens the most recalled tokens that keep the time to first token
within 1.3 times the prompt's alone by that line (`max_recalled_for_1_3`).  Timings are this
machine's in this run: compare within the run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import torch  # noqa: E402
from recall import CORPUS, filler_paragraphs  # noqa: E402
from tqdm import tqdm  # noqa: E402

from memoryd.default_model import default_checkpoint  # noqa: E402
from memoryd.settings import default_data_dir  # noqa: E402
from model import StreamState  # noqa: E402
from model.checkpoint import load_checkpoint, read_config  # noqa: E402
from model.tokenizer import load_tokenizer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--lengths", default="1,14,27,41,55,68,96", help="tokens read per frozen read")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--history", type=int, default=2048, help="tokens read (with steps) before the frozen reads")
    ap.add_argument("--prompt", type=int, default=27, help="prompt tokens for max_recalled_for_1_3")
    ap.add_argument("--corpus", type=Path, default=CORPUS)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)

    path = default_checkpoint(default_data_dir()).path
    model = load_checkpoint(path)
    tok = load_tokenizer(read_config(path), path)
    text = "\n\n".join(filler_paragraphs(args.corpus))
    ids = tok.encode(text[: args.history * 8])
    lengths = [int(n) for n in args.lengths.split(",")]
    if len(ids) < args.history + max(lengths):
        raise SystemExit("the corpus is too short for --history")
    state = StreamState.fresh(model)
    state.append(ids[: args.history])
    after = ids[args.history :]

    rng = random.Random(args.seed)
    times: dict[int, list[float]] = {n: [] for n in lengths}
    for _ in tqdm(range(args.rounds), desc="rounds", file=sys.stderr, disable=args.json):
        order = lengths[:]
        rng.shuffle(order)
        for n in order:
            f = state.frozen_copy()
            t0 = time.perf_counter()
            f.append(after[:n])
            f.logits()
            times[n].append((time.perf_counter() - t0) * 1000)
    med = {n: statistics.median(times[n]) for n in lengths}
    slope, fixed = _line(lengths, [med[n] for n in lengths])
    # (fixed + slope (p + r)) / (fixed + slope p) <= 1.3  <=>  r <= 0.3 (fixed / slope + p)
    most = 0.3 * (fixed / slope + args.prompt) if slope > 0 else float("inf")
    print(
        json.dumps(
            {
                "model": path.name,
                "torch_threads": torch.get_num_threads(),
                "history": args.history,
                "rounds": args.rounds,
                "read_ms": {str(n): round(med[n], 1) for n in lengths},
                "fixed_ms": round(fixed, 1),
                "ms_per_token": round(slope, 2),
                "prompt": args.prompt,
                "max_recalled_for_1_3": int(most),
            }
        )
    )


def _line(xs: list[int], ys: list[float]) -> tuple[float, float]:
    """Least-squares slope and intercept."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx
    return slope, my - slope * mx


if __name__ == "__main__":
    main()
