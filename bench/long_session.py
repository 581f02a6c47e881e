"""Does a session stay a working model however long it grows?  The default model, in one process.

    python bench/long_session.py --json [--tokens 65536] [--sink-horizon 4096] [--inner-lr 0.03]

One session reads `--tokens` tokens of the Python documentation (the corpus bench/recall.py uses:
scripts/memory_corpora.sh installs it offline), appended 1,024 at a time with its test-time steps.
At each checkpoint (1K, 2K, 4K, ... tokens) it measures, on copies that leave the session as it was:

- `heldout_nll`: the mean next-token NLL of 256 tokens of held-out text read forward only (a
  frozen copy: no step), the model's quality at that point of the session;
- `probe`: the greedy reply to a fact stated right before a question about it (the reader's
  ceiling of bench/recall.py), and whether it contains the fact's value.

`--sink-horizon N` serves the same weights with `config.sink_horizon = N` (attention sinks seen at
most N tokens back; 0: at their own positions, as v2 saw them) and `--inner-lr 0` with no
test-time steps, to tell the causes apart: without a horizon the default model's NLL jumps
from about 3.2 to 6-7 between 12K and 16K tokens, with or without steps, because a query there
sees the sinks further back than SmolLM2's 8,192 trained positions.  Prints one JSON line per
checkpoint (`--json`), measures and asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from recall import CORPUS, filler_paragraphs  # noqa: E402
from tqdm import tqdm  # noqa: E402

from memoryd.server import load_model  # noqa: E402
from memoryd.settings import load_settings  # noqa: E402
from model import StreamState, TTTModel  # noqa: E402
from model.tokenizer import load_tokenizer  # noqa: E402

PROBE = (
    "The launch code for project Bluebird is 7142. The capital of France is Paris.\n"
    "Question: What is the launch code for project Bluebird?\nAnswer: The launch code is"
)
PROBE_VALUE = "7142"


def with_horizon(model: TTTModel, horizon: int | None) -> TTTModel:
    """The same weights under a config with `sink_horizon` set (None: as converted; 0: no horizon,
    the sinks seen at their own positions, as v2 saw them)."""
    if horizon is None or model.cfg.sink_horizon == (horizon or None):
        return model
    cfg = model.cfg.model_validate({**model.cfg.model_dump(), "sink_horizon": horizon or None})
    out = TTTModel(cfg)
    out.load_state_dict(model.state_dict())
    return out.requires_grad_(False)


def measure(state: StreamState, probe: list[int], held: list[int], tok) -> dict:
    copy = state.clone()
    copy.append(probe)
    out = []
    for _ in range(8):
        t = int(copy.logits().argmax())
        out.append(t)
        copy.append([t])
    frozen = state.frozen_copy()
    frozen.append(held)
    logp = torch.log_softmax(frozen.pending_logits()[-len(held) : -1].float(), -1)
    nll = -logp.gather(1, torch.tensor(held[1:])[:, None]).mean().item()
    reply = tok.decode(out)
    return {"heldout_nll": round(nll, 3), "probe": reply, "probe_answered": PROBE_VALUE in reply}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true")
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--sink-horizon", type=int, default=None, help="serve with config.sink_horizon = N (0: none)")
    p.add_argument("--inner-lr", type=float, default=None, help="the session's test-time step size (0: no steps)")
    p.add_argument("--corpus", type=Path, default=CORPUS)
    p.add_argument("--torch-threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.torch_threads)

    model, path, name, _adapter = load_model(load_settings({}), "cpu")
    model = with_horizon(model.requires_grad_(False), args.sink_horizon)
    tok = load_tokenizer(model.cfg, path)
    paras = filler_paragraphs(args.corpus)
    random.Random(0).shuffle(paras)
    held = tok.encode(paras[-1] + paras[-2])[:256]
    ids: list[int] = []
    for para in paras[:-2]:
        ids += tok.encode(para + "\n\n")
        if len(ids) >= args.tokens:
            break
    marks = [m for m in (1024, 2048, 4096, 8192, 12288, 16384, 32768, 65536, 131072, 262144) if m <= args.tokens]
    probe = tok.encode(PROBE)

    state = StreamState.fresh(model, inner_lr=args.inner_lr)
    state.append(tok.encode("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"))
    pos, t0 = 0, time.perf_counter()
    with tqdm(total=marks[-1], desc="tokens appended", unit="tok", file=sys.stderr) as bar:
        for mark in marks:
            while pos < mark:
                piece = ids[pos : min(pos + 1024, mark)]
                if not piece:
                    break
                state.append(piece)
                pos += len(piece)
                bar.update(len(piece))
            row = {
                "model": name,
                "sink_horizon": model.cfg.sink_horizon,
                "inner_lr": state.inner_lr,
                "tokens": pos,
                "steps": state.steps,
                **measure(state, probe, held, tok),
                "seconds": round(time.perf_counter() - t0, 1),
            }
            print(json.dumps(row) if args.json else row, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
