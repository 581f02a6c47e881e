"""Retries with exponential backoff, only where a retry cannot do harm.

memoryd promises that UNAVAILABLE means "nothing changed, or the change is durable" and
that an append (or committed generation) carrying `expected_offset` + `append_id` lands
exactly once however often it is sent.  DEADLINE_EXCEEDED is the same situation seen
from the client: the request may have landed, its answer did not arrive.  So the SDK
retries exactly those two codes, and every state-changing call it retries carries what
the server needs to recognise the retry.  It also retries RESOURCE_EXHAUSTED when the
daemon sent a retry hint (`memoryd-retry-after-ms`: it refused the call for its queue, not
for its size; nothing changed), after waiting that long.  Everything else is raised at
once: retrying an INVALID_ARGUMENT or an ABORTED would only repeat the failure.

How long: UNAVAILABLE `max_attempts` tries: the default 12, with backoff from 0.1 s
doubling to 5 s, span about 30 s (25-31 s with jitter), long enough to ride out a daemon
restart (about 7 s with the default model) or a Redis failover; DEADLINE_EXCEEDED
`deadline_attempts` tries (each waits a whole deadline); RESOURCE_EXHAUSTED with a hint up
to `max_attempts` tries, each after the hinted wait.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

import grpc

from memoryd_sdk.errors import MemorydError, from_rpc_error

log = logging.getLogger("memoryd_sdk")
T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently to retry UNAVAILABLE / DEADLINE_EXCEEDED.

    Backoff before retry n (1-based) is `min(max_backoff, initial_backoff * multiplier**(n-1))`,
    scaled by a random factor in [1 - jitter, 1] so that many agents do not retry in lockstep.
    """

    max_attempts: int = 12
    """Tries of a call in all (whatever failed); 12 spans about 30 s of UNAVAILABLE with the default backoff."""
    initial_backoff: float = 0.1
    max_backoff: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.2
    deadline_attempts: int = 3
    """Tries of a call that keeps failing DEADLINE_EXCEEDED (within `max_attempts`)."""
    max_retry_after: float = 60.0
    """The longest server retry hint the SDK waits out (a longer one is raised)."""

    def backoff(self, retry: int) -> float:
        base = min(self.max_backoff, self.initial_backoff * self.multiplier ** (retry - 1))
        return base * (1.0 - self.jitter * random.random())


NO_RETRY = RetryPolicy(max_attempts=1)


class Attempt:
    """Passed to each try: `number` (1-based), so retries can wait for the channel to reconnect."""

    def __init__(self, number: int) -> None:
        self.number = number

    @property
    def is_retry(self) -> bool:
        return self.number > 1


def retry_delay(err: MemorydError, attempt: int, policy: RetryPolicy, what: str) -> float | None:
    """Seconds to wait before trying again, or None: raise `err` (see the module docstring)."""
    if attempt >= policy.max_attempts:
        return None
    backoff = policy.backoff(attempt)
    if err.code == grpc.StatusCode.UNAVAILABLE:
        delay = backoff
    elif err.code == grpc.StatusCode.RESOURCE_EXHAUSTED and err.retry_after is not None:
        if err.retry_after > policy.max_retry_after:
            return None
        delay = err.retry_after * (1.0 + policy.jitter * random.random())  # after the hint, not before
    elif err.code == grpc.StatusCode.DEADLINE_EXCEEDED and attempt < policy.deadline_attempts:
        delay = backoff
    else:
        return None
    log.info("memoryd %s: %s; retrying in %.2f s (attempt %d)", what, err, delay, attempt + 1)
    return delay


async def call_with_retry_async(fn: Callable[[Attempt], Awaitable[T]], policy: RetryPolicy, what: str) -> T:
    """Run `fn` until it succeeds, raises a non-retryable error, or retries run out; grpc errors become typed."""
    attempt = 1
    while True:
        try:
            return await fn(Attempt(attempt))
        except grpc.RpcError as e:
            err = from_rpc_error(e)
            delay = retry_delay(err, attempt, policy, what)
            if delay is None:
                raise err from e
        await asyncio.sleep(delay)
        attempt += 1
