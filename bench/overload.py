"""More sessions than fit (issue 20): fairness, deadlines and memory under a small budget.

One daemon on a random `small` checkpoint (about 13 MB of state per session) with
`--memory-budget 64MiB` (about five sessions at rest), `--threads` client threads, each on
its own session, for `--duration` seconds: each call appends 20-200 tokens with an
`append_id` and `expected_offset`, and every third call is a greedy 8-token dry-run
generation.  Calls carry a 30 s deadline (the SDK's default) and are retried as the SDK
does: UNAVAILABLE and DEADLINE_EXCEEDED with the same append_id, RESOURCE_EXHAUSTED after
the daemon's retry hint.  `--model default` runs the default model instead (32 sessions,
a budget of four of them).

At the end: every session's offset against the tokens acknowledged (lost / duplicated),
`--verify` sessions' exported state against a solo in-process replay of their tokens
(bit-exact), the daemon's log per call type (p50 / p99 / max, codes), refusals by code,
leases lost, and the daemon's RSS over time (/proc/PID/status, every 2 s).

    .venv/bin/python bench/overload.py --duration 120 --json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]

import grpc  # noqa: E402
import torch  # noqa: E402
from harness import pct, start_daemon, start_redis, stop_all  # noqa: E402
from memoryd_sdk.proto import memoryd_pb2 as pb  # noqa: E402
from memoryd_sdk.proto import memoryd_pb2_grpc as pb_grpc  # noqa: E402
from tqdm import tqdm  # noqa: E402

from memoryd.server import load_model  # noqa: E402
from memoryd.settings import default_data_dir, load_settings  # noqa: E402
from model import StreamState, init_model, preset, save_checkpoint, state_from_bytes  # noqa: E402

DEADLINE = 30.0
"""Seconds per attempt, the SDK's default `timeout`."""


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class Client:
    """One thread's session and what it has been told."""

    def __init__(self, stub: pb_grpc.MemoryServiceStub, sid: str, vocab: int, seed: int) -> None:
        self.stub, self.sid, self.vocab = stub, sid, vocab
        self.rng = random.Random(seed)
        self.offset = 0
        self.pieces: list[list[int]] = []
        self.calls: list[tuple[str, float, str]] = []
        """(kind, seconds, final code) per call, retries included in its seconds."""
        self.refusals: Counter[str] = Counter()
        self.retries: Counter[str] = Counter()
        self.duplicates = 0

    def _retrying(self, kind: str, fn: Any) -> tuple[Any, str]:
        start = time.monotonic()
        while True:
            try:
                return fn(), "OK"
            except grpc.RpcError as e:
                code = e.code()
                hint = dict(e.trailing_metadata() or ()).get("memoryd-retry-after-ms")
                if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
                    self.refusals[code.name] += 1
                    if hint is None:
                        return None, code.name
                    time.sleep(int(hint) / 1000 * (1 + 0.2 * self.rng.random()))
                elif code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                    self.refusals[code.name] += 1
                    if time.monotonic() - start > 300:
                        return None, code.name
                    time.sleep(0.1)
                else:
                    return None, code.name
                self.retries[kind] += 1

    def append(self) -> None:
        toks = [self.rng.randrange(0, self.vocab) for _ in range(self.rng.randint(20, 200))]
        aid = f"{self.sid}-{len(self.pieces)}-{self.rng.getrandbits(32):08x}"
        req = pb.AppendRequest(session_id=self.sid, tokens=toks, append_id=aid, expected_offset=self.offset)
        t0 = time.monotonic()
        resp, code = self._retrying("append", lambda: self.stub.Append(req, timeout=DEADLINE))
        self.calls.append(("append", time.monotonic() - t0, code))
        if resp is not None:
            if resp.duplicate:
                self.duplicates += 1
            assert resp.start_offset == self.offset, (self.sid, resp.start_offset, self.offset)
            self.offset = resp.offset
            self.pieces.append(toks)

    def generate(self) -> None:
        req = pb.GenerateRequest(session_id=self.sid, max_tokens=8, temperature=0.0)
        t0 = time.monotonic()
        _, code = self._retrying("generate", lambda: list(self.stub.Generate(req, timeout=DEADLINE)))
        self.calls.append(("generate", time.monotonic() - t0, code))


def daemon_calls(log: Path) -> dict[str, Any]:
    by: dict[str, list[float]] = defaultdict(list)
    codes: dict[str, Counter[str]] = defaultdict(Counter)
    lost = 0
    for line in log.read_text().splitlines():
        lost += "lost the lease" in line
        if not line.startswith("{"):
            continue
        rec = json.loads(line)
        if rec.get("call") in ("Append", "Generate"):
            codes[rec["call"]][rec["code"]] += 1
            if rec["code"] == "OK":
                by[rec["call"]].append(rec["ms"] / 1000)
    out: dict[str, Any] = {
        m: {
            "n": len(xs),
            "p50_s": round(pct(xs, 0.5), 3),
            "p99_s": round(pct(xs, 0.99), 3),
            "max_s": round(max(xs), 3),
            "codes": dict(codes[m]),
        }
        for m, xs in by.items()
        if xs
    }
    out["leases_lost"] = lost
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=300.0, help="seconds of load (the issue ran 300)")
    ap.add_argument("--threads", type=int, default=None, help="client threads, one session each (64; default: 32)")
    ap.add_argument("--budget", default=None, help="--memory-budget (64MiB; default model: four sessions' worth)")
    ap.add_argument("--model", choices=["small", "default"], default="small")
    ap.add_argument("--verify", type=int, default=2, help="sessions whose state is checked against a solo replay")
    ap.add_argument("--daemon-arg", action="append", default=[], help="extra `memoryd serve` flag (repeatable)")
    ap.add_argument("--keep-log", type=Path, default=None, help="copy the daemon's log here at the end")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    threads = args.threads or (64 if args.model == "small" else 32)
    work = Path(tempfile.mkdtemp(prefix="memoryd-overload-"))
    ckpt = None
    if args.model == "small":
        ckpt = work / "small"
        save_checkpoint(init_model(preset("small"), seed=0), ckpt)
    data_dir = default_data_dir() if args.model == "default" else None
    model, *_ = load_model(load_settings({"checkpoint": ckpt, "data_dir": data_dir or work}), "cpu")
    state_bytes = StreamState.fresh(model).nbytes()
    budget = args.budget or ("64MiB" if args.model == "small" else str(4 * 2 * state_bytes))
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    redis_proc, port = start_redis(work)
    daemon = None
    try:
        extra = ["--memory-budget", budget, *args.daemon_arg]
        daemon, address = start_daemon(work, ckpt, port, 1, *extra, "--log-level", "INFO", data_dir=data_dir)
        channel = grpc.insecure_channel(address)
        stub = pb_grpc.MemoryServiceStub(channel)
        clients = []
        for i in range(threads):
            sid = f"soak-{i}"
            stub.CreateSession(pb.CreateSessionRequest(session_id=sid), timeout=60)
            clients.append(Client(stub, sid, model.cfg.vocab_size, i))
        rss: list[tuple[float, float]] = []
        stop = threading.Event()
        t_start = time.monotonic()

        def sample() -> None:
            while not stop.is_set():
                rss.append((round(time.monotonic() - t_start, 1), round(rss_mb(daemon.pid), 1)))
                stop.wait(2.0)

        def run(c: Client) -> None:
            n = 0
            while time.monotonic() - t_start < args.duration:
                c.generate() if n % 3 == 2 else c.append()
                n += 1

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        workers = [threading.Thread(target=run, args=(c,)) for c in clients]
        for w in workers:
            w.start()
        with tqdm(total=int(args.duration), desc="load", unit="s") as bar:
            while any(w.is_alive() for w in workers):
                time.sleep(1)
                bar.n = min(int(args.duration), int(time.monotonic() - t_start))
                bar.refresh()
        wall = time.monotonic() - t_start
        stop.set()
        # lost / duplicated: each session's offset against the tokens it was told landed
        lost = dup = 0
        for c in clients:
            got = stub.GetSession(pb.GetSessionRequest(session_id=c.sid), timeout=120).offset
            lost += max(0, c.offset - got)
            dup += max(0, got - c.offset)
        exact = []
        for c in tqdm(clients[: args.verify], desc="solo replays"):
            chunks = list(stub.ExportSession(pb.ExportSessionRequest(session_id=c.sid), timeout=300))
            served = state_from_bytes(model, b"".join(x.data for x in chunks[1:])).tensors()
            solo = StreamState.fresh(model)
            for p in c.pieces:
                solo.append(p)
            ref = solo.tensors()
            exact.append(sorted(served) == sorted(ref) and all(torch.equal(served[k], ref[k]) for k in ref))
        channel.close()
        calls = [x for c in clients for x in c.calls]
        client_side = {}
        for kind in ("append", "generate"):
            xs = [s for k, s, code in calls if k == kind and code == "OK"]
            if xs:
                client_side[kind] = {
                    "n": len(xs),
                    "p50_s": round(pct(xs, 0.5), 3),
                    "p99_s": round(pct(xs, 0.99), 3),
                    "max_s": round(max(xs), 3),
                    "failed": sum(1 for k, _, code in calls if k == kind and code != "OK"),
                }
        refusals: Counter[str] = Counter()
        retries: Counter[str] = Counter()
        for c in clients:
            refusals.update(c.refusals)
            retries.update(c.retries)
        mib = 1024**2
        out = {
            "model": args.model,
            "threads": threads,
            "duration_s": round(wall, 1),
            "memory_budget": budget,
            "state_bytes": state_bytes,
            "model_bytes": model_bytes,
            "daemon_args": extra,
            "tokens_acknowledged": sum(c.offset for c in clients),
            "calls": len(calls),
            "client_side": client_side,
            "daemon_log": daemon_calls(work / "memoryd.log"),
            "refusals_seen_by_clients": dict(refusals),
            "retries": dict(retries),
            "duplicate_answers": sum(c.duplicates for c in clients),
            "lost_tokens": lost,
            "duplicated_tokens": dup,
            "states_exact": exact,
            "rss_mb": {
                "max": max(m for _, m in rss),
                "last": rss[-1][1],
                "limit_model_budget_1GiB": round((model_bytes + parse_budget(budget)) / mib + 1024, 1),
                "series": rss[:: max(1, len(rss) // 30)],
            },
        }
    finally:
        if daemon is not None:
            daemon.send_signal(2)
            daemon.wait(60)
        if args.keep_log is not None and (work / "memoryd.log").exists():
            args.keep_log.write_bytes((work / "memoryd.log").read_bytes())
        stop_all(None, redis_proc, work)
    print(json.dumps(out, indent=None if args.json else 2))


def parse_budget(text: str) -> int:
    from memoryd.settings import parse_bytes

    return parse_bytes(text)


if __name__ == "__main__":
    main()
