"""The recall log as bytes, so an export can carry it and an import rebuild recall from it.

An export's state bytes hold the model state only (the token log before the newest
snapshot is gone from Redis), so the tokens recall needs travel beside them:

    b"memoryd-recall-log/1\\n", then per run of the log: start (uint64 LE), n (uint32 LE),
    n tokens (uint32 LE each)

Runs are increasing and do not overlap; a gap between two is a part of the log that was
not recallable at the source either. `decode` checks everything an importer sends (magic,
lengths, order, the state's offset, the model's vocabulary) before anything is written.
"""

from __future__ import annotations

import struct

from memoryd.sessions.recall.pages import Run, pack, unpack

MAGIC = b"memoryd-recall-log/1\n"
_RUN = struct.Struct("<QI")


class BadRecallLog(ValueError):
    """Bytes that are not a recall log for this import; the message says what is wrong."""


def encode(runs: list[Run]) -> bytes:
    parts = [MAGIC]
    for r in runs:
        parts += [_RUN.pack(r.start, len(r.tokens)), pack(r.tokens)]
    return b"".join(parts)


def decode(data: bytes, offset: int, vocab_size: int) -> list[Run]:
    """The runs of a recall log for a session whose state is at `offset`."""
    if not data.startswith(MAGIC):
        raise BadRecallLog(f"it does not start with {MAGIC!r}")
    runs: list[Run] = []
    at, end = len(MAGIC), 0
    while at < len(data):
        if len(data) - at < _RUN.size:
            raise BadRecallLog(f"it ends inside a run header at byte {at}")
        start, n = _RUN.unpack_from(data, at)
        at += _RUN.size
        if n == 0 or len(data) - at < 4 * n:
            raise BadRecallLog(f"the run at offset {start} says {n} tokens and {len(data) - at} bytes follow")
        if start < end:
            raise BadRecallLog(f"the run at offset {start} overlaps the one before (which ends at {end})")
        end = start + n
        if end > offset:
            raise BadRecallLog(f"the run at offset {start} ends at {end}, past the state's offset {offset}")
        tokens = unpack(data[at : at + 4 * n])
        at += 4 * n
        if max(tokens) >= vocab_size:
            raise BadRecallLog(f"the run at offset {start} holds token {max(tokens)}, outside the vocabulary")
        runs.append(Run(start, tokens))
    return runs
