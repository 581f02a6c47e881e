"""The gRPC edge: authenticate, decode, validate, call `sessions`, map errors to status codes, log one line.

Everything a client can get wrong is checked here, before any session is touched,
so a bad request changes nothing and says what to fix.

Requests arrive as raw bytes and are decoded inside the handler (`add_to_server`
registers every method with no deserializer). grpc runs a deserializer before the
handler, outside anything the handler can catch, and turns its exception into
UNKNOWN or INTERNAL with a message about a Python class; decoding here puts bytes
that are not the request message under the same mapping as every other bad input:
INVALID_ARGUMENT naming the message type, one log line, one metric, nothing touched.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import contextvars
import dataclasses
import functools
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from google.protobuf.message import Message as ProtoMessage
from google.protobuf.timestamp_pb2 import Timestamp
from memoryd_sdk.proto import memoryd_pb2 as pb
from memoryd_sdk.proto import memoryd_pb2_grpc as pb_grpc

from memoryd import metrics
from memoryd.api.auth import Auth
from memoryd.api.forward import Router
from memoryd.api.limits import MAX_META_ENTRIES, sampling_limits, server_limits
from memoryd.api.model_info import ModelInfo
from memoryd.api.validation import (
    check_append_id,
    check_metadata,
    check_metadata_patch,
    check_role,
    check_session_id,
)
from memoryd.engine.work import Logprob, SamplingError, SamplingParams
from memoryd.errors import Aborted, FailedPrecondition, InvalidArgument, ResourceExhausted, ServiceError
from memoryd.sessions.calls import CommitRule, Content, Info, Sessions
from memoryd.sessions.chat import Message, TemplateError
from memoryd.sessions.recall_prompt import RecallAsk, Span, query_of
from memoryd.sessions.routing import Moved
from memoryd.settings import Settings
from memoryd.store.snapshots import SNAPSHOT_FORMAT

log = logging.getLogger("memoryd.calls")

SERVICE = pb.DESCRIPTOR.services_by_name["MemoryService"]

_call: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("memoryd_call")


def note(**fields: Any) -> None:
    """Add fields to this call's log line."""
    _call.get().update(fields)


def grpc_status(e: ServiceError) -> grpc.StatusCode:
    """The gRPC status of a ServiceError (memoryd.errors.Status names them as gRPC does)."""
    return grpc.StatusCode[e.code.name]


def _finish(method: str, fields: dict[str, Any], code: grpc.StatusCode, t0: float) -> None:
    dt = time.perf_counter() - t0
    metrics.CALLS.labels(method, code.name).inc()
    metrics.CALL_SECONDS.labels(method).observe(dt)
    log.info(json.dumps({"call": method, "code": code.name, "ms": round(dt * 1000, 3), **fields}))


def _left(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """Why a call was cancelled under its handler: its deadline passed, or its client went away."""
    left = context.time_remaining()
    # A client whose deadline passes cancels the call itself, which may arrive just before the
    # server's own timer fires: within a second of the deadline, it is the deadline.
    return grpc.StatusCode.DEADLINE_EXCEEDED if left is not None and left <= 1.0 else grpc.StatusCode.CANCELLED


def timeout_of(context: grpc.aio.ServicerContext) -> float | None:
    """Seconds left before the call's gRPC deadline (None: the caller set none), handed to the session
    calls that admit work against it (memoryd/sessions/admission.py)."""
    left = context.time_remaining()
    return left if left is not None and left < 10**8 else None


DRAIN_BYTES = 256 << 20
"""The most of a refused request stream read before answering: enough for any session export of the default
model, while a refused 4 GiB import (max_import_bytes) is cut off rather than read for nothing."""
DRAIN_SECONDS = 10.0
"""The longest a refused request stream is read before answering: a client that stalls mid-stream gets its
status then, racy or not."""


async def _drain(raw: Any) -> None:
    """Read and discard the rest of a client stream that was refused before its end.

    grpc's asyncio client reports `INTERNAL: Internal error from Core` instead of the status the server
    sent when one of its stream's writes fails because the server ended the call first and that failure
    is processed after the status (grpc/grpc#36066: an import of a foreign model's export got INTERNAL,
    not FAILED_PRECONDITION).  A client that has sent its whole stream has no write left to fail, so the
    refusal waits for the client to finish (within DRAIN_BYTES and DRAIN_SECONDS).  Nothing read is used.
    """

    async def rest() -> None:
        got = 0
        async for item in raw:
            got += len(item)
            if got > DRAIN_BYTES:
                return

    # A stream already ended, broken, or read by a forwarded call's task: nothing more to wait for.
    with contextlib.suppress(Exception):
        await asyncio.wait_for(rest(), DRAIN_SECONDS)


async def _abort(context: grpc.aio.ServicerContext, e: ServiceError) -> None:
    trailers = tuple(getattr(e, "trailers", ()))  # routing: the holder's address (memoryd/api/forward.py)
    if e.offset is not None and not any(k == "memoryd-offset" for k, _ in trailers):
        trailers += (("memoryd-offset", str(e.offset)),)
    if isinstance(e, Aborted):  # what conflicted: the SDK raises OffsetConflict only for "offset"
        trailers += (("memoryd-conflict", e.conflict),)
    if trailers:
        context.set_trailing_metadata(trailers)
    await context.abort(grpc_status(e), e.message)


def decode(cls: type[ProtoMessage], raw: bytes) -> Any:
    """Request bytes as the method's message, or INVALID_ARGUMENT naming the type."""
    try:
        return cls.FromString(raw)
    except DecodeError as e:
        name = cls.DESCRIPTOR.full_name
        raise InvalidArgument(
            f"the request ({len(raw)} bytes) does not decode as {name} ({e}): send a serialized {name}"
        ) from e


async def _decoded(cls: type[ProtoMessage], raw: AsyncIterator[bytes]) -> AsyncIterator[Any]:
    """A client stream's messages, decoded one by one as the handler reads them."""
    async for item in raw:
        yield decode(cls, item)


def _request_decoder(method: str) -> Callable[[Any], Any]:
    m = SERVICE.methods_by_name[method]
    cls = getattr(pb, m.input_type.name)
    if m.client_streaming:
        return functools.partial(_decoded, cls)
    return functools.partial(decode, cls)


def add_to_server(servicer: MemoryServicer, server: grpc.aio.Server) -> None:
    """Register every MemoryService method with raw-bytes requests (decoded by the handler, see above)."""
    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    handlers = {
        m.name: kinds[m.client_streaming, m.server_streaming](
            getattr(servicer, m.name),
            request_deserializer=None,
            response_serializer=getattr(pb, m.output_type.name).SerializeToString,
        )
        for m in SERVICE.methods
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),))


@contextlib.asynccontextmanager
async def _served(method: str, context: grpc.aio.ServicerContext, stream: Any = None) -> AsyncIterator[dict[str, Any]]:
    """One call's error mapping, metrics and log line (the same for unary and streamed answers): a
    ServiceError becomes its status (with its trailers), anything else INTERNAL; a call cancelled under
    its handler is logged as DEADLINE_EXCEEDED or CANCELLED. Yields the call's log fields. `stream`: a
    client stream's raw messages, read to its end before a refusal is sent (`_drain`; not for an
    unauthenticated caller)."""
    t0, fields = time.perf_counter(), {}
    _call.set(fields)
    code = grpc.StatusCode.OK
    try:
        yield fields
    except ServiceError as e:
        code = grpc_status(e)
        fields["error"] = e.message
        if stream is not None and "tenant" in fields:  # an unauthenticated caller's stream is not read
            await _drain(stream)
        await _abort(context, e)
    except (asyncio.CancelledError, GeneratorExit):  # the client left or its deadline passed (work safe to
        code = _left(context)  # finish goes on)
        raise
    except grpc.aio.AbortError:
        raise
    except Exception as e:
        code = grpc.StatusCode.INTERNAL
        log.exception("%s failed", method)
        if stream is not None:
            await _drain(stream)
        await context.abort(code, f"internal error: {type(e).__name__}: {e}")
    finally:
        _finish(method, fields, code, t0)


def unary(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a unary-response handler: auth, decode, error mapping, metrics, one log line.

    The call runs here first; only if the session layer says the session is held elsewhere (`Moved`)
    does memoryd/api/forward.py take over (a client stream goes through it from the start: its first
    message may have to be sent again to the holder)."""
    method = fn.__name__
    request_of = _request_decoder(method)
    client_streaming = SERVICE.methods_by_name[method].client_streaming

    @functools.wraps(fn)
    async def wrapper(self: MemoryServicer, raw: Any, context: grpc.aio.ServicerContext) -> Any:
        async with _served(method, context, raw if client_streaming else None) as fields:
            tenant = fields["tenant"] = self.auth.tenant(context.invocation_metadata())
            request = request_of(raw)

            def local(req: Any) -> Any:
                return fn(self, tenant, req, context)

            if client_streaming:
                return await self.router.unary(method, request, context, local)
            try:
                return await local(request)
            except Moved as moved:
                return await self.router.unary(method, request, context, local, moved)

    return wrapper


def streaming(fn: Callable[..., AsyncIterator[Any]]) -> Callable[..., AsyncIterator[Any]]:
    """As `unary`, for server-streaming handlers (async generators)."""
    method = fn.__name__
    request_of = _request_decoder(method)

    @functools.wraps(fn)
    async def wrapper(self: MemoryServicer, raw: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        async with _served(method, context) as fields:
            tenant = fields["tenant"] = self.auth.tenant(context.invocation_metadata())
            request = request_of(raw)

            def local(req: Any) -> AsyncIterator[Any]:
                return fn(self, tenant, req, context)

            async for item in self.router.stream(method, request, context, local):  # here, or at the holder
                yield item

    return wrapper


# -- ids, metadata and roles are checked by memoryd/api/validation.py ---------------------------


def _ts(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts


def span_pb(span: Span) -> pb.RecalledSpan:
    return pb.RecalledSpan(start_offset=span.start, end_offset=span.end, text=span.text, score=span.score)


def session_pb(info: Info) -> pb.Session:
    h = info.head
    return pb.Session(
        session_id=h.session_id,
        tenant=h.tenant,
        metadata=h.metadata,
        created_at=_ts(h.created),
        last_used_at=_ts(h.used),
        model_digest=h.digest,
        offset=h.offset,
        pending_tokens=info.pending,
        steps=info.steps,
        state_bytes=info.state_bytes,
        hot=info.hot,
        stored_bytes=info.stored_bytes,
    )


class _Received:
    """One kind of an import's byte chunks (the state's data, or its recall log), checked as they come:
    at least the floor each but the last, never more than the header announced."""

    def __init__(self, announced: int) -> None:
        self.announced, self.got, self.short = announced, 0, -1  # short: a chunk under the floor, if any
        self.pieces: list[bytes] = []

    def add(self, kind: str, raw: bytes, floor: int) -> None:
        if self.short >= 0:
            raise InvalidArgument(
                f"{kind} chunk {self.short} has fewer than {floor} bytes but is not the last: "
                f"send {kind} in chunks of at least {floor} bytes (only the last may be shorter)"
            )
        if len(raw) < floor:
            self.short = len(self.pieces)
        self.got += len(raw)
        if self.got > self.announced:
            raise InvalidArgument(f"more {kind} than the header announced ({self.announced} bytes)")
        self.pieces.append(raw)

    def check(self, kind: str, size_field: str, sha256: str) -> bytes:
        raw = b"".join(self.pieces)
        unsigned = not raw and not sha256  # nothing announced, nothing sent (an export without a recall log)
        if len(raw) != self.announced or (hashlib.sha256(raw).hexdigest() != sha256 and not unsigned):
            raise InvalidArgument(
                f"import {kind} ({len(raw)} bytes) does not match the header's {size_field} {self.announced} "
                "and sha256: send the export unchanged"
            )
        return raw


class MemoryServicer(pb_grpc.MemoryServiceServicer):
    def __init__(
        self,
        sessions: Sessions,
        settings: Settings,
        auth: Auth,
        model: ModelInfo,
        router: Router | None = None,
    ) -> None:
        self.sessions = sessions
        self.model = model
        self.router = router or Router(settings.daemon_id, "", settings.lease_seconds, None)
        self.s = settings
        self.auth = auth
        self.tok = sessions.tok
        self.chat = sessions.chat
        self.vocab = model.vocab_size
        self.limits = server_limits(settings, self.vocab, model.window_size)
        self.sampling_limits = sampling_limits(settings, self.vocab)
        self.model_info = self._model_info()

    def _model_info(self) -> pb.ModelInfo:
        m, chat = self.model, self.chat
        return pb.ModelInfo(
            digest=m.digest,
            model_type=m.model_type,
            name=m.name,
            vocab_size=m.vocab_size,
            bos_token_id=m.bos_token_id,
            eos_token_id=m.eos_token_id,
            tokenizer=m.tokenizer,
            chat_template=m.chat_template,
            chat_messages=chat is not None and chat.problem is None,
            chat_problem=(chat.problem or "") if chat is not None else "",
            chat_roles=sorted(chat.roles) if chat is not None else [],
            generation_prompt=chat.generation_prompt if chat is not None else "",
            turn_closing=chat.closing if chat is not None else "",
            window_size=m.window_size,
            mini_batch_size=m.mini_batch_size,
            num_fast_layers=m.num_fast_layers,
            num_layers=m.num_layers,
            adapter=m.adapter,
            max_append_tokens=self.s.max_append_tokens,
            max_generate_tokens=self.s.max_generate_tokens,
            max_message_bytes=self.s.max_message_bytes,
            attention_sinks=m.attention_sinks,
            limits=self.limits,
        )

    # -- helpers -----------------------------------------------------------------------------

    def tokens_of(self, text: str, tokens: Any, what: str, allow_empty: bool = False) -> list[int]:
        """Exactly one of text / token ids, checked against the vocabulary and the size limit."""
        if text and len(tokens):
            raise InvalidArgument(f"give either {what} text or token ids, not both")
        if text:
            if len(text) > self.limits.max_append_text_chars:
                raise ResourceExhausted(
                    f"{what} text has {len(text)} characters; at most {self.limits.max_append_text_chars} "
                    "per message (split it)"
                )
            ids = self.tok.encode(text)
            if not ids:
                raise InvalidArgument(f"{what} text encodes to no tokens")
        else:
            ids = [int(t) for t in tokens]
        if not ids:
            if allow_empty:
                return []
            raise InvalidArgument(f"{what} is empty: give text or at least one token id")
        if len(ids) > self.s.max_append_tokens:
            raise ResourceExhausted(
                f"{what} has {len(ids)} tokens; at most {self.s.max_append_tokens} per message (split it)"
            )
        for i, t in enumerate(ids):
            if not 0 <= t < self.vocab:
                raise InvalidArgument(f"token id {t} at index {i} is outside the vocabulary [0, {self.vocab})")
        return ids

    def messages_of(self, msgs: Any, what: str) -> list[Message]:
        """Chat messages checked against the model's chat format (before any session is touched)."""
        if self.chat is None:
            raise InvalidArgument(
                f"{what} messages need a chat template, and this model has none: append text or token ids "
                "(the SDK then formats turns with its plain-text template, memoryd_sdk.chat.PlainTemplate)"
            )
        if self.chat.problem is not None:
            raise InvalidArgument(
                f"{what} messages cannot be used with this model's chat template: {self.chat.problem}"
            )
        field = "messages" if what == "append" else "prompt_messages"
        roles = self.chat.roles
        out = [Message(check_role(m.role, f"{field}[{i}].role", roles), m.content) for i, m in enumerate(msgs)]
        size = sum(len(m.content) for m in out)
        if size > self.limits.max_append_text_chars:
            raise ResourceExhausted(
                f"{what} messages hold {size} characters; at most {self.limits.max_append_text_chars} "
                "per message (split them)"
            )
        try:
            self.chat.check_messages(out)
        except TemplateError as e:
            raise InvalidArgument(f"{what}: {e}") from e
        return out

    def rendered(self, messages: list[Message], what: str, generation_prompt: bool = False) -> Content:
        """The messages' tokens as a function of the offset they land at (0: they open the conversation)."""
        chat = self.chat
        assert chat is not None

        def at(offset: int) -> list[int]:
            try:
                text = chat.render(messages, start=offset == 0, add_generation_prompt=generation_prompt)
            except TemplateError as e:
                raise InvalidArgument(f"{what}: {e}") from e
            ids = self.tok.encode(text) if text else []
            if not ids and not generation_prompt:
                raise InvalidArgument(f"{what} messages render to no text with this model's chat template")
            if len(ids) > self.s.max_append_tokens:
                raise ResourceExhausted(
                    f"{what} messages make {len(ids)} tokens; at most {self.s.max_append_tokens} per message (split it)"
                )
            return ids

        return at

    def recall_k(self, k: int, field: str) -> int:
        if not 1 <= k <= self.limits.max_recall_k:
            raise InvalidArgument(f"{field} must be 1-{self.limits.max_recall_k} (spans to return), got {k}")
        return k

    def recall_query(self, query: str, field: str) -> str:
        if len(query) > self.limits.max_recall_query_chars:
            raise InvalidArgument(
                f"{field} has {len(query)} characters; at most {self.limits.max_recall_query_chars} "
                "(ask with the question or a few key words, not a document)"
            )
        return query

    def recall_ask(self, r: pb.GenerateRequest, messages: list[Message]) -> RecallAsk | None:
        """GenerateRequest.recall checked (zeros are the defaults), with its query (derived from the prompt
        when the client gave none); None when the request does not ask for recall."""
        if not r.HasField("recall"):
            return None
        o, lim = r.recall, self.limits
        k = self.recall_k(o.k or lim.default_recall_k, "recall.k")
        budget = o.budget_tokens or lim.default_recall_budget_tokens
        if budget > lim.max_recall_budget_tokens:
            raise InvalidArgument(
                f"recall.budget_tokens {budget} is over this server's limit {lim.max_recall_budget_tokens} "
                "(recalled context must fit in the attention window; 0: the default)"
            )
        query = self.recall_query(o.query, "recall.query")
        if not query.strip():
            text = r.prompt_text or (self.tok.decode(list(r.prompt_tokens)) if len(r.prompt_tokens) else "")
            query = query_of(messages, text)[-lim.max_recall_query_chars :]
        return RecallAsk(k, budget, query)

    def sampling(self, r: pb.GenerateRequest) -> SamplingParams:
        """The request's `SamplingParams`, checked once, here.  Copied by name: every field of
        SamplingParams is a GenerateRequest field of the same name (a new sampling parameter is a
        proto field and a SamplingParams field; nothing here changes)."""
        values: dict[str, object] = {}
        for f in dataclasses.fields(SamplingParams):
            fd = r.DESCRIPTOR.fields_by_name[f.name]
            v = getattr(r, f.name)
            if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
                v = tuple(sorted(v.items()))
            elif fd.is_repeated:
                v = tuple(v)
            elif fd.has_presence and not r.HasField(f.name):
                v = None
            values[f.name] = v
        try:
            return SamplingParams(**values).check(self.sampling_limits)  # type: ignore[arg-type]
        except SamplingError as e:
            raise (ResourceExhausted if e.over_limit else InvalidArgument)(e.message) from None

    def logprob_pb(self, lp: Logprob) -> pb.TokenLogprob:
        text = self.tok.decode
        top = [pb.TopLogprob(token=t, logprob=v, text=text([t])) for t, v in lp.top]
        return pb.TokenLogprob(token=lp.token, logprob=lp.logprob, text=text([lp.token]), top=top)

    def commit_rule(self, r: pb.GenerateRequest) -> CommitRule:
        """What a committed generation keeps besides its output."""
        suffix: list[int] = []
        if r.commit_suffix:
            if r.add_generation_prompt:
                raise InvalidArgument("commit_suffix is not for chat replies: the chat template closes the turn")
            suffix = self.tokens_of(r.commit_suffix, [], "commit_suffix")
        if r.add_generation_prompt and r.commit:
            if r.commit_stop:
                raise InvalidArgument("commit_stop is not for chat replies: the chat template's closing ends the turn")
            assert self.chat is not None  # checked with the prompt
            suffix = self.tok.encode(self.chat.closing) if self.chat.closing else []
        return CommitRule(r.commit_stop, tuple(suffix))

    # -- sessions ----------------------------------------------------------------------------

    @unary
    async def CreateSession(self, tenant: str, r: pb.CreateSessionRequest, ctx: Any) -> pb.Session:
        sid = check_session_id(r.session_id, allow_empty=True)
        note(session=sid)
        info = await self.sessions.create(tenant, sid, check_metadata(r.metadata))
        return session_pb(info)

    @unary
    async def GetSession(self, tenant: str, r: pb.GetSessionRequest, ctx: Any) -> pb.Session:
        note(session=r.session_id)
        return session_pb(await self.sessions.get(tenant, check_session_id(r.session_id), timeout_of(ctx)))

    @unary
    async def ListSessions(self, tenant: str, r: pb.ListSessionsRequest, ctx: Any) -> pb.ListSessionsResponse:
        if r.page_size > self.limits.max_page_size:
            raise InvalidArgument(
                f"page_size {r.page_size} is over the limit {self.limits.max_page_size} (0: the default)"
            )
        after = ""
        if r.page_token:
            try:
                after = base64.urlsafe_b64decode(r.page_token.encode()).decode()
            except (ValueError, UnicodeDecodeError) as e:
                raise InvalidArgument("page_token is malformed: pass next_page_token back unchanged") from e
            check_session_id(after, "page_token")
        infos, nxt = await self.sessions.list(tenant, after, r.page_size or self.limits.default_page_size)
        token = base64.urlsafe_b64encode(nxt.encode()).decode() if nxt else ""
        note(count=len(infos))
        return pb.ListSessionsResponse(sessions=[session_pb(i) for i in infos], next_page_token=token)

    @unary
    async def DeleteSession(self, tenant: str, r: pb.DeleteSessionRequest, ctx: Any) -> pb.DeleteSessionResponse:
        note(session=r.session_id)
        offset = await self.sessions.delete(tenant, check_session_id(r.session_id))
        return pb.DeleteSessionResponse(offset=offset)

    @unary
    async def ResetSession(self, tenant: str, r: pb.ResetSessionRequest, ctx: Any) -> pb.Session:
        note(session=r.session_id)
        expected = r.expected_offset if r.HasField("expected_offset") else None
        return session_pb(await self.sessions.reset(tenant, check_session_id(r.session_id), expected))

    @unary
    async def ForkSession(self, tenant: str, r: pb.ForkSessionRequest, ctx: Any) -> pb.Session:
        src = check_session_id(r.session_id)
        dst = check_session_id(r.new_session_id, "new_session_id", allow_empty=True)
        note(session=src, new_session=dst)
        meta = check_metadata(r.metadata) or None
        expected = r.expected_offset if r.HasField("expected_offset") else None
        return session_pb(await self.sessions.fork(tenant, src, dst, meta, expected))

    @unary
    async def UpdateSession(self, tenant: str, r: pb.UpdateSessionRequest, ctx: Any) -> pb.Session:
        sid = check_session_id(r.session_id)
        note(session=sid)
        if not len(r.metadata):
            raise InvalidArgument("metadata is empty: give the entries to set (an empty value removes one)")
        patch = check_metadata_patch(r.metadata, "metadata")
        expected = check_metadata_patch(r.expected_metadata, "expected_metadata")
        return session_pb(await self.sessions.update_metadata(tenant, sid, patch, expected, MAX_META_ENTRIES))

    # -- append ------------------------------------------------------------------------------

    async def _append_one(self, tenant: str, sid: str, r: pb.AppendRequest, ctx: Any) -> Any:
        tokens: Content
        if len(r.messages):
            if r.text or len(r.tokens):
                raise InvalidArgument("give one of append text, token ids or messages, not several")
            tokens = self.rendered(self.messages_of(r.messages, "append"), "append")
        else:
            tokens = self.tokens_of(r.text, r.tokens, "append")
        aid = check_append_id(r.append_id)
        expected = r.expected_offset if r.HasField("expected_offset") else None
        return await self.sessions.append(tenant, sid, tokens, expected, aid, timeout_of(ctx))

    @unary
    async def Append(self, tenant: str, r: pb.AppendRequest, ctx: Any) -> pb.AppendResponse:
        sid = check_session_id(r.session_id)
        note(session=sid, append_id=r.append_id or None)
        out = await self._append_one(tenant, sid, r, ctx)
        note(tokens=out.tokens, offset=out.offset, steps=out.steps, duplicate=out.duplicate)
        return pb.AppendResponse(
            offset=out.offset,
            start_offset=out.start,
            tokens=out.tokens,
            steps=out.steps,
            duplicate=out.duplicate,
            pending_tokens=out.pending,
        )

    @unary
    async def AppendStream(self, tenant: str, it: AsyncIterator[pb.AppendRequest], ctx: Any) -> pb.AppendResponse:
        sid, first, n = "", None, 0
        resp = pb.AppendResponse(duplicate=True)
        try:
            async for r in it:  # a message that does not decode raises here, after the earlier ones applied
                if not sid:
                    sid = check_session_id(r.session_id)
                    note(session=sid)
                elif r.session_id and r.session_id != sid:
                    raise InvalidArgument(f"message {n} names session {r.session_id!r}; this stream appends to {sid!r}")
                out = await self._append_one(tenant, sid, r, ctx)
                first = out.start if first is None else first
                n += 1
                resp.offset, resp.pending_tokens = out.offset, out.pending
                resp.tokens += out.tokens
                resp.steps += out.steps
                resp.duplicate = resp.duplicate and out.duplicate
        except ServiceError as e:  # the earlier messages stay applied: say where the session stands
            if e.offset is None and first is not None:
                e.offset = resp.offset
            note(messages=n)
            raise
        if first is None:
            raise InvalidArgument("the append stream was empty: send at least one AppendRequest")
        resp.start_offset = first
        note(messages=n, tokens=resp.tokens, offset=resp.offset)
        return resp

    # -- generate ----------------------------------------------------------------------------

    @streaming
    async def Generate(self, tenant: str, r: pb.GenerateRequest, ctx: Any) -> AsyncIterator[pb.GenerateResponse]:
        sid = check_session_id(r.session_id)
        note(session=sid, commit=r.commit)
        prompt: Content
        msgs: list[Message] = []
        if len(r.prompt_messages) or r.add_generation_prompt:
            if r.prompt_text or len(r.prompt_tokens):
                raise InvalidArgument(
                    "give one of prompt_text, prompt_tokens or prompt_messages (add_generation_prompt is chat)"
                )
            msgs = self.messages_of(r.prompt_messages, "prompt")
            prompt = self.rendered(msgs, "prompt", generation_prompt=r.add_generation_prompt)
        else:
            prompt = self.tokens_of(r.prompt_text, r.prompt_tokens, "prompt", allow_empty=True)
        params = self.sampling(r)
        if (msgs or r.add_generation_prompt) and self.chat is not None and self.chat.reply_stop_ids:
            stops = tuple(sorted({*params.stop_tokens, *self.chat.reply_stop_ids}))  # ChatFormat.reply_stop_ids
            params = dataclasses.replace(params, stop_tokens=stops)
        rule = self.commit_rule(r)
        recall = self.recall_ask(r, msgs)
        aid = check_append_id(r.append_id)
        expected = r.expected_offset if r.HasField("expected_offset") else None
        reasons = {
            "length": pb.FINISH_REASON_LENGTH,
            "stop_string": pb.FINISH_REASON_STOP_STRING,
            "stop_token": pb.FINISH_REASON_STOP_TOKEN,
        }
        if r.commit and params.samples > 1:
            raise InvalidArgument(f"n = {params.n} with commit: a commit keeps one output; ask for n = 1")
        async for ev in self.sessions.generate(
            tenant, sid, prompt, params, r.commit, expected, aid, rule, recall=recall, timeout=timeout_of(ctx)
        ):
            logprobs = [self.logprob_pb(lp) for lp in ev.logprobs]
            if ev.done:
                note(generated=ev.generated, finish=ev.finish, offset=ev.offset)
                recalled = ev.recalled
                if recall is not None:
                    note(recalled_spans=len(recalled.spans), recalled_tokens=len(recalled.tokens))
                yield pb.GenerateResponse(
                    recalled_spans=[span_pb(x) for x in recalled.spans],
                    recalled_tokens=len(recalled.tokens),
                    tokens=ev.tokens,
                    text=ev.text,
                    done=True,
                    finish_reason=reasons.get(ev.finish, pb.FINISH_REASON_UNSPECIFIED),
                    offset=ev.offset,
                    generated_tokens=ev.generated,
                    duplicate=ev.duplicate,
                    committed_tokens=ev.committed,
                    prompt_tokens=ev.prompt,
                )
            else:
                reason = reasons.get(ev.finish, pb.FINISH_REASON_UNSPECIFIED)
                yield pb.GenerateResponse(
                    tokens=ev.tokens,
                    text=ev.text,
                    index=ev.sample,
                    logprobs=logprobs,
                    finish_reason=reason,
                    generated_tokens=ev.generated,
                )

    # -- recall ------------------------------------------------------------------------------

    @unary
    async def Recall(self, tenant: str, r: pb.RecallRequest, ctx: Any) -> pb.RecallResponse:
        sid = check_session_id(r.session_id)
        note(session=sid, k=r.k)
        k = self.recall_k(r.k, "k")
        query = self.recall_query(r.query, "query")
        if not query.strip():
            raise InvalidArgument("query is empty: give the words to look for (a question, a name, a phrase)")
        t0 = time.perf_counter()
        spans = await self.sessions.recall((tenant, sid), query, k)
        metrics.RECALL_SECONDS.labels("Recall").observe(time.perf_counter() - t0)
        note(spans=len(spans))
        return pb.RecallResponse(spans=[span_pb(x) for x in spans])

    @unary
    async def ReadLog(self, tenant: str, r: pb.ReadLogRequest, ctx: Any) -> pb.LogText:
        sid = check_session_id(r.session_id)
        note(session=sid, last_tokens=r.last_tokens)
        ceiling = self.limits.max_append_tokens
        if not 1 <= r.last_tokens <= ceiling:
            raise InvalidArgument(f"last_tokens must be 1-{ceiling} (limits.max_append_tokens), got {r.last_tokens}")
        start, end, text = await self.sessions.tail((tenant, sid), r.last_tokens)
        return pb.LogText(start_offset=start, end_offset=end, text=text)

    # -- model -------------------------------------------------------------------------------

    @unary
    async def GetModel(self, tenant: str, r: pb.GetModelRequest, ctx: Any) -> pb.ModelInfo:
        return self.model_info

    # -- export / import ---------------------------------------------------------------------

    @streaming
    async def ExportSession(self, tenant: str, r: pb.ExportSessionRequest, ctx: Any) -> AsyncIterator[pb.SessionChunk]:
        sid = check_session_id(r.session_id)
        note(session=sid)
        lim = self.limits
        size = r.chunk_bytes or lim.default_chunk_bytes
        if not lim.min_chunk_bytes <= size <= lim.max_chunk_bytes:
            raise InvalidArgument(
                f"chunk_bytes {size} is outside this server's range [{lim.min_chunk_bytes}, {lim.max_chunk_bytes}] "
                "(0: the default)"
            )
        head, data = await self.sessions.export(tenant, sid)
        log = await self.sessions.export_recall(head)  # the history recall searches: the state holds no tokens
        note(bytes=len(data) + len(log))
        yield pb.SessionChunk(
            header=pb.ExportHeader(
                session_id=sid,
                metadata=head.metadata,
                model_digest=head.digest,
                offset=head.offset,
                total_bytes=len(data),
                sha256=hashlib.sha256(data).hexdigest(),
                format=SNAPSHOT_FORMAT,
                source_session_id=sid,
                recall_log_bytes=len(log),
                recall_log_sha256=hashlib.sha256(log).hexdigest(),
            )
        )
        for i in range(0, len(data), size):
            yield pb.SessionChunk(data=data[i : i + size])
        for i in range(0, len(log), size):
            yield pb.SessionChunk(recall_log=log[i : i + size])

    def _import_header(self, header: pb.ExportHeader) -> tuple[str, dict[str, str]]:
        """The header checked before any data is read: the session id to create and its metadata."""
        if header.format != SNAPSHOT_FORMAT:
            raise InvalidArgument(f"export format {header.format!r} is not {SNAPSHOT_FORMAT!r}")
        size = header.total_bytes + header.recall_log_bytes
        if size > self.limits.max_import_bytes:
            raise ResourceExhausted(
                f"export of {size} bytes (state and recall log) is over this server's limit "
                f"{self.limits.max_import_bytes}"
            )
        if header.model_digest != self.sessions.digest:
            raise FailedPrecondition(
                f"export was made with model {header.model_digest}; this daemon serves {self.sessions.digest}: "
                "import it into a deployment serving that model"
            )
        field = "session_id" if header.session_id else "source_session_id"
        sid = check_session_id(header.session_id or header.source_session_id, f"header.{field}", allow_empty=True)
        return sid, check_metadata(header.metadata)

    @unary
    async def ImportSession(self, tenant: str, it: AsyncIterator[pb.SessionChunk], ctx: Any) -> pb.Session:
        header: pb.ExportHeader | None = None
        floor = self.limits.min_chunk_bytes
        parts: dict[str, _Received] = {}
        async for chunk in it:
            kind = chunk.WhichOneof("chunk")
            if header is None:
                if kind != "header":
                    raise InvalidArgument("the first chunk of an import must be the header")
                header = chunk.header
                sid, metadata = self._import_header(header)
                parts = {"data": _Received(header.total_bytes), "recall_log": _Received(header.recall_log_bytes)}
                note(session=sid)
                continue
            if kind not in parts:
                raise InvalidArgument("an import has exactly one header, first")
            if kind == "data" and parts["recall_log"].pieces:
                raise InvalidArgument("data chunk after a recall_log chunk: send the state's data first")
            parts[kind].add(kind, getattr(chunk, kind), floor)
        if header is None:
            raise InvalidArgument("the import stream was empty: send a header, then the data")
        data = parts["data"].check("data", "total_bytes", header.sha256)
        log = parts["recall_log"].check("recall_log", "recall_log_bytes", header.recall_log_sha256)
        note(bytes=len(data) + len(log))
        info = await self.sessions.import_(tenant, sid, metadata, data, header.offset, log or None)
        return session_pb(info)
