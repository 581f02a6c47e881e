"""Wiring: model, Redis, sessions, gRPC server, health, reflection, metrics, signals.

Start order: every precondition a person can get wrong (ports, files, the data dir,
a redis-server, what converting the default model needs) is checked first, then Redis is
started or reached, and only then is the model loaded (converted on the first start,
the slow part), so a misconfigured start fails in a second, not after the conversion.
Health says SERVING once the model is loaded and Redis answers; a background check flips it to NOT_SERVING
while Redis is away.  SIGTERM: NOT_SERVING, finish in-flight calls, snapshot
every hot session, then stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from memoryd_sdk.proto import memoryd_pb2 as pb
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from memoryd import allocator
from memoryd.api import reflection
from memoryd.api.auth import Auth
from memoryd.api.forward import Router, advertised_address
from memoryd.api.model_info import ModelInfo
from memoryd.api.service import MemoryServicer, add_to_server
from memoryd.default_model import adapter_path, apply_adapter, default_checkpoint
from memoryd.engine.core import Engine
from memoryd.engine.scheduler import Budget
from memoryd.metrics import serve_metrics
from memoryd.preflight import StartupError, check_startup
from memoryd.sessions.calls import Sessions
from memoryd.sessions.chat import ChatFormat, chat_format_for
from memoryd.sessions.leases import redis_errors
from memoryd.settings import Settings
from memoryd.store.db import Store
from memoryd.store.layout import LAYOUT_VERSION
from memoryd.store.leases import publish_forever, withdraw_address
from memoryd.store.redis_client import connect
from memoryd.store.redis_embed import EmbeddedRedis
from memoryd.store.snapshots import sweep_forever
from model import TTTModel, digest_of, load_checkpoint, packed
from model.tokenizer import load_tokenizer

log = logging.getLogger("memoryd")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["MemoryService"].full_name


class JsonFormatter(logging.Formatter):
    """One JSON object per line: easy to grep, easy to ship."""

    def format(self, record: logging.LogRecord) -> str:
        msg = record.getMessage()
        try:
            body = json.loads(msg) if msg.startswith("{") else {"msg": msg}
        except json.JSONDecodeError:
            body = {"msg": msg}
        out = {"ts": round(record.created, 3), "level": record.levelname.lower(), "logger": record.name, **body}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def load_model(s: Settings, device: str) -> tuple[TTTModel, Path, str, str]:
    """The served model, its checkpoint dir, its name and the adapter loaded on top ('' if none).

    `--checkpoint` is served as it is; without it, the default model (converted on
    first start, see `memoryd.default_model`) with its shipped adapter, if any.
    """
    dtype = getattr(torch, s.dtype)
    if s.checkpoint is not None:
        return load_checkpoint(s.checkpoint, device, dtype), s.checkpoint, s.checkpoint.resolve().name, ""
    default = default_checkpoint(s.data_dir)
    model = load_checkpoint(default.path, device, dtype)
    adapter = adapter_path(default.name) if default.pretrained else None
    if adapter is None:
        return model, default.path, default.name, ""
    apply_adapter(model, adapter)
    return model, default.path, default.name, adapter.name


def _chat_note(chat: ChatFormat | None) -> str:
    if chat is None:
        return "no chat template"
    return chat.problem or "template"


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


async def _health_loop(store: Store, hs: Any, every: float = 1.0) -> None:
    serving = None
    while True:
        try:
            ok = await asyncio.wait_for(store.ping(), timeout=every * 2)
        except (TimeoutError, *redis_errors()):
            ok = False
        if ok != serving:
            status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
            for name in ("", SERVICE_NAME):
                await hs.set(name, status)
            log.info(json.dumps({"event": "health", "serving": ok}))
            serving = ok
        await asyncio.sleep(every)


def _credentials(s: Settings) -> grpc.ServerCredentials | None:
    if s.tls_cert is None and s.tls_key is None:
        return None
    if s.tls_cert is None or s.tls_key is None:
        raise ValueError("TLS needs both --tls-cert and --tls-key")
    return grpc.ssl_server_credentials([(s.tls_key.read_bytes(), s.tls_cert.read_bytes())])


async def reach_redis(s: Settings) -> tuple[EmbeddedRedis | None, str, Redis | RedisCluster]:
    """The embedded Redis started (or an external one reached), and a client: before the model loads.

    An external Redis gets `redis_timeout` seconds to answer its first PING; a daemon that
    cannot reach its store at start is misconfigured (wrong URL, Redis not up), and says so
    now rather than after loading the model.
    """
    embedded = None
    url = s.redis_url
    if url is None:
        embedded = EmbeddedRedis(s.data_dir)
        url = await asyncio.to_thread(embedded.start)
        log.info(json.dumps({"event": "embedded_redis", "url": url}))
    r = connect(url, s.redis_timeout)
    deadline = time.monotonic() + s.redis_timeout
    while True:
        try:
            await r.ping()
            return embedded, url, r
        except redis_errors() as e:
            if time.monotonic() < deadline:
                await asyncio.sleep(0.2)
                continue
            with contextlib.suppress(Exception):
                await r.aclose()
            if embedded is not None:
                await asyncio.to_thread(embedded.stop)
            where = "the embedded redis-server" if embedded else url.split("@")[-1]
            raise StartupError(
                f"Redis at {where} does not answer ({e}): start it, or fix --redis-url "
                "(unset: an embedded redis-server)"
            ) from e


async def check_layout(r: Redis | RedisCluster) -> None:
    """Refuse (StartupError) a Redis whose data another layout version wrote (`md:layout`, docs/service.md
    "The Redis layout"); an empty Redis (or one of this version) is claimed for LAYOUT_VERSION."""
    found = await Store(r).claim_layout()
    if found != str(LAYOUT_VERSION):
        raise StartupError(
            f"Redis holds memoryd data of key layout version {found!r} (key md:layout); this daemon reads and writes "
            f"layout {LAYOUT_VERSION}: point --redis-url at an empty Redis or one of layout {LAYOUT_VERSION}, or "
            f"serve this one with the memoryd release of layout {found}"
        )


async def serve(s: Settings) -> None:
    """Check every start-up precondition, reach Redis, then load the model and serve until SIGTERM."""
    malloc = allocator.configure(s.malloc_arena_max, s.malloc_mmap_threshold)
    if malloc:
        log.info(json.dumps({"event": "allocator", **malloc}))
    if s.torch_threads:
        torch.set_num_threads(s.torch_threads)
    auth = Auth.from_settings(s.auth_tokens_file, s.auth_tokens)
    creds = _credentials(s)
    check_startup(s)  # ports, files, dirs, redis-server, conversion deps: before the slow model load
    embedded, url, r = await reach_redis(s)
    try:
        await check_layout(r)  # before the model loads, like check_startup
        await _serve(s, auth, creds, url, r, embedded is not None)
    finally:
        with contextlib.suppress(Exception):
            await r.aclose()
        if embedded is not None:
            await asyncio.to_thread(embedded.stop)


async def _serve(
    s: Settings, auth: Auth, creds: grpc.ServerCredentials | None, url: str, r: Redis | RedisCluster, embedded: bool
) -> None:
    device = resolve_device(s.device)
    model, ckpt, name, adapter = await asyncio.to_thread(load_model, s, device)
    model.packed_decode = s.packed_decode
    t0 = time.perf_counter()
    packed_bytes = await asyncio.to_thread(packed.prepare, model.decode_weights()) if s.packed_decode else 0
    packed_seconds = round(time.perf_counter() - t0, 2)
    tok = load_tokenizer(model.cfg, ckpt)
    chat = chat_format_for(model.cfg, ckpt, tok)
    event = {"event": "model", "checkpoint": str(ckpt), "device": device, "dtype": s.dtype, "digest": digest_of(model)}
    event |= {"adapter": adapter, "chat": _chat_note(chat), "packed_decode": s.packed_decode}
    event |= {"packed_bytes": packed_bytes, "packed_seconds": packed_seconds}
    event |= {"decode_pool_bytes": s.decode_pool_bytes}
    log.info(json.dumps(event))

    store = Store(
        r,
        ttl_seconds=s.ttl_seconds,
        chunk_bytes=s.snapshot_chunk_bytes,
        wait_replicas=s.redis_wait_replicas,
        wait_timeout=s.redis_wait_timeout,
    )
    engine = Engine(model, Budget(tokens=s.tick_tokens, rows=s.batch_sessions), pool_bytes=s.decode_pool_bytes)
    sessions = Sessions(engine, tok, store, s, chat)

    opts = [
        ("grpc.max_receive_message_length", s.max_message_bytes),
        ("grpc.max_send_message_length", s.max_message_bytes),
        ("grpc.so_reuseport", 0),  # one process per host:port, so host:port names one daemon (settings.daemon_id)
    ]
    server = grpc.aio.server(options=opts)
    router = Router(s.daemon_id, "", s.lease_seconds, s.tls_cert.read_bytes() if s.tls_cert else None)
    info = ModelInfo.of(model.cfg, engine.digest, name, adapter)
    add_to_server(MemoryServicer(sessions, s, auth, info, router), server)
    hs = health.aio.HealthServicer()
    for name in ("", SERVICE_NAME):
        await hs.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(hs, server)
    reflection.enable((SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name), server)
    port = server.add_secure_port(s.listen, creds) if creds else server.add_insecure_port(s.listen)
    router.address = advertised_address(s.listen, port, s.advertise_address)
    # What start-up made (torch, the model, grpc: ~250K objects) lives as long as the process: out of the
    # collector's way, a full collection no longer walks it on the event loop (75 ms each), nor does the
    # interpreter's last one at exit (a stop after SIGTERM took 0.5 s, 0.17 s with this).
    gc.collect()
    gc.freeze()
    await server.start()
    http = None
    if s.http_listen:  # the OpenAI-compatible gateway, in this process, speaking gRPC to this daemon
        from memoryd.api.openai_http import local_target, start_http

        http = await start_http(s.http_listen, local_target(s.listen, port), s.tls_cert)
    metrics_port = serve_metrics(s.metrics_port, s.metrics_host)
    host = s.listen.rpartition(":")[0]
    ready = {"event": "listening", "grpc": f"{host}:{port}", "metrics_port": metrics_port, "tls": bool(creds)}
    ready |= {"advertise": router.address, "instance": s.daemon_id}
    ready |= {"http": f"{s.http_listen.rpartition(':')[0]}:{http.port}" if http else None}
    ready |= {"auth": auth.enabled, "redis": "embedded" if embedded else url.split("@")[-1]}
    log.info(json.dumps(ready))

    tasks = [asyncio.create_task(_health_loop(store, hs)), asyncio.create_task(sessions.maintain_forever())]
    tasks.append(asyncio.create_task(publish_forever(store, s.daemon_id, router.address, s.lease_seconds)))
    tasks.append(asyncio.create_task(sweep_forever(store)))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()

    t0 = time.monotonic()
    log.info(json.dumps({"event": "stopping", "hot_sessions": len(sessions.hot)}))
    for t in tasks:
        t.cancel()
    await hs.enter_graceful_shutdown()
    if http is not None:
        await http.stop()
    await server.stop(s.shutdown_grace)
    try:
        await sessions.flush()
        await withdraw_address(store, s.daemon_id)
    except Exception:
        log.exception("flush on shutdown failed; the token log still holds every acknowledged token")
    await router.close()
    log.info(json.dumps({"event": "stopped", "seconds": round(time.monotonic() - t0, 3)}))
