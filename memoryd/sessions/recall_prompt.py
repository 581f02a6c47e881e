"""Recalled spans as provisional context for one generation: which spans, in what words, how many tokens.

A generation that asks for recall (`GenerateRequest.recall`) gets, once per call and
before its first token, the spans of the session's log most relevant to its prompt
(the recall index, `memoryd.sessions.recall`), placed just before the prompt as one
turn of the model's chat template::

    <|im_start|>system
    Relevant earlier context:
    user
    The storage room code is 4417.<|im_end|>
    <|im_start|>user
    What do I type at the storage room door?<|im_end|>
    <|im_start|>assistant

The tokens this module returns are read into the *sampling copy* of the state only, and
forward only (`model.StreamState.frozen_copy`: no test-time step, so they never reach the
fast weights, not even the copy's): the session's own state and its log never see them (a
committed generation commits the prompt and the reply, `Sessions.generate`).  What they
cost is that forward: time to first token grows with the recalled tokens (bench/recall.py).

Why these choices:

- **A system turn of the template, not raw text.**  The small instruct model reads
  turns; text spliced between turns is read as part of a turn it does not belong to.
  A model without a usable chat template gets the same words as plain text.
- **Inside the window.**  Context that scrolled out of the attention window before the
  question is read is no better than the log itself: the budget is capped so that the
  context, the prompt and the reply's first `reply_reserve` tokens fit in the window.
- **Spans already in the window are left out.**  The model sees them anyway; spending
  the budget on them would push out what it cannot see.
- **Most relevant kept, and written last.**  Spans are taken by relevance until the budget
  is full (one that does not fit is skipped, a later smaller one may still fit), then
  written least relevant first, so the best match sits right before the question.
  Measured (bench/recall.py, depth 8192, the same session and 10 facts): written in log
  order the small reader answered 3 of 10, often with a number from a similar turn placed
  after the right one; most relevant last, 5 of 10, as many as with the fact alone
  before the question (the oracle).
- **Only the spans above a clear drop in score, only their matching sentences.**  With the
  query's words, the spans kept are those above the first drop of a fifth of the best score,
  and below it those (above half the best) whose best sentence matches the query at least as
  well as any sentence above the drop (`ranked_cut`); each is cut to its sentences that hold a
  query word (`focus`), and a sentence a more relevant span already holds whole is not
  written twice.  Measured (bench/recall.py, the same session, one machine): whole
  spans to the budget were 285 tokens a question on a 2K-token session, the first token 6.8
  times later than without recall; cut to sentences, with every span above half the best, 200
  tokens on the 66K-token session (facts of the same kind about other subjects scored
  0.47-0.77 of the right one), 4 times; with the cut at the drop and always a second span,
  46-68 tokens, 1.6-2.1 times, answering 0.87-1.07 of what the reader answers with the fact in
  front of it.  The budget still caps what is kept.
- **Special tokens removed from span text.**  A span of a chat log holds the template's
  markers (`<|im_start|>user`); written into a turn they would end it and forge others.
  The template's closing and generation prompt go too (a byte-level model has no special
  tokens, but the text `<|end|>` still reads as the end of a turn).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from memoryd.sessions.chat import ChatFormat, Message, TemplateError
from memoryd.sessions.recall.words import words

HEADER = "Relevant earlier context:"
"""The words that open the recalled context (see bench/recall.py for what the reader answers from)."""
ROLE = "system"
"""The turn the context is written as: the role a chat template gives instructions and background."""
RELATIVE_SCORE = 0.5
"""A span scoring below this share of the best span's score is left out. BM25 scores of one query
compare with each other: a span well below the best matched only the query's common words. Each
one left out is tokens of prefill before the first token, and a distractor for a small reader."""
CLEAR_GAP = 0.2
"""Walking down the ranking, a drop of at least this share of the best score between one span and
the next ends what is kept: the spans above it matched the query's rare words (a subject, a name),
the ones below only its common ones. Measured on bench/recall.py's 66K-token session (20 facts a
depth, the same kinds of facts about other subjects as distractors): the span after the fact's
scores 0.47-0.77 of it, the spans below that within a few hundredths of each other."""
_SENTENCE = re.compile(r"(?<=[.!?;])\s+|\n+")
"""Where span text is cut into sentences for `focus` (a line break too: tool output is lines)."""
REPLY_RESERVE = 256
"""Tokens of the reply the context must stay visible to (capped by max_tokens): the answer to a
recalled fact comes in its first tokens, and a longer reply must not push the context out of the
window before it is written."""


class Span(Protocol):
    """What is used of a recalled span (memoryd.sessions.recall.RecalledSpan)."""

    @property
    def start(self) -> int: ...
    @property
    def end(self) -> int: ...
    @property
    def text(self) -> str: ...
    @property
    def score(self) -> float: ...


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...


@dataclass(frozen=True, slots=True)
class RecallAsk:
    """A generation's request for recall, checked by the API edge (GenerateRequest.recall)."""

    k: int
    """Spans to retrieve."""
    budget: int
    """Tokens the recalled context may take, its turn's framing included."""
    query: str
    """What to search for ('': derived from the prompt by the edge, see `query_of`)."""


@dataclass(frozen=True, slots=True)
class RecallContext:
    """The provisional tokens to place before the prompt, and the spans they hold (most relevant first)."""

    tokens: tuple[int, ...]
    spans: tuple[Span, ...]


NOTHING = RecallContext((), ())


INSTRUCTION_WORDS = 12
"""Most words (as the index counts them: no stop words) of a one-line tail after a turn's last question
that `question_part` drops as an instruction about the reply; "Think step by step, then answer with a
single number." has 6."""
_QUESTION_END = re.compile(r"(?<=\S)\?+(?=[\s\"')\]*_]|$)")
"""A question mark that ends a sentence: after a word, before a space or the end (not one in a URL's
query string, nor C's `a ? b : c`)."""


def query_of(messages: Sequence[Message], prompt_text: str) -> str:
    """The search query of a prompt: its last user turn where it has turns, else its last message, else
    its text, up to the end of its last question (`question_part`)."""
    for m in reversed(messages):
        if m.role == "user" and m.content.strip():
            return question_part(m.content)
    for m in reversed(messages):
        if m.content.strip():
            return question_part(m.content)
    return question_part(prompt_text)


def question_part(text: str) -> str:
    """The text up to the end of its last question, when what follows it is one short line (an
    instruction about the reply); else all of it.

    An instruction after a turn's last question ("Answer in a few words.", "Reply in JSON.")
    names nothing to look up, but its words are query terms all the same, and BM25 adds up what
    every span matches of them.  Measured (bench/recall.py's 262K-token session, the index
    alone): with " Answer in a few words." after each question, "answer", "few" and "words" made
    7 spans of Python docs score 0.69-0.96 of the fact's, no drop was clear, and the recalled
    context was 466-476 tokens for names, dates and places; the question alone kept 80-144.
    What comes before the question stays: it is where a turn says what the question is about
    ("I'm at the storage room. What's the code?").  So does a tail of several lines or more
    than `INSTRUCTION_WORDS` words: that is material ("Why does this fail?" and a traceback),
    whose words are worth searching for."""
    ends = [m.end() for m in _QUESTION_END.finditer(text)]
    if not ends:
        return text
    tail = text[ends[-1] :].strip()
    if "\n" in tail or len(words(tail)) > INSTRUCTION_WORDS:
        return text
    return text[: ends[-1]]


def context_budget(budget: int, window: int, prompt_tokens: int, max_tokens: int) -> int:
    """Tokens the context may take: the asked budget, capped so that context + prompt + the reply's
    first tokens fit in the attention window (window 0: full attention, no cap)."""
    if window <= 0:
        return budget
    return max(0, min(budget, window - prompt_tokens - min(max_tokens, REPLY_RESERVE)))


def _clean(text: str, specials: Sequence[str]) -> str:
    """Span text with the chat format's special tokens taken out (they would end or forge a turn)."""
    for s in specials:
        if s:
            text = text.replace(s, "\n")
    return re.sub(r"\n{2,}", "\n", text).strip()


def sentences(text: str) -> list[str]:
    """A span's text cut into sentences (and lines: tool output is lines), in order."""
    return [p.strip() for p in _SENTENCE.split(text) if p.strip()]


def match(sentence: str, terms: frozenset[str], weights: Mapping[str, float]) -> float:
    """How well a sentence matches the query: the summed weight (idf in the log) of the query terms it holds."""
    return sum(weights.get(t, 1.0) for t in terms.intersection(words(sentence)))


def ranked_cut(spans: Sequence[Span], terms: frozenset[str], weights: Mapping[str, float]) -> list[Span]:
    """The spans (most relevant first) worth reading: those scoring at least `RELATIVE_SCORE` of the best,
    down to the first drop of `CLEAR_GAP` of the best between one and the next; below the drop, those
    whose best sentence matches the query at least as well as any sentence above it.

    Why the second rule: BM25 scores a span, and a fact inside a long tool output can score below a
    short turn that shares the query's common words ("Which code do I need to get into the maple
    locker?": "The access code for the south locker is ..." above "NOTE: Heads up: the maple locker
    keypad was reset to ...", 0.75 of it), or the fact's sentence is cut at a window's edge, so that the
    span holding it whole ranks below the one holding the cut copy.  Weighing each term by its rarity,
    sentence by sentence, tells these apart from the usual runner-up, a fact of the same kind about
    another subject, which lacks the subject and matches worse.  Measured with the index alone and
    the default tokenizer, against keeping a second span always: on bench/recall.py's 66K-token
    sessions (4 seeds, 80 facts each) 30-36 tokens a question instead of 47-68, the fact's sentence
    kept in all 320 both ways; on bench/recall_index.py's logs (depths 2K, 8K and 32K, 4 seeds, 240
    facts) 232 kept instead of 231, in 15-25 % fewer tokens."""
    if not spans:
        return []
    best = spans[0].score
    above = sum(s.score >= RELATIVE_SCORE * best for s in spans)  # a prefix: the spans come by score
    cut = next((i for i in range(1, above) if spans[i - 1].score - spans[i].score >= CLEAR_GAP * best), above)

    def best_sentence(span: Span) -> float:
        return max((match(p, terms, weights) for p in sentences(span.text)), default=0.0)

    top = max(best_sentence(s) for s in spans[:cut])
    return [*spans[:cut], *(s for s in spans[cut:above] if best_sentence(s) >= top)]


def focus(parts: Sequence[str], terms: frozenset[str]) -> list[str]:
    """The sentences that hold a term of the query, in their order (none if none does).

    A span is up to 96 tokens of a turn (`recall.spans`); the fact a question asks for is one
    sentence of it. The rest is prefill before the first token and words for the reader to
    pick a wrong answer from."""
    hold = [bool(terms.intersection(words(p))) for p in parts]
    # a matching line that ends in a colon announces what follows ("deploy key for Cedar:" then the key)
    return [p for i, p in enumerate(parts) if hold[i] or (i > 0 and hold[i - 1] and parts[i - 1].endswith(":"))]


def _body(chosen: Sequence[tuple[Span, list[str]]]) -> str:
    """The context's text: the spans least relevant first (the best next to the prompt), a span's sentences
    on one line; a sentence seen by two overlapping windows is written once, and the cut copy of one (the
    start or the end of a sentence of the context, where a window's edge fell inside it) not at all."""
    every = [p for _, parts in chosen for p in parts]
    lines: list[str] = []
    seen: set[str] = set()
    for _, parts in chosen:  # most relevant first: a repeated sentence stays where it is most relevant
        kept = [p for p in parts if p not in seen and not _cut_copy(p, every)]
        seen.update(kept)
        if kept:
            lines.append(" ".join(kept))
    return "\n".join(reversed(lines))


def _cut_copy(sentence: str, every: Sequence[str]) -> bool:
    """Whether `sentence` is the start or the end of a longer sentence of the context."""
    return any(sentence != q and (q.startswith(sentence) or q.endswith(sentence)) for q in every)


def _render(body: str, chat: ChatFormat | None, tok: Tokenizer) -> list[int]:
    text = f"{HEADER}\n{body}"
    if chat is not None and chat.problem is None:
        try:
            return tok.encode(chat.render([Message(ROLE, text)], start=False))
        except TemplateError:  # a template that refuses a lone system turn: plain text, as without one
            pass
    return tok.encode(text + "\n\n")


def recall_context(
    spans: Sequence[Span],
    *,
    position: int,
    window: int,
    prompt_tokens: int,
    max_tokens: int,
    budget: int,
    chat: ChatFormat | None,
    tok: Tokenizer,
    query: str = "",
    weights: Mapping[str, float] | None = None,
) -> RecallContext:
    """The provisional token ids to place before a prompt of `prompt_tokens` tokens read at `position`.

    `spans` most relevant first (as the index returns them).  With a `query`, only the spans
    `ranked_cut` keeps are read, each cut to its sentences that hold a query term (`focus`);
    `weights` is each query term's idf in the log (`memoryd.sessions.recall.Recalled.idf`; a term
    missing weighs 1).  Empty when nothing is left after dropping the spans the window still
    shows, or nothing fits the budget."""
    cap = context_budget(budget, window, prompt_tokens, max_tokens)
    if cap <= 0 or not spans:
        return NOTHING
    # The first token of the reply attends back to position + context + prompt - window; a span
    # that starts after that (counting the context at its largest) is in the window already.
    visible_from = position + cap + prompt_tokens - window if window > 0 else position
    # The template's own turn markers too: a byte-level model has no special tokens, and "<|end|>" in a
    # span would still end the context's turn as text.
    specials = (*chat.specials, chat.closing.strip(), chat.generation_prompt.strip()) if chat is not None else ()
    terms = frozenset(words(query))
    if terms:
        spans = ranked_cut(spans, terms, weights or {})
    chosen: list[tuple[Span, list[str]]] = []
    tokens: list[int] = []
    for span in spans:
        if window > 0 and span.start >= visible_from:
            continue
        text = _clean(span.text, specials)
        parts = focus(sentences(text), terms) if terms else [text] if text else []
        if not parts:
            continue
        trial = [*chosen, (span, parts)]  # most relevant first; written most relevant last, next to the prompt
        ids = _render(_body(trial), chat, tok)
        if len(ids) <= cap:
            chosen, tokens = trial, ids
    if not chosen:
        return NOTHING
    by_relevance = tuple(s for s in spans if any(s is c for c, _ in chosen))
    return RecallContext(tuple(tokens), by_relevance)
