"""A deliberately naive TTT-E2E, written from the spec for the tests only.

No caches, no pending tokens, no batching, no shared code with model/ beyond
reading the weights: for every mini-batch the whole sequence so far is
recomputed from scratch with a dense mask, each position using the fast
weights of its own mini-batch.  Slow and obviously right, so it can judge the
fast path.
"""

from __future__ import annotations

import math

import torch


def rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def rope(x: torch.Tensor, theta: float, positions: list[int] | None = None) -> torch.Tensor:
    """x [n, heads, hd] at positions 0..n-1 (or `positions`), pairs (i, i + hd/2)."""
    n, _, hd = x.shape
    out = torch.empty_like(x)
    for t, p in enumerate(range(n) if positions is None else positions):
        for i in range(hd // 2):
            angle = p / theta ** (2 * i / hd)
            c, s = math.cos(angle), math.sin(angle)
            a, b = x[t, :, i], x[t, :, i + hd // 2]
            out[t, :, i] = a * c - b * s
            out[t, :, i + hd // 2] = b * c + a * s
    return out


def mlp(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor) -> torch.Tensor:
    return (torch.nn.functional.silu(x @ w1.T) * (x @ w3.T)) @ w2.T


def forward(cfg, W: dict, tokens: torch.Tensor, thetas: list[dict], owner: list[int]) -> torch.Tensor:
    """Logits [n, V]; position t uses fast weights thetas[owner[t]]."""
    n = tokens.numel()
    d, H, hd = cfg.hidden_size, cfg.num_heads, cfg.hidden_size // cfg.num_heads
    Hkv = cfg.num_kv_heads or H
    eps = cfg.norm_eps

    def post(x: torch.Tensor, name: str) -> torch.Tensor:
        return rms(x, W[name], eps) if cfg.post_norm else x

    h = W["embed.weight"][tokens]
    for i in range(cfg.num_layers):
        p = f"blocks.{i}."
        x = rms(h, W[p + "attn_norm.weight"], eps)
        q = (x @ W[p + "attn.q.weight"].T).view(n, H, hd)
        k = (x @ W[p + "attn.k.weight"].T).view(n, Hkv, hd)
        v = (x @ W[p + "attn.v.weight"].T).view(n, Hkv, hd)
        if cfg.qk_norm:
            q, k = rms(q, W[p + "attn.q_norm.weight"], eps), rms(k, W[p + "attn.k_norm.weight"], eps)
        horizon = getattr(cfg, "sink_horizon", None) or n
        q_sink = rope(q, cfg.rope_theta, [min(t, horizon) for t in range(n)])  # sinks seen from the horizon at most
        q, k = rope(q, cfg.rope_theta), rope(k, cfg.rope_theta)
        att = torch.zeros(n, H, hd, dtype=h.dtype)
        for t in range(n):
            for head in range(H):
                kh = head // (H // Hkv)
                lo = 0 if cfg.window_size is None else max(0, t - cfg.window_size + 1)
                seen = sorted(set(range(lo, t + 1)) | set(range(min(cfg.attention_sinks, t + 1))))
                qs = [q_sink[t, head] if j < cfg.attention_sinks else q[t, head] for j in seen]
                scores = torch.stack([qj @ k[j, kh] for qj, j in zip(qs, seen, strict=True)]) / math.sqrt(hd)
                probs = torch.softmax(scores, 0)
                att[t, head] = sum(p * v[j, kh] for p, j in zip(probs, seen, strict=True))
        h = h + post(att.reshape(n, d) @ W[p + "attn.o.weight"].T, p + "attn_post_norm.weight")
        if i >= cfg.num_layers - cfg.num_fast_layers:
            x = rms(h, W[p + "fast_norm.weight"], eps)
            rows = [
                mlp(x[t], *(thetas[owner[t]][f"{p}fast_mlp.{w}.weight"] for w in ("w1", "w2", "w3"))) for t in range(n)
            ]
            h = h + post(torch.stack(rows), p + "fast_post_norm.weight")
        x = rms(h, W[p + "mlp_norm.weight"], eps)
        h = h + post(
            mlp(x, W[p + "mlp.w1.weight"], W[p + "mlp.w2.weight"], W[p + "mlp.w3.weight"]), p + "mlp_post_norm.weight"
        )
    head = W["embed.weight"] if cfg.tie_embeddings else W["lm_head.weight"]
    return rms(h, W["final_norm.weight"], eps) @ head.T


def naive_nll(cfg, W: dict, tokens: torch.Tensor, inner_lr: float) -> torch.Tensor:
    """Per-position NLL [len - 1] of predicting token t+1, with TTT as the spec says."""
    b = cfg.mini_batch_size
    n = tokens.numel()
    names = [k for k in W if ".fast_mlp." in k]
    thetas = [{k: W[k].clone() for k in names}]
    nll = torch.zeros(n - 1, dtype=W["embed.weight"].dtype)
    mb = 0
    while True:
        lo, hi = mb * b, min((mb + 1) * b, n - 1)
        if lo >= hi:
            break
        leaves = {k: v.detach().clone().requires_grad_(True) for k, v in thetas[mb].items()}
        local = [*thetas[:mb], leaves]
        owner = [t // b for t in range(hi)]
        logits = forward(cfg, W, tokens[:hi], local, owner)
        for t in range(lo, hi):
            nll[t] = -torch.log_softmax(logits[t], -1)[tokens[t + 1]].detach()
        if hi - lo < b:  # the last, incomplete mini-batch: predicted but never learned
            break
        targets = tokens[lo + 1 : hi + 1]
        per_pos = -torch.log_softmax(logits[lo:hi], -1).gather(1, targets[:, None])[:, 0]
        keep = (targets != cfg.bos_token_id).to(per_pos.dtype)
        loss = (per_pos * keep).sum() / max(float(keep.sum()), 1.0)
        if names:
            grads = torch.autograd.grad(loss, [leaves[k] for k in names])
            norm = math.sqrt(sum(float((g * g).sum()) for g in grads))
            scale = min(1.0, cfg.inner_clip / norm) if norm > 0 else 1.0
            thetas.append({k: (leaves[k] - inner_lr * scale * g).detach() for k, g in zip(names, grads, strict=True)})
        else:
            thetas.append(thetas[mb])
        mb += 1
    return nll
