"""`AsyncMemoryClient` and `AsyncSession`: the same API on grpc.aio, for agents that run on asyncio.

Same requests (built by `requests.py`), same retry rules, same typed errors as the sync
client; every method is a coroutine, generations are async iterators.  One client (one
channel) serves any number of concurrent sessions; create it inside the running loop.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import grpc

from memoryd_sdk._proto import memoryd_pb2 as pb
from memoryd_sdk._proto import memoryd_pb2_grpc as pb_grpc
from memoryd_sdk.chat import DEFAULT_TEMPLATE, ChatTemplate
from memoryd_sdk.client import DEFAULT_TARGET
from memoryd_sdk.connection import TLS, aio_channel, auth_metadata
from memoryd_sdk.errors import AlreadyExists, MemorydError, NotFound, OffsetConflict, from_rpc_error
from memoryd_sdk.export_file import Dest, iter_data, read_header, write_header
from memoryd_sdk.requests import (
    Content,
    StreamBuilder,
    append_request,
    fork_request,
    generate_request,
    new_append_id,
    new_session_id,
    reset_request,
    sampling,
)
from memoryd_sdk.retry import Attempt, RetryPolicy, _should_retry, call_with_retry_async
from memoryd_sdk.types import (
    AppendResult,
    ChatReply,
    ExportHeader,
    GenerateChunk,
    GenerateResult,
    SessionInfo,
)


class AsyncGenerateStream:
    """`async for delta in stream`: text deltas; `chunks()` for ids and the final message; `cancel()`.

    Nothing is sent until the first `async for` (or `chunks()` read).

    As the sync `GenerateStream`: retried only before the first message arrives.
    """

    def __init__(
        self,
        start: Callable[[Attempt], Awaitable[Any]],
        policy: RetryPolicy,
        committed: bool,
        on_done: Callable[[GenerateChunk], None] | None = None,
    ) -> None:
        self._start, self._policy, self._committed, self._on_done = start, policy, committed, on_done
        self._call: Any = None
        self._cancelled = False
        self._received: list[GenerateChunk] = []
        self._it = self._run()
        self.result: GenerateResult | None = None

    async def _run(self) -> AsyncIterator[GenerateChunk]:
        attempt = 1
        while True:
            if self._cancelled:
                return
            self._call = await self._start(Attempt(attempt))
            got_any = False
            try:
                async for m in self._call:
                    got_any = True
                    chunk = GenerateChunk.from_pb(m)
                    self._received.append(chunk)
                    if chunk.done:
                        self.result = GenerateResult.collect(self._received, self._committed)
                        if self._on_done is not None:
                            self._on_done(chunk)
                    yield chunk
                    if chunk.done:
                        return
                return
            except asyncio.CancelledError:
                if self._cancelled:
                    return
                raise
            except grpc.RpcError as e:
                if self._cancelled and e.code() == grpc.StatusCode.CANCELLED:
                    return
                err = from_rpc_error(e)
                if got_any or not _should_retry(err, attempt, self._policy, "Generate"):
                    raise err from e
            await asyncio.sleep(self._policy.backoff(attempt))
            attempt += 1

    def chunks(self) -> AsyncIterator[GenerateChunk]:
        return self._it

    async def __aiter__(self) -> AsyncIterator[str]:
        async for chunk in self._it:
            if chunk.text:
                yield chunk.text

    def cancel(self) -> None:
        """Cancel the call on the server too; a committed generation then commits nothing."""
        self._cancelled = True
        if self._call is not None:
            self._call.cancel()

    async def collect(self) -> GenerateResult:
        async for _ in self._it:
            pass
        if self.result is None:
            raise RuntimeError("the generation was cancelled before it finished")
        return self.result

    async def __aenter__(self) -> AsyncGenerateStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.result is None:
            self.cancel()


class AsyncMemoryClient:
    """As `MemoryClient`, on grpc.aio (one shared channel; any number of concurrent calls)."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        token: str | None = None,
        tls: TLS = None,
        *,
        timeout: float = 30.0,
        generate_timeout: float = 600.0,
        retry: RetryPolicy | None = None,
        template: ChatTemplate = DEFAULT_TEMPLATE,
        options: tuple[tuple[str, Any], ...] = (),
    ) -> None:
        self.target = target
        self.timeout, self.generate_timeout = timeout, generate_timeout
        self.retry = retry or RetryPolicy()
        self.template = template
        self._md = auth_metadata(token)
        self._channel = aio_channel(target, tls, options)
        self._stub = pb_grpc.MemoryServiceStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncMemoryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _unary(self, method: str, request: Any, timeout: float | None, attempts: list[int] | None = None) -> Any:
        rpc = getattr(self._stub, method)

        async def once(a: Attempt) -> Any:
            if attempts is not None:
                attempts[0] = a.number
            return await rpc(request, timeout=timeout or self.timeout, metadata=self._md)

        return await call_with_retry_async(once, self.retry, method)

    # -- sessions --------------------------------------------------------------------------------

    async def create_session(
        self,
        session_id: str | None = None,
        metadata: dict[str, str] | None = None,
        *,
        temporary: bool = False,
        timeout: float | None = None,
    ) -> AsyncSession:
        chosen = session_id is None
        sid = new_session_id() if chosen else session_id
        attempts = [0]
        req = pb.CreateSessionRequest(session_id=sid, metadata=metadata or {})
        try:
            info = SessionInfo.from_pb(await self._unary("CreateSession", req, timeout, attempts))
        except AlreadyExists:
            if not (chosen and attempts[0] > 1):
                raise
            info = await self.get_session(sid)
        return AsyncSession(self, info.session_id, info=info, temporary=temporary)

    def session(self, session_id: str) -> AsyncSession:
        return AsyncSession(self, session_id)

    async def get_session(self, session_id: str, *, timeout: float | None = None) -> SessionInfo:
        m = await self._unary("GetSession", pb.GetSessionRequest(session_id=session_id), timeout)
        return SessionInfo.from_pb(m)

    async def list_sessions(self, page_size: int = 0, *, timeout: float | None = None) -> AsyncIterator[SessionInfo]:
        token = ""
        while True:
            req = pb.ListSessionsRequest(page_size=page_size, page_token=token)
            page = await self._unary("ListSessions", req, timeout)
            for s in page.sessions:
                yield SessionInfo.from_pb(s)
            token = page.next_page_token
            if not token:
                return

    async def delete_session(self, session_id: str, *, timeout: float | None = None) -> int | None:
        attempts = [0]
        try:
            m = await self._unary("DeleteSession", pb.DeleteSessionRequest(session_id=session_id), timeout, attempts)
            return m.offset
        except NotFound:
            if attempts[0] > 1:
                return None
            raise

    async def reset_session(
        self, session_id: str, expected_offset: int | None = None, *, timeout: float | None = None
    ) -> SessionInfo:
        attempts = [0]
        try:
            m = await self._unary("ResetSession", reset_request(session_id, expected_offset), timeout, attempts)
            return SessionInfo.from_pb(m)
        except OffsetConflict as e:
            if attempts[0] > 1 and e.offset == 0 and expected_offset != 0:
                return await self.get_session(session_id, timeout=timeout)
            raise

    async def fork_session(
        self,
        session_id: str,
        new_session_id_: str | None = None,
        metadata: dict[str, str] | None = None,
        expected_offset: int | None = None,
        *,
        timeout: float | None = None,
    ) -> SessionInfo:
        chosen = new_session_id_ is None
        dst = new_session_id() if chosen else new_session_id_
        attempts = [0]
        req = fork_request(session_id, dst, metadata, expected_offset)
        try:
            return SessionInfo.from_pb(await self._unary("ForkSession", req, timeout, attempts))
        except AlreadyExists:
            if not (chosen and attempts[0] > 1):
                raise
            return await self.get_session(dst, timeout=timeout)

    # -- append ----------------------------------------------------------------------------------

    async def append(
        self,
        session_id: str,
        content: Content,
        expected_offset: int | None = None,
        append_id: str | None = None,
        *,
        timeout: float | None = None,
    ) -> AppendResult:
        aid = append_id or new_append_id()
        req = append_request(session_id, content, expected_offset, aid)
        return AppendResult.from_pb(await self._unary("Append", req, timeout), aid)

    async def append_stream(
        self,
        session_id: str,
        pieces: Iterable[Content] | AsyncIterable[Content],
        expected_offset: int | None = None,
        *,
        timeout: float | None = None,
    ) -> AppendResult:
        """Client-streaming append from a sync or async iterable; retried by replaying what was sent."""
        builder = StreamBuilder(session_id, expected_offset)
        source = pieces.__aiter__() if isinstance(pieces, AsyncIterable) else _aiter(pieces)
        sent: list[pb.AppendRequest] = []
        current = [0]

        async def requests(attempt: int) -> AsyncIterator[pb.AppendRequest]:
            current[0] = attempt
            i = 0
            while attempt == current[0]:
                if i >= len(sent):
                    try:
                        item = await source.__anext__()
                    except StopAsyncIteration:
                        return
                    sent.append(builder.build(item))
                yield sent[i]
                i += 1

        async def once(a: Attempt) -> Any:
            return await self._stub.AppendStream(
                requests(a.number),
                timeout=timeout or self.generate_timeout,
                metadata=self._md,
            )

        m = await call_with_retry_async(once, self.retry, "AppendStream")
        return AppendResult.from_pb(m, builder.first_id)

    # -- generate --------------------------------------------------------------------------------

    def _generate_stream(
        self,
        make_request: Callable[[], Awaitable[pb.GenerateRequest]],
        committed: bool,
        timeout: float | None,
        on_done: Callable[[GenerateChunk], None] | None = None,
    ) -> AsyncGenerateStream:
        """A stream whose request is made on its first attempt (a session may need to learn its offset first)."""
        made: list[pb.GenerateRequest] = []

        async def start(a: Attempt) -> Any:
            if not made:
                made.append(await make_request())
            return self._stub.Generate(made[0], timeout=timeout or self.generate_timeout, metadata=self._md)

        return AsyncGenerateStream(start, self.retry, committed, on_done)

    async def _complete(self, req: pb.GenerateRequest, timeout: float | None) -> GenerateResult:
        partial: list[GenerateChunk] = []

        async def once(a: Attempt) -> list[GenerateChunk]:
            chunks: list[GenerateChunk] = []
            try:
                call = self._stub.Generate(req, timeout=timeout or self.generate_timeout, metadata=self._md)
                async for m in call:
                    chunks.append(GenerateChunk.from_pb(m))
            except grpc.RpcError:
                if chunks:
                    partial[:] = chunks
                raise
            return chunks

        chunks = await call_with_retry_async(once, self.retry, "Generate")
        if chunks and chunks[-1].duplicate:
            chunks = [c for c in partial if not c.done] + chunks
        return GenerateResult.collect(chunks, req.commit)

    def generate(
        self,
        session_id: str,
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
        expected_offset: int | None = None,
        append_id: str | None = None,
        timeout: float | None = None,
    ) -> AsyncGenerateStream:
        """As `MemoryClient.generate`; iterate with `async for`."""
        req = generate_request(
            session_id,
            prompt,
            sampling(max_tokens, temperature, top_p, top_k, stop, stop_tokens, seed),
            commit,
            expected_offset,
            append_id or new_append_id(),
        )

        async def made() -> pb.GenerateRequest:
            return req

        return self._generate_stream(made, commit, timeout)

    async def complete(
        self,
        session_id: str,
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
        expected_offset: int | None = None,
        append_id: str | None = None,
        timeout: float | None = None,
    ) -> GenerateResult:
        """As `MemoryClient.complete`: the whole generation, retried throughout."""
        req = generate_request(
            session_id,
            prompt,
            sampling(max_tokens, temperature, top_p, top_k, stop, stop_tokens, seed),
            commit,
            expected_offset,
            append_id or new_append_id(),
        )
        return await self._complete(req, timeout)

    # -- export / import -------------------------------------------------------------------------

    async def export_session(
        self, session_id: str, dest: Dest, *, chunk_bytes: int = 0, timeout: float | None = None
    ) -> ExportHeader:
        """As `MemoryClient.export_session`; file writes are small and done inline."""
        req = pb.ExportSessionRequest(session_id=session_id, chunk_bytes=chunk_bytes)

        async def fetch(a: Attempt) -> tuple[pb.ExportHeader, list[bytes]]:
            header, parts = None, []
            call = self._stub.ExportSession(req, timeout=timeout or self.generate_timeout, metadata=self._md)
            async for chunk in call:
                if chunk.WhichOneof("chunk") == "header":
                    header = chunk.header
                else:
                    parts.append(chunk.data)
            if header is None or sum(map(len, parts)) != header.total_bytes:
                raise MemorydError(f"export of {session_id!r} ended without a complete state")
            return header, parts

        header, parts = await call_with_retry_async(fetch, self.retry, "ExportSession")
        if isinstance(dest, str | os.PathLike):
            tmp = Path(dest).with_name(f".{Path(dest).name}.partial")
            with open(tmp, "wb") as f:
                write_header(f, header)
                for p in parts:
                    f.write(p)
            os.replace(tmp, dest)
        else:
            write_header(dest, header)
            for p in parts:
                dest.write(p)
        return ExportHeader.from_pb(header)

    async def import_session(
        self,
        src: Dest,
        session_id: str | None = None,
        metadata: dict[str, str] | None = None,
        *,
        temporary: bool = False,
        timeout: float | None = None,
    ) -> AsyncSession:
        """As `MemoryClient.import_session` (not retried, for the same reason)."""
        if isinstance(src, str | os.PathLike):
            with open(src, "rb") as f:
                return await self.import_session(f, session_id, metadata, temporary=temporary, timeout=timeout)
        header = read_header(src)
        if session_id is not None:
            header.session_id = session_id
        if metadata is not None:
            header.metadata.clear()
            header.metadata.update(metadata)
        chunks = [pb.SessionChunk(header=header)] + [pb.SessionChunk(data=d) for d in iter_data(src, header)]
        try:
            m = await self._stub.ImportSession(
                _aiter(chunks), timeout=timeout or self.generate_timeout, metadata=self._md
            )
        except grpc.RpcError as e:
            raise from_rpc_error(e) from e
        info = SessionInfo.from_pb(m)
        return AsyncSession(self, info.session_id, info=info, temporary=temporary)


async def _aiter(items: Iterable[Any]) -> AsyncIterator[Any]:
    for x in items:
        yield x


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
        self, pieces: Iterable[Content] | AsyncIterable[Content], *, timeout: float | None = None
    ) -> AppendResult:
        async with self._lock:
            try:
                res = await self.client.append_stream(self.id, pieces, await self._expected(), timeout=timeout)
            except OffsetConflict as e:
                if e.offset is not None:
                    self.offset = e.offset
                raise
            self.offset = res.offset
            return res

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
        timeout: float | None = None,
    ) -> AsyncGenerateStream:
        """As `Session.generate`: `async for delta in session.generate(...)`."""
        settings = sampling(max_tokens, temperature, top_p, top_k, stop, stop_tokens, seed)
        aid = append_id or new_append_id()

        async def make() -> pb.GenerateRequest:
            expected = None
            if commit:
                async with self._lock:
                    expected = await self._expected()
            return generate_request(self.id, prompt, settings, commit, expected, aid)

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
        timeout: float | None = None,
    ) -> GenerateResult:
        """As `Session.complete`: the non-streaming generate (text and token ids)."""
        settings = sampling(max_tokens, temperature, top_p, top_k, stop, stop_tokens, seed)
        async with self._lock:
            expected = await self._expected() if commit else None
            req = generate_request(self.id, prompt, settings, commit, expected, append_id or new_append_id())
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

    async def add_message(self, role: str, content: str, *, append_id: str | None = None) -> AppendResult:
        """As `Session.add_message` (template documented in `memoryd_sdk.chat`)."""
        return await self.append(self.template.turn(role, content), append_id=append_id)

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
        """As `Session.chat`: one committed generation of turn + reply, then the closing text."""
        prompt = self.template.turn(role, text) + self.template.reply_prefix(reply_role)
        gen = await self.complete(
            prompt,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=self.template.stop(),
            commit=True,
            timeout=timeout,
        )
        closing = self.template.close(gen.finish_reason)
        offset = (await self.append(closing, timeout=timeout)).offset if closing else gen.offset
        return ChatReply(gen.text, gen.tokens, gen.finish_reason, offset, gen)
