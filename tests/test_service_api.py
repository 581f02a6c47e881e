"""Every call against a real `memoryd serve` and a real redis-server: happy paths, bad inputs,
generate, fork, tenants, concurrency, export/import (issue 3, "Must show" 1, 4, 5, 6, 7)."""

from __future__ import annotations

import concurrent.futures
import math
import random
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from memoryd_sdk.proto import memoryd_pb2 as pb
from service_fixtures import (  # noqa: F401 (fixtures)
    ROOT,
    Daemon,
    RedisServer,
    assert_same_state,
    auth_md,
    child_env,
    export_bytes,
    exported,
    reference_state,
    state_tensors,
    tiny_checkpoint,
    tiny_model,
)

ALICE, BOB = auth_md("tok-alice"), auth_md("tok-bob")
V = 258  # tiny preset vocabulary
MAX_APPEND = 512


@pytest.fixture(scope="module")
def redis_mod(tmp_path_factory: pytest.TempPathFactory):
    server = RedisServer(tmp_path_factory.mktemp("redis-api"))
    server.start()
    yield server
    server.kill(signal.SIGTERM)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path, redis_mod: RedisServer):  # noqa: F811
    d = Daemon(
        tmp_path_factory.mktemp("memoryd-api"),
        tiny_checkpoint,
        redis_mod.url,
        "--auth-tokens",
        "tok-alice=alice,tok-bob=bob",
        "--snapshot-interval",
        "4",
        "--max-append-tokens",
        str(MAX_APPEND),
        "--max-generate-tokens",
        "64",
        "--max-message-bytes",
        "1MiB",
        "--tick-tokens",
        "20",  # tiny model, b = 8: long appends are cut into pieces over several ticks
    )
    d.start()
    yield d
    d.close()


@pytest.fixture(scope="module")
def stub(daemon: Daemon):
    return daemon.stub()


def rand_pieces(rng: random.Random, n: int, lo: int = 1, hi: int = 20) -> list[list[int]]:
    return [[rng.randrange(256) for _ in range(rng.randint(lo, hi))] for _ in range(n)]


def new_session(stub, pieces: list[list[int]], md=ALICE, sid: str = "") -> str:
    s = stub.CreateSession(pb.CreateSessionRequest(session_id=sid), metadata=md)
    for p in pieces:
        stub.Append(pb.AppendRequest(session_id=s.session_id, tokens=p), metadata=md)
    return s.session_id


def code_of(fn) -> grpc.StatusCode:
    try:
        r = fn()
        if hasattr(r, "__next__"):  # server streaming: errors come while reading
            list(r)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


# -- operations ---------------------------------------------------------------------------------


def test_health_reflection_metrics(daemon: Daemon, stub) -> None:
    h = health_pb2_grpc.HealthStub(daemon.channel())
    for name in ("", "memoryd.v1.MemoryService"):
        assert h.Check(health_pb2.HealthCheckRequest(service=name)).status == health_pb2.HealthCheckResponse.SERVING
    db = ProtoReflectionDescriptorDatabase(daemon.channel())
    assert "memoryd.v1.MemoryService" in db.get_services()
    desc = db.FindFileContainingSymbol("memoryd.v1.MemoryService")
    assert any(s.name == "MemoryService" for s in desc.service)
    stub.ListSessions(pb.ListSessionsRequest(), metadata=ALICE)
    text = urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_port}/metrics", timeout=5).read().decode()
    assert 'memoryd_calls_total{code="OK",method="ListSessions"}' in text
    for name in (
        "memoryd_call_seconds",
        "memoryd_tokens_read_total",
        "memoryd_ttt_steps_total",
        "memoryd_sessions_hot",
    ):
        assert name in text
    log = daemon.log_path.read_text()
    assert '"call": "ListSessions", "code": "OK"' in log  # one structured line per call


def test_auth_required(stub) -> None:
    req = pb.ListSessionsRequest()
    assert code_of(lambda: stub.ListSessions(req)) == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(lambda: stub.ListSessions(req, metadata=auth_md("nope"))) == grpc.StatusCode.UNAUTHENTICATED
    bad = (("authorization", "Basic tok-alice"),)
    assert code_of(lambda: stub.ListSessions(req, metadata=bad)) == grpc.StatusCode.UNAUTHENTICATED


def test_session_lifecycle(stub, tiny_model) -> None:  # noqa: F811
    s = stub.CreateSession(pb.CreateSessionRequest(session_id="life", metadata={"agent": "a1"}), metadata=ALICE)
    assert (s.session_id, s.offset, s.tenant, dict(s.metadata)) == ("life", 0, "alice", {"agent": "a1"})
    assert s.model_digest.startswith("sha256:")
    auto = stub.CreateSession(pb.CreateSessionRequest(), metadata=ALICE)
    assert len(auto.session_id) == 32

    r = stub.Append(pb.AppendRequest(session_id="life", text="hello, memory", expected_offset=0), metadata=ALICE)
    assert (r.start_offset, r.offset, r.tokens, r.steps, r.pending_tokens) == (0, 13, 13, 1, 5)
    r = stub.Append(pb.AppendRequest(session_id="life", tokens=[1, 2, 3], append_id="x1"), metadata=ALICE)
    assert (r.start_offset, r.offset, r.duplicate) == (13, 16, False)

    def stream():
        yield pb.AppendRequest(session_id="life", tokens=[4, 5], expected_offset=16, append_id="s1")
        yield pb.AppendRequest(tokens=[6, 7, 8], append_id="s2")
        yield pb.AppendRequest(session_id="life", text="!", append_id="s3")

    r = stub.AppendStream(stream(), metadata=ALICE)
    assert (r.start_offset, r.offset, r.tokens, r.duplicate) == (16, 22, 6, False)
    r = stub.AppendStream(stream(), metadata=ALICE)  # the same stream again: every message is a retry
    assert (r.start_offset, r.offset, r.tokens, r.duplicate) == (16, 22, 6, True)

    g = stub.GetSession(pb.GetSessionRequest(session_id="life"), metadata=ALICE)
    assert (g.offset, g.steps, g.pending_tokens, g.hot) == (22, 2, 6, True)
    assert g.state_bytes > 0 and g.last_used_at.ToNanoseconds() >= g.created_at.ToNanoseconds()

    pieces = [list(b"hello, memory"), [1, 2, 3], [4, 5], [6, 7, 8], list(b"!")]
    assert_same_state(state_tensors(tiny_model, export_bytes(stub, "life", ALICE)), reference_state(tiny_model, pieces))

    r = stub.ResetSession(pb.ResetSessionRequest(session_id="life", expected_offset=22), metadata=ALICE)
    assert (r.offset, r.steps, dict(r.metadata)) == (0, 0, {"agent": "a1"})
    assert_same_state(state_tensors(tiny_model, export_bytes(stub, "life", ALICE)), reference_state(tiny_model, []))
    # after a reset, old append ids are forgotten: the same id appends again
    r = stub.Append(pb.AppendRequest(session_id="life", tokens=[9], append_id="x1"), metadata=ALICE)
    assert (r.offset, r.duplicate) == (1, False)

    d = stub.DeleteSession(pb.DeleteSessionRequest(session_id="life"), metadata=ALICE)
    assert d.offset == 1
    get = lambda: stub.GetSession(pb.GetSessionRequest(session_id="life"), metadata=ALICE)
    assert code_of(get) == grpc.StatusCode.NOT_FOUND
    # the id is free again, and the new session starts empty
    assert stub.CreateSession(pb.CreateSessionRequest(session_id="life"), metadata=ALICE).offset == 0
    stub.DeleteSession(pb.DeleteSessionRequest(session_id="life"), metadata=ALICE)
    stub.DeleteSession(pb.DeleteSessionRequest(session_id=auto.session_id), metadata=ALICE)


def test_append_stream_error_says_where_it_stopped(stub) -> None:
    sid = new_session(stub, [[1, 2]])

    def half_bad():
        yield pb.AppendRequest(session_id=sid, tokens=[1], append_id="h1")
        yield pb.AppendRequest(session_id=sid, tokens=[V])

    with pytest.raises(grpc.RpcError) as e:
        stub.AppendStream(half_bad(), metadata=ALICE)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(e.value.trailing_metadata())["memoryd-offset"] == "3"  # the first message landed
    assert stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=ALICE).offset == 3
    with pytest.raises(grpc.RpcError) as e:
        stub.AppendStream(iter([]), metadata=ALICE)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_list_pages(stub) -> None:
    md = auth_md("tok-bob")
    ids = [f"page-{i:02d}" for i in range(7)]
    for sid in ids:
        stub.CreateSession(pb.CreateSessionRequest(session_id=sid), metadata=md)
    seen, token, pages = [], "", 0
    while True:
        r = stub.ListSessions(pb.ListSessionsRequest(page_size=3, page_token=token), metadata=md)
        seen += [s.session_id for s in r.sessions if s.session_id.startswith("page-")]
        pages += 1
        token = r.next_page_token
        if not token:
            break
    assert seen == ids and pages == 3
    for sid in ids:
        stub.DeleteSession(pb.DeleteSessionRequest(session_id=sid), metadata=md)


def test_append_exactly_once(stub) -> None:
    sid = new_session(stub, [])
    req = pb.AppendRequest(session_id=sid, tokens=[10, 11, 12], expected_offset=0, append_id="once")
    a = stub.Append(req, metadata=ALICE)
    b = stub.Append(req, metadata=ALICE)
    assert (a.start_offset, a.offset, a.duplicate) == (0, 3, False)
    assert (b.start_offset, b.offset, b.duplicate) == (0, 3, True)
    assert stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=ALICE).offset == 3
    # an old retry after later appends is still recognised
    stub.Append(pb.AppendRequest(session_id=sid, tokens=[1], expected_offset=3, append_id="two"), metadata=ALICE)
    c = stub.Append(req, metadata=ALICE)
    assert (c.start_offset, c.offset, c.duplicate) == (0, 3, True)
    # a stale expected offset without a matching append id is refused with the current offset
    with pytest.raises(grpc.RpcError) as e:
        stub.Append(pb.AppendRequest(session_id=sid, tokens=[1], expected_offset=3, append_id="new"), metadata=ALICE)
    assert e.value.code() == grpc.StatusCode.ABORTED
    assert dict(e.value.trailing_metadata())["memoryd-offset"] == "4"
    assert "offset 4" in e.value.details()


# -- bad inputs: each gets its status and leaves the session untouched ----------------------------

VICTIM = "victim"


def _bad_cases():
    A = lambda **kw: pb.AppendRequest(session_id=VICTIM, **kw)
    G = lambda **kw: pb.GenerateRequest(session_id=VICTIM, **{"max_tokens": 4, **kw})
    IA, NF, AE = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS
    RE, AB, FP = grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED, grpc.StatusCode.FAILED_PRECONDITION
    return [
        ("append-token-too-big", "Append", A(tokens=[1, V]), IA),
        ("append-token-negative", "Append", A(tokens=[-1]), IA),
        ("append-empty", "Append", A(), IA),
        ("append-text-and-tokens", "Append", A(text="x", tokens=[1]), IA),
        ("append-too-many-tokens", "Append", A(tokens=[1] * (MAX_APPEND + 1)), RE),
        ("append-over-message-limit", "Append", A(text="x" * (1 << 21)), RE),
        ("append-stale-offset", "Append", A(tokens=[1], expected_offset=1), AB),
        ("append-future-offset", "Append", A(tokens=[1], expected_offset=10**9), AB),
        ("append-bad-session-id", "Append", pb.AppendRequest(session_id="no spaces!", tokens=[1]), IA),
        ("append-empty-session-id", "Append", pb.AppendRequest(tokens=[1]), IA),
        ("append-unknown-session", "Append", pb.AppendRequest(session_id="ghost", tokens=[1]), NF),
        ("append-bad-append-id", "Append", A(tokens=[1], append_id="has space"), IA),
        ("append-id-reused-other-tokens", "Append", A(tokens=[2, 2], append_id="seed"), IA),
        ("gen-negative-temperature", "Generate", G(temperature=-1), IA),
        ("gen-nan-temperature", "Generate", G(temperature=math.nan), IA),
        ("gen-top-p-over-1", "Generate", G(top_p=1.5), IA),
        ("gen-top-k-over-vocab", "Generate", G(top_k=V + 1), IA),
        ("gen-zero-max-tokens", "Generate", G(max_tokens=0), IA),
        ("gen-max-tokens-over-limit", "Generate", G(max_tokens=65), RE),
        ("gen-stop-token-out-of-vocab", "Generate", G(stop_tokens=[V]), IA),
        ("gen-empty-stop-string", "Generate", G(stop=[""]), IA),
        ("gen-bad-prompt-token", "Generate", G(prompt_tokens=[V]), IA),
        ("gen-min-p-over-1", "Generate", G(min_p=1.5), IA),
        ("gen-presence-penalty-over-2", "Generate", G(presence_penalty=2.5), IA),
        ("gen-frequency-penalty-nan", "Generate", G(frequency_penalty=math.nan), IA),
        ("gen-repetition-penalty-negative", "Generate", G(repetition_penalty=-1), IA),
        ("gen-logit-bias-out-of-vocab", "Generate", G(logit_bias={V: 1.0}), IA),
        ("gen-logit-bias-over-100", "Generate", G(logit_bias={3: 101.0}), IA),
        (
            "gen-logit-bias-too-many",
            "Generate",
            G(logit_bias={i: 1.0 for i in range(V)} | {-i: 0 for i in range(1, 1000)}),
            RE,
        ),
        ("gen-top-logprobs-without-logprobs", "Generate", G(top_logprobs=2), IA),
        ("gen-top-logprobs-over-limit", "Generate", G(logprobs=True, top_logprobs=21), RE),
        ("gen-n-over-limit", "Generate", G(n=17), RE),
        ("gen-n-with-commit", "Generate", G(n=2, commit=True), IA),
        ("gen-stale-offset", "Generate", G(expected_offset=0, commit=True), AB),
        ("gen-unknown-session", "Generate", pb.GenerateRequest(session_id="ghost", max_tokens=1), NF),
        ("create-existing", "CreateSession", pb.CreateSessionRequest(session_id=VICTIM), AE),
        ("create-bad-id", "CreateSession", pb.CreateSessionRequest(session_id="x" * 129), IA),
        (
            "create-too-much-metadata",
            "CreateSession",
            pb.CreateSessionRequest(metadata={str(i): "" for i in range(65)}),
            IA,
        ),
        ("fork-onto-existing", "ForkSession", pb.ForkSessionRequest(session_id=VICTIM, new_session_id=VICTIM), AE),
        ("fork-unknown", "ForkSession", pb.ForkSessionRequest(session_id="ghost"), NF),
        ("fork-stale-offset", "ForkSession", pb.ForkSessionRequest(session_id=VICTIM, expected_offset=0), AB),
        ("reset-stale-offset", "ResetSession", pb.ResetSessionRequest(session_id=VICTIM, expected_offset=0), AB),
        ("reset-unknown", "ResetSession", pb.ResetSessionRequest(session_id="ghost"), NF),
        ("delete-unknown", "DeleteSession", pb.DeleteSessionRequest(session_id="ghost"), NF),
        ("get-unknown", "GetSession", pb.GetSessionRequest(session_id="ghost"), NF),
        ("list-page-too-big", "ListSessions", pb.ListSessionsRequest(page_size=5000), IA),
        ("list-bad-token", "ListSessions", pb.ListSessionsRequest(page_token="%%%"), IA),
        ("export-chunk-too-big", "ExportSession", pb.ExportSessionRequest(session_id=VICTIM, chunk_bytes=1 << 30), IA),
        ("export-unknown", "ExportSession", pb.ExportSessionRequest(session_id="ghost"), NF),
        ("import-data-first", "ImportSession", "data-first", IA),
        ("import-empty", "ImportSession", "empty", IA),
        ("import-bad-checksum", "ImportSession", "bad-sha", IA),
        ("import-garbage-bytes", "ImportSession", "garbage", IA),
        ("import-other-model", "ImportSession", "other-model", FP),
        ("import-onto-existing", "ImportSession", "existing", AE),
    ]


def _import_stream(kind: str, export: list[pb.SessionChunk]) -> list[pb.SessionChunk]:
    import hashlib

    header = pb.ExportHeader()
    header.CopyFrom(export[0].header)
    header.session_id = "imported-bad"
    data = [c for c in export[1:]]
    if kind == "data-first":
        return [*data, pb.SessionChunk(header=header)]
    if kind == "empty":
        return []
    if kind == "bad-sha":
        header.sha256 = "0" * 64
    elif kind == "garbage":
        junk = b"\x00" * header.total_bytes
        header.sha256 = hashlib.sha256(junk).hexdigest()
        data = [pb.SessionChunk(data=junk), *(c for c in export[1:] if c.HasField("recall_log"))]
    elif kind == "other-model":
        header.model_digest = "sha256:" + "1" * 64
    elif kind == "existing":
        header.session_id = VICTIM
    return [pb.SessionChunk(header=header), *data]


@pytest.fixture(scope="module")
def victim(stub):
    new_session(stub, [], sid=VICTIM)
    stub.Append(pb.AppendRequest(session_id=VICTIM, tokens=list(range(37)), append_id="seed"), metadata=ALICE)
    return list(stub.ExportSession(pb.ExportSessionRequest(session_id=VICTIM), metadata=ALICE))


@pytest.mark.parametrize(("name", "method", "request_", "code"), _bad_cases(), ids=[c[0] for c in _bad_cases()])
def test_bad_input(stub, victim, name, method, request_, code) -> None:
    before = exported(stub, VICTIM, ALICE)
    call = getattr(stub, method)
    if method == "ImportSession":
        request_ = iter(_import_stream(request_, victim))
    with pytest.raises(grpc.RpcError) as e:
        r = call(request_, metadata=ALICE, timeout=30)
        if hasattr(r, "__next__"):
            list(r)
    assert e.value.code() == code, f"{name}: {e.value.code()} {e.value.details()}"
    assert e.value.details(), "every error carries a message"
    g = stub.GetSession(pb.GetSessionRequest(session_id=VICTIM), metadata=ALICE)
    assert g.offset == 37
    assert exported(stub, VICTIM, ALICE) == before, f"{name} changed the session"
    names = {s.session_id for s in stub.ListSessions(pb.ListSessionsRequest(), metadata=ALICE).sessions}
    assert "imported-bad" not in names and "ghost" not in names


# -- generate -------------------------------------------------------------------------------------


def test_generate_commit_false_changes_nothing(stub) -> None:
    sid = new_session(stub, rand_pieces(random.Random(1), 5))
    before = exported(stub, sid, ALICE)
    for kw in ({}, {"prompt_text": "a prompt"}, {"temperature": 1.0, "top_p": 0.9, "top_k": 20, "seed": 7}):
        evs = list(stub.Generate(pb.GenerateRequest(session_id=sid, max_tokens=12, **kw), metadata=ALICE))
        assert evs[-1].done and evs[-1].generated_tokens == sum(len(e.tokens) for e in evs) >= 1
        assert exported(stub, sid, ALICE) == before
    req = pb.GenerateRequest(session_id=sid, max_tokens=16, temperature=0.8, top_k=50, seed=123)
    a = [t for e in stub.Generate(req, metadata=ALICE) for t in e.tokens]
    b = [t for e in stub.Generate(req, metadata=ALICE) for t in e.tokens]
    assert a == b, "a seed repeats a sampled generation"


def test_generate_commit_equals_append(stub, tiny_model) -> None:  # noqa: F811
    pieces = rand_pieces(random.Random(2), 4)
    a = new_session(stub, pieces)
    b = stub.ForkSession(pb.ForkSessionRequest(session_id=a), metadata=ALICE).session_id
    prompt = list(b"Q: what is memory? A:")
    req = pb.GenerateRequest(session_id=a, prompt_tokens=prompt, max_tokens=20, commit=True, append_id="g1")
    evs = list(stub.Generate(req, metadata=ALICE))
    out = [t for e in evs for t in e.tokens]
    assert evs[-1].done and evs[-1].offset == sum(map(len, pieces)) + len(prompt) + len(out)
    assert "".join(e.text for e in evs) == bytes(t for t in out if t < 256).decode("utf-8", errors="replace")
    # the same tokens appended (prompt, then one piece per generated token) give the same bits
    stub.Append(pb.AppendRequest(session_id=b, tokens=prompt), metadata=ALICE)
    for t in out:
        stub.Append(pb.AppendRequest(session_id=b, tokens=[t]), metadata=ALICE)
    sa, sb = (
        state_tensors(tiny_model, export_bytes(stub, a, ALICE)),
        state_tensors(tiny_model, export_bytes(stub, b, ALICE)),
    )
    assert_same_state(sa, sb)
    assert_same_state(sa, reference_state(tiny_model, [*pieces, prompt, *[[t] for t in out]]))
    # and greedy decoding of the reference reproduces the tokens
    from model import StreamState

    st = StreamState.fresh(tiny_model)
    for p in [*pieces, prompt]:
        st.append(p)
    greedy = []
    for _ in out:
        greedy.append(int(torch.argmax(st.logits())))
        st.append([greedy[-1]])
    assert greedy == out
    # a retried committed generation is not sampled again
    again = list(stub.Generate(req, metadata=ALICE))
    assert len(again) == 1 and again[0].duplicate and again[0].offset == evs[-1].offset
    assert list(again[0].tokens) == out and again[0].text == "".join(e.text for e in evs)  # resent, not resampled


def test_generate_stops(stub) -> None:
    sid = new_session(stub, rand_pieces(random.Random(3), 3))
    out = [
        t for e in stub.Generate(pb.GenerateRequest(session_id=sid, max_tokens=10), metadata=ALICE) for t in e.tokens
    ]
    stop_at = out.index(out[3])
    evs = list(stub.Generate(pb.GenerateRequest(session_id=sid, max_tokens=10, stop_tokens=[out[3]]), metadata=ALICE))
    assert [t for e in evs for t in e.tokens] == out[: stop_at + 1]
    assert evs[-1].finish_reason == pb.FINISH_REASON_STOP_TOKEN
    evs = list(stub.Generate(pb.GenerateRequest(session_id=sid, max_tokens=10), metadata=ALICE))
    assert evs[-1].finish_reason == pb.FINISH_REASON_LENGTH
    text = "".join(e.text for e in evs)
    if len(text) >= 3:  # stop at a string: the text is cut before it
        stop = text[1:3]
        evs = list(stub.Generate(pb.GenerateRequest(session_id=sid, max_tokens=10, stop=[stop]), metadata=ALICE))
        assert evs[-1].finish_reason == pb.FINISH_REASON_STOP_STRING
        assert "".join(e.text for e in evs) == text[: text.index(stop)]


# -- fork -----------------------------------------------------------------------------------------


def test_fork_diverges(stub, tiny_model) -> None:  # noqa: F811
    rng = random.Random(4)
    base = rand_pieces(rng, 6)
    a = new_session(stub, base)
    f = stub.ForkSession(
        pb.ForkSessionRequest(session_id=a, new_session_id="fork-b", metadata={"k": "v"}), metadata=ALICE
    )
    assert (f.session_id, f.offset, dict(f.metadata)) == ("fork-b", sum(map(len, base)), {"k": "v"})
    xa, xb = rand_pieces(rng, 3), rand_pieces(rng, 2)
    for p in xa:
        stub.Append(pb.AppendRequest(session_id=a, tokens=p), metadata=ALICE)
    for p in xb:
        stub.Append(pb.AppendRequest(session_id="fork-b", tokens=p), metadata=ALICE)
    assert_same_state(state_tensors(tiny_model, export_bytes(stub, a, ALICE)), reference_state(tiny_model, base + xa))
    assert_same_state(
        state_tensors(tiny_model, export_bytes(stub, "fork-b", ALICE)), reference_state(tiny_model, base + xb)
    )
    # deleting the source leaves the fork intact (shared snapshots are reference counted)
    stub.DeleteSession(pb.DeleteSessionRequest(session_id=a), metadata=ALICE)
    stub.Append(pb.AppendRequest(session_id="fork-b", tokens=[5]), metadata=ALICE)
    ref = reference_state(tiny_model, [*base, *xb, [5]])
    assert_same_state(state_tensors(tiny_model, export_bytes(stub, "fork-b", ALICE)), ref)


def test_fork_costs_constant_redis_bytes(stub, redis_mod: RedisServer) -> None:
    r = redis_mod.client()
    rng = random.Random(5)
    costs = {}
    for size in (40, 4000):
        sid = new_session(stub, [[rng.randrange(256) for _ in range(200)] for _ in range(size // 200)] or [[1] * 40])
        stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=ALICE)
        time.sleep(0.3)  # let any snapshot the appends scheduled finish before measuring
        snaps = sorted(r.scan_iter(match="md:snap:*"))
        before = {k: r.memory_usage(k) for k in r.scan_iter(match="*")}
        f = stub.ForkSession(pb.ForkSessionRequest(session_id=sid), metadata=ALICE)
        after = {k: r.memory_usage(k) for k in r.scan_iter(match="*")}
        assert sorted(r.scan_iter(match="md:snap:*")) == snaps, "a fork writes no snapshot bytes"
        new_keys = [k for k in after if k not in before]
        # the fork's own keys, and at most one recall page: the source's recall tail, sealed so that both share
        # it (memoryd/sessions/recall/pages.py), and the tenant's page reference counts the first time: the
        # page's bytes move from the tail key, so the cost is counted net (after less before)
        pages = [k for k in new_keys if k.startswith(b"md:rx:{alice}:p:")]
        shared = [*pages, b"md:rx:{alice}:rc"]
        assert len(pages) <= 1 and all(f.session_id.encode() in k for k in new_keys if k not in shared), new_keys
        assert all(k.startswith(b"md:rx:{alice}:tail:") for k in before if k not in after), "only a tail moves"
        costs[size] = sum(after.values()) - sum(before.values())
    snap_bytes = max(int(m) for m in (r.strlen(k) for k in r.scan_iter(match="md:snap:*:c:*")))
    print(f"fork cost in Redis bytes: {costs}, one snapshot chunk: {snap_bytes}")
    # measured: a few KiB whatever the length (head + the log tail after the last snapshot)
    assert costs[4000] < 12_000 and costs[40] < 12_000, costs
    assert costs[4000] < snap_bytes / 4, (costs, snap_bytes)
    r.close()


# -- tenants --------------------------------------------------------------------------------------


def test_tenants_walled_off(stub, tiny_model) -> None:  # noqa: F811
    sid = new_session(stub, [[1, 2, 3, 4, 5]], sid="secret")
    before = exported(stub, sid, ALICE)
    NF = grpc.StatusCode.NOT_FOUND
    calls = [
        lambda: stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=BOB),
        lambda: stub.Append(pb.AppendRequest(session_id=sid, tokens=[1]), metadata=BOB),
        lambda: stub.ForkSession(pb.ForkSessionRequest(session_id=sid, new_session_id="stolen"), metadata=BOB),
        lambda: stub.DeleteSession(pb.DeleteSessionRequest(session_id=sid), metadata=BOB),
        lambda: stub.ResetSession(pb.ResetSessionRequest(session_id=sid), metadata=BOB),
        lambda: stub.Generate(pb.GenerateRequest(session_id=sid, max_tokens=2), metadata=BOB),
        lambda: stub.ExportSession(pb.ExportSessionRequest(session_id=sid), metadata=BOB),
    ]
    for c in calls:
        assert code_of(c) == NF
    assert sid not in {s.session_id for s in stub.ListSessions(pb.ListSessionsRequest(), metadata=BOB).sessions}
    # bob may use the same id for his own session; it is another session
    assert stub.CreateSession(pb.CreateSessionRequest(session_id=sid), metadata=BOB).offset == 0
    stub.Append(pb.AppendRequest(session_id=sid, tokens=[9, 9]), metadata=BOB)
    assert exported(stub, sid, ALICE) == before
    assert stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=ALICE).offset == 5
    assert stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=BOB).offset == 2
    stub.DeleteSession(pb.DeleteSessionRequest(session_id=sid), metadata=BOB)
    assert stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=ALICE).offset == 5


# -- concurrency ----------------------------------------------------------------------------------


def test_32_concurrent_sessions_equal_sequential(stub, tiny_model) -> None:  # noqa: F811
    rng = random.Random(6)
    work = {f"cc-{i}": rand_pieces(rng, 6, 1, 24) for i in range(32)}
    for sid in work:
        stub.CreateSession(pb.CreateSessionRequest(session_id=sid), metadata=ALICE)
        stub.CreateSession(pb.CreateSessionRequest(session_id=sid + "-seq"), metadata=ALICE)

    def feed(sid: str) -> int:
        off = 0
        for p in work[sid]:
            off = stub.Append(pb.AppendRequest(session_id=sid, tokens=p, expected_offset=off), metadata=ALICE).offset
        return off

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        offsets = list(pool.map(feed, work))
    assert offsets == [sum(map(len, ps)) for ps in work.values()]
    for sid, ps in work.items():
        for p in ps:
            stub.Append(pb.AppendRequest(session_id=sid + "-seq", tokens=p), metadata=ALICE)
    for i, sid in enumerate(work):
        conc = export_bytes(stub, sid, ALICE)
        seq = export_bytes(stub, sid + "-seq", ALICE)
        assert state_tensors(tiny_model, conc).keys() == state_tensors(tiny_model, seq).keys()
        assert_same_state(state_tensors(tiny_model, conc), state_tensors(tiny_model, seq))
        if i < 4:
            assert_same_state(state_tensors(tiny_model, conc), reference_state(tiny_model, work[sid]))


# -- export / import ------------------------------------------------------------------------------


def test_export_import_roundtrip(stub, tiny_model) -> None:  # noqa: F811
    sid = new_session(stub, rand_pieces(random.Random(7), 5), sid="exp")
    chunks = list(stub.ExportSession(pb.ExportSessionRequest(session_id=sid, chunk_bytes=4096), metadata=ALICE))
    assert chunks[0].WhichOneof("chunk") == "header" and len(chunks) > 3
    assert all(len(c.data) <= 4096 for c in chunks[1:])
    chunks[0].header.session_id = "exp-copy"
    s = stub.ImportSession(iter(chunks), metadata=BOB)
    assert (s.session_id, s.tenant, s.offset) == ("exp-copy", "bob", chunks[0].header.offset)
    assert exported(stub, "exp-copy", BOB) == exported(stub, sid, ALICE)
    stub.Append(pb.AppendRequest(session_id=sid, tokens=[3, 1, 4]), metadata=ALICE)
    stub.Append(pb.AppendRequest(session_id="exp-copy", tokens=[3, 1, 4]), metadata=BOB)
    a = state_tensors(tiny_model, export_bytes(stub, sid, ALICE))
    assert_same_state(a, state_tensors(tiny_model, export_bytes(stub, "exp-copy", BOB)))


# -- generated stubs --------------------------------------------------------------------------------


def test_stubs_regenerate_identically(tmp_path: Path) -> None:
    subprocess.run(["bash", str(ROOT / "scripts" / "gen_proto.sh"), str(tmp_path)], check=True, env=child_env())
    shipped = ROOT / "sdk" / "memoryd_sdk" / "proto"
    for name in ("memoryd_pb2.py", "memoryd_pb2.pyi", "memoryd_pb2_grpc.py"):
        assert (tmp_path / name).read_bytes() == (shipped / name).read_bytes(), f"{name} is stale: run gen_proto.sh"


def test_stubs_import_without_torch() -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from memoryd_sdk.proto import memoryd_pb2, memoryd_pb2_grpc\n"
        "assert memoryd_pb2_grpc.MemoryServiceStub and 'torch' not in [m for m in sys.modules if sys.modules[m]]\n"
    )
    env = child_env()
    env["PYTHONPATH"] = str(ROOT / "sdk")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd="/")


def test_cancelled_commit_generation_commits_nothing(stub) -> None:
    sid = new_session(stub, rand_pieces(random.Random(9), 3))
    before = exported(stub, sid, ALICE)
    call = stub.Generate(pb.GenerateRequest(session_id=sid, max_tokens=64, commit=True), metadata=ALICE)
    first = next(call)
    call.cancel()
    rest = []
    with pytest.raises(grpc.RpcError) as e:
        rest = list(call)
    assert e.value.code() == grpc.StatusCode.CANCELLED and not first.done and not rest
    time.sleep(0.2)  # the server notices the cancellation at its next token
    assert exported(stub, sid, ALICE) == before


# -- sampling parameters (issue 18) ------------------------------------------------------------------


def replay_logits(model, pieces: list[list[int]]):
    """A solo in-process state of the session's tokens (the reference the tests compute from)."""
    from model import StreamState

    st = StreamState.fresh(model)
    for p in pieces:
        st.append(p)
    return st


def test_generate_n_samples_are_n_seeded_generations(stub) -> None:
    """n = 3: each sample's messages carry its index, each sample ends with its own finish message,
    the last message counts them all; sample i is the generation seeded with seed + i; the session
    is unchanged."""
    sid = new_session(stub, rand_pieces(random.Random(11), 3))
    before = exported(stub, sid, ALICE)
    req = pb.GenerateRequest(session_id=sid, max_tokens=10, temperature=1.2, seed=1000, n=3, prompt_text="go")
    evs = list(stub.Generate(req, metadata=ALICE))
    samples: dict[int, list[int]] = {0: [], 1: [], 2: []}
    ends = {}
    for e in evs[:-1]:
        samples[e.index] += e.tokens
        if e.finish_reason:
            ends[e.index] = e
    assert evs[-1].done and evs[-1].generated_tokens == sum(map(len, samples.values()))
    assert set(ends) == {0, 1, 2} and all(ends[i].generated_tokens == len(samples[i]) for i in ends)
    for i in range(3):
        one = pb.GenerateRequest(session_id=sid, max_tokens=10, temperature=1.2, seed=1000 + i, prompt_text="go")
        assert [t for e in stub.Generate(one, metadata=ALICE) for t in e.tokens] == samples[i], i
    assert len({tuple(v) for v in samples.values()}) > 1, "independent samples"
    assert exported(stub, sid, ALICE) == before


def test_generate_logprobs_match_the_model(stub, tiny_model) -> None:  # noqa: F811
    """Each streamed token carries its log-probability and the top 4, as log_softmax of the logits
    of a solo replay gives them (batched provisional forwards differ from solo ones in the last bits)."""
    pieces = rand_pieces(random.Random(12), 3)
    sid = new_session(stub, pieces)
    req = pb.GenerateRequest(session_id=sid, max_tokens=6, temperature=0.9, seed=5, logprobs=True, top_logprobs=4)
    evs = list(stub.Generate(req, metadata=ALICE))
    st = replay_logits(tiny_model, pieces)
    n = 0
    for e in evs:
        assert len(e.logprobs) == len(e.tokens)
        for t, lp in zip(e.tokens, e.logprobs, strict=True):
            ref = torch.log_softmax(st.logits().double(), -1)
            assert lp.token == t and math.isclose(lp.logprob, ref[t].item(), abs_tol=1e-4)
            assert [x.token for x in lp.top] == ref.argsort(descending=True)[:4].tolist()
            assert all(math.isclose(x.logprob, ref[x.token].item(), abs_tol=1e-4) for x in lp.top)
            assert lp.text or t >= 256, "each token's text comes with it"
            st.append([t])
            n += 1
    assert n == 6


def test_generate_penalties_and_bias_match_a_reference(stub, tiny_model) -> None:  # noqa: F811
    """Greedy decoding with penalties and a logit bias through the daemon equals the same rules
    applied here to the logits of a solo replay, token by token."""
    pieces = rand_pieces(random.Random(13), 2)
    sid = new_session(stub, pieces)
    prompt = [65, 66, 67, 65]
    kw = {"presence_penalty": 0.8, "frequency_penalty": 0.6, "repetition_penalty": 1.4, "logit_bias": {70: 2.0}}
    req = pb.GenerateRequest(session_id=sid, max_tokens=12, prompt_tokens=prompt, **kw)
    out = [t for e in stub.Generate(req, metadata=ALICE) for t in e.tokens]
    st = replay_logits(tiny_model, [*pieces, prompt])
    ref: list[int] = []
    for _ in out:
        x = st.logits().double().tolist()
        x[70] += 2.0
        for t in range(len(x)):
            if t in prompt or t in ref:
                x[t] = x[t] / 1.4 if x[t] > 0 else x[t] * 1.4
            x[t] -= 0.6 * ref.count(t) + 0.8 * (t in ref)
        ref.append(max(range(len(x)), key=lambda t: x[t]))
        st.append([ref[-1]])
    assert out == ref
    plain = [
        t
        for e in stub.Generate(pb.GenerateRequest(session_id=sid, max_tokens=12, prompt_tokens=prompt), metadata=ALICE)
        for t in e.tokens
    ]
    assert plain != out, "the settings changed the output"
