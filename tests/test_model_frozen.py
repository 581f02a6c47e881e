"""A frozen copy (`StreamState.frozen_copy`) reads tokens forward only: no test-time step, ever.

What a generation reads recalled context into (issue 19).  Checked against a reference that
recomputes every pending position in one forward under the source's theta (its stepped
caches as they are, the sliding-window mask), past the window and across what would have
been mini-batch boundaries; the source must stay bit-identical; a frozen row batched with
others must decode as it does alone.
"""

from __future__ import annotations

import pytest
import torch
from model_configs import micro

from model import StreamState, init_model
from model.batch import NEVER, decode, runs_solo, tokens_to_step
from model.snapshot import state_to_bytes

TOL = 1e-5


@pytest.fixture(scope="module", params=["ttt-e2e", "sinks", "far-sinks", "llama-style", "full-attention"])
def model(request):
    return init_model(micro(request.param), seed=5).requires_grad_(False)


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def reference_logits(source: StreamState, extra: list[int]) -> torch.Tensor:
    """Logits [p, V] of every position after the source's last step: the source's pending tokens
    and `extra`, recomputed in one forward with the source's theta fixed, over its stepped
    caches (immutable tuples: concatenated, never grown in place) and the window mask."""
    model, cfg = source.model, source.model.cfg
    ids = torch.cat((source.pending_tokens, torch.tensor(extra, dtype=torch.int64)))
    past = [None if c is None else (c[0].clone(), c[1].clone()) for c in source.kv]
    h, _ = model.run_blocks(
        model.embed_tokens(ids[None]),
        range(cfg.num_layers),
        past,
        source.steps * cfg.mini_batch_size,
        source.fast,
        "math",
    )
    return model.head(h)[0]


def snapshot_of(s: StreamState) -> dict[str, torch.Tensor]:
    """Copies of everything a state can see: its defining tensors, provisional outputs, visible cache."""
    out = {k: v.clone() for k, v in s.tensors().items()}
    out["pending_out"] = s.pending_out.clone()
    for i, live in enumerate(s.live_kv):
        if live is not None:
            k, v = live.keys()
            out[f"live.{i}.k"], out[f"live.{i}.v"] = k.clone(), v.clone()
    return out


def assert_unchanged(s: StreamState, before: dict[str, torch.Tensor], counts: tuple[int, int, int]) -> None:
    assert (s.position, s.steps, s.pending_count) == counts
    now = snapshot_of(s)
    assert sorted(now) == sorted(before)
    for k in before:
        assert torch.equal(now[k], before[k]), f"{k} of the source changed"


@pytest.mark.parametrize("history", [0, 3, 9, 30])
@pytest.mark.parametrize("sizes", [[40], [1, 3, 7, 2, 27], [1] * 40])
def test_frozen_reads_equal_one_forward_with_theta_fixed(model, history, sizes):
    """40 tokens read frozen (window 12, mini-batch 4: ten would-be steps, over three windows)."""
    source = StreamState.fresh(model)
    if history:
        source.append(tokens(history, 1))
    before, counts = snapshot_of(source), (source.position, source.steps, source.pending_count)
    frozen = source.frozen_copy()
    extra = tokens(sum(sizes), 2)
    i = 0
    for n in sizes:
        report = frozen.append(extra[i : i + n])
        i += n
        assert report.steps == 0
    assert frozen.steps == source.steps and frozen.position == source.position + len(extra)
    assert all(frozen.fast[k] is source.fast[k] for k in source.fast)  # theta is the source's, not a copy
    ref = reference_logits(source, extra)
    got = frozen.pending_logits()
    assert got.shape == ref.shape
    assert torch.allclose(got, ref, atol=TOL, rtol=0), f"max diff {(got - ref).abs().max()}"
    assert torch.allclose(frozen.logits(), ref[-1], atol=TOL, rtol=0)
    assert_unchanged(source, before, counts)


def test_frozen_decode_never_steps_and_batches_like_solo(model):
    """A frozen row decoded in a batch with a stream row equals the same row decoded alone, across
    what would be mini-batch boundaries; the stream row still steps solo at its boundaries."""
    source = StreamState.fresh(model)
    source.append(tokens(10, 3))
    a, b = source.frozen_copy(), source.frozen_copy()
    a.append(tokens(7, 4))
    b.append(tokens(7, 4))
    other = StreamState.fresh(model)
    other.append(tokens(5, 5))
    steps_before = other.steps
    for t in tokens(13, 6):
        assert not runs_solo(a, t) and tokens_to_step(a) == NEVER
        batched = decode([a, other], [t, (t + 1) % 256])[0]
        alone = decode([b], [t])[0]
        assert torch.allclose(batched, alone, atol=TOL, rtol=0), f"max diff {(batched - alone).abs().max()}"
    assert a.steps == b.steps == source.steps
    assert other.steps > steps_before  # the stream row crossed boundaries and stepped (solo)
    ref = reference_logits(source, tokens(7, 4) + tokens(13, 6))
    assert torch.allclose(a.pending_logits(), ref, atol=TOL, rtol=0)


def test_source_goes_on_bit_exact_after_a_frozen_copy_read(model):
    """The source, appended to after its frozen copy wrote into the shared growing cache, equals a
    state that never had a copy: every defining tensor and its logits, bit for bit."""
    history, later = tokens(6, 7), tokens(9, 8)
    source = StreamState.fresh(model)
    source.append(history)
    frozen = source.frozen_copy()
    frozen.append(tokens(20, 9))
    decode([frozen], [3])
    clean = StreamState.fresh(model)
    clean.append(history)
    for s in (source, clean):
        s.append(later)
    assert (source.position, source.steps) == (clean.position, clean.steps)
    ta, tb = source.tensors(), clean.tensors()
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    assert torch.equal(source.logits(), clean.logits())


def test_frozen_state_is_never_persisted_and_its_forks_stay_frozen(model):
    s = StreamState.fresh(model)
    s.append(tokens(5, 10))
    f = s.frozen_copy()
    assert not s.frozen and f.clone().frozen
    with pytest.raises(ValueError, match="never persisted"):
        state_to_bytes(f)
    state_to_bytes(s)  # the source still can be
