"""The recall index on its own: spans, incremental = rebuilt, prefixes, BM25 scores."""

from __future__ import annotations

import itertools
import math
import random
import re
from collections import Counter

import pytest

from memoryd.sessions.recall import transfer
from memoryd.sessions.recall.index import K1, B, SpanIndex
from memoryd.sessions.recall.pages import Run, pack, unpack
from memoryd.sessions.recall.spans import Segmenter, Shape, windows
from memoryd.sessions.recall.words import words

TURN = 300  # a token id outside the bytes: opens every turn


def decode(ids: list[int]) -> str:
    return bytes(t for t in ids if t < 256).decode("utf-8", errors="replace")


def enc(text: str) -> list[int]:
    return list(text.encode())


def turn(role: str, text: str) -> list[int]:
    return [TURN, *enc(f"{role}\n{text}\n")]


def spans_of(tokens: list[int], shape: Shape, start: int = 0) -> list[tuple[int, int]]:
    """The spans of [start, start + len) by the definition: turns (cut at TURN), each windowed."""
    cuts = [start] + [start + i for i, t in enumerate(tokens) if t == shape.turn_start and i > 0]
    ends = [*cuts[1:], start + len(tokens)]
    return [w for a, b in zip(cuts, ends, strict=True) for w in windows(a, b, shape)]


def segment(pushes: list[tuple[int, list[int]]], shape: Shape) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    seg = Segmenter(shape, lambda s, e: out.append((s, e)))
    for start, toks in pushes:
        seg.push(start, toks)
    last = seg.open_span()
    return out + ([last] if last else [])


def chunked(tokens: list[int], rng: random.Random, start: int = 0) -> list[tuple[int, list[int]]]:
    out, i = [], 0
    while i < len(tokens):
        n = rng.choice([1, 2, 5, 17, 60, 200])
        out.append((start + i, tokens[i : i + n]))
        i += n
    return out


def random_log(rng: random.Random, n_turns: int) -> list[int]:
    toks: list[int] = []
    for _ in range(n_turns):
        n = rng.choice([3, 40, 95, 96, 97, 150, 400])
        toks += [TURN] + [rng.randrange(97, 123) for _ in range(n)]
    return toks


@pytest.mark.parametrize("shape", [Shape(TURN, 96, 24), Shape(TURN, 16, 0), Shape(None, 32, 8), Shape(TURN, 8, 7)])
def test_segmenter_streams_to_the_definition_for_every_prefix(shape: Shape) -> None:
    rng = random.Random(1)
    toks = random_log(rng, 12)
    for cut in [1, 2, 50, 96, 97, 121, len(toks) // 2, len(toks)]:
        prefix = toks[:cut]
        assert segment(chunked(prefix, rng), shape) == spans_of(prefix, shape)
        assert segment([(0, prefix)], shape) == spans_of(prefix, shape)


def test_windows_overlap_and_cover_a_long_turn() -> None:
    shape = Shape(None, 96, 24)
    ws = list(windows(0, 500, shape))
    assert ws[0] == (0, 96) and ws[1] == (72, 168) and ws[-1][1] == 500
    assert all(b[0] == a[0] + 72 and a[1] - b[0] == 24 for a, b in itertools.pairwise(ws[:-1]))
    assert list(windows(0, 96, shape)) == [(0, 96)]
    with pytest.raises(ValueError, match="overlap"):
        Shape(None, 8, 8)


def test_a_gap_starts_a_new_turn() -> None:
    shape = Shape(None, 10, 2)
    got = segment([(0, [97] * 12), (30, [98] * 5)], shape)
    assert got == [(0, 10), (8, 12), (30, 35)]


def build(tokens: list[int], shape: Shape, pushes: list[tuple[int, list[int]]] | None = None) -> SpanIndex:
    ix = SpanIndex(shape, decode)
    for start, toks in pushes or [(0, tokens)]:
        ix.extend(start, toks)
    return ix


FACTS = [
    ("tool", "The deploy of build 7731 to the Oslo cluster finished at 14:05 with code ZX-9921."),
    ("user", "My sister Margarethe moved to Valparaiso last spring."),
    ("assistant", "Noted: the invoice total was 4,812 euros, due on 12 March."),
]
FILLER = re.findall(
    r"\w+",
    "the agent listed the files in the repository and read the configuration again before running tests "
    "then it summarised the output and asked for the next step of the plan while the logs scrolled past",
)


def agent_log(rng: random.Random, n_turns: int) -> tuple[list[int], dict[str, int]]:
    toks, where = [], {}
    at = {n_turns // 3: 0, n_turns // 2: 1, n_turns - 2: 2}
    for i in range(n_turns):
        if i in at:
            role, text = FACTS[at[i]]
            where[text] = len(toks)
        else:
            role = rng.choice(["user", "assistant", "tool"])
            text = " ".join(rng.choices(FILLER, k=rng.randrange(5, 120)))
        toks += turn(role, text)
    return toks, where


def test_incremental_index_equals_rebuilt_index_exactly() -> None:
    rng = random.Random(7)
    toks, _ = agent_log(rng, 60)
    shape = Shape(TURN)
    one = build(toks, shape)
    many = build(toks, shape, chunked(toks, rng))
    for q in ["Oslo deploy code", "where does Margarethe live now", "invoice amount due date", "tests plan", "zzz"]:
        a, b = one.search(q, 8), many.search(q, 8)
        assert a == b  # same spans, bit-identical scores
    assert one.nbytes() == many.nbytes() and one.spans() == many.spans()


def test_recalls_a_fact_worded_differently() -> None:
    rng = random.Random(3)
    toks, where = agent_log(rng, 80)
    ix = build(toks, Shape(TURN))
    for q, fact in [
        ("Which code did the Oslo deployment end with?", FACTS[0][1]),
        ("In what city does Margarethe live?", FACTS[1][1]),
        ("How much was the invoice?", FACTS[2][1]),
    ]:
        hits = ix.search(q, 3)
        assert hits, q
        top = hits[0]
        assert top.start <= where[fact] < top.end, (q, ix.text(top))
        assert fact in ix.text(top)


def test_a_prefix_index_sees_only_its_prefix() -> None:
    rng = random.Random(5)
    toks, where = agent_log(rng, 80)
    x = where[FACTS[2][1]]  # the invoice fact starts at x: a prefix up to x has not seen it
    ix = build(toks[:x], Shape(TURN))
    assert all(h.end <= x for h in ix.search("invoice total euros", 8))
    assert not any("invoice" in ix.text(h) for h in ix.search("invoice total euros", 8))
    full = build(toks, Shape(TURN))
    assert any("invoice" in full.text(h) for h in full.search("invoice total euros", 8))


def test_scores_are_okapi_bm25() -> None:
    shape = Shape(TURN, 64, 8)
    docs = ["red apple pie", "green apple", "blue sky over the red barn barn", "apple apple apple tree"]
    toks = [t for d in docs for t in turn("user", d)]
    ix = build(toks, shape)
    spans = spans_of(toks, shape)
    tfs = [Counter(words(decode(toks[s:e]))) for s, e in spans]
    n, avgdl = len(tfs), sum(sum(c.values()) for c in tfs) / len(tfs)

    def bm25(q: str, c: Counter[str]) -> float:
        total = 0.0
        for t in sorted(set(words(q))):
            df = sum(1 for d in tfs if t in d)
            if not c[t]:
                continue
            idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
            total += idf * c[t] * (K1 + 1) / (c[t] + K1 * (1 - B + B * sum(c.values()) / avgdl))
        return total

    for q in ["apple", "red barn", "apple tree sky"]:
        want = sorted(((bm25(q, c), s) for c, s in zip(tfs, spans, strict=True) if bm25(q, c) > 0), key=lambda x: -x[0])
        got = ix.search(q, 10)
        assert [(h.start, h.end) for h in got] == [s for _, s in want]
        assert [h.score for h in got] == pytest.approx([sc for sc, _ in want], rel=1e-12)
    # the weights a recalled context ranks sentences by: the same idf, for the query's terms the log holds
    idf = {t: math.log(1 + (n - df + 0.5) / (df + 0.5)) for t in ("apple", "red") for df in [sum(t in d for d in tfs)]}
    assert ix.idf("Red apple, purple plum?") == pytest.approx(idf, rel=1e-12) and idf["red"] > idf["apple"]


def test_k_and_empty_queries() -> None:
    toks, _ = agent_log(random.Random(2), 30)
    ix = build(toks, Shape(TURN))
    assert len(ix.search("agent files repository", 5)) == 5
    assert len(ix.search("agent files repository", 1)) == 1
    assert ix.search("the what of", 5) == []  # stop words only
    assert SpanIndex(Shape(TURN), decode).search("anything", 3) == []


def test_ties_come_earlier_span_first() -> None:
    toks = [t for _ in range(5) for t in turn("user", "same words here")]
    hits = build(toks, Shape(TURN)).search("words", 3)
    assert [h.start for h in hits] == sorted(h.start for h in hits) and len({h.score for h in hits}) == 1


def test_pack_round_trips() -> None:
    ids = [0, 1, 255, 49151, 2**32 - 1]
    assert unpack(pack(ids)) == ids and len(pack(ids)) == 4 * len(ids)


def test_recall_log_bytes_round_trip_and_refuse_what_is_not_one() -> None:
    runs = [Run(0, [1, 2, 3]), Run(10, [4]), Run(11, [5, 6])]
    data = transfer.encode(runs)
    assert transfer.decode(data, 13, 7) == runs
    assert transfer.decode(transfer.encode([]), 0, 7) == []
    for bad, why, offset, vocab in [
        (data, "outside the vocabulary", 13, 6),
        (data, "past the state's offset", 12, 7),
        (data[:-1], "bytes follow", 13, 7),
        (data + b"\0", "run header", 13, 7),
        (b"x" + data, "does not start with", 13, 7),
        (transfer.encode([Run(5, [1, 2]), Run(6, [3])]), "overlaps", 13, 7),
    ]:
        with pytest.raises(transfer.BadRecallLog, match=why):
            transfer.decode(bad, offset, vocab)


@pytest.mark.parametrize("shape", [Shape(TURN, 96, 24), Shape(TURN, 16, 4), Shape(None, 32, 8)])
def test_a_prefix_of_an_index_equals_the_index_of_the_prefix(shape: Shape) -> None:
    rng = random.Random(11)
    toks, _ = agent_log(rng, 40)
    full = build(toks, shape, chunked(toks, rng))
    turn_starts = [i for i, t in enumerate(toks) if t == TURN]
    cuts = {0, 1, 2, len(toks), *turn_starts[:6], *[t + 1 for t in turn_starts[:6]], *rng.sample(range(len(toks)), 40)}
    for x in sorted(cuts):
        got, want = full.prefix(x), build(toks[:x], shape)
        assert got is not None
        assert (got.end, got.spans(), got.nbytes()) == (want.end, want.spans(), want.nbytes()), x
        for q in ["Oslo deploy code", "Margarethe", "invoice euros", "tests plan agent"]:
            assert got.search(q, 8) == want.search(q, 8), (x, q)
        more = toks[x : x + 150]  # and it grows as the index of the longer prefix does
        got.extend(x, more)
        want.extend(x, more)
        assert got.search("agent files Oslo", 8) == want.search("agent files Oslo", 8), x
    gapped = build(toks, shape, [(0, toks[:50]), (80, toks[80:200])])
    assert gapped.prefix(100) is None


CHATML = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_chat_turns_are_spans_with_a_real_tokenizer_and_template(tmp_path) -> None:
    """The turn-start token is found from the template's generation prompt; every turn is a span."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    from memoryd.sessions.chat import ChatFormat, Message
    from memoryd.sessions.recall.indexes import turn_start
    from model.tokenizer import HFTokenizer

    msgs = [Message("user", "the vault code is QX 7731"), Message("tool", "ran tests all passed")]
    msgs += [
        Message("assistant", "noted the code for the vault"),
        Message("user", "Valparaiso is where Margarethe lives"),
    ]
    text_words = {w for m in msgs for w in (m.role + " " + m.content).split()}
    raw = Tokenizer(models.WordLevel({"[UNK]": 0} | {w: i + 1 for i, w in enumerate(sorted(text_words))}, "[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    raw.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    raw.save(str(tmp_path / "tokenizer.json"))
    tok = HFTokenizer(tmp_path / "tokenizer.json", 1, 2)
    chat = ChatFormat(CHATML, specials=["<|im_start|>", "<|im_end|>"])
    assert chat.problem is None
    ts = turn_start(tok, chat)
    assert ts is not None and tok.decode([ts]) == "<|im_start|>"
    ids: list[int] = []
    starts = []
    for i, m in enumerate(msgs):
        starts.append(len(ids))
        ids += tok.encode(chat.render([m], start=i == 0))
    ix = SpanIndex(Shape(ts), tok.decode)
    ix.extend(0, ids)
    hits = ix.search("Where does Margarethe live?", 4)
    assert hits[0].start == starts[3] and hits[0].end == len(ids)
    assert {(h.start, h.end) for h in ix.search("vault code", 4)} == {(starts[0], starts[1]), (starts[2], starts[3])}
    assert turn_start(tok, None) is None
