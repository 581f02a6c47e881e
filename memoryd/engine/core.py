"""The engine loop: schedule, execute, update; `submit` (one item) and `generate` (a request).

One asyncio task runs the loop; two worker threads run the lanes (memoryd/engine/scheduler.py):
the decode lane's batched forward, and the compute lane's solo work (test-time steps).
Whenever a lane is free the loop asks the scheduler for a plan over everything waiting
that is not already running, hands each free lane its part (the event loop stays free
while the model runs; work submitted meanwhile joins the next plan), and when a lane
finishes the update step routes each outcome: an item's result to the future of the call
that submitted it; a sample's token to its generation's queue, after which the sample
waits for the next plan by itself (as vLLM v1: the request lives in the engine until it
finishes, so its next token never waits for the session layer to ask for it).  So a
64K-token append, or a session's test-time step, runs beside the other sessions' decoding
instead of between their tokens.  An append with tokens left stays queued with its
progress; a call or generation that was cancelled (a client went away) is dropped from the
queue at once, and a result for it that was already running is discarded.  An item
submitted with a deadline that passes before it runs is dropped too (its call fails with
DEADLINE_EXCEEDED: nobody will use the result); work that is safe to finish (a rebuild,
an append with an append_id) is submitted without one.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import time
from concurrent.futures import Future, ThreadPoolExecutor

from memoryd import metrics
from memoryd.engine.scheduler import LANES, Budget, Lane, Plan, schedule
from memoryd.engine.work import (
    Append,
    Finished,
    FinishReason,
    Generate,
    Rebuild,
    Refused,
    RefusedError,
    Result,
    Sample,
    Sampled,
    State,
    Ticket,
    Work,
)
from memoryd.engine.worker import Outcome, execute
from memoryd.errors import DeadlineExceeded
from model import StreamState, TTTModel, digest_of
from model.batch import runs_solo, tokens_to_step
from model.pool import DEFAULT_MAX_BYTES, DecodePool
from model.state import counts_at, fork_bytes_bound, full_state_bytes, state_bytes_bound

log = logging.getLogger("memoryd.engine")


class Engine:
    """Owns the model, the queue of work, and the lanes' worker threads."""

    def __init__(self, model: TTTModel, budget: Budget, pool_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.model = model
        self.budget = budget
        self._pool = DecodePool(model.cfg, pool_bytes) if pool_bytes else None
        """The decode lane's copy of its rows' keys (at most `pool_bytes`), so that a batched forward attends in
        one call a layer (`model.pool`): used only on that lane's thread, holds nothing until a forward of 2 or
        more rows."""
        self.digest = digest_of(model)
        """The model's digest: a session stored under another one is not this model's to read."""
        self.fresh_bytes = StreamState.fresh(model).nbytes()
        """Device bytes of a new session's state (what `create` reports)."""
        self.full_bytes = full_state_bytes(model)
        """Bytes a state grows to (stepped, window full): what residency plans a session at."""
        self._waiting: list[Ticket] = []
        self._futures: dict[int, asyncio.Future[Result]] = {}
        self._generations: dict[Ticket, Generation] = {}
        """A running sample's ticket -> its generation (removed when the sample finishes or is cancelled)."""
        self._seq = itertools.count()
        self._wake = asyncio.Event()
        self._lanes = {lane: ThreadPoolExecutor(1, thread_name_prefix=f"memoryd-{lane}") for lane in LANES}
        self._task: asyncio.Task[None] | None = None
        self._tick_metrics = {
            lane: (metrics.ENGINE_TICKS.labels(lane), metrics.ENGINE_TICK_SECONDS.labels(lane)) for lane in LANES
        }
        """Each lane's tick counter and timer (looked up once, not per tick)."""
        self.ticks = 0
        """Lane runs so far (both lanes)."""
        self.seconds_per_token = 0.0
        """The compute lane's recent seconds per token of solo work (a moving average; 0: not measured
        yet): what admission (memoryd/sessions/admission.py) prices queued work at."""
        self.seconds_per_item = 0.0
        """The same for a rebuild, import or export (a session's load, or its snapshot on eviction)."""

    # -- what sessions call ----------------------------------------------------------------------

    def _start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="memoryd-engine")
            self._task.add_done_callback(self._stopped)

    async def submit(self, work: Work, deadline: float | None = None) -> Result:
        """Queue one item and wait for its result (raises what the worker raised, for bugs only).

        `deadline` (time.monotonic()): if it passes before the item runs, the item is dropped and
        this raises DeadlineExceeded."""
        self._start()
        ticket = self._ticket(work)
        ticket.deadline = deadline
        fut: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._futures[ticket.seq] = fut
        self._waiting.append(ticket)
        metrics.ENGINE_WAITING.set(len(self._waiting))
        self._wake.set()
        try:
            return await fut
        finally:
            if not fut.done() or fut.cancelled():  # the caller went away: stop its work
                self._futures.pop(ticket.seq, None)
                if ticket in self._waiting:
                    self._waiting.remove(ticket)
                    metrics.DROPPED.inc()

    def generate(self, request: Generate, deadline: float | None = None) -> Generation:
        """Start a generation: each sample decodes on its own fork of the prompt's state, joining every
        decode batch until it finishes; read its tokens from the returned stream (close it to cancel).

        `deadline` (time.monotonic()): once it passes, the generation leaves the engine and its stream
        raises DeadlineExceeded (a dry run nobody will read)."""
        self._start()
        gen = Generation(self, request)
        seed = request.params.seed
        for i in range(request.params.samples):
            rng = random.Random((seed + i) % 2**64 if seed is not None else random.SystemRandom().getrandbits(64))
            sample = Sample(request, i, request.state.clone(), rng)
            sample.u = rng.random()
            ticket = Ticket(sample, next(self._seq), step_every=self.model.cfg.mini_batch_size)
            ticket.deadline = deadline
            gen.tickets.append(ticket)
            self._generations[ticket] = gen
            self._waiting.append(ticket)
        metrics.ENGINE_WAITING.set(len(self._waiting))
        self._wake.set()
        return gen

    def copy_bytes(self, position: int, tokens: int, frozen: int = 0) -> int:
        """At most what a call's working copy of a state at `position` owns once it has read `tokens` more
        (residency charges a pinned session for it): the copy shares every tensor of the state it was made
        from (`fork`) and owns only what it makes new, which is never more than a state holds at
        `position + tokens`, less the fast weights while none of those tokens takes a test-time step
        (`model.state.fork_bytes_bound`), and never more than a full state (`full_bytes`).  So a short
        session's call is charged a short state's bytes, and a generation that steps nowhere its keys
        and values, not a second theta.

        `frozen`: tokens a generation reads forward only into a frozen copy (its recalled context, its
        prompt, its reply; `Append(frozen=True)`), which keeps every one of them, past the window too:
        the larger of the two copies is charged (the frozen one, then the commit's)."""
        stepping = min(self.full_bytes, fork_bytes_bound(self.model, position, tokens))
        return max(stepping, state_bytes_bound(self.model, position, frozen)) if frozen else stepping

    def counts_at(self, offset: int) -> tuple[int, int]:
        """(test-time steps, pending tokens) of a session at `offset` (the model's rule)."""
        return counts_at(offset, self.model.cfg.mini_batch_size)

    @staticmethod
    def fork(state: State) -> State:
        """An O(1) copy of a state (tensors are shared, never written in place where visible)."""
        return state.clone()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for pool in self._lanes.values():
            pool.shutdown(wait=True)

    # -- the loop --------------------------------------------------------------------------------

    def _stopped(self, task: asyncio.Task[None]) -> None:
        """The loop ended (closed, or a bug): no call may wait forever on work it will not run."""
        error = RuntimeError("the engine stopped before running this work; retry the call")
        if not task.cancelled() and task.exception() is not None:
            log.error("the engine loop failed", exc_info=task.exception())
        for fut in self._futures.values():
            if not fut.done():
                fut.set_exception(error)
        for gen in set(self._generations.values()):
            gen.queue.put_nowait(error)
        self._futures.clear()
        self._generations.clear()
        self._waiting.clear()

    def _ticket(self, work: Work) -> Ticket:
        t = Ticket(work, next(self._seq), step_every=self.model.cfg.mini_batch_size)
        if isinstance(work, Append):
            t.cost, t.to_step = len(work.tokens), tokens_to_step(work.state)
        elif isinstance(work, Rebuild):
            t.cost = 1 + sum(len(p) for p in work.pieces)
        return t

    async def _run(self) -> None:
        """One pass per wake-up: results of finished lanes in, expired work out, a plan on every free lane,
        then sleep until a lane finishes or new work arrives (both set `_wake`). A lane's thread wakes the
        loop itself (`lane_done`): no asyncio future chained to each run, no task and `asyncio.wait` per
        tick, so a tick costs the loop one wake-up."""
        loop = asyncio.get_running_loop()
        busy: dict[Future[list[Outcome]], tuple[Lane, Plan, float]] = {}

        def lane_done(_: object) -> None:  # on the lane's thread: wake the loop
            loop.call_soon_threadsafe(self._wake.set)

        while True:
            self._wake.clear()
            for fut in [f for f in busy if f.done()]:
                lane, part, t0 = busy.pop(fut)
                try:
                    outcomes = fut.result()
                except Exception as e:  # a bug fails this plan's calls, never the engine
                    log.exception("the engine's %s lane failed on a plan", lane)
                    outcomes = [Outcome(t, error=e) for t in part.tickets()]
                self._update(lane, part, outcomes, time.perf_counter() - t0)
            if all(v[0] != "decode" for v in busy.values()):
                self._release_pool()
            self._drop_expired()
            free = [lane for lane in LANES if all(lane != v[0] for v in busy.values())]
            if free and self._waiting:
                plan = schedule([t for t in self._waiting if not t.running], self.budget, free)
                for lane in free:
                    part = plan.lane(lane)
                    if not part:
                        continue
                    for t in part.tickets():
                        t.served, t.running = self.ticks, True
                    fut = self._lanes[lane].submit(execute, self.model, part, self._pool if lane == "decode" else None)
                    fut.add_done_callback(lane_done)
                    busy[fut] = (lane, part, time.perf_counter())
            await self._wake.wait()

    def _release_pool(self) -> None:
        """No generation is left: give the decode lane's pool memory back (called only while that lane is
        not running, so nothing else holds the pool; the next batch copies its rows in again)."""
        if not self._generations and self._pool is not None and self._pool.nbytes():
            self._pool.release()
            metrics.DECODE_POOL_BYTES.set(0)

    def _drop_expired(self) -> None:
        """Items whose deadline has passed and that have not started: nobody will use their result."""
        now = time.monotonic()
        why = "the call's deadline passed while its work was queued: it did not run"
        for t in [t for t in self._waiting if t.deadline is not None and t.deadline <= now and not t.running]:
            if t not in self._waiting:  # a sample of a generation dropped just before
                continue
            metrics.DROPPED.inc()
            gen = self._generations.get(t)
            if gen is not None:  # the whole generation goes: no one reads it any more
                gen.close()
                gen.queue.put_nowait(DeadlineExceeded(why))
                continue
            self._waiting.remove(t)
            fut = self._futures.pop(t.seq, None)
            if fut is not None and not fut.done():
                fut.set_exception(DeadlineExceeded(why))
        metrics.ENGINE_WAITING.set(len(self._waiting))

    def _update(self, lane: Lane, plan: Plan, outcomes: list[Outcome], seconds: float) -> None:
        self.ticks += 1
        if lane == "compute" and plan.chunks and not plan.others:  # a load's snapshot read is not per token
            self.seconds_per_token = _average(self.seconds_per_token, seconds / plan.compute_tokens)
        elif lane == "compute" and plan.others and not plan.chunks and not plan.solo:
            self.seconds_per_item = _average(self.seconds_per_item, seconds / len(plan.others))
        ticks, tick_seconds = self._tick_metrics[lane]
        ticks.inc()
        tick_seconds.observe(seconds)
        metrics.ENGINE_TICK_TOKENS.observe(plan.tokens)
        if plan.decodes:
            metrics.ENGINE_DECODE_ROWS.observe(len(plan.decodes))
        for t in plan.tickets():
            t.running = False
        for o in outcomes:
            if isinstance(o.ticket.work, Sample):
                self._sampled(o.ticket, o.result, o.error)
                continue
            if o.result is None and o.error is None:
                o.ticket.age = next(self._seq)  # an append with tokens left: back of the queue
                continue
            if o.ticket in self._waiting:
                self._waiting.remove(o.ticket)
            fut = self._futures.pop(o.ticket.seq, None)
            if fut is None or fut.done():
                continue
            if o.error is not None:
                fut.set_exception(o.error)
            else:
                fut.set_result(o.result)
        metrics.ENGINE_WAITING.set(len(self._waiting))

    # -- generations -----------------------------------------------------------------------------

    def _sampled(self, ticket: Ticket, result: Result | None, error: BaseException | None) -> None:
        """A sample's tick is back: stream its token, then finish it or queue its next tick."""
        gen = self._generations.get(ticket)
        if gen is None:  # cancelled while it ran: its state is no one's now
            return
        sample = ticket.work
        assert isinstance(sample, Sample)
        if sample.token is not None:
            sample.read += 1  # the tick read the previous token
        if error is not None or isinstance(result, Refused):
            gen.close()
            gen.queue.put_nowait(error if error is not None else result)
            return
        assert isinstance(result, Sampled)
        if sample.stop:  # asked to stop while this tick ran: its draw is not wanted
            self._finish(ticket, "stopped")
            return
        sample.out.append(result.token)
        gen.queue.put_nowait(result)
        params = sample.request.params
        if result.token in sample.request.stop_ids:
            self._finish(ticket, "stop_token")
        elif len(sample.out) >= params.max_tokens:
            self._finish(ticket, "length")
        else:
            sample.token, sample.u = result.token, sample.rng.random()
            ticket.solo = runs_solo(sample.state, sample.token)
            ticket.cost = self.model.cfg.mini_batch_size if ticket.solo else 1

    def _finish(self, ticket: Ticket, reason: FinishReason) -> None:
        gen = self._generations.pop(ticket)
        with contextlib.suppress(ValueError):
            self._waiting.remove(ticket)
        sample = ticket.work
        assert isinstance(sample, Sample)
        nbytes = sample.state.nbytes() if sample.request.keep else 0
        gen.queue.put_nowait(Finished(sample.index, reason, sample.state, sample.read, nbytes))

    def _drop(self, tickets: list[Ticket]) -> None:
        """A generation's samples leave the engine now (a running tick's result is then discarded)."""
        for t in tickets:
            if self._generations.pop(t, None) is not None:
                with contextlib.suppress(ValueError):
                    self._waiting.remove(t)
        metrics.ENGINE_WAITING.set(len(self._waiting))


class Generation:
    """A generation in the engine, as its caller sees it: `async for` its `Sampled` tokens and each
    sample's `Finished` (a sample's tokens, then its end); `stop(i)` ends sample i early (a stop
    string); `close()` (or leaving `async with`) takes it out of the engine at once (cancellation)."""

    def __init__(self, engine: Engine, request: Generate) -> None:
        self.engine, self.request = engine, request
        self.tickets: list[Ticket] = []
        self.queue: asyncio.Queue[Sampled | Finished | Refused | BaseException] = asyncio.Queue()
        self._open = request.params.samples

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> Sampled | Finished:
        if self._open == 0:
            raise StopAsyncIteration
        item = await self.queue.get()
        if isinstance(item, Finished):
            self._open -= 1
        elif isinstance(item, Refused):
            self._open = 0
            raise RefusedError(item)
        elif isinstance(item, BaseException):
            self._open = 0
            raise item
        return item

    def stop(self, index: int) -> None:
        """End sample `index` now (its `Finished` follows; a tick it is running is discarded)."""
        ticket = self.tickets[index]
        sample = ticket.work
        assert isinstance(sample, Sample)
        sample.stop = True
        if ticket in self.engine._generations and not ticket.running:
            self.engine._finish(ticket, "stopped")

    def close(self) -> None:
        """Take every sample out of the engine (the client went away, or the caller is done)."""
        self.engine._drop(self.tickets)

    async def __aenter__(self) -> Generation:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


def _average(old: float, new: float) -> float:
    """A moving average that follows the last few runs (0: none yet)."""
    return new if not old else 0.8 * old + 0.2 * new
