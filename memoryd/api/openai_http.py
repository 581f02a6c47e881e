"""An OpenAI-compatible HTTP endpoint for memoryd: POST /v1/chat/completions (SSE or not), GET /v1/models.

Why a gateway that speaks gRPC to the daemon (through the SDK's async client) rather than
HTTP handlers inside the daemon: the gRPC service stays the one place where sessions,
auth, tenants, limits and exactly-once appends are decided, so the HTTP side cannot
disagree with it; the same app runs in the daemon's process (`memoryd serve --http-listen
HOST:PORT`, off when unset) or standalone in front of any daemon (`memoryd http --daemon
ADDR --listen HOST:PORT`); and a crash or a slow client on the HTTP side touches no model
state.  Starlette + uvicorn (pinned) are a small, well-kept ASGI stack.

Conversations live on the server.  A request names its session with the header
`memoryd-session` or the body's `user` field; it then carries only the *new* messages,
which are read into the session together with the reply in one committed generation (so
they land together or not at all), under the `Idempotency-Key` header as the append id:
a retried request with the same key lands once and gets the original reply back.  A
session that does not exist yet is created.  Without a session name the messages go into
a temporary session that is deleted after the reply (nothing is kept).  With `n` > 1 the n
choices are sampled from forks of the session's state after the new messages, and nothing is
kept (a commit keeps one output, and the client, not the server, picks the choice it keeps).
Recall is on, as for the SDK's `chat`: before the reply the daemon places the session's spans
most relevant to the last user message just before it (never committed;
`GenerateRequest.recall`); the body's `"recall": false` (memoryd's extension) turns it off.

The caller's `Authorization: Bearer <token>` is forwarded as gRPC metadata, so the
daemon's tokens and tenants apply unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import uvicorn
from memoryd_sdk import (
    AsyncMemoryClient,
    AsyncSession,
    FinishReason,
    GenerateChunk,
    GenerateResult,
    ModelInfo,
    TokenLogprob,
)
from memoryd_sdk import errors as sdk_errors
from memoryd_sdk.connection import TLS
from memoryd_sdk.types import Usage
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from memoryd.api.openai_request import ChatRequest, RequestError, parse_chat_request

log = logging.getLogger("memoryd.http")

SESSION_HEADER = "memoryd-session"
IDEMPOTENCY_HEADER = "idempotency-key"
DEFAULT_MAX_TOKENS = 256

# gRPC status -> HTTP status and OpenAI error type (OpenAI's SDKs pick their exception class by status).
_HTTP: dict[type[sdk_errors.MemorydError], tuple[int, str]] = {
    sdk_errors.InvalidArgument: (400, "invalid_request_error"),
    sdk_errors.ResourceExhausted: (400, "invalid_request_error"),
    sdk_errors.FailedPrecondition: (400, "invalid_request_error"),
    sdk_errors.Unauthenticated: (401, "authentication_error"),
    sdk_errors.PermissionDenied: (403, "permission_error"),
    sdk_errors.NotFound: (404, "not_found_error"),
    sdk_errors.OffsetConflict: (409, "conflict_error"),
    sdk_errors.AlreadyExists: (409, "conflict_error"),
    sdk_errors.Unavailable: (503, "service_unavailable"),
    sdk_errors.DeadlineExceeded: (504, "timeout_error"),
}


def error_of(e: sdk_errors.MemorydError) -> RequestError:
    status, kind = _HTTP.get(type(e), (500, "server_error"))
    return RequestError(e.message, None, e.code.name.lower(), status=status, type=kind)


def usage_body(last: GenerateChunk | GenerateResult) -> dict[str, int]:
    """OpenAI's usage object (the counts are defined in `memoryd_sdk.types.Usage`)."""
    u = Usage.of(last)
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens, "total_tokens": u.total_tokens}


def finish_reason(r: FinishReason) -> str:
    return "length" if r == FinishReason.LENGTH else "stop"


class Gateway:
    """The app's state: one channel to the daemon, shared by every caller (each under its own token)."""

    def __init__(self, target: str, tls: TLS = None) -> None:
        self.target, self.tls = target, tls
        self.client: AsyncMemoryClient | None = None
        self.model: ModelInfo | None = None

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        self.client = AsyncMemoryClient(self.target, tls=self.tls)  # on the serving loop: the channel lives there
        try:
            yield
        finally:
            await self.client.close()

    def caller(self, request: Request) -> AsyncMemoryClient:
        assert self.client is not None
        auth = request.headers.get("authorization")
        return self.client._as_caller((("authorization", auth),) if auth else ())

    async def model_info(self, client: AsyncMemoryClient) -> ModelInfo:
        """The served model, asked once under the first caller's token (it is the same for every tenant)."""
        if self.model is None:
            self.model = await client.model_info()
            assert self.client is not None
            self.client._model = self.model  # later callers' sessions read the chat format from it
        client._model = self.model
        return self.model

    # -- routes ----------------------------------------------------------------------------------

    async def models(self, request: Request) -> Response:
        try:
            info = await self.caller(request).model_info()  # asked every time: it also checks the token
        except sdk_errors.MemorydError as e:
            return error_response(error_of(e))
        return JSONResponse({"object": "list", "data": [model_card(info)]})

    async def one_model(self, request: Request) -> Response:
        try:
            info = await self.caller(request).model_info()
        except sdk_errors.MemorydError as e:
            return error_response(error_of(e))
        name = request.path_params["model"]
        if name != info.name:
            return error_response(
                RequestError(
                    f"no model {name!r}; this endpoint serves {info.name!r}", "model", "model_not_found", status=404
                )
            )
        return JSONResponse(model_card(info))

    async def chat_completions(self, request: Request) -> Response:
        try:
            try:
                body = await request.json()
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise RequestError(f"the request body is not JSON: {e}", None, "invalid_json") from None
            req = parse_chat_request(body)
            client = self.caller(request)
            info = await self.model_info(client)
            if req.model != info.name:
                raise RequestError(
                    f"model {req.model!r} is not served here; this endpoint serves {info.name!r} (GET /v1/models)",
                    "model",
                    "model_not_found",
                    status=404,
                )
            name = request.headers.get(SESSION_HEADER) or req.user
            key = request.headers.get(IDEMPOTENCY_HEADER)
            session = await open_session(client, name) if name else await scratch_session(client)
            kept = name and req.n == 1  # n > 1 lands nothing, so a key has nothing to land once
            reply = Reply(self, req, info, session, temporary=not name, append_id=key if kept else None)
            return await reply.respond()
        except RequestError as e:
            return error_response(e)
        except sdk_errors.MemorydError as e:
            return error_response(error_of(e))


def model_card(info: ModelInfo) -> dict[str, Any]:
    return {"id": info.name, "object": "model", "created": 0, "owned_by": "memoryd"}


def error_response(e: RequestError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


async def open_session(client: AsyncMemoryClient, name: str) -> AsyncSession:
    """The named session, created on first use."""
    try:
        info = await client.get_session(name)
        return AsyncSession(client, name, info=info)
    except sdk_errors.NotFound:
        pass
    try:
        return await client.create_session(name, metadata={"created_by": "openai-http"})
    except sdk_errors.AlreadyExists:  # a concurrent first request made it
        return client.session(name)


async def scratch_session(client: AsyncMemoryClient) -> AsyncSession:
    return await client.create_session(metadata={"created_by": "openai-http", "temporary": "1"}, temporary=True)


class Reply:
    """One chat completion: the new messages and the reply, in one committed generation."""

    def __init__(
        self,
        gw: Gateway,
        req: ChatRequest,
        info: ModelInfo,
        session: AsyncSession,
        *,
        temporary: bool,
        append_id: str | None,
    ) -> None:
        self.req, self.info, self.session, self.append_id = req, info, session, append_id
        self.named = not temporary
        self.temporary = temporary
        """Still to be deleted (a scratch session for a request that named none)."""
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.kwargs = {
            "max_tokens": req.max_tokens or min(DEFAULT_MAX_TOKENS, info.max_generate_tokens),
            "temperature": req.temperature,
            "top_p": req.top_p,
            "top_k": req.top_k,
            "stop": req.stop,
            "seed": req.seed,
            "append_id": append_id,
            **dict(req.sampling),
            "recall": req.recall,
        }
        if req.n > 1:  # n samples on forks of the prompt's state: none is committed (a commit keeps one output)
            self.kwargs["commit"] = False

    def extension(self, last: GenerateChunk | GenerateResult) -> dict[str, Any]:
        """memoryd's own fields (ignored by OpenAI clients): where the session stands now, whether this
        request's messages and reply are in it (`kept`: false for n > 1), and the tokens of recalled context
        read before the prompt (never kept)."""
        if not self.named:
            return {"session": None}
        return {
            "session": self.session.id,
            "offset": last.offset,
            "duplicate": last.duplicate,
            "kept": self.req.n == 1,
            "recalled_tokens": last.recalled_tokens,
        }

    async def respond(self) -> Response:
        if not self.req.stream:
            try:
                gen = (await self.session.reply(list(self.req.messages), **self.kwargs)).generation
            finally:
                await self.discard()
            return JSONResponse(self.completion(gen))
        stream = await self.session.reply_stream(list(self.req.messages), **self.kwargs)
        chunks = stream.chunks()
        try:
            first = await anext(chunks)  # errors before any output get their own HTTP status
        except BaseException:
            await self.discard()
            raise
        return StreamingResponse(self.events(stream, first, chunks), media_type="text/event-stream")

    async def discard(self) -> None:
        """Delete a temporary session (once)."""
        if self.temporary:
            self.temporary = False
            with contextlib.suppress(sdk_errors.MemorydError):
                await self.session.delete()

    def usage(self, last: GenerateChunk | GenerateResult) -> dict[str, int]:
        if self.req.n > 1:  # nothing committed: the prompt is what the call read besides the samples
            p, c = last.prompt_tokens, last.generated_tokens
            return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}
        return usage_body(last)

    def completion(self, gen: GenerateResult) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.info.name,
            "choices": [
                {
                    "index": s.index,
                    "message": {"role": "assistant", "content": s.text},
                    "finish_reason": finish_reason(s.finish_reason),
                    "logprobs": logprobs_body(s.logprobs) if self.req.logprobs else None,
                }
                for s in gen.samples
            ],
            "usage": self.usage(gen),
            "memoryd": self.extension(gen),
        }

    def chunk(self, delta: dict[str, Any], finish: str | None = None, index: int = 0, logprobs: Any = None) -> str:
        body = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.info.name,
            "choices": [{"index": index, "delta": delta, "finish_reason": finish, "logprobs": logprobs}],
        }
        return sse(body)

    async def events(self, stream: Any, first: GenerateChunk, rest: AsyncIterator[GenerateChunk]) -> AsyncIterator[str]:
        """SSE: the role, text deltas (with their logprobs when asked), each choice's finish reason,
        usage if asked, `[DONE]`.

        A client that goes away mid-reply cancels the generation: nothing of it is committed.
        """
        try:
            for i in range(self.req.n):
                yield self.chunk({"role": "assistant", "content": ""}, index=i)
            c = first
            while True:
                lp = logprobs_body(c.logprobs) if self.req.logprobs and c.logprobs else None
                if c.text or lp is not None:
                    yield self.chunk({"content": c.text}, index=c.index, logprobs=lp)
                if not c.done and c.finish_reason != FinishReason.UNSPECIFIED:  # one of n samples ended
                    yield self.chunk({}, finish_reason(c.finish_reason), c.index)
                if c.done:
                    break
                c = await anext(rest)
            await self.discard()  # before the last events: a client that saw [DONE] finds nothing left behind
            if self.req.n == 1:
                yield self.chunk({}, finish_reason(c.finish_reason))
            if self.req.include_usage:
                usage = {"id": self.id, "object": "chat.completion.chunk", "created": self.created}
                usage |= {"model": self.info.name, "choices": [], "usage": self.usage(c)}
                yield sse(usage | {"memoryd": self.extension(c)})
            yield "data: [DONE]\n\n"
        except sdk_errors.MemorydError as e:  # after the headers: the error travels as an event
            yield sse(error_of(e).body())
        finally:
            if not stream.done:
                stream.cancel()
            await self.discard()


def logprobs_body(entries: tuple[TokenLogprob, ...]) -> dict[str, Any]:
    """OpenAI's `logprobs` object of a choice (or of a chunk's tokens)."""

    def one(text: str, logprob: float) -> dict[str, Any]:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    content = [one(e.text, e.logprob) | {"top_logprobs": [one(t.text, t.logprob) for t in e.top]} for e in entries]
    return {"content": content, "refusal": None}


def sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, separators=(',', ':'))}\n\n"


def create_app(target: str, tls: TLS = None) -> Starlette:
    """The ASGI app, talking gRPC to the daemon at `target`."""
    gw = Gateway(target, tls)
    routes = [
        Route("/v1/chat/completions", gw.chat_completions, methods=["POST"]),
        Route("/v1/models", gw.models, methods=["GET"]),
        Route("/v1/models/{model}", gw.one_model, methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=gw.lifespan)


def split_listen(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"HTTP listen address must be host:port (e.g. 127.0.0.1:8080), got {listen!r}")
    return host.strip("[]"), int(port)


def local_target(grpc_listen: str, port: int) -> str:
    """How a gateway in the daemon's process reaches its gRPC port (a wildcard bind is reached on loopback)."""
    host = grpc_listen.rpartition(":")[0]
    return f"{'127.0.0.1' if host in ('0.0.0.0', '[::]', '::', '') else host}:{port}"


class _Embedded(uvicorn.Server):
    """uvicorn inside a process that owns its signals (the daemon's SIGTERM drain must stay in charge)."""

    @contextlib.contextmanager
    def capture_signals(self) -> Any:
        yield


@dataclass
class HttpServer:
    """A running gateway: `port` it listens on, `stop()` to end it."""

    server: uvicorn.Server
    task: asyncio.Task

    @property
    def port(self) -> int:
        return self.server.servers[0].sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self.server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError, SystemExit):
            await self.task


async def start_http(listen: str, target: str, tls: TLS = None) -> HttpServer:
    """Serve the gateway on `listen` (host:port; port 0: any free one); returns once it accepts connections."""
    host, port = split_listen(listen)
    config = uvicorn.Config(create_app(target, tls), host=host, port=port, log_config=None, access_log=False)
    server = _Embedded(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            with contextlib.suppress(asyncio.CancelledError):
                exc = task.exception()
                raise OSError(f"the HTTP gateway could not start on {listen}: {exc!r}")
            raise OSError(f"the HTTP gateway could not start on {listen}")
        await asyncio.sleep(0.02)
    return HttpServer(server, task)


async def run_standalone(listen: str, target: str, tls: TLS = None) -> None:
    """`memoryd http`: the gateway alone, until SIGTERM / Ctrl-C (then in-flight requests finish)."""
    srv = await start_http(listen, target, tls)
    log.info(json.dumps({"event": "listening", "http": f"{split_listen(listen)[0]}:{srv.port}", "daemon": target}))
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda: setattr(srv.server, "should_exit", True))
    await srv.task
