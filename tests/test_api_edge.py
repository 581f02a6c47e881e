"""The API edge against a real `memoryd serve` and a real redis-server (issue 10): bytes that do not
decode, size floors and ceilings, every limit reported by GetModel and enforced, every code the proto
documents provoked from its rpc, import ids and offsets, sessions of another model, reflection v1."""

from __future__ import annotations

import hashlib
import json
import signal
import time
from pathlib import Path

import grpc
import pytest
from api_edge_helpers import (
    AUTH_FLAG,
    SERVICE,
    common_codes,
    documented_codes,
    md,
    raw_call,
    rpc_error,
    status_of,
)
from memoryd_sdk.proto import memoryd_pb2 as pb
from service_fixtures import (  # noqa: F401 (fixtures)
    Daemon,
    RedisServer,
    canon,
    export_bytes,
    exported,
    tiny_checkpoint,
)

IA, NF, AE = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.ALREADY_EXISTS
RE, AB, FP = grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.ABORTED, grpc.StatusCode.FAILED_PRECONDITION
OK, UNAUTH = grpc.StatusCode.OK, grpc.StatusCode.UNAUTHENTICATED
V = 258  # tiny preset vocabulary
MAX_MSG, MAX_APPEND, MAX_GEN, MAX_SESSIONS = 256 * 1024, 512, 64, 6
GARBAGE = b"\x0a\x7fonly-a-few-bytes"  # field 1, 127 bytes long, but 16 follow: not any message
BAD_UTF8 = b"\x0a\x06victim\x12\x01\xff"  # AppendRequest{session_id: "victim", text: <invalid UTF-8>}


@pytest.fixture(scope="module")
def redis_mod(tmp_path_factory: pytest.TempPathFactory):
    server = RedisServer(tmp_path_factory.mktemp("redis-edge"))
    server.start()
    yield server
    server.kill(signal.SIGTERM)


def _daemon(workdir: Path, checkpoint: Path, redis: RedisServer, *extra: str) -> Daemon:
    d = Daemon(
        workdir,
        checkpoint,
        redis.url,
        "--auth-tokens",
        AUTH_FLAG,
        "--max-sessions-per-tenant",
        str(MAX_SESSIONS),
        "--max-append-tokens",
        str(MAX_APPEND),
        "--max-generate-tokens",
        str(MAX_GEN),
        "--max-message-bytes",
        "256KiB",
        *extra,
    )
    d.start()
    return d


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path, redis_mod: RedisServer):  # noqa: F811
    d = _daemon(tmp_path_factory.mktemp("memoryd-edge"), tiny_checkpoint, redis_mod)
    yield d
    d.close()


@pytest.fixture(scope="module")
def stub(daemon: Daemon):
    return daemon.stub()


def new_session(stub, tenant: str, sid: str, tokens: list[int]) -> str:
    stub.CreateSession(pb.CreateSessionRequest(session_id=sid), metadata=md(tenant))
    if tokens:
        stub.Append(pb.AppendRequest(session_id=sid, tokens=tokens, append_id="seed"), metadata=md(tenant))
    return sid


def names(stub, tenant: str) -> list[str]:
    return [s.session_id for s in stub.ListSessions(pb.ListSessionsRequest(), metadata=md(tenant)).sessions]


@pytest.fixture(scope="module")
def victims(stub) -> dict[str, str]:
    """One session with 37 tokens in each tenant the tests refuse things in."""
    return {t: new_session(stub, t, "victim", list(range(37))) for t in ("edge", "codes", "limits")}


# -- bytes that do not decode, oversize requests, no token: every method -----------------------------


@pytest.mark.parametrize("method", [m.name for m in SERVICE.methods])
def test_common_refusals_on_every_method(daemon: Daemon, stub, victims, method: str) -> None:
    E = md("edge")
    before, listed = exported(stub, "victim", E), names(stub, "edge")
    want = SERVICE.methods_by_name[method].input_type.full_name
    e = rpc_error(lambda: raw_call(daemon.channel(), method, [GARBAGE], E))
    assert e.code() == IA, (e.code(), e.details())
    assert want in e.details() and "does not decode" in e.details(), e.details()
    e = rpc_error(lambda: raw_call(daemon.channel(), method, [b"\x00" * (MAX_MSG + 1)], E))
    assert e.code() == RE, (e.code(), e.details())
    e = rpc_error(lambda: raw_call(daemon.channel(), method, [b""]))  # a valid (empty) message, no token
    assert e.code() == UNAUTH, (e.code(), e.details())
    assert exported(stub, "victim", E) == before, f"{method} changed the session"
    assert names(stub, "edge") == listed, f"{method} made or removed a session"


def test_undecodable_after_valid_messages(daemon: Daemon, stub, victims) -> None:
    E = md("edge")
    e = rpc_error(lambda: raw_call(daemon.channel(), "Append", [BAD_UTF8], E))
    assert e.code() == IA and "memoryd.v1.AppendRequest" in e.details() and "UTF-8" in e.details()
    # AppendStream: the messages before the bad one stay applied, and the trailer says where it stands
    sid = new_session(stub, "edge", "stream-victim", [1, 2, 3])
    good = pb.AppendRequest(session_id=sid, tokens=[4, 5], append_id="ok-1").SerializeToString()
    e = rpc_error(lambda: raw_call(daemon.channel(), "AppendStream", [good, GARBAGE], E))
    assert e.code() == IA and "memoryd.v1.AppendRequest" in e.details()
    assert dict(e.trailing_metadata())["memoryd-offset"] == "5"
    assert stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=E).offset == 5
    # ImportSession: a valid header, then bytes that are not a chunk: nothing is created
    chunks = list(stub.ExportSession(pb.ExportSessionRequest(session_id="victim"), metadata=E))
    header = chunks[0]
    header.header.session_id = "never-made"
    e = rpc_error(lambda: raw_call(daemon.channel(), "ImportSession", [header.SerializeToString(), GARBAGE], E))
    assert e.code() == IA and "memoryd.v1.SessionChunk" in e.details()
    assert "never-made" not in names(stub, "edge")
    stub.DeleteSession(pb.DeleteSessionRequest(session_id=sid), metadata=E)


# -- limits: reported by GetModel, each enforced at exactly the reported value ------------------------


def _generate(stub, tenant: str, **kw):
    req = pb.GenerateRequest(session_id="victim", **{"max_tokens": 1, **kw})
    return lambda: list(stub.Generate(req, metadata=md(tenant)))


def _chunks_of(stub, tenant: str, size: int) -> list[pb.SessionChunk]:
    return list(stub.ExportSession(pb.ExportSessionRequest(session_id="victim", chunk_bytes=size), metadata=md(tenant)))


def test_get_model_reports_every_limit_and_each_holds(stub, victims) -> None:
    L = md("limits")
    info = stub.GetModel(pb.GetModelRequest(), metadata=L)
    lim = info.limits
    max_chunk = min(4 << 20, MAX_MSG - 1024)
    assert (lim.max_append_tokens, lim.max_generate_tokens, lim.max_message_bytes) == (MAX_APPEND, MAX_GEN, MAX_MSG)
    assert (info.max_append_tokens, info.max_generate_tokens, info.max_message_bytes) == (MAX_APPEND, MAX_GEN, MAX_MSG)
    assert (lim.max_top_k, lim.max_sessions_per_tenant, lim.max_chunk_bytes) == (V, MAX_SESSIONS, max_chunk)
    assert lim.min_chunk_bytes <= lim.default_chunk_bytes <= lim.max_chunk_bytes

    create = lambda **kw: lambda: stub.CreateSession(pb.CreateSessionRequest(**kw), metadata=L)
    append = lambda **kw: lambda: stub.Append(pb.AppendRequest(session_id="victim", **kw), metadata=L)
    export = lambda n: lambda: _chunks_of(stub, "limits", n)
    recall = lambda **kw: (
        lambda: stub.Recall(pb.RecallRequest(session_id="victim", **{"query": "q", "k": 1, **kw}), metadata=L)
    )
    n_meta, key, val = lim.max_metadata_entries, lim.max_metadata_key_chars, lim.max_metadata_value_chars
    # field -> (a request at the limit (None: see NOT_AT_LIMIT), a request just over it, the code over it)
    probes = {
        "max_append_tokens": (append(tokens=[1] * MAX_APPEND), append(tokens=[1] * (MAX_APPEND + 1)), RE),
        "max_generate_tokens": (
            _generate(stub, "limits", max_tokens=MAX_GEN),
            _generate(stub, "limits", max_tokens=MAX_GEN + 1),
            RE,
        ),
        "max_metadata_entries": (
            create(session_id="m1", metadata={str(i): "" for i in range(n_meta)}),
            create(metadata={str(i): "" for i in range(n_meta + 1)}),
            IA,
        ),
        "max_metadata_key_chars": (
            create(session_id="m2", metadata={"k" * key: ""}),
            create(metadata={"k" * (key + 1): ""}),
            IA,
        ),
        "max_metadata_value_chars": (
            create(session_id="m3", metadata={"k": "v" * val}),
            create(metadata={"k": "v" * (val + 1)}),
            IA,
        ),
        "max_stop_strings": (
            _generate(stub, "limits", stop=["x"] * lim.max_stop_strings),
            _generate(stub, "limits", stop=["x"] * (lim.max_stop_strings + 1)),
            RE,
        ),
        "max_stop_string_chars": (
            _generate(stub, "limits", stop=["x" * lim.max_stop_string_chars]),
            _generate(stub, "limits", stop=["x" * (lim.max_stop_string_chars + 1)]),
            RE,
        ),
        "max_stop_tokens": (
            _generate(stub, "limits", stop_tokens=[1] * lim.max_stop_tokens),
            _generate(stub, "limits", stop_tokens=[1] * (lim.max_stop_tokens + 1)),
            RE,
        ),
        "max_top_k": (
            _generate(stub, "limits", top_k=V, temperature=1),
            _generate(stub, "limits", top_k=V + 1, temperature=1),
            IA,
        ),
        "max_temperature": (
            _generate(stub, "limits", temperature=lim.max_temperature),
            _generate(stub, "limits", temperature=lim.max_temperature * 1.01),
            IA,
        ),
        "max_n": (
            _generate(stub, "limits", n=lim.max_n, temperature=1),
            _generate(stub, "limits", n=lim.max_n + 1, temperature=1),
            RE,
        ),
        "max_top_logprobs": (
            _generate(stub, "limits", logprobs=True, top_logprobs=lim.max_top_logprobs),
            _generate(stub, "limits", logprobs=True, top_logprobs=lim.max_top_logprobs + 1),
            RE,
        ),
        "max_logit_bias_entries": (  # the tiny vocabulary has fewer ids than the limit: all of them pass
            _generate(stub, "limits", logit_bias={i % V: 0.5 for i in range(min(V, lim.max_logit_bias_entries))}),
            _generate(stub, "limits", logit_bias={i: 0.5 for i in range(lim.max_logit_bias_entries + 1)}),
            RE,
        ),
        "max_page_size": (
            lambda: stub.ListSessions(pb.ListSessionsRequest(page_size=lim.max_page_size), metadata=L),
            lambda: stub.ListSessions(pb.ListSessionsRequest(page_size=lim.max_page_size + 1), metadata=L),
            IA,
        ),
        "min_chunk_bytes": (export(lim.min_chunk_bytes), export(lim.min_chunk_bytes - 1), IA),
        "max_chunk_bytes": (export(lim.max_chunk_bytes), export(lim.max_chunk_bytes + 1), IA),
        "max_session_id_chars": (
            create(session_id="s" * lim.max_session_id_chars),
            create(session_id="s" * (lim.max_session_id_chars + 1)),
            IA,
        ),
        "max_append_id_chars": (
            append(tokens=[1], append_id="a" * lim.max_append_id_chars),
            append(tokens=[1], append_id="a" * (lim.max_append_id_chars + 1)),
            IA,
        ),
        "max_import_bytes": (None, None, RE),  # below, with a real export
        "max_append_text_chars": (None, append(text="a" * (lim.max_append_text_chars + 1)), RE),
        "max_message_bytes": (None, None, RE),  # test_common_refusals_on_every_method
        "max_sessions_per_tenant": (None, None, RE),  # test_documented_codes_are_the_codes_returned (tenant "full")
        "default_page_size": (None, None, None),
        "default_chunk_bytes": (None, None, None),
        "max_role_chars": (None, None, None),  # the tiny model has no chat template: checked on ROLE_RE below
        "max_recall_k": (recall(k=lim.max_recall_k), recall(k=lim.max_recall_k + 1), IA),
        "max_recall_query_chars": (
            recall(query="q" * lim.max_recall_query_chars),
            recall(query="q" * (lim.max_recall_query_chars + 1)),
            IA,
        ),
        "max_recall_budget_tokens": (
            _generate(stub, "limits", recall=pb.RecallOptions(budget_tokens=lim.max_recall_budget_tokens)),
            _generate(stub, "limits", recall=pb.RecallOptions(budget_tokens=lim.max_recall_budget_tokens + 1)),
            IA,
        ),
        "default_recall_k": (None, None, None),
        "default_recall_budget_tokens": (None, None, None),
    }
    fields = {f.name for f in pb.ServerLimits.DESCRIPTOR.fields}
    assert set(probes) == fields, (
        f"limits without a probe: {fields - set(probes)}; probes of no limit: {set(probes) - fields}"
    )
    for field, (at, over, code) in probes.items():
        if at is not None:
            assert status_of(at) == OK, f"{field}: a request at the limit was refused"
        if over is not None:
            e = rpc_error(over)
            assert e.code() == code, (field, e.code(), e.details())
            assert str(getattr(lim, field) if "temperature" not in field else "100") in e.details(), (
                field,
                e.details(),
            )
    from memoryd.sessions.chat import ROLE_RE

    assert ROLE_RE.fullmatch("r" * lim.max_role_chars) and not ROLE_RE.fullmatch("r" * (lim.max_role_chars + 1))
    # text: the character limit is checked before encoding; at the limit, the token limit decides
    at = rpc_error(append(text="a" * lim.max_append_text_chars))
    assert at.code() == RE and "tokens" in at.details() and "characters" not in at.details()
    # export chunk sizes: exactly chunk_bytes each but the last; 0 = the default
    total = len(b"".join(c.data for c in _chunks_of(stub, "limits", 0)[1:]))
    for size, want in ((0, lim.default_chunk_bytes), (lim.min_chunk_bytes, lim.min_chunk_bytes)):
        sizes = [len(c.data) for c in _chunks_of(stub, "limits", size)[1:] if c.HasField("data")]
        assert sizes[:-1] == [want] * (len(sizes) - 1) and 0 < sizes[-1] <= want and sum(sizes) == total
    # import: data chunks under the floor are refused unless last; the size ceiling is the header's
    chunks = _chunks_of(stub, "limits", lim.min_chunk_bytes)
    data = b"".join(c.data for c in chunks[1:])
    head = chunks[0].header
    head.session_id = "imported"
    tiny = [pb.SessionChunk(data=data[:100]), pb.SessionChunk(data=data[100:])]
    e = rpc_error(lambda: stub.ImportSession(iter([pb.SessionChunk(header=head), *tiny]), metadata=L))
    assert e.code() == IA and str(lim.min_chunk_bytes) in e.details()
    big = pb.ExportHeader()
    big.CopyFrom(head)
    big.total_bytes = lim.max_import_bytes + 1
    e = rpc_error(lambda: stub.ImportSession(iter([pb.SessionChunk(header=big)]), metadata=L))
    assert e.code() == RE and str(lim.max_import_bytes) in e.details()
    assert stub.ImportSession(iter(chunks[:1] + chunks[1:]), metadata=L).session_id == "imported"
    for sid in ("m1", "m2", "m3", "s" * lim.max_session_id_chars, "imported"):
        stub.DeleteSession(pb.DeleteSessionRequest(session_id=sid), metadata=L)


# -- every code the proto documents on an rpc, provoked from that rpc -----------------------------------

OTHER_DIGEST = "sha256:" + "1" * 64


@pytest.fixture(scope="module")
def other_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from model import init_model, preset, save_checkpoint

    out = tmp_path_factory.mktemp("ckpt-other") / "tiny-other"
    save_checkpoint(init_model(preset("tiny"), seed=1), out)
    return out


@pytest.fixture(scope="module")
def foreign(tmp_path_factory: pytest.TempPathFactory, other_checkpoint: Path, redis_mod: RedisServer, daemon):
    """A second daemon serving another model on the same Redis, with two sessions of tenant "foreign":
    f-snap (its newest snapshot holds its whole state) and f-tail (tokens past its snapshot)."""
    b = _daemon(tmp_path_factory.mktemp("memoryd-other"), other_checkpoint, redis_mod, "--snapshot-interval", "1")
    try:
        yield _foreign_sessions(b, redis_mod, daemon)
    finally:
        b.close()


def _foreign_sessions(b: Daemon, redis_mod: RedisServer, daemon: Daemon) -> Daemon:
    sb, F = b.stub(), md("foreign")
    new_session(sb, "foreign", "f-snap", list(range(40)))
    new_session(sb, "foreign", "f-tail", [1, 2, 3])  # under one mini-batch: no step, no snapshot
    r = redis_mod.client()
    deadline = time.monotonic() + 30
    while r.hget("md:s:{foreign/f-snap}:h", "snap_off") != b"40":  # the periodic snapshot is written in the background
        assert time.monotonic() < deadline, "the other daemon wrote no snapshot of f-snap"
        time.sleep(0.05)
    r.close()
    assert (
        sb.GetModel(pb.GetModelRequest(), metadata=F).digest
        != daemon.stub().GetModel(pb.GetModelRequest(), metadata=F).digest
    )
    return b


@pytest.fixture(scope="module")
def full_tenant(stub) -> None:
    for i in range(MAX_SESSIONS):
        new_session(stub, "full", f"full-{i}", [1, 2] if i == 0 else [])


def _cases(stub, victim_export: list[pb.SessionChunk]) -> dict[tuple[str, str], object]:
    C, F, U = md("codes"), md("foreign"), md("full")

    def call(method, req, metadata=C):
        return lambda: getattr(stub, method)(req, metadata=metadata, timeout=30)

    def stream(method, reqs, metadata=C):
        return lambda: getattr(stub, method)(iter(reqs), metadata=metadata, timeout=30)

    def imported(**changes) -> list[pb.SessionChunk]:
        head = pb.ExportHeader()
        head.CopyFrom(victim_export[0].header)
        for k, v in {"session_id": "import-new", **changes}.items():
            setattr(head, k, v)
        return [pb.SessionChunk(header=head), *victim_export[1:]]

    A = lambda sid="victim", **kw: pb.AppendRequest(session_id=sid, **kw)
    G = lambda sid="victim", **kw: pb.GenerateRequest(session_id=sid, **{"max_tokens": 2, **kw})
    return {
        ("CreateSession", "INVALID_ARGUMENT"): call("CreateSession", pb.CreateSessionRequest(session_id="bad id")),
        ("CreateSession", "ALREADY_EXISTS"): call("CreateSession", pb.CreateSessionRequest(session_id="victim")),
        ("CreateSession", "RESOURCE_EXHAUSTED"): call("CreateSession", pb.CreateSessionRequest(), U),
        ("GetSession", "INVALID_ARGUMENT"): call("GetSession", pb.GetSessionRequest()),
        ("GetSession", "NOT_FOUND"): call("GetSession", pb.GetSessionRequest(session_id="ghost")),
        ("ListSessions", "INVALID_ARGUMENT"): call("ListSessions", pb.ListSessionsRequest(page_token="%%")),
        ("DeleteSession", "INVALID_ARGUMENT"): call("DeleteSession", pb.DeleteSessionRequest(session_id="a/b")),
        ("DeleteSession", "NOT_FOUND"): call("DeleteSession", pb.DeleteSessionRequest(session_id="ghost")),
        ("ResetSession", "INVALID_ARGUMENT"): call("ResetSession", pb.ResetSessionRequest()),
        ("ResetSession", "NOT_FOUND"): call("ResetSession", pb.ResetSessionRequest(session_id="ghost")),
        ("ResetSession", "ABORTED"): call(
            "ResetSession", pb.ResetSessionRequest(session_id="victim", expected_offset=1)
        ),
        ("ResetSession", "FAILED_PRECONDITION"): call("ResetSession", pb.ResetSessionRequest(session_id="f-snap"), F),
        ("ForkSession", "INVALID_ARGUMENT"): call(
            "ForkSession", pb.ForkSessionRequest(session_id="victim", new_session_id="x y")
        ),
        ("ForkSession", "NOT_FOUND"): call("ForkSession", pb.ForkSessionRequest(session_id="ghost")),
        ("ForkSession", "ALREADY_EXISTS"): call(
            "ForkSession", pb.ForkSessionRequest(session_id="victim", new_session_id="victim")
        ),
        ("ForkSession", "ABORTED"): call("ForkSession", pb.ForkSessionRequest(session_id="victim", expected_offset=1)),
        ("ForkSession", "RESOURCE_EXHAUSTED"): call("ForkSession", pb.ForkSessionRequest(session_id="full-0"), U),
        ("ForkSession", "FAILED_PRECONDITION"): call(
            "ForkSession", pb.ForkSessionRequest(session_id="f-snap", new_session_id="f-copy"), F
        ),
        ("UpdateSession", "INVALID_ARGUMENT"): call("UpdateSession", pb.UpdateSessionRequest(session_id="victim")),
        ("UpdateSession", "NOT_FOUND"): call(
            "UpdateSession", pb.UpdateSessionRequest(session_id="ghost", metadata={"k": "v"})
        ),
        ("UpdateSession", "ABORTED"): call(
            "UpdateSession",
            pb.UpdateSessionRequest(session_id="victim", metadata={"k": "v"}, expected_metadata={"k": "other"}),
        ),
        ("UpdateSession", "RESOURCE_EXHAUSTED"): call(
            "UpdateSession", pb.UpdateSessionRequest(session_id="victim", metadata={f"k{i}": "v" for i in range(65)})
        ),
        ("Append", "INVALID_ARGUMENT"): call("Append", A(tokens=[V])),
        ("Append", "RESOURCE_EXHAUSTED"): call("Append", A(tokens=[1] * (MAX_APPEND + 1))),
        ("Append", "NOT_FOUND"): call("Append", A("ghost", tokens=[1])),
        ("Append", "ABORTED"): call("Append", A(tokens=[1], expected_offset=1)),
        ("Append", "FAILED_PRECONDITION"): call("Append", A("f-snap", tokens=[1]), F),
        ("AppendStream", "INVALID_ARGUMENT"): stream("AppendStream", []),
        ("AppendStream", "RESOURCE_EXHAUSTED"): stream("AppendStream", [A(text="a" * (MAX_APPEND * 8 + 1))]),
        ("AppendStream", "NOT_FOUND"): stream("AppendStream", [A("ghost", tokens=[1])]),
        ("AppendStream", "ABORTED"): stream("AppendStream", [A(tokens=[1], expected_offset=0)]),
        ("AppendStream", "FAILED_PRECONDITION"): stream("AppendStream", [A("f-tail", tokens=[1])], F),
        ("Generate", "INVALID_ARGUMENT"): call("Generate", G(top_p=2)),
        ("Generate", "RESOURCE_EXHAUSTED"): call("Generate", G(max_tokens=MAX_GEN + 1)),
        ("Generate", "NOT_FOUND"): call("Generate", G("ghost")),
        ("Generate", "ABORTED"): call("Generate", G(expected_offset=3)),
        ("Generate", "FAILED_PRECONDITION"): call("Generate", G("f-snap"), F),
        ("ExportSession", "INVALID_ARGUMENT"): call(
            "ExportSession", pb.ExportSessionRequest(session_id="victim", chunk_bytes=1)
        ),
        ("ExportSession", "NOT_FOUND"): call("ExportSession", pb.ExportSessionRequest(session_id="ghost")),
        ("ExportSession", "FAILED_PRECONDITION"): call(
            "ExportSession", pb.ExportSessionRequest(session_id="f-tail"), F
        ),
        ("ImportSession", "INVALID_ARGUMENT"): stream("ImportSession", imported(offset=36)),
        ("ImportSession", "RESOURCE_EXHAUSTED"): stream("ImportSession", imported(), U),
        ("ImportSession", "ALREADY_EXISTS"): stream("ImportSession", imported(session_id="victim")),
        ("ImportSession", "FAILED_PRECONDITION"): stream("ImportSession", imported(model_digest=OTHER_DIGEST)),
        ("Recall", "INVALID_ARGUMENT"): call("Recall", pb.RecallRequest(session_id="victim", query="q", k=0)),
        ("Recall", "NOT_FOUND"): call("Recall", pb.RecallRequest(session_id="ghost", query="q", k=1)),
        ("Recall", "FAILED_PRECONDITION"): call("Recall", pb.RecallRequest(session_id="f-snap", query="q", k=1), F),
        ("ReadLog", "INVALID_ARGUMENT"): call("ReadLog", pb.ReadLogRequest(session_id="victim", last_tokens=0)),
        ("ReadLog", "NOT_FOUND"): call("ReadLog", pb.ReadLogRequest(session_id="ghost", last_tokens=1)),
        ("ReadLog", "FAILED_PRECONDITION"): call("ReadLog", pb.ReadLogRequest(session_id="f-snap", last_tokens=1), F),
    }


def test_documented_codes_are_the_codes_returned(stub, victims, foreign, full_tenant) -> None:
    """Walk the proto: each rpc's documented codes are exactly those provoked here, and each is returned."""
    documented = documented_codes()
    assert set(documented) == {m.name for m in SERVICE.methods}
    assert common_codes() >= {"INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "UNAUTHENTICATED", "UNAVAILABLE"}
    C = md("codes")
    cases = _cases(stub, list(stub.ExportSession(pb.ExportSessionRequest(session_id="victim"), metadata=C)))
    provoked: dict[str, set[str]] = {}
    for rpc, code in cases:
        provoked.setdefault(rpc, set()).add(code)
    for rpc, codes in documented.items():
        assert provoked.get(rpc, set()) == codes, (
            f"{rpc}: documented {sorted(codes)}, provoked {sorted(provoked.get(rpc, ()))}"
        )
    before = {t: (exported(stub, "victim", C), names(stub, t)) for t in ("codes",)}
    for (rpc, code), fn in cases.items():
        e = rpc_error(fn)
        assert e.code().name == code, f"{rpc} {code}: got {e.code().name} {e.details()}"
        assert e.details(), f"{rpc} {code}: no message"
    assert (exported(stub, "victim", C), names(stub, "codes")) == before["codes"], "a refused call changed something"
    assert names(stub, "full") == [f"full-{i}" for i in range(MAX_SESSIONS)]
    assert sorted(names(stub, "foreign")) == ["f-snap", "f-tail"]


# -- import: which id, which offset ---------------------------------------------------------------------


def test_import_keeps_the_exported_id_and_checks_the_offset(stub, victims) -> None:
    E, IDS = md("edge"), md("ids")
    chunks = list(stub.ExportSession(pb.ExportSessionRequest(session_id="victim"), metadata=E))
    head = chunks[0].header
    assert (head.session_id, head.source_session_id, head.offset) == ("victim", "victim", 37)

    def imp(**changes) -> pb.Session:
        h = pb.ExportHeader()
        h.CopyFrom(head)
        for k, v in changes.items():
            setattr(h, k, v)
        return stub.ImportSession(iter([pb.SessionChunk(header=h), *chunks[1:]]), metadata=IDS)

    s = imp(session_id="")  # empty: keep the exported id
    assert (s.session_id, s.offset, s.tenant) == ("victim", 37, "ids")
    assert exported(stub, "victim", IDS) == exported(stub, "victim", E)
    assert imp(session_id="renamed").session_id == "renamed"
    fresh = imp(session_id="", source_session_id="")  # no id at all: a fresh one
    assert len(fresh.session_id) == 32 and fresh.session_id not in ("victim", "renamed")
    for off in (36, 38, 0):
        e = rpc_error(lambda off=off: imp(session_id="wrong-offset", offset=off))
        assert e.code() == IA and f"offset {off}" in e.details() and "37" in e.details(), e.details()
    assert sorted(names(stub, "ids")) == sorted(["victim", "renamed", fresh.session_id])
    for sid in names(stub, "ids"):
        stub.DeleteSession(pb.DeleteSessionRequest(session_id=sid), metadata=IDS)


# -- sessions of another model ------------------------------------------------------------------------------


def test_sessions_of_another_model(stub, foreign: Daemon) -> None:
    F, sb = md("foreign"), foreign.stub()
    theirs = sb.GetModel(pb.GetModelRequest(), metadata=F).digest
    ours = stub.GetModel(pb.GetModelRequest(), metadata=F).digest
    # get and list describe it, under its own model
    g = stub.GetSession(pb.GetSessionRequest(session_id="f-snap"), metadata=F)
    assert (g.model_digest, g.offset, g.hot, g.pending_tokens, g.steps, g.state_bytes) == (theirs, 40, False, 0, 0, 0)
    listed = {s.session_id: s for s in stub.ListSessions(pb.ListSessionsRequest(), metadata=F).sessions}
    assert listed["f-tail"].model_digest == theirs and listed["f-tail"].offset == 3
    # export: its stored snapshot, which its own model imports as the same state
    chunks = list(stub.ExportSession(pb.ExportSessionRequest(session_id="f-snap"), metadata=F))
    head = chunks[0].header
    data = b"".join(c.data for c in chunks[1:])
    assert (head.model_digest, head.offset, head.sha256) == (theirs, 40, hashlib.sha256(data).hexdigest())
    assert canon(data) == canon(export_bytes(sb, "f-snap", F))
    head.session_id = "f-moved"
    moved = sb.ImportSession(iter(chunks), metadata=F)
    assert (moved.offset, moved.model_digest) == (40, theirs)
    assert canon(export_bytes(sb, "f-moved", F)) == canon(data)
    e = rpc_error(lambda: stub.ImportSession(iter(chunks), metadata=F))  # not here
    assert e.code() == FP and ours in e.details()
    # tokens past its snapshot: only its own model can replay them
    e = rpc_error(lambda: list(stub.ExportSession(pb.ExportSessionRequest(session_id="f-tail"), metadata=F)))
    assert e.code() == FP and theirs in e.details() and "3 of its 3 tokens" in e.details(), e.details()
    # reading, changing or copying it: refused, nothing changes, and it stays usable by its own model
    refusals = [
        lambda: stub.Append(pb.AppendRequest(session_id="f-snap", tokens=[1]), metadata=F),
        lambda: list(stub.Generate(pb.GenerateRequest(session_id="f-snap", max_tokens=1), metadata=F)),
        lambda: stub.ResetSession(pb.ResetSessionRequest(session_id="f-snap"), metadata=F),
        lambda: stub.ForkSession(pb.ForkSessionRequest(session_id="f-snap", new_session_id="f-fork"), metadata=F),
    ]
    for fn in refusals:
        e = rpc_error(fn)
        assert e.code() == FP and theirs in e.details() and ours in e.details(), e.details()
    assert "f-fork" not in names(stub, "foreign")
    assert sb.Append(pb.AppendRequest(session_id="f-snap", tokens=[7], expected_offset=40), metadata=F).offset == 41
    # delete works here
    assert stub.DeleteSession(pb.DeleteSessionRequest(session_id="f-moved"), metadata=F).offset == 40
    assert status_of(lambda: sb.GetSession(pb.GetSessionRequest(session_id="f-moved"), metadata=F)) == NF


# -- reflection ----------------------------------------------------------------------------------------------


def _reflect(channel: grpc.Channel, requests: list) -> list:
    from memoryd.api.reflection import v1_messages

    Req, Resp = v1_messages()
    call = channel.stream_stream(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        request_serializer=Req.SerializeToString,
        response_deserializer=Resp.FromString,
    )
    return list(call(iter([Req(**r) for r in requests]), timeout=30))


def test_reflection_v1_resolves_the_file_by_path_and_symbol(daemon: Daemon) -> None:
    """What grpcurl does: list services, fetch the file by its import path, resolve a symbol, build a pool."""
    from google.protobuf import descriptor_pb2, descriptor_pool

    listed, by_path, by_symbol, missing = _reflect(
        daemon.channel(),
        [
            {"list_services": ""},
            {"file_by_filename": "memoryd/v1/memoryd.proto"},
            {"file_containing_symbol": "memoryd.v1.MemoryService.Generate"},
            {"file_by_filename": "memoryd.proto"},
        ],
    )
    services = {s.name for s in listed.list_services_response.service}
    assert {"memoryd.v1.MemoryService", "grpc.reflection.v1.ServerReflection", "grpc.health.v1.Health"} <= services
    assert "grpc.reflection.v1alpha.ServerReflection" in services  # older clients still work
    assert missing.error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]  # the old name is gone

    pool = descriptor_pool.DescriptorPool()
    files = {}
    for resp in (by_path, by_symbol):
        for raw in resp.file_descriptor_response.file_descriptor_proto:
            fdp = descriptor_pb2.FileDescriptorProto.FromString(raw)
            files[fdp.name] = fdp
    assert "memoryd/v1/memoryd.proto" in files and files["memoryd/v1/memoryd.proto"].package == "memoryd.v1"
    (dep,) = files["memoryd/v1/memoryd.proto"].dependency
    (dep_resp,) = _reflect(daemon.channel(), [{"file_by_filename": dep}])
    for raw in dep_resp.file_descriptor_response.file_descriptor_proto:
        fdp = descriptor_pb2.FileDescriptorProto.FromString(raw)
        files[fdp.name] = fdp
    pool.Add(files[dep])
    pool.Add(files["memoryd/v1/memoryd.proto"])
    method = pool.FindMethodByName("memoryd.v1.MemoryService.Generate")
    assert (method.input_type.full_name, method.server_streaming) == ("memoryd.v1.GenerateRequest", True)
    assert "max_sessions_per_tenant" in pool.FindMessageTypeByName("memoryd.v1.ServerLimits").fields_by_name
    # the v1 reflection service describes itself too
    (own,) = _reflect(daemon.channel(), [{"file_containing_symbol": "grpc.reflection.v1.ServerReflection"}])
    names_ = [
        descriptor_pb2.FileDescriptorProto.FromString(r).name
        for r in own.file_descriptor_response.file_descriptor_proto
    ]
    assert "grpc/reflection/v1/reflection.proto" in names_


# -- ids, roles and stored bytes (issue 17) --------------------------------------------------------------

BAD_IDS = ["a\n", "\n", "a\x00b", "a\rb", "a\tb", "a b", "a\x7f", "sess\u00e9", "a/b", "x" * 129, "a\u2028b"]
"""Session ids outside [A-Za-z0-9._:-]{1,128}: control characters first (a trailing newline got past
`re.match("^...$")`), then a space, DEL, non-ASCII, a slash and one character too many."""
BAD_APPEND_IDS = ["a\n", "a b", "a\x00", "a\x7f", "caf\u00e9", "x" * 129]


def _id_calls(stub, sid: str, E) -> dict[str, object]:
    """Every rpc that names a session, with `sid` in the named field."""
    return {
        "session_id": [
            lambda: stub.CreateSession(pb.CreateSessionRequest(session_id=sid), metadata=E),
            lambda: stub.GetSession(pb.GetSessionRequest(session_id=sid), metadata=E),
            lambda: stub.Append(pb.AppendRequest(session_id=sid, tokens=[1]), metadata=E),
            lambda: stub.AppendStream(iter([pb.AppendRequest(session_id=sid, tokens=[1])]), metadata=E),
            lambda: list(stub.Generate(pb.GenerateRequest(session_id=sid, max_tokens=1), metadata=E)),
            lambda: stub.ResetSession(pb.ResetSessionRequest(session_id=sid), metadata=E),
            lambda: stub.DeleteSession(pb.DeleteSessionRequest(session_id=sid), metadata=E),
            lambda: stub.ForkSession(pb.ForkSessionRequest(session_id=sid, new_session_id="ok"), metadata=E),
            lambda: list(stub.ExportSession(pb.ExportSessionRequest(session_id=sid), metadata=E)),
        ],
        "new_session_id": [
            lambda: stub.ForkSession(pb.ForkSessionRequest(session_id="id-victim", new_session_id=sid), metadata=E),
        ],
    }


def test_ids_outside_their_character_set_are_invalid_argument_naming_the_field(stub) -> None:
    E = md("ids")
    new_session(stub, "ids", "id-victim", list(range(20)))
    before, listed = exported(stub, "id-victim", E), names(stub, "ids")
    for sid in BAD_IDS:
        for field, calls in _id_calls(stub, sid, E).items():
            for call in calls:
                e = rpc_error(call)
                assert e.code() == IA and e.details().startswith(field + " must be"), (sid, field, e.details())
                assert "[A-Za-z0-9._:-]" in e.details(), e.details()
    for aid in BAD_APPEND_IDS:
        req = pb.AppendRequest(session_id="id-victim", tokens=[1], append_id=aid)
        e = rpc_error(lambda req=req: stub.Append(req, metadata=E))
        assert e.code() == IA and e.details().startswith("append_id must be"), (aid, e.details())
        gen = pb.GenerateRequest(session_id="id-victim", max_tokens=1, commit=True, append_id=aid)
        e = rpc_error(lambda gen=gen: list(stub.Generate(gen, metadata=E)))
        assert e.code() == IA and e.details().startswith("append_id must be"), (aid, e.details())
    for key in ("a\nb", "\x00", "tab\there"):
        e = rpc_error(lambda key=key: stub.CreateSession(pb.CreateSessionRequest(metadata={key: "v"}), metadata=E))
        assert e.code() == IA and "metadata keys" in e.details() and "control" in e.details(), e.details()
    chunks = list(stub.ExportSession(pb.ExportSessionRequest(session_id="id-victim"), metadata=E))
    chunks[0].header.session_id = "imported\n"
    e = rpc_error(lambda: stub.ImportSession(iter(chunks), metadata=E))
    assert e.code() == IA and e.details().startswith("header.session_id must be"), e.details()
    assert exported(stub, "id-victim", E) == before and names(stub, "ids") == listed  # nothing changed or made
    for sid in ("a" * 128, "A.b_c:d-9"):  # the edges of the set are ids
        assert stub.CreateSession(pb.CreateSessionRequest(session_id=sid), metadata=E).session_id == sid
        stub.DeleteSession(pb.DeleteSessionRequest(session_id=sid), metadata=E)


def test_the_sdk_gets_invalid_argument_for_a_bad_session_id(daemon: Daemon) -> None:
    """The SDK sends the session id as request metadata too, where a newline is not even a legal header
    value: it used to fail in gRPC's C core (ExecuteBatchError) before reaching the server."""
    from memoryd_sdk import AsyncMemoryClient, InvalidArgument, MemoryClient

    with MemoryClient(daemon.address, token="tok-ids") as client:
        for sid in ("line\n", "nul\x00", "a b"):
            for call in (
                lambda sid=sid: client.create_session(sid),
                lambda sid=sid: client.session(sid).append("x"),
                lambda sid=sid: client.get_session(sid),
            ):
                with pytest.raises(InvalidArgument, match="session_id must be"):
                    call()

    async def aio() -> None:
        async with AsyncMemoryClient(daemon.address, token="tok-ids") as client:
            with pytest.raises(InvalidArgument, match="session_id must be"):
                await client.create_session("line\n")

    import asyncio

    asyncio.run(aio())


CHATML_ANY_ROLE = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nBe kind.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""SmolLM2's template, shortened: it renders any role string, so roles are checked against the set."""


@pytest.fixture(scope="module")
def chat_daemon(tmp_path_factory: pytest.TempPathFactory, redis_mod: RedisServer):
    from model import init_model, preset, save_checkpoint

    ckpt = tmp_path_factory.mktemp("ckpt-chatml") / "tiny-chatml"
    save_checkpoint(init_model(preset("tiny").model_copy(update={"chat_template": CHATML_ANY_ROLE}), seed=0), ckpt)
    d = _daemon(tmp_path_factory.mktemp("memoryd-chatml"), ckpt, redis_mod)
    yield d
    d.close()


def test_roles_are_checked_against_the_chat_template(chat_daemon: Daemon) -> None:
    stub, E = chat_daemon.stub(), md("ids")
    info = stub.GetModel(pb.GetModelRequest(), metadata=E)
    assert info.chat_messages and list(info.chat_roles) == ["assistant", "system", "tool", "user"]
    sid = new_session(stub, "ids", "role-victim", [])
    before = exported(stub, sid, E)
    msg = pb.ChatMessage
    for role, why in (("wizard", "not a role"), ("user\n", "must be"), ("", "must be"), ("us er", "must be")):
        req = pb.AppendRequest(session_id=sid, messages=[msg(role="user", content="hi"), msg(role=role, content="x")])
        e = rpc_error(lambda req=req: stub.Append(req, metadata=E))
        assert e.code() == IA and e.details().startswith("messages[1].role") and why in e.details(), e.details()
        gen = pb.GenerateRequest(session_id=sid, max_tokens=1, prompt_messages=[msg(role=role, content="x")])
        e = rpc_error(lambda gen=gen: list(stub.Generate(gen, metadata=E)))
        assert e.code() == IA and e.details().startswith("prompt_messages[0].role") and why in e.details()
    e = rpc_error(lambda: stub.Append(pb.AppendRequest(session_id=sid, messages=[msg(role="wizard")]), metadata=E))
    assert "assistant, system, tool, user" in e.details(), e.details()  # the fix: the roles it takes
    assert exported(stub, sid, E) == before
    for role in info.chat_roles:
        stub.Append(pb.AppendRequest(session_id=sid, messages=[msg(role=role, content="ok")]), metadata=E)
    from memoryd_sdk import InvalidArgument, MemoryClient

    with MemoryClient(chat_daemon.address, token="tok-ids") as client, pytest.raises(InvalidArgument, match="wizard"):
        client.session(sid).add_message("wizard", "x")  # the issue's example


def test_template_roles_are_the_standard_ones_and_those_it_names() -> None:
    from memoryd.sessions.chat import STANDARD_ROLES, template_roles

    assert template_roles(CHATML_ANY_ROLE) == STANDARD_ROLES
    llama31 = "{%- if message.role == \"ipython\" or message.role == 'tool' %}{{ message['content'] }}{% endif %}"
    assert template_roles(llama31) == STANDARD_ROLES | {"ipython"}
    assert template_roles("{{ '<|user|>' + messages[0]['content'] }}") == STANDARD_ROLES  # no role read: nothing named


def test_sessions_ls_reports_stored_bytes_of_cold_sessions(
    tmp_path: Path,
    tiny_checkpoint: Path,  # noqa: F811
    redis_mod: RedisServer,
) -> None:
    """A 1-byte memory budget: every session but the one in use is written out (snapshot + log) and
    dropped, so ListSessions sees cold sessions; their stored bytes are what Redis holds for them."""
    import subprocess
    import sys

    from service_fixtures import child_env

    d = _daemon(tmp_path / "d", tiny_checkpoint, redis_mod, "--memory-budget", "1")
    try:
        stub, E = d.stub(), md("ids")
        for sid, n in (("cold-a", 37), ("cold-b", 5), ("cold-c", 0)):
            new_session(stub, "ids", sid, list(range(n)))
        new_session(stub, "ids", "hot-one", [1, 2, 3])  # the last one used: the only one loaded
        deadline = time.monotonic() + 60
        while True:  # the daemon writes sessions out in the background, after the call that loaded another
            listed = {s.session_id: s for s in stub.ListSessions(pb.ListSessionsRequest(), metadata=E).sessions}
            if not any(listed[sid].hot for sid in ("cold-a", "cold-b")) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        r = redis_mod.client()
        try:
            for sid in ("cold-a", "cold-b", "cold-c", "hot-one"):
                s = listed[sid]
                assert s.hot == (sid == "hot-one") and (s.state_bytes > 0) == s.hot, s
                snap = r.hget(f"md:s:{{ids/{sid}}}:h", "snap").decode()
                snap_size = json.loads(r.get(f"md:snap:{{{snap}}}:m"))["size"] if snap else 0
                log_bytes = r.memory_usage(f"md:s:{{ids/{sid}}}:log") or 0
                assert s.stored_bytes == snap_size + log_bytes, (sid, s.stored_bytes, snap_size, log_bytes)
            assert listed["cold-a"].stored_bytes > 0 and listed["cold-a"].steps == 4  # 37 tokens, mini-batch 8
        finally:
            r.close()
        cmd = [sys.executable, "-m", "memoryd", "sessions", "ls", "--daemon", d.address, "--token", "tok-ids"]
        out = subprocess.run(cmd, capture_output=True, env=child_env(), timeout=120)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.decode().splitlines()
        header = lines[0].split()
        assert header[:5] == ["SESSION", "OFFSET", "STEPS", "HOT", "STORED"], lines[0]
        from memoryd.cli.client import _size

        row = next(line for line in lines if line.startswith("cold-a "))
        assert row.split()[3] == "-" and _size(listed["cold-a"].stored_bytes) in row, row
        show = subprocess.run([*cmd[:4], "show", "cold-b", *cmd[5:]], capture_output=True, env=child_env(), timeout=120)
        assert show.returncode == 0 and '"stored_bytes": ' in show.stdout.decode(), show.stdout
    finally:
        d.close()
