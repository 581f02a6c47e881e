"""Forwarding calls between daemons over gRPC: a call for a session another daemon holds goes there.

A session is served by one daemon at a time (the holder of its lease).  A call that
reaches another daemon is *forwarded* over gRPC to the holder instead of taking the
session over: the holder's per-session FIFO lock (`ordering`) then orders the calls
of every client, whichever daemon they reached, in arrival order, and the session
never ping-pongs between daemons (each handover costs a snapshot and a reload, and
under contention one side used to starve).  The answer carries the holder's address
in the trailing metadata `memoryd-holder` (like Redis Cluster's MOVED), so a client
that can (the SDK) sends the session's next calls there directly.

A session changes hands only when its holder lets go (eviction, shutdown) or dies:
while the holder is unreachable, the forwarding daemon keeps trying to take the lease
itself, so a killed daemon's sessions are served again once its lease runs out.

Forwarding is safe to retry only when nothing was sent: a call is retried here only
if the holder could not be connected to, or if the holder answered that it is not
the holder any more (it refuses before touching anything).  Anything else the holder
says (success or failure) is relayed as it is.

The session layer only says where the session is (`memoryd.sessions.routing.Moved`,
from the lease's holder and the address it published: memoryd/store/leases.py); this
module, at the gRPC edge, is the only one that opens channels to other daemons.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from memoryd_sdk.proto import memoryd_pb2_grpc as pb_grpc

from memoryd import metrics
from memoryd.errors import ServiceError, Status
from memoryd.sessions.routing import HOLDER_KEY, Moved

log = logging.getLogger("memoryd.api.forward")

FORWARDED_KEY = "memoryd-forwarded-by"
"""Request metadata on a forwarded call (the forwarding daemon's id): the receiver never forwards again."""
SESSION_KEY = "memoryd-session-id"
"""Request metadata the SDK sends, for a hash-based load balancer in front of the daemons."""

CONNECT_TIMEOUT = 0.5
"""How long a forwarding daemon waits for a connection to the holder before counting it unreachable."""
POLL = 0.2
"""Pause between tries while a session's holder is unreachable (its lease has not run out yet)."""
_HOP_HEADERS = {"user-agent", "content-type", "te", "grpc-accept-encoding", "grpc-encoding", "grpc-timeout"}


class Relayed(ServiceError):
    """What the holder answered to a forwarded call, passed on unchanged (status, message, trailers)."""

    def __init__(self, code: grpc.StatusCode, message: str, trailers: tuple[tuple[str, Any], ...]) -> None:
        super().__init__(message)
        self.code = Status[code.name]
        self.trailers = trailers


# -- addresses --------------------------------------------------------------------------------------


def advertised_address(listen: str, port: int, advertise: str | None) -> str:
    """The address other daemons and clients reach this one at: `--advertise-address`, else the
    listen host with the port actually bound (a wildcard host is replaced by this host's name)."""
    if advertise:
        return advertise
    host = listen.rpartition(":")[0]
    if host in ("0.0.0.0", "[::]", "::", ""):
        host = socket.gethostname()
    return f"{host}:{port}"


# -- forwarding -------------------------------------------------------------------------------------


def _metadata_of(context: grpc.aio.ServicerContext) -> dict[str, Any]:
    return {k: v for k, v in (context.invocation_metadata() or ())}


def _remaining(context: grpc.aio.ServicerContext) -> float | None:
    left = context.time_remaining()
    return None if left is None or left > 1e6 else max(0.0, left)


class _Replay:
    """A request stream whose first message can be read again (AppendStream: the first message
    finds out where the session is; if it is elsewhere, the whole stream goes there)."""

    def __init__(self, source: AsyncIterator[Any]) -> None:
        self.source = source
        self.head: list[Any] = []
        """The source's first message, once taken."""
        self.pulled = 0
        """How many messages were taken from the source."""

    async def _items(self) -> AsyncIterator[Any]:
        for item in self.head:
            yield item
        async for item in self.source:
            self.pulled += 1
            if not self.head:
                self.head.append(item)
            yield item

    def stream(self) -> AsyncIterator[Any]:
        return self._items()


class Router:
    """Serves a call here, or forwards it to the session's holder (see the module docstring)."""

    def __init__(self, daemon_id: str, address: str, lease_seconds: float, tls_root: bytes | None) -> None:
        self.daemon_id, self.address = daemon_id, address
        self.wait_limit = lease_seconds + 2.0
        """How long a call waits for an unreachable holder's lease to run out before giving up."""
        self._tls_root = tls_root
        self._stubs: dict[str, tuple[grpc.aio.Channel, pb_grpc.MemoryServiceStub]] = {}

    # -- channels ----------------------------------------------------------------------------

    def _stub(self, address: str) -> tuple[grpc.aio.Channel, pb_grpc.MemoryServiceStub]:
        got = self._stubs.get(address)
        if got is None:
            opts = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 1000)]
            opts += [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
            if self._tls_root is not None:
                creds = grpc.ssl_channel_credentials(root_certificates=self._tls_root)
                channel = grpc.aio.secure_channel(address, creds, opts)
            else:
                channel = grpc.aio.insecure_channel(address, opts)
            got = self._stubs[address] = (channel, pb_grpc.MemoryServiceStub(channel))
        return got

    async def close(self) -> None:
        for channel, _ in self._stubs.values():
            with contextlib.suppress(Exception):
                await channel.close()
        self._stubs.clear()

    async def _reachable(self, address: str) -> pb_grpc.MemoryServiceStub | None:
        """A stub for the holder once connected; None if it cannot be reached now (nothing sent)."""
        if address == self.address:  # a dead predecessor's lease on our own address
            return None
        channel, stub = self._stub(address)
        try:
            await asyncio.wait_for(channel.channel_ready(), CONNECT_TIMEOUT)
        except TimeoutError:
            return None
        return stub

    def _outgoing(self, context: grpc.aio.ServicerContext) -> tuple[tuple[str, Any], ...]:
        md = [(k, v) for k, v in _metadata_of(context).items() if not k.startswith(":") and k not in _HOP_HEADERS]
        return (*md, (FORWARDED_KEY, self.daemon_id))

    def _send(self, stub: Any, method: str, payload: Any, context: grpc.aio.ServicerContext) -> Any:
        metrics.FORWARDED.labels(method).inc()
        return getattr(stub, method)(payload, metadata=self._outgoing(context), timeout=_remaining(context))

    def forwarded(self, context: grpc.aio.ServicerContext) -> bool:
        return FORWARDED_KEY in _metadata_of(context)

    @staticmethod
    def _refused_as_moved(e: grpc.aio.AioRpcError) -> bool:
        """The holder said it is not the holder (it changed nothing): routing may try again."""
        trailers = dict(e.trailing_metadata() or ())
        return e.code() == grpc.StatusCode.UNAVAILABLE and HOLDER_KEY in trailers

    @staticmethod
    def _relayed(e: grpc.aio.AioRpcError, address: str) -> Relayed:
        trailers = tuple((k, v) for k, v in (e.trailing_metadata() or ()) if k != HOLDER_KEY)
        return Relayed(e.code(), e.details() or "", (*trailers, (HOLDER_KEY, address)))

    # -- unary responses ---------------------------------------------------------------------

    async def unary(
        self,
        method: str,
        request: Any,
        context: grpc.aio.ServicerContext,
        local: Callable[[Any], Awaitable[Any]],
        moved: Moved | None = None,
    ) -> Any:
        """`local(request)` here, or the holder's answer to the same call. `moved`: the call already ran
        here once and found the session held elsewhere (the edge runs a call here first, and comes here
        only then; a client stream comes here first)."""
        if self.forwarded(context):
            if moved is not None:
                raise moved
            return await local(request)
        streamed = hasattr(request, "__aiter__")
        replay = _Replay(request) if streamed else None
        deadline = time.monotonic() + min(_remaining(context) or self.wait_limit, self.wait_limit)
        while True:
            if moved is None:
                try:
                    return await local(replay.stream() if replay is not None else request)
                except Moved as m:
                    moved = m
            if replay is not None and replay.pulled > 1:
                raise moved  # messages before this one were applied here: the caller retries the rest
            if moved.address:
                stub = await self._reachable(moved.address)
                if stub is not None:
                    call = self._send(stub, method, replay.stream() if replay is not None else request, context)
                    try:
                        response = await call
                    except grpc.aio.AioRpcError as e:
                        if not self._refused_as_moved(e) or replay is not None:
                            raise self._relayed(e, moved.address) from None
                    else:
                        context.set_trailing_metadata(((HOLDER_KEY, moved.address),))
                        return response
            if time.monotonic() >= deadline:
                raise moved
            moved = None
            await asyncio.sleep(POLL)

    # -- streamed responses ------------------------------------------------------------------

    async def stream(
        self,
        method: str,
        request: Any,
        context: grpc.aio.ServicerContext,
        local: Callable[[Any], AsyncIterator[Any]],
        moved: Moved | None = None,
    ) -> AsyncIterator[Any]:
        """`local(request)`'s messages here, or the holder's for the same call (`moved`: as in `unary`)."""
        if self.forwarded(context):
            if moved is not None:
                raise moved
            async for item in local(request):
                yield item
            return
        deadline = time.monotonic() + min(_remaining(context) or self.wait_limit, self.wait_limit)
        while True:
            if moved is None:
                items = local(request)
                try:
                    first = await anext(items)
                except StopAsyncIteration:
                    return
                except Moved as m:
                    moved = m
                else:
                    yield first
                    async for item in items:
                        yield item
                    return
            if moved.address:
                stub = await self._reachable(moved.address)
                if stub is not None:
                    call = self._send(stub, method, request, context)
                    got = False
                    try:
                        async for item in call:
                            got = True
                            yield item
                    except grpc.aio.AioRpcError as e:
                        if got or not self._refused_as_moved(e):
                            raise self._relayed(e, moved.address) from None
                    else:
                        context.set_trailing_metadata(((HOLDER_KEY, moved.address),))
                        return
            if time.monotonic() >= deadline:
                raise moved
            moved = None
            await asyncio.sleep(POLL)
