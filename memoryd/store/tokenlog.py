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
from dataclasses import dataclass

from memoryd.errors import DataLoss
from memoryd.store.db import Store


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
    args = [fence, start, pos, append_id, value, st.ttl, time.time(), *entries]
    res = await st.write("append", st.keys.session_keys(tenant, sid), args)
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


async def find_append(st: Store, tenant: str, sid: str, append_id: str) -> AppendResult | None:
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
    return AppendResult.parse_duplicate(d)


async def read(st: Store, tenant: str, sid: str, from_offset: int, to_offset: int) -> list[list[int]]:
    """The pieces from `from_offset` to `to_offset`, checked to be contiguous."""
    raw = await st.r.lrange(st.keys.log(tenant, sid), 0, -1)
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
