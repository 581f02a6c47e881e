"""One attention call per layer for every row of a batched decode: the rows' keys mirrored in one tensor.

Batched decode (`model.batch.decode`) reads the static weights once for all its rows, but attention
is each row's own: per row and layer, one SDPA call over that row's cache (16 rows x 30 layers: 480
calls a forward of the default model, about 30 microseconds each on a CPU core whatever the keys,
and on a GPU 480 kernel launches).  A `DecodePool` keeps a copy of the keys and values of the rows
the decode lane batches, tick after tick, in one [rows, Hkv, columns, hd] tensor per layer, so each
layer writes every row's new key with one indexed write and attends with one masked SDPA call.

**A cache, not an owner.**  Each state still appends its new keys to its own growing buffer
(`cache.LiveKV`, exactly as without a pool), so what a state is, what its forks see and what it
persists do not change, and no tensor of the pool is ever seen outside this module.  A row's copy
is valid while its state still holds the `LiveKV`s the last pooled tick returned to it (a buffer's
slots below a holder's length are never written again, model/cache.py); otherwise (a new sample,
a state that stepped, a frozen copy that moved to a larger buffer) its keys are copied in again:
one copy of its window (about 46 KB a token for the default model), once per mini-batch it decodes.
The pool belongs to one thread (the engine's decode lane) and is only ever used from it.

**What changes** is only provisional: the batched path's activations (model/batch.py), which already
differ from a solo forward's in the last bits.  One masked call over the same keys rounds differently
from a call per row on a view of them; the visible keys are exactly `attention.decode_columns`', and
the sinks seen from past the horizon are rotated as `attention.decode_attention` rotates them.

**Measured** (`bench/pooled_attention.py`, one core of this project's CPU, 16 rows of the default
model with packed products on, alternating with the pool off in one process): see docs/engine.md.

**What it costs** is memory: the keys and values of the rows it holds, a second time.  A column is
2 x layers x Hkv x hd x 4 bytes (46 KB for the default model), and the pool has as many columns as
its longest row's cache, plus room for a mini-batch: 16 rows at a full window (1,024 + 4 sinks + up
to a mini-batch of pending keys) about 0.8 GB.  It grows as its rows' caches grow and is released
when the decode lane batches fewer than `MIN_ROWS` rows.  It holds at most `max_bytes` (memoryd:
`--decode-pool-bytes`, 1 GiB): the rows it has no room for, and a row longer than `max_keys` (a
frozen copy keeps every token it reads, past the window too), attend per row in the same forward.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from model.attention import apply_rope, decode_columns, holds_sinks, rope_cos_sin
from model.cache import LiveKV
from model.config import ModelConfig

if TYPE_CHECKING:
    from model.state import StreamState

DEFAULT_MAX_BYTES = 1 << 30
"""What memoryd lets the pool hold unless told otherwise (`--decode-pool-bytes`; memoryd/settings.py keeps the
same figure, torch-free): 16 sessions of the default model at a full window take 0.8 GB of it."""
MIN_ROWS = 2
"""Fewer rows than this run per row (one row gains nothing from a pool), and the pool is released."""
FROZEN_ROOM = 1024
"""Keys a row may hold past a stream's most (window, sinks, a mini-batch pending) and still be pooled:
a generation's frozen copy keeps its recalled context (memoryd's default budget 512), its prompt and
its reply past the window."""


@dataclass
class TickPlan:
    """Where this tick's rows sit in the pool and what each row's query sees (shared by every layer)."""

    rows: torch.Tensor
    """[B] the pool row of each batch row."""
    cols: torch.Tensor
    """[B] the column each row's new key is written to."""
    direct: bool
    """The batch rows are pool rows 0..B-1 in order (else queries are scattered into the pool's rows)."""
    span: int
    """Pool rows the attention call covers."""
    width: int
    """Columns the attention call covers."""
    mask: torch.Tensor
    """[span, 1, 1, width] bool: the columns each pool row's query sees (a row not in the batch sees its
    first column only, so its softmax stays finite; its output is never read)."""
    far: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    """(pool rows, cos, sin [n, 1, 1, hd/2]) of the rows that see the sinks from past the horizon: their
    sink keys, rotated on by position - horizon, are written to the front columns each tick."""


@dataclass
class PooledPast:
    """One layer's caches for a pooled tick: each row's own growing cache (appended as without a pool)
    and the pool's copy of them, which this tick's attention reads."""

    rows: list[LiveKV]
    """Every row's own cache, the pooled rows first."""
    pooled: int
    """The first `pooled` rows attend over the pool (`attend`); the rest, which it had no room for, per row."""
    k: torch.Tensor
    v: torch.Tensor
    front: int
    """Columns before each row's cache (the rotated sinks)."""
    sinks: int
    plan: TickPlan

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Write each pooled row's new key and value [B, Hkv, 1, hd] into the pool; attend its q [B, H, 1, hd]
        over every pooled row's visible keys in one call; returns [B, H, 1, hd] (B: `pooled`)."""
        t, kp, vp = self.plan, self.k, self.v
        kp[t.rows, :, t.cols], vp[t.rows, :, t.cols] = k[:, :, 0], v[:, :, 0]
        if t.far is not None:
            rows, cos, sin = t.far
            at = slice(self.front, self.front + self.sinks)
            kp[rows, :, : self.sinks] = apply_rope(kp[rows, :, at], cos.to(kp.dtype), sin.to(kp.dtype))
            vp[rows, :, : self.sinks] = vp[rows, :, at]
        b, h, _, hd = q.shape
        kv = kp.shape[1]
        qg = q.reshape(b, kv, h // kv, hd)  # query heads grouped by their key head (GQA): the groups are rows
        if not t.direct:
            qg = q.new_zeros(t.span, kv, h // kv, hd).index_copy_(0, t.rows, qg)
        out = F.scaled_dot_product_attention(
            qg, kp[: t.span, :, : t.width], vp[: t.span, :, : t.width], attn_mask=t.mask, scale=hd**-0.5
        )
        if not t.direct:
            out = out[t.rows]
        return out.reshape(b, h, 1, hd)


@dataclass
class PooledTick:
    """What `DecodePool.tick` plans: the batch's rows in the order to run them (the pooled ones first)
    and each layer's caches."""

    order: list[int]
    layers: list[PooledPast]


@dataclass
class _Row:
    state: weakref.ref[StreamState]
    index: int
    kept: list[LiveKV]


class DecodePool:
    """The decode lane's mirror of its batched rows' keys (see the module docstring)."""

    def __init__(self, cfg: ModelConfig, max_bytes: int | None = None) -> None:
        self.cfg = cfg
        self.max_bytes = max_bytes
        """The most the pool may hold (None: no limit): the rows it has no room for attend per row."""
        self.front = cfg.attention_sinks if cfg.sink_horizon is not None else 0
        self.max_keys = (
            0 if cfg.window_size is None else cfg.window_size + cfg.attention_sinks + cfg.mini_batch_size + FROZEN_ROOM
        )
        """The longest row cache the pool takes (0: none, a full-attention model's caches are unbounded)."""
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self._rows: dict[int, _Row] = {}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    def release(self) -> None:
        self.k, self.v, self._rows = [], [], {}

    def tick(self, states: Sequence[StreamState], pasts: Sequence[Sequence[LiveKV]]) -> PooledTick | None:
        """The plan of one batched tick of `states` (whose caches are `pasts`, per row per layer, before this
        tick's token): which rows the pool takes (its rows first, then new ones, shortest first, while they fit
        `max_bytes` and `max_keys`) and each layer's `PooledPast`; None when fewer than `MIN_ROWS` fit (the
        tick runs per row, and the pool is released)."""
        lengths = [p[0].length for p in pasts]
        if len(states) < MIN_ROWS or not self.max_keys:
            self.release()
            return None
        held = {id(s): r for r, s in enumerate(states)}  # id -> batch row
        self._rows = {key: r for key, r in self._rows.items() if key in held and r.state() is not None}
        ranked = sorted(range(len(states)), key=lambda r: (id(states[r]) not in self._rows, lengths[r]))
        taken = {r.index for r in self._rows.values()}
        spare = (i for i in range(len(states) + len(taken)) if i not in taken)
        chosen: dict[int, int] = {}  # batch row -> pool row
        span = longest = 0
        like = pasts[0][0].buf.k
        for r in ranked:
            if lengths[r] + 1 > self.max_keys:
                continue
            row = self._rows.get(id(states[r]))
            at = row.index if row is not None else None
            if at is None:
                at = next(spare)
            if not self._fits(max(span, at + 1), self.front + max(longest, lengths[r]) + 1, like.element_size()):
                break
            chosen[r], span, longest = at, max(span, at + 1), max(longest, lengths[r])
        if len(chosen) < MIN_ROWS:
            self.release()
            return None
        self._rows = {key: row for key, row in self._rows.items() if held[key] in chosen}
        self._reserve(span, self.front + longest + 1, like)
        pooled = sorted(chosen, key=chosen.__getitem__)  # by pool row
        order = pooled + [r for r in range(len(states)) if r not in chosen]
        for r in pooled:
            s, p = states[r], pasts[r]
            row = self._rows.get(id(s))
            if row is None or row.state() is not s:
                row = self._rows[id(s)] = _Row(weakref.ref(s), chosen[r], [])
            if len(row.kept) != len(p) or any(a is not b for a, b in zip(row.kept, p, strict=True)):
                for j, live in enumerate(p):
                    k, v = live.keys()
                    cols = slice(self.front, self.front + live.length)
                    self.k[j][row.index, :, cols], self.v[j][row.index, :, cols] = k[0], v[0]
        plan = self._plan([states[r] for r in pooled], [lengths[r] for r in pooled], [chosen[r] for r in pooled], span)
        sinks = self.cfg.attention_sinks
        layers = [
            PooledPast([pasts[r][j] for r in order], len(pooled), self.k[j], self.v[j], self.front, sinks, plan)
            for j in range(len(self.k))
        ]
        return PooledTick(order, layers)

    def keep(self, states: Sequence[StreamState], kept: Sequence[Sequence[LiveKV]]) -> None:
        """Record the caches a pooled tick returned to each state: its row is valid while it still holds them."""
        for s, k in zip(states, kept, strict=True):
            self._rows[id(s)].kept = list(k)

    def _shape(self, rows: int, columns: int) -> tuple[int, int]:
        """The (rows, columns) the pool grows to for `rows` rows of `columns` columns: never smaller than it
        is, columns with room for a mini-batch more (whole multiples of it, at most a row's most)."""
        have_rows, have_cols = (self.k[0].shape[0], self.k[0].shape[2]) if self.k else (0, 0)
        if rows <= have_rows and columns <= have_cols:
            return have_rows, have_cols
        b = self.cfg.mini_batch_size
        return max(rows, have_rows), max(have_cols, min(-(-(columns + b) // b) * b, self.front + self.max_keys))

    def _fits(self, rows: int, columns: int, element: int) -> bool:
        """Whether the pool grown for `rows` rows of `columns` columns (`_shape`) of `element`-byte numbers
        stays within `max_bytes`."""
        cfg = self.cfg
        r, c = self._shape(rows, columns)
        column = 2 * cfg.num_layers * cfg.kv_heads * cfg.head_dim * element
        return self.max_bytes is None or r * c * column <= self.max_bytes

    def _reserve(self, rows: int, columns: int, like: torch.Tensor) -> None:
        """Room for `rows` rows of `columns` columns (`_shape`), the rows' copies kept."""
        have_rows, have_cols = (self.k[0].shape[0], self.k[0].shape[2]) if self.k else (0, 0)
        r, c = self._shape(rows, columns)
        if (r, c) == (have_rows, have_cols):
            return
        shape = (r, like.shape[1], c, like.shape[3])
        grown_k, grown_v = [], []
        for j in range(self.cfg.num_layers):
            k, v = like.new_zeros(shape), like.new_zeros(shape)
            if self.k:
                k[:have_rows, :, :have_cols], v[:have_rows, :, :have_cols] = self.k[j], self.v[j]
            grown_k.append(k)
            grown_v.append(v)
        self.k, self.v = grown_k, grown_v

    def _plan(self, states: Sequence[StreamState], lengths: list[int], index: list[int], span: int) -> TickPlan:
        cfg, front, sinks = self.cfg, self.front, self.cfg.attention_sinks
        horizon = cfg.sink_horizon
        width = front + max(lengths) + 1
        bounds = [(0, 1, 0, 0)] * span  # a row not in the batch: its first column only
        far: list[tuple[int, int]] = []
        for s, n, i in zip(states, lengths, index, strict=True):
            p, m = s.position, n + 1  # the new token's position; its keys, its own included
            lead, cut = decode_columns(p, m, cfg.window_size, sinks)
            if horizon is not None and holds_sinks(p, 1, m, sinks) and p > horizon:
                far.append((i, p - horizon))
                bounds[i] = (0, sinks, front + cut, front + m)
            else:
                bounds[i] = (front, front + lead, front + cut, front + m)
        device = self.k[0].device
        lo1, hi1, lo2, hi2 = (torch.tensor(c, device=device)[:, None] for c in zip(*bounds, strict=True))
        col = torch.arange(width, device=device)[None, :]
        mask = ((col >= lo1) & (col < hi1)) | ((col >= lo2) & (col < hi2))
        rows = torch.tensor(index, device=device)
        far_plan = None
        if far:
            ahead = torch.tensor([a for _, a in far], device=device)
            cos, sin = rope_cos_sin(ahead, cfg.head_dim, cfg.rope_theta, torch.float64, cfg.rope_scaling)
            shape = (len(far), 1, 1, -1)
            far_plan = (torch.tensor([i for i, _ in far], device=device), cos.view(shape), sin.view(shape))
        return TickPlan(
            rows=rows,
            cols=torch.tensor([front + n for n in lengths], device=device),
            direct=index == list(range(len(index))),
            span=span,
            width=width,
            mask=mask[:, None, None, :],
            far=far_plan,
        )
