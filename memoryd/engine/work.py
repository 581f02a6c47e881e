"""Typed work items a session submits to the engine, and their typed results.

Plain data, no torch: the middle layer holds session states only as opaque handles
(`State`) and never calls the model itself.  Every item has exactly one result type
on success, or `Refused` (input the model cannot read; the session is unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from model import StreamState as State
else:
    State = Any


@dataclass(frozen=True)
class Sampling:
    """How to turn logits into a token (temperature 0: greedy)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0


# -- work items ------------------------------------------------------------------------------


@dataclass(eq=False)
class Append:
    """Read `tokens` into a copy of `state` (the original is untouched); long appends run over
    several ticks, cut at mini-batch boundaries."""

    state: State
    tokens: list[int]


@dataclass(eq=False)
class Decode:
    """Read `token` into `state` (owned by one generation, changed in place; None: read nothing),
    then sample the next token from its logits with the uniform draw `u` in [0, 1)."""

    state: State
    token: int | None
    sampling: Sampling
    u: float


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


Work = Append | Decode | Rebuild | Import | Export


# -- results ---------------------------------------------------------------------------------


@dataclass(eq=False)
class Appended:
    state: State
    """The new state (a copy; the submitted one is unchanged)."""
    steps: int
    """Test-time steps the append took."""


@dataclass
class Sampled:
    token: int


@dataclass(eq=False)
class Built:
    state: State
    replayed: int = 0
    """Log tokens read on top of the snapshot."""
    seconds: float = 0.0
    """The worker's time on it (deserializing the snapshot and replaying), not the wait for the lane."""


@dataclass
class Exported:
    data: bytes


@dataclass
class Refused:
    """The model cannot use the input; nothing changed.  `reason` says which kind of problem."""

    reason: Literal["input", "foreign_model", "corrupt"]
    message: str


Result = Appended | Sampled | Built | Exported | Refused


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
    """A decode whose token takes a test-time step (`model.batch.runs_solo`): the compute lane's."""
    age: int = -1
    """Its place in the compute lane's queue: `seq` at arrival; an append cut into pieces is given
    a new one (the back of the queue) each time a piece has run (-1: `seq`)."""
    deadline: float | None = None
    """time.monotonic() past which nobody will use the result (None: run it whatever happens)."""

    def __post_init__(self) -> None:
        if self.age < 0:
            self.age = self.seq

    running: bool = False
    """On a lane now: not planned again until its outcome is back."""
    progress: Any = field(default=None, repr=False)
    """The worker's partial result (an append's state and steps so far)."""
