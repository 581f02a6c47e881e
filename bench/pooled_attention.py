"""What batched decode gains from pooled attention and from oneDNN's packed products, the two served switches.

    python bench/pooled_attention.py --json [--rows 16] [--context 200] [--reps 8] [--ticks 8]

Times `model.batch.decode` over `rows` sessions of about `context` tokens (row r: context + r % 5),
one torch thread, four ways, alternating in one process (the order reversed every other rep, so a
shared machine's load changes hit every variant alike):

- `per_row`: attention per row and layer over the row's own cache, plain products;
- `pooled`: attention in one call per layer over a `model.pool.DecodePool` (as the engine's decode
  lane keeps one: `memoryd serve --decode-pool-bytes`);
- `packed`: the static weights through oneDNN's packed copies and the fast weights on oneDNN
  (`model.packed`, `memoryd serve --packed-decode`);
- `both`: what memoryd serves by default.

Each rep of a variant starts from clones of the same sessions and runs one untimed tick (the clones
copy their caches on their first write, a pool copies its rows in), then `ticks` timed ticks, none
of which completes a mini-batch (a test-time step would run solo).  Prints the median ms of a tick
for each, its ratio to `per_row`, the pool's bytes, and the largest difference between the pooled
and the per-row logits of the same tick, as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from memoryd.server import load_model  # noqa: E402
from memoryd.settings import default_data_dir, load_settings  # noqa: E402
from model import StreamState  # noqa: E402
from model.batch import decode, tokens_to_step  # noqa: E402
from model.pool import DecodePool  # noqa: E402

VARIANTS = {"per_row": (False, False), "pooled": (True, False), "packed": (False, True), "both": (True, True)}
"""name -> (pooled attention, packed products)."""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--context", type=int, default=200, help="tokens each session has read (row r: context + r %% 5)")
    ap.add_argument("--reps", type=int, default=8, help="runs of each variant")
    ap.add_argument("--ticks", type=int, default=8, help="timed decode ticks a run")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(1)
    model, _, _, _ = load_model(load_settings({"data_dir": default_data_dir()}), "cpu")
    cfg = model.cfg
    g = torch.Generator().manual_seed(0)
    base = []
    for r in tqdm(range(a.rows), desc="sessions", disable=a.json):
        s = StreamState.fresh(model)
        s.append(torch.randint(0, cfg.vocab_size, (a.context + r % 5,), generator=g).tolist())
        base.append(s)
    room = min(tokens_to_step(s) for s in base) - 1
    if a.ticks + 1 > room:
        raise SystemExit(f"--ticks {a.ticks} + 1 would complete a mini-batch ({room} tokens of room): use fewer")
    toks = torch.randint(0, cfg.vocab_size, (a.ticks + 1, a.rows), generator=g).tolist()

    def run(name: str) -> tuple[list[float], torch.Tensor, int]:
        pooled, packed = VARIANTS[name]
        model.packed_decode = packed
        pool = DecodePool(cfg) if pooled else None
        states = [s.clone() for s in base]
        first = decode(states, toks[0], pool)
        times = []
        for t in toks[1:]:
            t0 = time.perf_counter()
            decode(states, t, pool)
            times.append((time.perf_counter() - t0) * 1000)
        return times, first, pool.nbytes() if pool is not None else 0

    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    firsts, pool_bytes = {}, 0
    try:
        for i in tqdm(range(a.reps), desc="reps", disable=a.json):
            for v in VARIANTS if i % 2 == 0 else reversed(VARIANTS):
                ms, firsts[v], nbytes = run(v)
                times[v] += ms
                pool_bytes = max(pool_bytes, nbytes)
    finally:
        model.packed_decode = True
    med = {v: round(statistics.median(t), 1) for v, t in times.items()}
    out = {
        "rows": a.rows,
        "context": a.context,
        "torch_threads": 1,
        "tick_ms": med,
        "of_per_row": {v: round(med[v] / med["per_row"], 3) for v in VARIANTS},
        "pool_bytes": pool_bytes,
        "pooled_logits_max_abs_diff": float((firsts["pooled"] - firsts["per_row"]).abs().max()),
        "logits_max_abs": float(firsts["per_row"].abs().max()),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
