"""Where a session is served, as the session layer sees it: here, or `Moved` to its holder.

A session is served by the daemon holding its lease. A call that finds the lease held
elsewhere raises `Moved` with the holder's instance id and the address it published
(memoryd/store/leases.py); the gRPC edge (memoryd/api/forward.py) forwards the call there.
Nothing here speaks gRPC.
"""

from __future__ import annotations

from memoryd.errors import Unavailable

HOLDER_KEY = "memoryd-holder"
"""Trailing metadata: the address of the daemon that holds the session."""


class Moved(Unavailable):
    """This daemon does not hold the session: `holder` does, reachable at `address` (None: unknown)."""

    def __init__(self, sid: str, holder: str, address: str | None, ttl_ms: int) -> None:
        where = f" at {address}" if address else ""
        super().__init__(
            f"session {sid!r} is served by daemon {holder}{where} (its lease ends within {ttl_ms} ms unless "
            f"renewed): retry, or send the call to the address in the trailing metadata {HOLDER_KEY!r}"
        )
        self.holder, self.address = holder, address
        self.trailers = ((HOLDER_KEY, address),) if address else ()
