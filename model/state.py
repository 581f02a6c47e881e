"""A session's streaming state: fast weights, rolling caches, pending tokens.

`StreamState.append(tokens)` reads tokens in pieces of any size and gives the same
fast weights, caches and logits as one call over the whole sequence (spec:
model.md, "Streaming equals one shot").  How it stays exact:

- Prefix blocks do not depend on theta, so each token goes through them once, as
  it arrives; their keys/values join the prefix caches and their outputs wait in
  `pending_hidden` until the token's mini-batch is stepped.
- Mini-batch s (positions [s*b, (s+1)*b)) is stepped when its last target, the
  token at (s+1)*b, has arrived: the suffix runs on its b pending activations
  with theta_s, the loss gives theta_{s+1}, and the suffix keys/values of that
  forward join the suffix caches, kept as they were computed.
- Tokens still pending are run through the suffix with the current theta so
  that their keys are visible and the next-token logits are known
  (`pending_kv`, `pending_out`); after a step they are recomputed with the
  new theta.

All updates build new tensors and never write into old ones, so `clone()` can
share every tensor: a fork costs nothing until one side appends.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from model.attention import AttnImpl, default_impl
from model.cache import cache_keep, extend, extend_all, join
from model.inner import StepResult, inner_step
from model.network import KV, TTTModel


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
    """Per layer: prefix layers up to `position`; suffix layers up to steps * b."""
    pending_tokens: torch.Tensor
    """[p] ids at positions [steps*b, position)."""
    pending_hidden: torch.Tensor
    """[1, p, d] prefix outputs of the pending tokens."""
    pending_kv: list[KV | None]
    """Per suffix layer: keys/values of the first len(...) pending tokens under current theta."""
    pending_out: torch.Tensor
    """[1, q, d] final hidden states of the first q pending tokens under current theta."""
    position: int = 0
    steps: int = 0
    inner_lr: float = 1.0
    impl: AttnImpl = "sdpa"

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def fresh(cls, model: TTTModel, inner_lr: float | None = None, impl: AttnImpl | None = None) -> StreamState:
        cfg = model.cfg
        device = model.embed.weight.device
        dtype = model.embed.weight.dtype
        fast = {k: v.detach().unsqueeze(0).float() for k, v in model.initial_fast_weights().items()}
        return cls(
            model=model,
            fast=fast,
            kv=[None] * cfg.num_layers,
            pending_tokens=torch.zeros(0, dtype=torch.int64, device=device),
            pending_hidden=torch.zeros(1, 0, cfg.hidden_size, dtype=dtype, device=device),
            pending_kv=[None] * cfg.num_fast_layers,
            pending_out=torch.zeros(1, 0, cfg.hidden_size, dtype=dtype, device=device),
            inner_lr=cfg.inner_lr if inner_lr is None else inner_lr,
            impl=impl or default_impl(device),
        )

    def clone(self) -> StreamState:
        """An independent copy that shares tensors (they are never written in place)."""
        return replace(self, fast=dict(self.fast), kv=list(self.kv), pending_kv=list(self.pending_kv))

    # -- reading tokens ----------------------------------------------------------------------

    @torch.no_grad()
    def append(self, tokens: Sequence[int] | torch.Tensor) -> AppendReport:
        """Read tokens; take a test-time step for every mini-batch whose targets are known.

        Validates everything before changing anything: on InputError the state is untouched.
        """
        cfg = self.model.cfg
        ids = validate_tokens(tokens, cfg.vocab_size).to(self.pending_tokens.device)
        report = AppendReport()
        b = cfg.mini_batch_size
        i = 0
        while i < ids.numel():
            # Top the pending tokens up to b + 1 (a full mini-batch plus its last target).
            room = b + 1 - self.pending_tokens.numel()
            piece = ids[i : i + room]
            i += piece.numel()
            self._read_prefix(piece)
            if self.pending_tokens.numel() > b:
                self._step(report)
        self._refresh_pending()
        return report

    def _read_prefix(self, piece: torch.Tensor) -> None:
        model = self.model
        prefix = model.prefix_layers
        h = model.embed_tokens(piece[None])
        h, new_kv = model.run_blocks(h, prefix, self.kv[: len(prefix)], self.position, None, self.impl)
        keep = cache_keep(model.cfg.window_size)
        self.kv[: len(prefix)] = extend_all(self.kv[: len(prefix)], new_kv, keep)
        self.pending_tokens = torch.cat((self.pending_tokens, piece))
        self.pending_hidden = torch.cat((self.pending_hidden, h), 1)
        self.position += piece.numel()

    def _step(self, report: AppendReport) -> None:
        """Step the first pending mini-batch (its targets are the next b tokens)."""
        model, cfg = self.model, self.model.cfg
        b, suffix = cfg.mini_batch_size, model.suffix_layers
        targets = self.pending_tokens[1 : b + 1][None]
        if len(suffix):
            mask = targets != cfg.bos_token_id
            fast = {k: v.detach().requires_grad_(True) for k, v in self.fast.items()}
            res: StepResult = inner_step(
                model,
                fast,
                self.pending_hidden[:, :b],
                targets,
                mask,
                self.kv[suffix.start :],
                self.steps * b,
                self.inner_lr,
                cfg.inner_clip,
                self.impl,
            )
            self.fast = res.fast
            keep = cache_keep(cfg.window_size)
            self.kv[suffix.start :] = extend_all(self.kv[suffix.start :], res.kv, keep)
            report.nll.append(res.nll[0])
            report.losses.append(float(res.loss[0]))
        else:  # no fast weights: the pending outputs already are the final hidden states
            logits = model.head(self.pending_hidden[:, :b])
            report.nll.append(torch.nn.functional.cross_entropy(logits[0], targets[0], reduction="none"))
        report.steps += 1
        self.steps += 1
        self.pending_tokens = self.pending_tokens[b:]
        self.pending_hidden = self.pending_hidden[:, b:]
        self.pending_kv = [None] * cfg.num_fast_layers
        self.pending_out = self.pending_out[:, :0]

    def _refresh_pending(self) -> None:
        """Run the suffix (current theta) on pending tokens it has not seen yet."""
        model = self.model
        done = self.pending_out.shape[1]
        todo = self.pending_hidden[:, done:]
        if todo.shape[1] == 0:
            return
        suffix = model.suffix_layers
        if not len(suffix):
            self.pending_out = self.pending_hidden
            return
        start = self.steps * model.cfg.mini_batch_size + done
        past = [join(c, p) for c, p in zip(self.kv[suffix.start :], self.pending_kv, strict=True)]
        h, new_kv = model.run_blocks(todo, suffix, past, start, self.fast, self.impl)
        self.pending_kv = [extend(p, n, None) for p, n in zip(self.pending_kv, new_kv, strict=True)]
        self.pending_out = torch.cat((self.pending_out, h), 1)

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
        """Every tensor of the state, by a stable name (what a snapshot stores)."""
        out = {f"fast.{k}": v[0] for k, v in self.fast.items()}
        for i, c in enumerate(self.kv):
            if c is not None:
                out[f"kv.{i}.k"], out[f"kv.{i}.v"] = c[0][0], c[1][0]
        for j, c in enumerate(self.pending_kv):
            if c is not None:
                out[f"pending_kv.{j}.k"], out[f"pending_kv.{j}.v"] = c[0][0], c[1][0]
        out["pending.tokens"] = self.pending_tokens
        out["pending.hidden"] = self.pending_hidden[0]
        out["pending.out"] = self.pending_out[0]
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())
