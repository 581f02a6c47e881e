"""What attention costs the default model, before and after a kernel change, side by side in one process.

    python bench/attention_cost.py --json [--before REF] [--rounds 3] [--cache /tmp/memoryd-attention-cost]

Two attention kernels take turns on the same states: `after` is model/attention.py as checked out,
`before` is the same file at git ref `--before`, loaded as a module of its own and swapped into
model.network, where every attention call goes through (`attend`).  The default, 8a9a3c2, is the
last commit before decode sliced its keys and far_sinks carried the sink scores in extra columns;
name another ref to compare a later change.  Everything else (projections, MLPs, steps, caches)
is the checked-out code for both, so the ratios measure the kernel alone.  One torch thread (the
daemon's default); each measurement alternates the two kernels `--rounds` times and keeps the
median, so load changes on a shared machine hit both alike.

Measured, on the default model (its tokenizer, the Python documentation corpus of bench/recall.py):

- `append_tok_s`: an append of 1,024 tokens with its test-time steps, the piece ending at 1K
  (from a fresh state) and at 16K tokens (past `config.sink_horizon`, where the sinks are seen
  from the horizon: `attention.far_sinks`).
- `decode_16K_ms`: greedy decode ms/token (median of `--decode` tokens, the kernels taking turns
  token by token) of a session at 16K tokens, and (`decode_16K_frozen_read_400_ms`) of a frozen
  copy of it that read 400 tokens past the window (what a recall generation decodes from:
  `StreamState.frozen_copy`, its key cache passes the window); `..._attend_ms`: the part of a
  token spent inside `attend`, all 30 layers.
- `frozen_read_ms_per_token`: a frozen copy reading 400 tokens in one append, at 1K and at 64K
  tokens of history (the prefill of a recall generation: its time to first token), with the
  shares of that time spent inside `attend` and, within it, building `window_mask` (the rest:
  projections, MLPs, norms).
- `after_vs_before_at_16K`: how far the two kernels' results part after the append ending at 16K
  (16 test-time steps past the horizon): the largest difference of the logits and of theta.

The long states are built once with test-time steps (on one core: tens of minutes for 64K) and
kept as snapshots in `--cache` (derived data: delete it to rebuild).  Prints one JSON line;
timings are this machine's in this run: compare ratios within the run.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import torch  # noqa: E402
from recall import CORPUS, filler_paragraphs  # noqa: E402
from tqdm import tqdm  # noqa: E402

import model.attention as attention  # noqa: E402
import model.network as network  # noqa: E402
from memoryd.server import load_model  # noqa: E402
from memoryd.settings import load_settings  # noqa: E402
from model import StreamState, TTTModel  # noqa: E402
from model.snapshot import state_from_bytes, state_to_bytes  # noqa: E402
from model.tokenizer import load_tokenizer  # noqa: E402

PIECE = 1024
BEFORE = "8a9a3c2"
"""The last commit whose decode masked its keys and whose far_sinks doubled the head dim."""
FROZEN_READ = 400
"""Tokens a frozen copy reads: about what a recall generation puts before its prompt (~370 recalled)."""
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


def corpus_ids(tok, corpus: Path, n: int) -> list[int]:
    paras = filler_paragraphs(corpus)
    random.Random(0).shuffle(paras)
    ids = tok.encode(SYSTEM)
    for para in paras:
        ids += tok.encode(para + "\n\n")
        if len(ids) >= n:
            break
    if len(ids) < n:
        raise SystemExit(f"the corpus holds {len(ids)} tokens, fewer than {n}")
    return ids[:n]


def build_states(model: TTTModel, name: str, ids: list[int], marks: list[int], cache: Path) -> dict[int, StreamState]:
    """States that have read ids[:mark] for each mark, from snapshots in `cache` (built when missing)."""
    cache.mkdir(parents=True, exist_ok=True)
    path = {m: cache / f"{name}-{m}.snapshot" for m in marks}
    todo = sorted(m for m in marks if not path[m].exists())
    if todo:  # from the longest state already built below the first missing one
        done = [m for m in marks if m < todo[0] and path[m].exists()]
        state = state_from_bytes(model, path[max(done)].read_bytes()) if done else StreamState.fresh(model)
        pos = state.position
        with tqdm(total=max(marks), initial=pos, desc="building states", unit="tok", file=sys.stderr) as bar:
            for mark in todo:
                while pos < mark:
                    piece = ids[pos : min(pos + PIECE, mark)]
                    state.append(piece)
                    pos += len(piece)
                    bar.update(len(piece))
                path[mark].write_bytes(state_to_bytes(state))
    return {m: state_from_bytes(model, path[m].read_bytes()) for m in marks}


def load_before(ref: str) -> ModuleType:
    """model/attention.py at git ref `ref`, as a module of its own."""
    src = subprocess.run(["git", "show", f"{ref}:model/attention.py"], cwd=ROOT, check=True, capture_output=True)
    path = Path(tempfile.mkdtemp(prefix="attention-before-")) / "attention_before.py"
    path.write_bytes(src.stdout)
    spec = importlib.util.spec_from_file_location("attention_before", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class Kernel:
    """An attention module's `attend` swapped into model.network while in use, with the time spent
    inside it and inside its `window_mask` (the mask's share of it)."""

    def __init__(self, module: ModuleType) -> None:
        self.module, self.seconds, self.mask_seconds = module, 0.0, 0.0

    def _timed(self, fn: Callable, field: str) -> Callable:
        def run(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                setattr(self, field, getattr(self, field) + time.perf_counter() - t0)

        return run

    def __enter__(self) -> Kernel:
        self.seconds = self.mask_seconds = 0.0
        self.saved = (network.attend, self.module.window_mask)
        network.attend = self._timed(self.module.attend, "seconds")
        self.module.window_mask = self._timed(self.saved[1], "mask_seconds")
        return self

    def __exit__(self, *exc: object) -> None:
        network.attend, self.module.window_mask = self.saved


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def decode_turns(kernels: dict[str, Kernel], state: StreamState, tokens: int) -> dict[str, tuple[float, float]]:
    """Per kernel, (median ms/token, median ms/token inside `attend`) of greedy decode on its own
    clone of `state`, the kernels taking turns token by token (decode is ~100 ms a token here and
    attention a tenth of it: whole runs one after the other moved with the machine's load more
    than with the kernel).  Tokens that step are left out, as in bench/decode.py."""
    clones = {k: state.clone() for k in kernels}
    nxt = {k: int(s.logits().argmax()) for k, s in clones.items()}
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in kernels}
    for _ in range(tokens):
        for key, kernel in kernels.items():
            s = clones[key]
            with kernel:
                steps, t0 = s.steps, time.perf_counter()
                s.append([nxt[key]])
                nxt[key] = int(s.logits().argmax())
                dt = time.perf_counter() - t0
            if s.steps == steps:
                times[key].append((dt * 1000, kernel.seconds * 1000))
    return {k: tuple(statistics.median(x[i] for x in v) for i in (0, 1)) for k, v in times.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true")
    p.add_argument("--before", default=BEFORE, help="git ref of the `before` model/attention.py")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--decode", type=int, default=32, help="decoded tokens per decode measurement")
    p.add_argument("--long", type=int, default=65536, help="history of the long frozen read")
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "memoryd-attention-cost")
    p.add_argument("--corpus", type=Path, default=CORPUS)
    p.add_argument("--build-only", action="store_true", help="build the cached states and stop")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)

    model, path, name, _adapter = load_model(load_settings({}), "cpu")
    model.requires_grad_(False)
    tok = load_tokenizer(model.cfg, path)
    marks = [PIECE, 16 * PIECE - PIECE, 16 * PIECE, args.long]
    ids = corpus_ids(tok, args.corpus, args.long + FROZEN_READ)
    states = build_states(model, name, ids, marks, args.cache)
    if args.build_only:
        return 0
    read = ids[args.long : args.long + FROZEN_READ]
    kernels = {"before": Kernel(load_before(args.before)), "after": Kernel(attention)}
    samples: dict[str, dict[str, list[float]]] = {k: {} for k in kernels}

    def record(kernel: str, key: str, value: float) -> None:
        samples[kernel].setdefault(key, []).append(value)

    fresh = StreamState.fresh(model)
    appended: dict[str, StreamState] = {}
    work = args.rounds * len(kernels)
    for _ in tqdm(range(args.rounds), desc="rounds", file=sys.stderr, total=args.rounds, disable=work <= 2):
        frozen = states[marks[2]].frozen_copy()
        frozen.append(read)
        for label, start in (("decode_16K", states[marks[2]]), ("decode_16K_frozen_read_400", frozen)):
            for key, (ms, attend_ms) in decode_turns(kernels, start, args.decode).items():
                record(key, f"{label}_ms", ms)
                record(key, f"{label}_attend_ms", attend_ms)
        for key, kernel in kernels.items():
            with kernel:
                for label, start in (("1K", fresh), ("16K", states[marks[1]])):
                    s = start.clone()
                    piece = ids[s.position : s.position + PIECE]
                    record(key, f"append_tok_s_{label}", len(piece) / timed(lambda s=s, piece=piece: s.append(piece)))
                appended[key] = s
                for label, mark in (("1K", marks[0]), ("64K", marks[3])):
                    frozen = states[mark].frozen_copy()
                    kernel.seconds = kernel.mask_seconds = 0.0
                    dt = timed(lambda frozen=frozen: frozen.append(read))
                    record(key, f"frozen_read_ms_per_token_{label}", dt * 1000 / len(read))
                    record(key, f"frozen_read_attention_share_{label}", kernel.seconds / dt)
                    record(key, f"frozen_read_mask_share_{label}", kernel.mask_seconds / dt)
    result = {
        "model": name,
        "torch_threads": torch.get_num_threads(),
        "before": args.before,
        "rounds": args.rounds,
        **{k: {m: round(statistics.median(v), 3) for m, v in samples[k].items()} for k in kernels},
    }
    a, b = appended["before"], appended["after"]
    result["after_vs_before_at_16K"] = {  # how far the kernels' numbers part: one append past the horizon
        "logits_max_abs_diff": float((a.logits() - b.logits()).abs().max()),
        "theta_max_abs_diff": max(float((a.fast[n] - b.fast[n]).abs().max()) for n in a.fast),
    }
    result["after_over_before"] = {
        m: round(result["after"][m] / result["before"][m], 3) for m in result["after"] if "share" not in m
    }
    print(json.dumps(result) if args.json else json.dumps(result, indent=1), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
