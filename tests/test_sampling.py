"""The sampler (memoryd/engine/sampling.py) against references computed here from the logits, one
setting at a time and row by row: logit_bias, the penalties, min_p, logprobs; and a batch of rows
with different settings samples each row as it would alone (issue 18, "Must show" 3)."""

from __future__ import annotations

import math
import random

import pytest
import torch

from memoryd.engine.sampling import sample_rows
from memoryd.engine.work import SamplingError, SamplingLimits, SamplingParams

V = 50


def logits(rows: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, V, generator=g) * 3


def inverse_cdf(weights: dict[int, float], u: float) -> int:
    """The token the draw u picks from `weights` (unnormalised), most likely first."""
    order = sorted(weights, key=lambda t: -weights[t])
    total = sum(weights.values())
    acc = 0.0
    for t in order:
        acc += weights[t]
        if acc > u * total:
            return t
    return order[-1]


def penalized_reference(row: list[float], p: SamplingParams, prompt: list[int], out: list[int]) -> list[float]:
    """vLLM's penalties, token by token in plain Python."""
    x = list(row)
    for t in range(V):
        if p.repetition_penalty not in (0.0, 1.0) and (t in prompt or t in out):
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
        x[t] -= p.frequency_penalty * out.count(t)
        x[t] -= p.presence_penalty * (t in out)
    return x


def test_penalties_match_the_reference() -> None:
    x = logits(4, 1)
    prompts = [[1, 2, 3], [], [7, 7, 9], [4]]
    outs = [[3, 3, 5], [8, 8, 8, 1], [], [4, 4, 10]]
    settings = [
        SamplingParams(frequency_penalty=0.7),
        SamplingParams(presence_penalty=1.5, frequency_penalty=-0.4),
        SamplingParams(repetition_penalty=1.8),
        SamplingParams(repetition_penalty=0.6, presence_penalty=0.3, frequency_penalty=0.2),
    ]
    got = sample_rows(x, settings, [0.5] * 4, prompts, outs)
    for r, (p, prompt, out) in enumerate(zip(settings, prompts, outs, strict=True)):
        ref = penalized_reference(x[r].tolist(), p, prompt, out)
        assert got[r].token == max(range(V), key=lambda t: ref[t]), r
    # the penalties change the greedy pick where the reference says they do
    plain = sample_rows(x, [SamplingParams()] * 4, [0.5] * 4)
    assert [s.token for s in plain] == x.argmax(-1).tolist()


def test_penalties_steer_greedy_away_from_repeats() -> None:
    x = torch.zeros(1, V)
    x[0, 5], x[0, 6] = 2.0, 1.9
    out = [5]
    assert sample_rows(x, [SamplingParams()], [0.0], [[]], [out])[0].token == 5
    assert sample_rows(x, [SamplingParams(presence_penalty=0.2)], [0.0], [[]], [out])[0].token == 6
    assert sample_rows(x, [SamplingParams(repetition_penalty=1.1)], [0.0], [[]], [out])[0].token == 6
    assert sample_rows(x, [SamplingParams(repetition_penalty=1.1)], [0.0], [[5]], [[]])[0].token == 6, "prompt counts"
    assert sample_rows(x, [SamplingParams(frequency_penalty=0.05)], [0.0], [[]], [[5, 5]])[0].token == 5
    assert sample_rows(x, [SamplingParams(frequency_penalty=0.06)], [0.0], [[]], [[5, 5]])[0].token == 6


def test_logit_bias_matches_the_reference() -> None:
    x = logits(3, 2)
    top = x.argmax(-1).tolist()
    settings = [
        SamplingParams(logit_bias=((top[0], -100.0),)),  # bans the favourite
        SamplingParams(logit_bias=((11, 100.0),)),  # forces 11
        SamplingParams(logit_bias=((3, 0.5), (4, 1.25), (3, 0.5))),  # repeats add up
    ]
    got = [s.token for s in sample_rows(x, settings, [0.3] * 3)]
    for r, p in enumerate(settings):
        ref = x[r].tolist()
        for t, b in p.logit_bias:
            ref[t] += b
        assert got[r] == max(range(V), key=lambda t: ref[t]), r
    assert got[1] == 11 and got[0] != top[0]
    # sampled rows see the bias too: +100 makes a token all the probability there is
    forced = sample_rows(x[:1], [SamplingParams(temperature=1.0, logit_bias=((17, 100.0),))], [0.999])
    assert forced[0].token == 17


@pytest.mark.parametrize("min_p", [0.05, 0.3, 0.9])
def test_min_p_matches_the_reference(min_p: float) -> None:
    x = logits(1, 3)
    p = SamplingParams(temperature=0.8, min_p=min_p)
    probs = torch.softmax(x[0] / 0.8, -1).tolist()
    kept = {t: q for t, q in enumerate(probs) if q >= min_p * max(probs)}
    rng = random.Random(5)
    for _ in range(200):
        u = rng.random()
        assert sample_rows(x, [p], [u])[0].token == inverse_cdf(kept, u), u
    drawn = {sample_rows(x, [p], [u / 400])[0].token for u in range(400)}
    assert drawn == set(kept), "every kept token can be drawn, and nothing else"


def test_logprobs_match_the_reference() -> None:
    x = logits(3, 4)
    settings = [
        SamplingParams(logprobs=True, top_logprobs=5),
        SamplingParams(),  # asked for none
        SamplingParams(logprobs=True, temperature=1.0, presence_penalty=2.0, logit_bias=((0, 50.0),)),
    ]
    got = sample_rows(x, settings, [0.2, 0.2, 0.7], [[]] * 3, [[1, 2], [], [3]])
    ref = torch.log_softmax(x.double(), -1)
    assert got[1].logprob is None
    for r in (0, 2):
        lp = got[r].logprob
        assert lp is not None and lp.token == got[r].token
        assert math.isclose(lp.logprob, ref[r, lp.token].item(), abs_tol=1e-5), "the raw distribution's"
    top = got[0].logprob.top
    assert len(top) == 5 and [t for t, _ in top] == ref[0].argsort(descending=True)[:5].tolist()
    assert all(math.isclose(v, ref[0, t].item(), abs_tol=1e-5) for t, v in top)
    assert got[2].logprob.top == () and got[2].token == 0, "biased draw, raw logprob"


def test_a_mixed_batch_samples_each_row_as_alone() -> None:
    x = logits(6, 6)
    rng = random.Random(1)
    settings = [
        SamplingParams(),
        SamplingParams(temperature=0.7, top_k=5),
        SamplingParams(temperature=1.3, top_p=0.8),
        SamplingParams(temperature=1.0, min_p=0.2, frequency_penalty=0.5),
        SamplingParams(temperature=0.5, logit_bias=((9, 3.0),), logprobs=True, top_logprobs=2),
        SamplingParams(repetition_penalty=1.3),
    ]
    outs = [[rng.randrange(V) for _ in range(rng.randint(0, 6))] for _ in settings]
    prompts = [[rng.randrange(V) for _ in range(3)] for _ in settings]
    for _ in range(20):
        u = [rng.random() for _ in settings]
        batch = sample_rows(x, settings, u, prompts, outs)
        for r in range(len(settings)):
            alone = sample_rows(x[r : r + 1], settings[r : r + 1], u[r : r + 1], prompts[r : r + 1], outs[r : r + 1])
            assert batch[r].token == alone[0].token, r
            if batch[r].logprob is not None:
                assert math.isclose(batch[r].logprob.logprob, alone[0].logprob.logprob, abs_tol=1e-6)


LIM = SamplingLimits(vocab_size=V, max_tokens=64)


@pytest.mark.parametrize(
    ("params", "field", "over_limit"),
    [
        (SamplingParams(max_tokens=0), "max_tokens", False),
        (SamplingParams(max_tokens=65), "max_tokens", True),
        (SamplingParams(min_p=1.5), "min_p", False),
        (SamplingParams(presence_penalty=-2.5), "presence_penalty", False),
        (SamplingParams(frequency_penalty=math.inf), "frequency_penalty", False),
        (SamplingParams(repetition_penalty=-1.0), "repetition_penalty", False),
        (SamplingParams(logit_bias=((V, 1.0),)), "logit_bias", False),
        (SamplingParams(logit_bias=((1, 101.0),)), "logit_bias[1]", False),
        (SamplingParams(logit_bias=tuple((i % V, 0.0) for i in range(1025))), "logit_bias", True),
        (SamplingParams(top_logprobs=2), "top_logprobs", False),
        (SamplingParams(logprobs=True, top_logprobs=21), "top_logprobs", True),
        (SamplingParams(n=17), "n", True),
    ],
)
def test_check_names_the_field(params: SamplingParams, field: str, over_limit: bool) -> None:
    with pytest.raises(SamplingError) as e:
        params.check(LIM)
    assert e.value.field == field and e.value.over_limit == over_limit and field.split("[")[0] in e.value.message
