"""The engine loop's own cost per tick, this tree's `Engine._run` against another revision's, in one process.

n greedy samples of one prompt decode `--tokens` tokens each, in-process (no gRPC, no session layer),
alternating rounds between the two loops (an `Engine` subclass gets the other revision's `_run`, read
with `git show REV:memoryd/engine/core.py`; the rest of the engine is this tree's). Per tick it reports
the wall time and `loop_cpu_ms`, the CPU time of the event-loop thread (time.thread_time): the Python
work the loop and the generations' consumers do per tick, while the forward runs on a lane's thread.
On a shared CPU machine the wall figures follow the machine's load; the loop's CPU time is the
comparable one. Prints JSON (medians over rounds).

    OMP_NUM_THREADS=1 .venv/bin/python bench/engine_loop.py --against f98119e --samples 1,16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import memoryd.engine.core as core  # noqa: E402
from memoryd.engine.core import Engine  # noqa: E402
from memoryd.engine.scheduler import Budget  # noqa: E402
from memoryd.engine.work import Append, Generate, SamplingParams  # noqa: E402
from model import StreamState, init_model, preset  # noqa: E402


def engine_with_run_of(rev: str) -> type[Engine]:
    """An Engine whose `_run` is the one in `rev` (the method's source, run in this tree's core module)."""
    src = subprocess.run(
        ["git", "show", f"{rev}:memoryd/engine/core.py"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    start = src.index("    async def _run(self) -> None:")
    end = src.index("\n    def ", start)
    namespace = dict(vars(core))
    exec(textwrap.dedent(src[start:end]), namespace)  # this repository's own code, at another revision
    return type("EngineAt_" + rev, (Engine,), {"_run": namespace["_run"]})


async def rounds(model: torch.nn.Module, rev: str, samples: int, tokens: int, n: int) -> dict[str, dict[str, float]]:
    engines = {
        rev: engine_with_run_of(rev)(model, Budget(tokens=4096, rows=16)),
        "this": Engine(model, Budget(4096, 16)),
    }
    state = (await engines["this"].submit(Append(StreamState.fresh(model), list(range(5, 25))))).state

    async def one(engine: Engine) -> tuple[float, float]:
        async def sample() -> None:
            async with engine.generate(Generate(state, SamplingParams(max_tokens=tokens), frozenset({-1}))) as g:
                async for _ in g:
                    pass

        t0, c0, k0 = time.perf_counter(), time.thread_time(), engine.ticks
        await asyncio.gather(*(sample() for _ in range(samples)))
        ticks = engine.ticks - k0
        return 1000 * (time.perf_counter() - t0) / ticks, 1000 * (time.thread_time() - c0) / ticks

    got: dict[str, dict[str, list[float]]] = {k: {"wall_ms": [], "loop_cpu_ms": []} for k in engines}
    for e in engines.values():
        await one(e)  # warm-up
    for r in tqdm(range(n), desc=f"{samples} samples", file=sys.stderr):
        for name in list(engines)[:: 1 if r % 2 == 0 else -1]:
            wall, cpu = await one(engines[name])
            got[name]["wall_ms"].append(wall)
            got[name]["loop_cpu_ms"].append(cpu)
    for e in engines.values():
        await e.close()
    out = {k: {m: round(statistics.median(v), 4) for m, v in d.items()} for k, d in got.items()}
    out["this_over_" + rev] = {m: round(out["this"][m] / out[rev][m], 3) for m in ("wall_ms", "loop_cpu_ms")}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--against", required=True, help="git revision whose Engine._run is compared")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--samples", default="1,16", help="samples decoding at once, comma-separated")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=10)
    a = ap.parse_args()
    torch.set_num_threads(1)
    model = init_model(preset(a.preset), seed=0).requires_grad_(False)
    result = {"preset": a.preset, "tokens": a.tokens, "rounds": a.rounds, "against": a.against}
    for n in (int(x) for x in a.samples.split(",")):
        result[f"samples_{n}"] = asyncio.run(rounds(model, a.against, n, a.tokens, a.rounds))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
