"""A session's streaming state: fast weights, rolling caches, pending tokens.

`StreamState.append(tokens)` reads tokens in pieces of any size and gives the same
fast weights, caches and logits as one call over the whole sequence (spec:
model.md, "Streaming equals one shot").  How it stays exact:

- Mini-batch s (positions [s*b, (s+1)*b)) is stepped once its last target, the
  token at (s+1)*b, has arrived.  The step runs the whole network on exactly
  those b tokens against the caches of the mini-batches before it
  (`inner.minibatch_step`, the trainer's own code path): prefix once, test-time
  gradient through the suffix, caches extended with the keys/values of that
  forward, kept as they were computed.  So everything a step carries forward
  (theta, caches) is computed on the same shapes however the tokens arrived, and
  is bit-for-bit independent of the chunking.
- Tokens still waiting for their mini-batch run through the network with the
  current theta as they arrive (`live_kv`, `pending_out`), so they are visible
  to attention and the next-token logits are known.  This provisional work is
  thrown away at the next step, so its rounding never accumulates.

What a state *is* (`tensors()`, what a snapshot stores) is theta, the stepped
caches, the pending token ids and the counters.  The provisional activations are
a cache of it: they depend on how the pending tokens were cut into calls (and on
a batched decode's batch), within float rounding, and are recomputed from the
pending tokens when a snapshot is loaded.  So the persisted state is bit-exact
with a replay of the token log however the tokens were cut or batched.

Nothing a state can see is ever written in place, so `clone()` shares every
tensor: a fork costs nothing until one side appends.  The same rule lets every
state that has taken no step share one theta: the model's initial fast weights
(`initial_theta`), so a new or short session holds no copy of them, `nbytes()`
counts only what the state owns, and a snapshot of it stores no theta at all.  The one buffer written in
place, the growing key/value cache of the pending tokens (`cache.LiveKV`), is
written only past every sharer's length, so a decoded token writes one slot per
layer instead of copying the window.

A *frozen* copy (`frozen_copy()`, issue 19) reads tokens as provisional context only:
forward under the current theta, never a test-time step.  It is what a generation reads
recalled context into: context that is not part of the session's token log must never
move the fast weights.  Its invariants differ from a stream's in one way: its pending
tokens may exceed a mini-batch (nothing ever steps them), so its growing caches get
room as it reads (`live_past`), and sliding-window attention (`attention.window_mask`,
exact for any query start; a decoded token slices its keys instead, `attention.decode_columns`)
keeps each query to its last `window` keys and the sinks.  Everything else
holds as above: it shares the source's tensors and writes only slots no sharer can see,
so the source is bit-identical after the copy reads.  A frozen state is the state of no
token log: it is never stepped, snapshotted (`snapshot.state_to_bytes` refuses it) or
committed; its `clone()` (a generation's sample) is frozen too.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from model.attention import AttnImpl, default_impl
from model.cache import KV, LiveKV, cache_spec, extend_all
from model.inner import minibatch_step
from model.network import TTTModel, upcast


class InputError(ValueError):
    """Tokens the model cannot read; the message says which and why."""


def validate_tokens(tokens: Sequence[int] | torch.Tensor, vocab_size: int) -> torch.Tensor:
    """A 1-D int64 tensor of ids in [0, vocab_size), or an InputError naming the problem."""
    t = torch.as_tensor(tokens)
    if t.dim() != 1:
        raise InputError(f"tokens must be a 1-D sequence of ids, got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise InputError("tokens are empty: append at least one token")
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.dtype.is_complex:
        raise InputError(f"tokens must be integers, got {t.dtype}")
    t = t.to(torch.int64)
    bad = (t < 0) | (t >= vocab_size)
    if bad.any():
        i = int(bad.nonzero()[0])
        raise InputError(f"token id {int(t[i])} at index {i} is outside the vocabulary [0, {vocab_size})")
    return t


_INITIAL: weakref.WeakKeyDictionary[TTTModel, tuple[tuple, dict[str, torch.Tensor]]] = weakref.WeakKeyDictionary()
_INITIAL_LOCK = threading.Lock()


def full_state_bytes(model: TTTModel) -> int:
    """Bytes a session's state grows to once it has stepped and filled its window: its own theta
    (every fast layer's weights, no longer shared after the first step), the window's key/value
    cache with room for a mini-batch (attention sinks included), and the pending tokens'
    activations; float32, the compute dtype.  A full-attention model has no bound: its window is
    counted as 4,096 tokens.  What a memory budget should plan a session at (memoryd)."""
    return state_bytes_bound(model, None)


def state_bytes_bound(model: TTTModel, position: int | None, frozen: int = 0) -> int:
    """At most the bytes a state that has read `position` tokens owns (None: any position,
    `full_state_bytes`): its theta, the key/value slots of min(position + a mini-batch, the
    window's slots) tokens, and a mini-batch of activations.  A copy made by `clone` shares its
    source's tensors and owns only what it makes new, so this also bounds a working copy that
    has read up to `position` tokens (memoryd charges a call's copy by it).

    `frozen` > 0: instead, a `frozen_copy` of a state at `position` that reads `frozen` tokens.
    It shares theta (it never steps) but keeps every token it reads, past the window too: its
    buffer holds the stepped window, the pending mini-batch and all `frozen` tokens, with room
    for a mini-batch more (`live_past` grows it a mini-batch at a time), and their activations,
    so its bound grows with `frozen` and is not capped by a full state's."""
    cfg = model.cfg
    slot = cfg.num_layers * 2 * cfg.kv_heads * cfg.head_dim * 4
    activation = cfg.hidden_size * 4
    window_slots = (cfg.window_size or 4096) + getattr(cfg, "attention_sinks", 0) + cfg.mini_batch_size
    slots = window_slots if position is None else min(window_slots, position + cfg.mini_batch_size)
    if frozen > 0:
        return (slots + frozen + cfg.mini_batch_size) * slot + (cfg.mini_batch_size + frozen) * activation
    return theta_bytes(model) + slots * slot + cfg.mini_batch_size * activation


def counts_at(position: int, mini_batch_size: int) -> tuple[int, int]:
    """(test-time steps, pending tokens) of any state that has read `position` tokens: a
    mini-batch is stepped once its target arrives, so the last b tokens (or fewer) wait."""
    steps = max(0, (position - 1) // mini_batch_size)
    return steps, position - steps * mini_batch_size


def fork_bytes_bound(model: TTTModel, position: int, tokens: int) -> int:
    """At most the bytes a fork (`StreamState.clone`) of a state at `position` owns once it has read
    `tokens` more: `model.state.state_bytes_bound` at position + tokens, less the fast weights when
    none of those tokens takes a test-time step.  A fork shares its source's theta (and a state that
    has taken no step, the model's theta_0) until a step of its own makes new ones, so reading tokens
    that complete no mini-batch makes only keys, values and activations (a 32-token dry-run generation
    of the default model at 200 tokens: 13.8 MB, not 88.1).  With position 0 it bounds any state that has
    read `tokens` tokens, one built from a snapshot too: it owns theta only once it has stepped."""
    b = model.cfg.mini_batch_size
    bound = state_bytes_bound(model, position + tokens)
    if counts_at(position + tokens, b)[0] > counts_at(position, b)[0]:
        return bound
    return bound - theta_bytes(model)


def theta_bytes(model: TTTModel) -> int:
    """Bytes of one state's own fast weights, in float32 (the compute dtype, `upcast`), as a state
    holds them once it has stepped."""
    return sum(t.numel() * 4 for t in model.initial_fast_weights().values())


def initial_theta(model: TTTModel) -> dict[str, torch.Tensor]:
    """theta_0 as every state that has taken no step holds it: each [1, out, in], in the
    compute dtype (`upcast`), one set of tensors per model shared by all those states.

    In float32 these are views of the model's own parameters (no copy at all); a bf16/fp16
    model's fp32 copy is made once here instead of once per session.  Never written in
    place: a step replaces theta (`minibatch_step` returns new tensors).  Rebuilt when a
    parameter changes (its in-place version counter moves: an optimizer step, an adapter
    load), so a trainer evaluating between steps never gets stale weights.
    """
    params = model.initial_fast_weights()
    key = tuple((p._version, p.data_ptr(), p.dtype, p.device) for p in params.values())
    with _INITIAL_LOCK:
        cached = _INITIAL.get(model)
        if cached is None or cached[0] != key:
            cached = (key, {k: upcast(v.detach()).unsqueeze(0) for k, v in params.items()})
            _INITIAL[model] = cached
        return dict(cached[1])


@dataclass
class AppendReport:
    """What one append did: the steps it took and the NLL they measured."""

    steps: int = 0
    nll: list[torch.Tensor] = field(default_factory=list)
    """Per stepped mini-batch, the [b] NLL of its positions under the pre-step weights."""
    losses: list[float] = field(default_factory=list)


@dataclass
class StreamState:
    model: TTTModel
    fast: dict[str, torch.Tensor]
    """Current theta, each [1, out, in]."""
    kv: list[KV | None]
    """Per layer: keys/values of the stepped positions (< steps * b), the last window - 1."""
    pending_tokens: torch.Tensor
    """[p] ids at positions [steps * b, position)."""
    live_kv: list[LiveKV | None]
    """Per layer: `kv` followed by the keys/values of the first q pending tokens under the
    current theta (None while q = 0), in a buffer with room for the whole mini-batch: what
    the next token attends over, grown in place (one slot per decoded token)."""
    pending_out: torch.Tensor
    """[1, q, d] final hidden states of the first q pending tokens under the current theta."""
    position: int = 0
    steps: int = 0
    inner_lr: float = 1.0
    impl: AttnImpl = "sdpa"
    frozen: bool = False
    """Reads tokens as provisional context only, never stepping (`frozen_copy`)."""

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def fresh(cls, model: TTTModel, inner_lr: float | None = None, impl: AttnImpl | None = None) -> StreamState:
        cfg = model.cfg
        device = model.embed.weight.device
        dtype = model.embed.weight.dtype
        return cls(
            model=model,
            fast=initial_theta(model),
            kv=[None] * cfg.num_layers,
            pending_tokens=torch.zeros(0, dtype=torch.int64, device=device),
            live_kv=[None] * cfg.num_layers,
            pending_out=torch.zeros(1, 0, cfg.hidden_size, dtype=dtype, device=device),
            inner_lr=cfg.inner_lr if inner_lr is None else inner_lr,
            impl=impl or default_impl(device),
        )

    def clone(self) -> StreamState:
        """An independent copy that shares tensors (they are never written in place)."""
        return replace(self, fast=dict(self.fast), kv=list(self.kv), live_kv=list(self.live_kv))

    def frozen_copy(self) -> StreamState:
        """An O(1) copy that reads every later token forward only, under this state's theta: no
        test-time step however many tokens it reads (see the module docstring).  Its logits are
        those of one forward over its pending tokens with theta fixed, the stepped caches as
        they are, and the sliding window; this state is untouched."""
        out = self.clone()
        out.frozen = True
        return out

    # -- reading tokens ----------------------------------------------------------------------

    @torch.no_grad()
    def append(self, tokens: Sequence[int] | torch.Tensor) -> AppendReport:
        """Read tokens; take a test-time step for every mini-batch whose targets are known
        (a frozen state takes none: every token stays pending, provisional).

        Validates everything before changing anything: on InputError the state is untouched.
        """
        ids = validate_tokens(tokens, self.model.cfg.vocab_size).to(self.pending_tokens.device)
        report = AppendReport()
        self.take_pending(ids)
        while not self.frozen and self.pending_tokens.numel() > self.model.cfg.mini_batch_size:
            self._step(report)
        self.refresh_pending()
        return report

    def _step(self, report: AppendReport) -> None:
        """Step the first pending mini-batch (its targets are the next b tokens)."""
        cfg = self.model.cfg
        b = cfg.mini_batch_size
        tokens, targets = self.pending_tokens[:b][None], self.pending_tokens[1 : b + 1][None]
        res = minibatch_step(
            self.model,
            self.fast,
            tokens,
            targets,
            targets != cfg.bos_token_id,
            self.kv,
            self.steps * b,
            self.inner_lr,
            cfg.inner_clip,
            self.impl,
        )
        self.fast = res.fast
        self.kv = extend_all(self.kv, res.kv, cache_spec(cfg))
        report.nll.append(res.nll[0])
        report.losses.append(float(res.loss[0]))
        report.steps += 1
        self.steps += 1
        self.pending_tokens = self.pending_tokens[b:]
        self.live_kv = [None] * cfg.num_layers
        self.pending_out = self.pending_out[:, :0]

    def refresh_pending(self) -> None:
        """Run the network (current theta) on the pending tokens it has not seen yet."""
        done = self.pending_out.shape[1]
        todo = self.pending_tokens[done:]
        if todo.numel() == 0:
            return
        model = self.model
        h = model.embed_tokens(todo[None])
        start = self.position - todo.numel()
        past = self.live_past(todo.numel())
        h, live = model.run_blocks(h, range(model.cfg.num_layers), past, start, self.fast, self.impl)
        self.record_provisional(h, live)

    def take_pending(self, ids: torch.Tensor) -> None:
        """Queue validated ids [n] as pending (no compute; `append` steps and refreshes after)."""
        self.pending_tokens = torch.cat((self.pending_tokens, ids))
        self.position += ids.numel()

    def record_provisional(self, h: torch.Tensor, live: list[LiveKV]) -> None:
        """Keep the provisional work of the newest pending tokens: their final hidden states
        h [1, n, d] and every layer's growing cache after them (computed here or in a batch)."""
        self.live_kv = list(live)
        self.pending_out = torch.cat((self.pending_out, h), 1)

    def live_past(self, n: int = 1) -> list[LiveKV]:
        """Per layer, the growing cache the next `n` pending tokens attend over (started from
        `kv` with room for a whole mini-batch after a step).

        Starting one copies the stepped cache into the buffer's prefix; `kv` then becomes a
        view of that prefix (the same values; slots are only ever written past it), so a
        session holds its window once, not twice.  A stream's pending tokens never outgrow
        that room (it steps first); a frozen state's do, so it moves to a buffer with room
        for the `n` tokens and a mini-batch more (one copy of its keys per mini-batch read,
        not one per token, as `LiveKV.extend` would make at a full buffer).
        """
        cfg = self.model.cfg
        b = cfg.mini_batch_size
        empty = self.pending_out.new_zeros(1, cfg.kv_heads, 0, cfg.head_dim)
        out = []
        for i, (live, c) in enumerate(zip(self.live_kv, self.kv, strict=True)):
            if live is None:
                live = LiveKV.start(c, empty, max(b, n) if self.frozen else b)
                if c is not None and not self.frozen:
                    self.kv[i] = live.keys()
            elif self.frozen and live.length + n > live.buf.capacity:
                live = LiveKV.start(live.keys(), empty, n + b)
            out.append(live)
        return out

    @property
    def refreshed(self) -> bool:
        """Every pending token has its provisional activations (true after any append)."""
        return self.pending_out.shape[1] == self.pending_tokens.numel()

    # -- reading predictions -----------------------------------------------------------------

    @torch.no_grad()
    def logits(self) -> torch.Tensor:
        """Next-token logits [V] (float32) after the last token read."""
        if self.position == 0:
            raise InputError("the session is empty: append at least one token before asking for logits")
        return self.model.head(self.pending_out[:, -1])[0]

    @torch.no_grad()
    def pending_logits(self) -> torch.Tensor:
        """Logits [p, V] of every pending position, under the current fast weights."""
        return self.model.head(self.pending_out)[0]

    @property
    def pending_count(self) -> int:
        return int(self.pending_tokens.numel())

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every tensor that defines the state, by a stable name (what a snapshot stores).

        The provisional activations of pending tokens are not among them: they are a
        cache, recomputed from `pending.tokens` (see the module docstring).
        """
        out = {f"fast.{k}": v[0] for k, v in self.fast.items()}
        for i, c in enumerate(self.kv):
            if c is not None:
                out[f"kv.{i}.k"], out[f"kv.{i}.v"] = c[0][0], c[1][0]
        out["pending.tokens"] = self.pending_tokens
        return out

    def theta_is_initial(self) -> bool:
        """Whether theta is the model's shared theta_0 (`initial_theta`): true until the first
        step (a step always makes new tensors), so a snapshot need not store it."""
        init = initial_theta(self.model)
        return self.fast.keys() == init.keys() and all(self.fast[k] is init[k] for k in init)

    def nbytes(self) -> int:
        """Device bytes the state owns: its tensors and the provisional caches, each storage
        counted once (the stepped cache lives inside the growing buffer), less the model's
        initial theta, which every unstepped state shares with the model (`initial_theta`)."""
        shared = {t.untyped_storage().data_ptr() for t in initial_theta(self.model).values()}
        tensors = [*self.tensors().values(), self.pending_out]
        tensors += [t for live in self.live_kv if live is not None for t in (live.buf.k, live.buf.v)]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        return sum(n for ptr, n in storages.items() if ptr not in shared)
