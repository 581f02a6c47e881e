"""Which of memoryd's files an Append and a Generate pass through, from the gRPC edge to the model and back.

A real daemon in this process (tiny model, real redis-server, a real gRPC server on 127.0.0.1), one
gRPC call at a time traced with sys.setprofile (and threading.setprofile for the engine's worker
threads). Counted: every Python call into a file under memoryd/ or model/ (a coroutine counts when it
starts, not on each resume); an *entry* into a file is a call from a frame of another file (or from
outside: grpc, asyncio, a thread pool). Prints JSON: per traced call, the files in first-visit order,
the entries per file, the path with consecutive calls in one file merged, and per layer (api,
sessions, store, engine, model: memoryd's folders and model/) how often the path enters it from
another layer ("runs"; "layer_hops" is the path with consecutive files of one layer merged) and how
many calls come into its files from outside it ("calls_in": the issue's "re-enters store.py 6 times"
counted calls into the one store file, whose internal calls were not counted).

    .venv/bin/python bench/call_path.py            # docs/architecture.md's counts come from this
"""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
import tempfile
import threading
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for _p in (ROOT, ROOT / "tests", ROOT / "sdk"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import grpc  # noqa: E402
import torch  # noqa: E402
from memoryd_sdk.proto import memoryd_pb2 as pb  # noqa: E402
from memoryd_sdk.proto import memoryd_pb2_grpc as pb_grpc  # noqa: E402
from service_fixtures import RedisServer  # noqa: E402

from memoryd.api.auth import Auth  # noqa: E402
from memoryd.api.service import MemoryServicer, add_to_server  # noqa: E402
from memoryd.engine.core import Engine  # noqa: E402
from memoryd.engine.scheduler import Budget  # noqa: E402
from memoryd.sessions.calls import Sessions  # noqa: E402
from memoryd.settings import Settings  # noqa: E402
from memoryd.store.redis_client import connect  # noqa: E402
from model import init_model, preset  # noqa: E402
from model.tokenizer import ByteTokenizer  # noqa: E402

try:  # this tree: the split store, the edge's forwarding and ModelInfo
    from memoryd.api.forward import Router
    from memoryd.api.model_info import ModelInfo
    from memoryd.store.db import Store
except ImportError:  # the tree before issue 18's store/middle-layer change (for the comparison)
    from memoryd.store.store import Store

    from memoryd.sessions.routing import Router

    ModelInfo = None

TRACED = (str(ROOT / "memoryd") + "/", str(ROOT / "model") + "/")


class Tracer:
    def __init__(self) -> None:
        self.on = False
        self.calls: list[tuple[str, str | None]] = []
        self._seen: dict[int, Any] = {}  # frames already started (kept alive, so ids are not reused)

    @staticmethod
    def _file(frame: Any) -> str | None:
        f = frame.f_code.co_filename
        return str(Path(f).relative_to(ROOT)) if f.startswith(TRACED) else None

    def __call__(self, frame: Any, event: str, arg: Any) -> None:
        if not self.on or event != "call" or id(frame) in self._seen:
            return
        self._seen[id(frame)] = frame
        here = self._file(frame)
        if here is not None:
            back = frame.f_back
            self.calls.append((here, self._file(back) if back is not None else None))

    def report(self) -> dict[str, Any]:
        files = list(dict.fromkeys(f for f, _ in self.calls))
        entries = Counter(f for f, caller in self.calls if caller != f)
        path: list[str] = []
        for f, caller in self.calls:
            if caller != f and (not path or path[-1] != f):
                path.append(f)

        def layer(f: str) -> str:
            return "model" if f.startswith("model/") else f.split("/")[1]

        hops: list[str] = []
        for f in path:
            if not hops or hops[-1] != layer(f):
                hops.append(layer(f))
        calls_in = Counter(layer(f) for f, caller in self.calls if caller is None or layer(caller) != layer(f))
        return {
            "files": len(files),
            "layer_hops": len(hops),
            "runs": dict(Counter(hops)),
            "calls_in": dict(calls_in),
            "memoryd_files": len([f for f in files if f.startswith("memoryd/")]),
            "entries": dict(sorted(entries.items(), key=lambda kv: -kv[1])),
            "files_in_order": files,
            "path": path,
        }


async def main() -> None:
    torch.set_num_threads(1)
    tracer = Tracer()
    threading.setprofile(tracer)  # the engine's worker threads start after this
    sys.setprofile(tracer)
    tmp = Path(tempfile.mkdtemp(prefix="call-path-"))
    redis = RedisServer(tmp / "redis")
    redis.start()
    try:
        model = init_model(preset("tiny"), seed=0).requires_grad_(False)
        s = Settings(instance_id="call-path", data_dir=tmp / "data", metrics_port=0, snapshot_interval=10**6)
        store = Store(connect(redis.url, 5.0))
        engine = Engine(model, Budget(tokens=4096, rows=4))
        sessions = Sessions(engine, ByteTokenizer(), store, s)
        router = Router(s.daemon_id, "", s.lease_seconds, None)
        if ModelInfo is not None:
            servicer = MemoryServicer(sessions, s, Auth({}), ModelInfo.of(model.cfg, engine.digest, "tiny"), router)
        else:
            servicer = MemoryServicer(sessions, s, Auth({}), "tiny", "", router)
        server = grpc.aio.server()
        add_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        router.address = f"127.0.0.1:{port}"
        await server.start()
        out: dict[str, Any] = {}
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.MemoryServiceStub(channel)
            await stub.CreateSession(pb.CreateSessionRequest(session_id="s"))

            async def traced(name: str, call: Any) -> None:
                tracer.calls.clear()
                tracer.on = True
                try:
                    await call()
                finally:
                    tracer.on = False
                out[name] = tracer.report()

            await traced("append_cold", lambda: stub.Append(pb.AppendRequest(session_id="s", tokens=[1, 2, 3])))
            await traced("append_hot", lambda: stub.Append(pb.AppendRequest(session_id="s", tokens=[4, 5, 6])))

            async def generate() -> None:
                req = pb.GenerateRequest(session_id="s", prompt_tokens=[7], max_tokens=4, commit=True)
                async for _ in stub.Generate(req):
                    pass

            await traced("generate_hot", generate)
        await server.stop(None)
        await sessions.flush()
        await store.r.aclose()
        print(json.dumps(out, indent=1))
    finally:
        sys.setprofile(None)
        threading.setprofile(None)
        redis.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
