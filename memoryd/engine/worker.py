"""The worker: runs one lane's plan on the device.  The only code in memoryd that touches tensors.

`execute` is called on a lane's worker thread (memoryd/engine/core.py), one plan per lane
at a time.  The two lanes never hold the same session's state at once (a session has one
item in flight); what forks share is immutable, or claimed under a lock (`model.cache.KVBuffer`).
Decodes run as one batched forward (`model.batch.decode`) and one batched sampling pass;
solo decodes, appends, rebuilds, imports and exports run per item, each on exactly the
shapes a single session would use, so a session's persisted state is bit-exact with a solo
replay of its log (see model/batch.py for what is batched and why).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from memoryd import metrics
from memoryd.engine.sampling import sample_rows
from memoryd.engine.scheduler import Plan
from memoryd.engine.work import (
    Append,
    Appended,
    Built,
    Export,
    Exported,
    Import,
    Rebuild,
    Refused,
    Result,
    Sample,
    Ticket,
)
from model import InputError, ModelMismatchError, SnapshotError, StreamState, state_from_bytes, state_to_bytes
from model.batch import decode, tokens_to_step
from model.pool import DecodePool
from model.state import validate_tokens


@dataclass
class Outcome:
    ticket: Ticket
    result: Result | None = None
    """None: an append with tokens left (it stays queued)."""
    error: BaseException | None = None
    """A bug, not bad input: the call fails with INTERNAL."""


def execute(model: torch.nn.Module, plan: Plan, pool: DecodePool | None = None) -> list[Outcome]:
    """Run one lane's plan. `pool`: the decode lane's (`model.pool`), which only that lane's thread may use."""
    out: list[Outcome] = []
    if plan.decodes:
        out += _decodes(plan.decodes, pool)
        if pool is not None:
            metrics.DECODE_POOL_BYTES.set(pool.nbytes())
    for ticket in plan.solo:  # each alone: its token takes a test-time step
        out += _decodes([ticket], None)
    for ticket, n in plan.chunks:
        out.append(_guard(ticket, lambda t=ticket, n=n: _append(t, n)))
    for ticket in plan.others:
        out.append(_guard(ticket, lambda t=ticket: _other(model, t.work)))
    return out


def _guard(ticket: Ticket, fn: Callable[[], Result | None]) -> Outcome:
    try:
        return Outcome(ticket, fn())
    except Exception as e:  # noqa: BLE001 - reported to the one call that submitted the item
        return Outcome(ticket, error=e)


def _decodes(tickets: list[Ticket], pool: DecodePool | None) -> list[Outcome]:
    """One tick of each sample: read its last token, draw its next (one forward, one sampling pass)."""
    rows: list[Sample] = [t.work for t in tickets]  # type: ignore[misc]
    assert all(isinstance(s, Sample) for s in rows)
    try:
        logits = decode([s.state for s in rows], [s.token for s in rows], pool)
        params = [s.request.params for s in rows]
        penalized = any(p.penalized for p in params)
        drawn = sample_rows(
            logits,
            params,
            [s.u for s in rows],
            [s.request.prompt for s in rows] if penalized else None,
            [s.out for s in rows] if penalized else None,
        )
    except InputError as e:
        return [Outcome(t, Refused("input", str(e))) for t in tickets]
    except Exception as e:  # noqa: BLE001 - every row of the batch fails with it
        return [Outcome(t, error=e) for t in tickets]
    for s, d in zip(rows, drawn, strict=True):
        d.sample = s.index
    return [Outcome(t, d) for t, d in zip(tickets, drawn, strict=True)]


def _append(ticket: Ticket, n: int) -> Result | None:
    """Read the next n tokens of an append into its own copy of the state."""
    work = ticket.work
    assert isinstance(work, Append)
    if ticket.progress is None:  # first piece: validate everything before reading anything
        try:
            validate_tokens(work.tokens, work.state.model.cfg.vocab_size)
        except InputError as e:
            return Refused("input", str(e))
        ticket.progress = Appended(work.state.frozen_copy() if work.frozen else work.state.clone(), 0)
    done: Appended = ticket.progress
    report = done.state.append(work.tokens[ticket.read : ticket.read + n])
    done.steps += report.steps
    ticket.read += n
    ticket.cost -= n
    ticket.to_step = tokens_to_step(done.state)
    if ticket.cost:
        return None
    done.nbytes = done.state.nbytes()
    return done


def _other(model: torch.nn.Module, work: object) -> Result:
    if isinstance(work, Export):
        return Exported(state_to_bytes(work.state))
    try:
        if isinstance(work, Import):
            state = state_from_bytes(model, work.data)
            return Built(state, nbytes=state.nbytes())
        if isinstance(work, Rebuild):
            t0 = time.perf_counter()
            state = state_from_bytes(model, work.snapshot) if work.snapshot is not None else StreamState.fresh(model)
            # The log's pieces as one append: the state does not depend on how tokens were cut
            # (model/state.py), and replaying a generation's one-token pieces one by one would
            # run a whole forward per token instead of one forward per mini-batch (issue 20:
            # 787 tokens took 25 s to reload, 3x their append).
            tail = [t for piece in work.pieces for t in piece]
            if tail:
                state.append(tail)
            return Built(state, len(tail), time.perf_counter() - t0, state.nbytes())
    except ModelMismatchError as e:
        return Refused("foreign_model", str(e))
    except (SnapshotError, InputError) as e:
        return Refused("corrupt" if isinstance(work, Rebuild) else "input", str(e))
    raise TypeError(f"the worker has no rule for {type(work).__name__}")
