"""memoryd on a real Redis Cluster (three masters, three replicas on loopback): the service's
core calls, crash recovery bit for bit, and a master killed mid-append with WAIT on: after
the failover nothing acknowledged is lost (issue 12)."""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

import grpc
import pytest
from cluster_fixtures import LocalCluster
from memoryd_sdk.proto import memoryd_pb2 as pb
from service_fixtures import (  # noqa: F401 (fixtures)
    Daemon,
    assert_same_state,
    canon,
    export_bytes,
    reference_state,
    state_tensors,
    tiny_checkpoint,
    tiny_model,
)
from test_service_crash import RetryingAppender

TENANT = "default"  # auth off


def head_key(sid: str) -> str:
    return f"md:s:{{{TENANT}/{sid}}}:h"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path, redis_cluster: LocalCluster):  # noqa: F811
    d = Daemon(
        tmp_path_factory.mktemp("memoryd-cluster"),
        tiny_checkpoint,
        redis_cluster.url,
        "--snapshot-interval",
        "2",
        "--redis-wait-replicas",
        "1",
    )
    d.start()
    yield d
    d.close()


def rand_pieces(rng: random.Random, n: int) -> list[list[int]]:
    return [[rng.randrange(256) for _ in range(rng.randint(1, 24))] for _ in range(n)]


def test_core_calls_on_a_cluster(daemon: Daemon, tiny_model, redis_cluster: LocalCluster) -> None:  # noqa: F811
    stub, rng = daemon.stub(), random.Random(7)
    src, fork = "cl-src", "cl-fork"
    assert redis_cluster.master_of(head_key(src)).port != redis_cluster.master_of(head_key(fork)).port, (
        "pick ids on different masters, so the fork's snapshot reference crosses nodes"
    )
    base = rand_pieces(rng, 12)
    stub.CreateSession(pb.CreateSessionRequest(session_id=src, metadata={"k": "v"}))
    for i, p in enumerate(base):
        r = stub.Append(pb.AppendRequest(session_id=src, tokens=p, append_id=f"b{i}"))
    assert r.offset == sum(map(len, base))
    again = stub.Append(pb.AppendRequest(session_id=src, tokens=base[-1], append_id=f"b{len(base) - 1}"))
    assert again.duplicate and again.offset == r.offset

    prompt = list(b"Q: where? A:")
    req = pb.GenerateRequest(session_id=src, prompt_tokens=prompt, max_tokens=6, commit=True, append_id="g1")
    out = [t for e in stub.Generate(req) for t in e.tokens]
    src_pieces = [*base, prompt, *[[t] for t in out]]
    assert_same_state(state_tensors(tiny_model, export_bytes(stub, src)), reference_state(tiny_model, src_pieces))

    f = stub.ForkSession(pb.ForkSessionRequest(session_id=src, new_session_id=fork))
    assert (f.offset, dict(f.metadata)) == (sum(map(len, src_pieces)), {"k": "v"})
    extra = rand_pieces(rng, 5)
    for p in extra:
        stub.Append(pb.AppendRequest(session_id=fork, tokens=p))
    listed = {s.session_id for s in stub.ListSessions(pb.ListSessionsRequest(page_size=100)).sessions}
    assert {src, fork} <= listed

    stub.CreateSession(pb.CreateSessionRequest(session_id="cl-reset"))
    stub.Append(pb.AppendRequest(session_id="cl-reset", tokens=[1, 2, 3] * 20))
    assert stub.ResetSession(pb.ResetSessionRequest(session_id="cl-reset")).offset == 0
    stub.Append(pb.AppendRequest(session_id="cl-reset", tokens=[4, 5]))

    # the source goes; its fork (whose snapshot lives on another master) is intact
    stub.DeleteSession(pb.DeleteSessionRequest(session_id=src))
    with pytest.raises(grpc.RpcError) as e:
        stub.GetSession(pb.GetSessionRequest(session_id=src))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    want = {fork: [*src_pieces, *extra], "cl-reset": [[4, 5]]}
    before = {sid: canon(export_bytes(stub, sid)) for sid in want}

    # kill -9 and restart: every session comes back from the cluster (snapshot + log), bit for bit
    daemon.kill(signal.SIGKILL)
    daemon.start()
    stub = daemon.stub()
    for sid, pieces in want.items():
        data = export_bytes(stub, sid)
        assert canon(data) == before[sid], sid
        assert_same_state(state_tensors(tiny_model, data), reference_state(tiny_model, pieces))
    for sid in want:
        stub.DeleteSession(pb.DeleteSessionRequest(session_id=sid))
    with redis_cluster.client() as c:
        assert c.zcard("md:gc") == 0, "no cross-slot operation was left half done"
        assert not [k for k in c.scan_iter(match="md:snap:*", target_nodes=c.PRIMARIES)], "snapshots freed"


def test_master_killed_mid_append(
    tmp_path: Path,
    tiny_checkpoint: Path,  # noqa: F811
    tiny_model,  # noqa: F811
    redis_cluster: LocalCluster,
) -> None:
    """WAIT on: kill -9 the master holding the session while a client appends; its replica
    takes over, and every acknowledged piece is there, exactly once, bit for bit.

    The promoted replica has no replica of its own until the killed node comes back (as its
    replica), so until then nothing can be acknowledged: WAIT 1 refuses rather than risk it."""
    sid = "failover"
    d = Daemon(tmp_path / "d", tiny_checkpoint, redis_cluster.url, "--snapshot-interval", "3")
    d.extra += ["--redis-wait-replicas", "1"]
    d.start()
    try:
        d.stub().CreateSession(pb.CreateSessionRequest(session_id=sid))
        pieces = rand_pieces(random.Random(12), 80)
        client = RetryingAppender(d, sid, pieces)
        client.start()
        while len(client.acked) < 25 and client.is_alive():
            time.sleep(0.01)
        master = redis_cluster.master_of(head_key(sid))
        master.kill(signal.SIGKILL)
        t0 = time.monotonic()
        redis_cluster.wait_failover(master, head_key(sid))
        failover_s = time.monotonic() - t0
        acked = len(client.acked)
        time.sleep(1.5)
        assert len(client.acked) == acked, "acknowledged with no replica to hold it"
        assert acked < len(pieces)
        redis_cluster.heal()  # the old master rejoins as the new master's replica
        client.join(300)
        assert client.error is None, client.error
        assert len(client.acked) == len(pieces)
        assert client.retries > 0, "the kill did land mid-append"
        stub = d.stub()
        assert stub.GetSession(pb.GetSessionRequest(session_id=sid)).offset == sum(map(len, pieces))
        # and from Redis alone, after a restart of the daemon
        d.kill(signal.SIGKILL)
        d.start()
        data = export_bytes(d.stub(), sid)
        assert_same_state(state_tensors(tiny_model, data), reference_state(tiny_model, pieces))
        print(f"failover_s={failover_s:.2f} acked_at_kill={acked} retries={client.retries} dup={client.duplicates}")
        d.stub().DeleteSession(pb.DeleteSessionRequest(session_id=sid))
    finally:
        d.close()
        redis_cluster.heal()


def test_a_second_daemon_cannot_share_a_fixed_port(daemon: Daemon, tmp_path: Path, tiny_checkpoint: Path) -> None:  # noqa: F811
    """gRPC binds with SO_REUSEPORT by default, so two daemons could share a port (and with it the
    default name host:listen, and each other's leases). The daemon turns it off: the second exits."""
    twin = Daemon(tmp_path / "twin", tiny_checkpoint, daemon.redis_url)
    twin.port = daemon.port
    twin.extra = ["--instance-id", ""]  # the default name, host:listen, as the first one would have
    twin.start(wait=False)
    assert twin.proc.wait(120) != 0
    assert "bind" in twin.log_tail().lower(), twin.log_tail()
    assert daemon.stub().ListSessions(pb.ListSessionsRequest(page_size=1)) is not None  # the first one serves on
