"""The token log: every piece the model read since the head's snapshot, appended exactly once.

Each entry (`md:s:{t/s}:log`) records one piece exactly as the model read it, `{"o": start offset,
"t": [ids]}`, so recovery (newest snapshot + replay of the log) is bit for bit the state that was
acknowledged. An append is a compare-and-set on the head's offset, fenced by the lease's token and
deduplicated by its append id (`md:s:{t/s}:ids`). Keys: docs/service.md, "The Redis layout".
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Literal

from memoryd.errors import DataLoss
from memoryd.store.db import Store
from memoryd.store.results import Logged, OffsetDiffers, Refusal


def tokens_hash(pieces: list[list[int]]) -> str:
    """A short digest of the pieces, so a retry with the same append_id but other tokens is caught."""
    h = hashlib.sha256(json.dumps(pieces, separators=(",", ":")).encode())
    return h.hexdigest()[:16]


def log_entry(start: int, tokens: list[int]) -> bytes:
    return json.dumps({"o": start, "t": tokens}, separators=(",", ":")).encode()


async def append(
    st: Store,
    tenant: str,
    sid: str,
    fence: int,
    start: int,
    pieces: list[list[int]],
    append_id: str = "",
    record: str = "",
) -> Logged | OffsetDiffers | Literal[Refusal.NOT_FOUND, Refusal.FENCED]:
    """Durably add pieces at `start` (compare-and-set on the offset, fenced, deduplicated): Logged (a
    duplicate when the append id was used before), or why not (the session is not at `start`, is gone,
    or another daemon took it over).

    `record` is kept with the append id (it may hold commas: it is the last field).
    With wait_replicas, Logged means the entry is on that many replicas.
    """
    entries, pos = [], start
    for p in pieces:
        entries.append(log_entry(pos, p))
        pos += len(p)
    th = tokens_hash(pieces) if append_id else ""
    value = f"{th},{record}" if record else th
    args = [fence, start, pos, append_id, value, st.ttl, time.time(), *entries]
    res = await st.write("append", st.keys.session_keys(tenant, sid), args)
    code = int(res[0])  # scripts._APPEND: {1}, {-1} gone, {-2} fenced, {-3, ids value}, {-4, offset}
    if code == 1:
        return Logged(start=start, offset=pos, tokhash=th, record=record)
    if code == -1:
        return Refusal.NOT_FOUND
    if code == -2:
        return Refusal.FENCED
    if code == -3:
        return Logged.parse_duplicate(res[1])
    return OffsetDiffers(int(res[1]))


async def find_append(st: Store, tenant: str, sid: str, append_id: str) -> Logged | None:
    """Where an append with this id landed, if it did (checked before any compute).

    With wait_replicas the find writes (`used`) and WAITs, so a found append is on the replicas.
    """
    if st.wait_replicas:
        keys = [st.keys.head(tenant, sid), st.keys.ids(tenant, sid)]
        d = await st.write("find", keys, [append_id, time.time()])
    else:
        d = await st.r.hget(st.keys.ids(tenant, sid), append_id)
    if d is None:
        return None
    return Logged.parse_duplicate(d)


async def read(st: Store, tenant: str, sid: str, from_offset: int, to_offset: int) -> list[list[int]]:
    """The pieces from `from_offset` to `to_offset`, checked to be contiguous."""
    return pieces_of(sid, await st.r.lrange(st.keys.log(tenant, sid), 0, -1), from_offset, to_offset)


def pieces_of(sid: str, raw: list[bytes], from_offset: int, to_offset: int) -> list[list[int]]:
    """The log entries `raw` (the whole list) from `from_offset` to `to_offset`, checked to be contiguous."""
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
