"""Text into the words BM25 counts: lower case, letters and digits, no stop words, light stemming.

The same function reads the log and the query, so a rule here only has to be consistent,
not linguistically right. Stop words are the question words and glue that every turn has
("what", "the", "was"): left in, a question matches every span on them. The stemmer folds
the plural and tense endings ("flights", "departed", "departing") that make a question
worded differently from the fact miss it.
"""

from __future__ import annotations

import re
from functools import lru_cache

_WORD = re.compile(r"[a-z0-9]+")
_SPECIAL = re.compile(r"<\|[^|<>]{0,40}\|>")
"""Special-token strings such as <|im_start|>: markup, not words."""
STOP = frozenset(
    re.findall(
        r"\w+",
        """a an and are as at be been but by can could did do does for from had has have he her his how i if in into
        is it its me my no not of on or our she so than that the their them then there these they this to us was we
        were what when where which who whom whose why will with would you your user assistant system
        tool s t d ll re ve m""",
    )
)


@lru_cache(maxsize=1 << 16)  # a log repeats its words: most lookups hit
def stem(w: str) -> str:
    if w.isdigit() or len(w) <= 3:
        return w
    if w.endswith("ies") and len(w) > 4:
        return w[:-3] + "y"
    if w.endswith("ing") and len(w) > 5:
        return w[:-3]
    if w.endswith("ed") and len(w) > 4:
        return w[:-2]
    if w.endswith("es") and w[-3:-2] in ("s", "x", "z", "h") and len(w) > 4:
        return w[:-2]
    if w.endswith("s") and not w.endswith("ss"):
        return w[:-1]
    return w


@lru_cache(maxsize=1 << 17)
def _term(w: str) -> str:
    """A lower-case word as the term it counts for ("" for a stop word)."""
    return "" if w in STOP else stem(w)


def words(text: str, stemmed: bool = True) -> list[str]:
    found = _WORD.findall(_SPECIAL.sub(" ", text).lower())
    if not stemmed:
        return [w for w in found if w not in STOP]
    return [t for t in map(_term, found) if t]
