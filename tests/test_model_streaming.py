"""Streaming equals one shot, and the model equals a naive reading of the spec."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from model_configs import VARIANTS, micro
from naive_ttt import naive_nll

from model import StreamState, init_model, preset
from model.score import score_tokens
from model.sequence import run_sequence

TOL = 1e-5


def feed(model, tokens: torch.Tensor, sizes: list[int]) -> StreamState:
    state = StreamState.fresh(model)
    i = 0
    for n in sizes:
        if i >= tokens.numel():
            break
        state.append(tokens[i : i + n])
        i += n
    if i < tokens.numel():
        state.append(tokens[i:])
    return state


def assert_states_close(a: StreamState, b: StreamState, tol: float = TOL, exact_carried: bool = True) -> None:
    """What a step carries forward (theta, caches) is bit-identical; pending work is within tol.

    With `exact_carried=False` (different kernels) everything is compared within tol.
    """
    assert (a.position, a.steps, a.pending_count) == (b.position, b.steps, b.pending_count)
    ta, tb = a.tensors(), b.tensors()
    assert set(ta) == set(tb)
    for name in ta:
        assert ta[name].shape == tb[name].shape, name
        carried = exact_carried and name.startswith(("fast.", "kv.", "pending.tokens"))
        if carried:
            assert torch.equal(ta[name], tb[name]), f"{name} differs: {(ta[name] - tb[name]).abs().max()}"
        else:
            torch.testing.assert_close(ta[name], tb[name], atol=tol, rtol=tol, msg=lambda m, n=name: f"{n}: {m}")
    torch.testing.assert_close(a.logits(), b.logits(), atol=tol, rtol=tol)


@pytest.fixture(scope="module")
def tiny_model():
    return init_model(preset("tiny"), seed=3).requires_grad_(False)


@pytest.fixture(scope="module")
def tiny_tokens():
    g = torch.Generator().manual_seed(1)
    toks = torch.randint(0, 256, (150,), generator=g)
    toks[0] = toks[70] = 256  # document starts: masked targets
    return toks


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=40))
def test_any_chunking_equals_one_shot(tiny_model, tiny_tokens, sizes):
    one_shot = feed(tiny_model, tiny_tokens, [tiny_tokens.numel()])
    assert one_shot.steps == (tiny_tokens.numel() - 1) // tiny_model.cfg.mini_batch_size
    assert_states_close(feed(tiny_model, tiny_tokens, sizes), one_shot)


def test_one_token_appends_equal_one_shot(tiny_model, tiny_tokens):
    one_shot = feed(tiny_model, tiny_tokens, [tiny_tokens.numel()])
    assert_states_close(feed(tiny_model, tiny_tokens, [1] * tiny_tokens.numel()), one_shot)


def test_fast_weights_actually_change(tiny_model, tiny_tokens):
    state = feed(tiny_model, tiny_tokens, [tiny_tokens.numel()])
    theta0 = tiny_model.initial_fast_weights()
    assert state.steps > 0
    for name, w in state.fast.items():
        assert (w[0] - theta0[name]).abs().max() > 1e-4, name


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_streaming_equals_batched_sequence_path(variant):
    """The state (streaming) and run_sequence (the trainer's one-shot path) agree."""
    model = init_model(micro(variant), seed=0).requires_grad_(False)
    g = torch.Generator().manual_seed(2)
    toks = torch.randint(0, 256, (2, 33), generator=g)
    res = run_sequence(model, toks[:, :-1], toks[:, 1:])
    for row in range(2):
        nll = torch.as_tensor(score_tokens(model, toks[row], append_size=5))
        torch.testing.assert_close(nll, res.nll[row], atol=TOL, rtol=TOL)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_naive_reference(variant):
    """Per-position NLL equals a loop-and-recompute implementation of the spec (float64)."""
    cfg = micro(variant)
    model = init_model(cfg, seed=1)
    weights = {k: v.detach().double() for k, v in model.state_dict().items()}
    model = model.double().requires_grad_(False)
    g = torch.Generator().manual_seed(4)
    toks = torch.randint(0, 256, (27,), generator=g)
    toks[0] = toks[9] = 256  # a document start inside a mini-batch's targets
    expected = naive_nll(cfg, weights, toks, cfg.inner_lr)
    for append_size in (None, 3):
        got = torch.as_tensor(score_tokens(model, toks, append_size=append_size))
        torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)


def test_attention_kernels_agree():
    """math (double-backward) and sdpa (inference) kernels give the same numbers, GQA included."""
    cfg = micro("llama-style")
    model = init_model(cfg, seed=5).requires_grad_(False)
    toks = torch.randint(0, 256, (40,))
    a = StreamState.fresh(model, impl="math")
    b = StreamState.fresh(model, impl="sdpa")
    for piece in toks.split(7):
        a.append(piece)
        b.append(piece)
    assert_states_close(a, b, exact_carried=False)


@settings(max_examples=120, deadline=None)
@given(
    q_start=st.integers(min_value=0, max_value=300),
    m=st.integers(min_value=1, max_value=80),
    window=st.integers(min_value=1, max_value=64),
    sinks=st.integers(min_value=0, max_value=4),
    horizon=st.one_of(st.none(), st.integers(min_value=0, max_value=200)),
)
def test_single_query_slices_exactly_the_keys_the_mask_allows(q_start, m, window, sinks, horizon):
    """Decoding (one query) slices its keys instead of masking them: the columns it keeps are
    exactly those window_mask allows (every cache layout key_positions describes: contiguous,
    from 0, sinks then recent, sinks next to or inside the window), and the result is the
    masked math kernel's, with the sinks seen from a horizon or not."""
    from model.attention import attend, decode_columns, window_mask

    m = min(m, q_start + 1)
    lead, cut = decode_columns(q_start, m, window, sinks)
    kept = torch.zeros(m, dtype=torch.bool)
    kept[:lead] = kept[cut:] = True
    assert torch.equal(window_mask(q_start, 1, m, window, torch.device("cpu"), sinks)[0], kept)
    g = torch.Generator().manual_seed(q_start * 1000 + m)
    q, k, v = (
        torch.randn(1, 4, 1, 8, generator=g),
        torch.randn(1, 2, m, 8, generator=g),
        torch.randn(1, 2, m, 8, generator=g),
    )
    rope = None if horizon is None else (horizon, 10000.0, None)
    torch.testing.assert_close(
        attend(q, k, v, q_start, window, "sdpa", sinks, rope), attend(q, k, v, q_start, window, "math", sinks, rope)
    )


def test_a_zero_static_mlp_is_skipped_without_changing_a_bit():
    """A frozen all-zero static MLP (what a conversion leaves in fast blocks) is skipped, and the
    state and logits are bit-identical to computing it; writing into it, or training it, turns
    the skip off."""
    cfg = micro("ttt-e2e")
    model = init_model(cfg, seed=3).requires_grad_(False)
    with torch.no_grad():
        for i in model.suffix_layers:
            for p in model.blocks[i].mlp.parameters():
                p.zero_()
    toks = torch.randint(0, cfg.vocab_size, (3 * cfg.mini_batch_size + 5,))
    assert [b.inert_mlp for b in model.blocks] == [i in model.suffix_layers for i in range(cfg.num_layers)]
    skipped = StreamState.fresh(model)
    skipped.append(toks)
    for i in model.suffix_layers:
        model.blocks[i].mlp.requires_grad_(True)  # trainable: computed, never skipped
    assert not any(b.inert_mlp for b in model.blocks)
    computed = StreamState.fresh(model)
    computed.append(toks)
    a, b = skipped.tensors(), computed.tensors()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(skipped.logits(), computed.logits())
    model.requires_grad_(False)
    first = model.blocks[model.cfg.first_fast_layer]
    assert first.inert_mlp
    with torch.no_grad():
        first.mlp.w2.weight[0, 0] = 1.0
    assert not first.inert_mlp


def test_clone_is_independent(tiny_model, tiny_tokens):
    a = feed(tiny_model, tiny_tokens[:60], [60])
    before = {k: v.clone() for k, v in a.tensors().items()}
    b = a.clone()
    b.append(tiny_tokens[60:])
    after = a.tensors()
    assert a.position == 60 and b.position == tiny_tokens.numel()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert_states_close(b, feed(tiny_model, tiny_tokens, [60, 90]), tol=0)


@pytest.mark.parametrize("variant", ["sinks", "far-sinks", "llama-style", "full-attention"])
def test_variants_chunking_equals_one_shot(variant):
    model = init_model(micro(variant), seed=6).requires_grad_(False)
    toks = torch.randint(0, 256, (61,), generator=torch.Generator().manual_seed(8))
    one_shot = feed(model, toks, [toks.numel()])
    for sizes in ([1] * toks.numel(), [3] * 30, [7, 1, 13, 2]):
        assert_states_close(feed(model, toks, sizes), one_shot)
