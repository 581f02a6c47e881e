"""The engine loop: schedule, execute, update; and the `submit` a session awaits.

One asyncio task runs the loop; two worker threads run the lanes (memoryd/engine/scheduler.py):
the decode lane's batched forward, and the compute lane's solo work (test-time steps).
Whenever a lane is free the loop asks the scheduler for a plan over everything waiting
that is not already running, hands each free lane its part (the event loop stays free
while the model runs; work submitted meanwhile joins the next plan), and when a lane
finishes routes each outcome to the future of the call that submitted it.  So a 64K-token
append, or a session's test-time step, runs beside the other sessions' decoding instead of
between their tokens.  An append with tokens left stays queued with its progress; a call
that was cancelled (a client went away) is dropped from the queue, and a result for it is
discarded; so is an item submitted with a deadline that passes before it runs (its call
fails with DEADLINE_EXCEEDED: nobody will use the result).  Work that is safe to finish
(a rebuild, an append with an append_id) is submitted without one.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from memoryd import metrics
from memoryd.engine.scheduler import LANES, Budget, Lane, Plan, schedule
from memoryd.engine.work import Append, Decode, Rebuild, Result, State, Ticket, Work
from memoryd.engine.worker import Outcome, execute
from memoryd.errors import DeadlineExceeded
from model import StreamState, digest_of
from model.batch import counts_at, runs_solo, tokens_to_step

log = logging.getLogger("memoryd.engine")


class Engine:
    """Owns the model, the queue of work, and the lanes' worker threads."""

    def __init__(self, model: Any, budget: Budget) -> None:
        self.model = model
        self.budget = budget
        self.digest = digest_of(model)
        """The model's digest: a session stored under another one is not this model's to read."""
        self.fresh_bytes = StreamState.fresh(model).nbytes()
        """Device bytes of a new session's state (what `create` reports)."""
        self._waiting: list[Ticket] = []
        self._futures: dict[int, asyncio.Future[Result]] = {}
        self._seq = itertools.count()
        self._wake = asyncio.Event()
        self._lanes = {lane: ThreadPoolExecutor(1, thread_name_prefix=f"memoryd-{lane}") for lane in LANES}
        self._task: asyncio.Task[None] | None = None
        self.ticks = 0
        """Lane runs so far (both lanes)."""
        self.seconds_per_token = 0.0
        """The compute lane's recent seconds per token of solo work (a moving average; 0: not measured
        yet): what admission (memoryd/sessions/admission.py) prices queued work at."""
        self.seconds_per_item = 0.0
        """The same for a rebuild, import or export (a session's load, or its snapshot on eviction)."""

    # -- what sessions call ----------------------------------------------------------------------

    async def submit(self, work: Work, deadline: float | None = None) -> Result:
        """Queue one item and wait for its result (raises what the worker raised, for bugs only).

        `deadline` (time.monotonic()): if it passes before the item runs, the item is dropped and
        this raises DeadlineExceeded."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="memoryd-engine")
            self._task.add_done_callback(self._stopped)
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
        self._futures.clear()
        self._waiting.clear()

    def _ticket(self, work: Work) -> Ticket:
        t = Ticket(work, next(self._seq), step_every=self.model.cfg.mini_batch_size)
        if isinstance(work, Append):
            t.cost, t.to_step = len(work.tokens), tokens_to_step(work.state)
        elif isinstance(work, Decode) and runs_solo(work.state, work.token):
            t.solo, t.cost = True, self.model.cfg.mini_batch_size
        elif isinstance(work, Rebuild):
            t.cost = 1 + sum(len(p) for p in work.pieces)
        return t

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        busy: dict[asyncio.Future[list[Outcome]], tuple[Lane, Plan, float]] = {}
        while True:
            if not busy and not self._waiting:
                await self._wake.wait()
            # Let the calls whose results the last run delivered submit their next item (a
            # generation streams its token, then asks for the next one) so they join this plan
            # instead of the one after: a few passes of the event loop, no timer.
            for _ in range(4):
                await asyncio.sleep(0)
            self._wake.clear()
            self._drop_expired()
            free = [lane for lane in LANES if all(lane != v[0] for v in busy.values())]
            plan = schedule([t for t in self._waiting if not t.running], self.budget, free)
            for lane in free:
                part = plan.lane(lane)
                if not part:
                    continue
                for t in part.tickets():
                    t.running = True
                fut = loop.run_in_executor(self._lanes[lane], execute, self.model, part)
                busy[fut] = (lane, part, time.perf_counter())
            if not busy:  # nothing could run (the scheduler always plans something for free lanes)
                await self._wake.wait()
                continue
            wake = loop.create_task(self._wake.wait())
            done, _ = await asyncio.wait([*busy, wake], return_when=asyncio.FIRST_COMPLETED)
            wake.cancel()
            for fut in done:
                if fut is wake:
                    continue
                lane, part, t0 = busy.pop(fut)
                try:
                    outcomes = fut.result()
                except Exception as e:  # a bug fails this plan's calls, never the engine
                    log.exception("the engine's %s lane failed on a plan", lane)
                    outcomes = [Outcome(t, error=e) for t in part.tickets()]
                self._update(lane, part, outcomes, time.perf_counter() - t0)

    def _drop_expired(self) -> None:
        """Items whose deadline has passed and that have not started: nobody will use their result."""
        now = time.monotonic()
        for t in [t for t in self._waiting if t.deadline is not None and t.deadline <= now and not t.running]:
            self._waiting.remove(t)
            metrics.DROPPED.inc()
            fut = self._futures.pop(t.seq, None)
            if fut is not None and not fut.done():
                why = "the call's deadline passed while its work was queued: it did not run"
                fut.set_exception(DeadlineExceeded(why))
        metrics.ENGINE_WAITING.set(len(self._waiting))

    def _update(self, lane: Lane, plan: Plan, outcomes: list[Outcome], seconds: float) -> None:
        self.ticks += 1
        if lane == "compute" and plan.chunks and not plan.others:  # a load's snapshot read is not per token
            self.seconds_per_token = _average(self.seconds_per_token, seconds / plan.compute_tokens)
        elif lane == "compute" and plan.others and not plan.chunks and not plan.solo:
            self.seconds_per_item = _average(self.seconds_per_item, seconds / len(plan.others))
        metrics.ENGINE_TICKS.labels(lane).inc()
        metrics.ENGINE_TICK_SECONDS.labels(lane).observe(seconds)
        metrics.ENGINE_TICK_TOKENS.observe(plan.tokens)
        if plan.decodes:
            metrics.ENGINE_DECODE_ROWS.observe(len(plan.decodes))
        for t in plan.tickets():
            t.running = False
        for o in outcomes:
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


def _average(old: float, new: float) -> float:
    """A moving average that follows the last few runs (0: none yet)."""
    return new if not old else 0.8 * old + 0.2 * new
