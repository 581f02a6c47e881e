"""The fenced code blocks of a markdown file, with the marker each may carry: read by the docs test and by .ci/run.

Standard library only: .ci/run uses it before any venv exists
(`python3.11 tests/doc_blocks.py README.md serve` prints the README's serve command).

A marker is an HTML comment (invisible when rendered) on the line right before the fence:

    <!-- example: NAME -->                 names the block (e.g. `serve`, which .ci/run runs)
    <!-- example: not-run (REASON) -->     deliberately not executed, and why

Every other python/bash block is run by tests/test_docs_examples.py.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path

FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>```+|~~~+)(?P<lang>[\w+-]*)[^\n]*$")
MARKER = re.compile(r"^\s*<!--\s*example:\s*(?P<name>[\w-]+)\s*(?:\((?P<why>[^)]*)\))?\s*-->\s*$")
RUNNABLE = {"python": "python", "py": "python", "bash": "bash", "sh": "bash", "shell": "bash"}
NOT_RUN = "not-run"


@dataclass(frozen=True)
class Block:
    path: Path
    line: int
    """1-based line of the opening fence."""
    lang: str
    code: str
    name: str = ""
    """The marker's name ('' without one; `not-run` for a block deliberately not executed)."""
    why: str = ""

    @property
    def kind(self) -> str:
        """`python`, `bash`, or '' for what is not executed (yaml, text, ...)."""
        return RUNNABLE.get(self.lang, "")


def blocks(path: Path) -> list[Block]:
    """Every fenced block of the file, in order (indented fences too: a block inside a list item)."""
    lines = Path(path).read_text().splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence = m.group("indent"), m.group("fence")
        start = i
        body = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i].lstrip())
            i += 1
        marker = MARKER.match(lines[start - 1]) if start > 0 else None
        name, why = (marker.group("name"), marker.group("why") or "") if marker else ("", "")
        out.append(Block(Path(path), start + 1, m.group("lang").lower(), "\n".join(body) + "\n", name, why))
        i += 1
    return out


def named(path: Path, name: str) -> Block:
    found = [b for b in blocks(path) if b.name == name]
    if len(found) != 1:
        raise LookupError(f"{path}: {len(found)} blocks marked `<!-- example: {name} -->`; want exactly one")
    return found[0]


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: doc_blocks.py FILE.md NAME   (prints the block marked <!-- example: NAME -->)")
    sys.stdout.write(named(Path(sys.argv[1]), sys.argv[2]).code)
