"""Building the proto requests from Python arguments, shared by the sync and the async client.

Both clients must send byte-for-byte the same requests (the same append ids on a retry,
the same expected offsets), so the building lives here once and the clients only move
messages.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace

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


APPEND_TOKENS_PER_SECOND = 20.0
"""The rate an append's default deadline allows on top of the client's `timeout`.  The default
model (SmolLM2-135M, CPU, 2 cores) reads 80-100 tokens/s alone (docs/service.md); a daemon
shared by many sessions gives each less, so the deadline assumes a fifth of that: a
7,995-token tool output gets 30 s + 400 s instead of 30 s, and lands on its first try."""


def append_tokens(req: pb.AppendRequest, bytes_tokenizer: bool) -> int:
    """Tokens an append request will read (an estimate for text: 3 bytes a token, or 1 with a bytes tokenizer)."""
    if req.tokens:
        return len(req.tokens)
    text = req.text or "".join(m.content for m in req.messages)
    return len(text.encode()) // (1 if bytes_tokenizer else 3) + 1


def append_timeout(base: float, tokens: int, tokens_per_second: float) -> float:
    """An append's deadline: the client's base timeout plus its tokens at `tokens_per_second`."""
    return base + tokens / tokens_per_second


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
class SamplingParams:
    """How a generation samples: one options object, passed as `params=` or as keyword arguments
    (`s.generate("...", max_tokens=48, temperature=0.7)`), sent as the GenerateRequest fields of
    the same names (see the proto for each one's range; the server checks them).

    The defaults are the proto's: greedy, every other setting off, a random seed."""

    max_tokens: int = 64
    temperature: float = 0.0
    """0: greedy (argmax)."""
    top_p: float = 0.0
    """Nucleus sampling; 0 or 1: off."""
    top_k: int = 0
    """0: off."""
    min_p: float = 0.0
    """Drop tokens less likely than min_p times the most likely one; 0: off."""
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 0.0
    """0 or 1: off."""
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    """Token id -> bias added to its logit, in [-100, 100]."""
    logprobs: bool = False
    """Each token's log-probability (`GenerateChunk.logprobs`)."""
    top_logprobs: int = 0
    """With logprobs: the k most likely tokens at each position too."""
    n: int = 1
    """Independent samples of one prompt (not with commit); sample i draws as seed + i would."""
    seed: int | None = None
    stop: str | Sequence[str] | None = ()
    """Stop strings (a single string is one); kept as a tuple."""
    stop_tokens: Sequence[int] | None = ()

    def __post_init__(self) -> None:
        stop = self.stop or ()
        object.__setattr__(self, "stop", (stop,) if isinstance(stop, str) else tuple(stop))
        object.__setattr__(self, "stop_tokens", tuple(int(t) for t in self.stop_tokens or ()))

    def with_(self, **changes: object) -> SamplingParams:
        """A copy with these settings changed (a keyword that is not a setting is a TypeError naming it)."""
        unknown = sorted(set(changes) - {f.name for f in fields(self)})
        if unknown:
            raise TypeError(f"{unknown[0]!r} is not a sampling setting (see memoryd_sdk.SamplingParams)")
        return replace(self, **changes) if changes else self  # type: ignore[arg-type]

    def fill(self, req: pb.GenerateRequest) -> None:
        """Set the request's fields of the same names (None: leave unset)."""
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None:
                continue
            target = getattr(req, f.name)
            if isinstance(v, Mapping):
                target.update({int(k): float(b) for k, b in v.items()})
            elif isinstance(v, tuple | list):
                target.extend(v)
            else:
                setattr(req, f.name, v)


def sampling_params(
    params: SamplingParams | None, changes: Mapping[str, object], max_tokens: int = 64
) -> SamplingParams:
    """`params` (else the defaults, with this method's `max_tokens`) with keyword settings applied."""
    base = params if params is not None else SamplingParams(max_tokens=max_tokens)
    return base.with_(**changes)


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
    s: SamplingParams,
    commit: bool,
    expected_offset: int | None,
    append_id: str,
    extras: Extras = Extras(),
) -> pb.GenerateRequest:
    req = pb.GenerateRequest(
        session_id=session_id,
        commit=commit,
        append_id=append_id if commit else "",
        prompt_messages=chat_messages(extras.messages),
        add_generation_prompt=extras.add_generation_prompt,
        commit_stop=extras.commit_stop,
        commit_suffix=extras.commit_suffix,
    )
    s.fill(req)
    if extras.recall is not None:
        req.recall.CopyFrom(extras.recall.to_pb())
    if isinstance(prompt, str):
        req.prompt_text = prompt
    elif prompt is not None:
        req.prompt_tokens.extend(int(t) for t in prompt)
    if expected_offset is not None:
        req.expected_offset = expected_offset
    return req


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
