"""Ordering and memory in the middle: which sessions are hot, who waits, in what order.

- One asyncio.Lock per session (FIFO), so a session's calls apply in arrival
  order while different sessions run concurrently.
- Model compute runs in a thread pool, never on the event loop.
- A change is computed on an O(1) clone of the state, made durable in Redis (the
  token log, compare-and-set on the offset), and only then swapped in: a failure
  anywhere leaves the hot state exactly as it was.
- Hot states live in an LRU bounded by bytes; the least recently used are
  snapshotted, dropped and reloaded (snapshot + log replay) on their next call.
- A hot session holds a lease in Redis; its fencing token guards every write.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import redis.exceptions
import torch

from memoryd import metrics
from memoryd.chat import ChatFormat
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
from memoryd.sampling import StopText, sample
from memoryd.settings import Settings
from memoryd.store import AppendResult, Head, Store, tokens_hash
from model import (
    InputError,
    ModelMismatchError,
    SnapshotError,
    StreamState,
    digest_of,
    state_from_bytes,
    state_to_bytes,
)

log = logging.getLogger("memoryd.sessions")
T = TypeVar("T")
Key = tuple[str, str]
Content = list[int] | Callable[[int], list[int]]
"""Token ids, or a function of the offset they will land at (chat messages render differently at 0)."""


_waited: contextvars.ContextVar[tuple[Key, float] | None] = contextvars.ContextVar("memoryd_waited", default=None)
"""The session whose lock this call holds, and since when it waited for it (see `Sessions._held`)."""


def tokens_at(content: Content, offset: int) -> list[int]:
    return content(offset) if callable(content) else content


@dataclass
class Hot:
    """A session loaded on the device."""

    state: StreamState
    fence: int
    gen: int
    snap_pos: int
    """Offset of the newest published snapshot (or 0: none)."""
    snap_steps: int
    nbytes: int = 0
    """state.nbytes(), kept up to date on every swap (the LRU's byte count)."""
    touched: float = field(default_factory=time.monotonic)
    """When its Redis keys' TTLs were last refreshed."""
    used: float = field(default_factory=time.monotonic)
    """When a call last used it (idle sessions expire: only use refreshes TTLs)."""

    def set_state(self, state: StreamState) -> None:
        self.state, self.nbytes = state, state.nbytes()


@dataclass
class Info:
    """What `get` and `list` report."""

    head: Head
    pending: int
    steps: int
    state_bytes: int
    hot: bool


@dataclass
class AppendOutcome:
    start: int
    offset: int
    tokens: int
    steps: int
    duplicate: bool
    pending: int


@dataclass
class GenParams:
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: list[str]
    stop_tokens: list[int]
    commit_stop: bool = False
    """Commit the stop token / the tokens of the stop string too (else: exactly the text sent)."""
    suffix: list[int] = field(default_factory=list)
    """Committed after the output (a chat turn's closing)."""


@dataclass
class GenEvent:
    tokens: list[int]
    text: str
    done: bool = False
    finish: str = ""
    offset: int = 0
    generated: int = 0
    duplicate: bool = False
    committed: int = 0


def redis_errors() -> tuple[type[BaseException], ...]:
    return (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError)


class Sessions:
    """The session table of one daemon."""

    def __init__(
        self, model: Any, tokenizer: Any, store: Store, settings: Settings, chat: ChatFormat | None = None
    ) -> None:
        self.model = model
        self.tok = tokenizer
        self.chat = chat
        self.store = store
        self.s = settings
        self.digest = digest_of(model)
        self.b = model.cfg.mini_batch_size
        self._hot: OrderedDict[Key, Hot] = OrderedDict()
        self._locks: dict[Key, asyncio.Lock] = {}
        self._unavailable_at: dict[Key, float] = {}
        """When a call holding the session's lock last failed UNAVAILABLE (cleared by a call that succeeds)."""
        self._pool = ThreadPoolExecutor(settings.compute_threads, thread_name_prefix="memoryd-compute")
        self._bg: set[asyncio.Task] = set()
        self.owner = settings.daemon_id

    # -- plumbing ----------------------------------------------------------------------------

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Model compute, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def lock(self, key: Key) -> asyncio.Lock:
        lk = self._locks.get(key)
        if lk is None:
            lk = self._locks[key] = asyncio.Lock()
        return lk

    @contextlib.asynccontextmanager
    async def _held(self, key: Key) -> AsyncIterator[None]:
        """The session's lock, for one call.

        A call that waited for the lock while its holder failed UNAVAILABLE (Redis stalled or gone)
        answers UNAVAILABLE as soon as it needs Redis (see `_redis`): trying Redis again would add
        another Redis timeout to its answer, and a queue of calls would each add one. What it can do
        without Redis (a generation on a hot session, not committed) it still does."""
        since = time.monotonic()
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

    def hot_bytes(self) -> int:
        return sum(h.nbytes for h in self._hot.values())

    def _update_gauges(self) -> None:
        metrics.SESSIONS_HOT.set(len(self._hot))
        metrics.HOT_BYTES.set(self.hot_bytes())

    def drop(self, key: Key) -> None:
        """Forget a hot state whose Redis copy may differ (a failed or unknown write)."""
        self._hot.pop(key, None)
        self._update_gauges()

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
                self.drop(key)
            raise Unavailable(f"Redis is unavailable ({type(e).__name__}: {e}); retry the call") from e

    # -- loading -----------------------------------------------------------------------------

    def _rebuild(self, data: bytes | None, pieces: list[list[int]]) -> StreamState:
        try:
            state = state_from_bytes(self.model, data) if data is not None else StreamState.fresh(self.model)
        except ModelMismatchError as e:
            raise FailedPrecondition(f"the session was stored under another model: {e}") from e
        except SnapshotError as e:
            raise DataLoss(f"the session's snapshot cannot be read: {e}") from e
        for p in pieces:
            state.append(p)
        return state

    async def _load(self, key: Key) -> Hot:
        """The hot session (loading it from Redis if needed); caller holds the session's lock."""
        hot = self._hot.get(key)
        if hot is not None:
            self._hot.move_to_end(key)
            hot.used = time.monotonic()
            return hot
        tenant, sid = key
        async with self._redis():
            head = await self.store.head(tenant, sid)
            if head is not None and head.digest != self.digest:  # before the lease: never take another model's
                raise ForeignSession(head, self.digest)
            lease = await self.store.acquire_lease(tenant, sid, self.owner, self.s.lease_seconds)
            if lease.missing:
                raise NotFound(f"session {sid!r} does not exist")
            if lease.fence is None:
                await self.store.request_handoff(tenant, sid)
                raise Unavailable(
                    f"session {sid!r} is served by daemon {lease.holder}; it was asked to hand the session over "
                    f"(its lease ends within {lease.ttl_ms} ms at the latest): retry in a moment"
                )
            head = await self.store.head(tenant, sid)
            if head is None:
                raise NotFound(f"session {sid!r} does not exist")
            if head.digest != self.digest:  # replaced by another model's session since the first look
                await self.store.renew_leases([key], self.owner, 0)
                raise ForeignSession(head, self.digest)
            data = await self.store.read_snapshot(head.snap) if head.snap else None
            pieces = await self.store.read_log(tenant, sid, head.snap_off, head.offset)
            await self.store.touch(tenant, sid)
        state = await self.run(self._rebuild, data, pieces)
        metrics.LOADS.inc()
        metrics.REPLAYED_TOKENS.inc(sum(len(p) for p in pieces))
        if state.position != head.offset:
            raise DataLoss(f"session {sid!r}: rebuilt state is at {state.position}, the head says {head.offset}")
        snap_steps = max(0, (head.snap_off - 1) // self.b) if head.snap else 0
        hot = Hot(state=state, fence=lease.fence, gen=head.gen, snap_pos=head.snap_off, snap_steps=snap_steps)
        hot.set_state(state)
        self._hot[key] = hot
        self._update_gauges()
        self._spawn(self._enforce_budget(key))
        return hot

    # -- snapshots and eviction --------------------------------------------------------------

    async def _snapshot(self, key: Key, hot: Hot, reason: str) -> None:
        """Write and publish a snapshot of the hot state; caller holds the lock."""
        state = hot.state
        if state.position == hot.snap_pos:
            return
        t0 = time.perf_counter()
        data = await self.run(state_to_bytes, state)
        tenant, sid = key
        async with self._redis():
            snap = await self.store.write_snapshot(data, self.digest, state.position)
            code = await self.store.publish_snapshot(tenant, sid, hot.fence, hot.gen, snap, state.position)
            if code != 1:
                await self.store.drop_snapshot(snap)
        if code == 1:
            hot.snap_pos, hot.snap_steps = state.position, state.steps
            metrics.SNAPSHOTS.labels(reason).inc()
            metrics.SNAPSHOT_BYTES.inc(len(data))
            metrics.SNAPSHOT_SECONDS.observe(time.perf_counter() - t0)
        elif code in (-1, -2):  # deleted, or another daemon took the session over
            self.drop(key)

    async def _periodic_snapshot(self, key: Key) -> None:
        try:
            async with self.lock(key):
                hot = self._hot.get(key)
                if hot is not None and hot.state.steps - hot.snap_steps >= self.s.snapshot_interval:
                    await self._snapshot(key, hot, "interval")
        except ServiceError as e:
            log.warning("snapshot of %s failed: %s", key, e.message)

    async def _evict(self, key: Key) -> None:
        async with self.lock(key):
            hot = self._hot.get(key)
            if hot is None:
                return
            try:
                await self._snapshot(key, hot, "eviction")
                async with self._redis():
                    await self.store.renew_leases([key], self.owner, 0)
            except ServiceError as e:
                log.warning("eviction snapshot of %s failed (the log still has every token): %s", key, e.message)
            self.drop(key)
            metrics.EVICTIONS.inc()

    async def _enforce_budget(self, keep: Key) -> None:
        total = self.hot_bytes()
        for key in list(self._hot):
            if total <= self.s.memory_budget:
                break
            if key == keep or key not in self._hot:
                continue
            total -= self._hot[key].nbytes
            await self._evict(key)

    async def maintain_forever(self) -> None:
        """Renew leases, refresh TTLs, hand sessions over to daemons that ask (once a second at most)."""
        every = max(0.2, min(1.0, self.s.lease_seconds / 3, self.s.ttl_seconds / 4 or 60.0))
        while True:
            await asyncio.sleep(every)
            try:
                if self.s.ttl_seconds:
                    await self._refresh_ttls(list(self._hot))
                keys = list(self._hot)
                for key, wanted in zip(keys, await self.store.take_handoff_requests(keys), strict=True):
                    if wanted:  # another daemon has a call for it: snapshot, drop, release
                        self._spawn(self._evict(key))
                ok = await self.store.renew_leases(keys, self.owner, self.s.lease_seconds)
                for key, fine in zip(keys, ok, strict=True):
                    if not fine:
                        log.warning("lost the lease of %s; dropping it", key)
                        self.drop(key)
                metrics.SESSIONS_STORED.set(await self.store.count_sessions())
            except redis_errors() as e:
                log.warning("session maintenance: Redis unavailable (%s)", e)
            except Exception:  # a bug here must not stop lease renewal for good
                log.exception("session maintenance failed; trying again")

    async def _refresh_ttls(self, keys: list[Key]) -> None:
        """Used sessions get their TTL (snapshot keys included) refreshed; idle ones are let go."""
        now, ttl = time.monotonic(), self.s.ttl_seconds
        for key in keys:
            hot = self._hot.get(key)
            if hot is None:
                continue
            if now - hot.used > ttl:  # expired in Redis by now: forget it, do not resurrect it
                self.drop(key)
                await self.store.renew_leases([key], self.owner, 0)
            elif hot.used > hot.touched and now - hot.touched > min(60.0, ttl / 4):
                hot.touched = now
                await self.store.touch(*key)

    async def flush(self) -> None:
        """Snapshot every hot session and release its lease (SIGTERM)."""
        for task in list(self._bg):
            task.cancel()
        for key in list(self._hot):
            await self._evict(key)
        self._pool.shutdown(wait=True)

    # -- calls -------------------------------------------------------------------------------

    async def create(self, tenant: str, sid: str, metadata: dict[str, str]) -> Info:
        async with self._redis():
            code = await self.store.create(tenant, sid, metadata, self.digest, self.s.max_sessions_per_tenant)
            if code == -1:
                raise AlreadyExists(f"session {sid!r} already exists")
            if code == -2:
                raise ResourceExhausted(f"tenant has reached its limit of {self.s.max_sessions_per_tenant} sessions")
            head = await self.store.head(tenant, sid)
        if head is None:
            raise Unavailable(f"session {sid!r} vanished right after it was created (TTL 0?); retry")
        return Info(head=head, pending=0, steps=0, state_bytes=StreamState.fresh(self.model).nbytes(), hot=False)

    def _info(self, head: Head, hot: Hot | None) -> Info:
        if head.digest != self.digest:  # another model's mini-batch and state: not ours to tell
            return Info(head, 0, 0, 0, False)
        if hot is not None:
            st = hot.state
            return Info(head, st.pending_count, st.steps, st.nbytes(), True)
        steps = max(0, (head.offset - 1) // self.b)
        return Info(head, head.offset - steps * self.b, steps, 0, False)

    async def get(self, tenant: str, sid: str) -> Info:
        key = (tenant, sid)
        async with self._held(key):
            try:
                hot = await self._load(key)
            except ForeignSession as e:
                return self._info(e.head, None)
            async with self._redis():
                head = await self.store.head(tenant, sid)
        if head is None:  # expired or deleted under us: let go of it, lease included
            self.drop(key)
            async with self._redis():
                await self.store.renew_leases([key], self.owner, 0)
            raise NotFound(f"session {sid!r} does not exist")
        return self._info(head, hot)

    async def list(self, tenant: str, after: str, limit: int) -> tuple[list[Info], str]:
        async with self._redis():
            heads, nxt = await self.store.list(tenant, after, limit)
        return [self._info(h, self._hot.get((tenant, h.session_id))) for h in heads], nxt

    async def delete(self, tenant: str, sid: str) -> int:
        key = (tenant, sid)
        async with self._held(key):
            async with self._redis(key):
                code, offset = await self.store.delete(tenant, sid)
            self.drop(key)
        self._locks.pop(key, None)
        self._unavailable_at.pop(key, None)
        if code != 1:
            raise NotFound(f"session {sid!r} does not exist")
        return offset

    async def reset(self, tenant: str, sid: str, expected: int | None) -> Info:
        key = (tenant, sid)
        async with self._held(key):
            hot = await self._load(key)
            async with self._redis(key):
                code, offset = await self.store.reset(tenant, sid, hot.fence, expected)
            self._check_code(key, code, offset)
            hot.set_state(StreamState.fresh(self.model))
            hot.gen, hot.snap_pos, hot.snap_steps = hot.gen + 1, 0, 0
            async with self._redis():
                head = await self.store.head(tenant, sid)
        if head is None:
            raise NotFound(f"session {sid!r} does not exist")
        return self._info(head, hot)

    def _check_code(self, key: Key, code: int, offset: int) -> None:
        """Shared meaning of the reset/append script codes -1 (gone), -2 (fenced), -3 (offset differs)."""
        if code == -1:
            self.drop(key)
            raise NotFound(f"session {key[1]!r} does not exist")
        if code == -2:
            self.drop(key)
            raise Unavailable(f"session {key[1]!r} was taken over by another daemon; retry")
        if code == -3:
            raise Aborted(f"expected offset differs: the session is at offset {offset}", offset=offset)

    async def fork(
        self, tenant: str, src: str, dst: str, metadata: dict[str, str] | None, expected: int | None
    ) -> Info:
        async with self._redis():
            limit = self.s.max_sessions_per_tenant
            code, offset = await self.store.fork(tenant, src, dst, metadata, expected, limit, self.digest)
            if code == -1:
                raise NotFound(f"session {src!r} does not exist")
            if code == -5:
                head = await self.store.head(tenant, src)
                raise ForeignSession(head, self.digest) if head else NotFound(f"session {src!r} does not exist")
            if code == -2:
                raise AlreadyExists(f"session {dst!r} already exists")
            if code == -3:
                raise Aborted(f"expected offset differs: session {src!r} is at offset {offset}", offset=offset)
            if code == -4:
                raise ResourceExhausted(f"tenant has reached its limit of {self.s.max_sessions_per_tenant} sessions")
            head = await self.store.head(tenant, dst)
        if head is None:
            raise NotFound(f"session {dst!r} vanished right after the fork; retry")
        return self._info(head, None)

    async def _find_duplicate(self, key: Key, append_id: str) -> AppendResult | None:
        if not append_id:
            return None
        async with self._redis():
            return await self.store.find_append(*key, append_id)

    async def _commit(
        self, key: Key, hot: Hot, new: StreamState, pieces: list[list[int]], append_id: str, record: str = ""
    ) -> AppendResult:
        """Make pieces durable (CAS on the offset), then swap `new` in."""
        tenant, sid = key
        async with self._redis(key):
            res = await self.store.append(tenant, sid, hot.fence, hot.state.position, pieces, append_id, record)
        if res.status == "ok":
            hot.set_state(new)
            self._hot.move_to_end(key)
            if new.steps - hot.snap_steps >= self.s.snapshot_interval:
                self._spawn(self._periodic_snapshot(key))
            if self.hot_bytes() > self.s.memory_budget:
                self._spawn(self._enforce_budget(key))
            self._update_gauges()
            return res
        self.drop(key)  # the hot copy and Redis disagree: reload on the next call
        if res.status == "not_found":
            raise NotFound(f"session {sid!r} does not exist")
        if res.status == "fenced":
            raise Unavailable(f"session {sid!r} was taken over by another daemon; retry")
        if res.status == "duplicate":
            return res
        raise Unavailable(f"session {sid!r} changed under this daemon (now at offset {res.offset}); retry")

    async def append(
        self, tenant: str, sid: str, content: Content, expected: int | None, append_id: str
    ) -> AppendOutcome:
        key = (tenant, sid)
        async with self._held(key):
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
            if expected is not None and expected != hot.state.position:
                raise Aborted(
                    f"expected offset {expected}, but the session is at offset {hot.state.position}",
                    offset=hot.state.position,
                )
            tokens = tokens_at(content, hot.state.position)
            new = hot.state.clone()
            try:
                report = await self.run(new.append, tokens)
            except InputError as e:
                raise InvalidArgument(str(e), offset=hot.state.position) from e
            res = await self._commit(key, hot, new, [tokens], append_id)
            if res.status == "duplicate":
                return AppendOutcome(res.start, res.offset, res.offset - res.start, 0, True, hot.state.pending_count)
        metrics.TOKENS_READ.inc(len(tokens))
        metrics.TTT_STEPS.inc(report.steps)
        return AppendOutcome(res.start, res.offset, len(tokens), report.steps, False, new.pending_count)

    async def generate(
        self,
        tenant: str,
        sid: str,
        prompt: Content,
        p: GenParams,
        commit: bool,
        expected: int | None,
        append_id: str,
    ) -> AsyncIterator[GenEvent]:
        """Sample on a clone; stream tokens and text; with commit, log prompt + output and swap the clone in."""
        key = (tenant, sid)
        async with self._held(key):
            hot = await self._load(key)
            if commit and append_id:
                dup = await self._find_duplicate(key, append_id)
                if dup is not None:
                    yield self._replayed(append_id, dup, tokens_at(prompt, dup.start))
                    return
            if expected is not None and expected != hot.state.position:
                raise Aborted(
                    f"expected offset {expected}, but the session is at offset {hot.state.position}",
                    offset=hot.state.position,
                )
            prompt_ids = tokens_at(prompt, hot.state.position)
            work = hot.state.clone()
            pieces: list[list[int]] = []
            if prompt_ids:
                try:
                    await self.run(work.append, prompt_ids)
                except InputError as e:
                    raise InvalidArgument(str(e)) from e
                pieces.append(prompt_ids)
            if work.position == 0:
                raise InvalidArgument("the session is empty: give a prompt (or append first) before generating")
            after_prompt = work.clone()
            seed = p.seed if p.seed is not None else int.from_bytes(os.urandom(8), "little")
            gen = torch.Generator().manual_seed(seed % (2**63))
            stops = {self.tok.eos_id, *p.stop_tokens}
            decoder, text = self.tok.stream_decoder(), StopText(p.stop)
            out: list[int] = []
            sent: list[str] = []
            finish = "length"

            def step(prev: int | None) -> int:
                if prev is not None:
                    work.append([prev])
                return sample(work.logits(), p.temperature, p.top_k, p.top_p, gen)

            prev: int | None = None
            while len(out) < p.max_tokens:
                t = await self.run(step, prev)
                out.append(t)
                prev = t
                metrics.TOKENS_GENERATED.inc()
                if t in stops:
                    finish = "stop_token"
                    yield GenEvent([t], "")
                    break
                delta = text.push(decoder.push(t))
                sent.append(delta)
                yield GenEvent([t], delta)
                if text.stopped:
                    finish = "stop_string"
                    break
            tail = ""
            if not text.stopped:  # bytes the stream decoder still holds (an unfinished character)
                full = self.tok.decode([t for t in out if t not in stops])
                if full.startswith(text.text):
                    tail = text.push(full[len(text.text) :])
            tail += text.flush()
            sent.append(tail)
            offset, committed = hot.state.position, 0
            if commit:
                kept = self._kept_output(out, finish, text, p.commit_stop)
                rest = kept[len(out) - 1 :] if kept[: len(out) - 1] == out[:-1] else None
                if rest is not None:  # `work` has read out[:-1], which kept begins with: read the rest
                    pieces += [[t] for t in out[:-1]]
                    state, last = work, rest + p.suffix
                else:  # kept diverges from what `work` read (a stop string cut inside a token)
                    state, last = after_prompt, kept + p.suffix
                if last:
                    await self.run(state.append, last)
                    pieces.append(last)
                record = json.dumps(
                    {"p": tokens_hash([prompt_ids]), "g": out, "t": "".join(sent), "f": finish},
                    separators=(",", ":"),
                )
                res = await self._commit(key, hot, state, pieces, append_id, record)
                offset, committed = res.offset, res.offset - res.start
                metrics.TOKENS_READ.inc(sum(len(x) for x in pieces))
            yield GenEvent([], tail, True, finish, offset, len(out), False, committed)

    def _kept_output(self, out: list[int], finish: str, text: StopText, commit_stop: bool) -> list[int]:
        """The output tokens a committed generation keeps: all, or exactly the text the client was sent."""
        if commit_stop or finish == "length":
            return out
        if finish == "stop_token":
            return out[:-1]
        cut = text.text[: text.sent]  # the text before the stop string
        for k in range(len(out) - 1, -1, -1):
            head = self.tok.decode(out[:k])
            if cut.startswith(head) and not head.endswith("\ufffd"):
                rest = cut[len(head) :]
                return out[:k] + (self.tok.encode(rest) if rest else [])
        return self.tok.encode(cut) if cut else []

    def _replayed(self, append_id: str, dup: AppendResult, prompt: list[int]) -> GenEvent:
        """The answer to a retried committed generation that already landed: its original output."""
        try:
            rec = json.loads(dup.record) if dup.record else None
        except json.JSONDecodeError:
            rec = None
        if not isinstance(rec, dict) or "p" not in rec:
            raise InvalidArgument(
                f"append_id {append_id!r} was already used by an append (at offset {dup.start}), not a generation; "
                "use a new append_id"
            )
        if rec["p"] != tokens_hash([prompt]):
            raise InvalidArgument(
                f"append_id {append_id!r} was already used for a generation with another prompt "
                f"(at offset {dup.start}); use a new append_id for a new generation"
            )
        out = [int(t) for t in rec["g"]]
        return GenEvent(out, str(rec["t"]), True, str(rec["f"]), dup.offset, len(out), True, dup.offset - dup.start)

    async def export(self, tenant: str, sid: str) -> tuple[Head, bytes]:
        """The session's head and its whole state as snapshot bytes (safetensors)."""
        key = (tenant, sid)
        async with self._held(key):
            try:
                hot = await self._load(key)
            except ForeignSession as e:
                return e.head, await self._stored_state(e.head)
            data = await self.run(state_to_bytes, hot.state)
            async with self._redis():
                head = await self.store.head(tenant, sid)
        if head is None:
            raise NotFound(f"session {sid!r} does not exist")
        return head, data

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
                return await self.store.read_snapshot(head.snap)
            except DataLoss:
                now = await self.store.head(head.tenant, head.session_id)
                if now is None or now.snap != head.snap:  # its daemon published a newer one meanwhile
                    raise Unavailable(f"session {head.session_id!r} changed while it was exported; retry") from None
                raise

    async def import_(
        self, tenant: str, sid: str, metadata: dict[str, str], data: bytes, offset: int | None = None
    ) -> Info:
        """A new session from exported bytes: validated (against `offset` too), stored as its first snapshot,
        then published."""
        try:
            state = await self.run(state_from_bytes, self.model, data)
        except ModelMismatchError as e:
            raise FailedPrecondition(f"the export was made with another model: {e}") from e
        except SnapshotError as e:
            raise InvalidArgument(f"the export is not a usable session state: {e}") from e
        if offset is not None and state.position != offset:
            raise InvalidArgument(
                f"the header's offset {offset} differs from the offset of the state it carries ({state.position})"
            )
        key = (tenant, sid)
        async with self._held(key), self._redis():
            snap = await self.store.write_snapshot(data, self.digest, state.position)
            code = await self.store.create(
                tenant, sid, metadata, self.digest, self.s.max_sessions_per_tenant, snap=snap, offset=state.position
            )
            if code != 1:
                await self.store.drop_snapshot(snap)
            head = await self.store.head(tenant, sid) if code == 1 else None
        if code == -1:
            raise AlreadyExists(f"session {sid!r} already exists")
        if code == -2:
            raise ResourceExhausted(f"tenant has reached its limit of {self.s.max_sessions_per_tenant} sessions")
        if head is None:
            raise Unavailable(f"session {sid!r} vanished right after the import; retry")
        return Info(head, state.pending_count, state.steps, state.nbytes(), False)
