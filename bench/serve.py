"""Serving benchmark of the engine (issue 13): n sessions at once through a real daemon.

For each n in --sessions, with n client tasks in parallel (one per session):
1. each session appends a 200-token prompt (English text, a different stretch per session);
2. all n generate 32 new tokens greedily at once (commit=false): `generate_tok_s` is the
   tokens generated over the wall time of this phase, the median of `--rounds` rounds in which
   the levels take turns (1, 16, 1, 16, ...: on a shared machine the load moves a lot within a
   minute; one level measured once in a busier minute than the other put b8cbc24 at 1.32 of the
   ceiling); `generate_p50_ms`/`p99` are the latencies of whole Generate calls;
   `inter_token_p50_ms`/`p99` the gaps between consecutive streamed tokens (the first token's
   wait is not a gap); `loads_while_generating` / `evictions_while_generating`, from the
   daemon's counters, should be 0 (a session reloaded mid-phase joins the batch late; the daemon's
   `--memory-budget` is set to hold every level's sessions, `--memory-budget` here);
3. all n append 256 more tokens at once: `append_tok_s`.
`generate_speedup` is generate_tok_s at n over that at 1 session; `bandwidth_ceiling` is the
most it could be if decoding moved every byte at one bandwidth and arithmetic were free
(the shared weights are read once per forward, each session's fast weights and cache once per
row: `model.batch.decode_bytes`), computed from the served model's shapes, and
`speedup_of_ceiling` the fraction of it reached.  `generate_speedup_rounds` is the same ratio
within each round (level n's rate over level 1's in that round, measured seconds apart), and
`speedup_of_ceiling_rounds` the median of those over the ceiling: when the machine's speed
drifts across the run (one quiet run's single-session rate fell from 16.1 to 11.7 tokens/s over
its five rounds), the ratio within a round compares like with like, the ratio of two medians
does not; both are printed.  `overhead` compares one session's inter-token
p50 through the daemon with the same model decoding the same prompt greedily in this process
(as bench/decode.py does: `state.append([t]); state.logits()`, the bench's torch threads = the
daemon's), in alternating rounds so that a shared machine's load changes hit both alike:
`daemon_over_in_process` is the serving overhead (gRPC, the engine loop, the session layer).
`in_process_batched` does the same at the largest level: the greedy decode of its sessions'
prompts in lockstep through `model.batch.decode` in this process, against one session alone,
alternating (`speedup`, and `of_ceiling` against the same ceiling): what the forward alone gives,
so that the daemon's figure shows what serving n sessions costs on top.
Everything is measured in one run against one daemon, so ratios between levels are
meaningful on a noisy machine; absolute figures are not comparable across runs.

Past about 56 generated tokens each session's decode takes a test-time step (solo, on the
engine's compute lane): `--generate-tokens 160` measures that; with equal prompts all sessions
step on the same token, `--stagger` spreads their prompt lengths over one mini-batch.

    python bench/serve.py --json                          # the default model (SmolLM2-135M, converted)
    python bench/serve.py --json --sessions 1,16 --generate-tokens 160 --stagger
    python bench/serve.py --json --preset small --sessions 1,4,16
    python bench/serve.py --json --device cuda --dtype bfloat16 --sessions 1,16,64   # on a GPU machine

It measures and prints; it asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "sdk", ROOT / "bench"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import grpc  # noqa: E402
import torch  # noqa: E402
from harness import bench_checkpoint, free_port, machine_env, pct, start_daemon, start_redis, stop_all  # noqa: E402
from memoryd_sdk.proto import memoryd_pb2 as pb  # noqa: E402
from memoryd_sdk.proto import memoryd_pb2_grpc as pb_grpc  # noqa: E402
from tqdm import tqdm  # noqa: E402

from memoryd.server import load_model  # noqa: E402
from memoryd.settings import default_data_dir, load_settings  # noqa: E402
from model import StreamState  # noqa: E402
from model.batch import DecodeBytes, decode, decode_bytes, logits_of  # noqa: E402
from model.pool import DEFAULT_MAX_BYTES, DecodePool  # noqa: E402
from model.state import full_state_bytes  # noqa: E402
from model.tokenizer import load_tokenizer  # noqa: E402

PROMPT_TOKENS, GENERATE_TOKENS, APPEND_TOKENS = 200, 32, 256  # the shape; --generate-tokens changes the 32
ROUNDS = 5  # alternations of the daemon and the in-process decode in `overhead` (3 let one slow minute set the ratio)

TEXT = """\
The lighthouse keeper wrote in the log every evening: the wind, the ships that passed, the
state of the lamp. In the spring of that year a storm came up the coast faster than anyone
expected, and the harbour master sent a boy along the cliff path with a message. The keeper
read it twice, trimmed the wick, and climbed the stairs again. Agents that work for days on a
task keep notes in much the same way: what was tried, what failed, what the user asked for
on the first morning and what they changed their mind about later. A memory that forgets the
first morning is not much of a memory. The engine batches every session's next token into one
pass over the weights, so sixteen agents cost little more than one, and each session keeps its
own fast weights, the part of the model that has learned its history. """


def tokens_of(tok: object, n: int, salt: int) -> list[int]:
    ids = tok.encode(TEXT * (2 + (n * 4) // max(1, len(TEXT))))  # type: ignore[attr-defined]
    start = (salt * 37) % max(1, len(ids) - n)
    return ids[start : start + n]


def engine_metrics(port: int) -> dict[str, float]:
    """The daemon's engine counters (Prometheus text), to report how many sessions each forward served."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    names = (
        "memoryd_engine_decode_rows_sum",
        "memoryd_engine_decode_rows_count",
        "memoryd_session_loads_total",
        "memoryd_evictions_total",
        'memoryd_engine_tick_seconds_sum{lane="decode"}',
        'memoryd_engine_tick_seconds_count{lane="decode"}',
    )
    return {n: float(line.split()[-1]) for line in text.splitlines() for n in names if line.startswith(n + " ")}


async def levels_in_rounds(
    address: str, levels: list[int], tok: object, metrics_port: int, generate_tokens: int, stagger: bool, rounds: int
) -> dict[str, dict]:
    """Every level's sessions set up first (n sessions each append a prompt), then the generate phase of
    every level in turn, `rounds` times (1, 16, 1, 16, ...: a shared machine's load changes hit every level
    alike, and the speedup compares medians over rounds), then every level's append phase."""
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.MemoryServiceStub(ch)
        sessions = {n: await set_up(stub, n, tok, stagger) for n in levels}
        runs: dict[int, list[dict]] = {n: [] for n in levels}
        for _ in tqdm(range(rounds), desc="rounds", file=sys.stderr):
            for n in levels:
                runs[n].append(await generate_phase(stub, sessions[n], metrics_port, generate_tokens))
        out = {}
        for n in levels:
            out[str(n)] = summary(runs[n]) | await append_phase(stub, sessions[n], tok)
        return out


async def set_up(stub: pb_grpc.MemoryServiceStub, n: int, tok: object, stagger: bool) -> list[str]:
    """n sessions, each appending a 200-token prompt (with `stagger`, session i's prompt is
    i * mini_batch // n tokens longer, so the sessions' test-time steps fall on different tokens)."""
    spread = (await stub.GetModel(pb.GetModelRequest())).mini_batch_size if stagger else 0
    ids = [f"serve-{n}-{i}-{time.time_ns()}" for i in range(n)]
    for sid in ids:
        await stub.CreateSession(pb.CreateSessionRequest(session_id=sid))
    await asyncio.gather(
        *(
            stub.Append(pb.AppendRequest(session_id=s, tokens=tokens_of(tok, PROMPT_TOKENS + i * spread // n, i)))
            for i, s in enumerate(ids)
        )
    )
    return ids


async def generate_phase(stub: pb_grpc.MemoryServiceStub, ids: list[str], metrics_port: int, tokens: int) -> dict:
    """All sessions generate `tokens` greedily at once (commit=false: every round starts from the same state)."""
    calls: list[float] = []
    gaps: list[float] = []
    generated = 0

    async def generate(sid: str) -> None:
        nonlocal generated
        req = pb.GenerateRequest(session_id=sid, max_tokens=tokens, temperature=0.0, commit=False)
        t0 = last = time.perf_counter()
        first = True
        async for r in stub.Generate(req):
            if r.tokens:
                now = time.perf_counter()
                if not first:
                    gaps.append(now - last)
                first, last = False, now
                generated += len(r.tokens)
        calls.append(time.perf_counter() - t0)

    before = engine_metrics(metrics_port)
    t0 = time.perf_counter()
    await asyncio.gather(*(generate(s) for s in ids))
    wall = time.perf_counter() - t0
    after = engine_metrics(metrics_port)
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    return {
        "tok_s": generated / wall,
        "wall": wall,
        "calls": calls,
        "gaps": gaps,
        "generated": generated,
        "counters": delta,
    }


def summary(runs: list[dict]) -> dict:
    """A level's generate rounds: the median round's tok/s (and each round's), latencies over all rounds,
    rows per forward and the loads and evictions during generation from the daemon's counters."""
    calls = [c for r in runs for c in r["calls"]]
    gaps = [g for r in runs for g in r["gaps"]]
    total = {k: sum(r["counters"].get(k, 0.0) for r in runs) for k in runs[0]["counters"]}
    forwards = total.get("memoryd_engine_decode_rows_count", 0.0)
    ticks = total.get('memoryd_engine_tick_seconds_count{lane="decode"}', 0.0)
    tick_s = total.get('memoryd_engine_tick_seconds_sum{lane="decode"}', 0.0)
    wall = sum(r["wall"] for r in runs)
    ms = 1000.0
    return {
        "generate_tok_s": round(statistics.median(r["tok_s"] for r in runs), 2),
        "generate_tok_s_rounds": [round(r["tok_s"], 2) for r in runs],
        "generate_p50_ms": round(statistics.median(calls) * ms, 1),
        "generate_p99_ms": round(pct(calls, 0.99) * ms, 1),
        "inter_token_p50_ms": round(statistics.median(gaps) * ms, 1) if gaps else None,
        "inter_token_p99_ms": round(pct(gaps, 0.99) * ms, 1) if gaps else None,
        "generated_tokens": runs[0]["generated"],
        "decode_rows_per_forward": round(total["memoryd_engine_decode_rows_sum"] / forwards, 2) if forwards else None,
        "decode_tick_ms": round(tick_s / ticks * ms, 1) if ticks else None,
        "wall_per_decode_tick_ms": round(wall / ticks * ms, 1) if ticks else None,
        "loads_while_generating": int(total.get("memoryd_session_loads_total", 0.0)),
        "evictions_while_generating": int(total.get("memoryd_evictions_total", 0.0)),
    }


async def append_phase(stub: pb_grpc.MemoryServiceStub, ids: list[str], tok: object) -> dict:
    """All sessions append 256 more tokens at once, then are deleted."""
    t0 = time.perf_counter()
    await asyncio.gather(
        *(
            stub.Append(pb.AppendRequest(session_id=s, tokens=tokens_of(tok, APPEND_TOKENS, 1000 + i)))
            for i, s in enumerate(ids)
        )
    )
    wall = time.perf_counter() - t0
    for sid in ids:
        await stub.DeleteSession(pb.DeleteSessionRequest(session_id=sid))
    return {"append_tok_s": round(len(ids) * APPEND_TOKENS / wall, 2)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON line (else a table)")
    p.add_argument("--checkpoint", help="a checkpoint directory (default: the daemon's default model)")
    p.add_argument("--preset", help="serve a random model of this preset instead (quick runs)")
    p.add_argument("--sessions", default="1,4,16", help="concurrent sessions per level")
    p.add_argument("--device", default="cpu", help="the daemon's --device (cuda on a GPU machine)")
    p.add_argument("--dtype", default="float32", help="the daemon's --dtype (bfloat16 on a GPU machine)")
    p.add_argument("--torch-threads", type=int, default=1, help="the daemon's torch threads")
    p.add_argument(
        "--generate-tokens",
        type=int,
        default=GENERATE_TOKENS,
        help="tokens each session generates (past about 64 - 8 a session's decode takes a test-time step)",
    )
    p.add_argument(
        "--stagger",
        action="store_true",
        help="spread the prompts' lengths over one mini-batch, so that the sessions' test-time steps during "
        "generation do not all fall on the same token (as they do with equal prompts)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="generate phases per level, levels alternating (the speedup compares the levels' median rounds)",
    )
    p.add_argument("--tick-tokens", type=int, default=0, help="the daemon's --tick-tokens (0: its default)")
    p.add_argument(
        "--memory-budget",
        type=int,
        default=0,
        help="the daemon's --memory-budget in bytes (0: every level's sessions at a full state each, plus the largest "
        "level's calls: no level evicts another's sessions, so the generate phases measure batching, not reloads; "
        "the daemon's default 2 GiB holds 17 grown sessions, and bench/overload.py measures what evicting costs)",
    )
    p.add_argument(
        "--decode-pool-bytes",
        type=int,
        default=DEFAULT_MAX_BYTES,
        help="the daemon's --decode-pool-bytes (0: attention per session), and the in-process batched decode's",
    )
    args = p.parse_args()
    levels = [int(x) for x in args.sessions.split(",")]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the daemon and Redis on SIGTERM too

    work = Path(tempfile.mkdtemp(prefix="memoryd-serve-bench-"))
    redis_proc = daemon = None
    try:
        ckpt = bench_checkpoint(args.checkpoint, args.preset, work)
        data_dir = None if ckpt else default_data_dir()  # the default model is converted there once
        served = {"checkpoint": ckpt} if ckpt is not None else {"data_dir": data_dir}
        model, path, _, _ = load_model(load_settings(served | {"dtype": args.dtype}), "cpu")  # the daemon's own rule
        tok = load_tokenizer(model.cfg, path)
        budget = args.memory_budget or (sum(levels) + max(levels)) * full_state_bytes(model)
        redis_proc, redis_port = start_redis(work)
        metrics_port = free_port()
        extra = [
            "--device",
            args.device,
            "--dtype",
            args.dtype,
            "--batch-sessions",
            str(max(levels)),
            "--metrics-port",
            str(metrics_port),
            "--memory-budget",
            str(budget),
        ]
        if args.tick_tokens:
            extra += ["--tick-tokens", str(args.tick_tokens)]
        extra += ["--decode-pool-bytes", str(args.decode_pool_bytes)]
        daemon, address = start_daemon(work, ckpt, redis_port, args.torch_threads, *extra, data_dir=data_dir)
        info = asyncio.run(model_info(address))
        context = PROMPT_TOKENS + args.generate_tokens // 2  # mid-point of the generate phase
        need = decode_bytes(model, context)
        out = {
            "device": args.device,
            "dtype": args.dtype,
            "model": {
                "name": info.name,
                "digest": info.digest,
                "window": info.window_size,
                "mini_batch": info.mini_batch_size,
            },
        }
        out["sessions"] = asyncio.run(
            levels_in_rounds(address, levels, tok, metrics_port, args.generate_tokens, args.stagger, args.rounds)
        )
        out["rounds"] = args.rounds
        torch.set_num_threads(args.torch_threads)
        out["overhead"] = asyncio.run(overhead(address, model, tok, args.generate_tokens, ROUNDS))
        if max(levels) > 1:
            out["in_process_batched"] = in_process_batched(
                model, tok, max(levels), args.generate_tokens, ROUNDS, args.decode_pool_bytes
            )
        del model
        out["generate_tokens"] = args.generate_tokens
        out["stagger"] = args.stagger
        out["decode_pool_bytes"] = args.decode_pool_bytes
        out["memory_budget"] = budget
        out["bandwidth_ceiling"] = ceiling(need, levels, context)
        if 1 in levels:
            base = out["sessions"]["1"]["generate_tok_s"]
            out["generate_speedup"] = {
                str(n): round(out["sessions"][str(n)]["generate_tok_s"] / base, 2) for n in levels
            }
            out["speedup_of_ceiling"] = {
                str(n): round(out["generate_speedup"][str(n)] / out["bandwidth_ceiling"]["speedup"][str(n)], 3)
                for n in levels
            }
            ones = out["sessions"]["1"]["generate_tok_s_rounds"]
            out["generate_speedup_rounds"] = {
                str(n): [
                    round(r / b, 2) for r, b in zip(out["sessions"][str(n)]["generate_tok_s_rounds"], ones, strict=True)
                ]
                for n in levels
            }
            if "in_process_batched" in out:
                ipb = out["in_process_batched"]
                ipb["of_ceiling"] = round(ipb["speedup"] / out["bandwidth_ceiling"]["speedup"][str(ipb["sessions"])], 3)
            out["speedup_of_ceiling_rounds"] = {
                str(n): round(
                    statistics.median(out["generate_speedup_rounds"][str(n)])
                    / out["bandwidth_ceiling"]["speedup"][str(n)],
                    3,
                )
                for n in levels
            }
        out["env"] = machine_env(args.torch_threads)
    finally:
        stop_all(daemon, redis_proc, work)
    if args.json:
        print(json.dumps(out))
    else:
        for n, r in out["sessions"].items():
            print(f"{n:>3} sessions: {r}")
    return 0


@torch.no_grad()
def in_process_gaps(state: StreamState, generate_tokens: int) -> tuple[list[float], list[int]]:
    """Greedy decode on a fork of `state` in this process: the gaps between tokens (as the daemon's
    inter-token figures: the first token's wait is not a gap) and the tokens."""
    state = state.clone()
    tokens = [int(state.logits().argmax())]
    gaps = []
    for _ in range(generate_tokens - 1):
        t0 = time.perf_counter()
        state.append([tokens[-1]])
        tokens.append(int(state.logits().argmax()))
        gaps.append(time.perf_counter() - t0)
    return gaps, tokens


async def overhead(address: str, model: torch.nn.Module, tok: object, generate_tokens: int, rounds: int) -> dict:
    """One session through the daemon against the same decode in this process, `rounds` times each,
    alternating; the same prompt and greedy, so both produce the same tokens (checked)."""
    prompt = tokens_of(tok, PROMPT_TOKENS, 0)
    state = StreamState.fresh(model)
    state.append(prompt)
    daemon: list[float] = []
    local: list[float] = []
    same = True
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.MemoryServiceStub(ch)
        sid = f"overhead-{time.time_ns()}"
        await stub.CreateSession(pb.CreateSessionRequest(session_id=sid))
        await stub.Append(pb.AppendRequest(session_id=sid, tokens=prompt))
        for _ in range(rounds):
            req = pb.GenerateRequest(session_id=sid, max_tokens=generate_tokens, temperature=0.0)
            got, last = [], None
            async for r in stub.Generate(req):
                if r.tokens:
                    now = time.perf_counter()
                    if last is not None:
                        daemon.append(now - last)
                    last = now
                    got += r.tokens
            gaps, mine = in_process_gaps(state, generate_tokens)
            local += gaps
            same = same and mine[: len(got)] == got
        await stub.DeleteSession(pb.DeleteSessionRequest(session_id=sid))
    d, p = statistics.median(daemon), statistics.median(local)
    return {
        "rounds": rounds,
        "daemon_inter_token_p50_ms": round(d * 1000, 2),
        "in_process_per_token_p50_ms": round(p * 1000, 2),
        "daemon_over_in_process": round(d / p, 3),
        "same_tokens": same,
    }


@torch.no_grad()
def in_process_batched(
    model: torch.nn.Module, tok: object, n: int, generate_tokens: int, rounds: int, pool_bytes: int
) -> dict:
    """The same greedy decode as the generate phase, in this process without the daemon: one session
    alone, and n sessions (the set-up's prompts) in lockstep through `model.batch.decode` with a decode
    pool as the daemon's decode lane keeps one (`model.pool`, at most `pool_bytes`; 0: none), alternating,
    `rounds` times each. Its speedup is what the forward alone gives; the daemon's, set against it,
    shows what serving costs on top at n sessions."""
    prompts = [tokens_of(tok, PROMPT_TOKENS, i) for i in range(n)]
    states = []
    for ids in prompts:
        s = StreamState.fresh(model)
        s.append(ids)
        states.append(s)
    per_forward: dict[int, list[float]] = {1: [], n: []}
    for r in range(rounds):
        for rows in (1, n) if r % 2 == 0 else (n, 1):
            batch = [s.clone() for s in states[:rows]]
            pool = DecodePool(model.cfg, pool_bytes) if pool_bytes else None
            tokens = [int(t) for t in logits_of(batch).argmax(-1)]
            for _ in range(generate_tokens - 1):
                t0 = time.perf_counter()
                logits = decode(batch, tokens, pool)
                per_forward[rows].append(time.perf_counter() - t0)
                tokens = [int(t) for t in logits.argmax(-1)]
    one, many = statistics.median(per_forward[1]), statistics.median(per_forward[n])
    return {
        "sessions": n,
        "rounds": rounds,
        "forward_p50_ms": {"1": round(one * 1000, 2), str(n): round(many * 1000, 2)},
        "speedup": round(n * one / many, 2),
    }


async def model_info(address: str) -> pb.ModelInfo:
    async with grpc.aio.insecure_channel(address) as ch:
        return await pb_grpc.MemoryServiceStub(ch).GetModel(pb.GetModelRequest())


def ceiling(need: DecodeBytes, levels: list[int], context: int) -> dict:
    """What batching n sessions can buy at best on a bandwidth-bound machine
    (`model.batch.DecodeBytes.ceiling`), at `context`: the generate speedup over 1 session is
    measured against this."""
    return {
        "context": context,
        "bytes_shared_per_token": need.shared,
        "bytes_per_session_per_token": need.per_session,
        "speedup": {str(n): round(need.ceiling(n), 2) for n in levels},
    }


if __name__ == "__main__":
    sys.exit(main())
