"""A generation in flight: an iterator of text deltas that can be cancelled and then summed up.

Why a class rather than a bare generator: an agent needs to stop a generation midway
(the user interrupted, the tool answered) and the server must hear about it, because a
cancelled committed generation commits nothing.  `cancel()` (or leaving the `with`
block early) cancels the gRPC call itself, not just the Python loop.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc

from memoryd_sdk.errors import from_rpc_error
from memoryd_sdk.retry import Attempt, RetryPolicy, _should_retry
from memoryd_sdk.types import GenerateChunk, GenerateResult


class GenerateStream:
    """Iterate for text deltas (`for delta in stream`), or `chunks()` for ids and the final message.

    Retries (UNAVAILABLE, DEADLINE_EXCEEDED) happen only before the first message arrives:
    after that, starting again would repeat text the caller has already seen.  Use
    `Session.complete()` when you want the whole text with retries throughout.
    """

    def __init__(
        self,
        start: Callable[[Attempt], Any],
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

    def _run(self) -> Iterator[GenerateChunk]:
        attempt = 1
        while True:
            if self._cancelled:
                return
            self._call = self._start(Attempt(attempt))
            got_any = False
            try:
                for m in self._call:
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
            except grpc.RpcError as e:
                if self._cancelled and e.code() == grpc.StatusCode.CANCELLED:
                    return
                err = from_rpc_error(e)
                if got_any or not _should_retry(err, attempt, self._policy, "Generate"):
                    raise err from e
            time.sleep(self._policy.backoff(attempt))
            attempt += 1

    def chunks(self) -> Iterator[GenerateChunk]:
        """Every message: text, token ids, and on the last one the finish reason and offset."""
        return self._it

    def __iter__(self) -> Iterator[str]:
        for chunk in self._it:
            if chunk.text:
                yield chunk.text

    def cancel(self) -> None:
        """Cancel the call on the server too; a committed generation then commits nothing."""
        self._cancelled = True
        if self._call is not None:
            self._call.cancel()

    def collect(self) -> GenerateResult:
        """Read the rest of the stream and return the whole generation."""
        for _ in self._it:
            pass
        if self.result is None:
            raise RuntimeError("the generation was cancelled before it finished")
        return self.result

    @property
    def done(self) -> bool:
        return self.result is not None

    def __enter__(self) -> GenerateStream:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.result is None:
            self.cancel()
