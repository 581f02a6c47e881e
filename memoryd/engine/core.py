"""The engine loop: schedule, execute, update; and the `submit` a session awaits.

One asyncio task runs the loop.  Each tick it asks the scheduler for a plan over
everything waiting, hands the plan to the worker thread (the event loop stays free
while the model runs; work submitted meanwhile joins the next tick), then routes
each outcome to the future of the call that submitted it.  An append with tokens
left stays queued with its progress; a call that was cancelled (a client went
away) is dropped from the queue, and a result for it is discarded.
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
from memoryd.engine.scheduler import Budget, Plan, schedule
from memoryd.engine.work import Append, Rebuild, Result, State, Ticket, Work
from memoryd.engine.worker import Outcome, execute
from model import StreamState, digest_of
from model.batch import counts_at, tokens_to_step

log = logging.getLogger("memoryd.engine")


class Engine:
    """Owns the model, the queue of work, and the worker thread."""

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
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="memoryd-worker")
        self._task: asyncio.Task[None] | None = None
        self.ticks = 0

    # -- what sessions call ----------------------------------------------------------------------

    async def submit(self, work: Work) -> Result:
        """Queue one item and wait for its result (raises what the worker raised, for bugs only)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="memoryd-engine")
            self._task.add_done_callback(self._stopped)
        ticket = self._ticket(work)
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
                with contextlib.suppress(ValueError):
                    self._waiting.remove(ticket)

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
        self._thread.shutdown(wait=True)

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
        elif isinstance(work, Rebuild):
            t.cost = 1 + sum(len(p) for p in work.pieces)
        return t

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._waiting:
                # Let the calls whose results the last tick delivered submit their next item (a
                # generation streams its token, then asks for the next one) so they join this tick
                # instead of the one after: a few passes of the event loop, no timer.
                for _ in range(4):
                    await asyncio.sleep(0)
                plan = schedule(self._waiting, self.budget)
                if not plan:
                    break
                for t in _tickets(plan):
                    t.served = self.ticks
                t0 = time.perf_counter()
                try:
                    outcomes = await loop.run_in_executor(self._thread, execute, self.model, plan)
                    self._update(plan, outcomes, time.perf_counter() - t0)
                except Exception as e:  # a bug fails this plan's calls, never the engine
                    log.exception("the engine failed on a plan")
                    self._update(plan, [Outcome(t, error=e) for t in _tickets(plan)], time.perf_counter() - t0)

    def _update(self, plan: Plan, outcomes: list[Outcome], seconds: float) -> None:
        self.ticks += 1
        metrics.ENGINE_TICKS.inc()
        metrics.ENGINE_TICK_SECONDS.observe(seconds)
        metrics.ENGINE_TICK_TOKENS.observe(plan.tokens)
        if plan.decodes:
            metrics.ENGINE_DECODE_ROWS.observe(len(plan.decodes))
        for o in outcomes:
            if o.result is None and o.error is None:
                continue  # an append with tokens left: stays queued
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


def _tickets(plan: Plan) -> list[Ticket]:
    return [*plan.decodes, *(t for t, _ in plan.chunks), *plan.others]
