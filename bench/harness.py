"""What the benchmarks share: free ports, a redis-server (AOF, fsync always) and a daemon."""

from __future__ import annotations

import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import redis

from memoryd.store.redis_embed import find_redis_server

ROOT = Path(__file__).resolve().parents[1]


FAST_RECONNECT = (("grpc.initial_reconnect_backoff_ms", 50), ("grpc.max_reconnect_backoff_ms", 50))
"""Channel options for a client that polls a daemon while it (re)starts.  gRPC's default reconnect
backoff starts at 1 s and grows 1.6x per refused attempt (1, 1.6, 2.6, 4.1 s ...), and between attempts
every call fails at once, UNAVAILABLE: a channel that polled a daemon still importing torch noticed it
serving up to seconds after it was (tens on a first start that converts the default model).  With these
the channel tries again every 50 ms (at most 250 ms, as it was, made a start wait 0.15 s on average after it
was serving; 50 ms, 0.08 s: the suite starts about a hundred daemons).  They change no call's deadline and
nothing the daemon does; nothing measured runs on such a channel.  The tests' daemons use them too
(tests/service_fixtures.py)."""


def wait_serving(
    address: str,
    proc: subprocess.Popen | None,
    log_tail: Callable[[], str],
    timeout: float,
    service: str = "",
    poll: float = 0.05,
) -> None:
    """Until the daemon at `address` says SERVING (for `service`; "": the server as a whole), or raise
    RuntimeError with its log tail when `proc` exits or `timeout` seconds pass."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address, options=FAST_RECONNECT) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while True:
            if proc is not None and proc.poll() is not None:
                raise RuntimeError(f"memoryd exited with {proc.returncode}:\n{log_tail()}")
            try:
                r = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"memoryd did not become SERVING within {timeout} s:\n{log_tail()}")
            time.sleep(poll)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_redis(workdir: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    args = [find_redis_server(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir)]
    args += ["--appendonly", "yes", "--appendfsync", "always", "--save", "", "--logfile", str(workdir / "redis.log")]
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    for _ in range(500):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.02)
    client.close()
    return proc, port


def start_daemon(
    workdir: Path,
    ckpt: Path | None,
    redis: int | str,
    torch_threads: int,
    *extra: str,
    data_dir: Path | None = None,
    address: str | None = None,
) -> tuple[subprocess.Popen, str]:
    """`memoryd serve` on a free port (or `address`: a restart on the same one is the same daemon, which
    takes back its own leases at once) against the given Redis (a local port or a URL), waited on until
    SERVING.

    No checkpoint: the daemon's default model, converted once into `data_dir`."""
    address = address or f"127.0.0.1:{free_port()}"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "sdk")]))
    args = [sys.executable, "-m", "memoryd", "serve", "--listen", address, "--metrics-port", "0"]
    url = redis if isinstance(redis, str) else f"redis://127.0.0.1:{redis}/0"  # a port, or any --redis-url
    args += ["--redis-url", url] + (["--checkpoint", str(ckpt)] if ckpt else [])
    args += ["--data-dir", str(data_dir or workdir), "--torch-threads", str(torch_threads), "--log-level", "WARNING"]
    args += list(extra)
    log = open(workdir / "memoryd.log", "ab")  # noqa: SIM115 (the child owns it)
    proc = subprocess.Popen(args, env=env, stdout=log, stderr=log)

    def log_tail() -> str:
        return (workdir / "memoryd.log").read_text(errors="replace")[-4000:]

    wait_serving(address, proc, log_tail, 300)  # a first start converts the default model
    return proc, address


def bench_checkpoint(checkpoint: str | None, preset_name: str | None, work: Path) -> Path | None:
    """The checkpoint a bench serves: `--checkpoint`, or a random `--preset` saved under `work`, or
    None (the daemon's default model)."""
    if preset_name:
        from model import init_model, preset, save_checkpoint

        ckpt = work / "ckpt"
        save_checkpoint(init_model(preset(preset_name), seed=0), ckpt)
        return ckpt
    return Path(checkpoint) if checkpoint else None


def machine_env(daemon_torch_threads: int) -> dict[str, object]:
    """What a figure depends on besides the code: cores, the load while it ran (these machines are
    shared: compare ratios within one run), Python, and the daemon's torch threads."""
    return {
        "cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "python": platform.python_version(),
        "daemon_torch_threads": daemon_torch_threads,
    }


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def stop_all(daemon: subprocess.Popen | None, redis_proc: subprocess.Popen | None, workdir: Path) -> None:
    """SIGTERM the daemon (it snapshots and exits), then Redis; remove the work directory."""
    if daemon is not None:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(60)
    if redis_proc is not None:
        redis_proc.terminate()
        redis_proc.wait(30)
    shutil.rmtree(workdir, ignore_errors=True)
