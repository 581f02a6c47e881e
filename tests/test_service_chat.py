"""GetModel, chat messages rendered with a checkpoint's template, and what a committed generation keeps
(issue 5 "Chat", and the SDK engineer's reports: a duplicate resends the output, a reused id with
another prompt is refused, the stop is committed only on request).

Two real daemons on the tiny preset: one without a chat template, one whose config carries a plain
Jinja template (byte tokenizer: text length is token count, so offsets say exactly what landed)."""

from __future__ import annotations

import signal
from pathlib import Path

import grpc
import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment
from memoryd_sdk import MemoryClient
from memoryd_sdk.chat import ServerTemplate
from memoryd_sdk.proto import memoryd_pb2 as pb
from memoryd_sdk.types import FinishReason
from service_fixtures import (  # noqa: F401 (fixtures)
    Daemon,
    RedisServer,
    assert_same_state,
    export_bytes,
    exported,
    reference_state,
    start_all,
    state_tensors,
    tiny_checkpoint,
    tiny_model,
)

PLAIN = (
    "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
CONVO = [("system", "Be brief."), ("user", "Where is the key?"), ("assistant", "Under the mat."), ("user", "Thanks")]


def render(messages: list[tuple[str, str]], add_generation_prompt: bool = False) -> str:
    """The template rendered as transformers would (independent of memoryd.sessions.chat)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    msgs = [{"role": r, "content": c} for r, c in messages]
    return env.from_string(PLAIN).render(messages=msgs, add_generation_prompt=add_generation_prompt)


def msgs(pairs: list[tuple[str, str]]) -> list[pb.ChatMessage]:
    return [pb.ChatMessage(role=r, content=c) for r, c in pairs]


@pytest.fixture(scope="module")
def redis_mod(tmp_path_factory: pytest.TempPathFactory):
    server = RedisServer(tmp_path_factory.mktemp("redis-chat"))
    server.start()
    yield server
    server.kill(signal.SIGTERM)


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from model import init_model, preset, save_checkpoint

    out = tmp_path_factory.mktemp("ckpt-chat") / "tiny-chat"
    save_checkpoint(init_model(preset("tiny").model_copy(update={"chat_template": PLAIN}), seed=0), out)
    return out


@pytest.fixture(scope="module")
def chat_model(chat_checkpoint: Path):
    import torch

    from model import load_checkpoint

    torch.set_num_threads(1)
    return load_checkpoint(chat_checkpoint)


@pytest.fixture(scope="module")
def daemons(tmp_path_factory, tiny_checkpoint: Path, chat_checkpoint: Path, redis_mod: RedisServer):  # noqa: F811
    """The plain daemon and the chat one, started together (the first test uses both)."""
    plain = Daemon(
        tmp_path_factory.mktemp("memoryd-plain"), tiny_checkpoint, redis_mod.url, "--max-generate-tokens", "64"
    )
    chat = Daemon(tmp_path_factory.mktemp("memoryd-chat"), chat_checkpoint, redis_mod.url)
    start_all([plain, chat])
    yield plain, chat
    plain.close()
    chat.close()


@pytest.fixture(scope="module")
def plain_daemon(daemons: tuple[Daemon, Daemon]) -> Daemon:
    return daemons[0]


@pytest.fixture(scope="module")
def chat_daemon(daemons: tuple[Daemon, Daemon]) -> Daemon:
    return daemons[1]


def create(stub, text: str = "") -> str:
    sid = stub.CreateSession(pb.CreateSessionRequest()).session_id
    if text:
        stub.Append(pb.AppendRequest(session_id=sid, text=text))
    return sid


def offset(stub, sid: str) -> int:
    return stub.GetSession(pb.GetSessionRequest(session_id=sid)).offset


# -- GetModel -------------------------------------------------------------------------------------


def test_get_model(plain_daemon: Daemon, chat_daemon: Daemon, tiny_model) -> None:  # noqa: F811
    m = plain_daemon.stub().GetModel(pb.GetModelRequest())
    assert (m.digest, m.model_type, m.vocab_size, m.bos_token_id, m.eos_token_id) == (
        tiny_model.digest,
        "ttt-e2e",
        258,
        256,
        257,
    )
    assert (m.tokenizer, m.chat_template, m.chat_messages, m.adapter) == ("bytes", "", False, "")
    cfg = tiny_model.cfg
    assert (m.window_size, m.mini_batch_size, m.num_fast_layers) == (
        cfg.window_size,
        cfg.mini_batch_size,
        cfg.num_fast_layers,
    )
    assert (m.max_generate_tokens, m.max_append_tokens) == (64, 65536)
    with MemoryClient(plain_daemon.address) as c:
        assert c.model_info().digest == m.digest
    c = chat_daemon.stub().GetModel(pb.GetModelRequest())
    assert (c.chat_template, c.chat_messages, c.chat_problem) == (PLAIN, True, "")
    assert (c.generation_prompt, c.turn_closing) == ("<|assistant|>\n", "<|end|>\n")


# -- messages -------------------------------------------------------------------------------------


def test_messages_without_a_template_are_refused(plain_daemon: Daemon) -> None:
    stub = plain_daemon.stub()
    sid = create(stub, "context")
    before = exported(stub, sid)
    with pytest.raises(grpc.RpcError) as e:
        stub.Append(pb.AppendRequest(session_id=sid, messages=msgs([("user", "hi")])))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "no" in e.value.details()
    assert "chat template" in e.value.details() and "PlainTemplate" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(pb.GenerateRequest(session_id=sid, max_tokens=2, add_generation_prompt=True)))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert exported(stub, sid) == before


def test_messages_streamed_equal_the_whole_conversation(chat_daemon: Daemon, chat_model) -> None:
    """Turns appended at different times give the text (and, piece for piece, the state) of the template
    rendered over the whole conversation at once."""
    stub = chat_daemon.stub()
    whole = render(CONVO)
    cuts = [(0, 2), (2, 3), (3, 4)]
    a = create(stub)
    for i, j in cuts:
        stub.Append(pb.AppendRequest(session_id=a, messages=msgs(CONVO[i:j])))
    b = create(stub)
    stub.Append(pb.AppendRequest(session_id=b, messages=msgs(CONVO)))
    assert offset(stub, a) == offset(stub, b) == len(whole.encode())
    # the pieces A read are the slices of the whole rendering at the message boundaries
    bounds = [len(render(CONVO[:j]).encode()) for _, j in cuts]
    data = whole.encode()
    pieces = [list(data[x:y]) for x, y in zip([0, *bounds[:-1]], bounds, strict=True)]
    assert_same_state(state_tensors(chat_model, export_bytes(stub, a)), reference_state(chat_model, pieces))
    assert_same_state(state_tensors(chat_model, export_bytes(stub, b)), reference_state(chat_model, [list(data)]))


def test_bad_messages_change_nothing(chat_daemon: Daemon) -> None:
    stub = chat_daemon.stub()
    sid = create(stub)
    stub.Append(pb.AppendRequest(session_id=sid, messages=msgs(CONVO[:1])))
    before = exported(stub, sid)
    bad = [
        pb.AppendRequest(session_id=sid, messages=msgs([("bad role", "x")])),
        pb.AppendRequest(session_id=sid, messages=msgs([("user", "x")]), text="and text"),
    ]
    for req in bad:
        with pytest.raises(grpc.RpcError) as e:
            stub.Append(req)
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, e.value.details()
    req = pb.GenerateRequest(session_id=sid, max_tokens=2, add_generation_prompt=True, commit=True, commit_suffix="x")
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(req))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "closes the turn" in e.value.details()
    req = pb.GenerateRequest(session_id=sid, max_tokens=2, add_generation_prompt=True, commit=True, commit_stop=True)
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(req))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "ends the turn" in e.value.details()
    assert exported(stub, sid) == before


def test_sdk_chat_with_the_servers_template(chat_daemon: Daemon) -> None:
    """add_message / chat send messages; the reply is committed as a whole assistant turn in one commit."""
    with MemoryClient(chat_daemon.address) as client:
        s = client.create_session()
        assert isinstance(s.chat_format(), ServerTemplate)
        s.add_message("system", "Be brief.")
        before = s.offset
        reply = s.chat("Where is the key?", max_tokens=6, seed=1)
        assert reply.generation.committed and reply.offset == s.offset == s.info().offset
        kept = reply.generation.generated_tokens - (reply.finish_reason == FinishReason.STOP_TOKEN)
        asked = render([("user", "Where is the key?")], add_generation_prompt=True)[len(render([])) :]
        assert reply.offset - before == len(asked.encode()) + kept + len(b"<|end|>\n")
        with pytest.raises(ValueError, match="assistant"):
            s.chat("hi", reply_role="planner")
        r = s.append_stream(iter([("tool", "line 1"), ("tool", "line 2")]))  # turns, formatted by the server
        assert r.tokens == len(render([("tool", "line 1"), ("tool", "line 2")]).encode())


# -- what a committed generation keeps --------------------------------------------------------------


def test_duplicate_generation_resends_its_output(plain_daemon: Daemon) -> None:
    stub = plain_daemon.stub()
    sid = create(stub, "The deploy was rolled back because")
    req = pb.GenerateRequest(session_id=sid, prompt_text=" so", max_tokens=8, commit=True, append_id="gen-1")
    first = list(stub.Generate(req))
    again = list(stub.Generate(req))
    assert len(again) == 1 and again[0].duplicate and again[0].done
    assert list(again[0].tokens) == [t for e in first for t in e.tokens]
    assert again[0].text == "".join(e.text for e in first)
    assert (again[0].offset, again[0].finish_reason, again[0].generated_tokens) == (
        first[-1].offset,
        first[-1].finish_reason,
        first[-1].generated_tokens,
    )
    assert offset(stub, sid) == first[-1].offset  # not sampled or committed twice
    # the same id with another prompt is not a retry: refused, nothing changes
    before = exported(stub, sid)
    other = pb.GenerateRequest(session_id=sid, prompt_text=" but", max_tokens=8, commit=True, append_id="gen-1")
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(other))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "another prompt" in e.value.details()
    # an append's id is not a generation's
    stub.Append(pb.AppendRequest(session_id=sid, text="!", append_id="app-1"))
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(pb.GenerateRequest(session_id=sid, max_tokens=2, commit=True, append_id="app-1")))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not a generation" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        stub.Append(pb.AppendRequest(session_id=sid, text=" so", append_id="gen-1"))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert exported(stub, sid)[1] != before[1]  # only the one good append landed
    assert offset(stub, sid) == first[-1].offset + 1


def test_commit_keeps_the_text_sent_then_the_suffix(plain_daemon: Daemon, tiny_model) -> None:  # noqa: F811
    """Without commit_stop the session gets exactly the text the client saw, then commit_suffix, once;
    with commit_stop every sampled token too.  Checked bit for bit against a fresh session."""
    stub = plain_daemon.stub()
    ctx = "Notes: the launch moved to Thursday."
    probe = create(stub, ctx)
    out = [
        t
        for e in stub.Generate(pb.GenerateRequest(session_id=probe, prompt_text="\n", max_tokens=12))
        for t in e.tokens
    ]
    assert all(t < 256 for t in out)

    def dec(ids: list[int]) -> str:
        return bytes(ids).decode(errors="replace")

    text = dec(out)
    ok = [
        i for i in range(2, len(text) - 1) if "\ufffd" not in text[i - 1 : i + 2] and text.index(text[i : i + 2]) == i
    ]
    stop = text[ok[0] : ok[0] + 2]
    cut = text[: ok[0]]
    cut_ids = out[: max(k for k in range(len(out) + 1) if dec(out[:k]) == cut)]  # the tokens of the text sent
    for commit_stop in (False, True):
        sid = create(stub, ctx)
        req = pb.GenerateRequest(
            session_id=sid,
            prompt_text="\n",
            max_tokens=12,
            stop=[stop],
            commit=True,
            commit_stop=commit_stop,
            commit_suffix="<|end|>\n",
        )
        evs = list(stub.Generate(req))
        assert evs[-1].finish_reason == pb.FINISH_REASON_STOP_STRING and "".join(e.text for e in evs) == cut
        sampled = [t for e in evs for t in e.tokens]
        assert sampled == out[: len(sampled)] and len(sampled) > len(cut_ids)
        kept = sampled if commit_stop else cut_ids
        # the log holds the pieces as the model read them: the prompt, one piece per sampled token
        # it went on from, then the rest; or, when the cut fell inside what it had read, the kept
        # output in one piece read again from after the prompt
        head, suffix = [list(ctx.encode()), list(b"\n")], list(b"<|end|>\n")
        if kept[: len(sampled) - 1] == sampled[:-1]:
            pieces = [*head, *[[t] for t in sampled[:-1]], kept[len(sampled) - 1 :] + suffix]
        else:
            pieces = [*head, kept + suffix]
        ref = reference_state(tiny_model, pieces)
        assert evs[-1].offset == len(ctx) + 1 + len(kept) + 8 == offset(stub, sid)
        assert evs[-1].committed_tokens == 1 + len(kept) + 8
        assert_same_state(state_tensors(tiny_model, export_bytes(stub, sid)), ref)


@pytest.mark.asyncio
async def test_async_sdk_chat_with_the_servers_template(chat_daemon: Daemon) -> None:
    from memoryd_sdk import AsyncMemoryClient

    async with AsyncMemoryClient(chat_daemon.address) as client:
        assert (await client.model_info()).chat_messages
        s = await client.create_session()
        r = await s.add_messages([("system", "Be brief."), {"role": "user", "content": "Where is the key?"}])
        assert r.offset == len(render(CONVO[:2]).encode())

        async def turns():
            yield ("assistant", "Under the mat.")
            yield ("user", "Thanks")

        r = await s.append_stream(turns())
        assert r.offset == len(render(CONVO).encode()) == s.offset
        reply = await s.chat("Anything else?", max_tokens=4, seed=2)
        kept = reply.generation.generated_tokens - (reply.finish_reason == FinishReason.STOP_TOKEN)
        asked = render([*CONVO, ("user", "Anything else?")], add_generation_prompt=True)
        assert reply.offset == len(asked.encode()) + kept + len(b"<|end|>\n") == (await s.info()).offset


def test_templates_that_cannot_stream_or_escape_are_reported() -> None:
    """In-process: the load-time check names what is wrong, and the sandbox stops attribute tricks."""
    from memoryd.sessions.chat import ChatFormat, Message, TemplateError

    assert ChatFormat(PLAIN).problem is None
    counts = "{{ messages|length }}:{% for m in messages %}{{ m.content }};{% endfor %}"  # rewrites its start
    assert ChatFormat(counts).problem  # its text for earlier messages changes as messages are added
    escape = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    assert "unsafe" in (ChatFormat(escape).problem or "")
    # a template that refuses some conversations (its raise_exception) still streams the others
    refuses = ChatFormat(
        "{% if messages and messages[0].role != 'system' %}{{ raise_exception('system first') }}{% endif %}" + PLAIN
    )
    assert refuses.problem is None
    with pytest.raises(TemplateError, match="system first"):
        refuses.render([Message("user", "hi")], start=True)
    assert refuses.render([Message("user", "hi")], start=False) == "<|user|>\nhi<|end|>\n"
