"""Recall benchmark (issue 19): facts stated once deep in an agent's session, asked for at the end.

    python bench/recall.py --json [--depths 2048,8192,32768,65536] [--k 8] [--facts 10]

Through a real daemon (the default model, SmolLM2-135M converted; embedded-style redis-server
with AOF) and the SDK only.  One session is built for the whole depth set: an agent's
working log of chat turns (tool outputs quoting the Python documentation, observations,
user messages, short assistant notes), `max(depths)` tokens and a little more.  For each
depth d, `--facts` facts of five kinds (numbers, names, codes, dates, places), each a
different subject, are stated once, one turn each, so that they sit about d tokens before
the end of the session.  At the end each fact is asked for with a question worded
differently from the fact (no generation is committed: every question sees the same
session), three ways:

- `answered_recall_on`: `reply(question)` with recall (the SDK's default for chat);
- `answered_recall_off`: the same with `recall=False` (memoryd before recall);
- `answered_oracle`: recall off, the fact's own turn placed right before the question
  (the reader's ceiling: what this small model answers when the fact is in front of it).

A reply counts as answered when it contains the fact's value (case-insensitive, as a whole
word; a person by their surname; a date by its day and month in either order, "25th of
July").  `hit_rate`: the share of facts whose turn is among the `k` spans
`Session.recall(question, k)` returns (a span overlapping the turn's offsets; the query is
the question as the reply's recall searches for it).  `ttft_ms_*`: time to the first
streamed message of the reply (the retrieval and the recalled context's prefill are in it);
`ttft_ms_oracle`, the oracle's: the fact's turn is read before the question, which is the least
any recall that puts the fact in front of the reader must read (without recall, so with
test-time steps: a step falls in it where the two cross a mini-batch boundary);
`prompt_tokens_mean`: the question's tokens as the reply reads them (its template included);
`decode_ms_per_token_*`: the gaps between later tokens, side by side; `recall_p95_ms`: the
`Session.recall` calls' p95 (client-side, gRPC included).  `--phases N` adds one line,
`ttft_by_phase`: N more questions, each after one more observation turn, so that they fall at
different points of the session's mini-batch, split by whether the prompt completes one (then a
reply without recall waits for a test-time step first; see `ttft_by_phase`).  One JSON line per depth
(`--json`); it measures and prints, it asserts nothing.  Building a 64K-token session on a
2-core CPU takes 10+ minutes (tqdm shows it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "sdk", ROOT / "bench"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from harness import pct, start_daemon, start_redis, stop_all  # noqa: E402
from memoryd_sdk import AsyncMemoryClient, AsyncSession, RecallOptions  # noqa: E402
from tqdm import tqdm  # noqa: E402

from memoryd.sessions.recall_prompt import question_part  # noqa: E402
from memoryd.settings import default_data_dir  # noqa: E402
from model.state import counts_at  # noqa: E402

CORPUS = ROOT / "data" / "corpora" / "python-doc" / "_sources"
"""Filler: Debian's python3.11-doc reST (scripts/memory_corpora.sh installs it offline)."""
MAX_TOKENS = 24
"""Reply length: every answer here is a few words (the model says them in its first tokens)."""
HEAD_TOKENS = 400
"""Filler before the deepest facts, so that even they are not at the very start of the session."""
SUFFIX = " Answer in a few words."

SUBJECTS = (
    "Aurora", "Bluefin", "Cedar", "Dynamo", "Ember", "Falcon", "Granite", "Harbor", "Ivy", "Juniper", "Kestrel",
    "Lumen", "Meridian", "Nimbus", "Orchid", "Pioneer", "Quill", "Raven", "Sierra", "Tundra", "Umber", "Vesper",
    "Willow", "Xenon", "Yarrow", "Zephyr", "Atlas", "Beacon", "Cobalt", "Delta", "Echo", "Fjord", "Garnet",
    "Helix", "Indigo", "Jasper", "Krypton", "Lotus", "Mistral", "Nova", "Onyx", "Polaris", "Quartz", "Redwood",
    "Saffron", "Tamarack", "Ultramarine", "Vortex", "Wren", "Yucca", "Zircon", "Alder", "Basalt", "Cirrus", "Dune",
    "Eider", "Fennel", "Gale", "Heron", "Iris", "Jetty", "Kelp", "Larch", "Magma", "Nectar", "Obsidian", "Pumice",
    "Quasar", "Rook", "Sable", "Thistle", "Upland", "Vireo", "Walnut", "Yew", "Argon", "Bramble", "Coral", "Drift",
    "Ermine",
)  # fmt: skip
"""80 subjects, one per fact: 20 facts at each of the 4 default depths."""
NAMES = (
    "Priya Raman", "Tomasz Kowalczyk", "Amara Okafor", "Lucia Ferreira", "Kenji Watanabe", "Ingrid Solberg",
    "Mateo Alvarez", "Fatima Haddad", "Oskar Lindqvist", "Nadia Petrova", "Ravi Chandran", "Elena Moretti",
)  # fmt: skip
PLACES = (
    "Reykjavik", "Valparaiso", "Tromso", "Marrakesh", "Ljubljana", "Hobart", "Cusco", "Tallinn", "Zanzibar",
    "Kyoto", "Antwerp", "Galway", "Bergen", "Asuncion", "Windhoek", "Tbilisi",
)  # fmt: skip
MONTHS = (
    "January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November",
    "December",
)  # fmt: skip


@dataclass
class Fact:
    kind: str
    role: str
    statement: str
    question: str
    answer: str
    accept: tuple[str, ...]
    """Regular expressions any one of which found in the lower-cased reply counts as the answer."""
    depth: int = 0
    """Nominal depth (the --depths entry it belongs to)."""
    start: int = 0
    end: int = 0
    """The fact's turn in the log: [start, end)."""


def make_fact(kind: str, subject: str, rng: random.Random) -> Fact:
    """One fact of `kind` about `subject`, stated as an agent's log would state it, and a question in other words."""
    if kind == "number":
        n = rng.randint(120, 9800)
        return Fact(
            kind,
            "tool",
            f"migration_planner output: the {subject} migration must copy exactly {n} records per shard.",
            f"How many records per shard does the {subject} migration need to move?",
            str(n),
            (rf"\b{n}\b", rf"\b{n:,}\b"),
        )
    if kind == "name":
        name = rng.choice(NAMES)
        return Fact(
            kind,
            "user",
            f"By the way, the {subject} budget was approved by {name} this morning.",
            f"Who signed off on the money for {subject}?",
            name,
            (rf"\b{name.split()[-1].lower()}\b",),
        )
    if kind == "code":
        code = f"{rng.choice('BCDFGHJKLMNPQRSTVWXZ')}{rng.choice('AEIOU')}{rng.randint(2, 9)}-{rng.randint(100, 999)}"
        return Fact(
            kind,
            "tool",
            f"vault.read('{subject.lower()}-sandbox'): access key = {code}",
            f"What is the secret for getting into the {subject} sandbox?",
            code,
            (re.escape(code.lower()),),
        )
    if kind == "date":
        day, month = rng.randint(2, 28), rng.choice(MONTHS)
        return Fact(
            kind,
            "user",
            f"Heads up: the {subject} release is now scheduled for {day} {month}.",
            f"On what day will {subject} ship?",
            f"{day} {month}",
            (rf"\b{day}(st|nd|rd|th)?( of)? {month.lower()}\b", rf"\b{month.lower()} {day}(st|nd|rd|th)?\b"),
        )
    place = rng.choice(PLACES)
    return Fact(
        kind,
        "assistant",
        f"Observation: the spare {subject} servers are kept in the {place} warehouse.",
        f"In which city is the backup hardware for {subject} stored?",
        place,
        (rf"\b{place.lower()}\b",),
    )


def facts_for(depths: Sequence[int], n: int, seed: int) -> list[Fact]:
    rng = random.Random(seed)
    kinds = ("number", "name", "code", "date", "place")
    subjects = list(SUBJECTS)
    rng.shuffle(subjects)
    if n * len(depths) > len(subjects):
        raise SystemExit(f"--facts {n} x {len(depths)} depths needs more than {len(subjects)} subjects")
    out = []
    for d in depths:
        for i in range(n):
            f = make_fact(kinds[i % len(kinds)], subjects.pop(), rng)
            f.depth = d
            out.append(f)
    return out


def answered(reply: str, fact: Fact) -> bool:
    text = re.sub(r"\s+", " ", reply.lower())
    return any(re.search(a, text) for a in fact.accept)


def filler_paragraphs(corpus: Path) -> list[str]:
    """Prose paragraphs of the Python docs, in a fixed order."""
    files = sorted(corpus.rglob("*.txt"))
    if not files:
        raise SystemExit(f"no filler corpus at {corpus}: run scripts/memory_corpora.sh first")
    out = []
    for f in files:
        for para in f.read_text(errors="replace").split("\n\n"):
            text = " ".join(para.split())
            if len(text) > 200 and not para.lstrip().startswith((".", "*", "=", "-", ":", "|")):
                out.append(text)
    return out


class Filler:
    """Agent turns without facts: tool outputs quoting documentation, observations, user asides."""

    def __init__(self, paragraphs: list[str], seed: int) -> None:
        self.paras, self.i, self.rng = paragraphs, 0, random.Random(seed)

    def paragraph(self) -> str:
        p = self.paras[self.i % len(self.paras)]
        self.i += 1
        return p

    def turn(self) -> tuple[str, str]:
        r = self.rng.random()
        if r < 0.55:
            return "tool", f"read_docs(page={self.i}) returned:\n{self.paragraph()}\n{self.paragraph()}"
        if r < 0.8:
            return "assistant", f"Observation: {self.paragraph()}"
        return "user", f"Some background for the task: {self.paragraph()}"


@dataclass
class Built:
    session: AsyncSession
    end: int
    facts: list[Fact] = field(default_factory=list)


async def build(client: AsyncMemoryClient, facts: list[Fact], depths: Sequence[int], filler: Filler) -> Built:
    """One session of about HEAD_TOKENS + max(depths) tokens; each depth's facts start about d tokens before its end.

    The length of a turn is only known once appended, so the end is planned as HEAD_TOKENS +
    max(depths) and each depth's facts go in once the offset reaches end - d."""
    s = await client.create_session(metadata={"bench": "recall"})
    await s.add_message("system", "You are an agent's assistant. Keep track of the facts in this log.")
    end = HEAD_TOKENS + max(depths)
    todo = sorted(facts, key=lambda f: -f.depth)
    bar = tqdm(total=end, desc="building the session", unit="tok", file=sys.stderr)
    offset = s.offset or 0
    while offset < end or todo:
        if todo and offset >= end - todo[0].depth:
            f = todo.pop(0)
            res = await s.add_message(f.role, f.statement)
            f.start, f.end = res.start_offset, res.offset
        else:
            res = await s.add_message(*filler.turn())
        bar.update(res.offset - offset)
        offset = res.offset
    bar.close()
    return Built(s, offset, facts)


@dataclass
class Timed:
    text: str
    ttft_ms: float
    decode_ms: list[float]
    recalled_tokens: int
    prompt_tokens: int = 0


async def ask(s: AsyncSession, messages: list[tuple[str, str]], recall: bool | RecallOptions) -> Timed:
    """One uncommitted chat reply, streamed: its text, time to first message, gaps between later tokens."""
    t0 = time.perf_counter()
    stream = await s.reply_stream(messages, max_tokens=MAX_TOKENS, recall=recall, commit=False)
    first, last, gaps, text, recalled, prompt = None, None, [], "", 0, 0
    async for chunk in stream.chunks():
        now = time.perf_counter()
        if first is None:
            first = now
        elif chunk.tokens and last is not None:
            gaps.append((now - last) * 1000 / len(chunk.tokens))
        if chunk.tokens:
            last = now
        text += chunk.text
        if chunk.done:
            recalled, prompt = chunk.recalled_tokens, chunk.prompt_tokens
    return Timed(text, ((first or time.perf_counter()) - t0) * 1000, gaps, recalled, prompt)


def mean(xs: list[float]) -> float:
    return round(statistics.fmean(xs), 2) if xs else 0.0


async def measure(address: str, args: argparse.Namespace, depths: list[int]) -> list[dict]:
    facts = facts_for(depths, args.facts, args.seed)
    async with AsyncMemoryClient(address, timeout=600, generate_timeout=1800) as client:
        info = await client.model_info()
        paragraphs = filler_paragraphs(args.corpus)
        built = await build(client, facts, depths, Filler(paragraphs, args.seed))
        s = built.session
        opts = RecallOptions(k=args.k, budget_tokens=args.budget)
        lines = []
        for d in args.ask_depths or depths:
            rows = [f for f in built.facts if f.depth == d]
            hits, on, off, oracle, recall_ms = 0, 0, 0, 0, []
            ttft_on, ttft_off, ttft_or, dec_on, dec_off, ctx, prompt = [], [], [], [], [], [], []
            rank: list[int] = []  # where the fact's span ranked (k + 1: not in the top k)
            other: dict[int, list[tuple[bool, float, int]]] = {b: [] for b in args.also_budgets}
            for f in tqdm(rows, desc=f"depth {d}", file=sys.stderr):
                q = f.question + SUFFIX
                t0 = time.perf_counter()
                spans = await s.recall(question_part(q), k=args.k)  # the query a reply with recall searches for
                recall_ms.append((time.perf_counter() - t0) * 1000)
                found = [i for i, sp in enumerate(spans) if sp.start_offset < f.end and f.start < sp.end_offset]
                hits += bool(found)
                rank.append(found[0] + 1 if found else args.k + 1)
                r_on = await ask(s, [("user", q)], opts)
                r_off = await ask(s, [("user", q)], False)
                r_or = await ask(s, [(f.role, f.statement), ("user", q)], False)
                on, off, oracle = (
                    on + answered(r_on.text, f),
                    off + answered(r_off.text, f),
                    oracle + answered(r_or.text, f),
                )
                ttft_on.append(r_on.ttft_ms)
                ttft_off.append(r_off.ttft_ms)
                ttft_or.append(r_or.ttft_ms)
                prompt.append(r_off.prompt_tokens)
                dec_on += r_on.decode_ms
                dec_off += r_off.decode_ms
                ctx.append(r_on.recalled_tokens)
                for b in args.also_budgets:  # the same question under a smaller (or larger) recall budget
                    r_b = await ask(s, [("user", q)], RecallOptions(k=args.k, budget_tokens=b))
                    other[b].append((answered(r_b.text, f), r_b.ttft_ms, r_b.recalled_tokens))
                if args.verbose:
                    print(json.dumps({"fact": f.statement, "on": r_on.text, "off": r_off.text, "oracle": r_or.text,
                                      "rank": rank[-1], "recalled_tokens": r_on.recalled_tokens}),
                          file=sys.stderr)  # fmt: skip
            n = len(rows)
            lines.append(
                {
                    "model": info.name,
                    "k": args.k,
                    "depths": {
                        str(d): {
                            "facts": n,
                            "hit_rate": round(hits / n, 3),
                            "answered_recall_on": round(on / n, 3),
                            "answered_recall_off": round(off / n, 3),
                            "answered_oracle": round(oracle / n, 3),
                            "ttft_ms_recall_on": round(statistics.median(ttft_on), 1),
                            "ttft_ms_recall_off": round(statistics.median(ttft_off), 1),
                            "ttft_ms_oracle": round(statistics.median(ttft_or), 1),
                            "decode_ms_per_token_recall_on": mean(dec_on),
                            "decode_ms_per_token_recall_off": mean(dec_off),
                            "recall_p95_ms": round(pct(recall_ms, 0.95), 2),
                            "recall_p50_ms": round(pct(recall_ms, 0.5), 2),
                            "recalled_tokens_mean": mean([float(c) for c in ctx]),
                            "prompt_tokens_mean": mean([float(c) for c in prompt]),
                            "depth_tokens_mean": round(statistics.fmean(built.end - f.start for f in rows)),
                            "session_tokens": built.end,
                            "hit_rate_at": {str(j): round(sum(r <= j for r in rank) / n, 3) for j in (1, 2, 4)},
                            **{
                                f"budget_{b}": {
                                    "answered_recall_on": round(sum(a for a, _, _ in rows_b) / n, 3),
                                    "ttft_ms_recall_on": round(statistics.median(t for _, t, _ in rows_b), 1),
                                    "recalled_tokens_mean": mean([float(c) for _, _, c in rows_b]),
                                }
                                for b, rows_b in other.items()
                            },
                        }
                    },
                }
            )
            print(json.dumps(lines[-1]) if args.json else lines[-1], flush=True)
        if args.phases:
            asked = [f for f in built.facts if f.depth == max(args.ask_depths or depths)]
            filler = Filler(paragraphs, args.seed + 1)
            line = await ttft_by_phase(s, asked, opts, args.phases, info.mini_batch_size, filler)
            print(json.dumps(line) if args.json else line, flush=True)
        await s.delete()
    return lines


def steps_taken(offset: int, tokens: int, mini_batch: int) -> int:
    """Test-time steps a session at `offset` takes when it reads `tokens` more (`model.state.counts_at`)."""
    return counts_at(offset + tokens, mini_batch)[0] - counts_at(offset, mini_batch)[0]


async def ttft_by_phase(
    s: AsyncSession, facts: list[Fact], opts: RecallOptions, phases: int, mini_batch: int, filler: Filler
) -> dict:
    """Time to first token where the session's questions fall in its mini-batch, recall on and off.

    Without recall a reply reads its prompt with test-time steps: a prompt that completes the
    session's pending mini-batch waits for the step before its first token. With recall the prompt
    is read forward only after the recalled context (`Sessions.generate`; the commit steps it after
    the reply). So the two compare differently by phase: `no_step` is where the prompt completes no
    mini-batch (recall's cost alone), `step` where it completes one. Before each question one more
    observation turn moves the session to another phase; a question's `stepped` is computed from the
    session's offset and the prompt's length. Measured after the depth passes (it grows the session)."""
    rows: list[tuple[bool, float, float]] = []
    for i in tqdm(range(phases), desc="phases", file=sys.stderr):
        res = await s.add_message("assistant", f"Observation: {filler.paragraph()}")  # 40-400 tokens
        q = facts[i % len(facts)].question + SUFFIX
        r_on = await ask(s, [("user", q)], opts)
        r_off = await ask(s, [("user", q)], False)
        rows.append((steps_taken(res.offset, r_off.prompt_tokens, mini_batch) > 0, r_on.ttft_ms, r_off.ttft_ms))

    def side(sel: list[tuple[bool, float, float]]) -> dict:
        """Medians, and means: over every phase the rare long wait (a step) is what the mean shows."""
        if not sel:
            return {"questions": 0}
        out: dict[str, float] = {"questions": len(sel)}
        for name, f in (("median", statistics.median), ("mean", statistics.fmean)):
            on, off = f(r[1] for r in sel), f(r[2] for r in sel)
            out |= {f"ttft_ms_recall_on_{name}": round(on, 1), f"ttft_ms_recall_off_{name}": round(off, 1)}
            out[f"on_over_off_{name}"] = round(on / off, 2)
        return out

    return {
        "ttft_by_phase": {
            "mini_batch": mini_batch,
            "all": side(rows),
            "no_step": side([r for r in rows if not r[0]]),
            "step": side([r for r in rows if r[0]]),
        }
    }


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", action="store_true", help="one JSON line per depth")
    ap.add_argument("--depths", default="2048,8192,32768,65536", help="tokens between a fact and its question")
    ap.add_argument("--k", type=int, default=8, help="spans recalled (and the hit rate's k)")
    ap.add_argument("--budget", type=int, default=0, help="recall budget in tokens (0: the server's default, 512)")
    ap.add_argument(
        "--also-budgets",
        type=lambda v: [int(x) for x in v.split(",") if x.strip()],
        default=[],
        help="more budgets asked side by side (e.g. 128,256): answered share and TTFT under each",
    )
    ap.add_argument("--facts", type=int, default=10, help="facts per depth (five kinds in turn)")
    ap.add_argument(
        "--ask-depths",
        type=lambda v: [int(x) for x in v.split(",") if x.strip()],
        default=[],
        help="ask only the facts of these depths (the others stay in the session as distractors)",
    )
    ap.add_argument(
        "--phases",
        type=int,
        default=0,
        help="after the depths, this many questions at other phases of the session's mini-batch: time to first "
        "token with and without recall where the question completes a mini-batch and where it does not",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--corpus", type=Path, default=CORPUS)
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--verbose", action="store_true", help="every reply on stderr")
    args = ap.parse_args(argv)
    depths = sorted({int(x) for x in args.depths.split(",") if x.strip()})
    work = Path(tempfile.mkdtemp(prefix="memoryd-recall-bench-"))
    daemon = redis_proc = None
    try:
        redis_proc, port = start_redis(work)
        daemon, address = start_daemon(work, None, port, args.torch_threads, data_dir=default_data_dir())
        asyncio.run(measure(address, args, depths))
    finally:
        stop_all(daemon, redis_proc, work)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
