"""One session's recall index: BM25 over its spans, grown as tokens arrive.

Spans come from `spans.Segmenter`; a final span's words go into append-only postings
(term -> span ids, term counts), the last span (which may still grow) is kept apart and
re-read on every append (at most `width` tokens). So an append costs its own tokens plus
one span, never the log, and the index of a prefix is the same whether it was built by
many appends or in one go: the scores are computed from exact integer counts in a fixed
order (query terms sorted), so a rebuild answers a query with the same spans and scores.

Scoring is Okapi BM25 with Lucene's idf, log(1 + (N - df + 0.5) / (df + 0.5)), which stays
positive for terms in most spans; k1 = 1.2, b = 0.75 (the usual defaults, bm25s's too).
"""

from __future__ import annotations

import bisect
import math
from array import array
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from memoryd.sessions.recall.spans import Segmenter, Shape
from memoryd.sessions.recall.words import words

K1 = 1.2
B = 0.75


@dataclass(frozen=True, slots=True)
class Hit:
    start: int
    end: int
    score: float


class SpanIndex:
    """BM25 over the spans of the tokens [base, end) of a session's log (base > 0 after a gap)."""

    def __init__(self, shape: Shape, decode: Callable[[list[int]], str], start: int = 0) -> None:
        self.shape = shape
        self.decode = decode
        self.base = start
        self.tokens = array("I")
        """The tokens [base, end): span text is decoded from them when asked for."""
        self.starts = array("q")
        self.ends = array("q")
        self.lengths = array("i")
        self.total_len = 0
        self.postings: dict[str, tuple[array, array]] = {}
        self._posting_bytes = 0
        self.gaps = False
        """Whether the log had a gap (then `prefix` is not offered: a rebuild handles gaps)."""
        self._open: tuple[int, int] | None = None
        self._open_tf: Counter[str] = Counter()
        self._seg = Segmenter(shape, self._final, start)

    @property
    def end(self) -> int:
        return self._seg.end

    def text_of(self, s: int, e: int) -> str:
        """The text of the log's tokens [s, e), clipped to what this index holds ([base, end))."""
        return self._text(max(s, self.base), min(e, self.end))

    def _text(self, s: int, e: int) -> str:
        return self.decode(self.tokens[s - self.base : e - self.base].tolist())

    def _final(self, s: int, e: int) -> None:
        tf = Counter(words(self._text(s, e)))
        sid = len(self.starts)
        self.starts.append(s)
        self.ends.append(e)
        n = sum(tf.values())
        self.lengths.append(n)
        self.total_len += n
        for term, c in tf.items():
            p = self.postings.get(term)
            if p is None:
                p = self.postings[term] = (array("i"), array("i"))
                self._posting_bytes += len(term)
            self._posting_bytes += 8
            p[0].append(sid)
            p[1].append(c)

    def extend(self, start: int, tokens: list[int]) -> None:
        """Tokens at [start, start + len) of the log; a start past `end` leaves a gap (nothing there to recall)."""
        if start > self.end:  # keep `tokens` dense: pad the gap with zeros no span covers
            self.tokens.extend([0] * (start - self.end))
            self.gaps = True
        self.tokens.extend(tokens)
        self._seg.push(start, tokens)
        span = self._seg.open_span()
        if span != self._open:
            self._open = span
            self._open_tf = Counter(words(self._text(*span))) if span else Counter()

    def prefix(self, x: int) -> SpanIndex | None:
        """The index of the log's tokens [base, x), from this one (a fork at x): its spans and postings
        below the first span that ends at x or later are copied, that span and what follows it are
        re-read from the tokens (at most a window or two). Equal to an index built from [base, x).
        None when the log has a gap (a rebuild from Redis handles that)."""
        if self.gaps or not self.base <= x <= self.end:
            return None
        n = bisect.bisect_left(self.ends, x)
        if n < len(self.starts):
            r = self.starts[n]
        elif self._open is not None and self._open[1] >= x:
            r = self._open[0]
        else:
            r = x
        out = SpanIndex(self.shape, self.decode, self.base)
        out.tokens = self.tokens[: r - self.base]
        out.starts, out.ends, out.lengths = self.starts[:n], self.ends[:n], self.lengths[:n]
        out.total_len = sum(out.lengths)
        for term, (ids, tfs) in self.postings.items():
            m = bisect.bisect_left(ids, n)
            if m:
                out.postings[term] = (ids[:m], tfs[:m])
                out._posting_bytes += len(term) + 8 * m
        out._seg = Segmenter(self.shape, out._final, r)
        out.extend(r, self.tokens[r - self.base : x - self.base].tolist())
        return out

    def spans(self) -> int:
        return len(self.starts) + (1 if self._open else 0)

    def nbytes(self) -> int:
        """Memory held: tokens, span tables and postings (array payloads; dict overhead not counted)."""
        arrays = (self.tokens, self.starts, self.ends, self.lengths)
        return sum(a.itemsize * len(a) for a in arrays) + self._posting_bytes

    def search(self, query: str, k: int) -> list[Hit]:
        """The k spans with the highest BM25 score for the query's words (ties: earlier span first).

        Spans that share no word with the query are not returned, so fewer than k may come back."""
        terms = sorted(set(words(query)))
        nf = len(self.starts)
        n = nf + (1 if self._open else 0)
        if not terms or n == 0:
            return []
        open_len = sum(self._open_tf.values())
        avgdl = max((self.total_len + open_len) / n, 1e-9)
        lengths = np.frombuffer(self.lengths, dtype=np.int32).astype(np.float64) if nf else np.zeros(0)
        norm = K1 * (1.0 - B + B * lengths / avgdl)
        open_norm = K1 * (1.0 - B + B * open_len / avgdl)
        scores = np.zeros(nf, dtype=np.float64)
        open_score = 0.0
        for term in terms:
            p, otf, df = self._counts(term)
            if df == 0:
                continue
            idf = _idf(n, df)
            if p:
                ids = np.frombuffer(p[0], dtype=np.int32)
                tf = np.frombuffer(p[1], dtype=np.int32).astype(np.float64)
                scores[ids] += idf * tf * (K1 + 1.0) / (tf + norm[ids])
            if otf:
                open_score += idf * otf * (K1 + 1.0) / (otf + open_norm)
        hits: list[Hit] = []
        if nf:
            kth = -np.partition(-scores, k - 1)[k - 1] if k < nf else 0.0
            for i in np.flatnonzero(scores >= max(kth, np.nextafter(0.0, 1.0))).tolist():
                hits.append(Hit(self.starts[i], self.ends[i], float(scores[i])))
        if self._open and open_score > 0.0:
            hits.append(Hit(self._open[0], self._open[1], open_score))
        hits.sort(key=lambda h: (-h.score, h.start))
        return hits[:k]

    def idf(self, query: str) -> dict[str, float]:
        """The idf of each of the query's terms that occurs in the log, as `search` weighs it: how rare it is
        here (a subject named once outweighs a word every tool output has)."""
        n = self.spans()
        out = {}
        for term in sorted(set(words(query))):
            df = self._counts(term)[2]
            if df:
                out[term] = _idf(n, df)
        return out

    def _counts(self, term: str) -> tuple[tuple[array, array] | None, int, int]:
        """A term's postings in the final spans, its count in the open span, and the spans holding it."""
        p = self.postings.get(term)
        otf = self._open_tf.get(term, 0)
        return p, otf, (len(p[0]) if p else 0) + (1 if otf else 0)

    def text(self, hit: Hit) -> str:
        return self._text(hit.start, hit.end)


def _idf(n: int, df: int) -> float:
    """Lucene's idf of a term in `df` of `n` spans (positive however common the term)."""
    return math.log(1.0 + (n - df + 0.5) / (df + 0.5))
