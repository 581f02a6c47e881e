"""`memoryd_sdk.agents.MemorydSession` (issue 21) with the real OpenAI Agents SDK: a `Runner` whose model is
memoryd's own OpenAI-compatible endpoint (so the whole loop runs offline) keeps its conversation in a
memoryd session.  Its items survive kill -9 of the daemon and come back equal; pop_item and
clear_session behave as the Agents SDK's Session protocol says.  Also `UpdateSession`, the rpc the items
are stored with.  The tiny model has no chat template, so the session holds the SDK's plain-text turns,
and its byte tokenizer makes the session's offset exactly the bytes of those turns."""

from __future__ import annotations

import asyncio
import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from agents import Agent, ModelSettings, OpenAIChatCompletionsModel, Runner, set_tracing_disabled
from agents.memory.session import Session as AgentsSession
from memoryd_sdk import (
    AsyncMemoryClient,
    MemoryClient,
    MetadataConflict,
    NotFound,
    OffsetConflict,
    ResourceExhausted,
)
from memoryd_sdk.agents import HEADER, MemorydSession, turns_of
from openai import AsyncOpenAI

pytest.register_assert_rewrite("sdk_fixtures")
from sdk_fixtures import TOKENS  # noqa: E402
from service_fixtures import Daemon, RedisServer, free_port, tiny_checkpoint  # noqa: E402, F401

TOKEN = TOKENS["alice"]
MODEL = "tiny"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Iterator[Daemon]:  # noqa: F811
    """redis-server (AOF, fsync always) + `memoryd serve --http-listen`, restartable on the same ports."""
    redis_server = RedisServer(tmp_path_factory.mktemp("agents-redis"))
    redis_server.start()
    tokens = ",".join(f"{tok}={tenant}" for tenant, tok in TOKENS.items())
    http_port = free_port()
    d = Daemon(
        tmp_path_factory.mktemp("agents-memoryd"),
        tiny_checkpoint,
        redis_server.url,
        "--auth-tokens",
        tokens,
        "--http-listen",
        f"127.0.0.1:{http_port}",
        "--max-generate-tokens",
        "64",
    )
    d.http_port = http_port
    try:
        d.start()
        yield d
    finally:
        d.close()
        redis_server.kill(signal.SIGTERM)


def plain(turns: list[tuple[str, str]]) -> int:
    """Bytes (= tokens of the tiny model) of turns in the SDK's plain-text chat format."""
    return sum(len(f"<|{r}|>\n{c}<|end|>\n".encode()) for r, c in turns)


def agent(d: Daemon) -> Agent:
    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{d.http_port}/v1", api_key=TOKEN, max_retries=0)
    return Agent(
        name="notes",
        instructions="You keep notes.",
        model=OpenAIChatCompletionsModel(model=MODEL, openai_client=client),
        model_settings=ModelSettings(max_tokens=8, temperature=0),
    )


def test_runner_conversation_survives_kill_9(daemon: Daemon) -> None:
    set_tracing_disabled(True)  # nothing leaves the machine
    session = MemorydSession("agents-conv", target=daemon.address, token=TOKEN, timeout=300)
    assert isinstance(session, AgentsSession)  # the Agents SDK's runtime-checkable protocol
    said = ["My cat is called Miso.", "I live in Lisbon.", "What is my cat called?"]

    async def converse() -> list:
        bot = agent(daemon)
        for text in said:
            result = await Runner.run(bot, text, session=session)
            assert isinstance(result.final_output, str)
        return await session.get_items()

    items = asyncio.run(converse())
    users = [i for i in items if i.get("role") == "user"]
    assert [u["content"] for u in users] == said  # the inputs, as the Runner stored them
    assert sum(1 for i in items if i.get("role") == "assistant") == 3
    with MemoryClient(daemon.address, token=TOKEN) as observer:
        info = observer.get_session("agents-conv")
        # the session's model read every item's text, in the chat format, and nothing else
        assert info.offset == plain([t for i in items for t in turns_of(i)])
        assert json.loads(info.metadata[HEADER])["n"] == len(items)

        assert daemon.kill(signal.SIGKILL) == -signal.SIGKILL
        daemon.start()
        after = observer.get_session("agents-conv")
        assert after.offset == info.offset and after.metadata == info.metadata

    async def reread() -> list:
        fresh = MemorydSession("agents-conv", target=daemon.address, token=TOKEN, timeout=300)  # a new process, say
        try:
            return await fresh.get_items()
        finally:
            await fresh.close()

    assert asyncio.run(reread()) == items

    async def fourth_turn() -> list:  # the conversation goes on after the restart
        await Runner.run(agent(daemon), "And where do I live?", session=session)
        return await session.get_items()

    more = asyncio.run(fourth_turn())
    assert more[: len(items)] == items and more[len(items)]["content"] == "And where do I live?"


def test_get_items_limit_pop_and_clear(daemon: Daemon) -> None:
    items = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": [{"type": "output_text", "text": "second", "annotations": []}]},
        {"type": "function_call", "call_id": "c1", "name": "lookup", "arguments": '{"q": "x"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "found\nit"},
        {"role": "user", "content": 'ünïcode and "quotes"\n' + "long " * 1000},  # several metadata chunks
    ]

    async def go() -> None:
        s = MemorydSession("agents-proto", target=daemon.address, token=TOKEN, timeout=300)
        assert await s.get_items() == [] and await s.pop_item() is None  # created on first use, empty
        await s.add_items(items[:2])
        await s.add_items(items[2:])
        assert await s.get_items() == items
        assert await s.get_items(limit=2) == items[-2:]
        assert await s.get_items(limit=0) == []
        client = AsyncMemoryClient(daemon.address, token=TOKEN, timeout=300)
        offset = (await client.get_session("agents-proto")).offset
        assert offset == plain([t for i in items for t in turns_of(i)])
        assert turns_of(items[2]) == [("assistant", '[tool call lookup({"q": "x"})]')]

        assert await s.pop_item() == items[-1]
        assert await s.get_items() == items[:-1]
        assert (await client.get_session("agents-proto")).offset == offset  # the weights cannot un-learn
        await s.add_items([items[-1]])  # the same item again: read again (a new position), stored again
        assert await s.get_items() == items

        await s.clear_session()
        assert await s.get_items() == [] and await s.pop_item() is None
        info = await client.get_session("agents-proto")
        assert info.offset == 0 and info.metadata == {"created_by": "openai-agents"}
        await client.close()
        await s.close()

    asyncio.run(go())


def test_a_concurrent_writer_is_detected(daemon: Daemon) -> None:
    async def go() -> None:
        a = MemorydSession("agents-race", target=daemon.address, token=TOKEN, timeout=300)
        b = MemorydSession("agents-race", target=daemon.address, token=TOKEN, timeout=300)
        await a.add_items([{"role": "user", "content": "one"}])
        stale = await b._info()  # b read the items, then a wrote
        await a.add_items([{"role": "user", "content": "two"}])
        with pytest.raises(MetadataConflict, match="another writer"):
            await b._store(stale, [])
        assert [i["content"] for i in await a.get_items()] == ["one", "two"]
        await a.close()
        await b.close()

    asyncio.run(go())


def test_too_many_items_are_refused_before_anything_changes(daemon: Daemon) -> None:
    async def go() -> None:
        s = MemorydSession("agents-full", target=daemon.address, token=TOKEN, timeout=300)
        await s.add_items([{"role": "user", "content": "hi"}])
        with pytest.raises(ResourceExhausted, match="clear_session"):
            await s.add_items([{"role": "user", "content": "x" * 4000} for _ in range(70)])
        assert await s.get_items() == [{"role": "user", "content": "hi"}]
        client = AsyncMemoryClient(daemon.address, token=TOKEN, timeout=300)
        assert (await client.get_session("agents-full")).offset == plain([("user", "hi")])
        await client.close()
        await s.close()

    asyncio.run(go())


def test_update_session_metadata(daemon: Daemon) -> None:
    """The rpc under the items: set and remove entries, compare-and-set, tenants apart, state untouched."""
    with MemoryClient(daemon.address, token=TOKEN) as c, MemoryClient(daemon.address, token=TOKENS["bob"]) as bob:
        s = c.create_session("agents-meta", metadata={"a": "1"})
        s.append("hello")
        info = s.update_metadata({"b": "2", "a": ""})
        assert info.metadata == {"b": "2"} and info.offset == 5
        assert c.update_session("agents-meta", {"c": "3"}, {"b": "2", "zz": ""}).metadata == {"b": "2", "c": "3"}
        with pytest.raises(MetadataConflict, match="expected_metadata\\['b'\\]") as e:
            c.update_session("agents-meta", {"c": "4"}, {"b": "other"})
        assert not isinstance(e.value, OffsetConflict) and e.value.offset is None  # no offset conflicted
        with pytest.raises(NotFound):
            bob.update_session("agents-meta", {"x": "y"})
        assert c.get_session("agents-meta").metadata == {"b": "2", "c": "3"}
        assert c.get_session("agents-meta").offset == 5
