"""Where a session's log is cut into recallable spans: a pure function of the token stream.

A span is a chat turn (the log's own structure: every turn of a ChatML-style template
opens with one special token, `turn_start`), and a turn longer than `width` tokens is
cut into windows of `width` tokens that overlap by `overlap`, so a fact shorter than the
overlap is whole in at least one window. A log without turns is one long turn, windowed
the same way.

The spans of a prefix [0, X) are defined by the prefix alone (`windows` of each turn, the
last turn taken to end at X). So the spans after many appends equal the spans of one
rebuild from the log, and a fork at X sees exactly the spans of [0, X). As tokens arrive
only the last span can change: it grows until it is `width` long, and once a token
follows it, it is final and the next window starts `width - overlap` after its start.

Why 96 / 24 tokens: a fact-bearing sentence is 15-40 tokens; a 96-token span holds one
with its context while five fit a 512-token recall budget, and 24 tokens of overlap keep
a sentence cut at a window edge whole in the next window. bench/recall_index.py measures
the hit rate for other widths (--width, --overlap).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

WIDTH = 96
OVERLAP = 24


@dataclass(frozen=True, slots=True)
class Shape:
    """How a log is cut: the turn-start token (None: the log has no turns) and the window."""

    turn_start: int | None = None
    width: int = WIDTH
    overlap: int = OVERLAP

    def __post_init__(self) -> None:
        if not 0 <= self.overlap < self.width:
            raise ValueError(f"overlap ({self.overlap}) must be at least 0 and below width ({self.width})")


def windows(turn_start: int, turn_end: int, shape: Shape) -> Iterator[tuple[int, int]]:
    """The spans of one turn [turn_start, turn_end) (turn_end may be where the prefix stops)."""
    stride = shape.width - shape.overlap
    s = turn_start
    while s < turn_end:
        e = min(s + shape.width, turn_end)
        yield s, e
        if e == turn_end:
            return
        s += stride


class Segmenter:
    """Spans found as tokens arrive: each append reads only its own tokens.

    `final(start, end)` is called once for every span that can no longer change, in
    order of start; `open_span()` is the last span, which may still grow.
    """

    __slots__ = ("_final", "end", "first_open", "shape", "turn")

    def __init__(self, shape: Shape, final: Callable[[int, int], None], start: int = 0) -> None:
        self.shape = shape
        self._final = final
        self.turn = start
        """Where the current (last) turn starts."""
        self.first_open = start
        """The start of the current turn's first span that is not final yet (on the turn's window grid)."""
        self.end = start

    def push(self, start: int, tokens: list[int]) -> None:
        """Tokens at [start, start + len); a start past `end` is a gap in the log: a new turn there."""
        if start < self.end:
            raise ValueError(f"tokens at {start} overlap what the segmenter has read (up to {self.end})")
        if start > self.end:
            self._close(self.end)
            self.turn = self.first_open = self.end = start
        ts = self.shape.turn_start
        if ts is not None and ts in tokens:
            for i in np.flatnonzero(np.asarray(tokens) == ts).tolist():
                at = start + i
                if at != self.turn:
                    self._close(at)
                    self.turn = self.first_open = at
        self.end = start + len(tokens)
        stride = self.shape.width - self.shape.overlap
        while self.first_open + self.shape.width < self.end:  # a full window with a token after it
            self._final(self.first_open, self.first_open + self.shape.width)
            self.first_open += stride

    def _close(self, at: int) -> None:
        """The current turn ends at `at`: its spans not yet final are."""
        for s, e in windows(self.first_open, at, self.shape):
            self._final(s, e)
        self.first_open = at

    def open_span(self) -> tuple[int, int] | None:
        if self.first_open >= self.end:
            return None
        return self.first_open, min(self.first_open + self.shape.width, self.end)
