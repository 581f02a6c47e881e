"""Several daemons: each session's calls go to the daemon that holds it.

Given several addresses (`"a:50051,b:50051"`, a list, or one name that resolves to
several), the client keeps one channel per daemon and a table session -> daemon:

- a session it has not seen goes to a daemon picked by rendezvous hashing of its id,
  so every client (and every process) sends a given session to the same daemon;
- a daemon that does not hold the session forwards the call to the holder and names
  it in the trailing metadata `memoryd-holder` (like Redis Cluster's MOVED): the
  session's next calls go there directly;
- a daemon that cannot be reached (UNAVAILABLE with no hint) is avoided for a few
  seconds, so the retry goes to another daemon, which serves the session once the
  dead holder's lease has run out.

Every call that names a session also sends it as request metadata `memoryd-session-id`,
so a proxy with a hash-based load balancer (Envoy's ring hash) keeps a session on one
daemon.  With a single address that resolves to a single host (one daemon, or a
proxy), hints are not followed: the proxy stays in charge.
"""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import socket
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from typing import Any

import grpc

from memoryd_sdk.connection import TLS, aio_channel
from memoryd_sdk.proto import memoryd_pb2_grpc as pb_grpc

HOLDER_KEY = "memoryd-holder"
SESSION_KEY = "memoryd-session-id"
AVOID_SECONDS = 3.0
"""How long a daemon that could not be reached is passed over."""
MAX_ROUTES = 100_000
_UNARY_STREAM = {"Generate", "ExportSession"}
_RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}

Targets = str | Sequence[str]
"""`host:port`, several separated by commas, or a list of them."""


def split_targets(target: Targets) -> list[str]:
    items = target.split(",") if isinstance(target, str) else list(target)
    out = [t.strip() for t in items if t.strip()]
    if not out:
        raise ValueError("give at least one daemon address (host:port)")
    return out


def rendezvous(session_id: str, addresses: Sequence[str]) -> str:
    """The address with the highest hash of (address, session): stable, and only the sessions of an
    address that goes away move."""
    return max(addresses, key=lambda a: hashlib.blake2b(f"{a}\0{session_id}".encode(), digest_size=8).digest())


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False


class Routes:
    """Channels to the daemons and the session -> daemon table (one per client)."""

    def __init__(self, target: Targets, tls: TLS, options: tuple[tuple[str, Any], ...]) -> None:
        self.configured = split_targets(target)
        self._tls, self._options = tls, options
        self.addresses: list[str] = list(self.configured)
        self._resolved = len(self.configured) > 1 or _is_ip(self.configured[0].rpartition(":")[0])
        self._stubs: dict[str, tuple[grpc.aio.Channel, pb_grpc.MemoryServiceStub]] = {}
        self._routes: OrderedDict[str, str] = OrderedDict()
        self._avoid: dict[str, float] = {}
        self._name_override: str | None = None

    @property
    def routing(self) -> bool:
        """Whether sessions are routed (several daemons) or every call goes to the one target."""
        return len(self.addresses) > 1

    async def _resolve(self) -> None:
        """One name that resolves to several hosts is several daemons (resolved once, on first use)."""
        if self._resolved:
            return
        self._resolved = True
        host, _, port = self.configured[0].rpartition(":")
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
        except (OSError, ValueError):
            return  # leave it to grpc's own resolver (and its error message)
        ips = sorted({info[4][0] for info in infos})
        if len(ips) > 1:
            self.addresses = [f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}" for ip in ips]
            self._name_override = host

    def stub(self, address: str) -> pb_grpc.MemoryServiceStub:
        got = self._stubs.get(address)
        if got is None:
            opts = self._options
            if self._name_override and address not in self.configured:  # TLS checks the name, not the IP
                opts = (*opts, ("grpc.ssl_target_name_override", self._name_override))
                opts = (*opts, ("grpc.default_authority", self._name_override))
            channel = aio_channel(address, self._tls, opts)
            got = self._stubs[address] = (channel, pb_grpc.MemoryServiceStub(channel))
        return got[1]

    async def pick(self, session_id: str) -> str:
        """The daemon to send this session's next call to."""
        await self._resolve()
        return self.current(session_id)

    def current(self, session_id: str) -> str:
        """`pick` without resolving names first (where the session's calls go now)."""
        if not self.routing:
            return self.addresses[0]
        known = self._routes.get(session_id) if session_id else None
        now = time.monotonic()
        if known is not None and self._avoid.get(known, 0.0) <= now:
            self._routes.move_to_end(session_id)
            return known
        live = [a for a in self.addresses if self._avoid.get(a, 0.0) <= now] or self.addresses
        return rendezvous(session_id, live) if session_id else live[int(now * 1000) % len(live)]

    def learn(self, session_id: str, address: str, trailers: Any, code: grpc.StatusCode | None) -> None:
        """After a call to `address`: follow its hint, or avoid it if it could not be reached."""
        if not self.routing or not session_id:
            return
        hint = dict(trailers or ()).get(HOLDER_KEY)
        if hint and hint != address and self._avoid.get(hint, 0.0) <= time.monotonic():
            if hint not in self.addresses:
                self.addresses.append(hint)  # a daemon started after this client was made
            self._routes[session_id] = hint
            self._routes.move_to_end(session_id)
            while len(self._routes) > MAX_ROUTES:
                self._routes.popitem(last=False)
        elif code in _RETRYABLE and not hint:
            self._avoid[address] = time.monotonic() + AVOID_SECONDS
            if self._routes.get(session_id) == address:
                del self._routes[session_id]

    async def close(self) -> None:
        for channel, _ in self._stubs.values():
            await channel.close()
        self._stubs.clear()


def _with_session(metadata: Any, session_id: str) -> tuple[tuple[str, str], ...]:
    """The call's metadata plus the session id, when it can be a header value at all (printable ASCII).

    An id with a newline or a NUL is not a legal HTTP/2 header value: sent as one, the call fails
    inside gRPC's C core before reaching the server. Left out, the request still carries the id,
    and the server answers INVALID_ARGUMENT naming the field.
    """
    md = tuple(metadata or ())
    if not session_id or not session_id.isascii() or not session_id.isprintable():
        return md
    return (*md, (SESSION_KEY, session_id))


class RoutedStub:
    """Quacks like `MemoryServiceStub`: `stub.Append(request, timeout=..., metadata=...)`, each call sent
    to the daemon of its session (`session=` names it where the request cannot: a request stream)."""

    def __init__(self, routes: Routes) -> None:
        self._routes = routes

    def __getattr__(self, method: str) -> Any:
        if method.startswith("_"):
            raise AttributeError(method)
        if method in _UNARY_STREAM:
            return lambda request, session=None, **kw: _StreamCall(self._routes, method, request, session, kw)
        return lambda request, session=None, **kw: self._unary(method, request, session, kw)

    async def _unary(self, method: str, request: Any, session: str | None, kw: dict[str, Any]) -> Any:
        sid = session if session is not None else getattr(request, "session_id", "")
        address = await self._routes.pick(sid)
        kw["metadata"] = _with_session(kw.get("metadata"), sid)
        call = getattr(self._routes.stub(address), method)(request, **kw)
        try:
            response = await call
        except grpc.aio.AioRpcError as e:
            self._routes.learn(sid, address, e.trailing_metadata(), e.code())
            raise
        self._routes.learn(sid, address, await call.trailing_metadata(), None)
        return response


class _StreamCall:
    """A server-streaming call on its session's daemon: iterate it, `cancel()` it, ask `cancelled()`."""

    def __init__(self, routes: Routes, method: str, request: Any, session: str | None, kw: dict[str, Any]) -> None:
        self._routes, self._method, self._request, self._kw = routes, method, request, kw
        self._sid = session if session is not None else getattr(request, "session_id", "")
        self._call: Any = None
        self._cancelled = False

    async def _items(self) -> AsyncIterator[Any]:
        address = await self._routes.pick(self._sid)
        self._kw["metadata"] = _with_session(self._kw.get("metadata"), self._sid)
        self._call = getattr(self._routes.stub(address), self._method)(self._request, **self._kw)
        if self._cancelled:
            self._call.cancel()
        try:
            async for item in self._call:
                yield item
        except grpc.aio.AioRpcError as e:
            self._routes.learn(self._sid, address, e.trailing_metadata(), e.code())
            raise
        self._routes.learn(self._sid, address, await self._call.trailing_metadata(), None)

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._items()

    def cancel(self) -> bool:
        self._cancelled = True
        return self._call.cancel() if self._call is not None else True

    def cancelled(self) -> bool:
        return self._call.cancelled() if self._call is not None else self._cancelled
