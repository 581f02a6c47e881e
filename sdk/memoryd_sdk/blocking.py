"""The sync SDK as a thin layer: the async core's coroutines, run on a private event loop thread.

Why this way round (sdk/README.md, "One core"): every call, retry, error mapping, page and
export/import stream is written once, in `aio.py` / `aio_session.py` / `aio_generation.py`.
A sync object holds its async twin (`_core`) and a `LoopThread`; each public method of the
twin gets a blocking method of the same name and parameters (`mirror`), which runs the
coroutine on the loop and turns what comes back into its sync form (an `AsyncSession`
into a `Session`, an `AsyncGenerateStream` into a `GenerateStream`, an async iterator
into an iterator).  Nothing is implemented twice, so the two APIs cannot drift; the
parity test (tests/test_sdk_parity.py) checks that they do not.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

# Async annotations and their sync forms, for the signatures `help()` and IDEs show.
_SYNC_NAMES = (
    ("AsyncIterator", "Iterator"),
    ("AsyncSession", "Session"),
    ("AsyncGenerateStream", "GenerateStream"),
    ("AsyncMemoryClient", "MemoryClient"),
)


class LoopThread:
    """An event loop running forever on a daemon thread; `run` blocks the caller until a coroutine is done.

    One per sync client: grpc.aio channels belong to the loop they were made on, and a
    private loop works the same whether or not the caller has a loop of its own running.
    """

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="memoryd-sdk-loop", daemon=True)
        self._thread.start()
        self.closed = False

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the loop and wait for it; interrupting the wait (Ctrl-C) cancels it, on the server too."""
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("a sync memoryd call from inside the SDK's own loop would wait for itself")
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result()
        except BaseException:
            fut.cancel()
            raise

    def call(self, fn: Callable[[], T]) -> T:
        """Run a plain function on the loop (for what must not race the loop, e.g. cancelling a call)."""

        async def once() -> T:
            return fn()

        return self.run(once())

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(RuntimeError):
            self.run(self.loop.shutdown_default_executor())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self.loop.close()


def iterate(runner: LoopThread, ait: AsyncIterator[T]) -> Iterator[T]:
    """A blocking iterator over an async one, advanced one item per `next()` (so paging stays lazy)."""

    async def step() -> tuple[bool, T | None]:
        try:
            return True, await anext(ait)
        except StopAsyncIteration:
            return False, None

    while True:
        more, item = runner.run(step())
        if not more:
            return
        yield item  # type: ignore[misc]


def sync_signature(fn: Callable[..., Any]) -> inspect.Signature:
    """The async method's signature, with async return types named by their sync forms."""
    sig = inspect.signature(fn)

    def rename(annotation: Any) -> Any:
        if not isinstance(annotation, str):
            return annotation
        for a, s in _SYNC_NAMES:
            annotation = annotation.replace(a, s)
        return annotation

    params = [p.replace(annotation=rename(p.annotation)) for p in sig.parameters.values()]
    return sig.replace(parameters=params, return_annotation=rename(sig.return_annotation))


def _twin(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def method(self: Any, *args: Any, **kwargs: Any) -> Any:
        return self._sync(getattr(self._core, name)(*args, **kwargs))

    method.__name__ = name
    method.__doc__ = fn.__doc__
    method.__signature__ = sync_signature(fn)  # type: ignore[attr-defined]
    method.mirrors = fn  # type: ignore[attr-defined]
    return method


def mirror(core_cls: type) -> Callable[[type[T]], type[T]]:
    """Give the decorated class a blocking twin of every public method of `core_cls` it does not define itself.

    The class must provide `_core` (its async twin) and `_sync(result)` (run a coroutine,
    convert what comes back).
    """

    def decorate(cls: type[T]) -> type[T]:
        for name, fn in vars(core_cls).items():
            if name.startswith("_") or name in vars(cls) or not inspect.isfunction(fn):
                continue
            twin = _twin(name, fn)
            twin.__qualname__ = f"{cls.__qualname__}.{name}"
            setattr(cls, name, twin)
        return cls

    return decorate


def public_methods(cls: type) -> dict[str, inspect.Signature]:
    """Public methods and their signatures (the parity test compares the sync and the async ones)."""
    return {
        name: inspect.signature(getattr(cls, name))
        for name in dir(cls)
        if not name.startswith("_") and inspect.isfunction(inspect.getattr_static(cls, name))
    }
