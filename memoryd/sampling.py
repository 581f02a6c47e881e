"""Turning next-token logits into a token, and cutting text at stop strings.

Plain functions over tensors, seeded by a `torch.Generator`, so a generation with
a seed can be repeated exactly.
"""

from __future__ import annotations

import torch


def sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float, gen: torch.Generator) -> int:
    """One token id from [V] logits: greedy at temperature 0, else top-k, then nucleus, then a draw."""
    if temperature <= 0.0:
        return int(torch.argmax(logits))
    x = logits.float() / temperature
    if 0 < top_k < x.numel():
        kth = torch.topk(x, top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    probs = torch.softmax(x, dim=-1)
    if 0.0 < top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_p, 0)
        drop = (cum - sorted_p) >= top_p  # keep every token needed to reach top_p, the first always
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=gen))


class StopText:
    """Accumulates generated text; says what may be streamed now and whether a stop string appeared.

    Text that could be the start of a stop string is held back until the next
    token decides, so a client never sees part of a stop string.
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self.text = ""
        self.sent = 0
        self.stopped = False

    def push(self, delta: str) -> str:
        """Add decoded text; return the part that is now safe to send."""
        self.text += delta
        cut = min(
            (i for i in (self.text.find(s, max(0, self.sent - len(s))) for s in self.stops) if i >= 0), default=-1
        )
        if cut >= 0:
            self.stopped = True
            out, self.sent = self.text[self.sent : cut], cut
            return out
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        end = max(self.sent, len(self.text) - hold)
        out, self.sent = self.text[self.sent : end], end
        return out

    def flush(self) -> str:
        """At the end (no stop string): whatever was held back."""
        if self.stopped:
            return ""
        out, self.sent = self.text[self.sent :], len(self.text)
        return out
