"""Bytes at the bottom: sessions, token logs, snapshots and leases in Redis.

Layout (prefix `md`, `{t/s}` = tenant/session hash tag):

    md:s:{t/s}:h       HASH   head: created, used, meta (JSON), digest, offset,
                              snap (snapshot id or ""), snap_off, gen, fence
    md:s:{t/s}:log     LIST   token log after the head's snapshot, one JSON entry
                              per piece the model read: {"o": start offset, "t": [ids]}
    md:s:{t/s}:ids     HASH   append_id -> "start,end,tokens-hash[,record]" (dedup of retries;
                              a committed generation's record is JSON: its prompt's hash,
                              output tokens, text and finish reason, so a retry gets them back)
    md:s:{t/s}:lease   STRING the daemon serving the session (PX lease_seconds)
    md:s:{t/s}:want    STRING another daemon asks for the session (it is written out and released)
    md:t:{tenant}:idx  ZSET   the tenant's session ids (for paged listing)
    md:snap:{id}:m     STRING snapshot manifest (JSON: size, sha256, chunk hashes, ...)
    md:snap:{id}:r     STRING how many heads point at the snapshot (forks share it)
    md:snap:{id}:c:{i} STRING chunk i of the safetensors bytes

Why this shape:
- Snapshots are immutable and written before anything points at them; a Lua
  compare-and-set on the head's `gen` publishes one, so a reader sees either the
  old snapshot or the whole new one, never half of one.
- Every head write checks the caller's fencing token (`fence`, bumped by each
  lease acquisition), so a daemon that lost its lease can no longer write.
- The log records each piece exactly as the model read it, so recovery (newest
  snapshot + replay of the log) is bit for bit the state that was acknowledged.
- A fork copies the head and the log tail after the snapshot (bounded by the
  snapshot interval, never by the session's length) and bumps the snapshot's
  reference count: no weights are copied.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from dataclasses import dataclass

import redis.asyncio as aioredis

from memoryd.errors import DataLoss

SNAPSHOT_FORMAT = "memoryd-session-state/1"

# Shared Lua helpers: drop one reference to a snapshot, deleting it with the last one.
_LUA_LIB = """
local function snapkey(prefix, id, suffix) return prefix .. ':snap:' .. id .. ':' .. suffix end
local function decref(prefix, id)
  if id == nil or id == false or id == '' then return end
  local r = redis.call('DECR', snapkey(prefix, id, 'r'))
  if r <= 0 then
    local m = redis.call('GET', snapkey(prefix, id, 'm'))
    if m then
      local n = cjson.decode(m).n
      for i = 0, n - 1 do redis.call('DEL', snapkey(prefix, id, 'c:' .. i)) end
    end
    redis.call('DEL', snapkey(prefix, id, 'm'), snapkey(prefix, id, 'r'))
  end
end
local function touch_snap(prefix, id, ttl)
  if id == nil or id == false or id == '' or ttl <= 0 then return end
  local m = redis.call('GET', snapkey(prefix, id, 'm'))
  if not m then return end
  local n = cjson.decode(m).n
  for i = 0, n - 1 do redis.call('EXPIRE', snapkey(prefix, id, 'c:' .. i), ttl) end
  redis.call('EXPIRE', snapkey(prefix, id, 'm'), ttl)
  redis.call('EXPIRE', snapkey(prefix, id, 'r'), ttl)
end
"""

# KEYS: head, idx.  ARGV: sid, now, meta, digest, ttl, max_sessions, prefix, snap, snap_off, offset
_CREATE = (
    _LUA_LIB
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
local maxn = tonumber(ARGV[6])
if maxn > 0 and redis.call('ZCARD', KEYS[2]) >= maxn then return -2 end
redis.call('HSET', KEYS[1], 'created', ARGV[2], 'used', ARGV[2], 'meta', ARGV[3], 'digest', ARGV[4],
  'offset', ARGV[10], 'snap', ARGV[8], 'snap_off', ARGV[9], 'gen', 0, 'fence', 0)
if ARGV[8] ~= '' then redis.call('INCR', snapkey(ARGV[7], ARGV[8], 'r')) end
redis.call('ZADD', KEYS[2], 0, ARGV[1])
local ttl = tonumber(ARGV[5])
if ttl > 0 then redis.call('EXPIRE', KEYS[1], ttl); touch_snap(ARGV[7], ARGV[8], ttl) end
return 1
"""
)

# KEYS: head, log, ids.  ARGV: fence, start, end, append_id, tokhash, ttl, now, entries...
_APPEND = """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1} end
if redis.call('HGET', KEYS[1], 'fence') ~= ARGV[1] then return {-2} end
if ARGV[4] ~= '' then
  local d = redis.call('HGET', KEYS[3], ARGV[4])
  if d then return {-3, d} end
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

# KEYS: head, log.  ARGV: fence, gen, snap_new, position, prefix, ttl
_PUBLISH = (
    _LUA_LIB
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('HGET', KEYS[1], 'fence') ~= ARGV[1] then return -2 end
if redis.call('HGET', KEYS[1], 'gen') ~= ARGV[2] then return -3 end
local pos = tonumber(ARGV[4])
if pos > tonumber(redis.call('HGET', KEYS[1], 'offset')) then return -4 end
local old = redis.call('HGET', KEYS[1], 'snap')
redis.call('INCR', snapkey(ARGV[5], ARGV[3], 'r'))
redis.call('HSET', KEYS[1], 'snap', ARGV[3], 'snap_off', ARGV[4])
decref(ARGV[5], old)
while true do
  local e = redis.call('LINDEX', KEYS[2], 0)
  if not e or cjson.decode(e).o >= pos then break end
  redis.call('LPOP', KEYS[2])
end
touch_snap(ARGV[5], ARGV[3], tonumber(ARGV[6]))
return 1
"""
)

# KEYS: src head, src log, dst head, dst log, idx.  ARGV: dst sid, now, meta ('' = copy), ttl, expected ('' = any),
# max_sessions, prefix, digest ('' = any)
_FORK = (
    _LUA_LIB
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1} end
if redis.call('EXISTS', KEYS[3]) == 1 then return {-2} end
local src = redis.call('HMGET', KEYS[1], 'offset', 'snap', 'snap_off', 'meta', 'digest')
if ARGV[8] ~= '' and src[5] ~= ARGV[8] then return {-5} end
if ARGV[5] ~= '' and src[1] ~= ARGV[5] then return {-3, src[1]} end
local maxn = tonumber(ARGV[6])
if maxn > 0 and redis.call('ZCARD', KEYS[5]) >= maxn then return {-4} end
local meta = ARGV[3]
if meta == '' then meta = src[4] end
redis.call('HSET', KEYS[3], 'created', ARGV[2], 'used', ARGV[2], 'meta', meta, 'digest', src[5],
  'offset', src[1], 'snap', src[2], 'snap_off', src[3], 'gen', 0, 'fence', 0)
if src[2] ~= '' then redis.call('INCR', snapkey(ARGV[7], src[2], 'r')) end
local soff = tonumber(src[3])
for _, e in ipairs(redis.call('LRANGE', KEYS[2], 0, -1)) do
  if cjson.decode(e).o >= soff then redis.call('RPUSH', KEYS[4], e) end
end
redis.call('ZADD', KEYS[5], 0, ARGV[1])
local ttl = tonumber(ARGV[4])
if ttl > 0 then
  redis.call('EXPIRE', KEYS[3], ttl)
  if redis.call('EXISTS', KEYS[4]) == 1 then redis.call('EXPIRE', KEYS[4], ttl) end
  touch_snap(ARGV[7], src[2], ttl)
end
return {1, src[1]}
"""
)

# KEYS: head, log, ids.  ARGV: fence, expected ('' = any), prefix, now
_RESET = (
    _LUA_LIB
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {-1} end
if redis.call('HGET', KEYS[1], 'fence') ~= ARGV[1] then return {-2} end
local off = redis.call('HGET', KEYS[1], 'offset')
if ARGV[2] ~= '' and off ~= ARGV[2] then return {-3, off} end
decref(ARGV[3], redis.call('HGET', KEYS[1], 'snap'))
redis.call('DEL', KEYS[2], KEYS[3])
redis.call('HSET', KEYS[1], 'offset', 0, 'snap', '', 'snap_off', 0, 'used', ARGV[4])
redis.call('HINCRBY', KEYS[1], 'gen', 1)
return {1}
"""
)

# KEYS: head, log, ids, lease, idx.  ARGV: sid, prefix
_DELETE = (
    _LUA_LIB
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then redis.call('ZREM', KEYS[5], ARGV[1]); return {-1} end
local off = redis.call('HGET', KEYS[1], 'offset')
decref(ARGV[2], redis.call('HGET', KEYS[1], 'snap'))
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4])
redis.call('ZREM', KEYS[5], ARGV[1])
return {1, off}
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

# KEYS: head, log, ids.  ARGV: ttl, prefix
_TOUCH = (
    _LUA_LIB
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local ttl = tonumber(ARGV[1])
for i = 1, 3 do if redis.call('EXISTS', KEYS[i]) == 1 then redis.call('EXPIRE', KEYS[i], ttl) end end
touch_snap(ARGV[2], redis.call('HGET', KEYS[1], 'snap'), ttl)
return 1
"""
)


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


def tokens_hash(pieces: list[list[int]]) -> str:
    """A short digest of the pieces, so a retry with the same append_id but other tokens is caught."""
    h = hashlib.sha256(json.dumps(pieces, separators=(",", ":")).encode())
    return h.hexdigest()[:16]


def log_entry(start: int, tokens: list[int]) -> bytes:
    return json.dumps({"o": start, "t": tokens}, separators=(",", ":")).encode()


class Store:
    """Async access to the Redis layout above; every method is one round trip or one Lua call."""

    def __init__(self, redis: aioredis.Redis, prefix: str = "md", ttl_seconds: int = 0, chunk_bytes: int = 4 << 20):
        self.r = redis
        self.prefix = prefix
        self.ttl = ttl_seconds
        self.chunk_bytes = chunk_bytes
        self._create = redis.register_script(_CREATE)
        self._append = redis.register_script(_APPEND)
        self._publish = redis.register_script(_PUBLISH)
        self._fork = redis.register_script(_FORK)
        self._reset = redis.register_script(_RESET)
        self._delete = redis.register_script(_DELETE)
        self._lease = redis.register_script(_LEASE)
        self._renew = redis.register_script(_RENEW)
        self._touch = redis.register_script(_TOUCH)

    # -- keys --------------------------------------------------------------------------------

    def _k(self, tenant: str, sid: str, what: str) -> str:
        return f"{self.prefix}:s:{{{tenant}/{sid}}}:{what}"

    def _session_keys(self, tenant: str, sid: str) -> list[str]:
        return [self._k(tenant, sid, "h"), self._k(tenant, sid, "log"), self._k(tenant, sid, "ids")]

    def _idx(self, tenant: str) -> str:
        return f"{self.prefix}:t:{tenant}:idx"

    def snap_key(self, snap: str, what: str) -> str:
        return f"{self.prefix}:snap:{snap}:{what}"

    # -- sessions ----------------------------------------------------------------------------

    async def ping(self) -> bool:
        return bool(await self.r.ping())

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
        """1 created, -1 the id is taken, -2 the tenant is at its session limit."""
        keys = [self._k(tenant, sid, "h"), self._idx(tenant)]
        args = [
            sid,
            time.time(),
            json.dumps(metadata),
            digest,
            self.ttl,
            max_sessions,
            self.prefix,
            snap,
            offset,
            offset,
        ]
        return int(await self._create(keys=keys, args=args))

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
        """
        entries, pos = [], start
        for p in pieces:
            entries.append(log_entry(pos, p))
            pos += len(p)
        th = tokens_hash(pieces) if append_id else ""
        value = f"{th},{record}" if record else th
        args = [fence, start, pos, append_id, value, self.ttl, time.time(), *entries]
        res = await self._append(keys=self._session_keys(tenant, sid), args=args)
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
        """Where an append with this id landed, if it did (checked before any compute)."""
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
        -5 the source belongs to another model than `digest` (given: a copy would be as unusable here)."""
        keys = [self._k(tenant, src, "h"), self._k(tenant, src, "log")]
        keys += [self._k(tenant, dst, "h"), self._k(tenant, dst, "log"), self._idx(tenant)]
        meta = json.dumps(metadata) if metadata else ""
        args = [dst, time.time(), meta, self.ttl, "" if expected is None else expected, max_sessions, self.prefix]
        res = await self._fork(keys=keys, args=[*args, digest])
        return int(res[0]), int(res[1]) if len(res) > 1 else 0

    async def reset(self, tenant: str, sid: str, fence: int, expected: int | None) -> tuple[int, int]:
        args = [fence, "" if expected is None else expected, self.prefix, time.time()]
        res = await self._reset(keys=self._session_keys(tenant, sid), args=args)
        return int(res[0]), int(res[1]) if len(res) > 1 else 0

    async def delete(self, tenant: str, sid: str) -> tuple[int, int]:
        keys = [*self._session_keys(tenant, sid), self._k(tenant, sid, "lease"), self._idx(tenant)]
        res = await self._delete(keys=keys, args=[sid, self.prefix])
        return int(res[0]), int(res[1]) if len(res) > 1 else 0

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
                if h is None:  # expired by TTL: forget it
                    await self.r.zrem(self._idx(tenant), sid)
                else:
                    heads.append(h)
                cursor = sid
        more = await self.r.zrangebylex(self._idx(tenant), f"({cursor}", "+", start=0, num=1)
        return heads, cursor if more else ""

    async def touch(self, tenant: str, sid: str) -> None:
        if self.ttl > 0:
            await self._touch(keys=self._session_keys(tenant, sid), args=[self.ttl, self.prefix])

    async def count_sessions(self) -> int:
        n = 0
        async for key in self.r.scan_iter(match=f"{self.prefix}:t:*:idx", count=1000):
            n += await self.r.zcard(key)
        return n

    # -- leases ------------------------------------------------------------------------------

    async def acquire_lease(self, tenant: str, sid: str, owner: str, seconds: float) -> LeaseResult:
        keys = [self._k(tenant, sid, "h"), self._k(tenant, sid, "lease")]
        res = await self._lease(keys=keys, args=[owner, int(seconds * 1000)])
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
        async with self.r.pipeline(transaction=False) as pipe:
            for tenant, sid in sessions:
                await self._renew(keys=[self._k(tenant, sid, "lease")], args=[owner, ms], client=pipe)
            res = await pipe.execute()
        return [bool(x) for x in res]

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
        """Write an immutable snapshot (chunks, then manifest); returns its id. Unpublished until CAS."""
        sid = uuid.uuid4().hex
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
        ex = self.ttl or None
        async with self.r.pipeline(transaction=False) as pipe:
            for i, c in enumerate(chunks):
                pipe.set(self.snap_key(sid, f"c:{i}"), c, ex=ex)
            pipe.set(self.snap_key(sid, "r"), 0, ex=ex)
            pipe.set(self.snap_key(sid, "m"), json.dumps(manifest), ex=ex)
            await pipe.execute()
        return sid

    async def drop_snapshot(self, snap: str) -> None:
        """Delete a snapshot nothing points at (one whose publish failed)."""
        m = await self.r.get(self.snap_key(snap, "m"))
        n = json.loads(m)["n"] if m else 0
        keys = [self.snap_key(snap, f"c:{i}") for i in range(n)] + [self.snap_key(snap, "m"), self.snap_key(snap, "r")]
        await self.r.delete(*keys)

    async def publish_snapshot(self, tenant: str, sid: str, fence: int, gen: int, snap: str, position: int) -> int:
        """1 published; -1 session gone, -2 fenced, -3 reset meanwhile, -4 position ahead of the log."""
        keys = [self._k(tenant, sid, "h"), self._k(tenant, sid, "log")]
        return int(await self._publish(keys=keys, args=[fence, gen, snap, position, self.prefix, self.ttl]))

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
