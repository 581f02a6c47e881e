"""The recall indexes of one daemon's sessions, kept in step with their logs.

Where things live (measured by bench/recall_index.py and bench/recall_cost.py): the tokens
in Redis (`pages`, a copy the snapshots never trim, about 4 KB per 1,000 tokens), the index
in this daemon's memory (about 7.3 KB per 1,000 tokens), built from the tokens the first time
a session is recalled from (about half a second for 64K tokens on one core) and grown by
every commit after that. Keeping the index in Redis instead would store about twice the
bytes, add its postings to every append's write and still need the tokens for span text;
a fork could not share it either (its postings of [0, X) are not a prefix of anything
stored). So Redis keeps what cannot be recomputed, and the daemon what can.

Each session incarnation (its head's `created` and `gen`: a reset, or a delete and a new
session with the same id, is a new one) owns its recall log; a tip left by another
incarnation is dropped before anything is written.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from memoryd.sessions.ordering import Key
from memoryd.sessions.recall import Recalled, RecalledSpan, transfer
from memoryd.sessions.recall.index import SpanIndex
from memoryd.sessions.recall.pages import Pages, Run
from memoryd.sessions.recall.spans import Shape
from memoryd.store.db import Store
from memoryd.store.heads import Head
from memoryd.store.redis_client import UNAVAILABLE_ERRORS

if TYPE_CHECKING:
    from memoryd.sessions.chat import ChatFormat

log = logging.getLogger("memoryd.sessions.recall")

MAX_SESSIONS = 1 << 16
"""Loaded sessions whose incarnation is remembered (least recently loaded first to go: a commit to one
that was forgotten reloads it, which remembers it again)."""
MAX_INDEX_BYTES = 256 << 20
"""Memory for the indexes of this daemon's sessions (least recently used ones are dropped past it:
each is rebuilt from Redis when recalled from again): about 35,000 sessions of 1,000 tokens."""


class Decoder(Protocol):
    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


def turn_start(tok: Decoder, chat: ChatFormat | None) -> int | None:
    """The token that opens every turn of the chat template (ChatML's <|im_start|>), or None.

    It is the first token of the generation prompt when that token is one of the template's
    special tokens (message content may not hold those, so it marks turns and nothing else)."""
    if chat is None or chat.problem or not chat.generation_prompt:
        return None
    for s in chat.specials:
        if chat.generation_prompt.startswith(s):
            ids = tok.encode(s)
            return ids[0] if len(ids) == 1 else None
    return None


def recall_indexes(store: Store, tok: Decoder, chat: ChatFormat | None, ttl_seconds: int) -> RecallIndexes:
    """The daemon's recall indexes; the recall log's keys live twice the session TTL (see `Pages`)."""
    return RecallIndexes(Pages(store, 2 * ttl_seconds), tok.decode, Shape(turn_start(tok, chat)))


def incarnation(head: Head) -> str:
    return f"{head.created!r}/{head.gen}"


@dataclass
class _Cached:
    inc: str
    index: SpanIndex
    nbytes: int


class RecallIndexes:
    def __init__(
        self, pages: Pages, decode: Callable[[list[int]], str], shape: Shape, max_bytes: int = MAX_INDEX_BYTES
    ) -> None:
        self.pages = pages
        self.decode = decode
        self.shape = shape
        self.max_bytes = max_bytes
        self._cached: OrderedDict[Key, _Cached] = OrderedDict()
        self._bytes = 0
        self._created: OrderedDict[Key, float] = OrderedDict()
        """Each loaded session's head `created`: with the hot state's `gen`, its incarnation."""
        self._touched: dict[Key, float] = {}
        """When each session's recall keys last had their TTL refreshed (monotonic seconds)."""

    def _inc(self, key: Key, gen: int) -> str | None:
        created = self._created.get(key)
        return None if created is None else f"{created!r}/{gen}"

    def _forget(self, key: Key) -> None:
        c = self._cached.pop(key, None)
        if c is not None:
            self._bytes -= c.nbytes

    def _keep(self, key: Key, c: _Cached) -> None:
        self._forget(key)
        c.nbytes = c.index.nbytes()
        self._cached[key] = c
        self._bytes += c.nbytes
        while self._bytes > self.max_bytes and len(self._cached) > 1:
            old, _ = next(iter(self._cached.items()))
            self._forget(old)

    # -- the session lifecycle (each called with the session's lock held) ----------------------

    async def loaded(self, key: Key, head: Head, pieces: list[list[int]]) -> None:
        """The session was loaded from its head and its log tail [snap_off, offset): catch the recall log up.

        A crash between a commit and its copy here left the copy behind; the log tail still has those
        tokens unless a snapshot trimmed them since (then the recall log has a gap there)."""
        tenant, sid = key
        self._created[key] = head.created
        self._created.move_to_end(key)
        if len(self._created) > MAX_SESSIONS:
            old, _ = self._created.popitem(last=False)
            self._touched.pop(old, None)
        inc = incarnation(head)
        tip = await self.pages.tip(tenant, sid)
        if tip is not None and tip.inc != inc:
            await self.pages.drop(tenant, sid)
            tip = None
        end = tip.end if tip is not None else None
        await self._touch(key)
        if end is not None and end >= head.offset:
            return
        start, tokens = head.snap_off, [t for p in pieces for t in p]
        if end is not None and end > start:
            tokens, start = tokens[end - start :], end
        if not tokens:
            return
        if start > (end or 0):
            log.warning("session %s: tokens [%d, %d) are gone from the log: not recallable", key, end or 0, start)
        await self.pages.append(tenant, sid, inc, start, tokens, gap=True)

    async def _touch(self, key: Key) -> None:
        """The recall keys' TTLs (twice the session's) refreshed on load and then at least every quarter
        of the session TTL while it is in use, as the session's own keys are."""
        self._touched[key] = time.monotonic()
        await self.pages.touch(*key)

    async def appended(self, key: Key, gen: int, start: int, pieces: list[list[int]]) -> bool:
        """Committed pieces at `start`: copied to the recall log, added to the index if it is in memory.

        False if the copy could not be made in order (the caller reloads the session, which catches up)."""
        inc = self._inc(key, gen)
        tokens = [t for p in pieces for t in p]
        if inc is None or not tokens:
            return inc is not None
        try:
            end = await self.pages.append(*key, inc, start, tokens, gap=False)
        except UNAVAILABLE_ERRORS as e:  # the commit stands; the reload this asks for catches up
            log.warning("session %s: copying tokens to the recall log failed (%s); reloading it", key, e)
            end = -3
        if end < 0:
            self._forget(key)
            return False
        if self.pages.ttl and time.monotonic() - self._touched.get(key, 0.0) > self.pages.ttl / 8:
            try:
                await self._touch(key)
            except UNAVAILABLE_ERRORS as e:
                log.warning("session %s: refreshing the recall log's TTL failed (%s)", key, e)
        c = self._cached.get(key)
        if c is not None:
            if c.inc == inc and c.index.end == start:
                c.index.extend(start, tokens)
                self._keep(key, c)
            else:
                self._forget(key)
        return True

    async def forked(self, tenant: str, src: Head | None, dst: Head, offset: int) -> None:
        """dst was forked from src at `offset`: it shares src's recall log below it."""
        if src is None:
            return
        try:
            x = await self.pages.fork(
                tenant, src.session_id, dst.session_id, offset, incarnation(src), incarnation(dst)
            )
        except UNAVAILABLE_ERRORS as e:  # the fork stands; its recall log starts from its own token log
            log.warning("fork %s/%s: sharing the recall log failed (%s)", tenant, dst.session_id, e)
            return
        c = self._cached.get((tenant, src.session_id))
        if x == offset and c is not None and c.inc == incarnation(src) and c.index.end >= offset:
            index = c.index.prefix(offset)  # milliseconds, where a rebuild from Redis reads and re-indexes it all
            if index is not None:
                self._keep((tenant, dst.session_id), _Cached(incarnation(dst), index, 0))

    async def dropped(self, key: Key, deleted: bool) -> None:
        """Deleted or reset: the recall log and index go."""
        self._forget(key)
        if deleted:
            self._created.pop(key, None)
            self._touched.pop(key, None)
        try:
            await self.pages.drop(*key)
        except UNAVAILABLE_ERRORS as e:  # what is left belongs to an old incarnation: dropped when next seen
            log.warning("session %s: dropping the recall log failed (%s)", key, e)

    async def exported(self, head: Head) -> bytes:
        """The recall log below the head's offset (`transfer` bytes), for an export of that head's state."""
        got = await self.pages.read(head.tenant, head.session_id, head.offset)
        if got is None or got[0] != incarnation(head):
            return transfer.encode([])
        return transfer.encode(got[1])

    async def imported(self, key: Key, head: Head, runs: list[Run]) -> None:
        """A session just imported (head at the state's offset): its recall log from the export's."""
        self._created[key] = head.created
        inc = incarnation(head)
        await self.pages.drop(*key)  # a leftover of an earlier session with this id
        for run in runs:
            await self.pages.append(*key, inc, run.start, run.tokens, gap=True)

    # -- recall --------------------------------------------------------------------------------

    async def index(self, key: Key, gen: int, position: int) -> SpanIndex | None:
        inc = self._inc(key, gen)
        if inc is None:
            return None
        c = self._cached.get(key)
        if c is not None and c.inc == inc and c.index.end == position:
            self._cached.move_to_end(key)
            return c.index
        got = await self.pages.read(*key, position)
        if got is None or got[0] != inc or not got[1]:
            return None
        index = await asyncio.to_thread(self._build, got[1])  # ~0.5 s at 64K tokens: not on the event loop
        self._keep(key, _Cached(inc, index, 0))
        return index

    def _build(self, runs: list[Run]) -> SpanIndex:
        index = SpanIndex(self.shape, self.decode, runs[0].start)
        for run in runs:
            index.extend(run.start, run.tokens)
        return index

    async def tail(self, key: Key, gen: int, position: int, n: int) -> tuple[int, str]:
        """Where the log's last `n` tokens start, and their text (from the start of what is kept, if later)."""
        index = await self.index(key, gen, position)
        if index is None:
            return position, ""
        start = max(position - n, index.base)
        return start, index.text_of(start, position)

    async def recall(self, key: Key, gen: int, position: int, query: str, k: int) -> Recalled:
        index = await self.index(key, gen, position)
        if index is None:
            return Recalled()
        spans = [RecalledSpan(h.start, h.end, index.text(h), h.score) for h in index.search(query, k)]
        return Recalled(spans, index.idf(query))
