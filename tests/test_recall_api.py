"""Recall at the API edge (issue 19): the Recall rpc, the SDK's `session.recall`, the CLI, and recall in
generation, through a real daemon, a real redis-server and the real SDK.

The daemon serves the tiny preset with a plain Jinja chat template and a 256-token window
(byte tokenizer: text length is token count), so a fact pushed 500 bytes back is out of the
window and recalled context of a few hundred tokens fits in it."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from memoryd_sdk import AsyncMemoryClient, MemoryClient, NotFound, RecallOptions, Session
from memoryd_sdk.proto import memoryd_pb2 as pb
from memoryd_sdk.types import FinishReason

pytest.register_assert_rewrite("sdk_fixtures")
from sdk_fixtures import TOKENS, auth_daemon  # noqa: E402
from service_fixtures import (  # noqa: E402
    Daemon,
    assert_same_state,
    auth_md,
    child_env,
    export_bytes,
    reference_state,
    state_tensors,
)

PLAIN = (
    "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
WINDOW = 256
FACT = "The storage room door code is 4417."
QUESTION = "What do I type at the storage room door?"
FILLER = [
    "Weather report for the week: light rain on Monday, sun from Wednesday, wind from the west at night.",
    "The build on the main branch passed after the flaky network test was retried twice by the runner.",
    "Lunch options near the office include a noodle bar, a bakery with soup, and a salad place upstairs.",
    "Reminder that the quarterly all-hands moves to the big auditorium because the usual hall is booked.",
    "The printer on the third floor jams with thick paper; use the one by the kitchen for the posters.",
]
ALICE, BOB = auth_md(TOKENS["alice"]), auth_md(TOKENS["bob"])


def turn(role: str, content: str) -> str:
    return f"<|{role}|>\n{content}<|end|>\n"


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from model import init_model, preset, save_checkpoint

    cfg = preset("tiny").model_copy(update={"chat_template": PLAIN, "window_size": WINDOW})
    out = tmp_path_factory.mktemp("ckpt-recall") / "tiny-chat"
    save_checkpoint(init_model(cfg, seed=0), out)
    return out


@pytest.fixture(scope="module")
def chat_model(chat_checkpoint: Path):
    import torch

    from model import load_checkpoint

    torch.set_num_threads(1)
    return load_checkpoint(chat_checkpoint)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, chat_checkpoint: Path) -> Iterator[Daemon]:
    with auth_daemon(tmp_path_factory, chat_checkpoint, "recall", "--max-generate-tokens", "64") as d:
        yield d


@pytest.fixture
def client(daemon: Daemon) -> Iterator[MemoryClient]:
    with MemoryClient(daemon.address, token=TOKENS["alice"]) as c:
        yield c


@dataclass
class History:
    session: Session
    text: str
    """Everything the session holds (bytes = tokens)."""
    fact_start: int


def history(c: MemoryClient) -> History:
    """A session whose fact is stated once, then pushed out of the window by five filler turns."""
    s = c.create_session()
    text = ""
    r = s.add_message("user", FACT)
    fact_start, text = r.start_offset, text + turn("user", FACT)
    s.add_message("assistant", "Noted.")
    text += turn("assistant", "Noted.")
    for f in FILLER:
        s.add_message("user", f)
        text += turn("user", f)
    assert s.offset == len(text.encode()) and s.offset - fact_start > WINDOW
    return History(s, text, fact_start)


def state_of(d: Daemon, sid: str) -> bytes:
    return export_bytes(d.stub(), sid, ALICE)


def rpc_error(call, *args, **kw) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as e:
        r = call(*args, **kw)
        if not isinstance(r, pb.RecallResponse | pb.ModelInfo):  # a stream: read it
            list(r)
    return e.value


# -- the Recall rpc -------------------------------------------------------------------------------


def test_limits_are_reported(daemon: Daemon) -> None:
    lim = daemon.stub().GetModel(pb.GetModelRequest(), metadata=ALICE).limits
    assert (lim.max_recall_k, lim.default_recall_k, lim.max_recall_query_chars) == (64, 8, 4096)
    assert lim.max_recall_budget_tokens == WINDOW and lim.default_recall_budget_tokens == WINDOW  # 512 > the window


def test_bad_recall_requests_name_the_field_and_change_nothing(daemon: Daemon, client: MemoryClient) -> None:
    h = history(client)
    sid, stub = h.session.id, daemon.stub()
    lim = stub.GetModel(pb.GetModelRequest(), metadata=ALICE).limits
    before = state_of(daemon, sid)
    bad = {
        "k": pb.RecallRequest(session_id=sid, query="door code", k=0),
        "k ": pb.RecallRequest(session_id=sid, query="door code", k=lim.max_recall_k + 1),
        "query": pb.RecallRequest(session_id=sid, query="", k=3),
        "query ": pb.RecallRequest(session_id=sid, query=" \n\t ", k=3),
        "query  ": pb.RecallRequest(session_id=sid, query="x" * (lim.max_recall_query_chars + 1), k=3),
        "session_id": pb.RecallRequest(session_id="not a valid id!", query="door code", k=3),
    }
    for field, req in bad.items():
        e = rpc_error(stub.Recall, req, metadata=ALICE, timeout=30)
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (field, e.details())
        assert e.details().startswith(field.strip()), (field, e.details())
    e = rpc_error(stub.Recall, pb.RecallRequest(session_id="no-such-session", query="door", k=3), metadata=ALICE)
    assert e.code() == grpc.StatusCode.NOT_FOUND and "no-such-session" in e.details()
    # another tenant: not found, exactly as a session that does not exist (its existence is not revealed)
    e = rpc_error(stub.Recall, pb.RecallRequest(session_id=sid, query="door code", k=3), metadata=BOB, timeout=30)
    assert e.code() == grpc.StatusCode.NOT_FOUND and sid in e.details()
    with MemoryClient(daemon.address, token=TOKENS["bob"]) as bob, pytest.raises(NotFound):
        bob.session(sid).recall("door code", k=3)

    # generation's recall options: checked before anything is read
    gen_bad = {
        "recall.k": pb.RecallOptions(k=lim.max_recall_k + 1),
        "recall.budget_tokens": pb.RecallOptions(budget_tokens=lim.max_recall_budget_tokens + 1),
        "recall.query": pb.RecallOptions(query="y" * (lim.max_recall_query_chars + 1)),
    }
    for field, opts in gen_bad.items():
        req = pb.GenerateRequest(session_id=sid, prompt_text="hi", max_tokens=4, commit=True, recall=opts)
        e = rpc_error(stub.Generate, req, metadata=ALICE, timeout=30)
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and e.details().startswith(field), e.details()

    assert stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=ALICE).offset == h.session.offset
    assert_same_state(state_tensors_of(daemon, before), state_tensors_of(daemon, state_of(daemon, sid)))


def state_tensors_of(d: Daemon, data: bytes) -> dict:
    from model import load_checkpoint

    return state_tensors(load_checkpoint(d.checkpoint), data)


def test_recall_finds_the_fact_out_of_the_window(client: MemoryClient, daemon: Daemon) -> None:
    h = history(client)
    before = state_of(daemon, h.session.id)
    spans = h.session.recall("storage room door code", k=3)
    assert 1 <= len(spans) <= 3
    assert [s.score for s in spans] == sorted((s.score for s in spans), reverse=True)  # most relevant first
    top = spans[0]  # a turn, or a window of one (this byte-level model has no turn token)
    fact_end = h.fact_start + len(turn("user", FACT))
    assert "4417" in top.text and top.start_offset < fact_end and h.fact_start < top.end_offset <= h.session.offset
    log = h.text.encode()
    for s in spans:  # exact text of the log at its offsets
        assert s.text == log[s.start_offset : s.end_offset].decode()
    assert state_of(daemon, h.session.id) == before  # a read: the state is untouched


@pytest.mark.asyncio
async def test_async_recall(daemon: Daemon, client: MemoryClient) -> None:
    h = history(client)
    async with AsyncMemoryClient(daemon.address, token=TOKENS["alice"]) as c:
        spans = await c.session(h.session.id).recall("door code for the storage room", k=2)
    assert spans and "4417" in spans[0].text


def spans_of(spans) -> list[tuple[int, int, str, float]]:
    return [(s.start_offset, s.end_offset, s.text, s.score) for s in spans]


def test_export_carries_the_recall_log(client: MemoryClient, daemon: Daemon, tmp_path: Path) -> None:
    """An import recalls the source's history (the same spans and scores) from the recall log the export
    carries: its own token log holds nothing from before the import, so nothing else could give them.
    An export without it (cleared from the header, as exports before it) still imports; the session then
    recalls only what it reads after the import."""
    from memoryd_sdk.export_file import read_header, write_header

    h = history(client)
    query = "storage room door code"
    want = spans_of(h.session.recall(query, k=3))
    assert want and "4417" in want[0][2]
    path = tmp_path / "with-log.memoryd"
    header = h.session.export(path, chunk_bytes=4096)
    assert header.recall_log_bytes > 4 * header.offset  # every token, 4 bytes each, and the run headers
    copy = client.import_session(path, session_id=h.session.id + "-copy")
    assert spans_of(copy.recall(query, k=3)) == want
    assert state_of(daemon, copy.id) == state_of(daemon, h.session.id)

    bare = tmp_path / "bare.memoryd"
    with open(path, "rb") as f:
        head = read_header(f)
        state = f.read(head.total_bytes)
    head.recall_log_bytes, head.recall_log_sha256 = 0, ""
    with open(bare, "wb") as out:
        write_header(out, head)
        out.write(state)
    plain = client.import_session(bare, session_id=h.session.id + "-bare")
    assert plain.offset == h.session.offset and plain.recall(query, k=3) == []
    r = plain.add_message("user", "The loading dock door code is 9051.")
    later = plain.recall("loading dock door code", k=3)
    assert later and "9051" in later[0].text and later[0].start_offset >= r.start_offset


def test_import_refuses_a_bad_recall_log_and_creates_nothing(client: MemoryClient, daemon: Daemon) -> None:
    import hashlib

    h = history(client)
    stub = daemon.stub()
    chunks = list(stub.ExportSession(pb.ExportSessionRequest(session_id=h.session.id), metadata=ALICE, timeout=30))
    data = [c for c in chunks[1:] if c.HasField("data")]
    logs = [c for c in chunks[1:] if c.HasField("recall_log")]
    assert data and logs and chunks[1:] == data + logs  # the state, then the recall log

    def attempt(log: list[pb.SessionChunk], **header) -> grpc.RpcError:
        head = pb.ExportHeader()
        head.CopyFrom(chunks[0].header)
        head.session_id = "never"
        for k, v in header.items():
            setattr(head, k, v)
        return rpc_error(lambda: stub.ImportSession(iter([pb.SessionChunk(header=head), *log]), metadata=ALICE))

    junk = b"not a recall log"
    cases = {
        "does not match": attempt([*data, pb.SessionChunk(recall_log=junk)], recall_log_bytes=len(junk)),
        "not a recall log": attempt(
            [*data, pb.SessionChunk(recall_log=junk)],
            recall_log_bytes=len(junk),
            recall_log_sha256=hashlib.sha256(junk).hexdigest(),
        ),
        "after a recall_log": attempt([*data[:-1], *logs, data[-1]]),
        "recall_log ": attempt(data),  # announced, never sent
    }
    for why, e in cases.items():
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT and why in e.details(), e.details()
    with pytest.raises(NotFound):
        client.session("never").info()


def test_cli_recall(daemon: Daemon, client: MemoryClient) -> None:
    h = history(client)

    def memoryd(*args: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "memoryd", "sessions", "recall", *args]
        cmd += ["--daemon", daemon.address, "--token", TOKENS["alice"]]
        return subprocess.run(cmd, capture_output=True, text=True, env=child_env(), timeout=120)

    out = memoryd(h.session.id, "storage room door code", "-k", "2")
    assert out.returncode == 0, out.stderr
    first = out.stdout.splitlines()[0]
    assert first.startswith("[") and "score" in first and "4417" in out.stdout
    js = memoryd(h.session.id, "storage room door code", "-k", "2", "--json")
    rows = [json.loads(line) for line in js.stdout.splitlines()]
    assert js.returncode == 0 and 1 <= len(rows) <= 2 and "4417" in rows[0]["text"]
    assert set(rows[0]) == {"start_offset", "end_offset", "text", "score"}
    bad = memoryd(h.session.id, "storage", "-k", "0")
    assert bad.returncode == 1 and "INVALID_ARGUMENT" in bad.stderr and "k must be" in bad.stderr
    gone = memoryd("no-such-session", "storage")
    assert gone.returncode == 1 and "NOT_FOUND" in gone.stderr


# -- recall in generation -------------------------------------------------------------------------


def expected_context(spans, history: str, prompt_tokens: int, max_tokens: int, budget: int, query: str) -> list[int]:
    """The context the daemon should have placed: memoryd's own rule, fed the spans it reported and the
    query terms' idf in an index of the session's log (`history`) built here."""
    from memoryd.sessions.chat import ChatFormat
    from memoryd.sessions.recall.index import SpanIndex
    from memoryd.sessions.recall.indexes import turn_start
    from memoryd.sessions.recall.spans import Shape
    from memoryd.sessions.recall_prompt import recall_context
    from model.tokenizer import ByteTokenizer

    log = list(history.encode())
    index = SpanIndex(Shape(turn_start(ByteTokenizer(), ChatFormat(PLAIN))), ByteTokenizer().decode)
    index.extend(0, log)
    position = len(log)

    @dataclass(frozen=True)
    class S:
        start: int
        end: int
        text: str
        score: float

    got = [S(s.start_offset, s.end_offset, s.text, s.score) for s in spans]
    ctx = recall_context(
        got,
        position=position,
        window=WINDOW,
        prompt_tokens=prompt_tokens,
        max_tokens=max_tokens,
        budget=budget,
        chat=ChatFormat(PLAIN),
        tok=ByteTokenizer(),
        query=query,
        weights=index.idf(query),
    )
    return list(ctx.tokens)


def test_chat_recalls_and_commits_only_prompt_and_reply(client: MemoryClient, daemon: Daemon, chat_model) -> None:
    """`session.chat` recalls by default; the recalled context conditions the reply (the same tokens as
    a prompt that spells it out), and the committed state is bit-exact with a solo replay of the log."""
    h = history(client)
    s, position = h.session, h.session.offset
    reply = s.chat(QUESTION, max_tokens=8)
    gen = reply.generation
    assert gen.recalled_tokens > 0 and any("4417" in sp.text for sp in gen.recalled_spans)
    # What was committed: the question's turn, the reply, the closing; never the recalled context.
    prompt = turn("user", QUESTION) + "<|assistant|>\n"
    kept = list(gen.tokens[:-1] if gen.finish_reason == FinishReason.STOP_TOKEN else gen.tokens)
    log = list((h.text + prompt).encode()) + kept + list(b"<|end|>\n")
    assert reply.offset == len(log) == position + gen.committed_tokens
    assert_same_state(state_tensors(chat_model, state_of(daemon, s.id)), reference_state(chat_model, [log]))

    # The reply was sampled after exactly the context the recall rule makes, placed right before the prompt
    # and read forward only (no test-time step: the context never moves the fast weights): greedy decoding
    # of the session's history, then that context and the prompt read into a frozen copy, gives the same tokens.
    ctx = expected_context(gen.recalled_spans, h.text, len(prompt.encode()), 8, WINDOW, QUESTION)
    assert position == len(h.text.encode())
    assert len(ctx) == gen.recalled_tokens
    assert greedy_frozen(chat_model, list(h.text.encode()), ctx + list(prompt.encode()), len(gen.tokens)) == gen.tokens


def greedy_frozen(model, history: list[int], provisional: list[int], n: int) -> tuple[int, ...]:
    """n greedy tokens after `history` (read as a session reads it) and then `provisional` read frozen."""
    from model import StreamState

    s = StreamState.fresh(model)
    s.append(history)
    steps = s.steps
    f = s.frozen_copy()
    f.append(provisional)
    out: list[int] = []
    for _ in range(n):
        out.append(int(f.logits().argmax()))
        f.append(out[-1:])
    assert f.steps == steps  # the context (a few hundred tokens: many mini-batches of 8) stepped nothing
    return tuple(out)


def test_recall_without_commit_changes_nothing(client: MemoryClient, daemon: Daemon) -> None:
    h = history(client)
    before = state_of(daemon, h.session.id)
    r = h.session.reply([("user", QUESTION)], max_tokens=6, commit=False)
    assert r.generation.recalled_tokens > 0 and r.offset == h.session.offset
    assert state_of(daemon, h.session.id) == before


def test_generate_without_the_field_is_unchanged(client: MemoryClient, daemon: Daemon, chat_model) -> None:
    """No recall field (the SDK's generate, or chat with recall=False): nothing is recalled, the reply is
    the one the session alone gives, and the committed state is a replay of the log."""
    h = history(client)
    a, b = h.session, h.session.fork()
    off = a.reply([("user", QUESTION)], max_tokens=8, recall=False)
    assert off.generation.recalled_tokens == 0 and off.generation.recalled_spans == ()
    req = pb.GenerateRequest(
        session_id=b.id,
        prompt_messages=[pb.ChatMessage(role="user", content=QUESTION)],
        add_generation_prompt=True,
        max_tokens=8,
        commit=True,
    )
    raw = list(daemon.stub().Generate(req, metadata=ALICE, timeout=60))
    assert tuple(t for m in raw for t in m.tokens) == off.generation.tokens
    assert raw[-1].recalled_tokens == 0 and not raw[-1].recalled_spans
    assert_same_state(
        state_tensors(chat_model, state_of(daemon, a.id)), state_tensors(chat_model, state_of(daemon, b.id))
    )
    gen = off.generation
    kept = list(gen.tokens[:-1] if gen.finish_reason == FinishReason.STOP_TOKEN else gen.tokens)
    log = list((h.text + turn("user", QUESTION) + "<|assistant|>\n").encode()) + kept + list(b"<|end|>\n")
    assert_same_state(state_tensors(chat_model, state_of(daemon, a.id)), reference_state(chat_model, [log]))


def test_recall_options_and_an_empty_session(client: MemoryClient) -> None:
    """k and the budget are honoured; a session with nothing to recall generates as without recall."""
    h = history(client)
    one = RecallOptions(k=1, budget_tokens=160)  # the span's matching sentences and their framing fit
    r = h.session.reply([("user", QUESTION)], max_tokens=4, commit=False, recall=one)
    assert len(r.generation.recalled_spans) == 1 and 0 < r.generation.recalled_tokens <= 160
    small = RecallOptions(k=8, budget_tokens=60)  # the fact's sentence (35 bytes) with its framing (44) does not fit
    r = h.session.reply([("user", QUESTION)], max_tokens=4, commit=False, recall=small)
    assert r.generation.recalled_spans == () and r.generation.recalled_tokens == 0
    fresh = client.create_session()
    first = fresh.chat("Hello there", max_tokens=4)
    assert first.generation.recalled_tokens == 0


# -- the placement rule itself (memoryd/sessions/recall_prompt.py) ----------------------------------


@dataclass(frozen=True)
class _Span:
    start: int
    end: int
    text: str
    score: float


def test_context_rule_budget_window_order_and_markers() -> None:
    from memoryd.sessions.chat import ChatFormat, Message
    from memoryd.sessions.recall_prompt import HEADER, context_budget, query_of, recall_context
    from model.tokenizer import ByteTokenizer

    chat, tok = ChatFormat(PLAIN), ByteTokenizer()
    assert context_budget(512, WINDOW, 70, 8) == WINDOW - 70 - 8  # context + prompt + the reply's start fit
    assert context_budget(900, 1024, 70, 1000) == 1024 - 70 - 256  # a long reply: its first 256 tokens
    assert context_budget(512, 0, 70, 8) == 512 and context_budget(512, WINDOW, 250, 8) == 0
    position = 2000
    spans = [  # most relevant first, as the index returns them
        _Span(900, 950, turn("user", "The code is 4417."), 9.0),
        _Span(100, 140, turn("assistant", "Parking is on level B2."), 5.0),
        _Span(position - 5, position, turn("user", "recent"), 4.0),  # still in the window after the context: left out
        _Span(300, 800, turn("tool", "x" * 480), 3.0),  # does not fit: skipped, not cut
        _Span(1200, 1230, turn("user", "Lunch at noon."), 1.0),
    ]
    ctx = recall_context(
        spans, position=position, window=WINDOW, prompt_tokens=40, max_tokens=8, budget=512, chat=chat, tok=tok
    )
    assert [s.start for s in ctx.spans] == [900, 100, 1200]  # by relevance
    text = bytes(ctx.tokens).decode()
    # special tokens and the template's closing and generation prompt are taken out ("<|user|>" is plain
    # text for this byte-level template: it stays)
    body = "<|user|>\nThe code is 4417.", "Parking is on level B2.", "<|user|>\nLunch at noon."
    want = f"<|system|>\n{HEADER}\n{body[2]}\n{body[1]}\n{body[0]}<|end|>\n"  # most relevant last, one turn
    assert text == want and len(ctx.tokens) <= context_budget(512, WINDOW, 40, 8)
    tight = recall_context(
        spans, position=position, window=WINDOW, prompt_tokens=40, max_tokens=8, budget=75, chat=chat, tok=tok
    )
    assert [s.start for s in tight.spans] == [900] and len(tight.tokens) <= 75  # the others no longer fit
    none = recall_context(
        spans[2:3], position=position, window=WINDOW, prompt_tokens=40, max_tokens=8, budget=512, chat=chat, tok=tok
    )
    assert none.tokens == () and none.spans == ()

    conv = [Message("system", "Be brief."), Message("user", "first?"), Message("assistant", "ok"), Message("user", "q")]
    assert query_of(conv, "") == "q" and query_of(conv[:1], "") == "Be brief." and query_of([], "text") == "text"
    # the query ends at the turn's last question: an instruction after it names nothing to look up
    asked = [*conv[:3], Message("user", "I'm at the storage room. What's the code? Answer in a few words.")]
    assert query_of(asked, "") == "I'm at the storage room. What's the code?"
    assert query_of([], "Who? Why?\nReply in JSON.") == "Who? Why?"
    traceback = "Why does the deploy fail?\nTraceback (most recent call last):\nKeyError: 'cedar_key'"
    long_tail = "Which key? " + " ".join(f"word{i}" for i in range(13)) + "."
    for plain in ("see https://x.org/a?b=1 for the code", "why does x = a ? b : c; fail", traceback, long_tail):
        assert query_of([], plain) == plain  # no question, or what follows it is material, not an instruction


def test_context_reads_the_spans_above_a_clear_drop_and_their_matching_sentences() -> None:
    """With a query, the spans above the first clear drop in score are read, and below it those whose
    best sentence matches the query (terms weighed by their idf) at least as well as any above it; each
    is cut to its sentences holding a query term (a matching line ending in a colon keeps the line after
    it), and a sentence another one holds whole is written once; without a query, every span is read whole."""
    from memoryd.sessions.chat import ChatFormat
    from memoryd.sessions.recall.words import words
    from memoryd.sessions.recall_prompt import CLEAR_GAP, HEADER, RELATIVE_SCORE, focus, ranked_cut, recall_context
    from model.tokenizer import ByteTokenizer

    terms = frozenset(words("Which code opens the maple locker?"))  # code, open, maple, locker
    idf = {"maple": 5.0, "locker": 2.0, "code": 1.5, "open": 1.0}

    def kept(*spans: tuple[float, str]) -> list[float]:
        return [s.score for s in ranked_cut([_Span(i, i + 1, t, x) for i, (x, t) in enumerate(spans)], terms, idf)]

    gap, half = 10.0 * CLEAR_GAP, 10.0 * RELATIVE_SCORE
    fact, other = "The maple locker code is 4417.", "The access code for the south locker is 9921."
    # a clear drop after the best: a runner-up without the subject (code + locker: 3.5 < 7.0) is left out ...
    assert kept((10.0, fact), (10.0 - gap, other)) == [10.0]
    # ... one whose sentence matches as well as the best's is read (the fact in a long tool output, or its
    # sentence whole in the next window while the best holds it cut), down to the floor of half the best
    assert kept((10.0, other), (10.0 - gap, "NOTE: maple locker reset to 4417.\nPASSED")) == [10.0, 10.0 - gap]
    assert kept((10.0, other), (half - 0.01, fact)) == [10.0]
    assert kept((10.0, fact), (9.0, other), (8.5, other), (8.5 - gap, fact), (5.5, other)) == [10.0, 9.0, 8.5, 6.5]
    no_drop = kept((10.0, fact), (9.0, other), (8.5, other), (8.5 - gap + 0.01, other))
    assert no_drop == [10.0, 9.0, 8.5, 8.5 - gap + 0.01]
    assert kept() == []

    chat, tok = ChatFormat(PLAIN), ByteTokenizer()
    query = "Which code opens the storage rooms door?"
    spans = [  # most relevant first, as the index returns them
        _Span(900, 990, turn("user", "Lunch is at noon. The storage room door code is 4417. The printer jams."), 10.0),
        _Span(500, 590, turn("user", "Weather: rain."), 9.0),  # no query term: nothing left of it
        _Span(100, 190, turn("tool", "Rooms:\nAll of them are booked on Friday.\nNothing else."), 8.5),
        _Span(300, 390, turn("user", "The door to the roof is locked."), 8.5 - gap),  # after the drop, matches less
    ]
    common = dict(position=10_000, window=1024, prompt_tokens=40, max_tokens=8, budget=512, chat=chat, tok=tok)
    weights = {"storage": 4.0, "code": 2.0, "room": 1.5, "door": 1.0, "open": 1.0}
    ctx = recall_context(spans, **common, query=query, weights=weights)
    assert [s.start for s in ctx.spans] == [900, 100]
    body = "Rooms: All of them are booked on Friday.\nThe storage room door code is 4417."  # most relevant last
    assert bytes(ctx.tokens).decode() == f"<|system|>\n{HEADER}\n{body}<|end|>\n"
    # A window that cut the fact's sentence ranks first; the next window holds it whole: both are read, the
    # cut copy is not written, and the whole sentence is (without weights every term weighs 1).
    cut = [
        _Span(960, 1050, turn("tool", "room door code is 4417.\nPrinter jams."), 10.0),
        _Span(900, 990, turn("tool", "Lunch at noon.\nThe storage room door code is 4417."), 10.0 - gap),
    ]
    whole = recall_context(cut, **common, query=query)
    assert [s.start for s in whole.spans] == [960, 900]
    assert bytes(whole.tokens).decode() == f"<|system|>\n{HEADER}\nThe storage room door code is 4417.<|end|>\n"
    terms = frozenset(words(query))
    assert focus(["Nothing here.", "Or here!"], terms) == [] and focus(["a door;", "b.", "c"], terms) == ["a door;"]
    plain = recall_context(spans, **common)
    assert [s.start for s in plain.spans] == [900, 500, 100, 300]  # no query: every span, whole
