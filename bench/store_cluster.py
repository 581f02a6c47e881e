"""What the cluster-safe store costs (issue 12); a benchmark, not a test.

Starts a redis-server (AOF on, fsync always, as the embedded one) and a loopback Redis
Cluster of three masters and three replicas (tests/cluster_fixtures.py; no AOF there, the
replicas are its durability), then times the store's calls on each: one Redis, the
cluster, and the cluster with WAIT for one replica. Appends on one Redis pay its fsync.

- append: one session, sequential appends of `--piece-tokens` tokens (p50/p99 ms);
- snapshot: write + publish of a `--snapshot-mib` snapshot (journal, pin, chunks,
  reference, compare-and-set, unpin), p50 ms;
- fork: a fork of a session with a published snapshot and a short log tail, p50 ms.

    python bench/store_cluster.py --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "tests"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from cluster_fixtures import LocalCluster  # noqa: E402
from service_fixtures import RedisServer  # noqa: E402
from tqdm import tqdm  # noqa: E402

from memoryd.store import heads, leases, snapshots, tokenlog  # noqa: E402
from memoryd.store.db import Store  # noqa: E402
from memoryd.store.redis_client import connect  # noqa: E402
from memoryd.store.results import Logged, Ok  # noqa: E402


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))] * 1000, 3)


async def measure(url: str, wait: int, a: argparse.Namespace) -> dict:
    r = connect(url, 5)
    st = Store(r, prefix=f"bench{os.getpid()}", wait_replicas=wait, wait_timeout=1.0)
    try:
        await heads.create(st, "b", "s", {}, "sha256:bench")
        fence = (await leases.acquire(st, "b", "s", "bench", 60)).fence
        piece, pos, appends = list(range(a.piece_tokens)), 0, []
        for _ in range(a.appends):
            t0 = time.perf_counter()
            assert isinstance(await tokenlog.append(st, "b", "s", fence, pos, [piece]), Logged)
            appends.append(time.perf_counter() - t0)
            pos += len(piece)
        data, snaps = os.urandom(a.snapshot_mib << 20), []
        for _ in range(a.snapshots):
            t0 = time.perf_counter()
            snap = await snapshots.write(st, data, "sha256:bench", pos)
            assert isinstance(await snapshots.publish(st, "b", "s", fence, 0, snap, pos), Ok)
            snaps.append(time.perf_counter() - t0)
        await tokenlog.append(st, "b", "s", fence, pos, [piece])
        forks = []
        for i in range(a.forks):
            t0 = time.perf_counter()
            assert isinstance(await heads.fork(st, "b", "s", f"f{i}", None, None, 0), Ok)
            forks.append(time.perf_counter() - t0)
        for i in range(a.forks):
            await heads.delete(st, "b", f"f{i}")
        await heads.delete(st, "b", "s")
        leftover = [k async for k in r.scan_iter(match=f"{st.prefix}:snap:*")]
        return {
            "append_p50_ms": pct(appends, 0.5),
            "append_p99_ms": pct(appends, 0.99),
            "snapshot_p50_ms": pct(snaps, 0.5),
            "fork_p50_ms": pct(forks, 0.5),
            "fork_p99_ms": pct(forks, 0.99),
            "snapshot_keys_left": len(leftover),
            "journal_left": await snapshots.journal_size(st),
        }
    finally:
        await r.aclose()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true", help="print one JSON object (else a short summary)")
    p.add_argument("--appends", type=int, default=300)
    p.add_argument("--piece-tokens", type=int, default=64)
    p.add_argument("--snapshots", type=int, default=10)
    p.add_argument("--snapshot-mib", type=int, default=4)
    p.add_argument("--forks", type=int, default=50)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        single, cluster = RedisServer(Path(tmp) / "single"), LocalCluster(Path(tmp) / "cluster")
        single.start()
        t0 = time.monotonic()
        cluster.start()
        out: dict = {"cluster_start_s": round(time.monotonic() - t0, 2)}
        try:
            runs = [("single", single.url, 0), ("cluster", cluster.url, 0), ("cluster_wait1", cluster.url, 1)]
            for name, url, wait in tqdm(runs, desc="store", file=sys.stderr):
                out[name] = asyncio.run(measure(url, wait, a))
        finally:
            single.kill()
            cluster.stop()
    out["params"] = vars(a) | {"cpus": os.cpu_count()}
    if a.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(k, v)


if __name__ == "__main__":
    main()
