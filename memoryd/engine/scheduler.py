"""The scheduler: which waiting work runs next, on which lane (plain data in, a plan out).

Two lanes run at once, each on its own worker thread (memoryd/engine/core.py):
- the **decode lane** runs one batched forward: one token for each of up to `rows`
  generating samples (a generation lives in the engine until it finishes, and each of its
  samples joins every forward), least recently served first.  It is bound by memory reads and takes a few hundred
  milliseconds on a CPU, so generation latency does not depend on what else is queued;
- the **compute lane** runs solo work, which is where test-time steps happen and which is
  bound by arithmetic: samples whose token completes a mini-batch (`Ticket.solo`), then
  appends, rebuilds, imports and exports in one queue by age, under a token budget per run.

Compute-lane policy, in order:
1. Solo samples first, least recently served first: each holds up a generation (one
   mini-batch each, and a sample has at most one in flight).
2. Everything else in one queue ordered by `Ticket.age`: its arrival, or for an append cut
   into pieces, the moment its last piece ran (it goes to the back of the queue, round
   robin).  Items are taken in that order while the budget lasts; appends are cut at the
   end of a test-time step (a mini-batch boundary: what is read provisionally before a cut
   is recomputed by the step, so cutting elsewhere would waste work); the first item that
   does not fit ends the plan.  So rebuilds (loading an evicted session: the log tokens it
   replays, bounded by the snapshot interval) and appends share the lane by age and neither
   class starves the other (issue 20), and the wait of an item is bounded by the work queued
   ahead of it (at most one budget's piece of each item ahead), never by arrivals after it.
   One 64K-token append runs a budget's worth per turn and everyone else's work takes its turn.
3. No starvation: the oldest item always gets one piece per run, even when solo samples have
   used the budget; so a run may go over budget by at most one mini-batch or one rebuild.
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
    queue = sorted((t for t in waiting if not isinstance(t.work, Sample)), key=lambda t: t.age)
    for i, t in enumerate(queue):
        first = i == 0  # the oldest always moves
        if isinstance(t.work, Append):
            n = cut(t, budget.tokens - used)
            if n == 0 and first:
                n = min(t.cost, max(1, t.to_step))
            if n == 0:
                break
            plan.chunks.append((t, n))
            used += n
        else:
            if not first and used + t.cost > budget.tokens:
                break
            plan.others.append(t)
            used += t.cost
    return plan
