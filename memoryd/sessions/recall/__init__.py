"""Recall: the spans of a session's log most relevant to a query (issue 19).

`pages` keeps every token of the log in Redis (the session's own log is trimmed at each
snapshot), shared by forks; `spans` cuts the log into turns and windows; `index` is the
BM25 index over them, grown as tokens arrive; `indexes` holds the indexes of this
daemon's sessions and is what `memoryd.sessions.calls.Sessions` calls. No torch, no grpc.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class RecalledSpan:
    """[start, end) token offsets in the session's log, its text, and its BM25 score (higher: more relevant)."""

    start: int
    end: int
    text: str
    score: float


@dataclass(frozen=True, slots=True)
class Recalled:
    """What one search found: the spans, most relevant first, and how rare each query term is in the log."""

    spans: list[RecalledSpan] = field(default_factory=list)
    idf: Mapping[str, float] = field(default_factory=dict)
    """The idf of each query term that occurs in the log (`SpanIndex.idf`): what a generation's recalled
    context weighs sentences by (memoryd.sessions.recall_prompt)."""


__all__ = ["Recalled", "RecalledSpan"]
