"""Benchmark of the memoryd service (issue 3, item 8); a benchmark, not a test.

Starts its own redis-server (AOF on, fsync always, as the daemon's embedded one) and a
`memoryd serve` subprocess, then measures:

- append throughput (tokens/s) and p50/p99 latency with 1, 8 and 32 sessions appending
  concurrently (one client task per session, each waiting for its previous append);
- snapshot bytes per session (a session whose attention window is full);
- snapshot save and load time through the store (chunks + manifest + compare-and-set
  publish; read + checksums) against a raw Redis SET/GET of the same bytes, in one run.

    python bench/service.py --json                    # small preset, as `memoryd serve` defaults to
    python bench/service.py --json --preset tiny      # quick
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "sdk"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import grpc  # noqa: E402
import redis.asyncio as aioredis  # noqa: E402
import torch  # noqa: E402
from harness import pct, start_daemon, start_redis, stop_all  # noqa: E402
from memoryd_sdk.proto import memoryd_pb2 as pb  # noqa: E402
from memoryd_sdk.proto import memoryd_pb2_grpc as pb_grpc  # noqa: E402

from memoryd.store import heads, leases, snapshots  # noqa: E402
from memoryd.store.db import Store  # noqa: E402
from memoryd.store.results import Ok  # noqa: E402
from model import StreamState, digest_of, init_model, load_checkpoint, preset, save_checkpoint  # noqa: E402
from model.snapshot import state_from_bytes, state_to_bytes  # noqa: E402


async def bench_appends(address: str, sessions: int, appends: int, piece: int, vocab: int) -> dict:
    """Each session's client appends `appends` pieces of `piece` tokens, one after another."""
    rng = random.Random(sessions)
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.MemoryServiceStub(ch)
        ids = [f"bench-{sessions}-{i}-{time.time_ns()}" for i in range(sessions)]
        for sid in ids:
            await stub.CreateSession(pb.CreateSessionRequest(session_id=sid))
        # warm-up: one append per session (first load, first kernels)
        for sid in ids:
            await stub.Append(pb.AppendRequest(session_id=sid, tokens=[rng.randrange(vocab) for _ in range(piece)]))
        lat: list[float] = []

        async def client(sid: str) -> None:
            for _ in range(appends):
                toks = [rng.randrange(vocab) for _ in range(piece)]
                t0 = time.perf_counter()
                await stub.Append(pb.AppendRequest(session_id=sid, tokens=toks))
                lat.append(time.perf_counter() - t0)

        t0 = time.perf_counter()
        await asyncio.gather(*(client(s) for s in ids))
        wall = time.perf_counter() - t0
        for sid in ids:
            await stub.DeleteSession(pb.DeleteSessionRequest(session_id=sid))
    return {
        "sessions": sessions,
        "appends": len(lat),
        "piece_tokens": piece,
        "tokens_per_s": round(len(lat) * piece / wall, 1),
        "appends_per_s": round(len(lat) / wall, 2),
        "p50_ms": round(1000 * pct(lat, 0.5), 2),
        "p99_ms": round(1000 * pct(lat, 0.99), 2),
    }


async def bench_snapshots(model, redis_port: int, fill_tokens: int, repeats: int) -> dict:
    """Store save/load of one full session state vs a raw SET/GET of the same bytes."""
    state = StreamState.fresh(model)
    g = torch.Generator().manual_seed(0)
    state.append(torch.randint(0, model.cfg.vocab_size, (fill_tokens,), generator=g).tolist())
    t0 = time.perf_counter()
    data = state_to_bytes(state)
    ser = time.perf_counter() - t0
    t0 = time.perf_counter()
    state_from_bytes(model, data)
    de = time.perf_counter() - t0

    r = aioredis.Redis(port=redis_port)
    store = Store(r, prefix="bench", ttl_seconds=0)
    digest = digest_of(model)
    await heads.create(store, "bench", "snap", {}, digest)
    fence = (await leases.acquire(store, "bench", "snap", "bench", 60)).fence
    save, load, raw_set, raw_get = [], [], [], []
    for i in range(repeats):
        t0 = time.perf_counter()
        snap = await snapshots.write(store, data, digest, state.position)
        code = await snapshots.publish(store, "bench", "snap", fence, 0, snap, 0)
        save.append(time.perf_counter() - t0)
        assert isinstance(code, Ok), code
        t0 = time.perf_counter()
        back = await snapshots.read(store, snap)
        load.append(time.perf_counter() - t0)
        assert back == data
        t0 = time.perf_counter()
        await r.set(f"bench:raw:{i}", data)
        raw_set.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        assert await r.get(f"bench:raw:{i}") == data
        raw_get.append(time.perf_counter() - t0)
        await r.delete(f"bench:raw:{i}")
    await heads.delete(store, "bench", "snap")
    await r.aclose()
    ms = lambda xs: round(1000 * statistics.median(xs), 3)
    return {
        "state_tokens": state.position,
        "snapshot_bytes_per_session": len(data),
        "state_nbytes": state.nbytes(),
        "chunks": -(-len(data) // store.chunk_bytes),
        "serialize_ms": round(1000 * ser, 3),
        "deserialize_ms": round(1000 * de, 3),
        "store_save_ms": ms(save),
        "store_load_ms": ms(load),
        "raw_set_ms": ms(raw_set),
        "raw_get_ms": ms(raw_get),
        "repeats": repeats,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object (else a short summary)")
    p.add_argument("--preset", default="small", help="model preset when no --checkpoint is given")
    p.add_argument("--checkpoint", help="a checkpoint directory to serve instead of a random preset")
    p.add_argument("--levels", default="1,8,32", help="concurrent sessions to measure")
    p.add_argument("--appends", type=int, default=12, help="appends per session per level")
    p.add_argument("--piece-tokens", type=int, default=64, help="tokens per append")
    p.add_argument("--torch-threads", type=int, default=1, help="daemon's torch threads (0: torch default)")
    p.add_argument("--snapshot-repeats", type=int, default=5)
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="memoryd-bench-"))
    redis_proc = daemon = None
    try:
        if args.checkpoint:
            ckpt = Path(args.checkpoint)
        else:
            ckpt = work / "ckpt"
            save_checkpoint(init_model(preset(args.preset), seed=0), ckpt)
        model = load_checkpoint(ckpt)
        redis_proc, redis_port = start_redis(work)
        daemon, address = start_daemon(work, ckpt, redis_port, args.torch_threads)
        levels = [
            asyncio.run(bench_appends(address, int(n), args.appends, args.piece_tokens, model.cfg.vocab_size))
            for n in args.levels.split(",")
        ]
        window = model.cfg.window_size or 4 * model.cfg.mini_batch_size
        fill = window + model.cfg.mini_batch_size // 2
        snaps = asyncio.run(bench_snapshots(model, redis_port, fill, args.snapshot_repeats))
        out = {
            "model": {
                "checkpoint": args.checkpoint or f"random preset {args.preset}",
                "digest": digest_of(model),
                "mini_batch_size": model.cfg.mini_batch_size,
                "window_size": model.cfg.window_size,
            },
            "append": levels,
            "snapshot": snaps,
            "env": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "torch": torch.__version__,
                "redis_fsync": "always",
                "daemon_torch_threads": args.torch_threads,
            },
        }
    finally:
        stop_all(daemon, redis_proc, work)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        for lv in out["append"]:
            n, tps = lv["sessions"], lv["tokens_per_s"]
            print(f"{n:>3} sessions: {tps:>9} tok/s  p50 {lv['p50_ms']} ms  p99 {lv['p99_ms']} ms")
        s = out["snapshot"]
        print(f"snapshot {s['snapshot_bytes_per_session']} B: save {s['store_save_ms']} ms (raw SET {s['raw_set_ms']})")
        print(f"load {s['store_load_ms']} ms (raw GET {s['raw_get_ms']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
