"""The Lua scripts: every single-slot step of the store, one script each.

Every script names every key it touches in KEYS, and all of a script's keys share a hash tag
(a session's `{t/s}`, a snapshot's `{id}`, a tenant's index, the journal): nothing is multi-slot,
so the same code runs on one Redis and on a Redis Cluster. The keys are described in docs/service.md
("The Redis layout"); the return values here are decoded into typed results by the module that
runs each script (heads, tokenlog, snapshots, leases).
"""

from __future__ import annotations

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

# KEYS: head, log, ids, lease.  ARGV: owner, ms, digest, ttl.  A load's one step in the session's slot:
# {1, head (HGETALL, fence bumped), log (LRANGE)} | {-1} no head | {-3, head} another model's (no lease taken)
# | {-2, holder, pttl} leased to another daemon.  With ttl > 0 the head, log and ids keys' TTLs are refreshed.
_TAKE = """
local head = redis.call('HGETALL', KEYS[1])
if #head == 0 then return {-1} end
if redis.call('HGET', KEYS[1], 'digest') ~= ARGV[3] then return {-3, head} end
local cur = redis.call('GET', KEYS[4])
if cur and cur ~= ARGV[1] then return {-2, cur, redis.call('PTTL', KEYS[4])} end
redis.call('SET', KEYS[4], ARGV[1], 'PX', ARGV[2])
redis.call('HINCRBY', KEYS[1], 'fence', 1)
local ttl = tonumber(ARGV[4])
if ttl > 0 then
  for i = 1, 3 do if redis.call('EXISTS', KEYS[i]) == 1 then redis.call('EXPIRE', KEYS[i], ttl) end end
end
return {1, redis.call('HGETALL', KEYS[1]), redis.call('LRANGE', KEYS[2], 0, -1)}
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
    "take": _TAKE,
    "renew": _RENEW,
    "touch": _TOUCH,
    "update_meta": _UPDATE_META,
}
"""Every Lua script, by name (the tests check that each names every key it touches in KEYS)."""
