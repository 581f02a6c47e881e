"""Admission: say no early, and know each call's deadline.

A call's deadline (the gRPC deadline the edge read, as a `time.monotonic()` instant) is
kept in a context variable for everything the call does below the edge: the engine drops
queued work nobody will use once it has passed (`Engine.submit(..., deadline=)`).

`Backlog` counts the work the calls in progress still bring: tokens of model work (appends,
prompts) and loads of cold sessions (a snapshot read and a replay each), and refuses a new
call with RESOURCE_EXHAUSTED and a retry hint (`errors.Overloaded`) before it queues
anything when
- the tokens ahead of it are over the configured limit (`max_queued_tokens`), or
- the work ahead of it would take longer than the time left before its deadline, priced at
  measured rates (`Engine.seconds_per_token` for appended tokens; for a session to load,
  the recent time of a load plus the eviction that makes room for it: loads make room one
  at a time).
Whatever those rates miss (evictions, decoding, Redis, a budget that lets few calls work at
once) the daemon's recent pace catches: the calls ahead times the interval between calls
finishing while busy; the larger of the two estimates counts.  The hint is the time the
work ahead takes to drain.  The call's own work
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
    def __init__(
        self, limit_tokens: int, seconds_per_token: Callable[[], float], seconds_per_load: Callable[[], float]
    ) -> None:
        self.limit = limit_tokens
        """0: no limit."""
        self.per_token, self.per_load = seconds_per_token, seconds_per_load
        self.tokens = 0
        """Tokens of model work the admitted calls still bring."""
        self.loads = 0
        """Cold sessions the admitted calls still have to load."""
        self.calls = 0
        """Calls admitted and not finished."""
        self.pace = 0.0
        """Seconds between calls served while others were waiting (a moving average)."""
        self._last_done = 0.0
        self._busy_since = 0.0
        """When the calls in progress last went from none to some: idle time before it is not pace."""

    def drain(self) -> float:
        """Seconds the work ahead takes (0 until rates are measured)."""
        by_rates = self.tokens * self.per_token() + self.loads * self.per_load()
        return max(by_rates, self.calls * self.pace)

    def check(self, tokens: int) -> None:
        """Refuse (Overloaded) if the work ahead is over the limit or past this call's deadline."""
        ahead, drain = self.tokens, self.drain()
        if self.limit and ahead and ahead + tokens > self.limit:
            metrics.REFUSED.labels("queue_limit").inc()
            raise Overloaded(
                f"the daemon's queue holds {ahead} tokens of work and this call brings {tokens} more, over its limit "
                f"of {self.limit} (max_queued_tokens): retry in about {drain:.1f} s",
                retry_after=max(drain, 0.1),
            )
        end = deadline()
        if end is not None and drain > 0 and time.monotonic() + drain > end:
            metrics.REFUSED.labels("deadline").inc()
            raise Overloaded(
                f"the work queued ahead of this call ({self.calls} calls: {ahead} tokens, {self.loads} sessions to "
                "load) takes about "
                f"{drain:.1f} s, past its deadline (in {max(0.0, end - time.monotonic()):.1f} s): retry in about "
                f"{drain:.1f} s, or with a longer deadline",
                retry_after=drain,
            )

    @contextlib.contextmanager
    def admitted(self, tokens: int, load: bool) -> Iterator[None]:
        """Checked, then counted in the backlog until the call ends."""
        self.check(tokens)
        if not self.calls:
            self._busy_since = time.monotonic()
        self.tokens += tokens
        self.loads += load
        self.calls += 1
        metrics.BACKLOG_TOKENS.set(self.tokens)
        served = False
        try:
            yield
            served = True
        finally:
            self.tokens -= tokens
            self.loads -= load
            self.calls -= 1
            metrics.BACKLOG_TOKENS.set(self.tokens)
            if served:  # the pace of calls served (one that failed or left says nothing of it)
                now = time.monotonic()
                # busy: the interval since the last call served (or since the daemon became busy, if that is
                # later: the idle time before it is not the daemon's pace) is the daemon's pace
                if self.calls and self._last_done:
                    gap = now - max(self._last_done, self._busy_since)
                    self.pace = gap if not self.pace else 0.9 * self.pace + 0.1 * gap
                self._last_done = now
