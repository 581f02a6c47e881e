"""Every code block of the README and the docs' quick starts runs, read from the files themselves (issue 17).

The blocks are extracted at test time (tests/doc_blocks.py), never copied here, so an example
cannot drift from the code: the README's OpenAI example named a model the daemon does not serve
and nothing noticed. Each python/bash block of DOCS runs as it is written, in a scratch directory,
against one daemon started the way the README starts one (`memoryd serve` on the default model,
converted on first start, with the OpenAI endpoint on: the run's shared one, tests/default_fixtures.py),
except that the addresses the docs use are replaced by the test daemon's (ADDRESSES: the one thing
substituted).

A block is not run only when the markdown says so, right above it:
`<!-- example: not-run (why) -->`; the README's `serve` and `test` commands are run by .ci/run
(checked below), and its `sdk` example both here and by .ci/run against the serve command.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from default_fixtures import DefaultDaemon
from doc_blocks import NOT_RUN, Block, blocks
from service_fixtures import ROOT, child_env

DOCS = [
    ROOT / "README.md",
    ROOT / "docs" / "service.md",
    ROOT / "docs" / "openai.md",
    ROOT / "docs" / "agents.md",
    ROOT / "sdk" / "README.md",
]
RUN_BY_CI = {"serve", "test"}
"""README blocks .ci/run runs (installing and serving are not for a test)."""
MAX_NOT_RUN = 4
"""Blocks may opt out, with a reason; few."""
GRPC_DEFAULT, HTTP_DEFAULT = "50051", "8080"
pytest_plugins = ["default_fixtures"]


def all_blocks() -> list[Block]:
    return [b for path in DOCS for b in blocks(path)]


def runnable() -> list[Block]:
    return [b for b in all_blocks() if b.kind and b.name not in RUN_BY_CI | {NOT_RUN}]


def substitute(code: str, addresses: dict[str, str]) -> str:
    """The block with the docs' addresses replaced by the test daemon's (and nothing else changed)."""
    for old, new in addresses.items():
        code = code.replace(old, new)
    return code


def test_every_block_is_run_or_says_why_not() -> None:
    found = all_blocks()
    assert {b.path for b in found} == set(DOCS)
    marked = [b for b in found if b.name]
    assert all(b.name in RUN_BY_CI | {NOT_RUN, "sdk"} for b in marked), [block_id(b) for b in marked]
    not_run = [b for b in found if b.name == NOT_RUN]
    assert all(b.why.strip() for b in not_run), [block_id(b) for b in not_run if not b.why.strip()]
    assert len(not_run) <= MAX_NOT_RUN, [block_id(b) for b in not_run]
    readme = {b.name: b for b in found if b.path.name == "README.md" and b.path.parent == ROOT and b.name}
    assert set(readme) >= RUN_BY_CI | {"sdk"}, sorted(readme)
    ci = (ROOT / ".ci" / "run").read_text()
    for name in (*RUN_BY_CI, "sdk"):  # .ci/run extracts these from README.md rather than copying them
        assert f"tests/doc_blocks.py README.md {name}" in ci, f".ci/run does not run the README's {name} block"
    assert "memoryd serve" in readme["serve"].code and "pytest" in readme["test"].code
    assert len(runnable()) >= 5


@pytest.fixture(scope="module")
def daemon(default_daemon: DefaultDaemon) -> dict[str, str]:
    """ADDRESSES: each address the docs use -> the run's default-model daemon's (tests/default_fixtures.py:
    `memoryd serve` as the README starts it, with no flags, the default model converted on its first start)."""
    g, h = default_daemon.address, default_daemon.http_address
    return {f"127.0.0.1:{GRPC_DEFAULT}": g, f"localhost:{GRPC_DEFAULT}": g, f"127.0.0.1:{HTTP_DEFAULT}": h}


def tools_path(tmp: Path) -> str:
    """PATH for a block: this venv's python and memoryd first, and grpcurl (the stand-in when it is missing)."""
    bindir = str(Path(sys.executable).parent)
    parts = [bindir, os.environ.get("PATH", "")]
    if shutil.which("grpcurl") is None:
        tools = tmp / "tools"
        tools.mkdir(exist_ok=True)
        shim = tools / "grpcurl"
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{ROOT / "tests" / "grpcurl_standin.py"}" "$@"\n')
        shim.chmod(0o755)
        parts.insert(0, str(tools))
    return os.pathsep.join(parts)


def block_id(b: Block) -> str:
    return f"{b.path.relative_to(ROOT)}:{b.line}" + (f"[{b.name}]" if b.name else "")


@pytest.mark.parametrize("block", runnable(), ids=block_id)
def test_block_runs(block: Block, daemon: dict[str, str], tmp_path: Path) -> None:
    code = substitute(block.code, daemon)
    env = child_env() | {"PATH": tools_path(tmp_path)}
    if block.kind == "python":
        script = tmp_path / "example.py"
        script.write_text(code)
        args = [sys.executable, str(script)]
    else:
        args = ["bash", "-e", "-o", "pipefail", "-c", code]
    out = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, timeout=600, stdin=subprocess.DEVNULL)
    shown = f"{block_id(block)} exited with {out.returncode}\n--- code\n{code}"
    shown += f"\n--- stdout\n{out.stdout.decode()[-3000:]}\n--- stderr\n{out.stderr.decode()[-3000:]}"
    assert out.returncode == 0, shown
