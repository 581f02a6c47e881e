"""Attention sinks seen from at most a horizon back (config.sink_horizon).

A query at position p sees sink j at distance min(p, horizon) - j; every other key at its own
distance.  Checked against a pair-by-pair reference built from unrotated queries and keys, and
through the model: the same logits for any cut of the stream, and nothing changed up to the
horizon.
"""

from __future__ import annotations

import re

import pytest
import torch

from model import StreamState, init_model, preset
from model.attention import apply_rope, attend, rope_cos_sin, window_mask

THETA = 10000.0


def rotate(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    cos, sin = rope_cos_sin(positions, x.shape[-1], THETA, torch.float64)
    return apply_rope(x, cos.to(x.dtype), sin.to(x.dtype))


def pairwise(q_raw, k_raw, v, qpos, kpos, window, sinks, horizon):
    """Each (query, key) scored at its own distance, a sink's taken from min(p, horizon)."""
    n, m, hd = q_raw.shape[-2], k_raw.shape[-2], q_raw.shape[-1]
    scores = torch.empty(n, m, dtype=torch.float64)
    for i in range(n):
        for j in range(m):
            p, kp = int(qpos[i]), int(kpos[j])
            seen_from = min(p, horizon) if kp < sinks else p
            qi = rotate(q_raw[..., i : i + 1, :], torch.tensor([seen_from]))
            kj = rotate(k_raw[..., j : j + 1, :], torch.tensor([kp]))
            scores[i, j] = float((qi * kj).sum()) * hd**-0.5
    mask = window_mask(int(qpos[0]), n, m, window, q_raw.device, sinks)
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1)
    return probs.to(v.dtype) @ v[0, 0]


CASES = [
    # (q_start, n, extra, sinks): `extra` keys past the stepped cache's window - 1 (pending
    # tokens, a frozen copy's read), so m = sinks + window - 1 + extra + n once the cache is full
    (10, 3, 0, 2),  # from position 0, below the horizon
    (40, 1, 0, 2),  # decode past the horizon, m = window + 2
    (45, 4, 0, 2),
    (100, 6, 0, 2),
    (20, 1, 0, 0),  # no sinks, m = window: every key
    (20, 1, 5, 0),  # no sinks, m past the window: its last `window` keys
    (20, 1, 5, 2),  # sinks apart from the window, below the horizon
    (40, 1, 5, 2),  # ... and past it
    (200, 1, 30, 2),
    (7, 1, 0, 2),  # m = window (positions 0..7)
    (8, 1, 0, 2),  # m = window + 1: sink 1 is also in the window
    (9, 1, 0, 2),  # m = window + 2: the sinks right before the window
    (10, 1, 0, 2),  # m = window + 3: a key between them and the window
    (30, 1, 0, 2),  # at the horizon: the sinks at their own positions
    (31, 1, 0, 2),  # one past it
    (28, 6, 0, 2),  # a mini-batch across the horizon
    (25, 5, 3, 2),  # a read past the window, below the horizon
    (40, 5, 3, 2),  # ... and past it
    (50, 4, 3, 0),  # no sinks
]


@pytest.mark.parametrize("impl", ["math", "sdpa"])
@pytest.mark.parametrize(("q_start", "n", "extra", "sinks"), CASES)
def test_attend_matches_a_pairwise_reference(impl: str, q_start: int, n: int, extra: int, sinks: int) -> None:
    window, horizon, hd = 8, 30, 16
    g = torch.Generator().manual_seed(q_start + n + 100 * extra)
    end = q_start + n
    recent = window - 1 + extra + n
    kpos = (
        torch.arange(end)
        if end <= sinks + recent
        else torch.cat((torch.arange(sinks), torch.arange(end - recent, end)))
    )
    q_raw = torch.randn(1, 1, n, hd, generator=g, dtype=torch.float64)
    k_raw = torch.randn(1, 1, len(kpos), hd, generator=g, dtype=torch.float64)
    v = torch.randn(1, 1, len(kpos), hd, generator=g, dtype=torch.float64)
    qpos = torch.arange(q_start, end)
    q, k = rotate(q_raw, qpos), rotate(k_raw, kpos)
    got = attend(q, k, v, q_start, window, impl, sinks, (horizon, THETA, None))[0, 0]
    want = pairwise(q_raw, k_raw, v, qpos, kpos, window, sinks, horizon)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    if end - 1 > horizon and sinks:  # past the horizon the rule differs from seeing the sinks at their own positions
        plain = attend(q, k, v, q_start, window, impl, sinks)[0, 0]
        assert not torch.allclose(plain, want)


@pytest.mark.parametrize(("q_start", "n"), [(40, 1), (40, 5), (28, 6)])
def test_grouped_query_heads_see_their_own_key_heads(q_start: int, n: int) -> None:
    """GQA (3 query heads per key head, as the default model): the sink scores computed apart
    (`far_sinks`, `decode_attention`) pair each query head with its own key head."""
    window, sinks, horizon = 8, 2, 30
    g = torch.Generator().manual_seed(7)
    m = sinks + window - 1 + 3 + n
    q = torch.randn(1, 6, n, 16, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, 2, m, 16, generator=g, dtype=torch.float64) for _ in range(2))
    rope = (horizon, THETA, None)
    got = attend(q, k, v, q_start, window, "sdpa", sinks, rope)
    for h in range(6):
        want = attend(
            q[:, h : h + 1], k[:, h // 3 : h // 3 + 1], v[:, h // 3 : h // 3 + 1], q_start, window, "math", sinks, rope
        )
        torch.testing.assert_close(got[:, h : h + 1], want, rtol=1e-9, atol=1e-9)


def _model(horizon: int | None):
    cfg = preset("tiny", window_size=16, attention_sinks=2, sink_horizon=horizon, mini_batch_size=8)
    return init_model(cfg, seed=3)


def test_any_cut_of_the_stream_gives_the_same_logits_past_the_horizon() -> None:
    """Past the horizon too, the persisted state (theta, stepped caches) is bit-identical however
    the stream was cut: every step runs on the same mini-batch shapes (`far_sinks` included)."""
    model = _model(horizon=40)
    tokens = torch.randint(0, 250, (150,), generator=torch.Generator().manual_seed(0)).tolist()
    whole = StreamState.fresh(model)
    whole.append(tokens)
    for cuts in (1, 7, 64):
        s = StreamState.fresh(model)
        for i in range(0, len(tokens), cuts):
            s.append(tokens[i : i + cuts])
        assert s.steps == whole.steps
        torch.testing.assert_close(s.logits(), whole.logits(), rtol=1e-5, atol=1e-5)
        mine, want = s.tensors(), whole.tensors()  # what a snapshot persists: bit for bit
        assert sorted(mine) == sorted(want)
        for name, t in want.items():
            assert torch.equal(mine[name], t), name


def test_nothing_changes_up_to_the_horizon_and_something_does_after() -> None:
    near, far = _model(horizon=40), _model(horizon=None)
    tokens = torch.randint(0, 250, (80,), generator=torch.Generator().manual_seed(1)).tolist()
    a, b = StreamState.fresh(near), StreamState.fresh(far)
    a.append(tokens[:40])
    b.append(tokens[:40])
    assert torch.equal(a.logits(), b.logits())
    a.append(tokens[40:])
    b.append(tokens[40:])
    assert not torch.allclose(a.logits(), b.logits())


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        ({"attention_sinks": 0, "sink_horizon": 64}, "needs attention_sinks"),
        ({"attention_sinks": 2, "sink_horizon": 17}, "must be >= window_size + attention_sinks"),
    ],
)
def test_a_horizon_the_rule_cannot_use_is_refused(overrides: dict, says: str) -> None:
    with pytest.raises(ValueError, match=re.escape(says)):
        preset("tiny", window_size=16, mini_batch_size=8, **overrides)


def test_the_horizon_is_part_of_the_config_a_digest_covers() -> None:
    """A session of a model with a horizon is not another model's (its config says so); a model
    without one writes no key, so the configs and digests of models before it stay as they were."""
    without = preset("tiny", window_size=16, attention_sinks=2, mini_batch_size=8)
    with_it = preset("tiny", window_size=16, attention_sinks=2, mini_batch_size=8, sink_horizon=40)
    assert "sink_horizon" not in without.to_json_dict()
    assert with_it.to_json_dict()["sink_horizon"] == 40
