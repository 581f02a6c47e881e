"""Is a batched test-time step bit-identical to a solo one?  The measurement behind the engine's
choice (docs/engine.md): batch the state-defining steps only if they are batch-invariant.

For B in --batches, B sessions with different contexts are stepped together through
`inner.minibatch_step` (the model's batched code path: every row its own theta and
cache), and each row's new fast weights and caches are compared bit for bit with the
same session stepped alone; the same for one batched decode forward (`model.batch.decode`)
against solo decode.  Prints one JSON line: per B, whether each part is bit-identical,
and the largest difference.  It measures; it asserts nothing.

    python bench/batch_invariance.py --json [--preset small] [--batches 2,4,8,16]
"""

from __future__ import annotations

import argparse
import json

import torch

from model import StreamState, init_model, preset
from model.batch import decode
from model.cache import cache_spec, extend_all
from model.inner import minibatch_step


def step_states(model, states: list[StreamState], nxt: list[torch.Tensor]) -> list[tuple[dict, list]]:
    """Step every state's next mini-batch (nxt[i]: its b tokens and the target after them) together;
    return each row's new (theta, kv)."""
    cfg = model.cfg
    b = cfg.mini_batch_size
    tokens = torch.stack([x[:b] for x in nxt])
    targets = torch.stack([x[1 : b + 1] for x in nxt])
    fast = {k: torch.cat([s.fast[k] for s in states]) for k in states[0].fast}
    kv = [
        None if states[0].kv[i] is None else tuple(torch.cat([s.kv[i][j] for s in states]) for j in (0, 1))
        for i in range(cfg.num_layers)
    ]
    res = minibatch_step(
        model,
        fast,
        tokens,
        targets,
        targets != cfg.bos_token_id,
        kv,
        states[0].steps * b,
        states[0].inner_lr,
        cfg.inner_clip,
        states[0].impl,
    )
    new_kv = extend_all(kv, res.kv, cache_spec(cfg))
    return [
        ({k: v[r : r + 1] for k, v in res.fast.items()}, [(k[r : r + 1], v[r : r + 1]) for k, v in new_kv])
        for r in range(len(states))
    ]


def max_diff(a: list[tuple[dict, list]], b: list[tuple[dict, list]]) -> float:
    d = 0.0
    for (fa, ka), (fb, kb) in zip(a, b, strict=True):
        d = max([d, *((fa[k] - fb[k]).abs().max().item() for k in fa)])
        d = max([d, *((x[0] - y[0]).abs().max().item() for x, y in zip(ka, kb, strict=True))])
    return d


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--batches", default="2,4,8,16")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = init_model(preset(args.preset), seed=0).requires_grad_(False)
    b, vocab = model.cfg.mini_batch_size, model.cfg.vocab_size
    gen = torch.Generator().manual_seed(0)
    out = {"preset": args.preset, "threads": args.threads, "batches": {}}
    for n in (int(x) for x in args.batches.split(",")):
        ctxs = [torch.randint(0, vocab - 2, (2 * b + 1,), generator=gen) for _ in range(n)]
        states = []  # sessions one mini-batch in, at the same position, with different contexts
        for c in ctxs:
            s = StreamState.fresh(model)
            s.append(c[: b + 1])
            states.append(s)
        nxt = [c[b:] for c in ctxs]
        with torch.no_grad():
            solo = [step_states(model, [s], [x])[0] for s, x in zip(states, nxt, strict=True)]
            batched = step_states(model, states, nxt)
        d_step = max_diff(solo, batched)
        # decode: one token per session at different positions, one batched forward vs one each
        a, z = [], []
        for i, c in enumerate(ctxs):
            for group in (a, z):
                s = StreamState.fresh(model)
                s.append(c[: 1 + i % b])
                group.append(s)
        toks = [int(t) for t in torch.randint(0, vocab - 2, (n,), generator=gen)]
        lb = decode(a, toks)
        ls = torch.stack([decode([y], [t])[0] for y, t in zip(z, toks, strict=True)])
        out["batches"][str(n)] = {
            "step_bit_identical": d_step == 0.0,
            "step_max_abs_diff": d_step,
            "decode_logits_bit_identical": bool(torch.equal(lb, ls)),
            "decode_logits_max_abs_diff": (lb - ls).abs().max().item(),
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
