"""The OpenAI-compatible endpoint (issue 11), driven by the official `openai` client against a real
daemon that serves it in-process (`memoryd serve --http-listen`), and once by the standalone gateway
(`memoryd http`).  The tiny model has no chat template, so turns use the SDK's plain-text format and
its byte tokenizer makes every count checkable: a text of n bytes is n tokens."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
from memoryd_sdk import MemoryClient

pytest.register_assert_rewrite("sdk_fixtures")
from sdk_fixtures import TOKENS, TcpProxy, auth_daemon  # noqa: E402
from service_fixtures import Daemon, child_env, free_port, tiny_checkpoint  # noqa: E402, F401

MAX_GENERATE = 64
MODEL = "tiny"  # the checkpoint directory's name (GET /v1/models says so)
CLOSE = "<|end|>\n"


def turns(*messages: tuple[str, str]) -> str:
    """The plain template's text of some turns and the opening of the reply."""
    return "".join(f"<|{r}|>\n{c}<|end|>\n" for r, c in messages) + "<|assistant|>\n"


@pytest.fixture(scope="module")
def http_daemon(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Iterator[Daemon]:  # noqa: F811
    port = free_port()
    flags = ("--max-generate-tokens", str(MAX_GENERATE), "--http-listen", f"127.0.0.1:{port}")
    with auth_daemon(tmp_path_factory, tiny_checkpoint, "http", *flags) as d:
        d.http_port = port
        yield d


def oai(d: Daemon, token: str | None = TOKENS["alice"]) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{d.http_port}/v1", api_key=token or "none", max_retries=0)


@pytest.fixture(scope="module")
def alice(http_daemon: Daemon) -> Iterator[openai.OpenAI]:
    with oai(http_daemon) as c:
        yield c


@pytest.fixture(scope="module")
def sdk(http_daemon: Daemon) -> Iterator[MemoryClient]:
    """The observer: what the daemon really holds."""
    with MemoryClient(http_daemon.address, token=TOKENS["alice"]) as c:
        yield c


def kept(resp) -> int:
    """Tokens of the reply the session kept (a stop token is sampled but not kept)."""
    return resp.usage.completion_tokens - (resp.choices[0].finish_reason == "stop")


def test_models(alice: openai.OpenAI, sdk: MemoryClient) -> None:
    models = alice.models.list().data
    assert [m.id for m in models] == [sdk.model_info().name] == [MODEL]
    assert alice.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        alice.models.retrieve("gpt-4o")


def test_without_a_session_nothing_is_kept(alice: openai.OpenAI, sdk: MemoryClient) -> None:
    before = {s.session_id for s in sdk.list_sessions()}
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello?"}]
    r = alice.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, temperature=0)
    assert r.object == "chat.completion" and r.model == MODEL and r.id.startswith("chatcmpl-")
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason in ("stop", "length")
    assert r.usage.completion_tokens == 6 or r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens == len(turns(("system", "Be brief."), ("user", "Hello?"))) + len(CLOSE)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert {s.session_id for s in sdk.list_sessions()} == before  # the scratch session is gone

    # the same greedy request streamed gives the same text, with usage at the end
    stream = alice.chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=6, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    events = list(stream)
    assert events[0].choices[0].delta.role == "assistant"
    text = "".join(e.choices[0].delta.content or "" for e in events if e.choices)
    assert text == r.choices[0].message.content
    assert [e.choices[0].finish_reason for e in events if e.choices][-1] == r.choices[0].finish_reason
    assert events[-1].choices == [] and events[-1].usage.model_dump() == r.usage.model_dump()
    assert {s.session_id for s in sdk.list_sessions()} == before


def test_multi_turn_sends_only_new_messages(alice: openai.OpenAI, sdk: MemoryClient) -> None:
    sid = "openai-multi-turn"
    first = [("system", "You keep notes."), ("user", "The key is under the mat.")]
    r1 = alice.chat.completions.create(
        model=MODEL,
        messages=[{"role": r, "content": c} for r, c in first],
        max_tokens=5,
        temperature=0,
        extra_headers={"memoryd-session": sid},
    )
    o1 = sdk.get_session(sid).offset
    assert o1 == len(turns(*first)) + kept(r1) + len(CLOSE) == r1.usage.prompt_tokens + kept(r1)
    ext = {"session": sid, "offset": o1, "duplicate": False, "kept": True, "recalled_tokens": 0}  # window 32: no room
    assert r1.model_extra["memoryd"] == ext

    # turn 2 names the session by `user` and carries only the new message: the offset grows by that turn
    r2 = alice.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Where is it?"}], max_tokens=5, temperature=0, user=sid
    )
    o2 = sdk.get_session(sid).offset
    assert o2 - o1 == len(turns(("user", "Where is it?"))) + kept(r2) + len(CLOSE)
    assert r2.usage.prompt_tokens == len(turns(("user", "Where is it?"))) + len(CLOSE)

    # turn 3 streamed: the same arithmetic, and the reply is what the session (not the request) implies
    with sdk.session(sid).fork(temporary=True) as twin:
        expected = twin.reply([("user", "And the spare?")], max_tokens=5).generation
    events = list(
        alice.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "And the spare?"}],
            max_tokens=5,
            temperature=0,
            user=sid,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(e.choices[0].delta.content or "" for e in events if e.choices)
    assert text == expected.text  # answered from the session's state: turns 1 and 2 were not resent
    o3 = sdk.get_session(sid).offset
    assert (
        o3 - o2
        == expected.committed_tokens
        == events[-1].usage.prompt_tokens
        + (events[-1].usage.completion_tokens - (expected.finish_reason.name == "STOP_TOKEN"))
    )


def test_retry_with_the_same_idempotency_key_lands_once(alice: openai.OpenAI, sdk: MemoryClient) -> None:
    sid = "openai-retry"
    req = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Log this once."}],
        "max_tokens": 6,
        "temperature": 1.0,  # sampled: a second sampling would (almost surely) differ
        "seed": 11,
    }
    headers = {"memoryd-session": sid, "Idempotency-Key": "req-0001"}
    r1 = alice.chat.completions.create(**req, extra_headers=headers)
    o1 = sdk.get_session(sid).offset
    r2 = alice.chat.completions.create(**req, extra_headers=headers)  # the client's retry of the same request
    assert sdk.get_session(sid).offset == o1  # landed once
    assert r2.choices[0].message.content == r1.choices[0].message.content
    assert r2.model_extra["memoryd"] == {
        "session": sid,
        "offset": o1,
        "duplicate": True,
        "kept": True,
        "recalled_tokens": 0,
    }
    assert r2.usage.model_dump() == r1.usage.model_dump()
    streamed = alice.chat.completions.create(**req, extra_headers=headers, stream=True)  # streamed retry too
    assert "".join(e.choices[0].delta.content or "" for e in streamed) == r1.choices[0].message.content
    assert sdk.get_session(sid).offset == o1

    r3 = alice.chat.completions.create(**req, extra_headers={**headers, "Idempotency-Key": "req-0002"})
    assert sdk.get_session(sid).offset > o1  # a new key is a new turn
    with pytest.raises(openai.BadRequestError, match="already used"):  # a reused key with other messages
        alice.chat.completions.create(
            **{**req, "messages": [{"role": "user", "content": "Something else."}]}, extra_headers=headers
        )
    assert r3.model_extra["memoryd"]["duplicate"] is False


def test_tenant_walls(http_daemon: Daemon, alice: openai.OpenAI, sdk: MemoryClient) -> None:
    sid = "openai-walls"
    msg = [{"role": "user", "content": "alice's secret"}]
    alice.chat.completions.create(model=MODEL, messages=msg, max_tokens=3, user=sid)
    alice_offset = sdk.get_session(sid).offset
    with oai(http_daemon, TOKENS["bob"]) as bob:
        rb = bob.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3, user=sid
        )
        assert rb.model_extra["memoryd"]["offset"] == len(turns(("user", "hi"))) + kept(rb) + len(CLOSE)  # his own
    assert sdk.get_session(sid).offset == alice_offset  # alice's session untouched
    with MemoryClient(http_daemon.address, token=TOKENS["bob"]) as bob_sdk:
        assert bob_sdk.get_session(sid).tenant == "bob"
    for token in ("wrong-token", None):
        with oai(http_daemon, token) as stranger:
            with pytest.raises(openai.AuthenticationError) as e:
                stranger.chat.completions.create(model=MODEL, messages=msg, max_tokens=3, user=sid)
            assert e.value.status_code == 401 and e.value.type == "authentication_error"
            with pytest.raises(openai.AuthenticationError):
                stranger.models.list()
    assert sdk.get_session(sid).offset == alice_offset


REFUSED = [
    ({"extra_body": {"recall": "off"}}, "recall", openai.BadRequestError),  # memoryd's extension: true or false
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools", openai.BadRequestError),
    ({"logprobs": "yes"}, "logprobs", openai.BadRequestError),
    ({"frequency_penalty": "high"}, "frequency_penalty", openai.BadRequestError),
    ({"logit_bias": {"x": 1}}, "logit_bias", openai.BadRequestError),
    ({"frequency_penalty": 2.5}, None, openai.BadRequestError),  # the daemon's range, as 400
    ({"top_logprobs": 3}, None, openai.BadRequestError),  # without logprobs
    ({"response_format": {"type": "json_object"}}, "response_format", openai.BadRequestError),
    ({"temperature": 3}, "temperature", openai.BadRequestError),
    ({"n": 0}, "n", openai.BadRequestError),  # proto3 would read 0 as unset (one sample); OpenAI refuses it
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", openai.BadRequestError),
    ({"model": "gpt-4o"}, "model", openai.NotFoundError),
    ({"max_tokens": MAX_GENERATE + 1}, None, openai.BadRequestError),  # the daemon's own limit, as 400
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        "messages[0].content",
        openai.BadRequestError,
    ),
    ({"messages": [{"role": "user", "content": "x", "name": "bob"}]}, "messages[0].name", openai.BadRequestError),
]


@pytest.mark.parametrize(("extra", "param", "exc"), REFUSED, ids=[f"{r[1]}-{i}" for i, r in enumerate(REFUSED)])
def test_refused_fields(alice: openai.OpenAI, sdk: MemoryClient, extra: dict, param: str | None, exc: type) -> None:
    sid = "openai-refused"
    req = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "user": sid} | extra
    before = sdk.get_session(sid).offset if any(s.session_id == sid for s in sdk.list_sessions()) else 0
    with pytest.raises(exc) as e:
        alice.chat.completions.create(**req)
    err = e.value
    assert err.param == param and err.message and isinstance(err.code, str)
    assert set(err.body) == {"message", "type", "param", "code"}  # OpenAI's error shape
    after = sdk.get_session(sid).offset if any(s.session_id == sid for s in sdk.list_sessions()) else 0
    assert after == before  # refused before anything was read


def test_raw_error_shape_and_bad_json(http_daemon: Daemon) -> None:
    url = f"http://127.0.0.1:{http_daemon.http_port}/v1/chat/completions"
    auth = {"Authorization": f"Bearer {TOKENS['alice']}"}
    r = httpx.post(url, content=b"{not json", headers=auth)
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = httpx.post(url, json={"model": MODEL, "messages": [], "seed": 1}, headers=auth)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_standalone_gateway(sdk_daemon_like: tuple[Daemon, int], tmp_path: Path) -> None:
    d, port = sdk_daemon_like
    with oai_at(port) as c:
        r = c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3, user="standalone-1"
        )
        assert r.model_extra["memoryd"]["session"] == "standalone-1"
    with MemoryClient(d.address, token=TOKENS["alice"]) as sdk:
        assert sdk.get_session("standalone-1").offset == r.model_extra["memoryd"]["offset"]


def oai_at(port: int) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=TOKENS["alice"], max_retries=0)


@pytest.fixture
def sdk_daemon_like(http_daemon: Daemon, tmp_path: Path) -> Iterator[tuple[Daemon, int]]:
    """`memoryd http --daemon ... --listen ...` in its own process, in front of the daemon."""
    port = free_port()
    log = open(tmp_path / "http.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "memoryd", "http", "--daemon", http_daemon.address, "--listen", f"127.0.0.1:{port}"],
        stdout=log,
        stderr=log,
        env=child_env(),
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1)
            break
        except httpx.TransportError:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "http.log").read_text()
            time.sleep(0.05)
    try:
        yield http_daemon, port
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0, (tmp_path / "http.log").read_text()
        log.close()


def test_session_names_the_daemon_refuses(alice: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        alice.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], user="bad name!")
    assert "session" in e.value.message and e.value.code == "invalid_argument"


def test_the_clients_own_retry_after_a_lost_answer_lands_once(http_daemon: Daemon, sdk: MemoryClient) -> None:
    """The request reaches the daemon and commits; its answer is swallowed and the connection cut; the
    openai client retries on its own with the same headers, and the retry lands as a duplicate."""
    proxy = TcpProxy(http_daemon.http_port)
    sid = "openai-lost-answer"
    try:
        with openai.OpenAI(base_url=f"http://{proxy.address}/v1", api_key=TOKENS["alice"], max_retries=3) as c:
            proxy.drop_responses()
            pool = ThreadPoolExecutor(1)
            fut = pool.submit(
                c.chat.completions.create,
                model=MODEL,
                messages=[{"role": "user", "content": "exactly once"}],
                max_tokens=4,
                seed=5,
                extra_headers={"memoryd-session": sid, "Idempotency-Key": "lost-answer-1"},
            )
            deadline = time.monotonic() + 30
            while not any(s.session_id == sid and s.offset > 0 for s in sdk.list_sessions()):
                assert time.monotonic() < deadline, "the request never landed"
                time.sleep(0.05)
            landed = sdk.get_session(sid).offset
            assert proxy.dropped_bytes > 0 and not fut.done()
            proxy.cut()
            r = fut.result(timeout=60)
            pool.shutdown()
        assert proxy.connections >= 2  # answered on a second connection: the client's retry
        ext = {"session": sid, "offset": landed, "duplicate": True, "kept": True, "recalled_tokens": 0}
        assert r.model_extra["memoryd"] == ext
        assert sdk.get_session(sid).offset == landed
    finally:
        proxy.close()


def test_json_body_of_a_completion(http_daemon: Daemon) -> None:
    r = httpx.post(
        f"http://127.0.0.1:{http_daemon.http_port}/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        headers={"Authorization": f"Bearer {TOKENS['alice']}"},
    )
    body = r.json()
    assert r.status_code == 200 and json.dumps(body)
    assert set(body) >= {"id", "object", "created", "model", "choices", "usage"}


def readme_block(marker: str) -> str:
    """The README's python block that contains `marker`."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    return next(b.split("```", 1)[0] for b in readme.split("```python\n")[1:] if marker in b.split("```", 1)[0])


def test_readme_quick_start(http_daemon: Daemon) -> None:
    code = readme_block("from openai import OpenAI")
    assert len([line for line in code.splitlines() if line.strip()]) == 3  # the import and two lines
    code = code.replace("http://127.0.0.1:8080/v1", f"http://127.0.0.1:{http_daemon.http_port}/v1")
    code = code.replace('api_key="-"', f"api_key={TOKENS['alice']!r}")
    code = code.replace('"smollm2-135m-instruct-v3"', repr(MODEL))
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["r"].choices[0].message.content is not None
    with MemoryClient(http_daemon.address, token=TOKENS["alice"]) as c:
        assert c.get_session("agent-7").offset == scope["r"].model_extra["memoryd"]["offset"] > 0


def test_sampling_fields_openai_clients_send(alice: openai.OpenAI, sdk: MemoryClient) -> None:
    """presence/frequency penalties, logit_bias, logprobs with top_logprobs, and vLLM's min_p and
    repetition_penalty (extra_body), through the official client; logprobs in OpenAI's shape, in the
    reply and in the stream; the bias is obeyed (+100 forces a token)."""
    sid = "openai-sampling"
    msgs = [{"role": "user", "content": "hi"}]
    kw = {"presence_penalty": 0.5, "frequency_penalty": 0.3, "logprobs": True, "top_logprobs": 3, "seed": 3}
    extra = {"min_p": 0.05, "repetition_penalty": 1.2}
    r = alice.chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=5, user=sid, temperature=0.8, extra_body=extra, **kw
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for c in content:
        assert c.logprob <= 0 and len(c.top_logprobs) == 3 and c.bytes == list(c.token.encode())
        assert c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob >= c.top_logprobs[2].logprob
    assert sdk.get_session(sid).offset > 0, "committed as without them"
    forced = alice.chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=4, temperature=1.0, logit_bias={str(ord("z")): 100}
    )
    assert forced.choices[0].message.content == "zzzz"
    stream = alice.chat.completions.create(
        model=MODEL, messages=msgs, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2, stream=True
    )
    chunks = [e for e in stream if e.choices and e.choices[0].logprobs]
    assert chunks and all(len(c.top_logprobs) == 2 for e in chunks for c in e.choices[0].logprobs.content)


def test_n_choices_without_a_session(alice: openai.OpenAI, sdk: MemoryClient) -> None:
    """n = 3 without a session: three choices, each the seeded sample it would be alone, in the
    reply and in the stream; nothing is kept."""
    before = {s.session_id for s in sdk.list_sessions()}
    msgs = [{"role": "user", "content": "Tell me"}]
    kw = {"model": MODEL, "messages": msgs, "max_tokens": 6, "temperature": 1.5, "seed": 77}
    r = alice.chat.completions.create(n=3, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage.completion_tokens >= 3 and r.usage.prompt_tokens == len(turns(("user", "Tell me")))
    for c in r.choices:
        alone = alice.chat.completions.create(**(kw | {"seed": 77 + c.index}))
        assert c.message.content == alone.choices[0].message.content, c.index
    events = list(alice.chat.completions.create(n=3, stream=True, **kw))
    texts = {i: "".join(e.choices[0].delta.content or "" for e in events if e.choices[0].index == i) for i in range(3)}
    assert texts == {c.index: c.message.content for c in r.choices}
    finishes = {e.choices[0].index: e.choices[0].finish_reason for e in events if e.choices[0].finish_reason}
    assert finishes == {c.index: c.finish_reason for c in r.choices}
    assert {s.session_id for s in sdk.list_sessions()} == before


def test_n_choices_with_a_session(alice: openai.OpenAI, sdk: MemoryClient) -> None:
    """n = 3 on a named session: the choices are sampled from forks of the session's state after the new
    message (choice i is the seeded sample the SDK's uncommitted reply gives with seed + i), in the reply and
    in the stream, and nothing is kept (a commit keeps one output; the client picks the one it sends back)."""
    sid = "openai-n-session"
    alice.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "The key is under the mat."}], max_tokens=4, user=sid
    )
    before = sdk.get_session(sid).offset
    msgs = [{"role": "user", "content": "Tell me"}]
    kw = {"model": MODEL, "messages": msgs, "max_tokens": 6, "temperature": 1.5, "seed": 77, "user": sid}
    headers = {"Idempotency-Key": "n-1"}  # nothing lands, so nothing is held against the key
    r = alice.chat.completions.create(n=3, extra_headers=headers, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2]
    ext = {"session": sid, "offset": before, "duplicate": False, "kept": False, "recalled_tokens": 0}
    assert r.model_extra["memoryd"] == ext
    assert sdk.get_session(sid).offset == before
    assert r.usage.prompt_tokens == len(turns(("user", "Tell me")))
    sampled = 0
    for c in r.choices:
        alone = sdk.session(sid).reply(
            [("user", "Tell me")], max_tokens=6, temperature=1.5, seed=77 + c.index, commit=False
        )
        assert c.message.content == alone.text, c.index
        sampled += alone.generation.generated_tokens
    assert r.usage.completion_tokens == sampled
    events = list(alice.chat.completions.create(n=3, stream=True, stream_options={"include_usage": True}, **kw))
    texts = {
        i: "".join(e.choices[0].delta.content or "" for e in events if e.choices and e.choices[0].index == i)
        for i in range(3)
    }
    assert texts == {c.index: c.message.content for c in r.choices}
    assert events[-1].model_extra["memoryd"] == ext
    assert sdk.get_session(sid).offset == before
    # the same key with n = 1 is a new turn that lands once
    one = alice.chat.completions.create(extra_headers=headers, **kw)
    assert one.model_extra["memoryd"]["kept"] and sdk.get_session(sid).offset > before


RECALL_WINDOW = 256
RECALL_FACT = "The storage room door code is 4417."
RECALL_FILLER = [
    "Weather report for the week: light rain on Monday, sun from Wednesday, wind from the west at night.",
    "The build on the main branch passed after the flaky network test was retried twice by the runner.",
    "Lunch options near the office include a noodle bar, a bakery with soup, and a salad place upstairs.",
    "Reminder that the quarterly all-hands moves to the big auditorium because the usual hall is booked.",
]


@pytest.fixture(scope="module")
def recall_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """The tiny model with a window of 256 tokens (room for recalled context, which a window of 32 has not)."""
    from model import init_model, preset, save_checkpoint

    out = tmp_path_factory.mktemp("ckpt-recall-http") / "tiny"
    save_checkpoint(init_model(preset("tiny").model_copy(update={"window_size": RECALL_WINDOW}), seed=0), out)
    port = free_port()
    with auth_daemon(tmp_path_factory, out, "http-recall", "--http-listen", f"127.0.0.1:{port}") as d:
        d.http_port = port
        yield d


def test_recall_can_be_turned_off(recall_daemon: Daemon) -> None:
    """memoryd's extension field `recall` (`extra_body={"recall": False}` with the official client) is the
    generation's recall ask: on by default (the fact, out of the window, is read before the prompt), off on
    request (nothing recalled); each reply is the one the SDK gives with the same recall, and either way the
    session keeps the new message and the reply, never the recalled context."""
    question = [{"role": "user", "content": "What is the storage room door code?"}]
    with MemoryClient(recall_daemon.address, token=TOKENS["alice"]) as sdk, oai(recall_daemon) as client:
        s = sdk.create_session("openai-recall")
        s.add_message("user", RECALL_FACT)
        for f in RECALL_FILLER:
            s.add_message("user", f)
        assert s.offset > RECALL_WINDOW  # the fact is out of the window
        on, off = s.fork("openai-recall-on"), s.fork("openai-recall-off")
        refs = {}
        for recall in (True, False):
            with s.fork(temporary=True) as twin:
                refs[recall] = twin.reply(
                    [("user", question[0]["content"])], max_tokens=8, temperature=0, recall=recall
                ).generation
        assert refs[True].recalled_tokens > 0 and refs[False].recalled_tokens == 0
        kw = {"model": MODEL, "messages": question, "max_tokens": 8, "temperature": 0}
        r_on = client.chat.completions.create(user=on.id, **kw)
        r_off = client.chat.completions.create(user=off.id, extra_body={"recall": False}, **kw)
        for r, ref, session in ((r_on, refs[True], on), (r_off, refs[False], off)):
            assert r.choices[0].message.content == ref.text
            assert r.model_extra["memoryd"]["recalled_tokens"] == ref.recalled_tokens
            assert session.info().offset == s.offset + ref.committed_tokens  # the recalled context is not kept
