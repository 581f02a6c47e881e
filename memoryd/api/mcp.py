"""`memoryd mcp`: memoryd's sessions as Model Context Protocol tools and resources.

Most agents reason with a large hosted model and want memory as a tool: remember this,
what do I know about that.  This server gives any MCP client (Claude Desktop, an IDE, an
agent framework) four tools over memoryd sessions: `remember` (append text or a turn,
exactly once with an idempotency key), `recall` (the spans of the session's history that
match a query, with their offsets and scores), `ask` (a question answered by the
session's own model from its compressed memory plus recall; not committed unless asked)
and `sessions` (list / info / create / fork / reset / delete), and the resources
`memoryd://sessions/{session}` (a session's info) and `memoryd://sessions/{session}/log` (the
text of what it read most recently); templates, so that over HTTP they are read with the
caller's token.

It is a client of the daemon through the public SDK, as `memoryd http --daemon` is: the
daemon stays the one place where sessions, tenants, limits and exactly-once appends are
decided.  stdio by default (what desktop clients spawn); streamable HTTP with `--listen`.
Auth: the daemon's bearer token passed through, `--token` (or `MEMORYD_TOKEN`) on stdio,
and over HTTP each caller's `Authorization` header (else `--token`).

Errors come back as MCP tool errors whose text names the fix (a missing session, a bad
id, a refused token, an unreachable daemon), never a stack trace.  Built on the official
`mcp` SDK (the `mcp` extra: `pip install "memoryd[mcp]"`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import OrderedDict
from dataclasses import asdict
from typing import Annotated, Any, Literal

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ToolError
from memoryd_sdk import (
    AlreadyExists,
    AsyncMemoryClient,
    AsyncSession,
    InvalidArgument,
    MemorydError,
    NotFound,
    OffsetConflict,
    ResourceExhausted,
    SessionInfo,
    Unauthenticated,
    Unavailable,
)
from memoryd_sdk.connection import TLS
from pydantic import BaseModel, Field

log = logging.getLogger("memoryd.mcp")

SESSION_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
CREATED_BY = {"created_by": "memoryd mcp"}
CALL_TIMEOUT = 600.0
"""Seconds per daemon call: reading a few thousand tokens into a session is seconds on a GPU but can be
minutes on a busy CPU, and a daemon that is down still fails at once (UNAVAILABLE, no wait for ready)."""
LOG_TOKENS = 512
"""Tokens of a session's recent log the log resource shows (about a page of text)."""
CLIENTS_KEPT = 64
"""Daemon clients kept for distinct HTTP callers' tokens (one gRPC channel each); the least recent goes first."""

INSTRUCTIONS = """\
memoryd is long-term memory for agents. A session is one memory (one per user, project or task):
everything remembered into it is read by a model that keeps its gist in its weights, and the exact
text stays findable. Use `remember` to store facts, notes, decisions and tool outputs as they come
(pass an idempotency_key when you might send the same thing twice), `recall` to find what was stored
about something (exact text with offsets), `ask` to have the session's own model answer from its
memory, and `sessions` to list, inspect, create, fork, reset or delete sessions."""

SessionArg = Annotated[
    str | None,
    Field(description="The session (memory) to use: 1-128 characters from A-Z a-z 0-9 . _ : -, e.g. 'user-42'."),
]
SessionIdArg = Annotated[str | None, Field(description="Same as `session` (either name works; give one).")]


# -- results ---------------------------------------------------------------------------------


class Remembered(BaseModel):
    session: str
    start_offset: int = Field(description="Where the text starts in the session (tokens).")
    offset: int = Field(description="The session's offset after it (tokens).")
    tokens: int
    duplicate: bool = Field(description="True when this idempotency_key had landed already: nothing was added.")
    created: bool = Field(description="True when this call created the session.")


class Span(BaseModel):
    start_offset: int
    end_offset: int
    score: float
    text: str


class Recalled(BaseModel):
    session: str
    spans: list[Span] = Field(description="Most relevant first; offsets are [start, end) in tokens.")


class Answer(BaseModel):
    session: str
    answer: str
    committed: bool = Field(description="Whether the question and answer were added to the session.")
    offset: int = Field(description="The session's offset afterwards.")


class SessionView(BaseModel):
    session: str
    offset: int = Field(description="Tokens the session has read.")
    steps: int = Field(description="Test-time training steps taken (full mini-batches).")
    hot: bool
    metadata: dict[str, str]
    created_at: str | None
    last_used_at: str | None


class SessionsResult(BaseModel):
    action: str
    sessions: list[SessionView] = Field(default_factory=list)
    deleted_offset: int | None = None


def view(info: SessionInfo) -> SessionView:
    return SessionView(
        session=info.session_id,
        offset=info.offset,
        steps=info.steps,
        hot=info.hot,
        metadata=dict(info.metadata),
        created_at=info.created_at.isoformat() if info.created_at else None,
        last_used_at=info.last_used_at.isoformat() if info.last_used_at else None,
    )


# -- errors that name the fix ----------------------------------------------------------------


def fix_of(e: MemorydError, sid: str | None, daemon: str) -> str:
    """The daemon's error as one line an LLM (or a person) can act on."""
    if isinstance(e, NotFound):
        which = f"session {sid!r}" if sid else "the session"
        return (
            f"{which} does not exist: check the id (`sessions` with action 'list' shows them) "
            "or create it (`remember` creates it on first use)"
        )
    if isinstance(e, Unauthenticated):
        return (
            f"the memoryd daemon refused the bearer token ({e.message}): start `memoryd mcp` with --token "
            "(or MEMORYD_TOKEN) set to a token the daemon accepts, or send `Authorization: Bearer <token>`"
        )
    if isinstance(e, Unavailable):
        return (
            f"the memoryd daemon at {daemon} cannot be reached or is busy ({e.message}): start it "
            "(`memoryd serve`), point `memoryd mcp --daemon HOST:PORT` at it, or retry"
        )
    if isinstance(e, OffsetConflict):
        return f"the session changed while this call ran ({e.message}): retry the call"
    if isinstance(e, InvalidArgument | ResourceExhausted):
        return f"{e.message} (fix the argument and call again)"
    return f"memoryd: {e.code.name}: {e.message}"


def session_of(session: str | None, session_id: str | None) -> str:
    """The one session id the tool was given (as `session` or `session_id`), checked before any call."""
    if session and session_id and session != session_id:
        raise ToolError(f"give the session once: session={session!r} and session_id={session_id!r} differ")
    sid = session or session_id
    if not sid:
        raise ToolError("no session given: pass `session` (e.g. 'user-42'); `sessions` with action 'list' shows them")
    if not SESSION_ID.match(sid):
        raise ToolError(
            f"session {sid[:140]!r} is not a valid id: use 1-128 characters from A-Z a-z 0-9 . _ : - (e.g. 'user-42')"
        )
    return sid


def append_id_of(idempotency_key: str | None) -> str | None:
    """The daemon's append id for a tool's idempotency key: any string the caller likes maps to a valid,
    namespaced id (so an MCP key never collides with an SDK client's own append ids)."""
    if idempotency_key is None or idempotency_key == "":
        return None
    return "mcp:" + hashlib.sha256(idempotency_key.encode()).hexdigest()


# -- the daemon, per caller ------------------------------------------------------------------


class Daemon:
    """The memoryd daemon as the tools reach it: one SDK client per bearer token.

    On stdio every call uses `token`; over HTTP each caller's `Authorization` header is
    passed through (a client per distinct header, the least recently used closed past
    `CLIENTS_KEPT`), falling back to `token`.  Clients are made lazily, on the server's own
    event loop (a gRPC channel belongs to the loop it was made on).
    """

    def __init__(self, target: str, token: str | None = None, tls: TLS = None) -> None:
        self.target, self.token, self.tls = target, token, tls
        self._clients: OrderedDict[str | None, AsyncMemoryClient] = OrderedDict()

    async def client(self, ctx: Context | None = None) -> AsyncMemoryClient:
        auth = None
        headers = ctx.headers if ctx is not None else None
        if headers is not None:
            auth = headers.get("authorization")
        key = auth or (f"Bearer {self.token}" if self.token else None)
        c = self._clients.get(key)
        if c is None:
            md = (("authorization", key),) if key else ()
            c = AsyncMemoryClient(self.target, tls=self.tls, metadata=md, timeout=CALL_TIMEOUT)
            self._clients[key] = c
            while len(self._clients) > CLIENTS_KEPT:
                _, old = self._clients.popitem(last=False)
                await old.close()
        self._clients.move_to_end(key)
        return c

    async def close(self) -> None:
        for c in self._clients.values():
            await c.close()
        self._clients.clear()


# -- the server ------------------------------------------------------------------------------


def build_server(daemon: Daemon) -> MCPServer:
    """The MCP server: four tools and the session resources, each call one or two SDK calls."""
    server: MCPServer = MCPServer(name="memoryd", instructions=INSTRUCTIONS, log_level="WARNING")

    def failed(e: MemorydError, sid: str | None) -> ToolError:
        return ToolError(fix_of(e, sid, daemon.target))

    @server.tool()
    async def remember(
        text: Annotated[str, Field(description="What to remember: a fact, a note, a decision, a tool's output.")],
        session: SessionArg = None,
        session_id: SessionIdArg = None,
        role: Annotated[
            str | None,
            Field(
                description="Store it as a conversation turn of this role ('user', 'assistant', 'tool', 'system') in "
                "the session's chat format; leave out to store plain text."
            ),
        ] = None,
        idempotency_key: Annotated[
            str | None,
            Field(
                description="Any string naming this piece (e.g. a message or tool-call id): a second call with the "
                "same key and text adds nothing and returns the first call's offsets (duplicate=true)."
            ),
        ] = None,
        ctx: Context = None,  # type: ignore[assignment]  # injected by the SDK
    ) -> Remembered:
        """Store text in a memoryd session (long-term memory), creating the session on first use.

        The session's model reads it at once; its gist stays in the model's weights and the
        exact text stays findable with `recall`. Use one session per user, project or task.
        Pass `idempotency_key` when the same content might be sent twice (a retry): it then
        lands exactly once.
        """
        sid = session_of(session, session_id)
        if not text:
            raise ToolError("text is empty: give the text to remember")
        client = await daemon.client(ctx)
        aid = append_id_of(idempotency_key)
        created = False

        async def once(s: AsyncSession) -> Any:
            if role is not None:
                return await s.add_message(role, text, append_id=aid)
            return await s.append(text, append_id=aid)

        try:
            try:
                res = await once(client.session(sid))
            except NotFound:
                try:
                    s = await client.create_session(sid, metadata=CREATED_BY)
                    created = True
                except AlreadyExists:  # made meanwhile by another caller: fine
                    s = client.session(sid)
                res = await once(s)
        except MemorydError as e:
            if isinstance(e, InvalidArgument) and "append_id" in e.message:
                raise ToolError(
                    f"idempotency_key {idempotency_key!r} was already used with other text in session {sid!r}: "
                    "use a new key for new content"
                ) from None
            raise failed(e, sid) from None
        except ValueError as e:  # the SDK's own checks (a role the chat format refuses, ...)
            raise ToolError(f"{e} (fix the argument and call again)") from None
        return Remembered(
            session=sid,
            start_offset=res.start_offset,
            offset=res.offset,
            tokens=res.tokens,
            duplicate=res.duplicate,
            created=created,
        )

    @server.tool()
    async def recall(
        query: Annotated[str, Field(description="What to look for, in words: a question or keywords.")],
        session: SessionArg = None,
        session_id: SessionIdArg = None,
        k: Annotated[int, Field(ge=1, le=64, description="How many spans to return (most relevant first).")] = 8,
        ctx: Context = None,  # type: ignore[assignment]
    ) -> Recalled:
        """Find what a memoryd session was told about something: the exact spans of its history
        that best match `query`, most relevant first, each with its [start, end) token offsets and
        a score. Use it before answering from memory, or to quote what was stored."""
        sid = session_of(session, session_id)
        if not query.strip():
            raise ToolError("query is empty: say what to look for")
        client = await daemon.client(ctx)
        try:
            spans = await client.session(sid).recall(query, k=k)
        except MemorydError as e:
            raise failed(e, sid) from None
        return Recalled(
            session=sid,
            spans=[
                Span(start_offset=s.start_offset, end_offset=s.end_offset, score=s.score, text=s.text) for s in spans
            ],
        )

    @server.tool()
    async def ask(
        question: Annotated[str, Field(description="The question for the session's own model.")],
        session: SessionArg = None,
        session_id: SessionIdArg = None,
        commit: Annotated[
            bool,
            Field(description="Also add the question and the answer to the session (default: leave it unchanged)."),
        ] = False,
        max_tokens: Annotated[int, Field(ge=1, le=4096, description="Longest answer, in tokens.")] = 256,
        ctx: Context = None,  # type: ignore[assignment]
    ) -> Answer:
        """Ask the session's own (small) model a question; it answers from its compressed memory of
        everything the session read plus the spans `recall` finds for the question. The session is
        left unchanged unless `commit` is true. For exact facts prefer `recall` and reason yourself."""
        sid = session_of(session, session_id)
        if not question.strip():
            raise ToolError("question is empty: give the question")
        client = await daemon.client(ctx)
        s = client.session(sid)
        try:
            reply = await s.reply([("user", question)], max_tokens=max_tokens, commit=commit, recall=True)
        except MemorydError as e:
            raise failed(e, sid) from None
        except ValueError as e:
            raise ToolError(f"{e} (fix the argument and call again)") from None
        return Answer(session=sid, answer=reply.text, committed=commit, offset=reply.offset)

    @server.tool()
    async def sessions(
        action: Annotated[
            Literal["list", "info", "create", "fork", "reset", "delete"],
            Field(
                description="list: every session; info: one session; create: a new empty one; fork: a copy of "
                "`session` as `new_session`; reset: forget everything in `session`; delete: remove it for good."
            ),
        ],
        session: SessionArg = None,
        session_id: SessionIdArg = None,
        new_session: Annotated[
            str | None, Field(description="fork: the id of the copy (default: one is chosen).")
        ] = None,
        metadata: Annotated[
            dict[str, str] | None, Field(description="create / fork: string labels kept with the session.")
        ] = None,
        ctx: Context = None,  # type: ignore[assignment]
    ) -> SessionsResult:
        """Manage memoryd sessions (memories): list them, show one, create, fork (a cheap copy that
        then diverges), reset (forget everything, keep the id) or delete. reset and delete cannot be
        undone."""
        sid = None if action == "list" and not (session or session_id) else session_of(session, session_id)
        if new_session is not None and not SESSION_ID.match(new_session):
            raise ToolError(f"new_session {new_session[:140]!r} is not a valid id: use 1-128 of A-Z a-z 0-9 . _ : -")
        client = await daemon.client(ctx)
        try:
            if action == "list":
                return SessionsResult(action=action, sessions=[view(i) async for i in client.list_sessions()])
            assert sid is not None
            if action == "info":
                return SessionsResult(action=action, sessions=[view(await client.get_session(sid))])
            if action == "create":
                s = await client.create_session(sid, metadata={**CREATED_BY, **(metadata or {})})
                return SessionsResult(action=action, sessions=[view(s.last_info or await client.get_session(sid))])
            if action == "fork":
                info = await client.fork_session(sid, new_session, metadata)
                return SessionsResult(action=action, sessions=[view(info)])
            if action == "reset":
                return SessionsResult(action=action, sessions=[view(await client.reset_session(sid))])
            off = await client.delete_session(sid)
            return SessionsResult(action=action, deleted_offset=off)
        except AlreadyExists:
            which = new_session if action == "fork" else sid
            raise ToolError(f"session {which!r} already exists: choose another id") from None
        except MemorydError as e:
            raise failed(e, sid) from None

    # -- resources -------------------------------------------------------------------------

    @server.resource("memoryd://sessions/{session}", name="session", mime_type="application/json")
    async def session_info(session: str, ctx: Context) -> str:
        """One session: offset (tokens read), steps, pending tokens, state bytes, times, metadata."""
        if not SESSION_ID.match(session):
            raise ResourceError(f"session {session[:140]!r} is not a valid id: use 1-128 of A-Z a-z 0-9 . _ : -")
        client = await daemon.client(ctx)
        try:
            info = await client.get_session(session)
        except MemorydError as e:
            raise ResourceError(fix_of(e, session, daemon.target)) from None
        d = asdict(info)
        for k in ("created_at", "last_used_at"):
            d[k] = d[k].isoformat() if d[k] else None
        return json.dumps(d, indent=1)

    @server.resource("memoryd://sessions/{session}/log", name="session-log", mime_type="text/plain")
    async def session_log(session: str, ctx: Context) -> str:
        """The text of the session's last LOG_TOKENS tokens (what it read most recently), after a line
        giving their [start, end) offsets."""
        if not SESSION_ID.match(session):
            raise ResourceError(f"session {session[:140]!r} is not a valid id: use 1-128 of A-Z a-z 0-9 . _ : -")
        client = await daemon.client(ctx)
        try:
            tail = await client.read_log(session, LOG_TOKENS)
        except MemorydError as e:
            raise ResourceError(fix_of(e, session, daemon.target)) from None
        return f"[tokens {tail.start_offset}-{tail.end_offset} of session {session}]\n{tail.text}"

    return server


async def serve_stdio(daemon: Daemon) -> None:
    try:
        await build_server(daemon).run_stdio_async()
    finally:
        await daemon.close()


async def serve_http(daemon: Daemon, listen: str) -> None:
    host, _, port = listen.rpartition(":")
    try:
        await build_server(daemon).run_streamable_http_async(host=host or "127.0.0.1", port=int(port))
    finally:
        await daemon.close()
