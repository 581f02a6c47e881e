"""The recall log in Redis: every token a session's log ever held, in pages shared by forks.

The session's token log in Redis is trimmed whenever a snapshot is published (the tokens
before the snapshot live on only inside the model state), so the recall index cannot be
rebuilt from it. This keeps its own copy of the tokens, written after each commit (and
caught up from the session's log tail on load, which still holds whatever a crash kept
from being copied), and the index is rebuilt from it in the daemon that serves the session.

Layout (documented with the rest in docs/service.md; `{tenant}` is the hash tag, so a
tenant's recall keys share one cluster slot and every script below is single-slot):

    md:rx:{tenant}:tip:{sid}  HASH   inc (the session incarnation: head `created` / `gen`),
                                     base (newest page of its chain, "" if none), cut (the
                                     chain holds tokens below this), from (where the tail starts)
    md:rx:{tenant}:tail:{sid} STRING the tokens [from, ...), little-endian uint32 each
    md:rx:{tenant}:p:{pid}    HASH   o (first offset), toks (uint32 LE), prev (older page or ""),
                                     pcut (prev holds tokens below this); immutable once written
    md:rx:{tenant}:rc         HASH   pid -> references (tips and pages whose base/prev it is); it never
                                     expires, so no count is lost while a page it counts lives

A tail reaching PAGE_TOKENS is sealed into a page. A fork at X is O(1): the new tip points
at the source's chain with cut X (sealing the source's tail first if X falls in it), one
reference more; nothing is copied, and later appends of either go to its own tail. Delete,
reset and an incarnation mismatch drop the tip and release its chain (a page is deleted
with its last reference, then its prev is released). With a TTL, tips, tails and pages
expire like the session's own keys, refreshed when the session is loaded or appended to.
"""

from __future__ import annotations

import sys
import uuid
from array import array
from dataclasses import dataclass
from typing import Any

from memoryd.store.db import Store

PAGE_TOKENS = 4096
"""Tokens per sealed page (16 KiB): a 64K-token session reads its chain in 16 steps, and a tail
(rewritten by nothing, appended by APPEND) stays small."""

# KEYS: tip, tail, rc, page a, page b.  ARGV: inc, start, tokens, page tokens, pid a, ttl, gap ok, pid b
# {1, end} written (or {0, end}: already there), {-1, 0} the tip is another incarnation's, {-2, end} start > end.
# Tokens already there are not rewritten: what the log holds at an offset is fixed for an incarnation.
_APPEND = """
local start = tonumber(ARGV[2])
local data = ARGV[3]
local n = string.len(data) / 4
local inc = redis.call('HGET', KEYS[1], 'inc')
if not inc then
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'inc', ARGV[1], 'base', '', 'cut', start, 'from', start)
elseif inc ~= ARGV[1] then
  return {-1, 0}
end
local from = tonumber(redis.call('HGET', KEYS[1], 'from'))
local have = redis.call('STRLEN', KEYS[2]) / 4
local e = from + have
local ttl = tonumber(ARGV[6])
local function seal(page, pid)
  local base = redis.call('HGET', KEYS[1], 'base')
  local cut = redis.call('HGET', KEYS[1], 'cut')
  redis.call('HSET', page, 'o', from, 'toks', redis.call('GET', KEYS[2]), 'prev', base, 'pcut', cut)
  if ttl > 0 then redis.call('EXPIRE', page, ttl) end
  redis.call('HSET', KEYS[3], pid, 1)
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'base', pid, 'cut', e, 'from', e)
  from, have = e, 0
end
if start > e then
  if ARGV[7] ~= '1' then return {-2, e} end
  if have > 0 then seal(KEYS[4], ARGV[5]) end
  redis.call('HSET', KEYS[1], 'from', start)
  from, e = start, start
elseif start < e then
  if start + n <= e then return {0, e} end
  data = string.sub(data, (e - start) * 4 + 1)
end
redis.call('APPEND', KEYS[2], data)
have = redis.call('STRLEN', KEYS[2]) / 4
e = from + have
if have >= tonumber(ARGV[4]) then seal(KEYS[5], ARGV[8]) end
if ttl > 0 then
  redis.call('EXPIRE', KEYS[1], ttl)
  if redis.call('EXISTS', KEYS[2]) == 1 then redis.call('EXPIRE', KEYS[2], ttl) end
end
return {1, e}
"""

# KEYS: src tip, src tail, dst tip, dst tail, rc, new page.  ARGV: x, src inc, dst inc, new pid, ttl
# {1, x} forked (x: the dst's recall log ends there), {0} the source's recall log is another incarnation's
# or missing, {-1} dst already has a tip.
_FORK = """
if redis.call('EXISTS', KEYS[3]) == 1 then return {-1} end
if redis.call('HGET', KEYS[1], 'inc') ~= ARGV[2] then return {0} end
local x = tonumber(ARGV[1])
local base = redis.call('HGET', KEYS[1], 'base')
local cut = tonumber(redis.call('HGET', KEYS[1], 'cut'))
local from = tonumber(redis.call('HGET', KEYS[1], 'from'))
local have = redis.call('STRLEN', KEYS[2]) / 4
local e = from + have
local ttl = tonumber(ARGV[5])
if x > e then x = e end
local dcut = x
if x > from then
  redis.call('HSET', KEYS[6], 'o', from, 'toks', redis.call('GET', KEYS[2]), 'prev', base, 'pcut', cut)
  if ttl > 0 then redis.call('EXPIRE', KEYS[6], ttl) end
  redis.call('HSET', KEYS[5], ARGV[4], 1)
  redis.call('DEL', KEYS[2])
  redis.call('HSET', KEYS[1], 'base', ARGV[4], 'cut', e, 'from', e)
  base = ARGV[4]
elseif x > cut then
  dcut = cut
end
if base ~= '' then redis.call('HINCRBY', KEYS[5], base, 1) end
redis.call('HSET', KEYS[3], 'inc', ARGV[3], 'base', base, 'cut', dcut, 'from', x)
redis.call('DEL', KEYS[4])
if ttl > 0 then redis.call('EXPIRE', KEYS[3], ttl) end
return {1, x}
"""

# KEYS: tip, tail.  The tip's base ("" if none; false if there was no tip); both deleted.
_DROP = """
local base = redis.call('HGET', KEYS[1], 'base')
redis.call('DEL', KEYS[1], KEYS[2])
return base
"""

# KEYS: rc, page.  ARGV: pid.  The page's prev if this was its last reference (the page is deleted), else "".
_RELEASE = """
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], -1)
if n > 0 then return '' end
redis.call('HDEL', KEYS[1], ARGV[1])
local prev = redis.call('HGET', KEYS[2], 'prev') or ''
redis.call('DEL', KEYS[2])
return prev
"""

SCRIPTS = {"append": _APPEND, "fork": _FORK, "drop": _DROP, "release": _RELEASE}


def pack(tokens: list[int]) -> bytes:
    a = array("I", tokens)
    if sys.byteorder != "little":
        a.byteswap()
    return a.tobytes()


def unpack(data: bytes) -> list[int]:
    a = array("I")
    a.frombytes(data)
    if sys.byteorder != "little":
        a.byteswap()
    return a.tolist()


@dataclass(frozen=True, slots=True)
class Tip:
    inc: str
    end: int


@dataclass(frozen=True, slots=True)
class Run:
    """Tokens at [start, start + len(tokens)) of the log (runs are ordered; a gap between two is unrecallable)."""

    start: int
    tokens: list[int]


class Pages:
    """The recall log's Redis side (one instance per daemon, on the store's client)."""

    def __init__(self, store: Store, ttl_seconds: int = 0, page_tokens: int = PAGE_TOKENS) -> None:
        self.r = store.r
        self.prefix = store.prefix
        self.ttl = ttl_seconds
        self.page_tokens = page_tokens
        self.store = store
        self._s = {name: self.r.register_script(src) for name, src in SCRIPTS.items()}

    async def _write(self, name: str, keys: list[str], args: list[object]) -> Any:
        """A writing script, WAITing for the store's `wait_replicas` as the token log's writes do
        (`Store.write_script`), so what a failover keeps of the recall log is what was acknowledged."""
        return await self.store.write_script(self._s[name], keys, args)

    def _k(self, tenant: str, what: str) -> str:
        return f"{self.prefix}:rx:{{{tenant}}}:{what}"

    def _tip(self, tenant: str, sid: str) -> list[str]:
        return [self._k(tenant, f"tip:{sid}"), self._k(tenant, f"tail:{sid}")]

    async def tip(self, tenant: str, sid: str) -> Tip | None:
        tip, tail = self._tip(tenant, sid)
        pipe = self.r.pipeline(transaction=False)
        pipe.hmget(tip, "inc", "from")
        pipe.strlen(tail)
        (inc, frm), n = await pipe.execute()
        if inc is None:
            return None
        return Tip(inc.decode(), int(frm) + int(n) // 4)

    async def append(self, tenant: str, sid: str, inc: str, start: int, tokens: list[int], gap: bool) -> int:
        """Write tokens at `start`; returns where the recall log now ends, or -1 (another incarnation's tip:
        drop it first), or -2 (start is past the end and `gap` is False)."""
        keys = [*self._tip(tenant, sid), self._k(tenant, "rc")]
        pids = [uuid.uuid4().hex, uuid.uuid4().hex]  # a gap seals the tail, and the new tail may fill a page
        keys += [self._k(tenant, f"p:{pid}") for pid in pids]
        args = [inc, start, pack(tokens), self.page_tokens, pids[0], self.ttl, "1" if gap else "0", pids[1]]
        code, end = await self._write("append", keys, args)
        return int(end) if int(code) >= 0 else int(code)

    async def fork(self, tenant: str, src: str, dst: str, x: int, src_inc: str, dst_inc: str) -> int | None:
        """The dst's recall log: the src's below x, shared. None when the src has none of this incarnation."""
        pid = uuid.uuid4().hex
        keys = [*self._tip(tenant, src), *self._tip(tenant, dst), self._k(tenant, "rc"), self._k(tenant, f"p:{pid}")]
        res = await self._write("fork", keys, [x, src_inc, dst_inc, pid, self.ttl])
        if int(res[0]) == -1:  # a leftover of an earlier session with this id: drop it, then share
            await self.drop(tenant, dst)
            res = await self._write("fork", keys, [x, src_inc, dst_inc, pid, self.ttl])
        return int(res[1]) if int(res[0]) == 1 else None

    async def drop(self, tenant: str, sid: str) -> None:
        base = await self._write("drop", self._tip(tenant, sid), [])
        pid = base.decode() if base else ""
        while pid:
            prev = await self._write("release", [self._k(tenant, "rc"), self._k(tenant, f"p:{pid}")], [pid])
            pid = prev.decode() if prev else ""

    async def touch(self, tenant: str, sid: str) -> None:
        """Refresh the TTL of the tip, its tail and every page of its chain (pages are shared: each
        session using one refreshes it)."""
        if not self.ttl:
            return
        tip, tail = self._tip(tenant, sid)
        pipe = self.r.pipeline(transaction=False)
        pipe.hget(tip, "base")
        pipe.expire(tip, self.ttl)
        pipe.expire(tail, self.ttl)
        base, *_ = await pipe.execute()
        pid = base.decode() if base else ""
        while pid:
            key = self._k(tenant, f"p:{pid}")
            pipe = self.r.pipeline(transaction=False)
            pipe.hget(key, "prev")
            pipe.expire(key, self.ttl)
            prev, _ = await pipe.execute()
            pid = prev.decode() if prev else ""

    async def read(self, tenant: str, sid: str, upto: int) -> tuple[str, list[Run]] | None:
        """The incarnation and the runs of tokens below `upto`, oldest first (refreshing TTLs on the way)."""
        tip, tail = self._tip(tenant, sid)
        pipe = self.r.pipeline(transaction=False)
        pipe.hgetall(tip)
        pipe.get(tail)
        if self.ttl:
            pipe.expire(tip, self.ttl)
            pipe.expire(tail, self.ttl)
        h, data, *_ = await pipe.execute()
        if not h:
            return None
        runs: list[Run] = []
        frm = int(h[b"from"])
        if data and frm < upto:
            toks = unpack(data)
            runs.append(Run(frm, toks[: upto - frm]))
        pid, limit = h[b"base"].decode(), min(int(h[b"cut"]), upto)
        while pid:
            key = self._k(tenant, f"p:{pid}")
            pipe = self.r.pipeline(transaction=False)
            pipe.hgetall(key)
            if self.ttl:
                pipe.expire(key, self.ttl)
            page, *_ = await pipe.execute()
            if not page:  # expired or freed under us: what is older is unreachable
                break
            o = int(page[b"o"])
            if o < limit:
                runs.append(Run(o, unpack(page[b"toks"])[: limit - o]))
            pid, limit = page[b"prev"].decode(), min(int(page[b"pcut"]), limit)
        runs.reverse()
        return h[b"inc"].decode(), [r for r in runs if r.tokens]
