"""`Append(frozen=True)` in the engine (issue 19): the tokens are read into a frozen copy
(`model.StreamState.frozen_copy`), forward only, however the compute lane cuts them; the submitted
state is untouched; a generation from that copy never steps."""

from __future__ import annotations

import asyncio

import torch
from service_fixtures import tiny_checkpoint, tiny_model  # noqa: F401 (fixtures)

from memoryd.engine.core import Engine
from memoryd.engine.scheduler import Budget
from memoryd.engine.work import Append, Finished, Generate, SamplingParams


def test_a_frozen_append_never_steps_however_it_is_cut(tiny_model) -> None:  # noqa: F811
    from model import StreamState

    b = tiny_model.cfg.mini_batch_size
    history = [1 + i % 200 for i in range(3 * b + 3)]
    extra = [7 + i % 100 for i in range(5 * b + 2)]  # five would-be steps, cut by a budget of 2b per run

    async def main():
        engine = Engine(tiny_model, Budget(tokens=2 * b, rows=4))
        base = StreamState.fresh(tiny_model)
        base.append(history)
        before = {k: v.clone() for k, v in base.tensors().items()}
        done = await engine.submit(Append(base, extra, frozen=True))
        ends = []
        async with engine.generate(Generate(done.state, SamplingParams(max_tokens=2 * b), frozenset())) as gen:
            async for item in gen:
                if isinstance(item, Finished):
                    ends.append(item)
        await engine.close()
        return base, before, done, ends

    base, before, done, ends = asyncio.run(main())
    assert done.steps == 0 and done.state.frozen and done.state.steps == base.steps
    assert done.state.position == base.position + len(extra)
    assert all(torch.equal(base.tensors()[k], v) for k, v in before.items())
    ref = base.frozen_copy()
    ref.append(extra)  # one piece
    assert torch.allclose(done.state.pending_logits(), ref.pending_logits(), atol=1e-5, rtol=0)
    (end,) = ends
    assert end.state.frozen and end.state.steps == base.steps  # 2b decoded tokens, no step
