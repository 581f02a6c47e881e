"""What batched decode would gain from one attention call for every row and from packed GEMM.

    python bench/pooled_attention.py --json [--rows 16] [--context 200] [--reps 24]

Pooled attention is an experiment, not a served path (docs/engine.md, "Measured, not built");
packed GEMM is served (model/packed.py).  It times one batched decode forward (every block and
the head, `rows` sessions of about `context` tokens, one torch thread) four ways, alternating in
one process:

- `per_row`: today's ragged rows (`model.network.Attention`: per row, a cache append and one
  SDPA call per layer);
- `pooled`: the rows' keys in one [rows, Hkv, cap, hd] tensor per layer, every row's new key
  written with one indexed write, one masked SDPA call per layer (Attention.forward swapped
  for this run only; it checks that the hidden states agree with `per_row`'s);
- `packed`: the static MLPs and the head through MKL's copies packed for 16 rows, as memoryd
  serves by default (`model.packed`; `per_row` and `pooled` run with `packed_decode` off);
- `both`.

Prints the median ms of each and its ratio to `per_row`, as one JSON line.
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
import torch.nn.functional as F  # noqa: E402
from tqdm import tqdm  # noqa: E402

from memoryd.server import load_model  # noqa: E402
from memoryd.settings import default_data_dir, load_settings  # noqa: E402
from model import StreamState, network  # noqa: E402
from model.attention import apply_rope  # noqa: E402
from model.batch import decode  # noqa: E402

Rope = tuple[torch.Tensor, torch.Tensor]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--context", type=int, default=200, help="tokens each session has read (row r: context + r %% 5)")
    ap.add_argument("--reps", type=int, default=24, help="forwards of each variant (at most 60: the caches grow)")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    torch.set_num_threads(1)
    model, _, _, _ = load_model(load_settings({"data_dir": default_data_dir()}), "cpu")
    cfg = model.cfg
    n, g = a.rows, torch.Generator().manual_seed(0)
    states = []
    for r in range(n):
        s = StreamState.fresh(model)
        s.append(torch.randint(0, cfg.vocab_size, (a.context + r % 5,), generator=g).tolist())
        states.append(s)
    toks = torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist()
    decode(states, toks)
    past = [[s.live_past()[j] for s in states] for j in range(cfg.num_layers)]
    starts, fast = [s.position for s in states], [s.fast for s in states]
    lens = torch.tensor([live.length for live in past[0]])
    cap = int(lens.max()) + 2 * a.reps + 8
    pool = []
    for layer in past:
        kp = torch.zeros(n, cfg.kv_heads, cap, cfg.head_dim)
        vp = torch.zeros_like(kp)
        for r, live in enumerate(layer):
            k, v = live.keys()
            kp[r, :, : live.length], vp[r, :, : live.length] = k[0], v[0]
        pool.append((kp, vp))
    layer_of = {id(b.attn): j for j, b in enumerate(model.blocks)}
    columns = torch.arange(cap)
    per_row_attention = network.Attention.forward

    def pooled_attention(
        self: network.Attention, x: torch.Tensor, past_: object, start: object, rope: Rope, impl: str
    ) -> tuple[torch.Tensor, object]:
        if isinstance(start, int):
            return per_row_attention(self, x, past_, start, rope, impl)
        b = x.shape[0]
        q = self.q(x).view(b, 1, cfg.num_heads, cfg.head_dim).transpose(1, 2)
        k = self.k(x).view(b, 1, cfg.kv_heads, cfg.head_dim).transpose(1, 2)
        v = self.v(x).view(b, 1, cfg.kv_heads, cfg.head_dim).transpose(1, 2)
        cos, sin = (t.to(q.dtype) for t in rope)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        kp, vp = pool[layer_of[id(self)]]
        rows = torch.arange(b)
        kp[rows, :, lens], vp[rows, :, lens] = k[:, :, 0], v[:, :, 0]
        m = int(lens.max()) + 1
        mask = (columns[:m][None, :] <= lens[:, None])[:, None, None, :]
        out = F.scaled_dot_product_attention(
            q, kp[:, :, :m], vp[:, :, :m], attn_mask=mask, enable_gqa=True, scale=cfg.head_dim**-0.5
        )
        return self.o(out.transpose(1, 2).reshape(b, 1, -1)), past_

    def use(variant: str) -> None:
        network.Attention.forward = pooled_attention if variant in ("pooled", "both") else per_row_attention
        model.packed_decode = variant in ("packed", "both")  # the served switch (model/packed.py)

    h0 = model.embed_tokens(torch.tensor(toks)[:, None])
    variants = ("per_row", "pooled", "packed", "both")
    cur, times = past, {v: [] for v in variants}
    try:
        with torch.no_grad():
            use("per_row")
            ha, cur = model.run_blocks(h0, range(cfg.num_layers), cur, starts, fast, "sdpa")
            use("pooled")
            hb, _ = model.run_blocks(h0, range(cfg.num_layers), past, starts, fast, "sdpa")
            agree = float((ha - hb).abs().max())
            lens += 1
            starts = [s + 1 for s in starts]
            for i in tqdm(range(a.reps), desc="forwards", disable=a.json):
                for v in variants if i % 2 else variants[::-1]:
                    use(v)
                    per_row = v in ("per_row", "packed")
                    t0 = time.perf_counter()
                    caches = cur if per_row else past
                    h, kept = model.run_blocks(h0, range(cfg.num_layers), caches, starts, fast, "sdpa")
                    model.rows_head(h[:, -1])
                    times[v].append((time.perf_counter() - t0) * 1000)
                    if per_row:
                        cur = kept
                lens += 1
                starts = [s + 1 for s in starts]
    finally:
        use("per_row")
    med = {v: round(statistics.median(t), 1) for v, t in times.items()}
    out = {
        "rows": n,
        "context": a.context,
        "torch_threads": 1,
        "forward_ms": med,
        "of_per_row": {v: round(med[v] / med["per_row"], 3) for v in variants},
        "pooled_hidden_max_abs_diff": agree,
        "hidden_max_abs": float(ha.abs().max()),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
