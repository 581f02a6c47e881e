"""`AsyncSession`: one session as an object that remembers its offset, plus the agent helpers.

The one implementation of a session; the sync `Session` (session.py) runs these coroutines
on its client's private loop.

Why track the offset here: memoryd's exactly-once promise needs each append to say
where the client believes the session stands (`expected_offset`) and to carry an id
(`append_id`).  The object sends both on every append and committed generation, moves
its `offset` forward from each answer, and on `OffsetConflict` (another writer got
there first) moves it to the server's offset before raising, so the caller decides
whether to append again.  One session object per writer; its calls are serialised
by a lock so two tasks (or, through `Session`, two threads) sharing one object do not
race on the offset.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import replace
from typing import TYPE_CHECKING, TypeVar

from memoryd_sdk.aio_generation import AsyncGenerateStream
from memoryd_sdk.chat import DEFAULT_TEMPLATE, SERVER_TEMPLATE, ChatTemplate, ServerTemplate, turn_text
from memoryd_sdk.errors import OffsetConflict, Unimplemented
from memoryd_sdk.export_file import Dest
from memoryd_sdk.iterators import aiter_of
from memoryd_sdk.proto import memoryd_pb2 as pb
from memoryd_sdk.requests import (
    Content,
    Extras,
    Message,
    SamplingParams,
    generate_request,
    is_message,
    new_append_id,
    recall_options,
    sampling_params,
)
from memoryd_sdk.types import (
    AppendResult,
    ChatReply,
    ExportHeader,
    GenerateChunk,
    GenerateResult,
    LogText,
    RecalledSpan,
    RecallOptions,
    SessionInfo,
)

if TYPE_CHECKING:
    from memoryd_sdk.aio import AsyncMemoryClient

T = TypeVar("T")

CHAT_MAX_TOKENS = 256
"""`chat` / `reply` sample at most this many tokens unless told otherwise (a reply, not a completion)."""


class AsyncSession:
    """A memoryd session: append, generate, fork, reset, delete, export, chat.

    Get one from `create_session`, `.session(id)`, `.import_session` or `fork`.  As a
    context manager it deletes the session on exit only if it was made with
    `temporary=True` (a scratch fork, say); otherwise it is memory to keep.
    """

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
        """The chat format of `add_message` / `chat`; None: the model's own if it has one (see `chat_format`)."""
        self.offset: int | None = info.offset if info is not None else None
        """The offset this object believes the session has (None until known)."""
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

    async def _guarded(self, call: Callable[[], Awaitable[T]]) -> T:
        """Run a call that checks the offset; on `OffsetConflict` move `offset` to the server's, then raise."""
        try:
            return await call()
        except OffsetConflict as e:
            if e.offset is not None:
                self.offset = e.offset
            raise

    async def _moved(self, call: Callable[[int], Awaitable[AppendResult]]) -> AppendResult:
        """An append at the expected offset, under the lock; `offset` follows the answer."""
        async with self._lock:
            expected = await self._expected()
            res = await self._guarded(lambda: call(expected))
            self.offset = res.offset
            return res

    # -- the proto's calls -----------------------------------------------------------------------

    async def info(self, *, timeout: float | None = None) -> SessionInfo:
        """Offset, pending tokens, state bytes, times (and refresh this object's offset)."""
        return await self._info(timeout)

    async def append(
        self, content: Content, *, append_id: str | None = None, timeout: float | None = None
    ) -> AppendResult:
        """Read text (a str) or token ids (a sequence of ints) into the session; durable on return.

        Carries the expected offset and an append id (pass your own, e.g. a tool call's
        id, to make re-sending after a crash of *your* process land once too).
        Raises `OffsetConflict` if the session moved under you.
        """
        return await self._moved(lambda at: self.client.append(self.id, content, at, append_id, timeout=timeout))

    async def append_stream(
        self, pieces: Iterable[Content | Message] | AsyncIterable[Content | Message], *, timeout: float | None = None
    ) -> AppendResult:
        """Append pieces as they come (one client-streaming call): e.g. tool output, line by line.

        A piece is text, token ids, or a chat turn `(role, content)` in the session's chat
        format (`chat_format()`: the server formats it with the model's template, else the SDK
        with its own).
        """
        formatted = self._formatted(pieces)
        return await self._moved(lambda at: self.client.append_stream(self.id, formatted, at, timeout=timeout))

    async def _formatted(
        self, pieces: Iterable[Content | Message] | AsyncIterable[Content | Message]
    ) -> AsyncIterator[Content | Message]:
        """Chat turns as the session's format wants them; the format is looked up at the first turn only."""
        fmt: ChatTemplate | ServerTemplate | None = None
        async for p in aiter_of(pieces):
            if is_message(p):
                fmt = fmt or await self.chat_format()
                if not isinstance(fmt, ServerTemplate):
                    p = turn_text(fmt, p)
            yield p

    def generate(
        self,
        prompt: Content | None = None,
        *,
        params: SamplingParams | None = None,
        commit: bool = False,
        append_id: str | None = None,
        commit_stop: bool = False,
        commit_suffix: str = "",
        recall: bool | RecallOptions = False,
        timeout: float | None = None,
        **sampling: object,
    ) -> AsyncGenerateStream:
        """Stream a continuation: `async for delta in session.generate(...)` yields text as it is made.

        `commit=True` adds prompt + output to the session when the generation completes
        (cancelling commits nothing); `commit=False` leaves the session untouched.  What is
        committed of the output is exactly the text sent (the stop string or stop token is
        left out unless `commit_stop=True`), then `commit_suffix`.  `recall=True` (or
        `RecallOptions`) places the session's most relevant earlier spans before the prompt
        for this generation only (see `recall`); off by default here, on for `chat`.
        """
        settings = sampling_params(params, sampling)
        extras = Extras(commit_stop=commit_stop, commit_suffix=commit_suffix, recall=recall_options(recall))
        return self._stream(prompt, settings, commit, append_id, extras, timeout)

    def _stream(
        self,
        prompt: Content | None,
        settings: SamplingParams,
        commit: bool,
        append_id: str | None,
        extras: Extras,
        timeout: float | None,
    ) -> AsyncGenerateStream:
        aid = append_id or new_append_id()

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
        params: SamplingParams | None = None,
        commit: bool = False,
        append_id: str | None = None,
        commit_stop: bool = False,
        commit_suffix: str = "",
        recall: bool | RecallOptions = False,
        timeout: float | None = None,
        **sampling: object,
    ) -> GenerateResult:
        """The non-streaming `generate`: returns the text and token ids (retried as a whole)."""
        settings = sampling_params(params, sampling)
        extras = Extras(commit_stop=commit_stop, commit_suffix=commit_suffix, recall=recall_options(recall))
        return await self._complete(prompt, settings, commit, append_id, extras, timeout)

    async def _complete(
        self,
        prompt: Content | None,
        settings: SamplingParams,
        commit: bool,
        append_id: str | None,
        extras: Extras,
        timeout: float | None,
    ) -> GenerateResult:
        async with self._lock:
            expected = await self._expected() if commit else None
            aid = append_id or new_append_id()
            req = generate_request(self.id, prompt, settings, commit, expected, aid, extras)
            res = await self._guarded(lambda: self.client._complete(req, timeout))
            if commit:
                self.offset = res.offset
            return res

    async def recall(self, query: str, *, k: int = 8, timeout: float | None = None) -> list[RecalledSpan]:
        """The `k` spans of this session's history most relevant to `query`, most relevant first.

        Exact text from anywhere in the session (also what the model's window no longer
        shows), each with its [start_offset, end_offset) in the log.  Changes nothing.
        """
        return await self.client.recall(self.id, query, k, timeout=timeout)

    async def read_log(self, last_tokens: int = 512, *, timeout: float | None = None) -> LogText:
        """The text of this session's last `last_tokens` tokens, with their offsets (changes nothing)."""
        return await self.client.read_log(self.id, last_tokens, timeout=timeout)

    async def fork(
        self,
        new_session_id: str | None = None,
        metadata: dict[str, str] | None = None,
        *,
        temporary: bool = False,
        timeout: float | None = None,
    ) -> AsyncSession:
        """A new session with this one's state now; they diverge from here (no weights are copied).

        The fork is checked against this object's offset, so it copies what you think it copies.
        """
        async with self._lock:
            expected = await self._expected()
            info = await self._guarded(
                lambda: self.client.fork_session(self.id, new_session_id, metadata, expected, timeout=timeout)
            )
        return AsyncSession(self.client, info.session_id, info=info, temporary=temporary, template=self.template)

    async def update_metadata(
        self,
        metadata: dict[str, str],
        expected_metadata: dict[str, str] | None = None,
        *,
        timeout: float | None = None,
    ) -> SessionInfo:
        """Set metadata entries ("" removes one), compare-and-set with `expected_metadata` (see the client's
        `update_session`); the offset and state are untouched."""
        info = await self.client.update_session(self.id, metadata, expected_metadata, timeout=timeout)
        self.last_info = info  # not `offset`: an append in flight under the lock owns it
        return info

    async def reset(self, *, expected_offset: int | None = None, timeout: float | None = None) -> SessionInfo:
        """Back to the initial state (offset 0); id and metadata stay."""
        async with self._lock:
            info = await self.client.reset_session(self.id, expected_offset, timeout=timeout)
            self.offset, self.last_info = info.offset, info
            return info

    async def delete(self, *, timeout: float | None = None) -> int | None:
        """Delete the session and free what it holds; returns its last offset."""
        async with self._lock:
            off = await self.client.delete_session(self.id, timeout=timeout)
            self.offset = None
            return off

    async def export(self, dest: Dest, *, chunk_bytes: int = 0, timeout: float | None = None) -> ExportHeader:
        """Write the session to a file path or binary stream (format: `memoryd_sdk.export_file`)."""
        return await self.client.export_session(self.id, dest, chunk_bytes=chunk_bytes, timeout=timeout)

    async def import_(
        self, src: Dest, metadata: dict[str, str] | None = None, *, timeout: float | None = None
    ) -> AsyncSession:
        """Create this session id from an export (path or stream); returns this object."""
        s = await self.client.import_session(src, self.id, metadata, temporary=self.temporary, timeout=timeout)
        self.offset, self.last_info = s.offset, s.last_info
        return self

    # -- agent helpers ---------------------------------------------------------------------------

    async def chat_format(self) -> ChatTemplate | ServerTemplate:
        """The template `add_message` / `chat` use: this object's, else the model's (server-side), else plain text."""
        if self.template is not None:
            return self.template
        try:
            info = await self.client.cached_model_info()
        except Unimplemented:  # a daemon from before GetModel: it formats no messages
            return DEFAULT_TEMPLATE
        return SERVER_TEMPLATE if info.chat_messages else DEFAULT_TEMPLATE

    async def add_message(self, role: str, content: str, *, append_id: str | None = None) -> AppendResult:
        """Append one conversation turn in the session's chat format (`chat_format()`).

        With the model's own template the server formats it (the first turn of an empty
        session also brings the template's preamble, e.g. SmolLM2's default system prompt).
        Otherwise the SDK's plain-text template (`memoryd_sdk.chat.PlainTemplate`)::

            <|{role}|>
            {content}<|end|>

        (each turn ends with a newline).  Roles are 1-64 of [A-Za-z0-9_.-]; content must not
        contain the format's markers (`<|end|>`, or the model's special tokens).
        """
        return await self.add_messages([(role, content)], append_id=append_id)

    async def add_messages(self, messages: list[Message], *, append_id: str | None = None) -> AppendResult:
        """Several turns in one append (`(role, content)` pairs or `{"role", "content"}` dicts)."""
        fmt = await self.chat_format()
        if isinstance(fmt, ServerTemplate):
            return await self._moved(lambda at: self.client.append_messages(self.id, messages, at, append_id))
        return await self.append("".join(turn_text(fmt, m) for m in messages), append_id=append_id)

    async def chat(
        self,
        text: str,
        *,
        role: str = "user",
        reply_role: str = "assistant",
        params: SamplingParams | None = None,
        recall: bool | RecallOptions = True,
        timeout: float | None = None,
        **sampling: object,
    ) -> ChatReply:
        """A `role` turn with `text`, then the model's reply, committed; returns the reply.

        One committed generation (the turn and the reply land together or not at all):
        its prompt is the turn plus the opening of a `reply_role` turn, and the reply is
        committed as exactly the text returned, closed by the format's turn closing
        (`<|im_end|>\\n` for SmolLM2, `<|end|>\\n` for the plain template) in the same commit,
        so the session holds whole turns whichever way the reply stopped.  With the model's
        own template the reply role is the template's ("assistant").

        Recall is on: before the reply the server places the spans of the session's history
        most relevant to `text` just before it (exact facts from long out of the window), for
        this reply only; they are never committed.  `recall=False` turns it off,
        `RecallOptions(k=..., budget_tokens=...)` tunes it.
        """
        return await self.reply(
            [(role, text)], reply_role=reply_role, params=params, recall=recall, timeout=timeout, **sampling
        )

    async def reply(
        self,
        messages: list[Message],
        *,
        reply_role: str = "assistant",
        params: SamplingParams | None = None,
        append_id: str | None = None,
        recall: bool | RecallOptions = True,
        commit: bool = True,
        timeout: float | None = None,
        **sampling: object,
    ) -> ChatReply:
        """As `chat`, for several turns at once: the turns and the reply land in one committed generation.

        `append_id` makes a re-sent request land once: a retry finds the generation already
        committed and gets its original reply back (`generation.duplicate`).  `stop` adds stop
        strings to the format's own.  Recall as in `chat` (on by default).  `commit=False` leaves the
        session as it was (a what-if question; or `n` > 1 samples: a commit keeps one output).
        """
        prompt, extras, settings = await self._reply_request(
            messages, reply_role, sampling_params(params, sampling, max_tokens=CHAT_MAX_TOKENS), recall
        )
        gen = await self._complete(prompt, settings, commit, append_id, extras, timeout)
        return ChatReply(gen.text, gen.tokens, gen.finish_reason, gen.offset, gen)

    async def reply_stream(
        self,
        messages: list[Message],
        *,
        reply_role: str = "assistant",
        params: SamplingParams | None = None,
        append_id: str | None = None,
        recall: bool | RecallOptions = True,
        commit: bool = True,
        timeout: float | None = None,
        **sampling: object,
    ) -> AsyncGenerateStream:
        """As `reply`, streamed: iterate for the reply's text as it is made (committed when it completes,
        unless `commit=False`)."""
        prompt, extras, settings = await self._reply_request(
            messages, reply_role, sampling_params(params, sampling, max_tokens=CHAT_MAX_TOKENS), recall
        )
        return self._stream(prompt, settings, commit, append_id, extras, timeout)

    async def _reply_request(
        self, messages: list[Message], reply_role: str, settings: SamplingParams, recall: bool | RecallOptions
    ) -> tuple[Content | None, Extras, SamplingParams]:
        """Prompt, extras and sampling of a chat reply in the session's format (see `chat`)."""
        fmt = await self.chat_format()
        opts = recall_options(recall)
        if isinstance(fmt, ServerTemplate):
            if reply_role != fmt.reply_role:
                raise ValueError(f"this model's chat template writes replies as {fmt.reply_role!r}, not {reply_role!r}")
            return None, Extras(messages=tuple(messages), add_generation_prompt=True, recall=opts), settings
        prompt = "".join(turn_text(fmt, m) for m in messages) + fmt.reply_prefix(reply_role)
        stops = (*fmt.stop(), *(s for s in settings.stop if s not in fmt.stop()))
        return prompt, Extras(commit_suffix=fmt.close(), recall=opts), replace(settings, stop=stops)
