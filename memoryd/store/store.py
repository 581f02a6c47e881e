"""Bytes at the bottom: sessions, token logs, snapshots and leases in Redis or a Redis Cluster.

Layout (prefix `md`; `{...}` is the hash tag, so what shares a tag shares a cluster slot):

    md:s:{t/s}:h       HASH   head: created, used, meta (JSON), digest, offset, snap (snapshot id or ""),
                              snap_ref (this head's reference token on snap), snap_off, gen, fence,
                              ix (the index stamp of the create that made it)
    md:s:{t/s}:log     LIST   token log after the head's snapshot, one JSON entry
                              per piece the model read: {"o": start offset, "t": [ids]}
    md:s:{t/s}:ids     HASH   append_id -> "start,end,tokens-hash[,record]" (dedup of retries;
                              a committed generation's record is JSON: its prompt's hash,
                              output tokens, text and finish reason, so a retry gets them back)
    md:s:{t/s}:lease   STRING the daemon serving the session (PX lease_seconds)
    md:s:{t/s}:want    STRING another daemon asks for the session (it is written out and released)
    md:t:{tenant}:idx  ZSET   the tenant's session ids (all scores 0: paged by ZRANGEBYLEX)
    md:t:{tenant}:stamps HASH session id -> the ms stamp of the create that indexed it
    md:snap:{id}:m     STRING snapshot manifest (JSON: size, sha256, n chunks, chunk hashes, ...)
    md:snap:{id}:refs  HASH   who keeps the snapshot alive: ref token -> "tenant/session" of the head
                              holding it, and "w" -> stamp while its writer has not published it yet
    md:snap:{id}:c:{i} STRING chunk i of the safetensors bytes
    md:gc              ZSET   the journal: one JSON member per cross-slot operation in flight
                              ({"s": snapshot, "r": ref token, "t"/"i": the holder}), scored by
                              the ms stamp Redis gave it; what a crash leaves here, the sweep finishes

Every Lua script names every key it touches in KEYS, and all of a script's keys share a tag:
a session's keys `{t/s}`, a snapshot's keys `{id}`, a tenant's index, the journal. Nothing
is multi-slot, so the same code runs on one Redis and on a Redis Cluster.

Why this shape:
- Snapshots are immutable and written before anything points at them; a Lua
  compare-and-set on the head's `gen` publishes one, so a reader sees either the
  old snapshot or the whole new one, never half of one.
- Every head write checks the caller's fencing token (`fence`, bumped by each
  lease acquisition), so a daemon that lost its lease can no longer write.
- The log records each piece exactly as the model read it, so recovery (newest
  snapshot + replay of the log) is bit for bit the state that was acknowledged.
- A fork copies the head and the log tail after the snapshot (bounded by the
  snapshot interval, never by the session's length) and adds one reference to the
  snapshot: no weights are copied.

Snapshot references across slots (why a crash at any point is safe):
- Invariant: a head that points at snapshot S with token k has k in S's `refs`.
  A snapshot is freed (all its keys deleted, in one script in its own slot) only
  when `refs` is empty, so a snapshot that a head points at is never freed.
- A reference is added before the head points at it: (1) journal entry, stamped
  by Redis's clock; (2) `HSET refs k` in S's slot, refused if S is gone; (3) the
  head write in the session's slot, which records k and is refused once the stamp
  is older than `window` seconds; (4) journal entry removed.
- A reference is dropped after the head stops pointing: (1) journal entry; (2) the
  head write (compare-and-set on the token it read, refused after `window`);
  (3) `HDEL refs k`, freeing S with the last one; (4) journal entry removed.
- A snapshot is born pinned: journal entry, then manifest + pin `w` in one script,
  then chunks, each written only while the pin is there. Publishing adds the
  head's reference first and removes the pin after; a failed publish drops it.
- The sweep takes journal entries older than `grace` (> window + clock skew
  between Redis masters): by then the head write of that operation has either
  happened or can never happen, so "does the head hold k?" has a final answer. If
  it does not, the sweep drops k (freeing S if it was the last); a pin entry drops
  the pin. Every step is idempotent (HSET/HDEL of unique tokens, DEL, ZREM), so a
  crash of the sweep itself is finished by the next one. An orphan chunk of a
  crashed write is therefore gone `grace` seconds later, not after the TTL.
- With `ttl_seconds`, keys also expire: a head that expires takes no step, so its
  snapshot (whose TTL its users refresh) lives until its own TTL runs out.

Durability: with `wait_replicas` > 0 every write script is followed, on the same
connection, by `WAIT wait_replicas timeout`, and fails (a retryable TimeoutError)
unless that many replicas have it: an acknowledged append survives a failover.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import AskError, MovedError, NoScriptError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from memoryd.errors import DataLoss
from memoryd.store.redis_client import UNAVAILABLE_ERRORS

SNAPSHOT_FORMAT = "memoryd-session-state/1"
WINDOW_SECONDS = 30.0
"""A cross-slot operation's head write is refused this long after its journal stamp."""
GRACE_SECONDS = 300.0
"""The sweep finishes journal entries this old (window + the clock skew tolerated between Redis masters)."""
PIN = "w"
"""The writer's pin in a snapshot's refs: it keeps an unpublished snapshot alive."""

_NOW = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function late(stamp, window)
  if stamp == '' then return false end
  return now_ms() - tonumber(stamp) > tonumber(window)
end
"""

# -- the journal and the tenant index (each its own slot) ----------------------------------------

# KEYS: gc.  ARGV: members...  Returns the stamp.
_JOURNAL = (
    _NOW
    + """
local now = now_ms()
for i = 1, #ARGV do redis.call('ZADD', KEYS[1], now, ARGV[i]) end
return now
"""
)

# KEYS: gc.  ARGV: grace_ms, limit.  The entries older than the grace period.
_JOURNAL_OLD = (
    _NOW
    + """
return redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now_ms() - tonumber(ARGV[1]), 'LIMIT', 0, tonumber(ARGV[2]))
"""
)

# KEYS: idx, stamps.  ARGV: sid, max_sessions.  {-2} at the limit, else {1, stamp, previous stamp or ''}.
# The stamp is refreshed even for an id already there, so an in-flight create is never
# taken for a crashed one (see _FORGET); _RESTORE puts the previous one back if the id was taken.
# (The index's scores stay 0: listing pages by ZRANGEBYLEX, which needs equal scores.)
_RESERVE = (
    _NOW
    + """
local there = redis.call('ZSCORE', KEYS[1], ARGV[1])
local maxn = tonumber(ARGV[2])
if maxn > 0 and not there and redis.call('ZCARD', KEYS[1]) >= maxn then return {-2} end
local prev = redis.call('HGET', KEYS[2], ARGV[1])
local now = now_ms()
redis.call('ZADD', KEYS[1], 0, ARGV[1])
redis.call('HSET', KEYS[2], ARGV[1], now)
return {1, now, prev or ''}
"""
)

# KEYS: idx, stamps.  ARGV: sid, our stamp, previous stamp ('' = none)
_RESTORE = """
if redis.call('HGET', KEYS[2], ARGV[1]) ~= ARGV[2] or ARGV[3] == '' then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[3])
return 1
"""

# KEYS: idx, stamps.  ARGV: sid, exact stamp ('' = any older than grace_ms), grace_ms.
_FORGET = (
    _NOW
    + """
local s = tonumber(redis.call('HGET', KEYS[2], ARGV[1]) or '0')
if ARGV[2] ~= '' then
  if s ~= tonumber(ARGV[2]) then return 0 end
elseif s > now_ms() - tonumber(ARGV[3]) then
  return 0
end
redis.call('HDEL', KEYS[2], ARGV[1])
return redis.call('ZREM', KEYS[1], ARGV[1])
"""
)

# -- a snapshot's slot -------------------------------------------------------------------------

# KEYS: m, refs.  ARGV: manifest, ttl, stamp
_SNAP_BEGIN = """
redis.call('SET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[2], 'w', ARGV[3])
local ttl = tonumber(ARGV[2])
if ttl > 0 then redis.call('EXPIRE', KEYS[1], ttl); redis.call('EXPIRE', KEYS[2], ttl) end
return 1
"""

# KEYS: refs, chunk.  ARGV: bytes, ttl.  0 if the pin is gone (the sweep took the snapshot).
_SNAP_CHUNK = """
if redis.call('HEXISTS', KEYS[1], 'w') == 0 then return 0 end
local ttl = tonumber(ARGV[2])
if ttl > 0 then redis.call('SET', KEYS[2], ARGV[1], 'EX', ttl) else redis.call('SET', KEYS[2], ARGV[1]) end
return 1
"""

# KEYS: m, refs.  ARGV: token, holder, ttl.  0 if the snapshot is gone.
_SNAP_ADDREF = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
local ttl = tonumber(ARGV[3])
if ttl > 0 then redis.call('EXPIRE', KEYS[2], ttl) end
return 1
"""

# KEYS: m, refs, chunks...  ARGV: token.  1 if that was the last reference (the snapshot is freed).
_SNAP_RELEASE = """
redis.call('HDEL', KEYS[2], ARGV[1])
if redis.call('HLEN', KEYS[2]) > 0 then return 0 end
for i = 1, #KEYS do redis.call('DEL', KEYS[i]) end
return 1
"""

# KEYS: m, refs, chunks...  ARGV: ttl
_SNAP_TOUCH = """
for i = 1, #KEYS do redis.call('EXPIRE', KEYS[i], ARGV[1]) end
return 1
"""

# -- a session's slot --------------------------------------------------------------------------

# KEYS: head, log.  ARGV: now, meta, digest, ttl, snap, snap_ref, snap_off, offset, ix, stamp, window, entries...
# -1 the id is taken, -5 too late (the journal stamp is past the window).
_CREATE = (
    _NOW
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
if late(ARGV[10], ARGV[11]) then return -5 end
redis.call('HSET', KEYS[1], 'created', ARGV[1], 'used', ARGV[1], 'meta', ARGV[2], 'digest', ARGV[3],
  'offset', ARGV[8], 'snap', ARGV[5], 'snap_ref', ARGV[6], 'snap_off', ARGV[7], 'gen', 0, 'fence', 0, 'ix', ARGV[9])
redis.call('DEL', KEYS[2])
for i = 12, #ARGV do redis.call('RPUSH', KEYS[2], ARGV[i]) end
local ttl = tonumber(ARGV[4])
if ttl > 0 then
  redis.call('EXPIRE', KEYS[1], ttl)
  if #ARGV > 11 then redis.call('EXPIRE', KEYS[2], ttl) end
end
return 1
"""
)

# KEYS: head, log.  ARGV: expected offset ('' = any).
# {-1} | {-3, offset} | {1, offset, snap, snap_off, meta, digest, log entries from snap_off...}
_READ_SOURCE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1} end
local h = redis.call('HMGET', KEYS[1], 'offset', 'snap', 'snap_off', 'meta', 'digest')
if ARGV[1] ~= '' and h[1] ~= ARGV[1] then return {-3, h[1]} end
local out = {1, h[1], h[2], h[3], h[4], h[5]}
local soff = tonumber(h[3])
for _, e in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do
  if cjson.decode(e).o >= soff then out[#out + 1] = e end
end
return out
"""

# KEYS: head, log, ids.  ARGV: fence, start, end, append_id, tokhash, ttl, now, entries...
# A duplicate also writes (`used`), so that a WAIT after it covers the original append too.
_APPEND = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1} end
if redis.call('HGET', KEYS[1], 'fence') ~= ARGV[1] then return {-2} end
if ARGV[4] ~= '' then
  local d = redis.call('HGET', KEYS[3], ARGV[4])
  if d then redis.call('HSET', KEYS[1], 'used', ARGV[7]); return {-3, d} end
end
local off = redis.call('HGET', KEYS[1], 'offset')
if off ~= ARGV[2] then return {-4, off} end
for i = 8, #ARGV do redis.call('RPUSH', KEYS[2], ARGV[i]) end
redis.call('HSET', KEYS[1], 'offset', ARGV[3], 'used', ARGV[7])
if ARGV[4] ~= '' then redis.call('HSET', KEYS[3], ARGV[4], ARGV[2] .. ',' .. ARGV[3] .. ',' .. ARGV[5]) end
local ttl = tonumber(ARGV[6])
if ttl > 0 then
  redis.call('EXPIRE', KEYS[1], ttl); redis.call('EXPIRE', KEYS[2], ttl)
  if redis.call('EXISTS', KEYS[3]) == 1 then redis.call('EXPIRE', KEYS[3], ttl) end
end
return {1}
"""

# KEYS: head, ids.  ARGV: append_id, now.  The record, touched (see _APPEND), or false.
_FIND = """
local d = redis.call('HGET', KEYS[2], ARGV[1])
if d and redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'used', ARGV[2]) end
return d
"""

# KEYS: head, log.  ARGV: fence, gen, snap, token, position, old token, stamp, window
_PUBLISH = (
    _NOW
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('HGET', KEYS[1], 'fence') ~= ARGV[1] then return -2 end
if redis.call('HGET', KEYS[1], 'gen') ~= ARGV[2] then return -3 end
if (redis.call('HGET', KEYS[1], 'snap_ref') or '') ~= ARGV[6] then return -3 end
local pos = tonumber(ARGV[5])
if pos > tonumber(redis.call('HGET', KEYS[1], 'offset')) then return -4 end
if late(ARGV[7], ARGV[8]) then return -5 end
redis.call('HSET', KEYS[1], 'snap', ARGV[3], 'snap_ref', ARGV[4], 'snap_off', ARGV[5])
while true do
  local e = redis.call('LINDEX', KEYS[2], 0)
  if not e or cjson.decode(e).o >= pos then break end
  redis.call('LPOP', KEYS[2])
end
return 1
"""
)

# KEYS: head, log, ids.  ARGV: fence, expected ('' = any), now, old token, stamp, window
# {-1} gone, {-2} fenced, {-3, offset}, {-5} too late, {-6} the head's snapshot changed since it was read
_RESET = (
    _NOW
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1} end
if redis.call('HGET', KEYS[1], 'fence') ~= ARGV[1] then return {-2} end
local off = redis.call('HGET', KEYS[1], 'offset')
if ARGV[2] ~= '' and off ~= ARGV[2] then return {-3, off} end
if (redis.call('HGET', KEYS[1], 'snap_ref') or '') ~= ARGV[4] then return {-6} end
if late(ARGV[5], ARGV[6]) then return {-5} end
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('HSET', KEYS[1], 'offset', 0, 'snap', '', 'snap_ref', '', 'snap_off', 0, 'used', ARGV[3])
redis.call('HINCRBY', KEYS[1], 'gen', 1)
return {1}
"""
)

# KEYS: head, log, ids, lease, want.  ARGV: old token, stamp, window
# {-1} gone, {-5} too late, {-6} the head's snapshot changed since it was read, {1, offset, ix}
_DELETE = (
    _NOW
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1} end
if (redis.call('HGET', KEYS[1], 'snap_ref') or '') ~= ARGV[1] then return {-6} end
if late(ARGV[2], ARGV[3]) then return {-5} end
local h = redis.call('HMGET', KEYS[1], 'offset', 'ix')
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5])
return {1, h[1], h[2] or ''}
"""
)

# KEYS: head, lease.  ARGV: owner, ms
_LEASE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1} end
local cur = redis.call('GET', KEYS[2])
if cur and cur ~= ARGV[1] then return {-2, cur, redis.call('PTTL', KEYS[2])} end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[2])
return {1, redis.call('HINCRBY', KEYS[1], 'fence', 1)}
"""

# KEYS: lease.  ARGV: owner, ms (0 = release)
_RENEW = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '0' then redis.call('DEL', KEYS[1]) else redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 1
"""

# KEYS: head, log, ids.  ARGV: ttl.  The head's snapshot id ('' if none, false if the session is gone).
_TOUCH = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local ttl = tonumber(ARGV[1])
for i = 1, 3 do if redis.call('EXISTS', KEYS[i]) == 1 then redis.call('EXPIRE', KEYS[i], ttl) end end
return redis.call('HGET', KEYS[1], 'snap') or ''
"""

# KEYS: head.  ARGV: now, patch JSON ({key: value, "" removes}), expected JSON ({key: value, "" absent}),
# max entries.  {1, meta JSON} | {-1} gone | {-3, key} an expected entry differs | {-2, entries} over the limit
_UPDATE_META = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1} end
local meta = cjson.decode(redis.call('HGET', KEYS[1], 'meta'))
for k, v in pairs(cjson.decode(ARGV[3])) do
  if (meta[k] or '') ~= v then return {-3, k} end
end
for k, v in pairs(cjson.decode(ARGV[2])) do
  if v == '' then meta[k] = nil else meta[k] = v end
end
local n = 0
for _ in pairs(meta) do n = n + 1 end
if n > tonumber(ARGV[4]) then return {-2, n} end
local out = '{}'
if n > 0 then out = cjson.encode(meta) end
redis.call('HSET', KEYS[1], 'meta', out, 'used', ARGV[1])
return {1, out}
"""

SCRIPTS = {
    "journal": _JOURNAL,
    "journal_old": _JOURNAL_OLD,
    "reserve": _RESERVE,
    "restore": _RESTORE,
    "forget": _FORGET,
    "snap_begin": _SNAP_BEGIN,
    "snap_chunk": _SNAP_CHUNK,
    "snap_addref": _SNAP_ADDREF,
    "snap_release": _SNAP_RELEASE,
    "snap_touch": _SNAP_TOUCH,
    "create": _CREATE,
    "read_source": _READ_SOURCE,
    "append": _APPEND,
    "find": _FIND,
    "publish": _PUBLISH,
    "reset": _RESET,
    "delete": _DELETE,
    "lease": _LEASE,
    "renew": _RENEW,
    "touch": _TOUCH,
    "update_meta": _UPDATE_META,
}
"""Every Lua script, by name (the tests check that each names every key it touches in KEYS)."""


@dataclass
class Head:
    """A session's head record, as stored."""

    tenant: str
    session_id: str
    created: float
    used: float
    metadata: dict[str, str]
    digest: str
    offset: int
    snap: str
    snap_off: int
    gen: int
    fence: int
    snap_ref: str = ""
    """This head's reference token on `snap` (see the module doc)."""


@dataclass
class MetaUpdate:
    """Outcome of update_metadata: ok (with the new metadata), differs (an expected entry, `key`),
    too_many (the result would hold `entries`), gone."""

    outcome: Literal["ok", "differs", "too_many", "gone"]
    metadata: dict[str, str] = dataclasses.field(default_factory=dict)
    key: str = ""
    entries: int = 0


@dataclass
class AppendResult:
    """Outcome of a log write: ok, duplicate (with the original offsets), mismatch, gone or fenced."""

    status: str  # "ok" | "duplicate" | "mismatch" | "not_found" | "fenced"
    offset: int = 0
    start: int = 0
    tokhash: str = ""
    record: str = ""
    """What the writer stored with the append id beside the offsets (a generation's output)."""

    @classmethod
    def parse_duplicate(cls, value: bytes) -> AppendResult:
        s, e, h, *rest = value.decode().split(",", 3)
        return cls("duplicate", offset=int(e), start=int(s), tokhash=h, record=rest[0] if rest else "")


@dataclass
class LeaseResult:
    fence: int | None
    holder: str = ""
    ttl_ms: int = 0
    missing: bool = False


@dataclass
class SweepReport:
    """What one sweep of the journal did."""

    checked: int = 0
    """journal entries older than the grace period that were looked at"""
    dropped: int = 0
    """references (or writers' pins) no head held any more, removed"""
    freed: int = 0
    """snapshots whose last reference that was"""


class ReplicaTimeout(RedisTimeoutError):
    """A write reached fewer replicas than `wait_replicas` within the timeout (retryable: it is
    on the master, and a retry with the same append_id finds it and waits again)."""


def tokens_hash(pieces: list[list[int]]) -> str:
    """A short digest of the pieces, so a retry with the same append_id but other tokens is caught."""
    h = hashlib.sha256(json.dumps(pieces, separators=(",", ":")).encode())
    return h.hexdigest()[:16]


def log_entry(start: int, tokens: list[int]) -> bytes:
    return json.dumps({"o": start, "t": tokens}, separators=(",", ":")).encode()


def _journal_entry(snap: str, token: str, tenant: str = "", sid: str = "") -> str:
    entry = {"s": snap, "r": token} | ({"t": tenant, "i": sid} if sid or tenant else {})
    return json.dumps(entry, separators=(",", ":"), sort_keys=True)


def _token() -> str:
    return uuid.uuid4().hex


class Store:
    """Async access to the layout above on a Redis or a RedisCluster client.

    Single-slot steps are one Lua call each; operations on snapshots are the short
    sequences of single-slot steps described in the module doc.
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
        self.prefix = prefix
        self.ttl = ttl_seconds
        self.chunk_bytes = chunk_bytes
        self.wait_replicas = wait_replicas
        self.wait_ms = int(wait_timeout * 1000)
        self.window_ms = int(window_seconds * 1000)
        self.grace_ms = int(grace_seconds * 1000)
        self._s = {name: redis.register_script(src) for name, src in SCRIPTS.items()}

    # -- keys --------------------------------------------------------------------------------

    def _k(self, tenant: str, sid: str, what: str) -> str:
        return f"{self.prefix}:s:{{{tenant}/{sid}}}:{what}"

    def _session_keys(self, tenant: str, sid: str) -> list[str]:
        return [self._k(tenant, sid, "h"), self._k(tenant, sid, "log"), self._k(tenant, sid, "ids")]

    def _idx(self, tenant: str) -> str:
        return f"{self.prefix}:t:{{{tenant}}}:idx"

    def _index_keys(self, tenant: str) -> list[str]:
        return [self._idx(tenant), f"{self.prefix}:t:{{{tenant}}}:stamps"]

    @property
    def journal_key(self) -> str:
        return f"{self.prefix}:gc"

    def snap_key(self, snap: str, what: str) -> str:
        return f"{self.prefix}:snap:{{{snap}}}:{what}"

    def _snap_keys(self, snap: str, n: int) -> list[str]:
        return [self.snap_key(snap, "m"), self.snap_key(snap, "refs")] + [
            self.snap_key(snap, f"c:{i}") for i in range(n)
        ]

    # -- running scripts -----------------------------------------------------------------------

    async def _call(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run a read-only script (no WAIT)."""
        return await self._s[name](keys=list(keys), args=list(args))

    async def _write(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run a writing script; with wait_replicas, WAIT for the replicas on the same connection."""
        if not self.wait_replicas:
            return await self._call(name, keys, args)
        script = self._s[name]
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
        raise NoScriptError(f"Redis refused script {name}")

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

    async def _call_many(self, name: str, calls: list[tuple[list[str], list[Any]]]) -> list[Any]:
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

    # -- the journal and shared snapshots --------------------------------------------------------

    async def _journal(self, *entries: str) -> int:
        """Record operations in flight; returns Redis's ms stamp for them."""
        return int(await self._write("journal", [self.journal_key], list(entries)))

    async def _unjournal(self, *entries: str) -> None:
        if entries:
            await self.r.zrem(self.journal_key, *entries)

    async def _chunk_count(self, snap: str) -> int:
        m = await self.r.get(self.snap_key(snap, "m"))
        return int(json.loads(m)["n"]) if m else 0

    async def _release(self, snap: str, token: str) -> bool:
        """Drop one reference (or the writer's pin); True if it was the last and the snapshot is freed."""
        keys = self._snap_keys(snap, await self._chunk_count(snap))
        return bool(await self._write("snap_release", keys, [token]))

    async def _addref(self, snap: str, token: str, tenant: str, sid: str) -> bool:
        keys = [self.snap_key(snap, "m"), self.snap_key(snap, "refs")]
        return bool(await self._write("snap_addref", keys, [token, f"{tenant}/{sid}", self.ttl]))

    async def _touch_snapshot(self, snap: str) -> None:
        if snap and self.ttl > 0:
            keys = self._snap_keys(snap, await self._chunk_count(snap))
            await self._write("snap_touch", keys, [self.ttl])

    async def _held(self, tenant: str, sid: str) -> tuple[str, str] | None:
        """(snapshot, token) the head holds ('' when none), or None if there is no head."""
        snap, ref, digest = await self.r.hmget(self._k(tenant, sid, "h"), ["snap", "snap_ref", "digest"])
        if digest is None:
            return None
        return (snap or b"").decode(), (ref or b"").decode()

    async def sweep(self, limit: int = 1000) -> SweepReport:
        """Finish what crashed operations left in the journal (entries older than the grace period).

        Safe to run from every daemon at once: each step is idempotent.
        """
        rep = SweepReport()
        old = await self._call("journal_old", [self.journal_key], [self.grace_ms, limit])
        for raw in old:
            rep.checked += 1
            e = json.loads(raw)
            snap, token = e["s"], e["r"]
            if "i" in e and await self._held(e["t"], e["i"]) == (snap, token):
                pass  # the operation got through: the head holds the reference
            else:  # never installed, or the head let go of it: drop it
                rep.dropped += 1
                rep.freed += await self._release(snap, token)
            await self._unjournal(raw.decode() if isinstance(raw, bytes) else raw)
        return rep

    async def journal_size(self) -> int:
        return int(await self.r.zcard(self.journal_key))

    async def snapshot_refs(self, snap: str) -> dict[str, str]:
        """A snapshot's references: token -> holder ('w' -> stamp while unpublished); {} once freed."""
        raw = await self.r.hgetall(self.snap_key(snap, "refs"))
        return {k.decode(): v.decode() for k, v in raw.items()}

    # -- sessions ----------------------------------------------------------------------------

    async def ping(self) -> bool:
        return bool(await self.r.ping())

    async def _forget(self, tenant: str, sid: str, stamp: int | None) -> None:
        """Drop an index entry: the one with this stamp, or (None) any older than the grace period."""
        await self._write("forget", self._index_keys(tenant), [sid, "" if stamp is None else stamp, self.grace_ms])

    async def _create_head(
        self,
        tenant: str,
        sid: str,
        *,
        metadata_json: str,
        digest: str,
        snap: str,
        token: str,
        snap_off: int,
        offset: int,
        ix: int,
        stamp: int,
        entries: Sequence[bytes] = (),
    ) -> int:
        keys = [self._k(tenant, sid, "h"), self._k(tenant, sid, "log")]
        args = [time.time(), metadata_json, digest, self.ttl, snap, token, snap_off, offset, ix, stamp, self.window_ms]
        return int(await self._write("create", keys, [*args, *entries]))

    async def _new_session(
        self,
        tenant: str,
        sid: str,
        max_sessions: int,
        *,
        metadata_json: str,
        digest: str,
        snap: str,
        snap_off: int,
        offset: int,
        entries: Sequence[bytes] = (),
    ) -> int:
        """Index entry, reference on the snapshot, head: 1, -1 taken, -2 at the limit, -5 too slow, -7 snapshot gone."""
        token = _token() if snap else ""
        entry = _journal_entry(snap, token, tenant, sid) if snap else ""
        stamp = await self._journal(entry) if snap else None
        res = await self._write("reserve", self._index_keys(tenant), [sid, max_sessions])
        if int(res[0]) != 1:
            code = -2
        else:
            ix, prev = int(res[1]), res[2].decode() if isinstance(res[2], bytes) else str(res[2])
            if snap and not await self._addref(snap, token, tenant, sid):
                code = -7
            else:
                code = await self._create_head(
                    tenant,
                    sid,
                    metadata_json=metadata_json,
                    digest=digest,
                    snap=snap,
                    token=token,
                    snap_off=snap_off,
                    offset=offset,
                    ix=ix,
                    stamp=stamp if stamp is not None else ix,
                    entries=entries,
                )
            if code == -1:
                await self._write("restore", self._index_keys(tenant), [sid, ix, prev])
            elif code != 1:
                await self._forget(tenant, sid, ix)
        if code == 1:
            await self._touch_snapshot(snap)
        elif snap and code != -7:
            await self._release(snap, token)
        if entry:  # not on an exception: then the outcome is unknown, and the sweep finishes it
            await self._unjournal(entry)
        return code

    async def create(
        self,
        tenant: str,
        sid: str,
        metadata: dict[str, str],
        digest: str,
        max_sessions: int = 0,
        snap: str = "",
        offset: int = 0,
    ) -> int:
        """1 created, -1 the id is taken, -2 the tenant is at its session limit.

        With `snap` (a snapshot from write_snapshot), the session starts from it; on success
        its writer's pin is handed over to the new head (no drop_snapshot needed), on failure
        the caller drops it as before.
        """
        code = await self._new_session(
            tenant,
            sid,
            max_sessions,
            metadata_json=json.dumps(metadata),
            digest=digest,
            snap=snap,
            snap_off=offset,
            offset=offset,
        )
        if code == 1 and snap:
            await self._unpin(snap)
        if code in (-5, -7):
            raise RedisTimeoutError(f"creating session {sid} took longer than {self.window_ms} ms; retry")
        return code

    async def head(self, tenant: str, sid: str) -> Head | None:
        raw = await self.r.hgetall(self._k(tenant, sid, "h"))
        if not raw:
            return None
        f = {k.decode(): v.decode() for k, v in raw.items()}
        try:
            return Head(
                tenant=tenant,
                session_id=sid,
                created=float(f["created"]),
                used=float(f["used"]),
                metadata=json.loads(f["meta"]),
                digest=f["digest"],
                offset=int(f["offset"]),
                snap=f["snap"],
                snap_off=int(f["snap_off"]),
                gen=int(f["gen"]),
                fence=int(f["fence"]),
                snap_ref=f.get("snap_ref", ""),
            )
        except (KeyError, ValueError) as e:
            raise DataLoss(f"session {sid}: stored head is malformed ({e})") from e

    async def append(
        self,
        tenant: str,
        sid: str,
        fence: int,
        start: int,
        pieces: list[list[int]],
        append_id: str = "",
        record: str = "",
    ) -> AppendResult:
        """Durably add pieces at `start` (compare-and-set on the offset, fenced, deduplicated).

        `record` is kept with the append id (it may hold commas: it is the last field).
        With wait_replicas, "ok" and "duplicate" mean the entry is on that many replicas.
        """
        entries, pos = [], start
        for p in pieces:
            entries.append(log_entry(pos, p))
            pos += len(p)
        th = tokens_hash(pieces) if append_id else ""
        value = f"{th},{record}" if record else th
        args = [fence, start, pos, append_id, value, self.ttl, time.time(), *entries]
        res = await self._write("append", self._session_keys(tenant, sid), args)
        code = int(res[0])
        if code == 1:
            return AppendResult("ok", offset=pos, start=start, tokhash=th, record=record)
        if code == -1:
            return AppendResult("not_found")
        if code == -2:
            return AppendResult("fenced")
        if code == -3:
            return AppendResult.parse_duplicate(res[1])
        return AppendResult("mismatch", offset=int(res[1]))

    async def find_append(self, tenant: str, sid: str, append_id: str) -> AppendResult | None:
        """Where an append with this id landed, if it did (checked before any compute).

        With wait_replicas the find writes (`used`) and WAITs, so a found append is on the replicas.
        """
        if self.wait_replicas:
            keys = [self._k(tenant, sid, "h"), self._k(tenant, sid, "ids")]
            d = await self._write("find", keys, [append_id, time.time()])
        else:
            d = await self.r.hget(self._k(tenant, sid, "ids"), append_id)
        if d is None:
            return None
        return AppendResult.parse_duplicate(d)

    async def read_log(self, tenant: str, sid: str, from_offset: int, to_offset: int) -> list[list[int]]:
        """The pieces from `from_offset` to `to_offset`, checked to be contiguous."""
        raw = await self.r.lrange(self._k(tenant, sid, "log"), 0, -1)
        pieces, pos = [], from_offset
        for item in raw:
            try:
                e = json.loads(item)
                o, toks = int(e["o"]), [int(t) for t in e["t"]]
            except (ValueError, KeyError, TypeError) as err:
                raise DataLoss(f"session {sid}: a token log entry is malformed ({err})") from err
            if o < from_offset:
                continue
            if o != pos:
                raise DataLoss(f"session {sid}: token log has a gap at offset {pos} (next entry starts at {o})")
            pieces.append(toks)
            pos += len(toks)
        if pos != to_offset:
            raise DataLoss(f"session {sid}: token log ends at {pos}, the head says {to_offset}")
        return pieces

    async def fork(
        self,
        tenant: str,
        src: str,
        dst: str,
        metadata: dict[str, str] | None,
        expected: int | None,
        max_sessions: int,
        digest: str = "",
    ) -> tuple[int, int]:
        """(code, offset): 1 forked, -1 no source, -2 target exists, -3 offset mismatch, -4 at session limit,
        -5 the source belongs to another model than `digest` (when given: a copy would be as unusable here).

        The source is read in one step (head + log tail after its snapshot); the copy
        takes a reference on that snapshot. If the source's snapshot is freed between
        the read and the reference (a newer one was published), it reads again.
        """
        keys = [self._k(tenant, src, "h"), self._k(tenant, src, "log")]
        for _ in range(8):
            res = await self._call("read_source", keys, ["" if expected is None else expected])
            code = int(res[0])
            if code == -1:
                return -1, 0
            if code == -3:
                return -3, int(res[1])
            offset, snap, snap_off, meta, src_digest = (int(res[1]), res[2].decode(), int(res[3]), res[4], res[5])
            if digest and src_digest.decode() != digest:  # a session's model never changes: no race here
                return -5, 0
            code = await self._new_session(
                tenant,
                dst,
                max_sessions,
                metadata_json=json.dumps(metadata) if metadata else meta.decode(),
                digest=src_digest.decode(),
                snap=snap,
                snap_off=snap_off,
                offset=offset,
                entries=res[6:],
            )
            if code == 1:
                return 1, offset
            if code == -1:
                return -2, 0
            if code == -2:
                return -4, 0
            if code == -5:
                break
        raise RedisTimeoutError(f"fork of {src} into {dst} did not settle (the source kept changing); retry")

    async def _drop_ref_of_head(self, tenant: str, sid: str, step: Any) -> Any:
        """Run `step(old_token, stamp)`, a head write that lets go of the head's snapshot, journaled.

        `step` returns a list whose first element is the script's code; -6 (the head's
        snapshot changed since it was read) is retried, the reference is released on success.
        """
        for _ in range(8):
            held = await self._held(tenant, sid)
            if held is None:
                return [-1]
            snap, token = held
            entry = _journal_entry(snap, token, tenant, sid) if snap else ""
            stamp = await self._journal(entry) if snap else ""
            res = await step(token, stamp)
            code = int(res[0])
            if code == 1 and snap:
                await self._release(snap, token)
            if entry:
                await self._unjournal(entry)
            if code == -5:
                raise RedisTimeoutError(f"session {sid}: the write took longer than {self.window_ms} ms; retry")
            if code != -6:
                return res
        raise RedisTimeoutError(f"session {sid}: its snapshot kept changing; retry")

    async def reset(self, tenant: str, sid: str, fence: int, expected: int | None) -> tuple[int, int]:
        async def step(token: str, stamp: int | str) -> Any:
            args = [fence, "" if expected is None else expected, time.time(), token, stamp, self.window_ms]
            return await self._write("reset", self._session_keys(tenant, sid), args)

        res = await self._drop_ref_of_head(tenant, sid, step)
        return int(res[0]), int(res[1]) if len(res) > 1 else 0

    async def delete(self, tenant: str, sid: str) -> tuple[int, int]:
        keys = [*self._session_keys(tenant, sid), self._k(tenant, sid, "lease"), self._k(tenant, sid, "want")]

        async def step(token: str, stamp: int | str) -> Any:
            return await self._write("delete", keys, [token, stamp, self.window_ms])

        res = await self._drop_ref_of_head(tenant, sid, step)
        if int(res[0]) == 1:
            ix = res[2].decode() if isinstance(res[2], bytes) else str(res[2])
            await self._forget(tenant, sid, int(ix) if ix else None)
            return 1, int(res[1])
        await self._forget(tenant, sid, None)
        return int(res[0]), 0

    async def list(self, tenant: str, after: str, limit: int) -> tuple[list[Head], str]:
        """Up to `limit` heads with ids > `after`, and the id to continue after ('' at the end)."""
        heads: list[Head] = []
        cursor = after
        while len(heads) < limit:
            lo = f"({cursor}" if cursor else "-"
            ids = await self.r.zrangebylex(self._idx(tenant), lo, "+", start=0, num=limit - len(heads))
            if not ids:
                return heads, ""
            for raw in ids:
                sid = raw.decode()
                h = await self.head(tenant, sid)
                if h is None:  # expired by TTL, or a create that crashed: forget it once it is old
                    await self._forget(tenant, sid, None)
                else:
                    heads.append(h)
                cursor = sid
        more = await self.r.zrangebylex(self._idx(tenant), f"({cursor}", "+", start=0, num=1)
        return heads, cursor if more else ""

    async def update_metadata(
        self, tenant: str, sid: str, patch: dict[str, str], expected: dict[str, str], max_entries: int
    ) -> MetaUpdate:
        """Set / remove metadata entries ("" removes) in one step, if every `expected` entry holds.

        Not fenced: metadata is client data, not model state, so no lease is needed to change it.
        """
        res = await self._write(
            "update_meta",
            [self._k(tenant, sid, "h")],
            [time.time(), json.dumps(patch), json.dumps(expected), max_entries],
        )
        code = int(res[0])
        if code == 1:
            return MetaUpdate("ok", metadata=json.loads(res[1]))
        if code == -3:
            return MetaUpdate("differs", key=res[1].decode())
        if code == -2:
            return MetaUpdate("too_many", entries=int(res[1]))
        return MetaUpdate("gone")

    async def touch(self, tenant: str, sid: str) -> None:
        if self.ttl > 0:
            snap = await self._write("touch", self._session_keys(tenant, sid), [self.ttl])
            if snap:
                await self._touch_snapshot(snap.decode())

    async def count_sessions(self) -> int:
        n = 0
        async for key in self.r.scan_iter(match=f"{self.prefix}:t:*:idx", count=1000):
            n += await self.r.zcard(key)
        return n

    # -- leases ------------------------------------------------------------------------------

    async def acquire_lease(self, tenant: str, sid: str, owner: str, seconds: float) -> LeaseResult:
        keys = [self._k(tenant, sid, "h"), self._k(tenant, sid, "lease")]
        res = await self._write("lease", keys, [owner, int(seconds * 1000)])
        code = int(res[0])
        if code == 1:
            return LeaseResult(fence=int(res[1]))
        if code == -1:
            return LeaseResult(fence=None, missing=True)
        return LeaseResult(fence=None, holder=res[1].decode(), ttl_ms=int(res[2]))

    async def renew_leases(self, sessions: list[tuple[str, str]], owner: str, seconds: float) -> list[bool]:
        """Renew (seconds > 0) or release (seconds == 0) leases; False where the lease is no longer ours."""
        if not sessions:
            return []
        ms = int(seconds * 1000)
        calls = [([self._k(tenant, sid, "lease")], [owner, ms]) for tenant, sid in sessions]
        return [bool(x) for x in await self._call_many("renew", calls)]

    async def request_handoff(self, tenant: str, sid: str, seconds: float = 10.0) -> None:
        """Ask the daemon holding the session's lease to write it out and let go of it."""
        await self.r.set(self._k(tenant, sid, "want"), 1, px=int(seconds * 1000))

    async def take_handoff_requests(self, sessions: list[tuple[str, str]]) -> list[bool]:
        """Which of these sessions another daemon asked for (each request is consumed)."""
        if not sessions:
            return []
        async with self.r.pipeline(transaction=False) as pipe:
            for tenant, sid in sessions:
                pipe.delete(self._k(tenant, sid, "want"))
            return [bool(x) for x in await pipe.execute()]

    # -- snapshots ---------------------------------------------------------------------------

    async def write_snapshot(self, data: bytes, digest: str, position: int) -> str:
        """Write an immutable snapshot, pinned until published (or dropped); returns its id.

        Journal entry, then manifest + pin in one step (so the chunk count is known before
        any chunk exists), then the chunks, each only while the pin holds.
        """
        snap = uuid.uuid4().hex
        n = max(1, -(-len(data) // self.chunk_bytes))
        chunks = [data[i * self.chunk_bytes : (i + 1) * self.chunk_bytes] for i in range(n)]
        manifest = {
            "format": SNAPSHOT_FORMAT,
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "n": n,
            "chunks": [hashlib.sha256(c).hexdigest() for c in chunks],
            "model_digest": digest,
            "position": position,
            "created": time.time(),
        }
        stamp = await self._journal(_journal_entry(snap, PIN))
        keys = [self.snap_key(snap, "m"), self.snap_key(snap, "refs")]
        await self._write("snap_begin", keys, [json.dumps(manifest), self.ttl, stamp])
        refs = self.snap_key(snap, "refs")
        for i, c in enumerate(chunks):
            if not await self._write("snap_chunk", [refs, self.snap_key(snap, f"c:{i}")], [c, self.ttl]):
                raise RedisTimeoutError(
                    f"snapshot {snap} took longer than the sweep's grace ({self.grace_ms} ms) to write; retry"
                )
        return snap

    async def _unpin(self, snap: str) -> None:
        await self._release(snap, PIN)
        await self._unjournal(_journal_entry(snap, PIN))

    async def drop_snapshot(self, snap: str) -> None:
        """Let go of a snapshot that was not published (frees it unless something holds it)."""
        await self._unpin(snap)

    async def publish_snapshot(self, tenant: str, sid: str, fence: int, gen: int, snap: str, position: int) -> int:
        """1 published; -1 session gone, -2 fenced, -3 reset meanwhile, -4 position ahead of the log,
        -5 took too long or the snapshot was swept (not published: drop it and try again later).

        On 1 the writer's pin is handed over to the head; otherwise the caller drops the snapshot.
        """
        held = await self._held(tenant, sid)
        if held is None:
            return -1
        old, old_token = held
        token = _token()
        entries = [_journal_entry(snap, token, tenant, sid)]
        if old:
            entries.append(_journal_entry(old, old_token, tenant, sid))
        stamp = await self._journal(*entries)
        code = -5
        if await self._addref(snap, token, tenant, sid):
            keys = [self._k(tenant, sid, "h"), self._k(tenant, sid, "log")]
            args = [fence, gen, snap, token, position, old_token, stamp, self.window_ms]
            code = int(await self._write("publish", keys, args))
        if code == 1:
            if old:
                await self._release(old, old_token)
            await self._touch_snapshot(snap)
            await self._unpin(snap)
        else:
            await self._release(snap, token)
        await self._unjournal(*entries)  # not on an exception: the sweep finishes what is unknown
        return code

    async def read_snapshot(self, snap: str) -> bytes:
        """The snapshot's bytes, every chunk and the whole checked against the manifest."""
        m = await self.r.get(self.snap_key(snap, "m"))
        if m is None:
            raise DataLoss(f"snapshot {snap} is missing its manifest")
        man = json.loads(m)
        chunks = await self.r.mget([self.snap_key(snap, f"c:{i}") for i in range(man["n"])])
        for i, (c, h) in enumerate(zip(chunks, man["chunks"], strict=True)):
            if c is None:
                raise DataLoss(f"snapshot {snap}: chunk {i} is missing")
            if hashlib.sha256(c).hexdigest() != h:
                raise DataLoss(f"snapshot {snap}: chunk {i} fails its checksum")
        data = b"".join(chunks)
        if len(data) != man["size"] or hashlib.sha256(data).hexdigest() != man["sha256"]:
            raise DataLoss(f"snapshot {snap}: bytes do not match the manifest")
        return data

    async def bytes_used(self, pattern: str) -> int:
        """Sum of MEMORY USAGE over keys matching `pattern` (for tests and the benchmark)."""
        total = 0
        async for key in self.r.scan_iter(match=pattern, count=1000):
            total += int(await self.r.memory_usage(key) or 0)
        return total


async def sweep_forever(store: Store, every: float = 60.0) -> None:
    """Run the journal sweep now and then (every daemon does; the steps are idempotent)."""
    log = logging.getLogger("memoryd.sweep")
    while True:
        await asyncio.sleep(every)
        try:
            rep = await store.sweep()
            if rep.dropped:
                log.info(json.dumps({"event": "sweep", **dataclasses.asdict(rep)}))
        except UNAVAILABLE_ERRORS as e:
            log.warning("snapshot sweep: Redis unavailable (%s)", e)
        except Exception:  # a bug here must not stop the sweeping for good
            log.exception("snapshot sweep failed; trying again")
