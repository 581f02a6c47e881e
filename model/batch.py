"""Batched decode: one forward for one new token in each of N sessions.

Serving many sessions is bound by reading the weights: decoding one token of one
session reads every static weight once (about 540 MB for the default model), and
16 sessions decoded one at a time read them 16 times.  `decode` reads them once
for all N rows: the dense projections, MLPs and the head run on [N, 1, d], while
what belongs to a session runs per row on that session's own tensors (attention
over its own cache at its own position, its own fast MLP: the multi-adapter part,
as S-LoRA/Punica batch per-request adapters).  See `TTTModel.run_blocks`, ragged rows.

What is exact and what is not (measured, `bench/batch_invariance.py`): a matrix
product over N rows does not round like the same product over one row on these
CPU kernels (last-bit differences, about 1e-6 relative), so batched activations
differ from a session's solo ones in the last bits.  Therefore only provisional
work is batched: a decoded token that does *not* complete a mini-batch.  A token
that completes one triggers a test-time step, which runs solo
(`StreamState.append`), so theta and the stepped caches, everything a state is
made of (`StreamState.tensors`), are bit-identical to a solo replay of the token
log; the pending tokens' provisional activations, which a step throws away, are
the only thing a batch touches.  A frozen state (`StreamState.frozen_copy`: a generation's
copy holding recalled context) never steps, so its rows are always batched; its
activations are provisional by definition and persist nowhere.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from model.cache import cache_spec
from model.network import TTTModel, fast_weight_names
from model.pool import DecodePool
from model.state import InputError, StreamState, counts_at

NEVER = sys.maxsize
"""`tokens_to_step` of a frozen state (`StreamState.frozen_copy`): it never steps, so no count of
tokens brings a step (and a server may cut its reads anywhere)."""


def tokens_to_step(state: StreamState) -> int:
    """Tokens `state` must read before its next test-time step: mini-batch s is stepped when
    its target, the token after its last, arrives, i.e. when more than b tokens are pending
    (`NEVER` for a frozen state)."""
    if state.frozen:
        return NEVER
    return state.model.cfg.mini_batch_size - state.pending_count + 1


@dataclass(frozen=True)
class DecodeBytes:
    """Memory one decode forward reads per new token, split by who shares it.

    Decoding is bound by memory traffic, not arithmetic (one token is 2 FLOPs per weight
    read), so this is what batching can and cannot save: a forward over N rows reads the
    `shared` bytes once and every row's `per_session` bytes once each.
    """

    shared: int
    """Static weights, the output head included (the embedding table counts only when it is
    the tied head: a lookup reads one row of it)."""
    per_session: int
    """A session's own: its fast weights and the keys/values its token attends over."""

    def ceiling(self, n: int) -> float:
        """The speedup of n rows per forward over one row if every byte moves at one bandwidth
        and arithmetic is free: n (S + P) / (S + n P).  A bound for a bandwidth-bound machine;
        more sessions than S/P buy little (each brings its own P)."""
        s, p = self.shared, self.per_session
        return n * (s + p) / (s + n * p)


def decode_bytes(model: TTTModel, context: int) -> DecodeBytes:
    """`DecodeBytes` of decoding the token after `context` tokens with `model` (its own dtype):
    the parameters a forward reads (a static MLP the forward skips, `Block.inert_mlp`, is not
    read) and the keys/values the cache's own rule keeps for that position."""
    cfg = model.cfg
    fast = set(fast_weight_names(cfg))
    skipped = {f"blocks.{i}.mlp." for i, b in enumerate(model.blocks) if b.inert_mlp}
    if not cfg.tie_embeddings:
        skipped.add("embed.")  # a lookup reads one row; the untied head is read whole
    shared = sum(
        p.nbytes for k, p in model.named_parameters() if k not in fast and not any(k.startswith(x) for x in skipped)
    )
    own = sum(p.nbytes for k, p in model.named_parameters() if k in fast)
    steps, pending = counts_at(context + 1, cfg.mini_batch_size)  # the new token's own key included
    keys = cache_spec(cfg).length(steps * cfg.mini_batch_size) + pending
    element = model.embed.weight.element_size()
    return DecodeBytes(
        shared=shared, per_session=own + 2 * cfg.num_layers * cfg.kv_heads * cfg.head_dim * keys * element
    )


def steps_on_append(state: StreamState, n: int = 1) -> bool:
    """Whether appending n tokens makes `state` take a test-time step (then it runs solo)."""
    return n >= tokens_to_step(state)


def runs_solo(state: StreamState, token: int | None) -> bool:
    """Whether `decode` reads `token` into `state` on its own rather than in the batch: the token
    takes a test-time step, or the state's pending tokens lack their provisional activations
    (a state just loaded from a snapshot).  That is solo compute, a mini-batch's worth; a server
    can run it beside the batch (memoryd's engine gives it its own lane)."""
    return token is not None and (steps_on_append(state) or not state.refreshed)


@torch.no_grad()
def decode(states: Sequence[StreamState], tokens: Sequence[int | None], pool: DecodePool | None = None) -> torch.Tensor:
    """Append tokens[i] to states[i] (distinct states of one model; None: read nothing, as the
    first token after a prompt); return every state's next-token logits [N, V].

    Rows whose token completes a mini-batch step solo; the others (frozen states' always)
    run as one ragged batch, whose attention is one call per layer over `pool`'s copy of
    their caches when one is given (`model.pool`: the caller's, used from one thread).
    Validates every token before changing any state.
    """
    if len(states) != len(tokens) or not states:
        raise ValueError(f"decode needs one token per state, got {len(states)} states and {len(tokens)} tokens")
    if len({id(s) for s in states}) != len(states):
        raise ValueError("decode got the same state twice: one token per session per call")
    model = states[0].model
    vocab = model.cfg.vocab_size
    for i, t in enumerate(tokens):
        if t is not None and not 0 <= int(t) < vocab:
            raise InputError(f"token id {int(t)} (row {i}) is outside the vocabulary [0, {vocab})")
    rows = []
    for s, t in zip(states, tokens, strict=True):
        if s.model is not model:
            raise ValueError("decode batches states of one model only")
        if t is None:
            continue
        if runs_solo(s, t):
            s.append([int(t)])
        else:
            rows.append((s, int(t)))
    if rows:
        _forward_rows([s for s, _ in rows], [t for _, t in rows], pool)
    return logits_of(states)


def _forward_rows(states: list[StreamState], tokens: list[int], pool: DecodePool | None) -> None:
    """The provisional forward of one new token per state, batched (no state steps here)."""
    model = states[0].model
    device = states[0].pending_tokens.device
    pasts = [s.live_past() for s in states]
    plan = pool.tick(states, pasts) if pool is not None else None
    if plan is not None:  # the pooled rows first (model/pool.py)
        states, tokens = [states[r] for r in plan.order], [tokens[r] for r in plan.order]
        past_by_layer: list = plan.layers
    else:
        past_by_layer = [[p[j] for p in pasts] for j in range(model.cfg.num_layers)]
    ids = torch.tensor(tokens, dtype=torch.int64, device=device)
    h = model.embed_tokens(ids[:, None])
    h, kept = model.run_blocks(
        h,
        range(model.cfg.num_layers),
        past_by_layer,
        [s.position for s in states],
        [s.fast for s in states],
        states[0].impl,
    )
    own = [[layer[r] for layer in kept] for r in range(len(states))]
    for r, s in enumerate(states):
        s.take_pending(ids[r : r + 1])
        s.record_provisional(h[r : r + 1], own[r])
    if pool is not None and plan is not None:
        n_pool = plan.layers[0].pooled
        pool.keep(states[:n_pool], own[:n_pool])


@torch.no_grad()
def logits_of(states: Sequence[StreamState]) -> torch.Tensor:
    """Next-token logits [N, V] of each state's last token, through one batched head."""
    for s in states:
        if s.position == 0:
            raise InputError("the session is empty: append at least one token before asking for logits")
    model = states[0].model
    return model.rows_head(torch.cat([s.pending_out[:, -1] for s in states]))
