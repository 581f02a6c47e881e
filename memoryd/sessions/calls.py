"""The session calls and their durability protocol.

Each call takes the session's turn (`ordering`), finds or loads its hot state
(`residency`; loading is lease + snapshot + log replay), has the engine compute on
an O(1) copy (`engine`: all model work, batched with other sessions' work), makes
the change durable in Redis (the token log, compare-and-set on the offset, fenced
by the lease) and only then swaps the copy in: a failure anywhere leaves the hot
state exactly as it was.  Snapshots are written every `snapshot_interval` steps and
on eviction; what to stream and commit of a generation is `output`'s policy.

Under load (issue 20): a call pins its session from arrival to end, so a session loaded
for a call is not evicted before that call has run; a load waits, in arrival order, for
room in the byte budget (`residency`); a call is refused early when the work queued ahead
of it is over the limit or would outlast its deadline (`admission`).  Work nobody will use
once its caller has left (an append without append_id, a dry-run generation) is submitted
with the call's deadline and dropped when it passes; work that is safe to finish is
finished: a load runs to the end and stays hot for the retry, and an append with an
append_id is recorded, so its retry is answered as a duplicate.

No torch here: states are opaque handles that only the engine's worker reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from memoryd import allocator, metrics
from memoryd.engine.work import (
    Append,
    Appended,
    Built,
    Export,
    Exported,
    Finished,
    Generate,
    Import,
    Rebuild,
    Refused,
    RefusedError,
    Result,
    SamplingParams,
    Work,
)
from memoryd.errors import (
    Aborted,
    AlreadyExists,
    DataLoss,
    FailedPrecondition,
    ForeignSession,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    ServiceError,
    Unavailable,
)
from memoryd.sessions.admission import Backlog, deadline, set_deadline
from memoryd.sessions.leases import maintain_forever, redis_errors
from memoryd.sessions.ordering import Key, SessionLocks
from memoryd.sessions.output import CommitRule, GenEvent, SampleText, kept_output, record, replayed
from memoryd.sessions.recall import RecalledSpan, transfer
from memoryd.sessions.recall.indexes import RecallIndexes, recall_indexes
from memoryd.sessions.recall.pages import Run
from memoryd.sessions.recall_prompt import NOTHING, RecallAsk, RecallContext, recall_context
from memoryd.sessions.residency import Hot, Residency
from memoryd.sessions.routing import Moved
from memoryd.settings import Settings
from memoryd.store import heads, leases, snapshots, tokenlog
from memoryd.store.db import Store
from memoryd.store.heads import Head
from memoryd.store.results import (
    EntryDiffers,
    HeldElsewhere,
    Logged,
    OffsetDiffers,
    Ok,
    OtherModel,
    Refusal,
    Taken,
    TooManyEntries,
)
from memoryd.store.tokenlog import tokens_hash

if TYPE_CHECKING:
    from memoryd.engine.core import Engine
    from memoryd.sessions.chat import ChatFormat
    from model.tokenizer import Tokenizer

__all__ = ["AppendOutcome", "CommitRule", "GenEvent", "Info", "SamplingParams", "Sessions"]

log = logging.getLogger("memoryd.sessions.calls")
KEEP_SENT = CommitRule()
"""A commit keeps exactly the text the client was sent, and nothing after it."""
Content = list[int] | Callable[[int], list[int]]
"""Token ids, or a function of the offset they will land at (chat messages render differently at 0)."""


_waited: contextvars.ContextVar[tuple[Key, float] | None] = contextvars.ContextVar("memoryd_waited", default=None)
"""The session whose lock this call holds, and since when it waited for it (see `Sessions._held`)."""


def tokens_at(content: Content, offset: int) -> list[int]:
    return content(offset) if callable(content) else content


@dataclass
class Info:
    """What `get` and `list` report."""

    head: Head
    pending: int
    steps: int
    state_bytes: int
    hot: bool
    stored_bytes: int = 0
    """Bytes in Redis: the newest snapshot plus the token log after it (`Store.stored_bytes`); `get` and `list`
    fill it in, loaded or not."""


@dataclass
class AppendOutcome:
    start: int
    offset: int
    tokens: int
    steps: int
    duplicate: bool
    pending: int


class Sessions:
    """The session table of one daemon."""

    def __init__(
        self, engine: Engine, tokenizer: Tokenizer, store: Store, settings: Settings, chat: ChatFormat | None = None
    ) -> None:
        self.engine = engine
        self.model = engine.model  # the edge reads its config (vocabulary, template); nothing here runs it
        self.digest = engine.digest
        self.tok = tokenizer
        self.chat = chat
        self.store = store
        self.s = settings
        self.hot = Residency(settings.memory_budget)
        self.lock = SessionLocks()
        self._unavailable_at: dict[Key, float] = {}
        """When a call holding the session's lock last failed UNAVAILABLE (cleared by a call that succeeds)."""
        self._bg: set[asyncio.Task] = set()
        self.owner = settings.daemon_id
        self._loads: dict[Key, asyncio.Task[Hot]] = {}
        """Loads under way: a retry of a call that left joins its load instead of starting another."""
        self._admit = asyncio.Lock()
        """Loads wait for room in the budget one at a time, in arrival order (asyncio.Lock is FIFO)."""
        self._state_bytes = engine.full_bytes
        """A full state's bytes (or a larger one seen): a load reserves twice that (the snapshot's bytes
        and the state built from them), and a call in progress is charged it for its working copy."""
        self.hot.copy_bytes = self._state_bytes
        self.hot.copy_bound = engine.copy_bytes
        self._load_seconds = self._evict_seconds = 0.0
        """How long a load takes (Redis reads, deserialize, replay) and an eviction to make room for it, lately:
        loads make room one at a time, so admission prices each cold session ahead at their sum."""
        self.backlog = Backlog(
            settings.max_queued_tokens,
            lambda: engine.seconds_per_token,
            lambda: self._load_seconds + self._evict_seconds,
        )
        self.recalls: RecallIndexes = recall_indexes(store, tokenizer, chat, settings.ttl_seconds)

    # -- plumbing ----------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _held(
        self, key: Key, load: bool = True, tokens: int | None = None, frozen: int = 0
    ) -> AsyncIterator[None]:
        """The session's turn (`_turn`; `load=False`: a call that never loads the state), then its lock.
        `tokens`: what the call reads into its copy of the state, if known, and `frozen`, what it reads
        into a frozen copy besides (residency charges the copies: `Engine.copy_bytes`).

        A call that waited for the lock while its holder failed UNAVAILABLE (Redis stalled or gone)
        answers UNAVAILABLE as soon as it needs Redis (see `_redis`): trying Redis again would add
        another Redis timeout to its answer, and a queue of calls would each add one. What it can do
        without Redis (a generation on a hot session, not committed) it still does."""
        since = time.monotonic()
        await self._turn(
            key, load, tokens, frozen
        )  # pinned from here: not evicted while it waits for the lock or works
        try:
            async with self.lock(key):
                _waited.set((key, since))
                try:
                    yield
                except Unavailable:
                    self._unavailable_at[key] = time.monotonic()
                    raise
                finally:
                    _waited.set(None)
                self._unavailable_at.pop(key, None)
        finally:
            if key not in self._loads:  # room reserved by its turn that no load took (the call left or failed)
                self.hot.unreserve(key)
            self.hot.unpin(key, tokens, frozen)

    def _admitted(self, key: Key, tokens: int, timeout: float | None) -> contextlib.AbstractContextManager[None]:
        """The call counted in the backlog (or refused early): its tokens, and a load unless its turn will find
        the session hot: when a call is on it already (it joins that turn), or it is hot and no call waits for a
        turn (else the loads ahead of it may evict it first: `_turn`). `timeout`: seconds left before the
        caller's deadline (None: none), kept for everything the call does (the engine drops work nobody will
        use once it passes)."""
        set_deadline(timeout)
        joins = self.hot.pinned(key) or (self.hot.peek(key) is not None and not self._admit.locked())
        return self.backlog.admitted(tokens, not joins)

    async def _finish_anyway(self, coro: Any) -> Any:
        """Run `coro` to the end even if this call is cancelled (its caller left): work safe to finish."""
        task = asyncio.get_running_loop().create_task(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)
        task.add_done_callback(_retrieve)
        return await asyncio.shield(task)

    def _spawn(self, coro: Any) -> None:
        ctx = contextvars.copy_context()
        ctx.run(_waited.set, None)  # background work is no call's: it holds no call's lock
        task = asyncio.get_running_loop().create_task(coro, context=ctx)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    @contextlib.asynccontextmanager
    async def _redis(self, key: Key | None = None) -> AsyncIterator[None]:
        """Redis failures become UNAVAILABLE; if a write's outcome is unknown, the hot copy is dropped."""
        waited = _waited.get()
        if waited is not None and self._unavailable_at.get(waited[0], 0.0) > waited[1]:
            raise Unavailable(
                f"session {waited[0][1]!r}: the call ahead of this one failed UNAVAILABLE while this one waited "
                "(Redis unreachable, or the session is served by another daemon); retry the call"
            )
        try:
            yield
        except redis_errors() as e:
            metrics.REDIS_ERRORS.inc()
            if key is not None:
                self.hot.drop(key)
            raise Unavailable(f"Redis is unavailable ({type(e).__name__}: {e}); retry the call") from e

    async def _compute(self, work: Work, droppable: bool = False) -> Result:
        """The engine's result, or the model's refusal as the status it means.

        `droppable`: nobody will use the result once the call's deadline has passed, so the engine drops
        the work then (DEADLINE_EXCEEDED) instead of running it."""
        res = await self.engine.submit(work, deadline() if droppable else None)
        if isinstance(res, Refused):
            if res.reason == "input":
                raise InvalidArgument(res.message)
            if res.reason == "foreign_model":
                raise FailedPrecondition(f"the session was stored under another model: {res.message}")
            raise DataLoss(f"the session's snapshot cannot be read: {res.message}")
        return res

    # -- loading -----------------------------------------------------------------------------

    async def _load(self, key: Key) -> Hot:
        """The hot session (loading it from Redis if needed); caller holds the session's lock.

        The load runs as its own task: if the caller leaves, it still completes and the session
        stays hot for the retry, which joins a load still under way instead of starting another."""
        hot = self.hot.use(key)
        if hot is not None:
            return hot
        task = self._loads.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._load_now(key))
            self._loads[key] = task
            task.add_done_callback(lambda _: self._loads.pop(key, None))
            task.add_done_callback(_retrieve)
        return await asyncio.shield(task)

    async def _turn(self, key: Key, load: bool = True, tokens: int | None = None, frozen: int = 0) -> None:
        """Pin `key` for a call, in arrival order with every other call that needs a session (issue 20).

        A call whose session is pinned already (a call is working on it, loading it, or waiting for it)
        joins that turn: the session cannot be evicted before it runs, and it costs no load.  Any other
        call queues in one FIFO (`_admit`) with the loads: when its turn comes, a hot session is pinned
        at once, a cold one gets room (`_make_room`: evicting idle sessions, or waiting for pins to go)
        and a reservation for its load.  So a call whose session is hot but idle does not pass the loads
        that arrived before it: while it waits it pins nothing, and a load ahead of it may evict its
        session.  Before this, calls on hot sessions skipped the load queue and kept their sessions hot
        by coming back at once, and a call that needed a load waited for as long as the hot ones kept
        coming (bench/overload.py: Append p50 0.47 s, p99 28.5 s)."""
        if self.hot.pinned(key) or not load:  # `load=False`: a call that never loads the state (delete, import)
            self.hot.pin(key, tokens, frozen)
            return
        async with self._admit:
            if self.hot.peek(key) is None and not self.hot.pinned(key) and not self.hot.reserved(key):
                await self._make_room(key)
            self.hot.pin(key, tokens, frozen)

    async def _room(self, key: Key) -> None:
        """Reserve budget for loading `key` (FIFO with the calls' turns)."""
        async with self._admit:
            await self._make_room(key)

    async def _make_room(self, key: Key) -> None:
        """Evict unpinned sessions, or wait for pins to go, until a load of `key` fits; reserve it (holds `_admit`)."""
        need = 2 * self._state_bytes
        while not self.hot.fits(need):
            victims = self.hot.victims(extra=need)
            if not victims:
                await self.hot.wait_freed()
            for victim in victims:
                t0 = time.perf_counter()
                await self._finish_anyway(self._evict(victim))  # a caller leaving its turn never cuts a snapshot short
                self._evict_seconds = _average(self._evict_seconds, time.perf_counter() - t0)
        self.hot.reserve(key, need)

    async def _load_now(self, key: Key) -> Hot:
        self.hot.pin(key, 0)  # kept hot until its caller's turn has it, which pins it for its own copy
        try:
            if not self.hot.reserved(key):  # its call's turn reserved room (unless the session was dropped since)
                await self._room(key)
            return await self._read_and_build(key)
        finally:
            self.hot.loading(key, False)
            self.hot.unreserve(key)
            self.hot.unpin(key, 0)

    async def _read_and_build(self, key: Key) -> Hot:
        tenant, sid = key
        t0 = time.perf_counter()
        async with self._redis():
            match await leases.take(self.store, tenant, sid, self.owner, self.s.lease_seconds, self.digest):
                case Taken(head, pieces):
                    self.hot.loading(key, True)
                case OtherModel(head):  # refused before the lease: never take another model's session
                    raise ForeignSession(head, self.digest)
                case HeldElsewhere() as held:
                    raise await self._elsewhere(key, held)
                case Refusal.NOT_FOUND:
                    raise NotFound(f"session {sid!r} does not exist")
            data = await snapshots.read(self.store, head.snap) if head.snap else None
            self.hot.resize(key, len(data or b""), head.offset)
            await self.recalls.loaded(key, head, pieces)
        t1 = time.perf_counter()
        built: Built = await self._compute(Rebuild(data, pieces))
        t2 = time.perf_counter()
        metrics.LOADS.inc()
        metrics.LOAD_SECONDS.observe(t2 - t0)
        event = {"event": "loaded", "session": sid, "replayed": built.replayed, "snapshot_bytes": len(data or b"")}
        event |= {
            "read_s": round(t1 - t0, 3),
            "build_s": round(built.seconds, 3),
            "wait_s": round(t2 - t1 - built.seconds, 3),
        }
        log.info(json.dumps(event))
        self._load_seconds = _average(self._load_seconds, t1 - t0 + built.seconds)
        metrics.REPLAYED_TOKENS.inc(built.replayed)
        if built.state.position != head.offset:
            raise DataLoss(f"session {sid!r}: rebuilt state is at {built.state.position}, the head says {head.offset}")
        snap_steps = self.engine.counts_at(head.snap_off)[0] if head.snap else 0
        hot = Hot(state=built.state, fence=head.fence, gen=head.gen, snap_pos=head.snap_off, snap_steps=snap_steps)
        hot.set_state(built.state, built.nbytes)
        self._state_bytes = self.hot.copy_bytes = max(self._state_bytes, hot.nbytes)
        self.hot.put(key, hot)
        self._spawn(self._enforce_budget(key))
        return hot

    async def _elsewhere(self, key: Key, lease: HeldElsewhere) -> Moved:
        """Where the session is served (memoryd/api/forward.py forwards the call there).

        A holder that published no address (an older daemon) is asked to hand the session
        over instead, as before routing existed.
        """
        address = await leases.address_of(self.store, lease.holder)
        if address is None:
            await leases.request_handoff(self.store, *key)
        return Moved(key[1], lease.holder, address, lease.ttl_ms)

    # -- snapshots and eviction --------------------------------------------------------------

    async def _snapshot(self, key: Key, hot: Hot, reason: str) -> None:
        """Write and publish a snapshot of the hot state; caller holds the lock."""
        state = hot.state
        if state.position == hot.snap_pos:
            return
        t0 = time.perf_counter()
        data = (await self._compute(Export(state))).data
        tenant, sid = key
        async with self._redis():
            snap = await snapshots.write(self.store, data, self.digest, state.position)
            published = await snapshots.publish(self.store, tenant, sid, hot.fence, hot.gen, snap, state.position)
            if not isinstance(published, Ok):
                await snapshots.drop(self.store, snap)
        match published:
            case Ok():
                hot.snap_pos, hot.snap_steps = state.position, state.steps
                metrics.SNAPSHOTS.labels(reason).inc()
                metrics.SNAPSHOT_BYTES.inc(len(data))
                metrics.SNAPSHOT_SECONDS.observe(time.perf_counter() - t0)
            case Refusal.NOT_FOUND | Refusal.FENCED:  # deleted, or another daemon took the session over
                self.hot.drop(key)

    async def _periodic_snapshot(self, key: Key) -> None:
        try:
            async with self.lock(key):
                hot = self.hot.peek(key)
                if hot is not None and hot.state.steps - hot.snap_steps >= self.s.snapshot_interval:
                    await self._snapshot(key, hot, "interval")
        except ServiceError as e:
            log.warning("snapshot of %s failed: %s", key, e.message)

    async def _evict(self, key: Key, force: bool = False) -> None:
        """Snapshot, drop and release a hot session; one a call has pinned meanwhile stays (unless `force`)."""
        async with self.lock(key):
            hot = self.hot.peek(key)
            if hot is None or (self.hot.pinned(key) and not force):
                return
            try:
                # A state that has taken no test-time step since its newest snapshot is less than one
                # mini-batch of log past it: a reload replays that tail exactly (the log has every token),
                # for less than writing the whole state again (a dry run, or a short append, changed it).
                if force or hot.state.steps != hot.snap_steps:
                    await self._snapshot(key, hot, "eviction")
            except ServiceError as e:
                log.warning("eviction snapshot of %s failed (the log still has every token): %s", key, e.message)
            if self.hot.pinned(key) and not force:  # a call arrived during the snapshot: keep it hot
                return
            self.hot.drop(key)  # before the release: a renewal on its way then sees it is not ours to keep
            metrics.EVICTIONS.inc()
            try:
                async with self._redis():
                    await leases.renew(self.store, [key], self.owner, 0)
            except ServiceError as e:
                log.warning("releasing the lease of %s failed (it expires on its own): %s", key, e.message)
        allocator.trim()  # the state's memory back to the system, not kept by the allocator

    async def _enforce_budget(self, keep: Key) -> None:
        """States grow (a window fills): evict unpinned sessions until the charge fits again."""
        for key in self.hot.victims(keep):
            if not self.hot.over_budget():
                break
            await self._evict(key)

    async def maintain_forever(self) -> None:
        """Leases renewed, handovers served, TTLs refreshed (memoryd/sessions/leases.py)."""
        await maintain_forever(self.hot, self.store, self.owner, self.s, self._evict)

    async def flush(self) -> None:
        """Snapshot every hot session and release its lease (SIGTERM)."""
        for task in list(self._bg):
            task.cancel()
        for key in self.hot.resident():
            await self._evict(key, force=True)
        await self.engine.close()

    # -- calls -------------------------------------------------------------------------------

    async def create(self, tenant: str, sid: str, metadata: dict[str, str]) -> Info:
        async with self._redis():
            created = await heads.create(self.store, tenant, sid, metadata, self.digest, self.s.max_sessions_per_tenant)
            self._check_created(sid, created)
            head = await heads.read(self.store, tenant, sid)
        if head is None:
            raise Unavailable(f"session {sid!r} vanished right after it was created (TTL 0?); retry")
        return Info(head=head, pending=0, steps=0, state_bytes=self.engine.fresh_bytes, hot=False)

    def _info(self, head: Head, hot: Hot | None) -> Info:
        if head.digest != self.digest:  # another model's mini-batch and state: not ours to tell
            return Info(head, 0, 0, 0, False)
        if hot is not None:
            st = hot.state
            return Info(head, st.pending_count, st.steps, hot.nbytes, True)
        steps, pending = self.engine.counts_at(head.offset)
        return Info(head, pending, steps, 0, False)

    async def get(self, tenant: str, sid: str, timeout: float | None = None) -> Info:
        key = (tenant, sid)
        with self._admitted(key, 0, timeout):
            return await self._get(key)

    async def _get(self, key: Key) -> Info:
        tenant, sid = key
        async with self._held(key):
            try:
                hot = await self._load(key)
            except ForeignSession as e:
                return (await self._stored([self._info(e.head, None)]))[0]
            async with self._redis():
                head = await heads.read(self.store, tenant, sid)
        if head is None:  # expired or deleted under us: let go of it, lease included
            self.hot.drop(key)
            async with self._redis():
                await leases.renew(self.store, [key], self.owner, 0)
            raise NotFound(f"session {sid!r} does not exist")
        return (await self._stored([self._info(head, hot)]))[0]

    async def update_metadata(
        self, tenant: str, sid: str, patch: dict[str, str], expected: dict[str, str], max_entries: int
    ) -> Info:
        """Set / remove metadata entries (client data: no lease, no load; the state is not touched)."""
        async with self._redis():
            match await heads.update_metadata(self.store, tenant, sid, patch, expected, max_entries):
                case Refusal.NOT_FOUND:
                    raise NotFound(f"session {sid!r} does not exist")
                case EntryDiffers(key):
                    raise Aborted(
                        f"expected_metadata[{key!r}] differs from the session's: nothing was changed; "
                        "read the session again and retry",
                        conflict="metadata",
                    )
                case TooManyEntries(entries):
                    raise ResourceExhausted(
                        f"the metadata would hold {entries} entries; at most {max_entries} "
                        "(remove entries with empty values in the same update)"
                    )
            head = await heads.read(self.store, tenant, sid)
        if head is None:
            raise NotFound(f"session {sid!r} does not exist")
        return self._info(head, self.hot.peek((tenant, sid)))

    async def list(self, tenant: str, after: str, limit: int) -> tuple[list[Info], str]:
        async with self._redis():
            found, nxt = await heads.list_page(self.store, tenant, after, limit)
        infos = [self._info(h, self.hot.peek((tenant, h.session_id))) for h in found]
        return await self._stored(infos), nxt

    async def _stored(self, infos: list[Info]) -> list[Info]:
        """`infos` with their bytes in Redis filled in (sessions not loaded have them too)."""
        async with self._redis():
            sizes = await asyncio.gather(*(heads.stored_bytes(self.store, i.head) for i in infos))
        for info, n in zip(infos, sizes, strict=True):
            info.stored_bytes = n
        return infos

    async def delete(self, tenant: str, sid: str) -> int:
        key = (tenant, sid)
        async with self._held(key, load=False):
            async with self._redis(key):
                deleted = await heads.delete(self.store, tenant, sid)
            if isinstance(deleted, Ok):
                await self.recalls.dropped(key, deleted=True)
            self.hot.drop(key)
        self.lock.forget(key)
        self._unavailable_at.pop(key, None)
        match deleted:
            case Ok(offset):
                return offset
            case Refusal.NOT_FOUND:
                raise NotFound(f"session {sid!r} does not exist")

    async def reset(self, tenant: str, sid: str, expected: int | None) -> Info:
        key = (tenant, sid)
        async with self._held(key):
            hot = await self._load(key)
            async with self._redis(key):
                match await heads.reset(self.store, tenant, sid, hot.fence, expected):
                    case Ok():
                        pass
                    case OffsetDiffers(offset):
                        raise Aborted(f"expected offset differs: the session is at offset {offset}", offset=offset)
                    case Refusal.NOT_FOUND:
                        self.hot.drop(key)
                        raise NotFound(f"session {sid!r} does not exist")
                    case Refusal.FENCED:
                        self.hot.drop(key)
                        raise Unavailable(f"session {sid!r} was taken over by another daemon; retry")
            await self.recalls.dropped(key, deleted=False)
            fresh: Built = await self._compute(Rebuild(None, []))
            hot.set_state(fresh.state, fresh.nbytes)
            hot.gen, hot.snap_pos, hot.snap_steps = hot.gen + 1, 0, 0
            self.hot.changed()
            async with self._redis():
                head = await heads.read(self.store, tenant, sid)
        if head is None:
            raise NotFound(f"session {sid!r} does not exist")
        return self._info(head, hot)

    def _check_created(self, sid: str, created: Ok | Literal[Refusal.TAKEN, Refusal.AT_LIMIT]) -> None:
        """A create's (or an import's) refusal as the status it means."""
        match created:
            case Refusal.TAKEN:
                raise AlreadyExists(f"session {sid!r} already exists")
            case Refusal.AT_LIMIT:
                raise ResourceExhausted(f"tenant has reached its limit of {self.s.max_sessions_per_tenant} sessions")

    async def fork(
        self, tenant: str, src: str, dst: str, metadata: dict[str, str] | None, expected: int | None
    ) -> Info:
        async with self._redis():
            limit = self.s.max_sessions_per_tenant
            src_head = await heads.read(self.store, tenant, src)  # its incarnation, for the recall log it shares
            match await heads.fork(self.store, tenant, src, dst, metadata, expected, limit, self.digest):
                case Ok(offset):
                    pass
                case Refusal.NOT_FOUND:
                    raise NotFound(f"session {src!r} does not exist")
                case Refusal.FOREIGN_MODEL:
                    head = await heads.read(self.store, tenant, src)
                    raise ForeignSession(head, self.digest) if head else NotFound(f"session {src!r} does not exist")
                case Refusal.TAKEN:
                    raise AlreadyExists(f"session {dst!r} already exists")
                case OffsetDiffers(offset):
                    raise Aborted(f"expected offset differs: session {src!r} is at offset {offset}", offset=offset)
                case Refusal.AT_LIMIT:
                    raise ResourceExhausted(
                        f"tenant has reached its limit of {self.s.max_sessions_per_tenant} sessions"
                    )
            head = await heads.read(self.store, tenant, dst)
            if head is not None:
                await self.recalls.forked(tenant, src_head, head, offset)
        if head is None:
            raise NotFound(f"session {dst!r} vanished right after the fork; retry")
        return self._info(head, None)

    async def _find_duplicate(self, key: Key, append_id: str) -> Logged | None:
        if not append_id:
            return None
        async with self._redis():
            return await tokenlog.find_append(self.store, *key, append_id)

    async def _commit(
        self, key: Key, hot: Hot, new: Appended | Finished, pieces: list[list[int]], append_id: str, record: str = ""
    ) -> Logged:
        """Make pieces durable (CAS on the offset), then swap `new.state` in (unless an earlier call with the same
        append id logged them: then the duplicate's offsets come back, and the hot copy is reloaded)."""
        tenant, sid = key
        async with self._redis(key):
            res = await tokenlog.append(
                self.store, tenant, sid, hot.fence, hot.state.position, pieces, append_id, record
            )
        if isinstance(res, Logged) and not res.duplicate:
            hot.set_state(new.state, new.nbytes)
            self.hot.put(key, hot)
            if not await self.recalls.appended(key, hot.gen, res.start, pieces):
                self.hot.drop(key)  # reloading catches the recall log up from the token log
            if new.state.steps - hot.snap_steps >= self.s.snapshot_interval:
                self._spawn(self._periodic_snapshot(key))
            if self.hot.over_budget():
                self._spawn(self._enforce_budget(key))
            return res
        self.hot.drop(key)  # the hot copy and Redis disagree: reload on the next call
        match res:
            case Logged():  # a duplicate
                return res
            case Refusal.NOT_FOUND:
                raise NotFound(f"session {sid!r} does not exist")
            case Refusal.FENCED:
                raise Unavailable(f"session {sid!r} was taken over by another daemon; retry")
            case OffsetDiffers(offset):
                raise Unavailable(f"session {sid!r} changed under this daemon (now at offset {offset}); retry")

    def _check_expected(self, hot: Hot, expected: int | None) -> None:
        if expected is not None and expected != hot.state.position:
            raise Aborted(
                f"expected offset {expected}, but the session is at offset {hot.state.position}",
                offset=hot.state.position,
            )

    async def append(
        self,
        tenant: str,
        sid: str,
        content: Content,
        expected: int | None,
        append_id: str,
        timeout: float | None = None,
    ) -> AppendOutcome:
        """With an append_id the append is safe to finish: it runs to the end even if its caller leaves
        (the retry then finds it recorded); without one, nobody could tell it landed, so its work is
        dropped once the caller's deadline passes."""
        key = (tenant, sid)
        with self._admitted(key, len(content) if isinstance(content, list) else 0, timeout):
            if append_id:
                return await self._finish_anyway(self._append(key, content, expected, append_id))
            return await self._append(key, content, expected, append_id)

    async def _append(self, key: Key, content: Content, expected: int | None, append_id: str) -> AppendOutcome:
        async with self._held(key, tokens=len(content) if isinstance(content, list) else None):
            hot = await self._load(key)
            dup = await self._find_duplicate(key, append_id)
            if dup is not None:
                if dup.record or dup.tokhash != tokens_hash([tokens_at(content, dup.start)]):
                    raise InvalidArgument(
                        f"append_id {append_id!r} was already used for other tokens (at offset {dup.start}); "
                        "use a new append_id for new tokens"
                    )
                st = hot.state
                return AppendOutcome(dup.start, dup.offset, dup.offset - dup.start, 0, True, st.pending_count)
            self._check_expected(hot, expected)
            tokens = tokens_at(content, hot.state.position)
            try:
                done: Appended = await self._compute(Append(hot.state, tokens), droppable=not append_id)
            except InvalidArgument as e:
                raise InvalidArgument(e.message, offset=hot.state.position) from e
            res = await self._commit(key, hot, done, [tokens], append_id)
            if res.duplicate:
                return AppendOutcome(res.start, res.offset, res.offset - res.start, 0, True, hot.state.pending_count)
        metrics.TOKENS_READ.inc(len(tokens))
        metrics.TTT_STEPS.inc(done.steps)
        return AppendOutcome(res.start, res.offset, len(tokens), done.steps, False, done.state.pending_count)

    async def generate(
        self,
        tenant: str,
        sid: str,
        prompt: Content,
        p: SamplingParams,
        commit: bool,
        expected: int | None,
        append_id: str,
        rule: CommitRule = KEEP_SENT,
        recall: RecallAsk | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[GenEvent]:
        """Sample on forks; stream tokens and text; with commit, log prompt + output and swap the fork in.

        The engine runs the generation (`Engine.generate`); this layer keeps what is not the
        model's: text and stop strings (`SampleText`), what a commit keeps, and the commit.
        `recall`: recalled context is read before the prompt into the forks only (`_recall_context`).
        A dry run (no commit) is dropped once its caller's deadline passes: nobody will use it."""
        key = (tenant, sid)
        cost = 1 + (len(prompt) if isinstance(prompt, list) else 0)
        with self._admitted(key, cost, timeout):
            async for event in self._generate(key, prompt, p, commit, expected, append_id, rule, recall):
                yield event

    async def _generate(
        self,
        key: Key,
        prompt: Content,
        p: SamplingParams,
        commit: bool,
        expected: int | None,
        append_id: str,
        rule: CommitRule,
        recall: RecallAsk | None,
    ) -> AsyncIterator[GenEvent]:
        reads = len(prompt) + p.max_tokens if isinstance(prompt, list) and p.samples == 1 else None
        # with recall, the prompt and the reply go into a frozen copy after the recalled context (at most the
        # ask's budget), and a commit reads them again, with steps, onto a copy of the session's state
        frozen = reads + recall.budget if recall is not None and reads is not None else 0
        async with self._held(key, tokens=reads, frozen=frozen):
            hot = await self._load(key)
            if commit and append_id:
                dup = await self._find_duplicate(key, append_id)
                if dup is not None:
                    yield replayed(append_id, dup, tokens_at(prompt, dup.start))
                    return
            if commit and p.samples > 1:
                raise InvalidArgument(f"n = {p.n} with commit: a commit keeps one output; ask for n = 1")
            self._check_expected(hot, expected)
            prompt_ids = tokens_at(prompt, hot.state.position)
            ctx = await self._recall_context(key, hot, recall, prompt_ids, p.max_tokens) if recall else NOTHING
            pieces: list[list[int]] = []
            prompted = Appended(hot.state, 0, hot.nbytes)
            if ctx.tokens:  # recalled context, and the prompt after it, read into this generation's copy only,
                # forward only: never stepped into the fast weights (model.StreamState.frozen_copy)
                work = Append(hot.state, [*ctx.tokens, *prompt_ids], frozen=True)
                prompted = await self._compute(work, droppable=not commit)
            elif prompt_ids:
                prompted = await self._compute(Append(hot.state, prompt_ids), droppable=not commit)
            after_prompt = prompted.state
            if prompt_ids:
                pieces.append(prompt_ids)
            if after_prompt.position == 0:
                raise InvalidArgument("the session is empty: give a prompt (or append first) before generating")
            stop_ids = frozenset({self.tok.eos_id, *p.stop_tokens})
            request = Generate(after_prompt, p, stop_ids, tuple(prompt_ids), keep=commit)
            outs = [SampleText(self.tok, p.stop, request.stop_ids) for _ in range(p.samples)]
            ends: dict[int, Finished] = {}
            async with self.engine.generate(request, None if commit else deadline()) as gen:
                try:
                    async for item in gen:
                        if isinstance(item, Finished):
                            ends[item.sample] = item
                        elif not outs[item.sample].finish:  # else: drawn after a stop string ended it
                            o = outs[item.sample]
                            metrics.TOKENS_GENERATED.inc()
                            delta = o.push(item.token)
                            if o.finish == "stop_string":
                                gen.stop(item.sample)
                            lp = [item.logprob] if item.logprob is not None else []
                            yield GenEvent([item.token], delta, sample=item.sample, logprobs=lp)
                        if not commit and all(o.finish or i in ends for i, o in enumerate(outs)):
                            break  # nothing more to send, and no state to keep
                except RefusedError as e:
                    raise InvalidArgument(e.refused.message) from e
            tails = [o.end() for o in outs]
            if len(outs) > 1:  # each sample's end, then one last message
                for i, (o, tail) in enumerate(zip(outs, tails, strict=True)):
                    yield GenEvent([], tail, False, o.finish, 0, len(o.out), sample=i)
            offset, committed = hot.state.position, 0
            if commit:
                o, end = outs[0], ends[0]
                kept = kept_output(self.tok, o.out, o.finish, o.text, rule.stop)
                read = o.out[: end.read] if end.read <= len(o.out) else None
                new: Appended | Finished
                if read is not None and kept[: len(read)] == read and not ctx.tokens:  # the fork read a prefix of kept
                    pieces += [[t] for t in read]
                    new, last = end, kept[len(read) :] + list(rule.suffix)
                else:  # kept diverges from what the fork read (a stop string cut inside a token, or recalled context)
                    new, last = prompted, kept + list(rule.suffix)
                to_read = last
                if ctx.tokens:  # the session reads the prompt and the reply with steps, never the recalled context
                    new, to_read = Appended(hot.state, 0, hot.nbytes), [*prompt_ids, *last]
                if to_read:  # one append: a state does not depend on how its tokens were cut
                    new = await self._compute(Append(new.state, to_read))
                if last:
                    pieces.append(last)
                rec = record(prompt_ids, o.out, "".join(o.sent), o.finish)
                res_c = await self._commit(key, hot, new, pieces, append_id, rec)
                offset, committed = res_c.offset, res_c.offset - res_c.start
                metrics.TOKENS_READ.inc(sum(len(x) for x in pieces))
            last_text = tails[0] if len(outs) == 1 else ""
            generated = sum(len(o.out) for o in outs)
            yield GenEvent(
                [],
                last_text,
                True,
                outs[0].finish,
                offset,
                generated,
                False,
                committed,
                prompt=len(prompt_ids),
                recalled=ctx,
            )

    async def _recall_context(
        self, key: Key, hot: Hot, ask: RecallAsk, prompt_ids: list[int], max_tokens: int
    ) -> RecallContext:
        """The recalled context of one generation (once per call, before its first token; the caller holds
        the session's lock): the index's spans for the query, framed and fitted by `recall_prompt`."""
        if not ask.query.strip() or hot.state.position == 0:
            return NOTHING
        t0 = time.perf_counter()
        async with self._redis():  # the index itself (`recall` would take the lock this call holds)
            found = await self.recalls.recall(key, hot.gen, hot.state.position, ask.query, ask.k)
        metrics.RECALL_SECONDS.labels("Generate").observe(time.perf_counter() - t0)
        ctx = recall_context(
            found.spans,
            position=hot.state.position,
            window=self.model.cfg.window_size or 0,
            prompt_tokens=len(prompt_ids),
            max_tokens=max_tokens,
            budget=ask.budget,
            chat=self.chat,
            tok=self.tok,
            query=ask.query,
            weights=found.idf,
        )
        metrics.RECALLED_TOKENS.inc(len(ctx.tokens))
        return ctx

    async def recall(self, key: Key, query: str, k: int) -> list[RecalledSpan]:
        """The k spans of the session's log most relevant to `query`, most relevant first (memoryd/sessions/recall)."""
        async with self._held(key):
            hot = await self._load(key)
            async with self._redis():
                return (await self.recalls.recall(key, hot.gen, hot.state.position, query, k)).spans

    async def tail(self, key: Key, n: int) -> tuple[int, int, str]:
        """The session's last `n` tokens: (start, end, text), read from the log kept for recall."""
        async with self._held(key):
            hot = await self._load(key)
            position = hot.state.position
            async with self._redis():
                start, text = await self.recalls.tail(key, hot.gen, position, n)
        return start, position, text

    async def export(self, tenant: str, sid: str) -> tuple[Head, bytes]:
        """The session's head and its whole state as snapshot bytes (safetensors)."""
        key = (tenant, sid)
        async with self._held(key):
            try:
                hot = await self._load(key)
            except ForeignSession as e:
                return e.head, await self._stored_state(e.head)
            exported: Exported = await self._compute(Export(hot.state))
            async with self._redis():
                head = await heads.read(self.store, tenant, sid)
        if head is None:
            raise NotFound(f"session {sid!r} does not exist")
        return head, exported.data

    async def _stored_state(self, head: Head) -> bytes:
        """Another model's session, as its newest stored snapshot: only when that holds its whole state
        (its log tail could only be replayed by its own model)."""
        if not head.snap or head.snap_off != head.offset:
            raise FailedPrecondition(
                f"session {head.session_id!r} belongs to model {head.digest} and {head.offset - head.snap_off} of its "
                f"{head.offset} tokens are not in a stored snapshot yet: export it from a deployment serving that model"
            )
        async with self._redis():
            try:
                return await snapshots.read(self.store, head.snap)
            except DataLoss:
                now = await heads.read(self.store, head.tenant, head.session_id)
                if now is None or now.snap != head.snap:  # its daemon published a newer one meanwhile
                    raise Unavailable(f"session {head.session_id!r} changed while it was exported; retry") from None
                raise

    def _recall_runs(self, recall_log: bytes | None, offset: int | None) -> list[Run]:
        if not recall_log:
            return []
        if offset is None:
            raise InvalidArgument("recall_log needs the header's offset (the state's): send both, or neither")
        try:
            return transfer.decode(recall_log, offset, self.model.cfg.vocab_size)
        except transfer.BadRecallLog as e:
            raise InvalidArgument(f"recall_log is not a recall log of this export: {e}; send the export's own") from e

    async def export_recall(self, head: Head) -> bytes:
        """The recall log an export of `head`'s state carries (memoryd/sessions/recall/transfer.py)."""
        async with self._redis():
            return await self.recalls.exported(head)

    async def import_(
        self,
        tenant: str,
        sid: str,
        metadata: dict[str, str],
        data: bytes,
        offset: int | None = None,
        recall_log: bytes | None = None,
    ) -> Info:
        """A new session from exported bytes: validated (against `offset` too), stored as its first snapshot,
        then published; with `recall_log` (from `export_recall`), recall of its history too."""
        res = await self.engine.submit(Import(data))
        if isinstance(res, Refused):
            if res.reason == "foreign_model":
                raise FailedPrecondition(f"the export was made with another model: {res.message}")
            raise InvalidArgument(f"the export is not a usable session state: {res.message}")
        assert isinstance(res, Built)
        state = res.state
        if offset is not None and state.position != offset:
            raise InvalidArgument(
                f"the header's offset {offset} differs from the offset of the state it carries ({state.position})"
            )
        runs = self._recall_runs(recall_log, offset)  # checked against the state's offset, before anything is written
        key = (tenant, sid)
        async with self._held(key, load=False), self._redis():
            snap = await snapshots.write(self.store, data, self.digest, state.position)
            limit = self.s.max_sessions_per_tenant
            created = await heads.create(
                self.store, tenant, sid, metadata, self.digest, limit, snap=snap, offset=state.position
            )
            if not isinstance(created, Ok):
                await snapshots.drop(self.store, snap)
            head = await heads.read(self.store, tenant, sid) if isinstance(created, Ok) else None
            if head is not None and runs:
                await self.recalls.imported(key, head, runs)
        self._check_created(sid, created)
        if head is None:
            raise Unavailable(f"session {sid!r} vanished right after the import; retry")
        return Info(head, state.pending_count, state.steps, res.nbytes, False)


def _retrieve(task: asyncio.Task[Any]) -> None:
    """A task whose caller left: its outcome is nobody's, but a bug in it is logged."""
    if task.cancelled():
        return
    e = task.exception()
    if e is not None and not isinstance(e, ServiceError):
        log.error("work finished for a caller that left failed", exc_info=e)


def _average(old: float, new: float) -> float:
    """A moving average that follows the last few (0: none yet)."""
    return new if not old else 0.8 * old + 0.2 * new
