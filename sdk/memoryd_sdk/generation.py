"""`GenerateStream`: a generation in flight, for sync code (a thin layer over `AsyncGenerateStream`).

Iterating pulls one message at a time from the async stream on the client's loop, so text
arrives as it is made; `cancel()` (or leaving the `with` block early) cancels the gRPC
call itself, and a cancelled committed generation commits nothing.
"""

from __future__ import annotations

from collections.abc import Iterator

from memoryd_sdk.aio_generation import AsyncGenerateStream
from memoryd_sdk.blocking import LoopThread, iterate
from memoryd_sdk.types import GenerateChunk, GenerateResult


class GenerateStream:
    """Iterate for text deltas (`for delta in stream`), or `chunks()` for ids and the final message.

    As `AsyncGenerateStream`: retried (UNAVAILABLE, DEADLINE_EXCEEDED) only before the
    first message arrives.  Use `complete()` for the whole text with retries throughout.
    """

    def __init__(self, runner: LoopThread, core: AsyncGenerateStream) -> None:
        self._runner, self._core = runner, core
        self._it = iterate(runner, core.chunks())

    @property
    def result(self) -> GenerateResult | None:
        """The whole generation, set once the last message has arrived."""
        return self._core.result

    @property
    def done(self) -> bool:
        return self._core.done

    @property
    def _call(self) -> _CallHandle | None:
        """The gRPC call in flight (its `cancel()` is safe from any thread)."""
        return _CallHandle(self) if self._core._call is not None else None

    def chunks(self) -> Iterator[GenerateChunk]:
        """Every message: text, token ids, and on the last one the finish reason and offset."""
        return self._it

    def __iter__(self) -> Iterator[str]:
        for chunk in self._it:
            if chunk.text:
                yield chunk.text

    def cancel(self) -> None:
        """Cancel the call on the server too; a committed generation then commits nothing."""
        self._runner.call(self._core.cancel)

    def collect(self) -> GenerateResult:
        """Read the rest of the stream and return the whole generation."""
        return self._runner.run(self._core.collect())

    def __enter__(self) -> GenerateStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self._runner.run(self._core.__aexit__(*exc))


class _CallHandle:
    """The stream's gRPC call, cancelled on the loop it lives on (grpc.aio calls are not thread-safe)."""

    def __init__(self, stream: GenerateStream) -> None:
        self._stream = stream

    def cancel(self) -> bool:
        return self._stream._runner.call(self._stream._core._call.cancel)
