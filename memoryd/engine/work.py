"""Typed work items a session submits to the engine, and their typed results.

Plain data, no torch: the middle layer holds session states only as opaque handles
(`State`) and never calls the model itself.  Every item has exactly one result type
on success, or `Refused` (input the model cannot read; the session is unchanged).

A generation is not an item but a request (`Generate`, as vLLM v1's `Request`): the
engine keeps it across ticks, joins each of its samples (`Sample`) to every decode
batch until it finishes, and streams its tokens back (memoryd/engine/core.py).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Literal

from memoryd.engine.handle import StateHandle

State = StateHandle
"""A session's state as work items carry it: the middle layer reads only StateHandle's members
(memoryd/engine/handle.py); behind it is the model's StreamState, which only the worker touches."""


# -- sampling ----------------------------------------------------------------------------------


class SamplingError(ValueError):
    """A sampling setting out of its range: `field` names it; `over_limit` marks a server limit
    (RESOURCE_EXHAUSTED at the gRPC edge) rather than a value that is never valid (INVALID_ARGUMENT)."""

    def __init__(self, field: str, message: str, over_limit: bool = False) -> None:
        super().__init__(message)
        self.field, self.message, self.over_limit = field, message, over_limit


@dataclass(frozen=True)
class SamplingLimits:
    """The server's ceilings a `SamplingParams` is checked against (GetModel reports them)."""

    vocab_size: int
    max_tokens: int
    max_temperature: float = 100.0
    max_n: int = 16
    """Samples per generation: each is a decode row, so n is bounded like a batch."""
    max_top_logprobs: int = 20
    """OpenAI's ceiling for top_logprobs (each is a sort of the vocabulary per token)."""
    max_logit_bias: int = 1024
    """Entries in logit_bias (each is one scattered add per token)."""
    max_penalty: float = 2.0
    """presence/frequency penalties lie in [-2, 2] (OpenAI's range)."""
    max_repetition_penalty: float = 10.0
    """A ratio: beyond 10 a seen token's logit is crushed to nothing anyway."""
    max_bias: float = 100.0
    """logit_bias values lie in [-100, 100] (OpenAI's range: +-100 bans or forces a token)."""
    max_stop: int = 16
    max_stop_chars: int = 256
    max_stop_tokens: int = 64


@dataclass(frozen=True)
class SamplingParams:
    """How one generation turns logits into tokens: one shape from the gRPC edge to the sampler.

    Field names are the proto's `GenerateRequest` fields (memoryd/api/service.py copies them by
    name), and the proto's zero values mean "off".  The engine reads the token-level settings;
    `stop` (text) is the session layer's, which alone sees text.  Order of application, as in
    vLLM: logit_bias, then the penalties (repetition over this call's prompt and the output,
    frequency and presence over the output), then greedy (temperature 0) or temperature, min_p,
    top_k, top_p and the draw.  Log-probabilities are of the model's own distribution (the raw
    logits, before any of these), as vLLM's default `raw_logprobs`.
    """

    max_tokens: int = 16
    temperature: float = 0.0
    """0: greedy (argmax)."""
    top_p: float = 0.0
    """Keep the smallest set of tokens whose probability reaches top_p; 0 or 1: off."""
    top_k: int = 0
    """Keep the k most likely tokens; 0: off."""
    min_p: float = 0.0
    """Drop tokens less likely than min_p times the most likely one; 0: off."""
    presence_penalty: float = 0.0
    """Subtracted from the logit of every token the output already has."""
    frequency_penalty: float = 0.0
    """Subtracted from a token's logit once per time the output has it."""
    repetition_penalty: float = 0.0
    """Seen tokens (prompt or output): a positive logit divided by it, a negative one multiplied; 0 or 1: off."""
    logit_bias: tuple[tuple[int, float], ...] = ()
    """(token id, bias) added to the logits before anything else."""
    logprobs: bool = False
    """Return the log-probability of each sampled token."""
    top_logprobs: int = 0
    """And of the k most likely tokens at each position (needs logprobs)."""
    n: int = 0
    """Independent samples from one prompt (0 or 1: one); sample i draws with seed + i."""
    seed: int | None = None
    """Seed of sample 0's draws (None: random)."""
    stop: tuple[str, ...] = ()
    """Stop strings (the session layer's: it sees the text)."""
    stop_tokens: tuple[int, ...] = ()
    """Stop token ids (the model's end-of-sequence id always stops too)."""

    @property
    def samples(self) -> int:
        return max(1, self.n)

    @property
    def penalized(self) -> bool:
        """Whether any penalty needs the tokens seen so far."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty not in (0.0, 1.0))

    def check(self, lim: SamplingLimits) -> SamplingParams:
        """This, or `SamplingError` naming the first field out of range and what it must be."""
        if self.max_tokens < 1:
            raise SamplingError("max_tokens", "max_tokens must be at least 1")
        if self.max_tokens > lim.max_tokens:
            raise SamplingError(
                "max_tokens", f"max_tokens {self.max_tokens} is over this server's limit {lim.max_tokens}", True
            )
        _within("temperature", self.temperature, 0.0, lim.max_temperature, "0 = greedy")
        _within("top_p", self.top_p, 0.0, 1.0, "0 or 1 = off")
        if not 0 <= self.top_k <= lim.vocab_size:
            raise SamplingError("top_k", f"top_k {self.top_k} exceeds the vocabulary size {lim.vocab_size} (0 = off)")
        _within("min_p", self.min_p, 0.0, 1.0, "0 = off")
        _within("presence_penalty", self.presence_penalty, -lim.max_penalty, lim.max_penalty, "0 = off")
        _within("frequency_penalty", self.frequency_penalty, -lim.max_penalty, lim.max_penalty, "0 = off")
        _within("repetition_penalty", self.repetition_penalty, 0.0, lim.max_repetition_penalty, "0 or 1 = off")
        if len(self.logit_bias) > lim.max_logit_bias:
            raise SamplingError(
                "logit_bias", f"logit_bias has {len(self.logit_bias)} entries; at most {lim.max_logit_bias}", True
            )
        for tok, bias in self.logit_bias:
            if not 0 <= tok < lim.vocab_size:
                raise SamplingError(
                    "logit_bias", f"logit_bias token id {tok} is outside the vocabulary [0, {lim.vocab_size})"
                )
            _within(f"logit_bias[{tok}]", bias, -lim.max_bias, lim.max_bias, "added to the token's logit")
        if self.top_logprobs and not self.logprobs:
            raise SamplingError("top_logprobs", "top_logprobs needs logprobs = true")
        if not 0 <= self.top_logprobs <= lim.max_top_logprobs:
            raise SamplingError(
                "top_logprobs", f"top_logprobs {self.top_logprobs} is over the limit {lim.max_top_logprobs}", True
            )
        if self.n > lim.max_n:
            raise SamplingError("n", f"n {self.n} is over this server's limit {lim.max_n} samples", True)
        if len(self.stop) > lim.max_stop:
            raise SamplingError("stop", f"{len(self.stop)} stop strings; at most {lim.max_stop}", True)
        for i, s in enumerate(self.stop):
            if len(s) > lim.max_stop_chars:
                raise SamplingError(
                    "stop", f"stop string {i} has {len(s)} characters; at most {lim.max_stop_chars}", True
                )
        if any(not s for s in self.stop):
            raise SamplingError("stop", "stop strings must not be empty")
        if len(self.stop_tokens) > lim.max_stop_tokens:
            raise SamplingError(
                "stop_tokens", f"{len(self.stop_tokens)} stop token ids; at most {lim.max_stop_tokens}", True
            )
        for t in self.stop_tokens:
            if not 0 <= t < lim.vocab_size:
                raise SamplingError("stop_tokens", f"stop token id {t} is outside the vocabulary [0, {lim.vocab_size})")
        return self


def _within(name: str, v: float, lo: float, hi: float, note: str) -> None:
    if not math.isfinite(v) or not lo <= v <= hi:
        raise SamplingError(name, f"{name} must lie in [{lo:g}, {hi:g}] ({note}), got {v}")


# -- work items ------------------------------------------------------------------------------


@dataclass(eq=False)
class Append:
    """Read `tokens` into a copy of `state` (the original is untouched); long appends run over
    several ticks, cut at mini-batch boundaries."""

    state: State
    tokens: list[int]
    frozen: bool = False
    """Read them into a frozen copy (`model.StreamState.frozen_copy`): forward only under the state's
    fast weights, never a test-time step.  For tokens no log holds (a generation's recalled context,
    issue 19); the copy can be generated from, never committed."""


@dataclass(eq=False)
class Generate:
    """A generation, as vLLM v1's `Request`: the prompt's state, one `SamplingParams` and the
    token ids that stop it.  The engine decodes each of its `params.samples` samples on its own
    O(1) fork of `state` (never `state` itself), one token per tick, until it finishes."""

    state: State
    params: SamplingParams
    stop_ids: frozenset[int]
    """The request's stop ids and the model's end-of-sequence id."""
    prompt: tuple[int, ...] = ()
    """This call's prompt tokens: the repetition penalty counts them as seen."""
    keep: bool = False
    """The caller keeps a sample's end state (a commit): its `Finished` then carries the state's bytes
    (measuring them walks the state's tensors: not done for states nobody keeps)."""


@dataclass(eq=False)
class Sample:
    """One sample of a generation as the engine keeps it across ticks (vLLM: a sequence).

    The engine's update step alone changes it, between its ticks; the worker reads it."""

    request: Generate
    index: int
    state: State
    """Its own fork of the prompt's state, changed in place as it decodes."""
    rng: random.Random
    """Its draws: sample i of a seeded request is seeded with seed + i."""
    token: int | None = None
    """The last token sampled, read into `state` at the next tick (None: nothing yet)."""
    u: float = 0.0
    """The uniform draw in [0, 1) of its next token."""
    out: list[int] = field(default_factory=list)
    """Tokens sampled so far."""
    read: int = 0
    """Of `out`, how many `state` has read (all but the last, between ticks)."""
    stop: bool = False
    """The session asked it to stop (a stop string appeared in its text)."""


@dataclass
class Rebuild:
    """A session's state from its newest snapshot (None: the initial state) plus its log tail."""

    snapshot: bytes | None
    pieces: list[list[int]]


@dataclass
class Import:
    """A state from exported bytes (a client sent them: validated, never unpickled)."""

    data: bytes


@dataclass(eq=False)
class Export:
    """A state's snapshot bytes."""

    state: State


Work = Append | Sample | Rebuild | Import | Export


# -- results ---------------------------------------------------------------------------------


@dataclass(eq=False)
class Appended:
    state: State
    """The new state (a copy; the submitted one is unchanged)."""
    steps: int
    """Test-time steps the append took."""
    nbytes: int = 0
    """`state.nbytes()`, measured by the worker when the append is done: residency's byte count, so the
    session layer never calls into the model for it."""


@dataclass(frozen=True)
class Logprob:
    """The log-probability of a sampled token under the model, and of the most likely tokens there."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    """(token id, log-probability), most likely first: `top_logprobs` of them."""


@dataclass
class Sampled:
    """One token of one sample: a tick's result, streamed to the session as it is drawn."""

    token: int
    logprob: Logprob | None = None
    sample: int = 0


FinishReason = Literal["stop_token", "length", "stopped"]


@dataclass(eq=False)
class Finished:
    """A sample is done (its last `Sampled` came before this): why, and its state for a commit."""

    sample: int
    reason: FinishReason
    """A stop id was sampled, max_tokens were, or the session stopped it (a stop string)."""
    state: State
    read: int
    """Output tokens `state` has read (a prefix of what was streamed)."""
    nbytes: int = 0
    """`state.nbytes()` when the request keeps its states (`Generate.keep`), else 0."""


@dataclass(eq=False)
class Built:
    state: State
    replayed: int = 0
    """Log tokens read on top of the snapshot."""
    seconds: float = 0.0
    """The worker's time on it (deserializing the snapshot and replaying), not the wait for the lane."""
    nbytes: int = 0
    """`state.nbytes()` (as `Appended.nbytes`)."""


@dataclass
class Exported:
    data: bytes


@dataclass
class Refused:
    """The model cannot use the input; nothing changed.  `reason` says which kind of problem."""

    reason: Literal["input", "foreign_model", "corrupt"]
    message: str


Result = Appended | Sampled | Built | Exported | Refused


class RefusedError(Exception):
    """A generation's input the model refused (`refused` says why); nothing changed."""

    def __init__(self, refused: Refused) -> None:
        super().__init__(refused.message)
        self.refused = refused


@dataclass(eq=False)  # compared by identity: its work holds tensors
class Ticket:
    """A submitted item as the scheduler and worker see it (the engine's bookkeeping)."""

    work: Work
    seq: int
    """Arrival order."""
    cost: int = 1
    """Tokens of model work it still needs (an append's remaining tokens, a rebuild's replay)."""
    read: int = 0
    """Tokens of an append already read (it is cut across ticks)."""
    to_step: int = 0
    """Tokens an append must still read before its state's next test-time step."""
    step_every: int = 1
    """Tokens between test-time steps (the model's mini-batch size)."""
    solo: bool = False
    """A sample whose token takes a test-time step (`model.batch.runs_solo`): the compute lane's."""
    served: int = -1
    """Last tick that ran part of it (-1: never): the least recently served samples go first."""
    age: int = -1
    """Its place in the compute lane's queue: `seq` at arrival; an append cut into pieces is given
    a new one (the back of the queue) each time a piece has run (-1: `seq`)."""
    deadline: float | None = None
    """time.monotonic() past which nobody will use the result (None: run it whatever happens)."""
    running: bool = False
    """On a lane now: not planned again until its outcome is back."""
    progress: Any = field(default=None, repr=False)
    """The worker's partial result (an append's state and steps so far)."""

    def __post_init__(self) -> None:
        if self.age < 0:
            self.age = self.seq
