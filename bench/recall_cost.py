"""What the recall index costs a session and how fast Recall answers, through the daemon's own Sessions.

    python bench/recall_cost.py --json [--tokens 4096] [--long-tokens 65536] [--questions 40]

In one process, on the default model (one torch thread) and a real redis-server (AOF, fsync
always), two sessions get the same agent-like messages (bench/recall_facts.py), one append per
message, alternately: session A with the recall index kept up to date (a Recall is made first,
so its index is in memory and every commit grows it), session B with the recall hooks off
(the baseline: what an append cost before recall existed). Side by side in one run, so the
ratio of their append throughputs is what indexing costs; the time spent in A's recall hook
(copy to Redis + index update) is also summed, a less noisy view of the same cost. Then, on A:
`Sessions.recall` latency (k=8, index in memory, after background snapshots settled) and the
hit rate through Sessions.

The default model appends some tens of tokens a second on one shared CPU core here, so a
64K-token session through the model is out of reach of a benchmark; recall itself does not
involve the model, so the long session (`--long-tokens`) is written through the recall hooks
only (`RecallIndexes.loaded`/`appended`, the calls a commit makes), with the same tokenizer and
messages, and measured there: Redis copy time per append, the cold rebuild of its index from
Redis (what a restart or another daemon pays on the first Recall), Recall latency p50/p95 and
hit rate, and the recall log's Redis bytes (MEMORY USAGE of its keys) per 1,000 tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench"), str(ROOT / "sdk")]

import torch  # noqa: E402
from harness import start_redis  # noqa: E402
from recall_facts import KINDS, corpus_lines, fact_message, filler_message, make_fact  # noqa: E402
from tqdm import tqdm  # noqa: E402

from memoryd.engine.core import Engine  # noqa: E402
from memoryd.engine.scheduler import Budget  # noqa: E402
from memoryd.server import load_model  # noqa: E402
from memoryd.sessions.calls import Sessions  # noqa: E402
from memoryd.sessions.chat import Message, chat_format_for  # noqa: E402
from memoryd.sessions.recall.indexes import RecallIndexes  # noqa: E402
from memoryd.settings import Settings, default_data_dir  # noqa: E402
from memoryd.store import heads  # noqa: E402
from memoryd.store.db import Store  # noqa: E402
from memoryd.store.heads import Head  # noqa: E402
from memoryd.store.redis_client import connect  # noqa: E402
from model.tokenizer import load_tokenizer  # noqa: E402


class Timed(RecallIndexes):
    """The real hooks, with the time spent in `appended` summed."""

    spent = 0.0

    async def appended(self, key: tuple[str, str], gen: int, start: int, pieces: list[list[int]]) -> bool:
        t0 = time.perf_counter()
        try:
            return await super().appended(key, gen, start, pieces)
        finally:
            self.spent += time.perf_counter() - t0


class NoRecall(RecallIndexes):
    """The baseline: the recall hooks do nothing (as before recall existed)."""

    def __init__(self) -> None:
        pass

    async def loaded(self, key: tuple[str, str], head: Head, pieces: list[list[int]]) -> None:
        return None

    async def appended(self, key: tuple[str, str], gen: int, start: int, pieces: list[list[int]]) -> bool:
        return True


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


async def run(a: argparse.Namespace, url: str) -> dict:
    torch.set_num_threads(1)
    s = Settings(data_dir=a.data_dir, metrics_port=0, instance_id="bench-recall")
    model, ckpt, name, _ = load_model(s, "cpu")
    tok = load_tokenizer(model.cfg, ckpt)
    chat = chat_format_for(model.cfg, ckpt, tok)
    assert chat is not None
    store = Store(connect(url, 30.0), ttl_seconds=s.ttl_seconds)
    sess = Sessions(Engine(model, Budget(tokens=s.tick_tokens, rows=s.batch_sessions)), tok, store, s, chat)
    real = sess.recalls
    on, off = Timed(real.pages, real.decode, real.shape), NoRecall()
    A, B = ("bench", "a"), ("bench", "b")
    for key in (A, B):
        await sess.create(*key, {})
    rng, corpus = random.Random(a.seed), corpus_lines()
    facts, pos = [], 0
    times = {"a": 0.0, "b": 0.0}
    bar = tqdm(total=a.tokens, disable=a.json, desc="appending (A and B)")
    next_fact = min(600, a.tokens // 4)
    primed = False
    while pos < a.tokens:
        if pos >= next_fact:
            fact = make_fact(rng, KINDS[len(facts) % len(KINDS)])
            facts.append(fact)
            role, content = fact_message(rng, fact, corpus)
            next_fact += max(1, a.tokens // a.questions)
        else:
            role, content = filler_message(rng, corpus)
        ids = tok.encode(chat.render([Message(role, content)], start=pos == 0))
        for key, label, rec in ((A, "a", on), (B, "b", off)):
            sess.recalls = rec
            t0 = time.perf_counter()
            await sess.append(*key, ids, None, "")
            times[label] += time.perf_counter() - t0
        sess.recalls = on
        if not primed:  # A's index in memory from the start: every later commit grows it
            await sess.recall(A, "warm up", 1)
            primed = True
        pos += len(ids)
        bar.update(len(ids))
    bar.close()
    sess.recalls = on
    while sess._bg:  # background snapshots hold the session's lock: let them finish first
        await asyncio.gather(*list(sess._bg), return_exceptions=True)
    lat, hits = [], 0
    for _ in range(3):
        for f in facts:
            t0 = time.perf_counter()
            spans = await sess.recall(A, f.question, 8)
            lat.append((time.perf_counter() - t0) * 1000)
            hits += any(f.statement in sp.text for sp in spans)
    out = {
        "model": name,
        "tokens": pos,
        "facts": len(facts),
        "append_tokens_per_s_recall_on": round(pos / times["a"], 2),
        "append_tokens_per_s_recall_off": round(pos / times["b"], 2),
        "append_throughput_ratio": round(times["b"] / times["a"], 4),
        "recall_hook_share_of_append_time": round(on.spent / times["a"], 5),
        "sessions_recall_ms_p50": round(statistics.median(lat), 2),
        "sessions_recall_ms_p95": round(pct(lat, 0.95), 2),
        "sessions_hit_rate_at_8": round(hits / (3 * len(facts)), 3),
    }
    await sess.engine.close()
    out["long"] = await long_session(a, store, real, tok, chat)
    await store.r.aclose()
    return out


async def long_session(a: argparse.Namespace, store: Store, real: RecallIndexes, tok: Any, chat: Any) -> dict:
    """A `--long-tokens` session written through the recall hooks alone (see the module doc)."""
    rx = RecallIndexes(real.pages, real.decode, real.shape)
    key = ("bench", "long")
    await heads.create(store, *key, {}, "bench")
    head = await heads.read(store, *key)
    assert head is not None
    await rx.loaded(key, head, [])
    rng, corpus = random.Random(a.seed + 1), corpus_lines()
    facts, pos, copy_s, appends = [], 0, 0.0, 0
    next_fact = 600
    bar = tqdm(total=a.long_tokens, disable=a.json, desc="long session (recall hooks only)")
    while pos < a.long_tokens:
        if pos >= next_fact:
            fact = make_fact(rng, KINDS[len(facts) % len(KINDS)])
            facts.append(fact)
            role, content = fact_message(rng, fact, corpus)
            next_fact += a.long_tokens // a.questions
        else:
            role, content = filler_message(rng, corpus)
        ids = tok.encode(chat.render([Message(role, content)], start=pos == 0))
        t0 = time.perf_counter()
        assert await rx.appended(key, head.gen, pos, [ids])
        copy_s += time.perf_counter() - t0
        appends += 1
        pos += len(ids)
        bar.update(len(ids))
    bar.close()
    t0 = time.perf_counter()
    await rx.index(key, head.gen, pos)
    cold = (time.perf_counter() - t0) * 1000
    lat, hits = [], 0
    for _ in range(3):
        for f in facts:
            t0 = time.perf_counter()
            spans = (await rx.recall(key, head.gen, pos, f.question, 8)).spans
            lat.append((time.perf_counter() - t0) * 1000)
            hits += any(f.statement in sp.text for sp in spans)
    keys = [k async for k in store.r.scan_iter("md:rx:{bench}:*")]
    tip = [k for k in keys if b":long" in k or b":p:" in k]
    rx_bytes = sum([await store.r.memory_usage(k) or 0 for k in tip])
    return {
        "tokens": pos,
        "facts": len(facts),
        "copy_ms_per_append": round(1000 * copy_s / appends, 3),
        "cold_rebuild_ms": round(cold, 1),
        "recall_ms_p50": round(statistics.median(lat), 3),
        "recall_ms_p95": round(pct(lat, 0.95), 3),
        "hit_rate_at_8": round(hits / (3 * len(facts)), 3),
        "redis_bytes_per_1k_tokens": round(1000 * rx_bytes / pos),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4096, help="tokens appended to each of A and B through the model")
    ap.add_argument("--long-tokens", type=int, default=65536)
    ap.add_argument("--questions", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data-dir", type=Path, default=default_data_dir())
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        proc, port = start_redis(Path(tmp))
        try:
            out = asyncio.run(run(a, f"redis://127.0.0.1:{port}/0"))
        finally:
            proc.terminate()
            proc.wait(10)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
