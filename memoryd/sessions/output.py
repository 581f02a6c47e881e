"""Output policy: what a generation streams, where it stops, and what it commits.

Text that could start a stop string is held back (`StopText`); a committed generation
keeps exactly the text the client was sent unless asked otherwise (`kept_output`); a
retried committed generation gets its original output back from the record stored
with its append id (`record`, `replayed`).  No model and no torch here: tokens are
ints, text is str.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from memoryd.engine.work import Logprob
from memoryd.errors import InvalidArgument
from memoryd.sessions.recall_prompt import NOTHING, RecallContext
from memoryd.store.results import Logged
from memoryd.store.tokenlog import tokens_hash

if TYPE_CHECKING:  # annotations only: importing model/ would import torch into the session layer
    from model.tokenizer import Tokenizer


class StopText:
    """Accumulates generated text; says what may be streamed now and whether a stop string appeared.

    Text that could be the start of a stop string is held back until the next
    token decides, so a client never sees part of a stop string.
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.text = ""
        self.sent = 0
        self.stopped = False

    def push(self, delta: str) -> str:
        """Add decoded text; return the part that is now safe to send."""
        self.text += delta
        cut = min(
            (i for i in (self.text.find(s, max(0, self.sent - len(s))) for s in self.stops) if i >= 0), default=-1
        )
        if cut >= 0:
            self.stopped = True
            out, self.sent = self.text[self.sent : cut], cut
            return out
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        end = max(self.sent, len(self.text) - hold)
        out, self.sent = self.text[self.sent : end], end
        return out

    def flush(self) -> str:
        """At the end (no stop string): whatever was held back."""
        if self.stopped:
            return ""
        out, self.sent = self.text[self.sent :], len(self.text)
        return out


@dataclass(frozen=True)
class CommitRule:
    """What a committed generation keeps besides its output (the session layer's, not the sampler's)."""

    stop: bool = False
    """Commit the stop token / the tokens of the stop string too (else: exactly the text sent)."""
    suffix: tuple[int, ...] = ()
    """Committed after the output (a chat turn's closing)."""


@dataclass
class GenEvent:
    tokens: list[int]
    text: str
    done: bool = False
    finish: str = ""
    offset: int = 0
    generated: int = 0
    duplicate: bool = False
    committed: int = 0
    sample: int = 0
    """Which of the request's samples the tokens and text belong to."""
    logprobs: list[Logprob] = field(default_factory=list)
    """One per token, when asked for."""
    prompt: int = 0
    """Last event: tokens of the prompt the call read."""
    recalled: RecallContext = NOTHING
    """Last event, with recall: the context placed before the prompt (never committed)."""


class SampleText:
    """One sample's output as its client sees it: the tokens, the text sent, and why it stopped."""

    def __init__(self, tok: Tokenizer, stops: tuple[str, ...], stop_ids: frozenset[int]) -> None:
        self.tok, self.stop_ids = tok, stop_ids
        self.decoder = tok.stream_decoder()
        self.text = StopText(list(stops))
        self.out: list[int] = []
        self.sent: list[str] = []
        self.finish = ""
        """"" while it runs; then "stop_token", "stop_string" or "length"."""

    def push(self, token: int) -> str:
        """A sampled token; returns the text it makes safe to send."""
        self.out.append(token)
        if token in self.stop_ids:
            self.finish = "stop_token"
            return ""
        delta = self.text.push(self.decoder.push(token))
        self.sent.append(delta)
        if self.text.stopped:
            self.finish = "stop_string"
        return delta

    def end(self) -> str:
        """At the end: the text still held back (an unfinished character, a possible stop string's start)."""
        self.finish = self.finish or "length"
        tail = ""
        if not self.text.stopped:
            full = self.tok.decode([t for t in self.out if t not in self.stop_ids])
            if full.startswith(self.text.text):
                tail = self.text.push(full[len(self.text.text) :])
        tail += self.text.flush()
        self.sent.append(tail)
        return tail


def kept_output(tok: Tokenizer, out: list[int], finish: str, text: StopText, commit_stop: bool) -> list[int]:
    """The output tokens a committed generation keeps: all, or exactly the text the client was sent."""
    if commit_stop or finish == "length":
        return out
    if finish == "stop_token":
        return out[:-1]
    cut = text.text[: text.sent]  # the text before the stop string
    for k in range(len(out) - 1, -1, -1):
        head = tok.decode(out[:k])
        if cut.startswith(head) and not head.endswith("\ufffd"):
            rest = cut[len(head) :]
            return out[:k] + (tok.encode(rest) if rest else [])
    return tok.encode(cut) if cut else []


def record(prompt: list[int], out: list[int], text: str, finish: str) -> str:
    """What the append-id table keeps of a committed generation, so a retry gets the same answer."""
    return json.dumps({"p": tokens_hash([prompt]), "g": out, "t": text, "f": finish}, separators=(",", ":"))


def replayed(append_id: str, dup: Logged, prompt: list[int]) -> GenEvent:
    """The answer to a retried committed generation that already landed: its original output."""
    try:
        rec = json.loads(dup.record) if dup.record else None
    except json.JSONDecodeError:
        rec = None
    if not isinstance(rec, dict) or "p" not in rec:
        raise InvalidArgument(
            f"append_id {append_id!r} was already used by an append (at offset {dup.start}), not a generation; "
            "use a new append_id"
        )
    if rec["p"] != tokens_hash([prompt]):
        raise InvalidArgument(
            f"append_id {append_id!r} was already used for a generation with another prompt "
            f"(at offset {dup.start}); use a new append_id for a new generation"
        )
    out = [int(t) for t in rec["g"]]
    return GenEvent(out, str(rec["t"]), True, str(rec["f"]), dup.offset, len(out), True, dup.offset - dup.start)
