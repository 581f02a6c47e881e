"""`MemoryClient`: the sync client, a thin layer over `AsyncMemoryClient` (see `blocking.py`).

Every call is the async client's coroutine, run on this client's private event loop
thread; deadlines, retries, typed errors, paging and export/import streaming are
documented (and implemented, once) in `aio.py`.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator
from typing import Any

from memoryd_sdk.aio import DEFAULT_TARGET, AsyncMemoryClient
from memoryd_sdk.aio_generation import AsyncGenerateStream
from memoryd_sdk.aio_session import AsyncSession
from memoryd_sdk.blocking import LoopThread, iterate, mirror
from memoryd_sdk.chat import ChatTemplate
from memoryd_sdk.connection import TLS
from memoryd_sdk.generation import GenerateStream
from memoryd_sdk.requests import APPEND_TOKENS_PER_SECOND
from memoryd_sdk.retry import RetryPolicy
from memoryd_sdk.routing import Targets
from memoryd_sdk.session import Session

__all__ = ["DEFAULT_TARGET", "MemoryClient"]


def _through(name: str) -> property:
    """An attribute of the async client, read and written through."""
    return property(lambda self: getattr(self._core, name), lambda self, v: setattr(self._core, name, v))


@mirror(AsyncMemoryClient)
class MemoryClient:
    """A connection to memoryd (one shared channel per daemon); thread-safe, use one per process and close it.

    Arguments as `AsyncMemoryClient`: `target` is `host:port` or several daemons (routed per
    session); `token` the bearer token when the daemon has auth on; `tls` see `connection.TLS`;
    `timeout` / `generate_timeout` the per-attempt deadlines of unary calls and of generations
    and exports/imports (seconds);
    `template` the chat format of `add_message` / `chat` (None: the model's own, else plain).
    """

    def __init__(
        self,
        target: Targets = DEFAULT_TARGET,
        token: str | None = None,
        tls: TLS = None,
        *,
        timeout: float = 30.0,
        generate_timeout: float = 600.0,
        append_rate: float = APPEND_TOKENS_PER_SECOND,
        retry: RetryPolicy | None = None,
        template: ChatTemplate | None = None,
        options: tuple[tuple[str, Any], ...] = (),
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self._runner = LoopThread()

        async def make() -> AsyncMemoryClient:  # the channel belongs to the loop it is made on
            return AsyncMemoryClient(
                target,
                token,
                tls,
                timeout=timeout,
                generate_timeout=generate_timeout,
                append_rate=append_rate,
                retry=retry,
                template=template,
                options=options,
                metadata=metadata,
            )

        self._core = self._runner.run(make())

    target = _through("target")
    timeout = _through("timeout")
    generate_timeout = _through("generate_timeout")
    append_rate = _through("append_rate")
    retry = _through("retry")
    template = _through("template")
    _stub = _through("_stub")

    def _sync(self, out: Any, owner: Session | None = None) -> Any:
        """Run a coroutine on the loop, then give what it returned its sync form."""
        if inspect.iscoroutine(out):
            out = self._runner.run(out)
        if isinstance(out, AsyncSession):
            return owner if owner is not None and out is owner._core else Session._of(self, out)
        if isinstance(out, AsyncGenerateStream):
            return GenerateStream(self._runner, out)
        if isinstance(out, AsyncIterator):
            return iterate(self._runner, out)
        return out

    def close(self) -> None:
        """Close the channel (in-flight calls are cancelled) and stop the loop thread."""
        if not self._runner.closed:
            self._runner.run(self._core.close())
            self._runner.close()

    def __enter__(self) -> MemoryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
