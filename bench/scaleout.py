"""Several daemons, one Redis, one killed mid-run (issue 12, "Must show" 2); a benchmark, not a test.

Starts a redis-server (AOF, fsync always) and three `memoryd serve` on a tiny model with
short leases, then for `--seconds`:

- 24 sessions, each appended to by its own task through the SDK given all three
  addresses (routes each session to its holder, follows `memoryd-holder` hints);
- one plain gRPC client pinned to one daemon that ignores hints, appending to a session
  the SDK also appends to (its calls are forwarded to the holder);
- after `--kill-after` seconds, kill -9 of the daemon holding the shared session (the
  plain client's daemon stays up).

Then every session is checked: the acknowledged appends tile the log from 0 to its
offset, and its exported state is bit for bit a fresh state fed those pieces in order.

    python bench/scaleout.py --json

Prints one JSON line: acked, lost, duplicated, handovers_per_1000 (lease acquisitions
beyond each session's first, per 1000 acknowledged calls; read from the heads' fencing
tokens), max_wait_ms (longest single call, retries included), tok_s, failover_s (kill
to the first acknowledged call of each session the killed daemon held; the largest),
lease_seconds; plain_acked against shared_sdk_acked shows the two clients of one session
taking turns.  `--cluster`: the same on a Redis Cluster of three masters and three
replicas on loopback (tests/cluster_fixtures.py) instead of one Redis.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "sdk"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import grpc  # noqa: E402
import torch  # noqa: E402
from harness import start_daemon, start_redis  # noqa: E402
from memoryd_sdk import AsyncMemoryClient, RetryPolicy  # noqa: E402
from memoryd_sdk.proto import memoryd_pb2 as pb  # noqa: E402
from memoryd_sdk.proto import memoryd_pb2_grpc as pb_grpc  # noqa: E402
from tqdm import tqdm  # noqa: E402

from memoryd.store import heads  # noqa: E402
from memoryd.store.db import Store  # noqa: E402
from memoryd.store.redis_client import connect  # noqa: E402
from model import StreamState, init_model, preset, save_checkpoint  # noqa: E402
from model.snapshot import state_from_bytes  # noqa: E402

RETRY = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


@dataclass
class Ack:
    start: int
    end: int
    tokens: list[int]
    who: str


@dataclass
class Run:
    acks: dict[str, list[Ack]] = field(default_factory=dict)
    waits: list[float] = field(default_factory=list)
    plain_waits: list[float] = field(default_factory=list)
    done_at: dict[str, list[float]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


async def sdk_client(client: AsyncMemoryClient, sid: str, run: Run, stop: asyncio.Event, rng: random.Random) -> None:
    n = 0
    while not stop.is_set():
        piece = [rng.randrange(258) for _ in range(rng.randint(1, 12))]
        t0 = time.monotonic()
        try:
            r = await client.append(sid, piece, append_id=f"sdk-{sid}-{n}")
        except Exception as e:  # noqa: BLE001 (counted, not hidden)
            run.errors.append(f"{sid}: {e}")
            await asyncio.sleep(0.2)
            continue
        now = time.monotonic()
        run.waits.append(now - t0)
        run.done_at[sid].append(now)
        run.acks[sid].append(Ack(r.start_offset, r.offset, piece, "sdk"))
        n += 1


async def plain_client(address: str, sid: str, run: Run, stop: asyncio.Event, rng: random.Random) -> None:
    """A bare stub on one daemon: no routing, no hints; retries UNAVAILABLE with the same append id."""
    async with grpc.aio.insecure_channel(address) as ch:
        stub = pb_grpc.MemoryServiceStub(ch)
        n = 0
        while not stop.is_set():
            piece = [rng.randrange(258) for _ in range(rng.randint(1, 12))]
            req = pb.AppendRequest(session_id=sid, tokens=piece, append_id=f"plain-{n}")
            t0 = time.monotonic()
            while True:
                try:
                    r = await stub.Append(req, timeout=30)
                    break
                except grpc.aio.AioRpcError as e:
                    if e.code() not in RETRY:
                        run.errors.append(f"plain: {e.code().name}: {e.details()}")
                        return
                    await asyncio.sleep(0.1)
            now = time.monotonic()
            run.plain_waits.append(now - t0)
            run.done_at[sid].append(now)
            run.acks[sid].append(Ack(r.start_offset, r.offset, piece, "plain"))
            n += 1


def check_session(model, acks: list[Ack], offset: int, state: bytes) -> tuple[int, int]:
    """(lost, duplicated) appends of one session: the acks must tile [0, offset), and the state must be
    a fresh one fed them in order."""
    acks = sorted(acks, key=lambda a: (a.start, a.end))
    lost = dup = 0
    at = 0
    for a in acks:
        if a.start < at:
            dup += 1  # two acknowledged appends claim the same tokens
        elif a.start > at:
            dup += 1  # tokens no client was acknowledged were read before this one (a retry read twice)
        at = max(at, a.end)
    lost += sum(a.end > offset for a in acks)
    if at < offset:
        dup += 1
    ref = StreamState.fresh(model)
    for a in acks:
        ref.append(a.tokens)
    got = state_from_bytes(model, state).tensors()
    want = ref.tensors()
    same = sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)
    if not same:
        lost += len(acks)
    return lost, dup


async def export(stub: pb_grpc.MemoryServiceStub, sid: str) -> bytes:
    chunks = [c async for c in stub.ExportSession(pb.ExportSessionRequest(session_id=sid), timeout=60)]
    return b"".join(c.data for c in chunks[1:])


async def main_async(a: argparse.Namespace, work: Path) -> dict:
    torch.set_num_threads(1)
    model = init_model(preset("tiny"), seed=0)
    ckpt = work / "ckpt"
    save_checkpoint(model, ckpt)
    cluster = redis_proc = None
    if a.cluster:
        sys.path.insert(0, str(ROOT / "tests"))
        from cluster_fixtures import LocalCluster

        cluster = LocalCluster(work / "cluster")
        cluster.start()
        url = cluster.url
    else:
        redis_proc, redis_port = start_redis(work)
        url = f"redis://127.0.0.1:{redis_port}/0"
    procs: list = []
    try:
        extra = ["--lease-seconds", str(a.lease_seconds), "--snapshot-interval", str(a.snapshot_interval)]
        for i in range(a.daemons):
            d = work / f"d{i}"
            d.mkdir()
            procs.append(start_daemon(d, ckpt, url, 1, *extra))
        addresses = [addr for _, addr in procs]
        retry = RetryPolicy(max_attempts=50, initial_backoff=0.05, max_backoff=0.5)
        client = AsyncMemoryClient(addresses, timeout=30, retry=retry)
        sids = [f"scale-{i}" for i in range(a.sessions)]
        for sid in sids:
            await client.create_session(sid)
        run = Run(acks={s: [] for s in sids}, done_at={s: [] for s in sids})
        stop = asyncio.Event()
        shared = sids[0]
        victim = client._routes.current(shared)
        plain_at = next(x for x in addresses if x != victim)
        rng = random.Random(a.seed)
        tasks = [asyncio.create_task(sdk_client(client, s, run, stop, random.Random(rng.random()))) for s in sids]
        tasks.append(asyncio.create_task(plain_client(plain_at, shared, run, stop, random.Random(rng.random()))))
        t0 = time.monotonic()
        killed_at, on_victim = None, []
        with tqdm(total=a.seconds, unit="s", desc="scaleout", file=sys.stderr, disable=not a.progress) as bar:
            while (elapsed := time.monotonic() - t0) < a.seconds:
                await asyncio.sleep(0.5)
                bar.n = min(a.seconds, round(elapsed))
                bar.refresh()
                if killed_at is None and elapsed >= a.kill_after:
                    on_victim = [s for s in sids if client._routes.current(s) == victim]
                    proc = procs[addresses.index(victim)][0]
                    proc.send_signal(signal.SIGKILL)
                    proc.wait(10)
                    killed_at = time.monotonic()
        stop.set()
        await asyncio.gather(*tasks)
        wall = time.monotonic() - t0

        live = next(x for x in addresses if x != victim)
        acked = lost = dup = 0
        async with grpc.aio.insecure_channel(live) as ch:
            stub = pb_grpc.MemoryServiceStub(ch)
            for sid in tqdm(sids, desc="checking", file=sys.stderr, disable=not a.progress):
                head = await stub.GetSession(pb.GetSessionRequest(session_id=sid), timeout=60)
                lo, du = check_session(model, run.acks[sid], head.offset, await export(stub, sid))
                lost, dup, acked = lost + lo, dup + du, acked + len(run.acks[sid])
        store = Store(connect(url, 10))
        fences = [(await heads.read(store, "default", sid)).fence for sid in sids]
        await store.r.aclose()
        await client.close()
        served_again = [min((t for t in run.done_at[s] if t > killed_at), default=None) for s in on_victim]
        failover = None
        if killed_at is not None and on_victim:
            failover = max((t - killed_at) if t is not None else float("inf") for t in served_again)
        tokens = sum(len(x.tokens) for acks in run.acks.values() for x in acks)
        return {
            "acked": acked,
            "lost": lost,
            "duplicated": dup,
            "handovers_per_1000": round(1000 * (sum(fences) - len(sids)) / max(1, acked), 2),
            "max_wait_ms": round(1000 * max(run.waits + run.plain_waits), 1),
            "tok_s": round(tokens / wall, 1),
            "failover_s": round(failover, 3) if failover is not None else None,
            "lease_seconds": a.lease_seconds,
            "daemons": a.daemons,
            "sessions": a.sessions,
            "seconds": round(wall, 1),
            "killed_sessions": len(on_victim),
            "plain_acked": len(run.plain_waits),
            "shared_sdk_acked": sum(x.who == "sdk" for x in run.acks[shared]),
            "plain_max_wait_ms": round(1000 * max(run.plain_waits, default=0.0), 1),
            "sdk_errors": len(run.errors),
            "redis": "cluster" if a.cluster else "single",
        }
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, _ in procs:
            try:
                proc.wait(30)
            except Exception:  # noqa: BLE001
                proc.kill()
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(10)
        if cluster is not None:
            cluster.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", action="store_true", help="print only the JSON line")
    p.add_argument("--daemons", type=int, default=3)
    p.add_argument("--sessions", type=int, default=24)
    p.add_argument("--seconds", type=float, default=40.0)
    p.add_argument("--kill-after", type=float, default=12.0)
    p.add_argument("--lease-seconds", type=float, default=3.0)
    p.add_argument("--snapshot-interval", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cluster", action="store_true", help="a 3+3 Redis Cluster on loopback instead of one Redis")
    a = p.parse_args()
    a.progress = sys.stderr.isatty()
    work = Path(tempfile.mkdtemp(prefix="memoryd-scaleout-"))
    try:
        out = asyncio.run(main_async(a, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if not a.json:
        print(f"# {a.daemons} daemons, one Redis, {a.sessions} sessions over the SDK, one plain client, one kill -9")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
