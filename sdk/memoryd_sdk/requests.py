"""Building the proto requests from Python arguments, shared by the sync and the async client.

Both clients must send byte-for-byte the same requests (the same append ids on a retry,
the same expected offsets), so the building lives here once and the clients only move
messages.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from memoryd_sdk.proto import memoryd_pb2 as pb
from memoryd_sdk.types import RecallOptions

Content = str | Sequence[int]
"""What can be appended: text (encoded by the server's tokenizer) or token ids."""


Message = Mapping[str, str] | tuple[str, str]
"""A chat turn: `{"role": ..., "content": ...}` or `(role, content)`."""


def is_message(item: object) -> bool:
    """A chat turn rather than text or token ids: a mapping, or a (role, content) pair of strings."""
    if isinstance(item, Mapping):
        return True
    return isinstance(item, tuple) and len(item) == 2 and all(isinstance(x, str) for x in item)


def chat_messages(messages: Iterable[Message]) -> list[pb.ChatMessage]:
    out = []
    for m in messages:
        role, content = (m["role"], m["content"]) if isinstance(m, Mapping) else m
        out.append(pb.ChatMessage(role=role, content=content))
    return out


def messages_request(
    session_id: str, messages: Iterable[Message], expected_offset: int | None, append_id: str
) -> pb.AppendRequest:
    """An append of chat turns, formatted by the server with the model's chat template."""
    req = pb.AppendRequest(session_id=session_id, append_id=append_id, messages=chat_messages(messages))
    if not req.messages:
        raise ValueError("append needs at least one message")
    if expected_offset is not None:
        req.expected_offset = expected_offset
    return req


def new_append_id() -> str:
    """A fresh append id: 32 hex characters, unique enough that two appends never share one."""
    return uuid.uuid4().hex


def new_session_id() -> str:
    """A session id made by the client, so that a retried create or fork cannot make two sessions."""
    return uuid.uuid4().hex


def append_request(session_id: str, content: Content, expected_offset: int | None, append_id: str) -> pb.AppendRequest:
    req = pb.AppendRequest(session_id=session_id, append_id=append_id)
    if isinstance(content, str):
        if not content:
            raise ValueError("append needs non-empty text or at least one token id")
        req.text = content
    else:
        tokens = [int(t) for t in content]
        if not tokens:
            raise ValueError("append needs non-empty text or at least one token id")
        req.tokens.extend(tokens)
    if expected_offset is not None:
        req.expected_offset = expected_offset
    return req


class StreamBuilder:
    """Numbered append requests for one AppendStream: ids `<base>-<i>`, expected offsets where they are known.

    Each piece is text, token ids or one chat turn (`(role, content)`, formatted by the
    server).  The first message carries the session's expected offset; a token-id message
    tells exactly where the next one starts, text and turns do not (the server's tokenizer
    decides), so after those the chain of expected offsets stops and only the append ids
    remain, which is all a retry needs to land each message once.
    """

    def __init__(self, session_id: str, expected_offset: int | None, base_id: str | None = None) -> None:
        self.session_id = session_id
        self.base = base_id or new_append_id()
        self.next_expected = expected_offset
        self.count = 0

    @property
    def first_id(self) -> str:
        return f"{self.base}-0"

    def build(self, content: Content | Message) -> pb.AppendRequest:
        aid = f"{self.base}-{self.count}"
        if is_message(content):  # a chat turn, formatted by the server
            req = messages_request(self.session_id, [content], self.next_expected, aid)  # type: ignore[list-item]
        else:
            req = append_request(self.session_id, content, self.next_expected, aid)  # type: ignore[arg-type]
        self.count += 1
        if self.next_expected is not None:
            self.next_expected = None if req.text or req.messages else self.next_expected + len(req.tokens)
        return req


@dataclass(frozen=True)
class Sampling:
    """Sampling settings of a generation (the proto's defaults: greedy, no top-p/top-k, random seed)."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 0.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    stop_tokens: tuple[int, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class Extras:
    """Chat prompts and what a committed generation keeps (see the proto's GenerateRequest)."""

    messages: tuple[Message, ...] = ()
    add_generation_prompt: bool = False
    commit_stop: bool = False
    commit_suffix: str = ""
    recall: RecallOptions | None = None
    """Recalled context before the prompt (None: off, the request carries no recall field)."""


def recall_options(recall: bool | RecallOptions) -> RecallOptions | None:
    """`recall=` of a generation as the request's options: False off, True the server's defaults (the
    server then searches for the prompt's last user turn)."""
    if recall is False:
        return None
    return RecallOptions() if recall is True else recall


def generate_request(
    session_id: str,
    prompt: Content | None,
    s: Sampling,
    commit: bool,
    expected_offset: int | None,
    append_id: str,
    extras: Extras = Extras(),
) -> pb.GenerateRequest:
    req = pb.GenerateRequest(
        session_id=session_id,
        max_tokens=s.max_tokens,
        temperature=s.temperature,
        top_p=s.top_p,
        top_k=s.top_k,
        stop=list(s.stop),
        stop_tokens=[int(t) for t in s.stop_tokens],
        commit=commit,
        append_id=append_id if commit else "",
        prompt_messages=chat_messages(extras.messages),
        add_generation_prompt=extras.add_generation_prompt,
        commit_stop=extras.commit_stop,
        commit_suffix=extras.commit_suffix,
    )
    if extras.recall is not None:
        req.recall.CopyFrom(extras.recall.to_pb())
    if isinstance(prompt, str):
        req.prompt_text = prompt
    elif prompt is not None:
        req.prompt_tokens.extend(int(t) for t in prompt)
    if s.seed is not None:
        req.seed = s.seed
    if expected_offset is not None:
        req.expected_offset = expected_offset
    return req


def sampling(
    max_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    stop: str | Iterable[str] | None,
    stop_tokens: Iterable[int] | None,
    seed: int | None,
) -> Sampling:
    stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
    return Sampling(max_tokens, temperature, top_p, top_k, stops, tuple(stop_tokens or ()), seed)


def fork_request(
    session_id: str, new_session_id: str, metadata: dict[str, str] | None, expected_offset: int | None
) -> pb.ForkSessionRequest:
    req = pb.ForkSessionRequest(session_id=session_id, new_session_id=new_session_id, metadata=metadata or {})
    if expected_offset is not None:
        req.expected_offset = expected_offset
    return req


def reset_request(session_id: str, expected_offset: int | None) -> pb.ResetSessionRequest:
    req = pb.ResetSessionRequest(session_id=session_id)
    if expected_offset is not None:
        req.expected_offset = expected_offset
    return req
