"""Typed results: frozen dataclasses built from the proto messages (no pydantic: the SDK stays grpcio + protobuf).

Protobuf messages are awkward to hold on to (mutable, `HasField`, Timestamps); agents
want plain values they can log, compare and pass around.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import UTC, datetime

from memoryd_sdk.proto import memoryd_pb2 as pb


class FinishReason(enum.Enum):
    """Why a generation stopped."""

    UNSPECIFIED = pb.FINISH_REASON_UNSPECIFIED
    LENGTH = pb.FINISH_REASON_LENGTH
    """max_tokens were sampled."""
    STOP_STRING = pb.FINISH_REASON_STOP_STRING
    """A stop string appeared (the text is cut before it; its tokens are still reported, and committed only
    with commit_stop)."""
    STOP_TOKEN = pb.FINISH_REASON_STOP_TOKEN
    """A stop id or the model's end-of-sequence id was sampled."""


def _time(ts: object) -> datetime | None:
    if ts is None or (ts.seconds == 0 and ts.nanos == 0):  # type: ignore[attr-defined]
        return None
    return datetime.fromtimestamp(ts.seconds + ts.nanos / 1e9, tz=UTC)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class SessionInfo:
    """What the server says about a session (proto `Session`)."""

    session_id: str
    tenant: str
    metadata: dict[str, str]
    created_at: datetime | None
    last_used_at: datetime | None
    model_digest: str
    offset: int
    """Tokens committed so far."""
    pending_tokens: int
    """Tokens read but waiting for their mini-batch to fill."""
    steps: int
    state_bytes: int
    """Bytes of the session's state in the daemon's memory (0 while it is not loaded)."""
    hot: bool
    stored_bytes: int = 0
    """Bytes the session holds in Redis, loaded or not: its newest snapshot plus its token log since."""

    @classmethod
    def from_pb(cls, m: pb.Session) -> SessionInfo:
        return cls(
            session_id=m.session_id,
            tenant=m.tenant,
            metadata=dict(m.metadata),
            created_at=_time(m.created_at),
            last_used_at=_time(m.last_used_at),
            model_digest=m.model_digest,
            offset=m.offset,
            pending_tokens=m.pending_tokens,
            steps=m.steps,
            state_bytes=m.state_bytes,
            hot=m.hot,
            stored_bytes=m.stored_bytes,
        )


@dataclass(frozen=True)
class AppendResult:
    """Where an append (or a stream of them) landed."""

    offset: int
    """The session's offset afterwards."""
    start_offset: int
    tokens: int
    steps: int
    duplicate: bool
    """True when the server had already applied it (a retry after a lost response): read once, not twice."""
    pending_tokens: int
    append_id: str = ""
    """The append id the SDK sent (the first one, for a stream)."""

    @classmethod
    def from_pb(cls, m: pb.AppendResponse, append_id: str = "") -> AppendResult:
        return cls(m.offset, m.start_offset, m.tokens, m.steps, m.duplicate, m.pending_tokens, append_id)


@dataclass(frozen=True)
class LogText:
    """The tail of a session's log (`Session.read_log`): its tokens [start_offset, end_offset) as text."""

    start_offset: int
    end_offset: int
    text: str

    @classmethod
    def from_pb(cls, m: pb.LogText) -> LogText:
        return cls(m.start_offset, m.end_offset, m.text)


@dataclass(frozen=True)
class RecalledSpan:
    """A stretch of a session's log that `Session.recall` found (or a generation placed before its prompt)."""

    start_offset: int
    end_offset: int
    """Its tokens are the log's [start_offset, end_offset)."""
    text: str
    score: float
    """Relevance: higher is more relevant (comparable within one answer only)."""

    @classmethod
    def from_pb(cls, m: pb.RecalledSpan) -> RecalledSpan:
        return cls(m.start_offset, m.end_offset, m.text, m.score)


@dataclass(frozen=True)
class RecallOptions:
    """How a generation recalls (`recall=` of `generate`, `chat`, `reply`; proto `RecallOptions`).

    Zeros are the server's defaults (`limits.default_recall_k`, 8; `default_recall_budget_tokens`,
    512).  `query` '' searches for the prompt's last user turn."""

    k: int = 0
    budget_tokens: int = 0
    query: str = ""

    def to_pb(self) -> pb.RecallOptions:
        return pb.RecallOptions(k=self.k, budget_tokens=self.budget_tokens, query=self.query)


@dataclass(frozen=True)
class TopLogprob:
    token: int
    logprob: float
    text: str = ""


@dataclass(frozen=True)
class TokenLogprob:
    """A sampled token's log-probability under the model, and the most likely tokens at its position."""

    token: int
    logprob: float
    text: str = ""
    """The token decoded on its own."""
    top: tuple[TopLogprob, ...] = ()
    """The most likely tokens at its position, most likely first (`top_logprobs` of them)."""

    @classmethod
    def from_pb(cls, m: pb.TokenLogprob) -> TokenLogprob:
        return cls(m.token, m.logprob, m.text, tuple(TopLogprob(t.token, t.logprob, t.text) for t in m.top))


@dataclass(frozen=True)
class GenerateChunk:
    """One message of a generation stream: the text and ids made since the previous one."""

    text: str
    tokens: tuple[int, ...]
    done: bool = False
    finish_reason: FinishReason = FinishReason.UNSPECIFIED
    offset: int = 0
    """Last chunk only: the session's offset afterwards."""
    generated_tokens: int = 0
    duplicate: bool = False
    committed_tokens: int = 0
    """Last chunk of a committed generation: tokens it added to the session."""
    index: int = 0
    """Which sample (of `n`) the text and ids belong to."""
    logprobs: tuple[TokenLogprob, ...] = ()
    """One per token, when asked for (`logprobs=True`)."""
    prompt_tokens: int = 0
    """Last chunk: tokens of the prompt the call read."""
    recalled_spans: tuple[RecalledSpan, ...] = ()
    """Last chunk of a generation with recall: the spans placed before its prompt (not in the session)."""
    recalled_tokens: int = 0

    @classmethod
    def from_pb(cls, m: pb.GenerateResponse) -> GenerateChunk:
        return cls(
            text=m.text,
            tokens=tuple(m.tokens),
            done=m.done,
            finish_reason=FinishReason(m.finish_reason),
            offset=m.offset,
            generated_tokens=m.generated_tokens,
            duplicate=m.duplicate,
            committed_tokens=m.committed_tokens,
            index=m.index,
            logprobs=tuple(TokenLogprob.from_pb(x) for x in m.logprobs),
            prompt_tokens=m.prompt_tokens,
            recalled_spans=tuple(RecalledSpan.from_pb(x) for x in m.recalled_spans),
            recalled_tokens=m.recalled_tokens,
        )


@dataclass(frozen=True)
class Sample:
    """One of a generation's `n` samples."""

    index: int
    text: str
    tokens: tuple[int, ...]
    finish_reason: FinishReason
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class GenerateResult:
    """A whole generation (with n > 1: sample 0's text and ids, and every sample in `samples`).

    For `duplicate=True` (a retried committed generation that had already landed) the
    server sends the original tokens and text again, in one message: the result is the
    same as if the first answer had arrived.
    """

    text: str
    tokens: tuple[int, ...]
    finish_reason: FinishReason
    offset: int
    generated_tokens: int
    duplicate: bool = False
    committed: bool = False
    committed_tokens: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()
    samples: tuple[Sample, ...] = ()
    """Every sample, in index order (one when n = 1)."""
    prompt_tokens: int = 0
    """Tokens of the prompt the call read."""
    recalled_spans: tuple[RecalledSpan, ...] = ()
    """With recall: the spans placed before the prompt, most relevant first (never part of the session)."""
    recalled_tokens: int = 0
    """With recall: tokens of context they made (0: nothing was found, or nothing fitted)."""

    @classmethod
    def collect(cls, chunks: list[GenerateChunk], committed: bool) -> GenerateResult:
        last = chunks[-1] if chunks else GenerateChunk("", ())
        by_index: dict[int, list[GenerateChunk]] = {}
        for c in chunks:
            by_index.setdefault(c.index, []).append(c)
        samples = []
        for i in sorted(by_index):
            mine = by_index[i]
            ends = [c.finish_reason for c in mine if c.finish_reason != FinishReason.UNSPECIFIED]
            samples.append(
                Sample(
                    i,
                    "".join(c.text for c in mine),
                    tuple(t for c in mine for t in c.tokens),
                    ends[-1] if ends else last.finish_reason,
                    tuple(lp for c in mine for lp in c.logprobs),
                )
            )
        first = samples[0] if samples else Sample(0, "", (), last.finish_reason)
        return cls(
            text=first.text,
            tokens=first.tokens,
            finish_reason=last.finish_reason,
            offset=last.offset,
            generated_tokens=last.generated_tokens,
            duplicate=last.duplicate,
            committed=committed,
            committed_tokens=last.committed_tokens,
            logprobs=first.logprobs,
            samples=tuple(samples),
            prompt_tokens=last.prompt_tokens,
            recalled_spans=last.recalled_spans,
            recalled_tokens=last.recalled_tokens,
        )


@dataclass(frozen=True)
class ExportHeader:
    """What an export says about itself; import checks the bytes against `total_bytes` and `sha256`."""

    session_id: str
    metadata: dict[str, str]
    model_digest: str
    offset: int
    total_bytes: int
    sha256: str
    format: str
    recall_log_bytes: int = 0
    """The recall log that follows the state (0: none; the imported session recalls only what it reads)."""
    recall_log_sha256: str = ""

    @classmethod
    def from_pb(cls, m: pb.ExportHeader) -> ExportHeader:
        return cls(
            m.session_id,
            dict(m.metadata),
            m.model_digest,
            m.offset,
            m.total_bytes,
            m.sha256,
            m.format,
            m.recall_log_bytes,
            m.recall_log_sha256,
        )

    def to_pb(self) -> pb.ExportHeader:
        return pb.ExportHeader(
            session_id=self.session_id,
            metadata=self.metadata,
            model_digest=self.model_digest,
            offset=self.offset,
            total_bytes=self.total_bytes,
            sha256=self.sha256,
            format=self.format,
            recall_log_bytes=self.recall_log_bytes,
            recall_log_sha256=self.recall_log_sha256,
        )


@dataclass(frozen=True)
class ModelInfo:
    """What the server says about its model (proto `ModelInfo`)."""

    digest: str
    model_type: str
    name: str
    vocab_size: int
    bos_token_id: int
    eos_token_id: int
    tokenizer: str
    """"bytes" or "huggingface"."""
    chat_template: str
    """The checkpoint's Jinja chat template ('' if none)."""
    chat_messages: bool
    """Whether the server formats messages with it (then `add_message` / `chat` let it)."""
    chat_problem: str
    generation_prompt: str
    turn_closing: str
    window_size: int
    mini_batch_size: int
    num_fast_layers: int
    num_layers: int
    adapter: str
    max_append_tokens: int
    max_generate_tokens: int
    max_message_bytes: int
    attention_sinks: int = 0
    chat_roles: tuple[str, ...] = ()
    """The roles a chat message may take with this model's template (empty: no template)."""

    @classmethod
    def from_pb(cls, m: pb.ModelInfo) -> ModelInfo:
        fields = {f: getattr(m, f) for f in cls.__dataclass_fields__}
        return cls(**fields | {"chat_roles": tuple(m.chat_roles)})


@dataclass(frozen=True)
class ChatReply:
    """`Session.chat`'s answer: the reply text (turn marker cut off) and where the session now stands."""

    text: str
    tokens: tuple[int, ...]
    finish_reason: FinishReason
    offset: int
    generation: GenerateResult = field(repr=False)


@dataclass(frozen=True)
class Usage:
    """Token counts of a committed chat reply, in the terms chat APIs report.

    `completion_tokens`: tokens sampled.  `prompt_tokens`: tokens the call read besides
    them: only its *new* turns in the chat format plus the reply's opening and closing
    (the session's earlier context is not read again, which is the point of a session).
    Their sum is what the session's offset moved by, except that a stop token is sampled
    (and counted) but not kept, and after a stop string the kept text is re-encoded.
    """

    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @classmethod
    def of(cls, last: GenerateChunk | GenerateResult) -> Usage:
        """From the last message of a committed generation (or the whole result: the same fields)."""
        kept = last.generated_tokens - (last.finish_reason == FinishReason.STOP_TOKEN)
        return cls(max(0, last.committed_tokens - kept), last.generated_tokens)
