"""Retries with exponential backoff, only where a retry cannot do harm.

memoryd promises that UNAVAILABLE means "nothing changed, or the change is durable" and
that an append (or committed generation) carrying `expected_offset` + `append_id` lands
exactly once however often it is sent.  DEADLINE_EXCEEDED is the same situation seen
from the client: the request may have landed, its answer did not arrive.  So the SDK
retries exactly those two codes, and every state-changing call it retries carries what
the server needs to recognise the retry.  Everything else is raised at once: retrying an
INVALID_ARGUMENT or an ABORTED would only repeat the failure.
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

    max_attempts: int = 5
    initial_backoff: float = 0.1
    max_backoff: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.2

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


def _should_retry(err: MemorydError, attempt: int, policy: RetryPolicy, what: str) -> bool:
    if not err.retryable or attempt >= policy.max_attempts:
        return False
    log.info("memoryd %s: %s; retrying (attempt %d of %d)", what, err, attempt + 1, policy.max_attempts)
    return True


async def call_with_retry_async(fn: Callable[[Attempt], Awaitable[T]], policy: RetryPolicy, what: str) -> T:
    """Run `fn` until it succeeds, raises a non-retryable error, or attempts run out; grpc errors become typed."""
    attempt = 1
    while True:
        try:
            return await fn(Attempt(attempt))
        except grpc.RpcError as e:
            err = from_rpc_error(e)
            if not _should_retry(err, attempt, policy, what):
                raise err from e
        await asyncio.sleep(policy.backoff(attempt))
        attempt += 1
