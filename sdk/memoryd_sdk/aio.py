"""`AsyncMemoryClient`: the proto's calls one to one, with deadlines, safe retries and typed errors.

This is the SDK's one implementation of every call: the sync `MemoryClient` runs these
same coroutines on a private event loop thread (`blocking.py`), so request building,
retries, error mapping, paging and export/import streaming exist once and the two
clients cannot drift (sdk/README.md says why this way round).

Each method is one RPC.  Sessions as objects (offset tracking, chat helpers) live in
`aio_session.py` on top of these; this module only knows how to send a request well:

- every call gets a deadline (`timeout`, per attempt; the client's default otherwise);
- UNAVAILABLE and DEADLINE_EXCEEDED are retried with backoff (see `retry.py`), and the
  retries of state-changing calls carry what the server needs to recognise them
  (append ids, client-chosen session ids);
- no `wait_for_ready`: a daemon that is down fails each attempt fast with UNAVAILABLE
  (and that is what the caller sees when the attempts run out), while the channel's
  short reconnect backoff (`connection.CHANNEL_OPTIONS`) lets a retry after a dropped
  connection find a fresh one;
- file and iterator I/O (exports, imports, the pieces of `append_stream`) runs in a
  worker thread, so a slow disk or a slow tool never stalls the event loop.
"""

from __future__ import annotations

import asyncio
import copy
import os
import tempfile
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import grpc

from memoryd_sdk.aio_generation import AsyncGenerateStream
from memoryd_sdk.aio_session import AsyncSession
from memoryd_sdk.chat import ChatTemplate
from memoryd_sdk.connection import TLS, auth_metadata
from memoryd_sdk.errors import (
    AlreadyExists,
    DeadlineExceeded,
    MemorydError,
    NotFound,
    OffsetConflict,
    from_rpc_error,
)
from memoryd_sdk.export_file import Dest, ExportFormatError, iter_data, iter_recall_log, read_header, write_header
from memoryd_sdk.iterators import aiter_of
from memoryd_sdk.proto import memoryd_pb2 as pb
from memoryd_sdk.requests import (
    APPEND_TOKENS_PER_SECOND,
    Content,
    Extras,
    Message,
    SamplingParams,
    StreamBuilder,
    append_request,
    append_timeout,
    append_tokens,
    fork_request,
    generate_request,
    messages_request,
    new_append_id,
    new_session_id,
    recall_options,
    reset_request,
    sampling_params,
)
from memoryd_sdk.retry import NO_RETRY, Attempt, RetryPolicy, call_with_retry_async
from memoryd_sdk.routing import RoutedStub, Routes, Targets
from memoryd_sdk.types import (
    AppendResult,
    ExportHeader,
    GenerateChunk,
    GenerateResult,
    LogText,
    ModelInfo,
    RecalledSpan,
    RecallOptions,
    SessionInfo,
)

DEFAULT_TARGET = "127.0.0.1:50051"


class AsyncMemoryClient:
    """A connection to memoryd (one shared channel per daemon; any number of concurrent calls).

    `target` is `host:port`, or several daemons (`"a:50051,b:50051"`, a list, or one name
    that resolves to several): each session's calls then go to the daemon holding it
    (`routing.py`); `token` the bearer token when the daemon has auth on; `tls`
    see `connection.TLS`.  `timeout` is the deadline of unary calls and
    `generate_timeout` of generations and exports/imports (seconds, per attempt); an append
    without an explicit `timeout` gets `timeout` plus its tokens at `append_rate` tokens per
    second (`requests.APPEND_TOKENS_PER_SECOND`), so a long one is not cut off and retried
    from nothing.
    `template`: a `ChatTemplate` for `add_message` / `chat`; None (the default) uses the
    model's own chat template when the server has one, else `PlainTemplate`.
    `metadata`: extra gRPC metadata sent with every call (a gateway forwards its caller's).
    """

    def __init__(
        self,
        target: Targets = DEFAULT_TARGET,
        token: str | None = None,
        tls: TLS = None,
        *,
        timeout: float = 30.0,
        generate_timeout: float = 600.0,
        append_rate: float = APPEND_TOKENS_PER_SECOND,
        retry: RetryPolicy | None = None,
        template: ChatTemplate | None = None,
        options: tuple[tuple[str, Any], ...] = (),
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.target = target
        self.timeout, self.generate_timeout = timeout, generate_timeout
        self.append_rate = append_rate
        self.retry = retry or RetryPolicy()
        self.template = template
        self._model: ModelInfo | None = None
        self._md = auth_metadata(token) + tuple(metadata)
        self._routes = Routes(target, tls, options)
        self._stub: Any = RoutedStub(self._routes)

    # -- plumbing --------------------------------------------------------------------------------

    async def close(self) -> None:
        """Close the channels (in-flight calls are cancelled)."""
        await self._routes.close()

    async def __aenter__(self) -> AsyncMemoryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _as_caller(self, metadata: tuple[tuple[str, str], ...]) -> AsyncMemoryClient:
        """This client (same channel, settings and model cache) sending `metadata` instead of its own.

        For a gateway that forwards each caller's `authorization` to the daemon: one channel,
        each request under its caller's token and tenant.
        """
        twin = copy.copy(self)
        twin._md = tuple(metadata)
        return twin

    async def _unary(self, method: str, request: Any, timeout: float | None, attempts: list[int] | None = None) -> Any:
        """One unary call with retries; `attempts[0]` tells the caller which attempt answered."""

        async def once(a: Attempt) -> Any:
            if attempts is not None:
                attempts[0] = a.number
            rpc = getattr(self._stub, method)
            return await rpc(request, timeout=timeout or self.timeout, metadata=self._md)

        return await call_with_retry_async(once, self.retry, method)

    def _append_timeout(self, req: pb.AppendRequest) -> float:
        """The default deadline of this append: `timeout` plus its tokens at `append_rate`."""
        bytes_tokenizer = self._model is not None and self._model.tokenizer == "bytes"
        return append_timeout(self.timeout, append_tokens(req, bytes_tokenizer), self.append_rate)

    # -- model -----------------------------------------------------------------------------------

    async def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        """The served model: digest, tokenizer, chat template, window, limits (GetModel)."""
        self._model = ModelInfo.from_pb(await self._unary("GetModel", pb.GetModelRequest(), timeout))
        return self._model

    async def wait_ready(self, timeout: float = 120.0) -> ModelInfo:
        """Wait until every daemon of `target` answers, then return the served model (GetModel).

        For a script that starts `memoryd serve` and talks to it at once: a daemon opens its port
        only once its model is loaded, which the first start, converting the default model,
        takes tens of seconds for, and the other calls retry `Unavailable` for about 30 s in all
        (`RetryPolicy`) before raising it.  Raises `DeadlineExceeded`, naming the address, when
        one has not answered within `timeout` seconds; another error (a wrong token, say) at once."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout
        await self._routes.pick("")  # resolves a name that stands for several daemons
        info = None
        for address in self._routes.addresses:
            left = max(0.001, end - loop.time())
            stub = self._routes.stub(address)
            try:
                info = await stub.GetModel(pb.GetModelRequest(), timeout=left, metadata=self._md, wait_for_ready=True)
            except grpc.aio.AioRpcError as e:
                if e.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise from_rpc_error(e) from None
                raise DeadlineExceeded(
                    f"no memoryd answered at {address} within {timeout:g} s: is `memoryd serve` running there "
                    "(its first start converts the model, which takes a while)?"
                ) from None
        assert info is not None
        self._model = ModelInfo.from_pb(info)
        return self._model

    async def cached_model_info(self) -> ModelInfo:
        """`model_info()`, fetched once per client (the chat helpers ask for it on every turn)."""
        return self._model or await self.model_info()

    # -- sessions --------------------------------------------------------------------------------

    async def create_session(
        self,
        session_id: str | None = None,
        metadata: dict[str, str] | None = None,
        *,
        temporary: bool = False,
        timeout: float | None = None,
    ) -> AsyncSession:
        """A new empty session.  With no id the SDK picks one (so a retried create cannot make two).

        `temporary=True`: leaving `with session:` deletes it.
        """
        chosen = session_id is None
        sid = new_session_id() if chosen else session_id
        attempts = [0]
        req = pb.CreateSessionRequest(session_id=sid, metadata=metadata or {})
        try:
            info = SessionInfo.from_pb(await self._unary("CreateSession", req, timeout, attempts))
        except AlreadyExists:
            if not (chosen and attempts[0] > 1):
                raise
            info = await self.get_session(sid)  # our own id, taken by our own earlier attempt
        return AsyncSession(self, info.session_id, info=info, temporary=temporary)

    def session(self, session_id: str) -> AsyncSession:
        """A handle on an existing session (no call is made; its offset is fetched on first use)."""
        return AsyncSession(self, session_id)

    async def get_session(self, session_id: str, *, timeout: float | None = None) -> SessionInfo:
        m = await self._unary("GetSession", pb.GetSessionRequest(session_id=session_id), timeout)
        return SessionInfo.from_pb(m)

    async def list_sessions(self, page_size: int = 0, *, timeout: float | None = None) -> AsyncIterator[SessionInfo]:
        """Every session of this tenant, ordered by id, fetched a page at a time as you iterate."""
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
        """Delete; returns the offset it had (None when a retry found our own earlier attempt had deleted it)."""
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
        """Back to the initial state (id and metadata stay)."""
        attempts = [0]
        try:
            m = await self._unary("ResetSession", reset_request(session_id, expected_offset), timeout, attempts)
            return SessionInfo.from_pb(m)
        except OffsetConflict as e:
            if attempts[0] > 1 and e.offset == 0 and expected_offset != 0:
                return await self.get_session(session_id, timeout=timeout)  # our earlier attempt reset it
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
        """A copy of the session's state now (cheap on the server); the two diverge from here."""
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

    async def update_session(
        self,
        session_id: str,
        metadata: dict[str, str],
        expected_metadata: dict[str, str] | None = None,
        *,
        timeout: float | None = None,
    ) -> SessionInfo:
        """Set metadata entries (an empty value removes one) in one atomic step; the state is not touched.

        With `expected_metadata` it is a compare-and-set: unless every entry holds (an empty
        value: the key is absent), nothing changes and `MetadataConflict` (ABORTED) is raised.
        Retrying is safe: the same update applied twice leaves the same metadata (a retried
        compare-and-set whose first attempt landed sees its own result and is refused; callers
        that use `expected_metadata` read the session again on `MetadataConflict`).
        """
        req = pb.UpdateSessionRequest(session_id=session_id, metadata=metadata, expected_metadata=expected_metadata)
        return SessionInfo.from_pb(await self._unary("UpdateSession", req, timeout))

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
        """Read text or token ids into the session; durable when this returns.

        Always sends an append id (a fresh one unless given), so a retry after a lost
        answer is recognised by the server and read once (`duplicate=True`).
        """
        aid = append_id or new_append_id()
        req = append_request(session_id, content, expected_offset, aid)
        return AppendResult.from_pb(await self._unary("Append", req, timeout or self._append_timeout(req)), aid)

    async def append_messages(
        self,
        session_id: str,
        messages: Iterable[Message],
        expected_offset: int | None = None,
        append_id: str | None = None,
        *,
        timeout: float | None = None,
    ) -> AppendResult:
        """Append chat turns formatted by the server with the model's chat template (`model_info().chat_messages`)."""
        aid = append_id or new_append_id()
        req = messages_request(session_id, messages, expected_offset, aid)
        return AppendResult.from_pb(await self._unary("Append", req, timeout or self._append_timeout(req)), aid)

    async def append_stream(
        self,
        session_id: str,
        pieces: Iterable[Content | Message] | AsyncIterable[Content | Message],
        expected_offset: int | None = None,
        *,
        timeout: float | None = None,
    ) -> AppendResult:
        """Client-streaming append: each piece is one append, sent as `pieces` yields it.

        Pieces already sent are remembered, so a retry resends them with the same append
        ids (the server skips those that landed) and then carries on with the rest.  A
        sync iterable is read in a worker thread (it may block, e.g. on a tool's output).
        """
        builder = StreamBuilder(session_id, expected_offset)
        source = aiter_of(pieces)
        sent: list[pb.AppendRequest] = []
        current = [0]

        async def requests(attempt: int) -> AsyncIterator[pb.AppendRequest]:
            current[0] = attempt
            i = 0
            while attempt == current[0]:  # a newer attempt owns the stream
                if i >= len(sent):
                    try:
                        item = await anext(source)
                    except StopAsyncIteration:
                        return
                    sent.append(builder.build(item))
                yield sent[i]
                i += 1

        async def once(a: Attempt) -> Any:
            return await self._stub.AppendStream(
                requests(a.number), timeout=timeout or self.generate_timeout, metadata=self._md, session=session_id
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
        """The whole generation, retried from the start on UNAVAILABLE / DEADLINE_EXCEEDED."""

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
        params: SamplingParams | None = None,
        commit: bool = False,
        expected_offset: int | None = None,
        append_id: str | None = None,
        commit_stop: bool = False,
        commit_suffix: str = "",
        recall: bool | RecallOptions = False,
        timeout: float | None = None,
        **sampling: object,
    ) -> AsyncGenerateStream:
        """Sample a continuation; iterate the result for text deltas as they are made.

        Sampling settings: `params` (a `SamplingParams`) and/or its fields as keyword arguments
        (`max_tokens=48, temperature=0.7`; keywords win).

        `commit=True` makes prompt and output part of the session once the generation
        completes (it carries an append id, so a retry lands once); `commit=False` leaves
        the session exactly as it was.  What is committed of the output is exactly the
        text sent (the stop is left out unless `commit_stop=True`), then `commit_suffix`.
        `recall`: place the session's most relevant earlier spans before the prompt (see `recall`).
        """
        req = generate_request(
            session_id,
            prompt,
            sampling_params(params, sampling),
            commit,
            expected_offset,
            append_id or new_append_id(),
            Extras(commit_stop=commit_stop, commit_suffix=commit_suffix, recall=recall_options(recall)),
        )

        async def made() -> pb.GenerateRequest:
            return req

        return self._generate_stream(made, commit, timeout)

    async def complete(
        self,
        session_id: str,
        prompt: Content | None = None,
        *,
        params: SamplingParams | None = None,
        commit: bool = False,
        expected_offset: int | None = None,
        append_id: str | None = None,
        commit_stop: bool = False,
        commit_suffix: str = "",
        recall: bool | RecallOptions = False,
        timeout: float | None = None,
        **sampling: object,
    ) -> GenerateResult:
        """The non-streaming form of `generate`: the whole text and token ids, with retries throughout.

        With `commit=True` the session gets exactly the text returned (the stop is left out
        unless `commit_stop=True`), then `commit_suffix`, in one atomic commit.
        """
        req = generate_request(
            session_id,
            prompt,
            sampling_params(params, sampling),
            commit,
            expected_offset,
            append_id or new_append_id(),
            Extras(commit_stop=commit_stop, commit_suffix=commit_suffix, recall=recall_options(recall)),
        )
        return await self._complete(req, timeout)

    # -- recall ----------------------------------------------------------------------------------

    async def recall(
        self, session_id: str, query: str, k: int = 8, *, timeout: float | None = None
    ) -> list[RecalledSpan]:
        """The `k` spans of the session's history most relevant to `query`, most relevant first (Recall).

        Exact text from anywhere in the session's log (also long out of the model's window),
        each with its [start_offset, end_offset).  Reads only: retried like any read.
        """
        req = pb.RecallRequest(session_id=session_id, query=query, k=k)
        m = await self._unary("Recall", req, timeout)
        return [RecalledSpan.from_pb(x) for x in m.spans]

    async def read_log(self, session_id: str, last_tokens: int, *, timeout: float | None = None) -> LogText:
        """The text of the session's last `last_tokens` tokens (what it read most recently; ReadLog)."""
        m = await self._unary("ReadLog", pb.ReadLogRequest(session_id=session_id, last_tokens=last_tokens), timeout)
        return LogText.from_pb(m)

    # -- export / import -------------------------------------------------------------------------

    async def export_session(
        self, session_id: str, dest: Dest, *, chunk_bytes: int = 0, timeout: float | None = None
    ) -> ExportHeader:
        """Write the session (header, state bytes and recall log, see `export_file`) to a path or a binary
        stream.

        Each chunk is written as it arrives (the state is never held whole in memory).  To a
        path: written to a temporary file and renamed, so a reader never sees half an export,
        and retried as a whole.  To a seekable stream: a retry rewinds it to where it started;
        a stream that cannot seek is not retried (its bytes cannot be taken back).
        """
        req = pb.ExportSessionRequest(session_id=session_id, chunk_bytes=chunk_bytes)

        async def into(out: IO[bytes]) -> ExportHeader:
            header: pb.ExportHeader | None = None
            got, log = 0, 0
            call = self._stub.ExportSession(req, timeout=timeout or self.generate_timeout, metadata=self._md)
            async for chunk in call:
                kind = chunk.WhichOneof("chunk")
                if kind == "header":
                    header = chunk.header
                    await asyncio.to_thread(write_header, out, header)
                elif kind == "data" and not log:  # the file holds the state, then the recall log
                    got += len(chunk.data)
                    await asyncio.to_thread(out.write, chunk.data)
                elif kind == "recall_log":
                    log += len(chunk.recall_log)
                    await asyncio.to_thread(out.write, chunk.recall_log)
                else:
                    raise MemorydError(f"export of {session_id!r} sent a {kind} chunk out of order")
            if header is None or got != header.total_bytes or log != header.recall_log_bytes:
                raise MemorydError(
                    f"export of {session_id!r} ended after {got} state and {log} recall log bytes without a complete "
                    "export"
                )
            return ExportHeader.from_pb(header)

        if isinstance(dest, str | os.PathLike):
            path = Path(dest)

            async def to_path(a: Attempt) -> ExportHeader:
                fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
                try:
                    with os.fdopen(fd, "wb") as f:
                        header = await into(f)
                    os.replace(tmp, path)
                    return header
                except BaseException:
                    Path(tmp).unlink(missing_ok=True)
                    raise

            return await call_with_retry_async(to_path, self.retry, "ExportSession")
        start = dest.tell() if dest.seekable() else None

        async def to_stream(a: Attempt) -> ExportHeader:
            if a.is_retry and start is not None:
                dest.seek(start)
                dest.truncate()
            return await into(dest)

        return await call_with_retry_async(to_stream, self.retry if start is not None else NO_RETRY, "ExportSession")

    async def import_session(
        self,
        src: Dest,
        session_id: str | None = None,
        metadata: dict[str, str] | None = None,
        *,
        temporary: bool = False,
        timeout: float | None = None,
    ) -> AsyncSession:
        """A new session from an export (a path or a binary stream), read and sent a chunk at a time.

        `session_id`/`metadata` override the export's.  Not retried: a retry could not tell
        its own landing from a session that already had that id; on `Unavailable`, look
        with `get_session` and import again.
        """
        if isinstance(src, str | os.PathLike):
            with open(src, "rb") as f:
                return await self.import_session(f, session_id, metadata, temporary=temporary, timeout=timeout)
        header = await asyncio.to_thread(read_header, src)
        if session_id is not None:
            header.session_id = session_id
        if metadata is not None:
            header.metadata.clear()
            header.metadata.update(metadata)

        bad_file: list[ExportFormatError] = []

        def pieces() -> Iterator[pb.SessionChunk]:
            yield pb.SessionChunk(header=header)
            try:
                for data in iter_data(src, header):
                    yield pb.SessionChunk(data=data)
                for log in iter_recall_log(src, header):
                    yield pb.SessionChunk(recall_log=log)
            except ExportFormatError as e:
                bad_file.append(e)  # end the stream short: the server refuses it, and we say why

        try:
            m = await self._stub.ImportSession(
                aiter_of(pieces()),
                timeout=timeout or self.generate_timeout,
                metadata=self._md,
                session=header.session_id,
            )
        except grpc.RpcError as e:
            if bad_file:
                raise bad_file[0] from None
            raise from_rpc_error(e) from e
        if bad_file:  # cannot happen (the server checks size and sha256), but never accept a bad file
            raise bad_file[0]
        info = SessionInfo.from_pb(m)
        return AsyncSession(self, info.session_id, info=info, temporary=temporary)
