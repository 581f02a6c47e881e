"""Admission: say no early, and know each call's deadline.

A call's deadline (the gRPC deadline the edge read, as a `time.monotonic()` instant) is
kept in a context variable for everything the call does below the edge: the engine drops
queued work nobody will use once it has passed (`Engine.submit(..., deadline=)`).

`Backlog` counts the tokens of model work the calls in progress still bring (appends,
prompts, replays of sessions to load), and refuses a new call with RESOURCE_EXHAUSTED and
a retry hint (`errors.Overloaded`) before it queues anything when
- the backlog ahead of it is over the configured limit (`max_queued_tokens`), or
- the backlog ahead of it would take longer than the time left before its deadline, at the
  compute lane's measured rate (seconds per token of solo work, `Engine.seconds_per_token`).
The hint is the time the backlog ahead takes to drain at that rate.  The call's own work
never refuses it: a long append with a long enough deadline is the caller's to make.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar

from memoryd import metrics
from memoryd.errors import Overloaded

_deadline: ContextVar[float | None] = ContextVar("memoryd_deadline", default=None)


def set_deadline(seconds_left: float | None) -> None:
    """This call's deadline, `seconds_left` from now (None: the caller set none)."""
    _deadline.set(None if seconds_left is None else time.monotonic() + seconds_left)


def deadline() -> float | None:
    """This call's deadline as a time.monotonic() instant (None: none)."""
    return _deadline.get()


class Backlog:
    def __init__(self, limit_tokens: int, seconds_per_token: Callable[[], float]) -> None:
        self.limit = limit_tokens
        """0: no limit."""
        self.rate = seconds_per_token
        self.tokens = 0
        """Tokens of model work the admitted calls still bring."""

    def check(self, cost: int) -> None:
        """Refuse (Overloaded) if the work ahead is over the limit or past this call's deadline."""
        ahead, rate = self.tokens, self.rate()
        drain = ahead * rate
        if self.limit and ahead and ahead + cost > self.limit:
            metrics.REFUSED.labels("queue_limit").inc()
            raise Overloaded(
                f"the daemon's queue holds {ahead} tokens of work and this call brings {cost} more, over its limit "
                f"of {self.limit} (max_queued_tokens): retry in about {drain:.1f} s",
                retry_after=max(drain, 0.1),
            )
        end = deadline()
        if end is not None and rate > 0 and ahead and time.monotonic() + drain > end:
            metrics.REFUSED.labels("deadline").inc()
            raise Overloaded(
                f"the {ahead} tokens of work queued ahead of this call take about {drain:.1f} s, past its deadline "
                f"(in {max(0.0, end - time.monotonic()):.1f} s): retry in about {drain:.1f} s, or with a longer "
                "deadline",
                retry_after=drain,
            )

    @contextlib.contextmanager
    def admitted(self, cost: int) -> Iterator[None]:
        """Checked, then counted in the backlog until the call ends."""
        self.check(cost)
        self.tokens += cost
        metrics.BACKLOG_TOKENS.set(self.tokens)
        try:
            yield
        finally:
            self.tokens -= cost
            metrics.BACKLOG_TOKENS.set(self.tokens)
