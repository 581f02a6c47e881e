"""What the store's calls return: typed outcomes, one meaning each, the same in every call.

The Lua scripts answer with small integers (memoryd/store/scripts.py); each is decoded into these
types right where its script is run (heads.py, tokenlog.py, snapshots.py, leases.py), so no integer
leaves the store. A call's signature lists exactly the outcomes it can have, and callers match on them:

    match await heads.fork(st, ...):
        case Ok(offset): ...
        case OffsetDiffers(offset): ...
        case Refusal.TAKEN: ...
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from memoryd.store.heads import Head


class Refusal(enum.Enum):
    """Why a store call changed nothing (the same member means the same thing in every call)."""

    NOT_FOUND = "not_found"
    """The session (a fork's source) does not exist."""
    TAKEN = "taken"
    """The session id is taken (create, import, a fork's target)."""
    AT_LIMIT = "at_limit"
    """The tenant has reached its session limit."""
    FENCED = "fenced"
    """Another daemon took the session's lease since this one did (the head's fencing token moved on)."""
    FOREIGN_MODEL = "foreign_model"
    """A fork's source was stored under another model than the one asked for."""
    RESET_MEANWHILE = "reset_meanwhile"
    """Publish: the head was reset (or its snapshot changed) since the snapshot's state was read."""
    AHEAD_OF_LOG = "ahead_of_log"
    """Publish: the snapshot's position is past the head's offset."""
    TOO_LATE = "too_late"
    """Publish: the step took longer than the window, or the sweep took the unpublished snapshot
    (drop it and try again later)."""


@dataclass(frozen=True)
class Ok:
    """Done. `offset`: the session's offset after the call, for the calls that report one (fork, delete)."""

    offset: int = 0


@dataclass(frozen=True)
class OffsetDiffers:
    """Refusal: the caller's expected offset is not the session's (`offset`: where the session is)."""

    offset: int


@dataclass(frozen=True)
class Logged:
    """Pieces are in the token log from `start` to `offset` (`duplicate`: by an earlier call with the same
    append id, whose tokens hash to `tokhash` and whose writer kept `record` with it)."""

    start: int
    offset: int
    tokhash: str = ""
    record: str = ""
    """What the writer stored with the append id beside the offsets (a generation's output)."""
    duplicate: bool = False

    @classmethod
    def parse_duplicate(cls, value: bytes) -> Logged:
        """The `md:s:{t/s}:ids` value "start,end,tokens-hash[,record]" of an earlier append."""
        s, e, h, *rest = value.decode().split(",", 3)
        return cls(start=int(s), offset=int(e), tokhash=h, record=rest[0] if rest else "", duplicate=True)


@dataclass(frozen=True)
class Leased:
    """This daemon holds the session's lease now; `fence` is the fencing token its head writes carry."""

    fence: int


@dataclass(frozen=True)
class Taken:
    """A load's step (memoryd/store/leases.py `take`): this daemon holds the lease now (`head.fence` is the
    fencing token its head writes carry), and `pieces` is the token log from the head's snapshot to its
    offset, read in the same script."""

    head: Head
    pieces: list[list[int]]


@dataclass(frozen=True)
class OtherModel:
    """Refusal (a load): the session was stored under another model (`head`); no lease was taken."""

    head: Head


@dataclass(frozen=True)
class HeldElsewhere:
    """Another daemon (`holder`, its instance id) holds the lease, for `ttl_ms` more unless it renews it."""

    holder: str
    ttl_ms: int


@dataclass(frozen=True)
class EntryDiffers:
    """Refusal (UpdateSession): the caller's expected metadata entry `key` is not the session's."""

    key: str


@dataclass(frozen=True)
class TooManyEntries:
    """Refusal (UpdateSession): the metadata would hold `entries` entries, over the limit."""

    entries: int
