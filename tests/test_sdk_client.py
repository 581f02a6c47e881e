"""The sync SDK against a real `memoryd serve` and redis-server: every method, streaming and
cancelling, chat helpers, export/import, paging, and each status's typed exception (issue 4)."""

from __future__ import annotations

import asyncio
import collections
import io
import shutil
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from memoryd_sdk import (
    AlreadyExists,
    Cancelled,
    DeadlineExceeded,
    ExportFormatError,
    FailedPrecondition,
    FinishReason,
    InvalidArgument,
    MemoryClient,
    MemorydError,
    NotFound,
    OffsetConflict,
    PlainTemplate,
    ResourceExhausted,
    RetryPolicy,
    SamplingParams,
    Unauthenticated,
    Unavailable,
)
from memoryd_sdk import errors as sdk_errors
from memoryd_sdk.export_file import read_header, write_header

pytest.register_assert_rewrite("sdk_fixtures")
from sdk_fixtures import MAX_APPEND, MAX_GENERATE, TOKENS  # noqa: E402
from service_fixtures import Daemon, RedisServer, free_port  # noqa: E402

pytest_plugins = ["sdk_fixtures"]


@pytest.fixture(scope="module")
def client(sdk_daemon: Daemon):
    with MemoryClient(sdk_daemon.address, token=TOKENS["alice"], timeout=20) as c:
        yield c


def text_len(s: str) -> int:
    """Tokens of text under the tiny preset's byte tokenizer."""
    return len(s.encode())


# -- sessions, append ---------------------------------------------------------------------------


def test_create_info_append(client: MemoryClient) -> None:
    s = client.create_session(metadata={"agent": "planner"})
    assert s.offset == 0 and len(s.id) == 32  # an SDK-chosen id
    info = s.info()
    assert info.session_id == s.id and info.tenant == "alice" and info.metadata == {"agent": "planner"}
    assert info.model_digest.startswith("sha256:") and info.created_at is not None and info.offset == 0

    r1 = s.append("The launch moved to Thursday. ")
    assert (r1.start_offset, r1.offset, r1.tokens, r1.duplicate) == (0, 30, 30, False)
    assert len(r1.append_id) == 32
    r2 = s.append([1, 2, 3, 255])
    assert (r2.start_offset, r2.offset, r2.tokens) == (30, 34, 4)
    assert s.offset == 34
    info = s.info()
    assert info.offset == 34 and info.pending_tokens == 34 - 8 * info.steps and info.hot

    named = client.create_session("notes-1")
    assert named.id == "notes-1" and client.get_session("notes-1").offset == 0


def test_session_handle_learns_its_offset(client: MemoryClient) -> None:
    sid = client.create_session().id
    client.append(sid, "abc")  # the raw call: no expected offset needed
    h = client.session(sid)
    assert h.offset is None
    assert h.append("de").start_offset == 3  # fetched the offset, then appended at it
    assert h.offset == 5


def test_explicit_append_id_lands_once(client: MemoryClient) -> None:
    s = client.create_session()
    a = s.append("once", append_id="tool-call-17")
    b = client.append(s.id, "once", expected_offset=0, append_id="tool-call-17")
    assert not a.duplicate and b.duplicate and (b.start_offset, b.offset) == (0, 4)
    assert s.info().offset == 4
    with pytest.raises(InvalidArgument, match="already used for other tokens"):
        client.append(s.id, "other", append_id="tool-call-17")


def test_offset_conflict_carries_the_current_offset(client: MemoryClient) -> None:
    s = client.create_session()
    stale = client.session(s.id)
    stale.info()
    s.append("written by someone else")
    with pytest.raises(OffsetConflict) as e:
        stale.append("mine")
    assert e.value.offset == 23 and e.value.code == grpc.StatusCode.ABORTED
    assert stale.offset == 23  # moved to the server's offset
    assert stale.append("mine").start_offset == 23
    with pytest.raises(OffsetConflict) as e2:
        client.fork_session(s.id, expected_offset=5)
    assert e2.value.offset == 27
    with pytest.raises(OffsetConflict):
        s.reset(expected_offset=3)
    stale2 = client.session(s.id)
    stale2.offset = 1  # a committed generation checks the offset too (streamed: trailing metadata)
    with pytest.raises(OffsetConflict) as e3:
        stale2.complete("?", max_tokens=2, commit=True)
    assert e3.value.offset == 27 == stale2.offset
    stale2.offset = 1
    with pytest.raises(OffsetConflict) as e4:
        list(stale2.generate("?", max_tokens=2, commit=True))
    assert e4.value.offset == 27 and s.info().offset == 27


def test_append_stream(client: MemoryClient) -> None:
    s = client.create_session()
    sent: list[object] = []

    def observations():
        for piece in ["$ df -h\n", [10, 11, 12], "/dev/sda1  91%\n", [13]]:
            sent.append(piece)
            yield piece

    r = s.append_stream(observations())
    assert len(sent) == 4
    total = 8 + 3 + 15 + 1
    assert (r.start_offset, r.offset, r.tokens, r.duplicate) == (0, total, total, False)
    assert s.offset == total == s.info().offset


# -- generate -----------------------------------------------------------------------------------


def test_generate_stream_and_complete(client: MemoryClient) -> None:
    s = client.create_session()
    s.append("Once upon a time")
    stream = s.generate(" there", max_tokens=12, temperature=0.8, top_p=0.9, top_k=50, seed=7)
    deltas = list(stream)
    res = stream.result
    assert res is not None and not res.committed
    assert "".join(deltas) == res.text and len(res.tokens) == res.generated_tokens == 12
    assert res.finish_reason in (FinishReason.LENGTH, FinishReason.STOP_TOKEN)
    assert s.info().offset == 16  # commit=False: untouched

    again = s.complete(" there", max_tokens=12, temperature=0.8, top_p=0.9, top_k=50, seed=7)
    assert again.tokens == res.tokens and again.text == res.text  # same seed, same session: same sample

    chunks = list(s.generate(max_tokens=5, stop_tokens=[0]).chunks())
    assert chunks[-1].done and not any(c.done for c in chunks[:-1])
    assert chunks[-1].generated_tokens == sum(len(c.tokens) for c in chunks)

    committed = s.complete("!", max_tokens=6, commit=True)
    assert committed.committed and committed.offset == 16 + 1 + committed.generated_tokens
    assert s.offset == committed.offset == s.info().offset

    with s.generate(max_tokens=4, commit=True) as st:
        for _ in st:
            pass
    assert st.done and s.offset == committed.offset + 4 == s.info().offset


def test_one_options_object(client: MemoryClient) -> None:
    """`params=SamplingParams(...)` and the same settings as keywords send the same request; keywords
    override params; a keyword that is not a setting is a TypeError naming it; n samples and
    logprobs come back as `samples` and `logprobs`."""
    s = client.create_session()
    s.append("Once upon a time")
    p = SamplingParams(max_tokens=8, temperature=0.9, top_k=40, seed=3, presence_penalty=0.4, logit_bias={65: 1.0})
    a = s.complete(params=p)
    b = s.complete(max_tokens=8, temperature=0.9, top_k=40, seed=3, presence_penalty=0.4, logit_bias={65: 1.0})
    assert a.tokens == b.tokens and 0 < len(a.tokens) <= 8
    assert s.complete(params=p, max_tokens=3).tokens == a.tokens[:3]  # the keyword wins
    with pytest.raises(TypeError, match="temprature"):
        s.complete(temprature=0.5)
    n = s.complete(params=p, n=3, logprobs=True, top_logprobs=2)
    assert [x.index for x in n.samples] == [0, 1, 2] and n.samples[0].tokens == a.tokens == n.tokens
    assert all(len(x.logprobs) == len(x.tokens) and all(len(lp.top) == 2 for lp in x.logprobs) for x in n.samples)
    assert n.generated_tokens == sum(len(x.tokens) for x in n.samples)
    with pytest.raises(InvalidArgument, match="n = 2"):
        s.complete(n=2, commit=True)
    assert s.info().offset == 16


def test_cancel_a_stream_midway(client: MemoryClient, sdk_daemon: Daemon) -> None:
    s = client.create_session()
    s.append("a long story begins")
    stream = s.generate(max_tokens=MAX_GENERATE, commit=True)
    got = []
    for chunk in stream.chunks():
        got.append(chunk)
        if len(got) == 2:
            stream.cancel()
            break
    assert list(stream.chunks()) == [] and stream.result is None and not any(c.done for c in got)
    with pytest.raises(RuntimeError, match="cancelled"):
        stream.collect()
    assert s.info().offset == 19  # a cancelled committed generation commits nothing

    with s.generate(max_tokens=MAX_GENERATE, commit=True) as st2:  # leaving the block cancels it
        next(iter(st2))
    assert st2.result is None
    deadline = time.monotonic() + 10
    while '"call": "Generate", "code": "CANCELLED"' not in sdk_daemon.log_path.read_text():
        assert time.monotonic() < deadline, "the daemon never saw the cancellation"
        time.sleep(0.05)
    assert s.info().offset == 19
    assert s.append("!").offset == 20  # and the session is usable


# -- fork, reset, delete ------------------------------------------------------------------------


def test_fork_reset_delete(client: MemoryClient) -> None:
    s = client.create_session(metadata={"k": "v"})
    s.append("shared context")
    f = s.fork()
    assert f.offset == 14 and f.id != s.id and f.info().metadata == {"k": "v"}
    f.append(" then something else")
    assert s.info().offset == 14 and f.info().offset == 34
    g = s.complete(max_tokens=8).tokens  # a fork has the source's state: the same greedy text
    assert client.complete(client.fork_session(s.id).session_id, max_tokens=8).tokens == g

    named = s.fork("my-fork", metadata={"try": "a"})
    assert named.id == "my-fork" and named.info().metadata == {"try": "a"}
    with pytest.raises(AlreadyExists):
        s.fork("my-fork")

    with s.fork(temporary=True) as scratch:
        scratch.append("scratch")
        scratch_id = scratch.id
    with pytest.raises(NotFound):
        client.get_session(scratch_id)

    info = s.reset()
    assert info.offset == 0 and s.offset == 0 and info.metadata == {"k": "v"}
    s.append("xy")
    assert s.delete() == 2
    with pytest.raises(NotFound):
        s.info()
    assert f.info().offset == 34  # deleting the source leaves its forks whole


# -- export / import ----------------------------------------------------------------------------


def test_export_import_file_and_stream(client: MemoryClient, tmp_path: Path) -> None:
    s = client.create_session(metadata={"who": "me"})
    s.append("remember: the key is under the mat. " * 3)
    path = tmp_path / "s.memoryd"
    h = s.export(path, chunk_bytes=4096)
    assert h.session_id == s.id and h.offset == s.offset and h.metadata == {"who": "me"}
    assert h.format == "memoryd-session-state/1" and path.stat().st_size > h.total_bytes

    copy = client.import_session(path, session_id="imported-copy")
    assert copy.id == "imported-copy" and copy.offset == s.offset and copy.info().metadata == {"who": "me"}
    assert copy.complete(max_tokens=10).tokens == s.complete(max_tokens=10).tokens

    buf = io.BytesIO()
    s.export(buf)
    buf.seek(0)
    again = client.session("imported-2").import_(buf, metadata={"from": "stream"})
    assert again.offset == s.offset and again.info().metadata == {"from": "stream"}
    with pytest.raises(AlreadyExists):
        client.import_session(path, session_id="imported-2")

    truncated = io.BytesIO(path.read_bytes()[:-10])
    with pytest.raises(ExportFormatError):
        client.import_session(truncated, session_id="never")
    with pytest.raises(ExportFormatError):
        client.import_session(io.BytesIO(b"not an export at all"))

    other_model = tmp_path / "other.memoryd"
    with open(path, "rb") as f:
        header = read_header(f)
        rest = f.read()
    header.model_digest = "sha256:" + "0" * 64
    with open(other_model, "wb") as out:
        write_header(out, header)
        out.write(rest)
    with pytest.raises(FailedPrecondition, match="this daemon serves"):
        client.import_session(other_model, session_id="never2")


def test_a_refused_import_says_why_while_the_client_still_streams(sdk_daemon: Daemon) -> None:
    """The server refuses an import at its header while the client is still writing data: each caller gets
    FAILED_PRECONDITION, never grpc's asyncio client's `INTERNAL: Internal error from Core`, which that client
    reports when a write fails because the call already ended (grpc/grpc#36066) unless the daemon reads the
    refused stream to its end first.  Many concurrent imports of small chunks make the race likely: without
    the daemon's drain, about 1 in 10 of these calls got INTERNAL."""
    from memoryd_sdk.proto import memoryd_pb2 as pb
    from memoryd_sdk.proto import memoryd_pb2_grpc as pb_grpc

    chunk, chunks, concurrent, rounds = b"x" * 1024, 100, 32, 10
    md = (("authorization", f"Bearer {TOKENS['alice']}"),)

    async def one(stub: pb_grpc.MemoryServiceStub, i: int) -> tuple[str, str]:
        header = pb.ExportHeader(
            session_id=f"refused-{i}",
            model_digest="sha256:" + "0" * 64,
            total_bytes=len(chunk) * chunks,
            sha256="0" * 64,
            format="memoryd-session-state/1",
        )
        messages = [pb.SessionChunk(header=header)] + [pb.SessionChunk(data=chunk)] * chunks
        try:
            await stub.ImportSession(iter(messages), metadata=md, timeout=60)
        except grpc.aio.AioRpcError as e:
            return e.code().name, e.details() or ""
        return "OK", ""

    async def run() -> list[tuple[str, str]]:
        async with grpc.aio.insecure_channel(sdk_daemon.address) as channel:
            stub = pb_grpc.MemoryServiceStub(channel)
            got = []
            for r in range(rounds):
                got += await asyncio.gather(*(one(stub, r * concurrent + j) for j in range(concurrent)))
            return got

    got = asyncio.run(run())
    codes = collections.Counter(code for code, _ in got)
    assert codes == {"FAILED_PRECONDITION": concurrent * rounds}, codes
    assert all("this daemon serves" in details for _, details in got)


# -- listing ------------------------------------------------------------------------------------


def test_list_sessions_pages_and_tenants(sdk_daemon: Daemon, client: MemoryClient) -> None:
    with MemoryClient(sdk_daemon.address, token=TOKENS["bob"]) as bob:
        ids = sorted(bob.create_session(f"bob-{i}").id for i in range(7))
        calls = []
        pages = bob._stub.ListSessions
        bob._stub.ListSessions = lambda *a, **k: calls.append(1) or pages(*a, **k)  # count round trips
        assert [i.session_id for i in bob.list_sessions(page_size=3)] == ids
        assert len(calls) == 3
        assert all(i.tenant == "bob" for i in bob.list_sessions())
        alice_ids = {i.session_id for i in client.list_sessions()}
        assert not alice_ids & set(ids)
        with pytest.raises(NotFound):  # another tenant's session does not exist for you
            client.get_session("bob-0")


# -- chat helpers -------------------------------------------------------------------------------


def test_add_message_and_chat(client: MemoryClient) -> None:
    s = client.create_session()
    r = s.add_message("system", "You are terse.")
    assert r.offset == text_len("<|system|>\nYou are terse.<|end|>\n")
    before = s.offset
    reply = s.chat("What next?", max_tokens=10, seed=1)
    prompt = "<|user|>\nWhat next?<|end|>\n<|assistant|>\n"
    closing = PlainTemplate().close()
    assert reply.finish_reason in (FinishReason.LENGTH, FinishReason.STOP_TOKEN)
    assert closing == "<|end|>\n"
    kept = reply.generation.generated_tokens - (reply.finish_reason == FinishReason.STOP_TOKEN)  # EOS left out
    assert reply.offset == before + text_len(prompt) + kept + text_len(closing)
    assert reply.generation.committed_tokens == reply.offset - before  # one commit: turn, reply, closing
    assert s.offset == reply.offset == s.info().offset
    assert reply.text == reply.generation.text and len(reply.tokens) == reply.generation.generated_tokens

    with pytest.raises(ValueError, match="role"):
        s.add_message("bad role", "x")
    with pytest.raises(ValueError, match="turn marker"):
        s.add_message("tool", "sneaky <|end|> marker")
    assert isinstance(s.chat_format(), PlainTemplate)  # the tiny model has no chat template of its own


def test_chat_stopped_at_the_turn_marker(sdk_daemon: Daemon, client: MemoryClient) -> None:
    """The STOP_STRING path of chat: reply cut before the marker, and exactly the reply text is
    committed (not the tokens that formed the marker), then the template's closing, once.  A template
    whose marker the (random) model is sure to write makes it happen; it also shows a custom template
    plugging in through the client."""
    s = client.create_session()
    s.add_message("system", "be brief")
    prompt = "<|user|>\nWhat next?<|end|>\n<|assistant|>\n"
    greedy = s.complete(prompt, max_tokens=20).text  # what chat will sample (greedy, same state)
    marker = greedy[2:4]
    assert len(marker) == 2, greedy

    class Marked(PlainTemplate):
        def stop(self) -> list[str]:  # same turns, so the same prompt and the same greedy reply
            return [marker]

    with MemoryClient(sdk_daemon.address, token=TOKENS["alice"], template=Marked()) as c2:
        s2 = c2.session(s.id)
        before = s2.info().offset
        reply = s2.chat("What next?", max_tokens=20)
    assert reply.finish_reason == FinishReason.STOP_STRING
    assert reply.text == greedy[: greedy.find(marker)]
    toks = reply.tokens
    kept = min(k for k in range(len(toks) + 1) if bytes(toks[:k]).decode(errors="replace") == reply.text)
    assert kept < len(toks)  # the marker's tokens were sampled ...
    closing = text_len("<|end|>\n")
    assert reply.offset == before + text_len(prompt) + kept + closing  # ... and not committed
    assert s.info().offset == reply.offset


# -- errors -------------------------------------------------------------------------------------


def code_of(err: MemorydError) -> grpc.StatusCode:
    assert str(err) and err.message
    return err.code


def test_errors_map_to_typed_exceptions(sdk_daemon: Daemon, client: MemoryClient) -> None:
    s = client.create_session()
    s.append("x")
    cases = [
        (InvalidArgument, lambda: client.get_session("bad id!")),
        (InvalidArgument, lambda: s.append([999])),
        (InvalidArgument, lambda: s.complete(max_tokens=4, temperature=-1)),
        (InvalidArgument, lambda: client.session(client.create_session().id).complete(max_tokens=2)),
        (NotFound, lambda: client.get_session("no-such-session")),
        (NotFound, lambda: client.delete_session("no-such-session")),
        (AlreadyExists, lambda: client.create_session(s.id)),
        (ResourceExhausted, lambda: s.complete(max_tokens=MAX_GENERATE + 1)),
        (ResourceExhausted, lambda: s.append([1] * (MAX_APPEND + 1))),
        (OffsetConflict, lambda: client.append(s.id, "y", expected_offset=0)),
    ]
    for cls, fn in cases:
        with pytest.raises(cls) as e:
            fn()
        assert type(e.value) is cls and code_of(e.value) == cls.code
        assert isinstance(e.value.__cause__, grpc.RpcError)
    assert s.info().offset == 1  # none of them changed the session

    for token in (None, "wrong-token"):
        with MemoryClient(sdk_daemon.address, token=token) as anon, pytest.raises(Unauthenticated):
            anon.create_session()

    fast = RetryPolicy(max_attempts=2, initial_backoff=0.01)
    with MemoryClient(f"127.0.0.1:{free_port()}", retry=fast, timeout=2) as nowhere:
        t0 = time.monotonic()
        with pytest.raises(Unavailable) as e:
            nowhere.get_session("x")
        assert e.value.retryable and time.monotonic() - t0 < 10
    with pytest.raises(DeadlineExceeded):
        MemoryClient(sdk_daemon.address, token=TOKENS["alice"], retry=fast).session(s.id).complete(
            max_tokens=MAX_GENERATE, timeout=0.001
        )
    stream = s.generate(max_tokens=MAX_GENERATE)
    it = stream.chunks()
    next(it)
    stream._call.cancel()  # cancelled by someone else than `stream.cancel()`: a typed error
    with pytest.raises(Cancelled):
        list(it)


def test_every_status_has_its_class() -> None:
    """Codes the daemon cannot be made to send here (INTERNAL, DATA_LOSS) still map to their class."""
    for cls in (sdk_errors.Internal, sdk_errors.DataLoss, sdk_errors.PermissionDenied, sdk_errors.Unimplemented):
        assert sdk_errors.error_class(cls.code) is cls and issubclass(cls, MemorydError)
    assert sdk_errors.error_class(grpc.StatusCode.UNKNOWN) is MemorydError
    retryable = {c for c in grpc.StatusCode if sdk_errors.error_class(c).retryable}
    assert retryable == {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


# -- TLS ----------------------------------------------------------------------------------------


def test_tls(tmp_path: Path, tiny_checkpoint: Path) -> None:
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    args = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost"]
    args += ["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)]
    subprocess.run(args, check=True, capture_output=True)
    redis_server = RedisServer(tmp_path / "redis")
    redis_server.start()
    d = Daemon(tmp_path / "d", tiny_checkpoint, redis_server.url, "--tls-cert", str(cert), "--tls-key", str(key))
    d.start(wait=False)
    try:
        with MemoryClient(d.address, tls=cert, retry=RetryPolicy(max_attempts=60, max_backoff=1.0)) as c:
            s = c.create_session("over-tls")  # retried while the daemon starts
            assert s.append("secret").offset == 6
        with MemoryClient(d.address, tls=cert.read_bytes()) as c2:
            assert c2.get_session("over-tls").offset == 6
        plain = MemoryClient(d.address, retry=RetryPolicy(max_attempts=1), timeout=3)
        with plain, pytest.raises(MemorydError):
            plain.get_session("over-tls")
    finally:
        d.close()
        redis_server.kill()


# -- the README's quick start -------------------------------------------------------------------


def test_readme_quick_start_runs(sdk_daemon: Daemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    readme = (Path(__file__).resolve().parents[1] / "sdk" / "README.md").read_text()
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    assert len(code.splitlines()) <= 14  # "a quick start of a dozen lines"
    code = code.replace('"127.0.0.1:50051", token=None', f"{sdk_daemon.address!r}, token={TOKENS['alice']!r}")
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md", "exec"), {})
    with MemoryClient(sdk_daemon.address, token=TOKENS["alice"]) as c:
        assert c.get_session("notes-copy").offset > 0 and (tmp_path / "notes.memoryd").is_file()
