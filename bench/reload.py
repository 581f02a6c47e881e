"""Reloading a session after kill -9: what it costs, against what it should cost (issue 20).

Builds a session the way an agent does (appends of 100-300 tokens, and committed
generations, whose tokens the log holds one per piece) to `--tokens` tokens with the
daemon's default snapshot interval, kills the daemon with SIGKILL, restarts it and times
the first GetSession (snapshot read + replay of the log since the snapshot).  Just before
the kill and just after the load, in this process, with the same model: the reference a
load should cost, reading the same snapshot from Redis and deserializing it, plus
appending the tokens since it in one call (the ratio uses the mean of the two: timings
drift on a shared machine); and, for the record, the replay as it was before issue 20
(piece by piece).

    .venv/bin/python bench/reload.py --json          # default model (converted once)
    .venv/bin/python bench/reload.py --small --json  # the random `small` preset, quick

Prints JSON: load_seconds, reference_seconds (read_seconds + tail_append_seconds), ratio,
and the piece-by-piece replay for comparison.  Timings are this machine's (OMP 1 thread).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

import grpc  # noqa: E402
import torch  # noqa: E402
from harness import start_daemon, start_redis, stop_all  # noqa: E402
from memoryd_sdk.proto import memoryd_pb2 as pb  # noqa: E402
from memoryd_sdk.proto import memoryd_pb2_grpc as pb_grpc  # noqa: E402
from tqdm import tqdm  # noqa: E402

from memoryd.server import load_model  # noqa: E402
from memoryd.settings import default_data_dir, load_settings  # noqa: E402
from memoryd.store import heads, snapshots, tokenlog  # noqa: E402
from memoryd.store.db import Store  # noqa: E402
from memoryd.store.redis_client import connect  # noqa: E402
from model import StreamState, init_model, preset, save_checkpoint, state_from_bytes  # noqa: E402


def build(stub: pb_grpc.MemoryServiceStub, sid: str, target: int, vocab: int, rng: random.Random) -> int:
    stub.CreateSession(pb.CreateSessionRequest(session_id=sid), timeout=60)
    offset, i = 0, 0
    with tqdm(total=target, desc="building the session", unit="tok") as bar:
        while offset < target:
            if i % 4 == 3:  # a committed generation: its tokens land in the log one per piece
                r = pb.GenerateRequest(session_id=sid, max_tokens=12, commit=True, append_id=f"g{i}")
                last = list(stub.Generate(r, timeout=600))[-1]
                new = last.offset
            else:
                toks = [rng.randrange(3, vocab) for _ in range(min(rng.randint(100, 300), target - offset))]
                new = stub.Append(pb.AppendRequest(session_id=sid, tokens=toks, append_id=f"a{i}"), timeout=600).offset
            bar.update(new - offset)
            offset, i = new, i + 1
    return offset


async def reference(url: str, model: torch.nn.Module, sid: str) -> dict[str, float | int]:
    store = Store(connect(url, 30))
    head = await heads.read(store, "default", sid)
    assert head is not None
    t0 = time.perf_counter()
    data = await snapshots.read(store, head.snap) if head.snap else None
    t1 = time.perf_counter()
    state = state_from_bytes(model, data) if data is not None else StreamState.fresh(model)
    t2 = time.perf_counter()
    pieces = await tokenlog.read(store, "default", sid, head.snap_off, head.offset)
    tail = [t for p in pieces for t in p]
    t3 = time.perf_counter()
    if tail:
        state.append(tail)
    t4 = time.perf_counter()
    again = state_from_bytes(model, data) if data is not None else StreamState.fresh(model)
    t5 = time.perf_counter()
    for p in tqdm(pieces, desc="piece-by-piece replay (before)", unit="piece"):
        again.append(p)
    t6 = time.perf_counter()
    await store.r.aclose()
    return {
        "offset": head.offset,
        "snapshot_offset": head.snap_off,
        "snapshot_bytes": len(data or b""),
        "tail_tokens": len(tail),
        "tail_pieces": len(pieces),
        "redis_read_seconds": round(t1 - t0, 3),
        "deserialize_seconds": round(t2 - t1, 3),
        "read_seconds": round(t2 - t0, 3),
        "tail_append_seconds": round(t4 - t3, 3),
        "piece_by_piece_replay_seconds": round(t6 - t5, 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=4150, help="session length (the issue's: 4,153)")
    ap.add_argument("--small", action="store_true", help="the random `small` preset instead of the default model")
    ap.add_argument("--daemon-arg", action="append", default=[], help="extra `memoryd serve` flag (repeatable)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="memoryd-reload-"))
    ckpt = None
    if args.small:
        ckpt = work / "small"
        save_checkpoint(init_model(preset("small"), seed=0), ckpt)
    redis_proc, port = start_redis(work)
    url = f"redis://127.0.0.1:{port}/0"
    data_dir = None if args.small else default_data_dir()
    daemon = None
    try:
        daemon, address = start_daemon(work, ckpt, port, 1, "--log-level", "INFO", *args.daemon_arg, data_dir=data_dir)
        model, *_ = load_model(load_settings({"checkpoint": ckpt, "data_dir": data_dir or work}), "cpu")
        vocab = model.cfg.vocab_size
        with grpc.insecure_channel(address) as ch:
            offset = build(pb_grpc.MemoryServiceStub(ch), "reload", args.tokens, vocab, random.Random(0))
        before = asyncio.run(reference(url, model, "reload"))  # the same work in this process, just before
        daemon.send_signal(signal.SIGKILL)
        daemon.wait(30)
        t0 = time.perf_counter()
        daemon, address = start_daemon(
            work, ckpt, port, 1, "--log-level", "INFO", *args.daemon_arg, data_dir=data_dir, address=address
        )
        restart = time.perf_counter() - t0
        with grpc.insecure_channel(address) as ch:
            t0 = time.perf_counter()
            info = pb_grpc.MemoryServiceStub(ch).GetSession(pb.GetSessionRequest(session_id="reload"), timeout=600)
            load = time.perf_counter() - t0
        assert info.offset == offset and info.hot
        loaded = [json.loads(x) for x in (work / "memoryd.log").read_text().splitlines() if '"event": "loaded"' in x]
        ref = asyncio.run(reference(url, model, "reload"))  # and just after (timings drift on a shared machine)
        bases = [r["read_seconds"] + r["tail_append_seconds"] for r in (before, ref)]
        base = sum(bases) / 2
        out = {
            "model": "small (random)" if args.small else "default",
            "daemon_args": args.daemon_arg,
            "restart_seconds": round(restart, 2),
            "load_seconds": round(load, 3),
            "reference_seconds": round(base, 3),
            "reference_before_after": [round(b, 3) for b in bases],
            "ratio": round(load / base, 2),
            "daemon_load": {k: loaded[-1][k] for k in ("read_s", "wait_s", "build_s", "replayed")},
            **ref,
            "piece_by_piece_ratio": round((ref["read_seconds"] + ref["piece_by_piece_replay_seconds"]) / base, 2),
        }
    finally:
        stop_all(daemon, redis_proc, work)
    print(json.dumps(out, indent=None if args.json else 2))


if __name__ == "__main__":
    main()
