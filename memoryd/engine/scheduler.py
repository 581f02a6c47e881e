"""The scheduler: which waiting work runs in the next tick (plain data in, a plan out).

Policy, in order:
1. Decodes first, oldest first, up to `rows` of them: one token each, batched into one
   forward, so generation latency does not depend on what else is queued.
2. Rebuilds, imports and exports, oldest first, while the token budget lasts (a
   rebuild costs the log tokens it replays, bounded by the snapshot interval).
3. Appends share what is left, least recently served first, each cut at the end of a
   test-time step (a mini-batch boundary: what is read provisionally before a cut is
   recomputed by the step, so cutting elsewhere would waste work).  One 64K-token
   append therefore runs a budget's worth per tick and everyone else's work joins the
   next tick.
4. No starvation: the least recently served append and the oldest other item always
   get one piece per tick, even when decodes have used the budget; so a tick may run
   over budget by at most one mini-batch and one rebuild.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from memoryd.engine.work import Append, Decode, Ticket


@dataclass(frozen=True)
class Budget:
    tokens: int
    """Tokens of model work per tick (decoded tokens, appended tokens, replayed tokens)."""
    rows: int
    """Sessions decoded in one batched forward."""


@dataclass
class Plan:
    decodes: list[Ticket] = field(default_factory=list)
    """One token each, run as one batch."""
    chunks: list[tuple[Ticket, int]] = field(default_factory=list)
    """Appends: read this many more tokens (solo: test-time steps stay exact)."""
    others: list[Ticket] = field(default_factory=list)
    """Rebuilds, imports, exports."""

    @property
    def tokens(self) -> int:
        return len(self.decodes) + sum(n for _, n in self.chunks) + sum(t.cost for t in self.others)

    def __bool__(self) -> bool:
        return bool(self.decodes or self.chunks or self.others)


def cut(ticket: Ticket, room: int) -> int:
    """Tokens of an append to read now: whole steps' worth that fit in `room` (0 if none fits)."""
    first = min(ticket.cost, max(1, ticket.to_step))
    if first > room:
        return 0
    whole = (room - first) // ticket.step_every * ticket.step_every
    return min(ticket.cost, first + whole)


def schedule(waiting: Sequence[Ticket], budget: Budget) -> Plan:
    plan = Plan()
    decodes = sorted((t for t in waiting if isinstance(t.work, Decode)), key=lambda t: t.seq)
    plan.decodes = decodes[: budget.rows]
    used = len(plan.decodes)
    others = sorted((t for t in waiting if not isinstance(t.work, Decode | Append)), key=lambda t: t.seq)
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
