"""What a session costs (issue 17): stored bytes in Redis and hot bytes in the daemon, per session length.

Against a real daemon and a real redis-server (AOF on, fsync always), for each length n in --sizes:
1. a session is created and n tokens of English text are appended (pieces of --piece tokens);
2. `hot_bytes` is GetSession's state_bytes while it is loaded: the daemon's residency accounting
   (`StreamState.nbytes()`: what the state owns, not the model's initial fast weights it shares);
3. the daemon is stopped with SIGTERM, which snapshots every hot session (as a shutdown or an
   eviction does), and `stored_bytes` is the sum of Redis's MEMORY USAGE over every key of the
   session (head, token log tail, append ids) and of its snapshot (manifest, refs, chunks);
   `snapshot_bytes` is the snapshot's own size and `snapshot_theta` what its header says of theta;
4. the daemon is started again and every session up to --verify-max tokens is exported (so
   restored from Redis alone) and compared, every tensor bit for bit and the next-token logits,
   with a solo replay of the same tokens in this process: `bit_exact`.

`theta_difference` measures the choice the snapshot format makes (model/snapshot.py): for the
longest verified session that took steps, the fraction of fast-weight elements that differ
from the initial ones, and zlib (level 1) of the raw fast weights and of their bitwise XOR with
the initial ones, with the seconds each took: what a stored "difference" would save, and cost.
`redis` gives the whole dataset (INFO used_memory over the empty server's) and the AOF's size.

    python bench/session_bytes.py --json                            # the default model, 0/44/1K/64K tokens
    python bench/session_bytes.py --json --sizes 0,44,1024          # a few minutes
    python bench/session_bytes.py --json --preset tiny --sizes 0,44,1024

It measures and prints; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "sdk", ROOT / "bench"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import grpc  # noqa: E402
import redis  # noqa: E402
import torch  # noqa: E402
from harness import bench_checkpoint, machine_env, start_daemon, start_redis, stop_all  # noqa: E402
from memoryd_sdk.proto import memoryd_pb2 as pb  # noqa: E402
from memoryd_sdk.proto import memoryd_pb2_grpc as pb_grpc  # noqa: E402
from serve import tokens_of  # noqa: E402
from tqdm import tqdm  # noqa: E402

from memoryd.api.auth import DEFAULT_TENANT  # noqa: E402
from memoryd.server import load_model  # noqa: E402
from memoryd.settings import default_data_dir, load_settings  # noqa: E402
from memoryd.store.layout import Layout  # noqa: E402
from model import StreamState, state_from_bytes  # noqa: E402
from model.snapshot import read_metadata  # noqa: E402
from model.state import initial_theta  # noqa: E402
from model.tokenizer import load_tokenizer  # noqa: E402

LAYOUT = Layout()
"""The store's keys (docs/service.md, "The Redis layout")."""
RECALL = f"{LAYOUT.prefix}:rx:{{{DEFAULT_TENANT}}}"
"""The recall log's keys of the default tenant (memoryd/sessions/recall/pages.py): `tip:{sid}`,
`tail:{sid}`, and the sealed pages `p:{pid}` its tip's chain reaches."""


def text_tokens(tok: object, n: int) -> list[int]:
    """n tokens of the serving bench's English text, repeated as often as it takes (its own
    helper may return fewer than asked for: it sizes the text at 4 characters a token)."""
    ids = tokens_of(tok, n, 0)
    while len(ids) < n:
        ids += ids
    return ids[:n]


def sid_of(n: int) -> str:
    return f"bytes-{n}"


def append_all(stub: pb_grpc.MemoryServiceStub, sid: str, ids: list[int], piece: int, bar: tqdm) -> None:
    offset = 0
    for i in range(0, len(ids), piece):
        chunk = ids[i : i + piece]
        req = pb.AppendRequest(session_id=sid, tokens=chunk, expected_offset=offset, append_id=f"p{i}")
        offset = stub.Append(req, timeout=3600).offset
        bar.update(len(chunk))


def redis_bytes(r: redis.Redis, sid: str) -> dict:
    """MEMORY USAGE (exact: SAMPLES 0) of the session's keys, its snapshot's and its recall log's."""

    def usage(*keys: str) -> int:
        return sum(int(r.memory_usage(k, samples=0) or 0) for k in keys)

    head = r.hgetall(LAYOUT.head(DEFAULT_TENANT, sid))
    snap = (head.get(b"snap") or b"").decode()
    session = usage(*(k.decode() for k in r.scan_iter(LAYOUT.session(DEFAULT_TENANT, sid, "*"))))
    snapshot = size = 0
    if snap:
        snapshot = usage(*(k.decode() for k in r.scan_iter(LAYOUT.snap(snap, "*"))))
        size = int(json.loads(r.get(LAYOUT.snap(snap, "m")))["size"])
    recall = usage(f"{RECALL}:tip:{sid}", f"{RECALL}:tail:{sid}")
    page = (r.hget(f"{RECALL}:tip:{sid}", "base") or b"").decode()
    while page:
        recall += usage(f"{RECALL}:p:{page}")
        page = (r.hget(f"{RECALL}:p:{page}", "prev") or b"").decode()
    return {
        "stored_bytes": session + snapshot + recall,
        "session_keys_bytes": session,
        "snapshot_keys_bytes": snapshot,
        "recall_keys_bytes": recall,
        "snapshot_bytes": size,
        "log_entries": int(r.llen(LAYOUT.log(DEFAULT_TENANT, sid))),
        "snapshot_position": int(head.get(b"snap_off") or 0),
    }


def export(stub: pb_grpc.MemoryServiceStub, sid: str) -> bytes:
    chunks = list(stub.ExportSession(pb.ExportSessionRequest(session_id=sid), timeout=600))
    return b"".join(c.data for c in chunks[1:])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def differences(got: StreamState, want: StreamState) -> list[str]:
    """What differs between two states, bit for bit (empty: they are the same state)."""
    if (got.position, got.steps) != (want.position, want.steps):
        return [f"position/steps {got.position}/{got.steps} != {want.position}/{want.steps}"]
    tg, tw = got.tensors(), want.tensors()
    out = sorted(set(tg) ^ set(tw)) + [k for k in sorted(set(tg) & set(tw)) if not same_bits(tg[k], tw[k])]
    if got.position and not same_bits(got.logits(), want.logits()):
        out.append("logits")
    return out


def theta_difference(model, state: StreamState) -> dict:
    init = initial_theta(model)
    changed = total = 0
    raw, xor = [], []
    for k, v in state.fast.items():
        a = v.detach().cpu().contiguous().view(torch.int32)
        b = init[k].detach().cpu().contiguous().view(torch.int32)
        changed += int((a != b).sum())
        total += a.numel()
        raw.append(a.numpy().tobytes())
        xor.append((a ^ b).numpy().tobytes())
    out = {"steps": state.steps, "theta_bytes": sum(map(len, raw)), "changed_fraction": round(changed / total, 4)}
    for name, parts in (("raw", raw), ("xor_initial", xor)):
        t0 = time.perf_counter()
        n = sum(len(zlib.compress(p, 1)) for p in parts)
        out[f"zlib1_{name}_bytes"] = n
        out[f"zlib1_{name}_seconds"] = round(time.perf_counter() - t0, 2)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON line (else a table)")
    p.add_argument("--checkpoint", help="a checkpoint directory (default: the daemon's default model)")
    p.add_argument("--preset", help="serve a random model of this preset instead (quick runs)")
    p.add_argument("--sizes", default="0,44,1024,65536", help="session lengths in tokens")
    p.add_argument("--piece", type=int, default=4096, help="tokens per Append call")
    p.add_argument("--verify-max", type=int, default=1024, help="replay sessions up to this length in-process")
    p.add_argument("--torch-threads", type=int, default=1, help="the daemon's (and this process's) torch threads")
    args = p.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    torch.set_num_threads(args.torch_threads)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    work = Path(tempfile.mkdtemp(prefix="memoryd-bytes-bench-"))
    redis_proc = daemon = None
    try:
        ckpt = bench_checkpoint(args.checkpoint, args.preset, work)
        data_dir = None if ckpt else default_data_dir()  # the default model is converted there once
        served = {"checkpoint": ckpt} if ckpt is not None else {"data_dir": data_dir}
        model, path, name, adapter = load_model(load_settings(served), "cpu")  # the daemon's own rule
        model.requires_grad_(False)
        tok = load_tokenizer(model.cfg, path)
        ids = text_tokens(tok, max(sizes))

        redis_proc, port = start_redis(work)
        r = redis.Redis(port=port)
        base_memory = int(r.info("memory")["used_memory"])
        budget = ["--memory-budget", str(64 * 1024**3)]  # nothing evicted while measuring hot bytes
        daemon, address = start_daemon(work, ckpt, port, args.torch_threads, *budget, data_dir=data_dir)
        sessions: dict[str, dict] = {}
        with grpc.insecure_channel(address) as ch:
            stub = pb_grpc.MemoryServiceStub(ch)
            with tqdm(total=sum(sizes), desc="tokens appended", unit="tok", file=sys.stderr) as bar:
                for n in sizes:
                    stub.CreateSession(pb.CreateSessionRequest(session_id=sid_of(n)), timeout=60)
                    t0 = time.perf_counter()
                    append_all(stub, sid_of(n), ids[:n], args.piece, bar)
                    g = stub.GetSession(pb.GetSessionRequest(session_id=sid_of(n)), timeout=60)
                    sessions[str(n)] = {
                        "tokens": g.offset,
                        "steps": g.steps,
                        "pending": g.pending_tokens,
                        "hot_bytes": g.state_bytes,
                        "append_seconds": round(time.perf_counter() - t0, 1),
                    }
        daemon.send_signal(signal.SIGTERM)  # snapshots every hot session, as a shutdown does
        daemon.wait(600)
        daemon = None
        for n in sizes:
            sessions[str(n)] |= redis_bytes(r, sid_of(n))
        used = int(r.info("memory")["used_memory"]) - base_memory
        aof = sum(f.stat().st_size for f in work.glob("appendonly*") if f.is_file())

        daemon, address = start_daemon(work, ckpt, port, args.torch_threads, *budget, data_dir=data_dir)
        longest_stepped: StreamState | None = None
        with grpc.insecure_channel(address) as ch:
            stub = pb_grpc.MemoryServiceStub(ch)
            for n in tqdm([n for n in sizes if n <= args.verify_max], desc="verified", file=sys.stderr):
                data = export(stub, sid_of(n))
                got = state_from_bytes(model, data)
                want = StreamState.fresh(model)
                for i in range(0, n, args.piece):  # the pieces the daemon read
                    want.append(ids[i : min(i + args.piece, n)])
                rec = sessions[str(n)]
                rec["export_theta"] = read_metadata(data).get("theta", "stored")
                rec["export_bytes"] = len(data)
                g = stub.GetSession(pb.GetSessionRequest(session_id=sid_of(n)))
                rec["hot_bytes_restored"], rec["stored_bytes_reported"] = g.state_bytes, g.stored_bytes
                diff = differences(got, want)
                rec["bit_exact"] = not diff
                if diff:
                    rec["differs"] = diff
                if want.steps:
                    longest_stepped = want
        out = {
            "model": {
                "name": name,
                "adapter": adapter,
                "window": model.cfg.window_size,
                "mini_batch": model.cfg.mini_batch_size,
                "theta_bytes": sum(t.nbytes for t in initial_theta(model).values()),
            },
            "sessions": sessions,
            "redis": {"dataset_bytes": used, "aof_bytes": aof},
            "theta_difference": theta_difference(model, longest_stepped) if longest_stepped is not None else None,
            "env": machine_env(args.torch_threads),
        }
    finally:
        stop_all(daemon, redis_proc, work)
    if args.json:
        print(json.dumps(out))
    else:
        for n, rec in out["sessions"].items():
            print(f"{n:>6} tokens: {rec}")
        print(json.dumps({k: v for k, v in out.items() if k != "sessions"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
