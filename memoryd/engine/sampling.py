"""Tokens from a batch of logits [N, V], each row with its own `SamplingParams`, in one pass.

Every setting is applied to all rows at once as a [N, V] tensor operation (a row whose
setting is off gets the neutral value: bias 0, penalty 0 or 1, min_p 0, top_k V, top_p 1),
and a tensor is built only when some row uses it, so a batch of plain greedy rows costs
one argmax.  Inverse-CDF sampling with a uniform draw `u` per row that the caller supplies
(from a `random.Random(seed)` of its own): the result is a pure function of (logits,
settings, tokens seen, u), so a seeded generation repeats exactly, and no per-row
generator object or per-row device call is needed; the only host transfers are the
chosen ids (and their log-probabilities, when asked) at the end.

Order, as vLLM's sampler: logit_bias, then the penalties, then greedy or temperature,
min_p, top_k, top_p and the draw.  Log-probabilities are of the raw logits (the model's
distribution, vLLM's default `raw_logprobs`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from memoryd.engine.work import Logprob, Sampled, SamplingParams


def sample_rows(
    logits: torch.Tensor,
    settings: Sequence[SamplingParams],
    u: Sequence[float],
    prompts: Sequence[Sequence[int]] | None = None,
    outputs: Sequence[Sequence[int]] | None = None,
) -> list[Sampled]:
    """One token per row.  `prompts[i]` / `outputs[i]`: the tokens row i's penalties count
    (the repetition penalty both, frequency and presence the output only)."""
    n, vocab = logits.shape
    dev = logits.device
    raw = logits.float()
    x = raw
    if any(s.logit_bias for s in settings):
        x = x + _scatter(n, vocab, dev, [[(t, b) for t, b in s.logit_bias] for s in settings])
    if any(s.penalized for s in settings):
        x = penalize(x, settings, prompts or [()] * n, outputs or [()] * n)
    greedy = torch.tensor([s.temperature <= 0.0 for s in settings], device=dev)
    out = x.argmax(-1)
    if not bool(greedy.all()):
        temp = torch.tensor([s.temperature if s.temperature > 0 else 1.0 for s in settings], device=dev)
        x = x / temp[:, None]
        if any(s.min_p > 0 for s in settings):
            probs = torch.softmax(x, dim=-1)
            min_p = torch.tensor([s.min_p for s in settings], device=dev)
            x = x.masked_fill(probs < min_p[:, None] * probs.amax(-1, keepdim=True), float("-inf"))
        x, order = torch.sort(x, dim=-1, descending=True)
        rank = torch.arange(vocab, device=dev)[None, :]
        top_k = torch.tensor([s.top_k if 0 < s.top_k < vocab else vocab for s in settings], device=dev)
        x = x.masked_fill(rank >= top_k[:, None], float("-inf"))
        probs = torch.softmax(x, dim=-1)
        top_p = torch.tensor([s.top_p if 0.0 < s.top_p < 1.0 else 2.0 for s in settings], device=dev)
        cum = torch.cumsum(probs, -1)
        probs = probs.masked_fill((cum - probs) >= top_p[:, None], 0.0)  # keep what reaches top_p; the first always
        cdf = torch.cumsum(probs, -1)
        draw = torch.tensor(list(u), dtype=cdf.dtype, device=dev)[:, None] * cdf[:, -1:]
        pick = torch.searchsorted(cdf, draw, right=True).clamp_max(vocab - 1)
        sampled = order.gather(1, pick)[:, 0]
        out = torch.where(greedy, out, sampled)
    tokens = out.tolist()
    if not any(s.logprobs for s in settings):
        return [Sampled(t) for t in tokens]
    return [Sampled(t, lp) for t, lp in zip(tokens, logprobs(raw, out, settings), strict=True)]


def _scatter(n: int, vocab: int, dev: torch.device, entries: Sequence[Sequence[tuple[int, float]]]) -> torch.Tensor:
    """A [n, vocab] tensor with entries[i] = [(column, value)] added into row i (repeats add up)."""
    rows = [i for i, row in enumerate(entries) for _ in row]
    cols = [c for row in entries for c, _ in row]
    vals = [float(v) for row in entries for _, v in row]
    dense = torch.zeros(n, vocab, device=dev)
    if rows:
        index = (torch.tensor(rows, device=dev), torch.tensor(cols, device=dev))
        dense.index_put_(index, torch.tensor(vals, device=dev), accumulate=True)
    return dense


def penalize(
    x: torch.Tensor,
    settings: Sequence[SamplingParams],
    prompts: Sequence[Sequence[int]],
    outputs: Sequence[Sequence[int]],
) -> torch.Tensor:
    """vLLM's penalties: repetition over prompt and output (a positive logit divided by it, a
    negative one multiplied), then frequency (times the output's count) and presence (once)."""
    n, vocab = x.shape
    dev = x.device
    counts = _scatter(n, vocab, dev, [[(t, 1.0) for t in out] for out in outputs])
    seen_out = counts > 0
    if any(s.repetition_penalty not in (0.0, 1.0) for s in settings):
        seen = seen_out | (_scatter(n, vocab, dev, [[(t, 1.0) for t in p] for p in prompts]) > 0)
        rep = torch.tensor([s.repetition_penalty if s.repetition_penalty > 0 else 1.0 for s in settings], device=dev)
        r = torch.where(seen, rep[:, None], torch.ones_like(x))
        x = torch.where(x > 0, x / r, x * r)
    freq = torch.tensor([s.frequency_penalty for s in settings], device=dev)
    presence = torch.tensor([s.presence_penalty for s in settings], device=dev)
    return x - freq[:, None] * counts - presence[:, None] * seen_out.float()


def logprobs(raw: torch.Tensor, chosen: torch.Tensor, settings: Sequence[SamplingParams]) -> list[Logprob | None]:
    """Each row's chosen token's log-probability under the raw logits, and the `top_logprobs` most likely."""
    lp = torch.log_softmax(raw, dim=-1)
    mine = lp.gather(1, chosen[:, None])[:, 0].tolist()
    tokens = chosen.tolist()
    k = max(s.top_logprobs for s in settings)
    top_v, top_i = lp.topk(k, dim=-1) if k else (lp[:, :0], lp[:, :0].long())
    top_v, top_i = top_v.tolist(), top_i.tolist()
    out: list[Logprob | None] = []
    for r, s in enumerate(settings):
        if not s.logprobs:
            out.append(None)
            continue
        top = tuple(zip(top_i[r][: s.top_logprobs], top_v[r][: s.top_logprobs], strict=True))
        out.append(Logprob(tokens[r], mine[r], top))
    return out
