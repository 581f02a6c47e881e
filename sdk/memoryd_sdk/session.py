"""`Session`: one session as an object that remembers its offset, plus the agent helpers.

Why track the offset here: memoryd's exactly-once promise needs each append to say
where the client believes the session stands (`expected_offset`) and to carry an id
(`append_id`).  The object sends both on every append and committed generation, moves
its `offset` forward from each answer, and on `OffsetConflict` (another writer got
there first) moves it to the server's offset before raising, so the caller decides
whether to append again.  One `Session` object per writer; its calls are serialised
by a lock so two threads sharing one object do not race on the offset.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Mapping
from typing import TYPE_CHECKING

from memoryd_sdk.chat import DEFAULT_TEMPLATE, SERVER_TEMPLATE, ChatTemplate, ServerTemplate
from memoryd_sdk.errors import OffsetConflict, Unimplemented
from memoryd_sdk.export_file import Dest
from memoryd_sdk.generation import GenerateStream
from memoryd_sdk.requests import Content, Extras, Message, generate_request, is_message, new_append_id, sampling
from memoryd_sdk.types import AppendResult, ChatReply, ExportHeader, GenerateChunk, GenerateResult, SessionInfo

if TYPE_CHECKING:
    from memoryd_sdk.client import MemoryClient


class Session:
    """A memoryd session: append, generate, fork, reset, delete, export, chat.

    Get one from `MemoryClient.create_session`, `.session(id)`, `.import_session` or
    `Session.fork`.  As a context manager it deletes the session on exit only if it was
    made with `temporary=True` (a scratch fork, say); otherwise it is memory to keep.
    """

    def __init__(
        self,
        client: MemoryClient,
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
        self._lock = threading.RLock()

    def __repr__(self) -> str:
        return f"Session({self.id!r}, offset={self.offset})"

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.temporary:
            self.delete()

    def _expected(self) -> int:
        if self.offset is None:
            self.info()
        assert self.offset is not None
        return self.offset

    def _conflict(self, e: OffsetConflict) -> None:
        if e.offset is not None:
            self.offset = e.offset

    # -- the proto's calls -----------------------------------------------------------------------

    def info(self, *, timeout: float | None = None) -> SessionInfo:
        """Offset, pending tokens, state bytes, times (and refresh this object's offset)."""
        info = self.client.get_session(self.id, timeout=timeout)
        self.offset, self.last_info = info.offset, info
        return info

    def append(self, content: Content, *, append_id: str | None = None, timeout: float | None = None) -> AppendResult:
        """Read text (a str) or token ids (a sequence of ints) into the session; durable on return.

        Carries the expected offset and an append id (pass your own, e.g. a tool call's
        id, to make re-sending after a crash of *your* process land once too).
        Raises `OffsetConflict` if the session moved under you.
        """
        with self._lock:
            try:
                res = self.client.append(self.id, content, self._expected(), append_id, timeout=timeout)
            except OffsetConflict as e:
                self._conflict(e)
                raise
            self.offset = res.offset
            return res

    def append_stream(self, pieces: Iterable[Content | Message], *, timeout: float | None = None) -> AppendResult:
        """Append pieces as they come (one client-streaming call): e.g. tool output, line by line.

        A piece is text, token ids, or a chat turn `(role, content)` in the session's chat
        format (`chat_format()`: the server formats it with the model's template, else the SDK
        with its own).
        """
        pieces = self._formatted(pieces)
        with self._lock:
            try:
                res = self.client.append_stream(self.id, pieces, self._expected(), timeout=timeout)
            except OffsetConflict as e:
                self._conflict(e)
                raise
            self.offset = res.offset
            return res

    def _formatted(self, pieces: Iterable[Content | Message]) -> Iterator[Content | Message]:
        """Chat turns as the session's format wants them; the format is looked up at the first turn only."""
        fmt: ChatTemplate | ServerTemplate | None = None
        for p in pieces:
            if is_message(p):
                fmt = fmt or self.chat_format()
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
    ) -> GenerateStream:
        """Stream a continuation: `for delta in session.generate(...)` yields text as it is made.

        `commit=True` adds prompt + output to the session when the generation completes
        (cancelling commits nothing); `commit=False` leaves the session untouched.  What is
        committed of the output is exactly the text sent (the stop string or stop token is
        left out unless `commit_stop=True`), then `commit_suffix`.
        """
        with self._lock:
            expected = self._expected() if commit else None
        req = generate_request(
            self.id,
            prompt,
            sampling(max_tokens, temperature, top_p, top_k, stop, stop_tokens, seed),
            commit,
            expected,
            append_id or new_append_id(),
            Extras(commit_stop=commit_stop, commit_suffix=commit_suffix),
        )

        def on_done(last: GenerateChunk) -> None:
            if commit:
                self.offset = last.offset

        return self.client._generate_stream(req, timeout, on_done)

    def complete(
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
        """The non-streaming `generate`: returns the text and token ids (retried as a whole)."""
        extras = _extras or Extras(commit_stop=commit_stop, commit_suffix=commit_suffix)
        with self._lock:
            expected = self._expected() if commit else None
            req = generate_request(
                self.id,
                prompt,
                sampling(max_tokens, temperature, top_p, top_k, stop, stop_tokens, seed),
                commit,
                expected,
                append_id or new_append_id(),
                extras,
            )
            try:
                res = self.client._complete(req, timeout)
            except OffsetConflict as e:
                self._conflict(e)
                raise
            if commit:
                self.offset = res.offset
            return res

    def fork(
        self,
        new_session_id: str | None = None,
        metadata: dict[str, str] | None = None,
        *,
        temporary: bool = False,
        timeout: float | None = None,
    ) -> Session:
        """A new session with this one's state now; they diverge from here (no weights are copied).

        The fork is checked against this object's offset, so it copies what you think it copies.
        """
        with self._lock:
            try:
                info = self.client.fork_session(self.id, new_session_id, metadata, self._expected(), timeout=timeout)
            except OffsetConflict as e:
                self._conflict(e)
                raise
        return Session(self.client, info.session_id, info=info, temporary=temporary, template=self.template)

    def reset(self, *, expected_offset: int | None = None, timeout: float | None = None) -> SessionInfo:
        """Back to the initial state (offset 0); id and metadata stay."""
        with self._lock:
            info = self.client.reset_session(self.id, expected_offset, timeout=timeout)
            self.offset, self.last_info = info.offset, info
            return info

    def delete(self, *, timeout: float | None = None) -> int | None:
        """Delete the session and free what it holds; returns its last offset."""
        with self._lock:
            off = self.client.delete_session(self.id, timeout=timeout)
            self.offset = None
            return off

    def export(self, dest: Dest, *, chunk_bytes: int = 0, timeout: float | None = None) -> ExportHeader:
        """Write the session to a file path or binary stream (format: `memoryd_sdk.export_file`)."""
        return self.client.export_session(self.id, dest, chunk_bytes=chunk_bytes, timeout=timeout)

    def import_(self, src: Dest, metadata: dict[str, str] | None = None, *, timeout: float | None = None) -> Session:
        """Create this session id from an export (path or stream); returns the new session (this object too)."""
        s = self.client.import_session(src, self.id, metadata, temporary=self.temporary, timeout=timeout)
        self.offset, self.last_info = s.offset, s.last_info
        return self

    # -- agent helpers ---------------------------------------------------------------------------

    def chat_format(self) -> ChatTemplate | ServerTemplate:
        """The template `add_message` / `chat` use: this object's, else the model's (server-side), else plain text."""
        if self.template is not None:
            return self.template
        try:
            info = self.client.cached_model_info()
        except Unimplemented:  # a daemon from before GetModel: it formats no messages
            return DEFAULT_TEMPLATE
        return SERVER_TEMPLATE if info.chat_messages else DEFAULT_TEMPLATE

    def add_message(self, role: str, content: str, *, append_id: str | None = None) -> AppendResult:
        """Append one conversation turn in the session's chat format (`chat_format()`).

        With the model's own template the server formats it (the first turn of an empty
        session also brings the template's preamble, e.g. SmolLM2's default system prompt).
        Otherwise the SDK's plain-text template (`memoryd_sdk.chat.PlainTemplate`)::

            <|{role}|>
            {content}<|end|>

        (each turn ends with a newline).  Roles are 1-64 of [A-Za-z0-9_.-]; content must not
        contain the format's markers (`<|end|>`, or the model's special tokens).
        """
        return self.add_messages([(role, content)], append_id=append_id)

    def add_messages(self, messages: list[Message], *, append_id: str | None = None) -> AppendResult:
        """Several turns in one append (`(role, content)` pairs or `{"role", "content"}` dicts)."""
        fmt = self.chat_format()
        if isinstance(fmt, ServerTemplate):
            with self._lock:
                try:
                    res = self.client.append_messages(self.id, messages, self._expected(), append_id)
                except OffsetConflict as e:
                    self._conflict(e)
                    raise
                self.offset = res.offset
                return res
        return self.append("".join(_turn_text(fmt, m) for m in messages), append_id=append_id)

    def chat(
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
        """A `role` turn with `text`, then the model's reply, committed; returns the reply.

        One committed generation (the turn and the reply land together or not at all):
        its prompt is the turn plus the opening of a `reply_role` turn, and the reply is
        committed as exactly the text returned, closed by the format's turn closing
        (`<|im_end|>\\n` for SmolLM2, `<|end|>\\n` for the plain template) in the same commit,
        so the session holds whole turns whichever way the reply stopped.  With the model's
        own template the reply role is the template's ("assistant").
        """
        fmt = self.chat_format()
        sampling_kw = {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "top_k": top_k}
        if isinstance(fmt, ServerTemplate):
            if reply_role != fmt.reply_role:
                raise ValueError(f"this model's chat template writes replies as {fmt.reply_role!r}, not {reply_role!r}")
            extras = Extras(messages=((role, text),), add_generation_prompt=True)
            gen = self.complete(None, **sampling_kw, seed=seed, commit=True, timeout=timeout, _extras=extras)
        else:
            prompt = fmt.turn(role, text) + fmt.reply_prefix(reply_role)
            gen = self.complete(
                prompt,
                **sampling_kw,
                seed=seed,
                stop=fmt.stop(),
                commit=True,
                commit_suffix=fmt.close(),
                timeout=timeout,
            )
        return ChatReply(gen.text, gen.tokens, gen.finish_reason, gen.offset, gen)


def _turn_text(template: ChatTemplate, m: Message) -> str:
    """A chat turn formatted by a client-side template."""
    role, content = (m["role"], m["content"]) if isinstance(m, Mapping) else m
    return template.turn(role, content)
