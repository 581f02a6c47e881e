"""`AsyncMemoryClient`: the same API as `MemoryClient` on grpc.aio, for agents that run on asyncio.

Sessions as objects are `aio_session.AsyncSession`, streams `aio_generation.AsyncGenerateStream`.

Same requests (built by `requests.py`), same retry rules, same typed errors as the sync
client; every method is a coroutine, generations are async iterators.  One client (one
channel) serves any number of concurrent sessions; create it inside the running loop.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import grpc

from memoryd_sdk._proto import memoryd_pb2 as pb
from memoryd_sdk._proto import memoryd_pb2_grpc as pb_grpc
from memoryd_sdk.aio_generation import AsyncGenerateStream
from memoryd_sdk.aio_session import AsyncSession
from memoryd_sdk.chat import ChatTemplate
from memoryd_sdk.client import DEFAULT_TARGET
from memoryd_sdk.connection import TLS, aio_channel, auth_metadata
from memoryd_sdk.errors import AlreadyExists, MemorydError, NotFound, OffsetConflict, from_rpc_error
from memoryd_sdk.export_file import Dest, iter_data, read_header, write_header
from memoryd_sdk.requests import (
    Content,
    Message,
    StreamBuilder,
    append_request,
    fork_request,
    generate_request,
    messages_request,
    new_append_id,
    new_session_id,
    reset_request,
    sampling,
)
from memoryd_sdk.retry import Attempt, RetryPolicy, call_with_retry_async
from memoryd_sdk.types import (
    AppendResult,
    ExportHeader,
    GenerateChunk,
    GenerateResult,
    ModelInfo,
    SessionInfo,
)


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
        template: ChatTemplate | None = None,
        options: tuple[tuple[str, Any], ...] = (),
    ) -> None:
        self.target = target
        self.timeout, self.generate_timeout = timeout, generate_timeout
        self.retry = retry or RetryPolicy()
        self.template = template
        self._model: ModelInfo | None = None
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

    async def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        """As `MemoryClient.model_info`."""
        self._model = ModelInfo.from_pb(await self._unary("GetModel", pb.GetModelRequest(), timeout))
        return self._model

    async def cached_model_info(self) -> ModelInfo:
        return self._model or await self.model_info()

    async def append_messages(
        self,
        session_id: str,
        messages: Iterable[Message],
        expected_offset: int | None = None,
        append_id: str | None = None,
        *,
        timeout: float | None = None,
    ) -> AppendResult:
        """As `MemoryClient.append_messages`."""
        aid = append_id or new_append_id()
        req = messages_request(session_id, messages, expected_offset, aid)
        return AppendResult.from_pb(await self._unary("Append", req, timeout), aid)

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
        pieces: Iterable[Content | Message] | AsyncIterable[Content | Message],
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
        async def once(a: Attempt) -> list[GenerateChunk]:
            call = self._stub.Generate(req, timeout=timeout or self.generate_timeout, metadata=self._md)
            return [GenerateChunk.from_pb(m) async for m in call]

        chunks = await call_with_retry_async(once, self.retry, "Generate")  # a duplicate resends the whole output
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
