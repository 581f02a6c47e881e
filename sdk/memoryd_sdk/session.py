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
from collections.abc import Iterable
from typing import TYPE_CHECKING

from memoryd_sdk.chat import ChatTemplate
from memoryd_sdk.errors import OffsetConflict
from memoryd_sdk.export_file import Dest
from memoryd_sdk.generation import GenerateStream
from memoryd_sdk.requests import Content, generate_request, new_append_id, sampling
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

    def append_stream(self, pieces: Iterable[Content], *, timeout: float | None = None) -> AppendResult:
        """Append pieces as they come (one client-streaming call): e.g. tool output, line by line."""
        with self._lock:
            try:
                res = self.client.append_stream(self.id, pieces, self._expected(), timeout=timeout)
            except OffsetConflict as e:
                self._conflict(e)
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
    ) -> GenerateStream:
        """Stream a continuation: `for delta in session.generate(...)` yields text as it is made.

        `commit=True` adds prompt + output to the session when the generation completes
        (cancelling commits nothing); `commit=False` leaves the session untouched.
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
        timeout: float | None = None,
    ) -> GenerateResult:
        """The non-streaming `generate`: returns the text and token ids (retried as a whole)."""
        with self._lock:
            expected = self._expected() if commit else None
            req = generate_request(
                self.id,
                prompt,
                sampling(max_tokens, temperature, top_p, top_k, stop, stop_tokens, seed),
                commit,
                expected,
                append_id or new_append_id(),
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

    def add_message(self, role: str, content: str, *, append_id: str | None = None) -> AppendResult:
        """Append one conversation turn in the session's chat template.

        Default template (`memoryd_sdk.chat.PlainTemplate`)::

            <|{role}|>
            {content}<|end|>

        (each turn ends with a newline).  Roles are 1-64 of [A-Za-z0-9_.-]; content must not
        contain `<|end|>`.
        """
        return self.append(self.template.turn(role, content), append_id=append_id)

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

        One committed generation whose prompt is the user turn plus `<|assistant|>\\n`
        (so the turn and the reply land together or not at all), stopped at the turn
        marker `<|end|>`; then the template's closing text is appended so the session
        ends on a whole turn whichever way the reply stopped.
        """
        prompt = self.template.turn(role, text) + self.template.reply_prefix(reply_role)
        gen = self.complete(
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
        offset = self.append(closing, timeout=timeout).offset if closing else gen.offset
        return ChatReply(gen.text, gen.tokens, gen.finish_reason, offset, gen)
