"""Several daemons on one Redis (issue 12): a daemon that does not hold a session forwards the call
to the one that does and names it (`memoryd-holder`); plain clients through different daemons are
served in arrival order; the SDK, given every address, sends each session to its holder; a holder
killed with -9 is replaced within its lease, from snapshot + log, bit for bit."""

from __future__ import annotations

import asyncio
import itertools
import re
import signal
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from memoryd_sdk import AsyncMemoryClient, MemoryClient
from memoryd_sdk.proto import memoryd_pb2 as pb
from memoryd_sdk.proto import memoryd_pb2_grpc as pb_grpc
from memoryd_sdk.routing import SESSION_KEY, rendezvous
from service_fixtures import (  # noqa: F401 (fixtures)
    Daemon,
    RedisServer,
    assert_same_state,
    export_bytes,
    redis_server,
    reference_state,
    start_all,
    state_tensors,
    tiny_checkpoint,
    tiny_model,
)

LEASE = "2"


def two_daemons(workdir: Path, checkpoint: Path, redis_url: str) -> Iterator[list[Daemon]]:
    ds = [
        Daemon(workdir / f"d{i}", checkpoint, redis_url, "--lease-seconds", LEASE, "--snapshot-interval", "2")
        for i in range(2)
    ]
    start_all(ds)
    yield ds
    for d in ds:
        d.close()


@pytest.fixture
def pair(tmp_path: Path, tiny_checkpoint: Path, redis_server):  # noqa: F811
    """A pair of its own, for a test that kills one."""
    yield from two_daemons(tmp_path, tiny_checkpoint, redis_server.url)


@pytest.fixture(scope="module")
def shared_pair(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Iterator[list[Daemon]]:  # noqa: F811
    """One pair (and Redis) for the tests that neither kill nor reconfigure a daemon: each uses its own
    session ids and counts the daemons' counters from where it found them (`counters`)."""
    redis = RedisServer(tmp_path_factory.mktemp("routing-redis"))
    redis.start()
    try:
        yield from two_daemons(tmp_path_factory.mktemp("routing"), tiny_checkpoint, redis.url)
    finally:
        redis.kill(signal.SIGTERM)


def metric(d: Daemon, name: str) -> float:
    """Sum of a Prometheus counter's samples on the daemon's /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{d.metrics_port}/metrics", timeout=10).read().decode()
    return sum(float(m.group(1)) for m in re.finditer(rf"^{name}(?:{{[^}}]*}})? (\S+)$", text, re.M))


COUNTERS = ("memoryd_session_loads_total", "memoryd_forwarded_calls_total")


def counters(ds: list[Daemon]) -> Callable[[Daemon, str], float]:
    """`metric` counted from now: what this test's calls added on a pair other tests used before."""
    start = {(d.port, name): metric(d, name) for d in ds for name in COUNTERS}
    return lambda d, name: metric(d, name) - start[d.port, name]


def test_non_holder_forwards_and_names_the_holder(shared_pair: list[Daemon], tiny_model) -> None:  # noqa: F811
    holder, other = shared_pair
    metric = counters(shared_pair)
    holder.stub().CreateSession(pb.CreateSessionRequest(session_id="s"))
    holder.stub().Append(pb.AppendRequest(session_id="s", tokens=[1, 2, 3]))
    r, call = other.stub().Append.with_call(pb.AppendRequest(session_id="s", tokens=[4, 5]), timeout=30)
    assert (r.start_offset, r.offset) == (3, 5)
    assert dict(call.trailing_metadata())["memoryd-holder"] == holder.address
    # a streamed answer (export) through the other daemon is the holder's, bit for bit
    ref = reference_state(tiny_model, [[1, 2, 3], [4, 5]])
    assert_same_state(state_tensors(tiny_model, export_bytes(other.stub(), "s")), ref)
    # a generation streams back through the other daemon, with the hint at the end
    call = other.stub().Generate(pb.GenerateRequest(session_id="s", max_tokens=3), timeout=60)
    msgs = list(call)
    assert msgs[-1].done and msgs[-1].generated_tokens == 3 and msgs[-1].offset == 5
    assert dict(call.trailing_metadata())["memoryd-holder"] == holder.address
    # a streamed request (AppendStream) too
    reqs = iter([pb.AppendRequest(session_id="s", tokens=[6]), pb.AppendRequest(session_id="s", tokens=[7])])
    assert other.stub().AppendStream(reqs, timeout=30).offset == 7
    # a call already forwarded is not forwarded again: the MOVED answer, with the holder's address
    with pytest.raises(grpc.RpcError) as e:
        other.stub().GetSession(
            pb.GetSessionRequest(session_id="s"), metadata=(("memoryd-forwarded-by", "test"),), timeout=30
        )
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "served by daemon" in e.value.details()
    assert dict(e.value.trailing_metadata())["memoryd-holder"] == holder.address
    # no handover happened: the session was loaded once, by its holder
    assert metric(holder, "memoryd_session_loads_total") == 1
    assert metric(other, "memoryd_session_loads_total") == 0
    assert metric(other, "memoryd_forwarded_calls_total") >= 3


def test_two_plain_clients_through_two_daemons_take_turns(shared_pair: list[Daemon], tiny_model) -> None:  # noqa: F811
    """Each client appends as fast as its answers come; nothing lost or doubled, and neither waits for the
    other to finish a long run (the outside drill saw runs of 36 and a 12 s wait before routing)."""
    pair, metric = shared_pair, counters(shared_pair)
    pair[0].stub().CreateSession(pb.CreateSessionRequest(session_id="shared"))
    n = 25
    acks: list[tuple[int, int, str, list[int]]] = []
    errors: list[BaseException] = []

    def client(d: Daemon, name: str, base: int) -> None:
        try:
            with grpc.insecure_channel(d.address) as ch:
                stub = pb_grpc.MemoryServiceStub(ch)
                for i in range(n):
                    piece = [base + i % 100, (base + 7 * i) % 250]
                    r = stub.Append(
                        pb.AppendRequest(session_id="shared", tokens=piece, append_id=f"{name}{i}"), timeout=30
                    )
                    acks.append((r.start_offset, r.offset, name, piece))
        except BaseException as e:  # noqa: BLE001 (handed to the test's thread)
            errors.append(e)

    threads = [threading.Thread(target=client, args=(d, f"c{i}", 10 + 100 * i)) for i, d in enumerate(pair)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    acks.sort()
    assert len(acks) == 2 * n
    assert all(a[0] == b[1] for b, a in itertools.pairwise(acks)) and acks[0][0] == 0, "tiles the log"
    final = pair[1].stub().GetSession(pb.GetSessionRequest(session_id="shared"), timeout=30)
    assert final.offset == acks[-1][1] == 4 * n, "every acknowledged token once"
    ref = reference_state(tiny_model, [a[3] for a in acks])
    assert_same_state(state_tensors(tiny_model, export_bytes(pair[0].stub(), "shared")), ref)
    # arrival order at the holder: while both run, neither runs far ahead of the other
    names = [a[2] for a in acks]
    both = names[: min(max(i for i, x in enumerate(names) if x == c) for c in ("c0", "c1")) + 1]
    longest = max(len(m.group(0)) for m in re.finditer(r"(c0)+|(c1)+", "".join(both)))
    assert longest // 2 <= 6, f"one client ran {longest // 2} appends in a row: {names}"
    assert metric(pair[0], "memoryd_session_loads_total") + metric(pair[1], "memoryd_session_loads_total") == 1


def test_sdk_routes_each_session_to_its_holder(shared_pair: list[Daemon]) -> None:
    pair, metric = shared_pair, counters(shared_pair)
    addrs = [d.address for d in pair]
    # a session the SDK would send to pair[1] first, held by pair[0]
    sid = next(f"r{i}" for i in range(1000) if rendezvous(f"r{i}", addrs) == pair[1].address)
    pair[0].stub().CreateSession(pb.CreateSessionRequest(session_id=sid))
    pair[0].stub().Append(pb.AppendRequest(session_id=sid, tokens=[1]))
    with MemoryClient(",".join(addrs)) as c:
        s = c.session(sid)
        for i in range(6):
            s.append([2 + i])
        assert c.get_session(sid).offset == 7
    # only the first call went through the other daemon; the rest followed its hint
    assert metric(pair[1], "memoryd_forwarded_calls_total") == 1
    assert metric(pair[1], "memoryd_session_loads_total") == 0


@pytest.mark.asyncio
async def test_sdk_sends_the_session_id_as_metadata() -> None:
    """What a hash-based proxy keys on (checked against a real gRPC server that records metadata)."""
    seen: list[dict[str, str]] = []

    class Recorder(pb_grpc.MemoryServiceServicer):
        async def GetSession(self, request, context):
            seen.append(dict(context.invocation_metadata()))
            return pb.Session(session_id=request.session_id)

        async def AppendStream(self, it, context):
            seen.append(dict(context.invocation_metadata()))
            async for _ in it:
                pass
            return pb.AppendResponse()

    server = grpc.aio.server()
    pb_grpc.add_MemoryServiceServicer_to_server(Recorder(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with AsyncMemoryClient(f"127.0.0.1:{port}") as c:
            await c.get_session("abc")
            await c.append_stream("xyz", [[1]])
    finally:
        await server.stop(0)
    assert [m.get(SESSION_KEY) for m in seen] == ["abc", "xyz"]


def test_kill9_holder_served_by_the_other_bit_for_bit(pair: list[Daemon], tiny_model) -> None:  # noqa: F811
    holder, other = pair
    holder.stub().CreateSession(pb.CreateSessionRequest(session_id="k"))
    pieces = [[i % 200 + 1, (3 * i) % 250] for i in range(9)]  # 18 tokens: snapshots at steps 2, 4 and a log tail
    for p in pieces:
        holder.stub().Append(pb.AppendRequest(session_id="k", tokens=p))
    holder.kill(signal.SIGKILL)
    # a plain client on the other daemon: its call waits (in the daemon) for the dead holder's lease
    t0 = time.monotonic()
    r = other.stub().Append(pb.AppendRequest(session_id="k", tokens=[9, 9]), timeout=60)
    waited = time.monotonic() - t0
    assert r.start_offset == 18 and waited < float(LEASE) + 10
    ref = reference_state(tiny_model, [*pieces, [9, 9]])
    assert_same_state(state_tensors(tiny_model, export_bytes(other.stub(), "k")), ref)


def test_sdk_keeps_appending_through_a_kill9(pair: list[Daemon], tiny_model) -> None:  # noqa: F811
    addrs = [d.address for d in pair]

    async def run() -> list[list[int]]:
        async with AsyncMemoryClient(addrs, timeout=20) as c:
            s = await c.create_session("through")
            sent = []
            for i in range(16):
                if i == 6:  # kill whichever daemon serves it now
                    victim = next(d for d in pair if d.address == c._routes.current("through"))
                    victim.kill(signal.SIGKILL)
                piece = [i + 1, (5 * i) % 250]
                await s.append(piece)
                sent.append(piece)
            return sent

    sent = asyncio.run(run())
    alive = next(d for d in pair if d.proc.poll() is None)
    ref = reference_state(tiny_model, sent)
    assert_same_state(state_tensors(tiny_model, export_bytes(alive.stub(), "through")), ref)


def test_advertised_address() -> None:
    """The port actually bound (listen on port 0), a wildcard host named, an explicit setting as it is."""
    import socket

    from memoryd.api.forward import advertised_address
    from memoryd.settings import Settings

    assert advertised_address("127.0.0.1:0", 43210, None) == "127.0.0.1:43210"
    assert advertised_address("0.0.0.0:50051", 50051, None) == f"{socket.gethostname()}:50051"
    assert advertised_address("0.0.0.0:0", 5, "memoryd-2.svc:50051") == "memoryd-2.svc:50051"
    with pytest.raises(ValueError, match="advertise_address must be host:port"):
        Settings(advertise_address="no-port")
