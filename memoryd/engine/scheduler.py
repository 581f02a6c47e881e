"""The scheduler: which waiting work runs next, on which lane (plain data in, a plan out).

Two lanes run at once, each on its own worker thread (memoryd/engine/core.py):
- the **decode lane** runs one batched forward: one token for each of up to `rows`
  generating samples (a generation lives in the engine until it finishes, and each of its
  samples joins every forward), least recently served first.  It is bound by memory reads and takes a few hundred
  milliseconds on a CPU, so generation latency does not depend on what else is queued;
- the **compute lane** runs solo work, which is where test-time steps happen and which is
  bound by arithmetic: samples whose token completes a mini-batch (`Ticket.solo`), then
  rebuilds, imports and exports, then appends, under a token budget per run.

Compute-lane policy, in order:
1. Solo decodes first, least recently served first: each holds up a generation.
2. Rebuilds, imports and exports, oldest first, while the budget lasts (a rebuild costs the
   log tokens it replays, bounded by the snapshot interval).
3. Appends share what is left, least recently served first, each cut at the end of a
   test-time step (a mini-batch boundary: what is read provisionally before a cut is
   recomputed by the step, so cutting elsewhere would waste work).  One 64K-token
   append therefore runs a budget's worth per run and everyone else's work joins the
   next one.
4. No starvation: the least recently served append and the oldest other item always
   get one piece per run, even when solo decodes have used the budget; so a run may go
   over budget by at most one mini-batch and one rebuild.
Each lane is planned only when it is free; work for a busy lane waits for the next plan.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from typing import Literal

from memoryd.engine.work import Append, Sample, Ticket

Lane = Literal["decode", "compute"]
LANES: tuple[Lane, ...] = ("decode", "compute")


@dataclass(frozen=True)
class Budget:
    tokens: int
    """Tokens of solo work per compute-lane run (appended, replayed, stepped)."""
    rows: int
    """Samples decoded in one batched forward (a generation of n samples takes n rows)."""


@dataclass
class Plan:
    decodes: list[Ticket] = field(default_factory=list)
    """Decode lane: one token each, run as one batch."""
    solo: list[Ticket] = field(default_factory=list)
    """Compute lane: decodes whose token takes a test-time step, each run alone."""
    chunks: list[tuple[Ticket, int]] = field(default_factory=list)
    """Compute lane: appends, read this many more tokens (solo: test-time steps stay exact)."""
    others: list[Ticket] = field(default_factory=list)
    """Compute lane: rebuilds, imports, exports."""

    @property
    def tokens(self) -> int:
        """Tokens of model work in the plan (a solo decode counts its step's mini-batch)."""
        return len(self.decodes) + self.compute_tokens

    @property
    def compute_tokens(self) -> int:
        return sum(t.cost for t in self.solo) + sum(n for _, n in self.chunks) + sum(t.cost for t in self.others)

    def lane(self, lane: Lane) -> Plan:
        """The part of the plan one lane runs."""
        if lane == "decode":
            return Plan(decodes=self.decodes)
        return Plan(solo=self.solo, chunks=self.chunks, others=self.others)

    def tickets(self) -> list[Ticket]:
        return [*self.decodes, *self.solo, *(t for t, _ in self.chunks), *self.others]

    def __bool__(self) -> bool:
        return bool(self.decodes or self.solo or self.chunks or self.others)


def cut(ticket: Ticket, room: int) -> int:
    """Tokens of an append to read now: whole steps' worth that fit in `room` (0 if none fits)."""
    first = min(ticket.cost, max(1, ticket.to_step))
    if first > room:
        return 0
    whole = (room - first) // ticket.step_every * ticket.step_every
    return min(ticket.cost, first + whole)


def schedule(waiting: Sequence[Ticket], budget: Budget, lanes: Collection[Lane] = LANES) -> Plan:
    """A plan for the free `lanes` over the `waiting` tickets (none of them running)."""
    plan = Plan()
    decodes = sorted((t for t in waiting if isinstance(t.work, Sample)), key=lambda t: (t.served, t.seq))
    if "decode" in lanes:
        plan.decodes = [t for t in decodes if not t.solo][: budget.rows]
    if "compute" not in lanes:
        return plan
    used = 0
    for t in (t for t in decodes if t.solo):
        if plan.solo and used + t.cost > budget.tokens:
            break
        plan.solo.append(t)
        used += t.cost
    others = sorted((t for t in waiting if not isinstance(t.work, Sample | Append)), key=lambda t: t.seq)
    for t in others:
        if plan.others and used + t.cost > budget.tokens:
            break
        plan.others.append(t)
        used += t.cost
    appends = sorted((t for t in waiting if isinstance(t.work, Append)), key=lambda t: (t.served, t.seq))
    for i, t in enumerate(appends):
        n = cut(t, budget.tokens - used)
        if n == 0 and i == 0:  # the least recently served always moves
            n = min(t.cost, max(1, t.to_step))
        if n == 0:
            continue
        plan.chunks.append((t, n))
        used += n
    return plan
