"""LangChain over memoryd: `MemorydChat`, a chat model whose conversation is a memoryd session,
and `MemorydRetriever`, a retriever over a session's history (the `Recall` rpc).

LangChain hands a chat model the whole conversation on every call; an agent's history
grows, and every other backend reads all of it again each turn.  Here the conversation
already lives in the session, so `MemorydChat` sends only what is new: it remembers the
turns the session holds (what it sent, and the replies it got), checks that each call's
messages start with exactly those, and reads the rest into the session together with the
reply in one committed generation (`AsyncSession.reply`).  A conversation that does not
extend the session's (history edited or truncated by the caller) is refused with a
message saying so, rather than silently diverging from what the model remembers.

Install with the SDK's `langchain` extra: `pip install "memoryd-sdk[langchain]"`.

    from memoryd_sdk.langchain import MemorydChat
    llm = MemorydChat(target="127.0.0.1:50051", session_id="agent-7")
    llm.invoke("Remember: the key is under the mat.")

`MemorydRetriever` (bottom of this module) returns the spans of a session's history that
best match a query, as Documents whose metadata carry the span's [start, end) offsets and
score, most relevant first:

    from memoryd_sdk.langchain import MemorydRetriever
    docs = MemorydRetriever(target="127.0.0.1:50051", session_id="agent-7", k=4).invoke("where is the key?")

One object per conversation; a new object on a session that already holds turns treats
the first messages it is given as new (give it only the new ones).  Sync calls run on the
SDK's sync client, async calls on an async client of the running loop; both go through
the same coroutine (`_reply`).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

from langchain_core.callbacks import (
    AsyncCallbackManagerForLLMRun,
    AsyncCallbackManagerForRetrieverRun,
    CallbackManagerForLLMRun,
    CallbackManagerForRetrieverRun,
)
from langchain_core.documents import Document
from langchain_core.language_models.chat_models import BaseChatModel
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.retrievers import BaseRetriever
from pydantic import ConfigDict, PrivateAttr

from memoryd_sdk.aio import DEFAULT_TARGET, AsyncMemoryClient
from memoryd_sdk.aio_generation import AsyncGenerateStream
from memoryd_sdk.aio_session import AsyncSession
from memoryd_sdk.blocking import iterate
from memoryd_sdk.client import MemoryClient
from memoryd_sdk.errors import NotFound
from memoryd_sdk.types import GenerateChunk, GenerateResult, RecalledSpan, Usage

Turn = tuple[str, str]


def turn_of(m: BaseMessage) -> Turn:
    """A LangChain message as a (role, text) chat turn."""
    if isinstance(m, SystemMessage):
        role = "system"
    elif isinstance(m, HumanMessage):
        role = "user"
    elif isinstance(m, AIMessage):
        role = "assistant"
    elif isinstance(m, ToolMessage):
        role = "tool"
    elif isinstance(m, ChatMessage):
        role = m.role
    else:
        raise ValueError(f"memoryd cannot send a {type(m).__name__} (system, human, ai, tool or chat messages)")
    if isinstance(m, AIMessage) and m.tool_calls:
        raise ValueError("memoryd does not support tool calls; send the tool's result as a ToolMessage's text")
    return role, m.text


def usage_metadata(last: GenerateChunk | GenerateResult) -> UsageMetadata:
    u = Usage.of(last)
    return UsageMetadata(input_tokens=u.prompt_tokens, output_tokens=u.completion_tokens, total_tokens=u.total_tokens)


class MemorydChat(BaseChatModel):
    """A chat model served by memoryd; its conversation is the session `session_id` (made on first use)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    target: str = DEFAULT_TARGET
    token: str | None = None
    tls: Any = None
    session_id: str | None = None
    """The session holding the conversation; None: a new one on the first call (then set here)."""
    max_tokens: int | None = None
    """None: 256, or the daemon's limit when that is lower."""
    temperature: float = 0.0
    top_p: float = 0.0
    top_k: int = 0
    seed: int | None = None
    recall: bool = True
    """Place the session's most relevant earlier spans before each reply (exact facts from long out of
    the model's window; never committed); False: off."""

    _held: list[Turn] = PrivateAttr(default_factory=list)
    _client: MemoryClient | None = PrivateAttr(default=None)
    _aclients: dict[int, tuple[asyncio.AbstractEventLoop, AsyncMemoryClient]] = PrivateAttr(default_factory=dict)

    @property
    def _llm_type(self) -> str:
        return "memoryd"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"target": self.target, "session_id": self.session_id, "max_tokens": self.max_tokens}

    @property
    def held(self) -> list[Turn]:
        """The turns this object knows the session holds, in order."""
        return list(self._held)

    # -- clients ---------------------------------------------------------------------------------

    def _sync_client(self) -> MemoryClient:
        if self._client is None:
            self._client = MemoryClient(self.target, self.token, self.tls)
        return self._client

    def _async_client(self) -> AsyncMemoryClient:
        """An async client of the running loop (grpc.aio channels belong to one loop)."""
        loop = asyncio.get_running_loop()
        held = self._aclients.get(id(loop))
        if held is None or held[0] is not loop:
            held = (loop, AsyncMemoryClient(self.target, self.token, self.tls))
            self._aclients[id(loop)] = held
        return held[1]

    def close(self) -> None:
        """Close the sync client (async clients close with their loop)."""
        if self._client is not None:
            self._client.close()
            self._client = None

    # -- the one implementation ------------------------------------------------------------------

    def _new_turns(self, messages: Sequence[BaseMessage]) -> list[Turn]:
        turns = [turn_of(m) for m in messages]
        n = len(self._held)
        if turns[:n] != self._held:
            at = next(i for i, (a, b) in enumerate(zip(turns, self._held, strict=False)) if a != b) if turns else 0
            raise ValueError(
                f"the messages do not continue session {self.session_id!r}: it holds {n} turns and message {at} "
                "differs from them (memoryd keeps the conversation; send it unchanged plus the new messages, "
                "or use a new MemorydChat / session for a new conversation)"
            )
        new = turns[n:]
        if not new:
            raise ValueError("no new messages: the session already holds every message given")
        return new

    async def _session(self, client: AsyncMemoryClient) -> AsyncSession:
        if self.session_id is None:
            s = await client.create_session(metadata={"created_by": "langchain"})
            self.session_id = s.id
            return s
        try:
            await client.get_session(self.session_id)
        except NotFound:
            return await client.create_session(self.session_id, metadata={"created_by": "langchain"})
        return client.session(self.session_id)

    async def _reply(
        self, client: AsyncMemoryClient, messages: Sequence[BaseMessage], stop: list[str] | None, stream: bool
    ) -> tuple[list[Turn], GenerateResult | AsyncGenerateStream]:
        new = self._new_turns(messages)
        session = await self._session(client)
        max_tokens = self.max_tokens or min(256, (await client.cached_model_info()).max_generate_tokens)
        kw = {"max_tokens": max_tokens, "temperature": self.temperature, "top_p": self.top_p}
        kw |= {"top_k": self.top_k, "stop": stop, "seed": self.seed, "recall": self.recall}
        if stream:
            return new, await session.reply_stream(new, **kw)
        return new, (await session.reply(new, **kw)).generation

    def _kept(self, new: list[Turn], reply: str) -> None:
        self._held += [*new, ("assistant", reply)]

    def _result(self, new: list[Turn], gen: GenerateResult) -> ChatResult:
        self._kept(new, gen.text)
        meta = {"session_id": self.session_id, "offset": gen.offset, "finish_reason": gen.finish_reason.name.lower()}
        msg = AIMessage(content=gen.text, usage_metadata=usage_metadata(gen), response_metadata=meta)
        return ChatResult(generations=[ChatGeneration(message=msg)])

    async def _chunks(self, new: list[Turn], stream: AsyncGenerateStream) -> AsyncIterator[ChatGenerationChunk]:
        try:
            async for c in stream.chunks():
                if c.text:
                    yield ChatGenerationChunk(message=AIMessageChunk(content=c.text))
                if c.done:
                    assert stream.result is not None
                    self._kept(new, stream.result.text)
                    meta = {"session_id": self.session_id, "offset": c.offset}
                    meta["finish_reason"] = c.finish_reason.name.lower()
                    last = AIMessageChunk(content="", usage_metadata=usage_metadata(c), response_metadata=meta)
                    yield ChatGenerationChunk(message=last)
        finally:
            if not stream.done:
                stream.cancel()  # a consumer that stops early: nothing of the turn is kept

    # -- LangChain's entry points ----------------------------------------------------------------

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        client = self._sync_client()
        new, gen = client._runner.run(self._reply(client._core, messages, stop, False))
        assert isinstance(gen, GenerateResult)
        return self._result(new, gen)

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        new, gen = await self._reply(self._async_client(), messages, stop, False)
        assert isinstance(gen, GenerateResult)
        return self._result(new, gen)

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        client = self._sync_client()
        new, stream = client._runner.run(self._reply(client._core, messages, stop, True))
        assert isinstance(stream, AsyncGenerateStream)
        try:
            for chunk in iterate(client._runner, self._chunks(new, stream)):
                if run_manager and chunk.text:
                    run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk
        finally:
            if not stream.done:  # the consumer stopped early: cancel on the server, nothing of the turn is kept
                client._runner.call(stream.cancel)

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        new, stream = await self._reply(self._async_client(), messages, stop, True)
        assert isinstance(stream, AsyncGenerateStream)
        async for chunk in self._chunks(new, stream):
            if run_manager and chunk.text:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk


# -- the retriever ---------------------------------------------------------------------------------


def span_document(session_id: str, span: RecalledSpan) -> Document:
    """One recalled span as a Document: its text, and where it lies in the session (token offsets)."""
    meta = {"session_id": session_id, "start_offset": span.start_offset, "end_offset": span.end_offset}
    meta["score"] = span.score
    return Document(page_content=span.text, metadata=meta)


class MemorydRetriever(BaseRetriever):
    """The spans of session `session_id`'s history that best match a query (memoryd's `Recall`), most relevant
    first, as Documents with `session_id`, `start_offset`, `end_offset` (tokens, [start, end)) and `score` in
    their metadata.  Sync calls run on the SDK's sync client, async calls on an async client of the running loop."""

    model_config = ConfigDict(arbitrary_types_allowed=True)

    target: str = DEFAULT_TARGET
    token: str | None = None
    tls: Any = None
    session_id: str
    k: int = 4
    """Spans per query (at most the daemon's recall limit)."""

    _client: MemoryClient | None = PrivateAttr(default=None)
    _aclients: dict[int, tuple[asyncio.AbstractEventLoop, AsyncMemoryClient]] = PrivateAttr(default_factory=dict)

    def _get_relevant_documents(self, query: str, *, run_manager: CallbackManagerForRetrieverRun) -> list[Document]:
        if self._client is None:
            self._client = MemoryClient(self.target, self.token, self.tls)
        spans = self._client.session(self.session_id).recall(query, k=self.k)
        return [span_document(self.session_id, s) for s in spans]

    async def _aget_relevant_documents(
        self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun
    ) -> list[Document]:
        loop = asyncio.get_running_loop()
        held = self._aclients.get(id(loop))
        if held is None or held[0] is not loop:
            held = (loop, AsyncMemoryClient(self.target, self.token, self.tls))
            self._aclients[id(loop)] = held
        spans = await held[1].session(self.session_id).recall(query, k=self.k)
        return [span_document(self.session_id, s) for s in spans]

    def close(self) -> None:
        """Close the sync client (async clients close with their loop)."""
        if self._client is not None:
            self._client.close()
            self._client = None
