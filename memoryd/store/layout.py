"""Where everything lives in Redis: the key builders, and the layout's version.

The layout (every key, its type, what it holds, which keys share a hash slot) is
documented in one place: docs/service.md, section "The Redis layout". Each builder
below names the key it makes as written there; a change to any of them is a change
of LAYOUT_VERSION and of that section.
"""

from __future__ import annotations

from dataclasses import dataclass

LAYOUT_VERSION = 1
"""The version of the key layout in docs/service.md ("The Redis layout"). Bump it with any change to a key's
name, type or contents, so that daemons of two layouts are never pointed at the same keys unknowingly."""


@dataclass(frozen=True)
class Layout:
    """The key builders under one prefix (`md` unless configured). `{...}` is the hash tag: what shares a
    tag shares a Redis Cluster slot, so a Lua script may touch it in one call."""

    prefix: str = "md"

    # -- a session's slot: {tenant/session} --------------------------------------------------------

    def session(self, tenant: str, sid: str, what: str) -> str:
        """`md:s:{t/s}:h` (head), `:log` (token log), `:ids` (append ids), `:lease`, `:want`."""
        return f"{self.prefix}:s:{{{tenant}/{sid}}}:{what}"

    def head(self, tenant: str, sid: str) -> str:
        return self.session(tenant, sid, "h")

    def log(self, tenant: str, sid: str) -> str:
        return self.session(tenant, sid, "log")

    def ids(self, tenant: str, sid: str) -> str:
        return self.session(tenant, sid, "ids")

    def lease(self, tenant: str, sid: str) -> str:
        return self.session(tenant, sid, "lease")

    def want(self, tenant: str, sid: str) -> str:
        return self.session(tenant, sid, "want")

    def session_keys(self, tenant: str, sid: str) -> list[str]:
        """Head, log, ids: what every head-writing script is given."""
        return [self.head(tenant, sid), self.log(tenant, sid), self.ids(tenant, sid)]

    # -- a tenant's slot: {tenant} -------------------------------------------------------------------

    def index(self, tenant: str) -> str:
        """`md:t:{tenant}:idx`, the tenant's session ids."""
        return f"{self.prefix}:t:{{{tenant}}}:idx"

    def index_keys(self, tenant: str) -> list[str]:
        """The index and `md:t:{tenant}:stamps` (the stamp of the create that indexed each id)."""
        return [self.index(tenant), f"{self.prefix}:t:{{{tenant}}}:stamps"]

    def index_pattern(self) -> str:
        """Every tenant's index (SCAN pattern)."""
        return f"{self.prefix}:t:*:idx"

    # -- a snapshot's slot: {snapshot id} ------------------------------------------------------------

    def snap(self, snap: str, what: str) -> str:
        """`md:snap:{id}:m` (manifest), `:refs` (references), `:c:{i}` (chunk i)."""
        return f"{self.prefix}:snap:{{{snap}}}:{what}"

    def snap_keys(self, snap: str, n: int) -> list[str]:
        """Manifest, refs, and the snapshot's n chunks."""
        return [self.snap(snap, "m"), self.snap(snap, "refs")] + [self.snap(snap, f"c:{i}") for i in range(n)]

    # -- their own slots -----------------------------------------------------------------------------

    @property
    def version(self) -> str:
        """`md:layout`, the layout version this Redis holds (written by the first daemon to start on it)."""
        return f"{self.prefix}:layout"

    @property
    def journal(self) -> str:
        """`md:gc`, the journal of cross-slot operations in flight."""
        return f"{self.prefix}:gc"

    def daemon_address(self, daemon_id: str) -> str:
        """`md:daemon:{id}:addr`, the address a daemon is reached at (memoryd/api/forward.py routes calls there)."""
        return f"{self.prefix}:daemon:{daemon_id}:addr"
