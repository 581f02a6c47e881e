"""`AsyncGenerateStream`: a generation in flight, the one implementation (the sync `GenerateStream` drives it).

Why a class rather than a bare generator: an agent needs to stop a generation midway
(the user interrupted, the tool answered) and the server must hear about it, because a
cancelled committed generation commits nothing.  `cancel()` (or leaving the `async with`
block early) cancels the gRPC call itself, not just the Python loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from memoryd_sdk.errors import Cancelled, from_rpc_error
from memoryd_sdk.retry import Attempt, RetryPolicy, retry_delay
from memoryd_sdk.types import GenerateChunk, GenerateResult


class AsyncGenerateStream:
    """`async for delta in stream`: text deltas; `chunks()` for ids and the final message; `cancel()`.

    Nothing is sent until the first `async for` (or `chunks()` read).  Retries
    (UNAVAILABLE, DEADLINE_EXCEEDED) happen only before the first message arrives: after
    that, starting again would repeat text the caller has already seen.  Use `complete()`
    when you want the whole text with retries throughout.
    """

    def __init__(
        self,
        start: Callable[[Attempt], Awaitable[Any]],
        policy: RetryPolicy,
        committed: bool,
        on_done: Callable[[GenerateChunk], None] | None = None,
    ) -> None:
        self._start, self._policy, self._committed, self._on_done = start, policy, committed, on_done
        self._call: Any = None
        self._cancelled = False
        self._received: list[GenerateChunk] = []
        self._it = self._run()
        self.result: GenerateResult | None = None
        """The whole generation, set once the last message has arrived."""

    async def _run(self) -> AsyncIterator[GenerateChunk]:
        attempt = 1
        while True:
            if self._cancelled:
                return
            self._call = await self._start(Attempt(attempt))
            got_any = False
            try:
                async for m in self._call:
                    got_any = True
                    chunk = GenerateChunk.from_pb(m)
                    self._received.append(chunk)
                    if chunk.done:
                        self.result = GenerateResult.collect(self._received, self._committed)
                        if self._on_done is not None:
                            self._on_done(chunk)
                    yield chunk
                    if chunk.done:
                        return
                return
            except asyncio.CancelledError:
                if self._cancelled:
                    return
                task = asyncio.current_task()
                if task is not None and task.cancelling() == 0 and self._call.cancelled():
                    # the call was cancelled by someone else than `cancel()` (not our task): a typed error
                    raise Cancelled("the generation's call was cancelled") from None
                raise
            except grpc.RpcError as e:
                if self._cancelled and e.code() == grpc.StatusCode.CANCELLED:
                    return
                err = from_rpc_error(e)
                delay = None if got_any else retry_delay(err, attempt, self._policy, "Generate")
                if delay is None:
                    raise err from e
            await asyncio.sleep(delay)
            attempt += 1

    def chunks(self) -> AsyncIterator[GenerateChunk]:
        """Every message: text, token ids, and on the last one the finish reason and offset."""
        return self._it

    async def __aiter__(self) -> AsyncIterator[str]:
        async for chunk in self._it:
            if chunk.text:
                yield chunk.text

    def cancel(self) -> None:
        """Cancel the call on the server too; a committed generation then commits nothing."""
        self._cancelled = True
        if self._call is not None:
            self._call.cancel()

    async def collect(self) -> GenerateResult:
        """Read the rest of the stream and return the whole generation."""
        async for _ in self._it:
            pass
        if self.result is None:
            raise RuntimeError("the generation was cancelled before it finished")
        return self.result

    @property
    def done(self) -> bool:
        return self.result is not None

    async def __aenter__(self) -> AsyncGenerateStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.result is None:
            self.cancel()
