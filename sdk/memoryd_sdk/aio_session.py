"""`AsyncSession`: a session as an object on asyncio (the async twin of `session.py`; same rules)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from typing import TYPE_CHECKING

from memoryd_sdk._proto import memoryd_pb2 as pb
from memoryd_sdk.aio_generation import AsyncGenerateStream
from memoryd_sdk.chat import DEFAULT_TEMPLATE, SERVER_TEMPLATE, ChatTemplate, ServerTemplate
from memoryd_sdk.errors import OffsetConflict, Unimplemented
from memoryd_sdk.export_file import Dest
from memoryd_sdk.requests import Content, Extras, Message, generate_request, is_message, new_append_id, sampling
from memoryd_sdk.session import _turn_text
from memoryd_sdk.types import AppendResult, ChatReply, ExportHeader, GenerateChunk, GenerateResult, SessionInfo

if TYPE_CHECKING:
    from memoryd_sdk.aio import AsyncMemoryClient


class AsyncSession:
    """As `Session`, with coroutines; calls on one object are serialised by an asyncio.Lock."""

    def __init__(
        self,
        client: AsyncMemoryClient,
        session_id: str,
        *,
        info: SessionInfo | None = None,
        temporary: bool = False,
        template: ChatTemplate | None = None,
    ) -> None:
        self.client = client
        self.id = session_id
        self.temporary = temporary
        self.template = template or client.template
        self.offset: int | None = info.offset if info is not None else None
        self.last_info = info
        self._lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"AsyncSession({self.id!r}, offset={self.offset})"

    async def __aenter__(self) -> AsyncSession:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.temporary:
            await self.delete()

    async def _expected(self) -> int:
        if self.offset is None:
            await self._info()
        assert self.offset is not None
        return self.offset

    async def _info(self, timeout: float | None = None) -> SessionInfo:
        info = await self.client.get_session(self.id, timeout=timeout)
        self.offset, self.last_info = info.offset, info
        return info

    async def info(self, *, timeout: float | None = None) -> SessionInfo:
        return await self._info(timeout)

    async def append(
        self, content: Content, *, append_id: str | None = None, timeout: float | None = None
    ) -> AppendResult:
        async with self._lock:
            try:
                res = await self.client.append(self.id, content, await self._expected(), append_id, timeout=timeout)
            except OffsetConflict as e:
                if e.offset is not None:
                    self.offset = e.offset
                raise
            self.offset = res.offset
            return res

    async def append_stream(
        self, pieces: Iterable[Content | Message] | AsyncIterable[Content | Message], *, timeout: float | None = None
    ) -> AppendResult:
        """As `Session.append_stream` (pieces: text, token ids or `(role, content)` turns)."""
        pieces = self._formatted(pieces)
        async with self._lock:
            try:
                res = await self.client.append_stream(self.id, pieces, await self._expected(), timeout=timeout)
            except OffsetConflict as e:
                if e.offset is not None:
                    self.offset = e.offset
                raise
            self.offset = res.offset
            return res

    async def _formatted(
        self, pieces: Iterable[Content | Message] | AsyncIterable[Content | Message]
    ) -> AsyncIterator[Content | Message]:
        """As `Session._formatted`."""
        fmt: ChatTemplate | ServerTemplate | None = None

        async def each() -> AsyncIterator[Content | Message]:
            if isinstance(pieces, AsyncIterable):
                async for p in pieces:
                    yield p
            else:
                for p in pieces:
                    yield p

        async for p in each():
            if is_message(p):
                fmt = fmt or await self.chat_format()
                if not isinstance(fmt, ServerTemplate):
                    p = _turn_text(fmt, p)
            yield p

    def generate(
        self,
        prompt: Content | None = None,
        *,
        max_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 0.0,
        top_k: int = 0,
        stop: str | Iterable[str] | None = None,
        stop_tokens: Iterable[int] | None = None,
        seed: int | None = None,
        commit: bool = False,
        append_id: str | None = None,
        commit_stop: bool = False,
        commit_suffix: str = "",
        timeout: float | None = None,
    ) -> AsyncGenerateStream:
        """As `Session.generate`: `async for delta in session.generate(...)`."""
        settings = sampling(max_tokens, temperature, top_p, top_k, stop, stop_tokens, seed)
        aid = append_id or new_append_id()
        extras = Extras(commit_stop=commit_stop, commit_suffix=commit_suffix)

        async def make() -> pb.GenerateRequest:
            expected = None
            if commit:
                async with self._lock:
                    expected = await self._expected()
            return generate_request(self.id, prompt, settings, commit, expected, aid, extras)

        def on_done(last: GenerateChunk) -> None:
            if commit:
                self.offset = last.offset

        return self.client._generate_stream(make, commit, timeout, on_done)

    async def complete(
        self,
        prompt: Content | None = None,
        *,
        max_tokens: int = 64,
        temperature: float = 0.0,
        top_p: float = 0.0,
        top_k: int = 0,
        stop: str | Iterable[str] | None = None,
        stop_tokens: Iterable[int] | None = None,
        seed: int | None = None,
        commit: bool = False,
        append_id: str | None = None,
        commit_stop: bool = False,
        commit_suffix: str = "",
        timeout: float | None = None,
        _extras: Extras | None = None,
    ) -> GenerateResult:
        """As `Session.complete`: the non-streaming generate (text and token ids)."""
        settings = sampling(max_tokens, temperature, top_p, top_k, stop, stop_tokens, seed)
        extras = _extras or Extras(commit_stop=commit_stop, commit_suffix=commit_suffix)
        async with self._lock:
            expected = await self._expected() if commit else None
            aid = append_id or new_append_id()
            req = generate_request(self.id, prompt, settings, commit, expected, aid, extras)
            try:
                res = await self.client._complete(req, timeout)
            except OffsetConflict as e:
                if e.offset is not None:
                    self.offset = e.offset
                raise
            if commit:
                self.offset = res.offset
            return res

    async def fork(
        self,
        new_session_id: str | None = None,
        metadata: dict[str, str] | None = None,
        *,
        temporary: bool = False,
        timeout: float | None = None,
    ) -> AsyncSession:
        async with self._lock:
            expected = await self._expected()
            try:
                info = await self.client.fork_session(self.id, new_session_id, metadata, expected, timeout=timeout)
            except OffsetConflict as e:
                if e.offset is not None:
                    self.offset = e.offset
                raise
        return AsyncSession(self.client, info.session_id, info=info, temporary=temporary, template=self.template)

    async def reset(self, *, expected_offset: int | None = None, timeout: float | None = None) -> SessionInfo:
        async with self._lock:
            info = await self.client.reset_session(self.id, expected_offset, timeout=timeout)
            self.offset, self.last_info = info.offset, info
            return info

    async def delete(self, *, timeout: float | None = None) -> int | None:
        async with self._lock:
            off = await self.client.delete_session(self.id, timeout=timeout)
            self.offset = None
            return off

    async def export(self, dest: Dest, *, chunk_bytes: int = 0, timeout: float | None = None) -> ExportHeader:
        return await self.client.export_session(self.id, dest, chunk_bytes=chunk_bytes, timeout=timeout)

    async def import_(
        self, src: Dest, metadata: dict[str, str] | None = None, *, timeout: float | None = None
    ) -> AsyncSession:
        s = await self.client.import_session(src, self.id, metadata, temporary=self.temporary, timeout=timeout)
        self.offset, self.last_info = s.offset, s.last_info
        return self

    async def chat_format(self) -> ChatTemplate | ServerTemplate:
        """As `Session.chat_format`."""
        if self.template is not None:
            return self.template
        try:
            info = await self.client.cached_model_info()
        except Unimplemented:  # a daemon from before GetModel: it formats no messages
            return DEFAULT_TEMPLATE
        return SERVER_TEMPLATE if info.chat_messages else DEFAULT_TEMPLATE

    async def add_message(self, role: str, content: str, *, append_id: str | None = None) -> AppendResult:
        """As `Session.add_message` (formats documented in `memoryd_sdk.chat`)."""
        return await self.add_messages([(role, content)], append_id=append_id)

    async def add_messages(self, messages: list[Message], *, append_id: str | None = None) -> AppendResult:
        """As `Session.add_messages`."""
        fmt = await self.chat_format()
        if isinstance(fmt, ServerTemplate):
            async with self._lock:
                try:
                    res = await self.client.append_messages(self.id, messages, await self._expected(), append_id)
                except OffsetConflict as e:
                    if e.offset is not None:
                        self.offset = e.offset
                    raise
                self.offset = res.offset
                return res
        return await self.append("".join(_turn_text(fmt, m) for m in messages), append_id=append_id)

    async def chat(
        self,
        text: str,
        *,
        role: str = "user",
        reply_role: str = "assistant",
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 0.0,
        top_k: int = 0,
        seed: int | None = None,
        timeout: float | None = None,
    ) -> ChatReply:
        """As `Session.chat`: one committed generation of turn + reply + the turn's closing."""
        fmt = await self.chat_format()
        kw = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "top_k": top_k}
        if isinstance(fmt, ServerTemplate):
            if reply_role != fmt.reply_role:
                raise ValueError(f"this model's chat template writes replies as {fmt.reply_role!r}, not {reply_role!r}")
            extras = Extras(messages=((role, text),), add_generation_prompt=True)
            gen = await self.complete(None, **kw, seed=seed, commit=True, timeout=timeout, _extras=extras)
        else:
            prompt = fmt.turn(role, text) + fmt.reply_prefix(reply_role)
            gen = await self.complete(
                prompt, **kw, seed=seed, stop=fmt.stop(), commit=True, commit_suffix=fmt.close(), timeout=timeout
            )
        return ChatReply(gen.text, gen.tokens, gen.finish_reason, gen.offset, gen)
