"""Async iteration over whatever a caller hands the SDK (a list, a generator, an async generator)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Iterable
from typing import TypeVar

T = TypeVar("T")

_END = object()


async def aiter_of(items: Iterable[T] | AsyncIterable[T]) -> AsyncIterator[T]:
    """An async iterator of a sync or async iterable; a sync one is advanced in a worker thread.

    Why a thread: a sync iterable may block (a tool's output, a file on a slow disk, or a
    generator that itself calls the sync client, which would deadlock on the loop it waits for).
    """
    if isinstance(items, AsyncIterable):
        async for x in items:
            yield x
        return
    it = iter(items)
    while (x := await asyncio.to_thread(next, it, _END)) is not _END:
        yield x
