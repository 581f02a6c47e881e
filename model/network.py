"""The TTT-E2E network: a sliding-window Transformer whose last blocks carry a fast MLP.

The module holds the *static* weights and the meta-learned initial fast weights
(theta_0).  The fast weights a forward pass uses are always passed in as a plain
dict of tensors (see `fast_weight_names`), so one loaded model serves any number
of sessions, each with its own fast weights, and the trainer can pass
non-leaf tensors that carry the inner loop's graph.

Parameter names are the checkpoint's (spec: model.md, "Checkpoint format").
All activations are [B, n, d]; fast weights are [B, out, in] (batched: every
sequence learns its own) or [out, in] (shared).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from model import packed
from model.attention import AttnImpl, apply_rope, attend, rope_cos_sin
from model.cache import LiveKV, combine
from model.config import ModelConfig
from model.pool import PooledPast

Start = int | Sequence[int]
"""Where a call's tokens start: one position for the whole batch, or one per row (ragged rows:
sessions at different positions, each with its own cache and fast weights, as batched decode runs)."""

Rope = tuple[torch.Tensor, torch.Tensor]
"""RoPE (cos, sin) tables [n, head_dim/2] (or [B, 1, n, head_dim/2] for ragged rows) of a call's
positions in float64, computed once for all layers; each layer casts them to its own dtype, exactly
as computing them there would."""

FAST_PARTS = ("w1", "w2", "w3")


def upcast(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16/fp16 compute their norms and logits in fp32; fp64 stays fp64)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = upcast(x)
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.to(xf.dtype)).to(x.dtype)


class SwiGLU(nn.Module):
    """W2(silu(W1 x) * W3 x), no biases."""

    def __init__(self, d: int, f: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(d, f, bias=False)
        self.w2 = nn.Linear(f, d, bias=False)
        self.w3 = nn.Linear(d, f, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


def _product(t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return t @ w.to(t.dtype).transpose(-1, -2)


def swiglu(
    x: torch.Tensor,
    w1: torch.Tensor,
    w2: torch.Tensor,
    w3: torch.Tensor,
    lin: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = _product,
) -> torch.Tensor:
    """SwiGLU with explicit (possibly batched [B, out, in]) weights.  `lin(t, w)` is t @ w.T: batched
    decode's provisional rows pass oneDNN's (`model.packed`), the same products in another kernel."""
    return lin(F.silu(lin(x, w1)) * lin(x, w3), w2)


ROW_TILE = 16
"""Rows a batched decode's large plain products are padded to (`tile_rows`): MKL's fast path from 16 rows on."""
PAD_FROM = 9
"""Fewest rows `tile_rows` pads: below it the unpadded product is the cheaper one."""


def tile_rows(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """fn(x) for a row-wise fn (each output row depends on its input row only), with x's rows
    padded with zeros to `ROW_TILE` on a CPU when there are `PAD_FROM` to 15 of them.

    Batched decode pads only where it runs the plain product (`packed_decode` off, or no oneDNN):
    oneDNN's products through packed copies (`model.packed`) are as fast at 2 to 15 rows.

    Why: MKL's fp32 product of M rows by a large weight takes its small-M path below 16 rows,
    which costs more every few rows, and its fast path from 16 on.  Measured on one core of this
    project's CPU (AVX-512), `F.linear` alone: [M, 576] x [576, 1536] costs 0.62 ms at M = 16 and
    0.97 ms at M = 15; the head ([M, 576] x [576, 49152]) 23 ms at 16 and 43 ms at 15, but 14 ms
    at M = 4, so fewer rows are not padded.  A whole 15-row decode forward of the default model
    (200 tokens of context, in-process, one thread) went from about 295 to 240 ms with the static
    MLP and the head padded, as fast as a 16-row one; 16 rows are unchanged.  A daemon serving n
    sessions runs (n-1)-row ticks whenever one of them steps on the compute lane, or joins late.
    The attention projections (576 wide) are not padded: at 576 x 576 the 16-row product is the
    slower one.

    Only batched decode uses it (`model.batch`): padding changes the last bits of the rows'
    results (another kernel), which that path allows, its activations being provisional; a
    session's solo forwards, and so every state a step persists, never go through it."""
    b = x.shape[0]
    if x.device.type != "cpu" or not PAD_FROM <= b < ROW_TILE:
        return fn(x)
    return fn(torch.cat([x, x.new_zeros(ROW_TILE - b, *x.shape[1:])]))[:b]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.cfg = cfg
        self._sink_rope = None if cfg.sink_horizon is None else (cfg.sink_horizon, cfg.rope_theta, cfg.rope_scaling)
        self.q = nn.Linear(d, cfg.num_heads * hd, bias=False)
        self.k = nn.Linear(d, cfg.kv_heads * hd, bias=False)
        self.v = nn.Linear(d, cfg.kv_heads * hd, bias=False)
        self.o = nn.Linear(cfg.num_heads * hd, d, bias=False)
        self.q_norm = RMSNorm(hd, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(hd, cfg.norm_eps) if cfg.qk_norm else None
        self.packed_decode = True
        """Batched decode multiplies its rows by the projections through packed copies (`model.packed`)."""

    def forward(self, x: torch.Tensor, past: Any, start: Start, rope: Rope, impl: AttnImpl) -> tuple[torch.Tensor, Any]:
        """x [B, n, d] at positions [start, start+n); past covers the keys just before.

        `rope` is the (cos, sin) table of those positions, shared by every layer.
        With ragged rows (`start` a sequence), row r starts at start[r] and `past` is
        a list of per-row caches: the projections run batched (one read of the weights
        for every row), attention runs per row over that row's own cache, or, when `past`
        is a `pool.PooledPast`, in one call over the pool's copy of every row's cache.

        Returns the output and what a caller keeps of the keys/values attended over
        (past then new; `cache.combine`): the concatenation attention needs anyway,
        or a growing buffer, so a caller keeping a growing cache never copies it again.
        """
        cfg = self.cfg
        b, n, _ = x.shape
        ragged = not isinstance(start, int)
        q = self._project(self.q, x, ragged).view(b, n, cfg.num_heads, cfg.head_dim).transpose(1, 2)
        k = self._project(self.k, x, ragged).view(b, n, cfg.kv_heads, cfg.head_dim).transpose(1, 2)
        v = self._project(self.v, x, ragged).view(b, n, cfg.kv_heads, cfg.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = (t.to(q.dtype) for t in rope)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if isinstance(start, int):
            keys, values, kept = combine(past, k, v)
            out = attend(q, keys, values, start, cfg.window_size, impl, cfg.attention_sinks, self._sink_rope)
        elif isinstance(past, PooledPast):  # one call for the pooled rows over the pool's copy (model/pool.py)
            n_pool = past.pooled
            kept = [p.extend(k[r : r + 1], v[r : r + 1]) for r, p in enumerate(past.rows[:n_pool])]
            out = past.attend(q[:n_pool], k[:n_pool], v[:n_pool])
            if n_pool < b:  # the rows the pool had no room for
                tail = slice(n_pool, b)
                rest, rest_kept = self._per_row(q[tail], k[tail], v[tail], past.rows[tail], start[tail], impl)
                out, kept = torch.cat((out, rest)), kept + rest_kept
        else:
            out, kept = self._per_row(q, k, v, past, start, impl)
        return self._project(self.o, out.transpose(1, 2).reshape(b, n, -1), ragged), kept

    def _project(self, layer: nn.Linear, x: torch.Tensor, ragged: bool) -> torch.Tensor:
        """A projection: batched decode's rows (`ragged`) through its packed copy (`model.packed`) when
        `packed_decode` is on; a session's own forward always through the plain product."""
        return packed.linear(x, layer.weight) if ragged and self.packed_decode else layer(x)

    def _per_row(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: Sequence[Any], start: Start, impl: AttnImpl
    ) -> tuple[torch.Tensor, list[Any]]:
        """Ragged rows' attention one row at a time, each over its own cache."""
        cfg = self.cfg
        outs, kept = [], []
        for r, (p, s) in enumerate(zip(past, start, strict=True)):
            keys, values, kr = combine(p, k[r : r + 1], v[r : r + 1])
            outs.append(
                attend(q[r : r + 1], keys, values, s, cfg.window_size, impl, cfg.attention_sinks, self._sink_rope)
            )
            kept.append(kr)
        return torch.cat(outs), kept


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, has_fast: bool) -> None:
        super().__init__()
        d, eps = cfg.hidden_size, cfg.norm_eps

        def post() -> RMSNorm | None:
            return RMSNorm(d, eps) if cfg.post_norm else None

        self.attn_norm = RMSNorm(d, eps)
        self.attn = Attention(cfg)
        self.attn_post_norm = post()
        self.has_fast = has_fast
        if has_fast:
            self.fast_norm = RMSNorm(d, eps)
            self.fast_mlp = SwiGLU(d, cfg.intermediate_size)
            self.fast_post_norm = post()
        self.mlp_norm = RMSNorm(d, eps)
        self.mlp = SwiGLU(d, cfg.intermediate_size)
        self.mlp_post_norm = post()
        self._inert: tuple[tuple[tuple[int, int, int, bool], ...], bool] = ((), False)

    @property
    def packed_decode(self) -> bool:
        """Whether batched decode multiplies its rows by this block's static weights through packed copies,
        and by its fast weights on oneDNN (`model.packed`); held by the attention, whose projections are
        among them."""
        return self.attn.packed_decode

    @packed_decode.setter
    def packed_decode(self, on: bool) -> None:
        self.attn.packed_decode = on

    @property
    def inert_mlp(self) -> bool:
        """Whether the static MLP is frozen and all zero, so that the forward skips it.

        A SwiGLU with zero weights outputs exactly 0 and passes exactly 0 back to its input
        in any backward, so skipping it changes no bit of any output, state or gradient.
        Conversions that move a pretrained MLP into the fast weights leave one behind in
        every fast block (the default model v2: 7 blocks), and reading it cost 74 MB per
        decoded token and a seventh of a test-time step's work.  Checked again whenever a
        weight is written in place (`_version`), replaced, or made trainable; trainable
        weights (requires_grad) are never skipped, a gradient must reach them.
        """
        ws = (self.mlp.w1.weight, self.mlp.w2.weight, self.mlp.w3.weight)
        try:
            key = tuple((id(w), w.data_ptr(), w._version, w.requires_grad) for w in ws)
        except RuntimeError:  # inference-mode tensors keep no version: never skip what cannot be tracked
            return False
        if key != self._inert[0]:
            frozen = not any(w.requires_grad for w in ws) and not any(w.is_meta for w in ws)
            with torch.no_grad():
                self._inert = (key, frozen and not any(bool(w.any()) for w in ws))
        return self._inert[1]

    def _rows_mlp(self, x: torch.Tensor) -> torch.Tensor:
        """The static MLP on a batched decode's rows: through packed copies of its weights (`model.packed`),
        else the plain product with 9-15 rows padded to 16 (`tile_rows`)."""
        m = self.mlp
        if not self.packed_decode or not packed.usable(x, m.w1.weight):
            return tile_rows(m, x)
        return swiglu(x, m.w1.weight, m.w2.weight, m.w3.weight, packed.linear)

    def _rows_fast(self, x: torch.Tensor, fast: Sequence[Sequence[torch.Tensor]]) -> torch.Tensor:
        """The fast MLP on a batched decode's rows, each row by its own session's weights ([1, out, in]
        each): on oneDNN when `packed_decode` is on (`packed.fast_linear`), else as a session's own forward."""
        lin = packed.fast_linear if self.packed_decode else _product
        return torch.cat([swiglu(x[r : r + 1], *theta, lin=lin) for r, theta in enumerate(fast)])

    @staticmethod
    def _residual(h: torch.Tensor, out: torch.Tensor, post_norm: RMSNorm | None) -> torch.Tensor:
        return h + (post_norm(out) if post_norm is not None else out)

    def forward(
        self,
        h: torch.Tensor,
        past: Any,
        start: Start,
        rope: Rope,
        fast: Sequence[torch.Tensor] | Sequence[Sequence[torch.Tensor]] | None,
        impl: AttnImpl,
    ) -> tuple[torch.Tensor, Any]:
        """Returns the new hidden state and the keys/values attended over (past + new).

        With ragged rows, `fast` holds each row's own (w1, w2, w3), each [1, out, in]: the
        fast MLP runs per row, on exactly the shapes a single session's call uses.
        """
        a, kv = self.attn(self.attn_norm(h), past, start, rope, impl)
        h = self._residual(h, a, self.attn_post_norm)
        if self.has_fast:
            if fast is None:
                raise ValueError("a suffix block needs its fast weights")
            x = self.fast_norm(h)
            p = swiglu(x, *fast) if isinstance(start, int) else self._rows_fast(x, fast)  # type: ignore[arg-type]
            h = self._residual(h, p, self.fast_post_norm)
        if not self.inert_mlp:
            x = self.mlp_norm(h)
            m = self.mlp(x) if isinstance(start, int) else self._rows_mlp(x)  # ragged: batched decode
            h = self._residual(h, m, self.mlp_post_norm)
        return h, kv


def fast_weight_names(cfg: ModelConfig) -> list[str]:
    """Names of the fast weights theta, in a fixed order (suffix blocks, then w1/w2/w3)."""
    return [f"blocks.{i}.fast_mlp.{p}.weight" for i in range(cfg.first_fast_layer, cfg.num_layers) for p in FAST_PARTS]


class TTTModel(nn.Module):
    """The network's static weights and theta_0, with functional forward pieces."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # Built on the meta device (a checkpoint's skeleton, model.checkpoint), an Embedding's own init is a
        # normal_ on meta, whose kernel sits behind torch._dynamo: its first import cost every process that
        # loads a checkpoint 1.2 s (a daemon's start 2.6 s -> 1.5 s without it).  There it gets its (meta,
        # uninitialised) weight instead; anywhere else it is built and initialised as before.
        meta = torch.get_default_device().type == "meta"
        weight = torch.empty(cfg.vocab_size, cfg.hidden_size) if meta else None
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size, _weight=weight)
        self.blocks = nn.ModuleList(Block(cfg, has_fast=i >= cfg.first_fast_layer) for i in range(cfg.num_layers))
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.digest: str | None = None  # set by model.checkpoint when loaded or saved
        if not self.embed.weight.is_meta:
            self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """Every weight normal(0, init_std), every norm 1 (spec: model.md)."""
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * self.cfg.init_std)

    # -- pieces of the forward pass ---------------------------------------------------------

    def initial_fast_weights(self, batch: int | None = None) -> dict[str, torch.Tensor]:
        """theta_0 as a dict; with `batch`, expanded to [batch, out, in] (a view, no copy)."""
        params = dict(self.named_parameters())
        out = {}
        for name in fast_weight_names(self.cfg):
            p = params[name]
            out[name] = p if batch is None else p.unsqueeze(0).expand(batch, *p.shape)
        return out

    def static_parameters(self) -> dict[str, nn.Parameter]:
        fast = set(fast_weight_names(self.cfg))
        return {n: p for n, p in self.named_parameters() if n not in fast}

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed(tokens)

    def run_blocks(
        self,
        h: torch.Tensor,
        layers: range,
        past: Sequence[Any],
        start: Start,
        fast: Mapping[str, torch.Tensor] | Sequence[Mapping[str, torch.Tensor]] | None,
        impl: AttnImpl,
        full: bool = False,
    ) -> tuple[torch.Tensor, list[Any]]:
        """Run blocks `layers` on h [B, n, d] at positions [start, start+n).

        `past[j]` is the key/value cache of `layers[j]` (None, a KV, or a growing
        `cache.LiveKV`); returns the hidden state and each layer's new keys/values: for
        the n new tokens only, or with `full` what `cache.combine` keeps (past and new).

        Ragged rows (`start` a sequence of B positions): `past[j]` is a list of B per-row
        caches and `fast` a list of B per-row fast-weight dicts ([1, out, in] each), and
        `full` is implied.  This is batched decode: one read of the static weights for
        every session, while attention and the fast MLP see only each row's own state.
        """
        n = h.shape[1]
        cfg = self.cfg
        ragged = not isinstance(start, int)
        if ragged:
            positions = torch.as_tensor(list(start), device=h.device)[:, None] + torch.arange(n, device=h.device)
            cos, sin = rope_cos_sin(positions.flatten(), cfg.head_dim, cfg.rope_theta, torch.float64, cfg.rope_scaling)
            rope = (cos.view(len(start), 1, n, -1), sin.view(len(start), 1, n, -1))
        else:
            positions = torch.arange(start, start + n, device=h.device)
            rope = rope_cos_sin(positions, cfg.head_dim, cfg.rope_theta, torch.float64, cfg.rope_scaling)
        out_kv: list[Any] = []
        for j, i in enumerate(layers):
            block = self.blocks[i]
            theta = None
            if block.has_fast:
                if fast is None:
                    raise ValueError(f"block {i} has a fast MLP: pass its fast weights")
                names = [f"blocks.{i}.fast_mlp.{p}.weight" for p in FAST_PARTS]
                theta = [[f[x] for x in names] for f in fast] if ragged else [fast[x] for x in names]
            h, kept = block(h, past[j], start, rope, theta, impl)
            if full or ragged or isinstance(kept, LiveKV):
                out_kv.append(kept)
            else:
                out_kv.append((kept[0][:, :, -n:], kept[1][:, :, -n:]))
        return h, out_kv

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm and output projection: logits in float32 (or float64 for a float64 model)."""
        h = self.final_norm(h)
        w = self.head_weight
        return upcast(h @ w.to(h.dtype).t())

    def rows_head(self, h: torch.Tensor) -> torch.Tensor:
        """`head` on a batched decode's rows: through the packed copy of the output weight (`model.packed`),
        else as `head` with 9-15 rows padded to 16 (`tile_rows`)."""
        w = self.head_weight
        if not self.packed_decode or not packed.usable(h, w):
            return tile_rows(self.head, h)
        return upcast(packed.linear(self.final_norm(h), w))

    def decode_weights(self) -> list[torch.Tensor]:
        """The static weights batched decode multiplies its rows by (what `model.packed` keeps copies of):
        every projection, every static MLP the forward does not skip, the head."""
        out = []
        for b in self.blocks:
            out += [b.attn.q.weight, b.attn.k.weight, b.attn.v.weight, b.attn.o.weight]
            if not b.inert_mlp:
                out += [b.mlp.w1.weight, b.mlp.w2.weight, b.mlp.w3.weight]
        return [*out, self.head_weight]

    @property
    def head_weight(self) -> torch.Tensor:
        """The output projection's weight: the embedding table when they are tied."""
        return self.embed.weight if self.lm_head is None else self.lm_head.weight

    @property
    def packed_decode(self) -> bool:
        """Whether batched decode multiplies its rows by the static weights through oneDNN's packed copies
        and by the fast weights on oneDNN (`model.packed`: 244 -> 208 ms a 16-row forward of the default
        model, for a second copy of the static weights, 464 MB).  On by default; `memoryd serve
        --packed-decode false` turns it off."""
        return all(b.packed_decode for b in self.blocks)

    @packed_decode.setter
    def packed_decode(self, on: bool) -> None:
        for b in self.blocks:
            b.packed_decode = on

    @property
    def prefix_layers(self) -> range:
        return range(0, self.cfg.first_fast_layer)

    @property
    def suffix_layers(self) -> range:
        return range(self.cfg.first_fast_layer, self.cfg.num_layers)
