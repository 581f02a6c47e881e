"""The store's handle: a Redis (or Redis Cluster) client, the layout's keys, the settings every step
needs, and the one way scripts are run (with WAIT for replicas when asked).

The steps themselves are plain functions that take this handle, one module per job:
memoryd/store/heads.py (sessions' heads and the tenant index), tokenlog.py (the token log),
snapshots.py (snapshots and the journal of cross-slot operations), leases.py (leases, handovers and
the daemons' addresses). The keys are in layout.py, the Lua in scripts.py.

Durability: with `wait_replicas` > 0 every write script is followed, on the same connection, by
`WAIT wait_replicas timeout`, and fails (a retryable TimeoutError) unless that many replicas have
it: an acknowledged append survives a failover.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript
from redis.exceptions import AskError, MovedError, NoScriptError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from memoryd.store.layout import LAYOUT_VERSION, Layout
from memoryd.store.scripts import SCRIPTS

WINDOW_SECONDS = 30.0
"""A cross-slot operation's head write is refused this long after its journal stamp."""
GRACE_SECONDS = 300.0
"""The sweep finishes journal entries this old (window + the clock skew tolerated between Redis masters)."""


class ReplicaTimeout(RedisTimeoutError):
    """A write reached fewer replicas than `wait_replicas` within the timeout (retryable: it is
    on the master, and a retry with the same append_id finds it and waits again)."""


class Store:
    """One Redis or RedisCluster client with the layout's keys and the store's settings.

    Single-slot steps are one Lua call each (`write`, `call`); operations on snapshots are the
    short sequences of single-slot steps described in memoryd/store/snapshots.py.
    """

    def __init__(
        self,
        redis: aioredis.Redis | RedisCluster,
        prefix: str = "md",
        ttl_seconds: int = 0,
        chunk_bytes: int = 4 << 20,
        wait_replicas: int = 0,
        wait_timeout: float = 1.0,
        window_seconds: float = WINDOW_SECONDS,
        grace_seconds: float = GRACE_SECONDS,
    ):
        if grace_seconds <= window_seconds:
            raise ValueError(f"grace_seconds ({grace_seconds}) must exceed window_seconds ({window_seconds})")
        self.r = redis
        self.cluster = isinstance(redis, RedisCluster)
        self.keys = Layout(prefix)
        self.ttl = ttl_seconds
        self.chunk_bytes = chunk_bytes
        self.wait_replicas = wait_replicas
        self.wait_ms = int(wait_timeout * 1000)
        self.window_ms = int(window_seconds * 1000)
        self.grace_ms = int(grace_seconds * 1000)
        self._s = {name: redis.register_script(src) for name, src in SCRIPTS.items()}

    @property
    def prefix(self) -> str:
        return self.keys.prefix

    async def ping(self) -> bool:
        return bool(await self.r.ping())

    async def claim_layout(self) -> str:
        """The layout version this Redis holds (as stored), after storing this code's LAYOUT_VERSION if it held
        none: the first daemon to start on a Redis claims it; one of another layout must not write there."""
        await self.r.set(self.keys.version, LAYOUT_VERSION, nx=True)
        raw = await self.r.get(self.keys.version)
        return raw.decode() if raw is not None else ""

    async def bytes_used(self, pattern: str) -> int:
        """Sum of MEMORY USAGE over keys matching `pattern` (for tests and the benchmark)."""
        total = 0
        async for key in self.r.scan_iter(match=pattern, count=1000):
            total += int(await self.r.memory_usage(key) or 0)
        return total

    # -- running scripts -----------------------------------------------------------------------

    async def call(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run a read-only script (no WAIT)."""
        return await self._s[name](keys=list(keys), args=list(args))

    async def write(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run a writing script; with wait_replicas, WAIT for the replicas on the same connection."""
        if not self.wait_replicas:
            return await self.call(name, keys, args)
        return await self.write_script(self._s[name], keys, args)

    async def write_script(self, script: AsyncScript, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run a registered writing script (this store's or another module's, e.g. the recall log's) and
        WAIT for `wait_replicas` on the same connection, so what a failover keeps is what was acknowledged."""
        if not self.wait_replicas:
            return await script(keys=list(keys), args=list(args))
        for cmd in (("EVALSHA", script.sha), ("EVAL", script.script)):
            res, waited = await self._eval_and_wait(cmd, keys, args)
            if isinstance(res, NoScriptError):
                continue
            if isinstance(res, (MovedError, AskError, TryAgainError)):
                await self._refresh_topology()
                raise RedisConnectionError(f"the slot of {keys[0]} moved ({res}); retry")
            if isinstance(res, Exception):
                raise res
            if isinstance(waited, Exception):
                raise waited
            if int(waited) < self.wait_replicas:
                raise ReplicaTimeout(
                    f"the write to {keys[0]} reached {waited} of {self.wait_replicas} replicas within "
                    f"{self.wait_ms} ms (redis_wait_replicas / redis_wait_timeout); retry"
                )
            return res
        raise NoScriptError(f"Redis refused a script ({script.sha})")

    async def unjournal(self, *entries: str) -> None:
        """Remove finished operations from the journal: the one write that is not a script (no WAIT:
        an entry that stays only makes the sweep look at it once more)."""
        if entries:
            await self.r.zrem(self.keys.journal, *entries)

    async def _eval_and_wait(self, cmd: tuple[str, Any], keys: Sequence[str], args: Sequence[Any]) -> list[Any]:
        """The script and WAIT in one pipeline: one connection, so WAIT covers that write."""
        pipe = self.r.pipeline(transaction=False)
        pipe.execute_command(*cmd, len(keys), *keys, *args)
        if self.cluster:
            await self.r.initialize()  # the slot map (a no-op once the client has it)
            node = self.r.get_node_from_key(keys[0])
            pipe.execute_command("WAIT", self.wait_replicas, self.wait_ms, target_nodes=node)
            return await pipe.execute(raise_on_error=False, allow_redirections=False)
        pipe.execute_command("WAIT", self.wait_replicas, self.wait_ms)
        return await pipe.execute(raise_on_error=False)

    async def _refresh_topology(self) -> None:
        if self.cluster:
            await self.r.nodes_manager.initialize()

    async def call_many(self, name: str, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
        """One script on many keys in one pipeline (per node on a cluster), no WAIT."""
        script = self._s[name]
        results: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        for cmd in (("EVALSHA", script.sha), ("EVAL", script.script)):
            pipe = self.r.pipeline(transaction=False)
            for i in todo:
                keys, args = calls[i]
                pipe.execute_command(*cmd, len(keys), *keys, *args)
            out = await pipe.execute(raise_on_error=False)
            for i, res in zip(todo, out, strict=True):
                results[i] = res
            todo = [i for i in todo if isinstance(results[i], NoScriptError)]
            if not todo:
                break
        for res in results:
            if isinstance(res, Exception):
                raise res
        return results
