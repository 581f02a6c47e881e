"""Batched decode (model/batch.py) against solo decode, and the growing cache against forks.

Batched decode may differ from solo decode in the last bits of provisional activations
(matrix products over N rows round differently); what defines a state must not differ at
all, and logits must agree within 1e-5 in fp32.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from model_configs import micro

from model import InputError, StreamState, init_model, packed
from model.batch import decode, decode_bytes, logits_of, runs_solo, steps_on_append
from model.network import PAD_FROM, ROW_TILE, tile_rows
from model.pool import MIN_ROWS, DecodePool
from model.snapshot import state_from_bytes, state_to_bytes
from model.state import counts_at

TOL = 1e-5


@pytest.fixture(scope="module", params=["ttt-e2e", "sinks", "far-sinks", "llama-style", "full-attention"])
def model(request):
    return init_model(micro(request.param), seed=11).requires_grad_(False)


def fed(model, tokens: list[int], sizes: list[int]) -> StreamState:
    s = StreamState.fresh(model)
    i = 0
    for n in sizes:
        if i < len(tokens):
            s.append(tokens[i : i + n])
            i += n
    if i < len(tokens):
        s.append(tokens[i:])
    return s


def assert_same_state(a: StreamState, b: StreamState) -> None:
    assert (a.position, a.steps, a.pending_count) == (b.position, b.steps, b.pending_count)
    ta, tb = a.tensors(), b.tensors()
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), f"{k} differs by {(ta[k] - tb[k]).abs().max()}"


sessions = st.lists(
    st.tuples(
        st.lists(st.integers(0, 255), min_size=1, max_size=40),  # context
        st.lists(st.integers(1, 9), min_size=1, max_size=5),  # how it was cut into appends
        st.lists(st.integers(0, 255), min_size=1, max_size=10),  # tokens then decoded one at a time
    ),
    min_size=1,
    max_size=14,  # past PAD_FROM: the padded products of `tile_rows` are checked too
)


def column_bytes(cfg) -> int:
    """Bytes of one column of a decode pool (every layer's key and value of one position), float32."""
    return 2 * cfg.num_layers * cfg.kv_heads * cfg.head_dim * 4


@pytest.mark.parametrize("pooled", ["off", "on", "tight"], ids=["per-row", "pooled", "pool-for-3"])
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sessions)
def test_batched_decode_equals_solo(model, pooled, spec):
    """N sessions at different positions, cut differently, decoding in lockstep batches; pooled:
    attention over one pool kept across the ticks, as the decode lane keeps it (rows leave as their
    tokens run out, rows that step solo come back with new caches, rows pass the sink horizon);
    tight: a pool with room for 3 rows of 64 columns, so most ticks mix pooled and per-row rows."""
    batch = [fed(model, ctx, cuts) for ctx, cuts, _ in spec]
    solo = [fed(model, ctx, cuts) for ctx, cuts, _ in spec]
    pool = {"off": None, "on": DecodePool(model.cfg), "tight": DecodePool(model.cfg, 3 * 64 * column_bytes(model.cfg))}[
        pooled
    ]
    for t in range(max(len(d) for _, _, d in spec)):
        live = [i for i, (_, _, d) in enumerate(spec) if t < len(d)]
        logits = decode([batch[i] for i in live], [spec[i][2][t] for i in live], pool)
        for row, i in enumerate(live):
            solo[i].append([spec[i][2][t]])
            torch.testing.assert_close(logits[row], solo[i].logits(), atol=TOL, rtol=TOL)
    for a, b in zip(batch, solo, strict=True):
        assert_same_state(a, b)
        assert counts_at(a.position, model.cfg.mini_batch_size) == (a.steps, a.pending_count)
        # and a snapshot of the batched state is the solo state's snapshot, byte for byte
        assert state_to_bytes(a) == state_to_bytes(b)


def test_pool_holds_the_rows_it_batches_and_lets_go():
    """The pool fills on a tick of 2 or more rows and is released on a tick of fewer; a row longer than it
    takes (a frozen copy keeps every token it reads) attends per row, with the same logits; rows it has no
    room for attend per row in the same forward."""
    model = init_model(micro("far-sinks"), seed=11).requires_grad_(False)
    pool = DecodePool(model.cfg)
    a, b = fed(model, [5], [1]), fed(model, list(range(30)), [7])  # neither steps in the next two tokens
    decode([a, b], [1, 2], pool)
    assert pool.nbytes() > 0
    decode([a], [3], pool)
    assert pool.nbytes() == 0, f"a tick of fewer than {MIN_ROWS} rows releases the pool"
    long = fed(model, [4], [1]).frozen_copy()
    long.append(list(range(200)) * (pool.max_keys // 200 + 1))
    ref = long.clone()
    logits = decode([long, b], [9, 8], pool)
    assert pool.nbytes() == 0, "a row past max_keys runs per row"
    ref.append([9])
    torch.testing.assert_close(logits[0], ref.logits(), atol=TOL, rtol=TOL)
    small = DecodePool(model.cfg, max_bytes=1024)
    decode([a, b], [4, 5], small)
    assert small.nbytes() == 0, "a tick that would pass max_bytes runs per row"
    # caches of 2, 15 and 14 keys, none stepping on the next token: each row takes 2 sink columns, its
    # keys and the new one, rounded up with room for a mini-batch (4) to 24 columns; room for two rows
    two = DecodePool(model.cfg, max_bytes=2 * 24 * column_bytes(model.cfg))
    rows = [fed(model, [5, 6], [2]), fed(model, list(range(30)), [7]), fed(model, list(range(41)), [9])]
    refs = [r.clone() for r in rows]
    logits = decode(rows, [6, 7, 8], two)
    assert 0 < two.nbytes() <= two.max_bytes, "two rows pooled, the third per row"
    assert len(two._rows) == 2
    for row, (ref, t) in enumerate(zip(refs, [6, 7, 8], strict=True)):
        ref.append([t])
        torch.testing.assert_close(logits[row], ref.logits(), atol=TOL, rtol=TOL)


def test_decode_steps_solo_at_mini_batch_boundary(model):
    b = model.cfg.mini_batch_size
    s = fed(model, list(range(1, b + 1)), [b])  # b pending: the next token completes the mini-batch
    assert steps_on_append(s)
    other = fed(model, [7, 8, 9], [3])
    ref = fed(model, list(range(1, b + 1)), [b])
    decode([s, other], [5, 6])
    ref.append([5])
    assert s.steps == 1
    assert_same_state(s, ref)


def test_fork_shares_the_growing_cache_without_seeing_the_other_side(model):
    """Decoding on a fork writes into the shared buffer past the original's length only."""
    base = fed(model, [3, 1, 4, 1, 5], [5])
    base_logits = base.logits().clone()
    fork = base.clone()
    decode([fork], [9])
    decode([fork], [2])
    torch.testing.assert_close(base.logits(), base_logits, atol=0, rtol=0)
    # now the original appends too: it must copy, not overwrite the fork's slots
    decode([base], [6])
    ref_fork, ref_base = fed(model, [3, 1, 4, 1, 5, 9, 2], [5, 1, 1]), fed(model, [3, 1, 4, 1, 5, 6], [5, 1])
    torch.testing.assert_close(fork.logits(), ref_fork.logits(), atol=TOL, rtol=TOL)
    torch.testing.assert_close(base.logits(), ref_base.logits(), atol=TOL, rtol=TOL)
    for x in (fork, base):
        live = [c for c in x.live_kv if c is not None]
        assert live, "decode keeps a growing cache"
    # the fork and the original hold distinct buffers now
    assert all(a.buf is not b.buf for a, b in zip(fork.live_kv, base.live_kv, strict=True) if a is not None)


def test_decode_writes_one_slot_not_a_copy_of_the_window(model):
    s = fed(model, [1], [1])  # 1 pending of b = 4: two more tokens stay in the mini-batch
    decode([s], [4])
    bufs = [c.buf for c in s.live_kv]
    decode([s], [5])
    assert [c.buf for c in s.live_kv] == bufs, "a decoded token reuses the buffer"
    assert all(c.length == c.buf.used for c in s.live_kv)


def test_snapshot_recomputes_provisional_activations(model):
    s = fed(model, list(range(1, 12)), [2, 5, 4])
    back = state_from_bytes(model, state_to_bytes(s))
    assert_same_state(back, s)
    torch.testing.assert_close(back.logits(), s.logits(), atol=TOL, rtol=TOL)
    torch.testing.assert_close(logits_of([back, s])[0], s.logits(), atol=TOL, rtol=TOL)


def test_decode_refuses_bad_input_and_changes_nothing(model):
    a, b = fed(model, [1, 2], [2]), fed(model, [3], [1])
    before = [dict(a.tensors()), dict(b.tensors())]
    with pytest.raises(InputError, match="outside the vocabulary"):
        decode([a, b], [5, model.cfg.vocab_size])
    with pytest.raises(ValueError, match="same state twice"):
        decode([a, a], [5, 6])
    for s, t in zip((a, b), before, strict=True):
        assert s.position in (1, 2)
        assert all(torch.equal(s.tensors()[k], v) for k, v in t.items())
    with pytest.raises(InputError, match="empty"):
        logits_of([StreamState.fresh(model)])


@pytest.mark.parametrize("context", [0, 5, 63, 64, 200])
def test_decode_bytes_counts_what_a_decode_reads(model, context):
    """decode_bytes, the bench's bandwidth ceiling, agrees with a real state: the shared bytes are
    the static weights (the tied head included), a session's are its fast weights plus the keys
    and values its next token attends over."""
    cfg = model.cfg
    s = StreamState.fresh(model)
    s.append(torch.randint(3, cfg.vocab_size, (context + 1,)).tolist())
    need = decode_bytes(model, context)
    static = sum(p.nbytes for p in model.static_parameters().values())
    assert need.shared == static - (0 if cfg.tie_embeddings else model.embed.weight.nbytes)
    kv = sum(2 * live.length * cfg.kv_heads * cfg.head_dim * 4 for live in s.live_past())
    assert need.per_session == sum(t.nbytes for t in s.fast.values()) + kv
    assert need.ceiling(1) == pytest.approx(1.0)
    assert 1 < need.ceiling(16) < 16


def test_decode_bytes_leaves_out_a_skipped_mlp():
    model = init_model(micro("ttt-e2e"), seed=2).requires_grad_(False)
    before = decode_bytes(model, 10).shared
    with torch.no_grad():
        for p in model.blocks[model.cfg.first_fast_layer].mlp.parameters():
            p.zero_()
    mlp = sum(p.nbytes for p in model.blocks[model.cfg.first_fast_layer].mlp.parameters())
    assert decode_bytes(model, 10).shared == before - mlp


def test_tile_rows_pads_only_where_the_unpadded_product_is_slower():
    """9-15 rows go through fn as 16 (zeros after them) and come back as theirs; others untouched."""
    w = torch.randn(24, 7, generator=torch.Generator().manual_seed(0))
    seen: list[int] = []

    def fn(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.shape[0])
        return x @ w.t()

    for rows in range(1, 2 * ROW_TILE + 1):
        x = torch.randn(rows, 1, 7)
        seen.clear()
        y = tile_rows(fn, x)
        assert y.shape == (rows, 1, 24)
        torch.testing.assert_close(y, x @ w.t(), atol=1e-5, rtol=1e-5)
        assert seen == [ROW_TILE if PAD_FROM <= rows < ROW_TILE else rows]


def test_batched_decode_of_a_padded_batch_equals_solo(model):
    """12 sessions: the static MLP and the head run on 16 padded rows; each row is still its own."""
    g = torch.Generator().manual_seed(3)
    ctx = [torch.randint(0, 256, (int(n),), generator=g).tolist() for n in torch.randint(1, 30, (12,), generator=g)]
    batch = [fed(model, c, [5]) for c in ctx]
    solo = [fed(model, c, [5]) for c in ctx]
    for _ in range(3):
        tokens = torch.randint(0, 256, (12,), generator=g).tolist()
        logits = decode(batch, tokens)
        assert logits.shape == (12, model.cfg.vocab_size)
        for row, (s, t) in enumerate(zip(solo, tokens, strict=True)):
            s.append([t])
            torch.testing.assert_close(logits[row], s.logits(), atol=TOL, rtol=TOL)
    for a, b in zip(batch, solo, strict=True):
        assert_same_state(a, b)


def test_batched_rows_multiply_through_packed_copies_that_follow_their_weights(monkeypatch):
    """Batched decode multiplies its rows by packed copies of every static weight (the projections, the
    static MLP, the head) and by the fast weights on oneDNN (model/packed.py): logits as the plain
    product's at any row count, copies made once per weight, made again when a weight is written in
    place, none of a fast weight, and none with `packed_decode` off."""
    model = init_model(micro("ttt-e2e", num_layers=3, num_fast_layers=1), seed=5).requires_grad_(False)
    g = torch.Generator().manual_seed(8)
    ctx = [torch.randint(0, 256, (int(n),), generator=g).tolist() for n in torch.randint(1, 30, (13,), generator=g)]
    tokens = torch.randint(0, 256, (13,), generator=g).tolist()
    mlp = model.blocks[0].mlp

    def logits(on: bool) -> torch.Tensor:
        model.packed_decode = on
        try:
            return decode([fed(model, c, [5]) for c in ctx], tokens)
        finally:
            model.packed_decode = True

    plain = logits(False)
    assert id(mlp.w1.weight) not in packed._packed, "packed_decode off makes no copy"
    torch.testing.assert_close(logits(True), plain, atol=TOL, rtol=TOL)
    copy = packed._packed[id(mlp.w1.weight)][1]
    attn = model.blocks[0].attn
    static = [mlp.w2.weight, mlp.w3.weight, model.embed.weight] + [getattr(attn, p).weight for p in "qkvo"]
    assert {id(w) for w in static} <= packed._packed.keys()
    fast = model.blocks[-1].fast_mlp
    assert not {id(fast.w1.weight), id(fast.w2.weight), id(fast.w3.weight)} & packed._packed.keys()
    fast_products = []

    def fast_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        fast_products.append(w)
        return real_fast_linear(x, w)

    real_fast_linear = packed.fast_linear
    monkeypatch.setattr(packed, "fast_linear", fast_linear)  # counts the calls, runs the real product
    for rows in (1, 2, 13):  # any row count: none is padded
        sessions = [fed(model, c, [5]) for c in ctx[:rows]]
        model.packed_decode = False
        want = decode([s.clone() for s in sessions], tokens[:rows])
        assert not fast_products, "packed_decode off multiplies by the fast weights as a session's forward does"
        model.packed_decode = True
        batched = sum(not runs_solo(s, t) for s, t in zip(sessions, tokens, strict=False))  # a stepping row runs solo
        torch.testing.assert_close(decode(sessions, tokens[:rows]), want, atol=TOL, rtol=TOL)
        assert len(fast_products) == 3 * batched > 0, "each batched row's fast MLP: three products by its own weights"
        fast_products.clear()
    logits(True)
    assert packed._packed[id(mlp.w1.weight)][1] is copy, "a weight is packed once"
    with torch.no_grad():
        mlp.w1.weight.mul_(2.0)  # written in place: the copy is stale
    torch.testing.assert_close(logits(True), logits(False), atol=TOL, rtol=TOL)
    assert packed._packed[id(mlp.w1.weight)][1] is not copy
    assert not torch.allclose(logits(False), plain), "the test changed a weight that matters"
