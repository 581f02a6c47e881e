"""Crashes (issue 3, "Must show" 2 and 3): kill -9 the daemon while a retrying client appends,
and kill Redis under load.  Nothing acknowledged is lost, nothing is read twice, and the
state is bit for bit a fresh session fed the acknowledged pieces."""

from __future__ import annotations

import random
import signal
import threading
import time
from pathlib import Path

import grpc
import pytest
from memoryd_sdk.proto import memoryd_pb2 as pb
from memoryd_sdk.proto import memoryd_pb2_grpc as pb_grpc
from service_fixtures import (  # noqa: F401 (fixtures)
    FAST_RECONNECT,
    Daemon,
    RedisServer,
    assert_same_state,
    export_bytes,
    redis_server,
    reference_state,
    state_tensors,
    tiny_checkpoint,
    tiny_model,
)

RETRY = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}


class RetryingAppender(threading.Thread):
    """Appends pieces one by one with expected_offset + append_id, retrying until acknowledged."""

    def __init__(self, daemon: Daemon, sid: str, pieces: list[list[int]], start_offset: int = 0) -> None:
        super().__init__(daemon=True)
        self.d, self.sid, self.pieces = daemon, sid, pieces
        self.offset = start_offset
        self.acked: list[list[int]] = []
        self.duplicates = 0
        self.retries = 0
        self.codes: list[grpc.StatusCode] = []
        self.go = threading.Event()
        self.go.set()
        self.idle = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for i, piece in enumerate(self.pieces):
                if not self.go.is_set():
                    self.idle.set()
                    self.go.wait()
                    self.idle.clear()
                req = pb.AppendRequest(
                    session_id=self.sid, tokens=piece, expected_offset=self.offset, append_id=f"a{i}"
                )
                while True:
                    try:
                        with grpc.insecure_channel(self.d.address, options=FAST_RECONNECT) as ch:
                            r = pb_grpc.MemoryServiceStub(ch).Append(req, timeout=5)
                        break
                    except grpc.RpcError as e:
                        if e.code() not in RETRY:
                            raise
                        self.codes.append(e.code())
                        self.retries += 1
                        time.sleep(0.05)
                assert (r.start_offset, r.offset) == (self.offset, self.offset + len(piece)), (i, r)
                self.duplicates += r.duplicate
                self.offset = r.offset
                self.acked.append(piece)
        except BaseException as e:  # noqa: BLE001 (handed to the test's thread)
            self.error = e
        finally:
            self.idle.set()

    def pause(self) -> None:
        """Wait until no append is in flight (everything sent is acknowledged)."""
        self.go.clear()
        self.idle.wait(120)

    def resume(self) -> None:
        self.idle.clear()
        self.go.set()


class Reference:
    """`reference_state` of a growing list of acknowledged pieces, kept between checks: one fresh session
    fed in-process, each check feeding it only the pieces acknowledged since the last (the same appends,
    in the same order, as `reference_state(model, pieces)`; replaying all 200 each time cost seconds)."""

    def __init__(self, model) -> None:
        from model import StreamState

        self.state, self.fed = StreamState.fresh(model), []

    def of(self, pieces: list[list[int]]) -> dict:
        assert pieces[: len(self.fed)] == self.fed, "the pieces fed so far begin these"
        for p in pieces[len(self.fed) :]:
            self.state.append(p)
        self.fed = [list(p) for p in pieces]
        return self.state.tensors()


def _check(d: Daemon, model, sid: str, pieces: list[list[int]], ref: Reference | None = None) -> None:
    stub = d.stub()
    g = stub.GetSession(pb.GetSessionRequest(session_id=sid), timeout=30)
    assert g.offset == sum(map(len, pieces)), "every acknowledged token is there, exactly once"
    want = ref.of(pieces) if ref is not None else reference_state(model, pieces)
    assert_same_state(state_tensors(model, export_bytes(stub, sid)), want)


def test_kill9_during_retrying_appends(tmp_path: Path, tiny_checkpoint: Path, tiny_model, redis_server) -> None:  # noqa: F811
    rng = random.Random(1234)
    d = Daemon(tmp_path / "d", tiny_checkpoint, redis_server.url, "--snapshot-interval", "3")
    d.start()
    try:
        d.stub().CreateSession(pb.CreateSessionRequest(session_id="crashy"))
        pieces = [[rng.randrange(258) for _ in range(rng.randint(1, 12))] for _ in range(200)]
        client = RetryingAppender(d, "crashy", pieces)
        client.start()
        ref = Reference(tiny_model)
        kills = 0
        while client.is_alive() and kills < 6:
            time.sleep(rng.uniform(0.05, 0.5))
            if not client.is_alive():
                break
            d.kill(signal.SIGKILL)
            kills += 1
            d.start()
            # with the client paused (nothing in flight), the recovered state is exactly the acknowledged one
            client.pause()
            _check(d, tiny_model, "crashy", client.acked, ref)
            client.resume()
        client.join(300)
        assert client.error is None, client.error
        assert len(client.acked) == 200 and kills >= 3, (len(client.acked), kills)
        _check(d, tiny_model, "crashy", pieces, ref)
        # and once more after a final crash, from Redis alone
        d.kill(signal.SIGKILL)
        d.start()
        _check(d, tiny_model, "crashy", pieces, ref)
        print(f"kills={kills} retries={client.retries} duplicates={client.duplicates}")
    finally:
        d.close()


def test_redis_killed_and_restarted(tmp_path: Path, tiny_checkpoint: Path, tiny_model, redis_server) -> None:  # noqa: F811
    rng = random.Random(99)
    d = Daemon(tmp_path / "d", tiny_checkpoint, redis_server.url, "--snapshot-interval", "2")
    d.start()
    pid = d.proc.pid
    try:
        d.stub().CreateSession(pb.CreateSessionRequest(session_id="steady"))
        pieces = [[rng.randrange(258) for _ in range(rng.randint(1, 16))] for _ in range(150)]
        client = RetryingAppender(d, "steady", pieces)
        client.start()
        while len(client.acked) < 30 and client.is_alive():
            time.sleep(0.01)
        redis_server.kill(signal.SIGKILL)
        # while Redis is down: calls fail with UNAVAILABLE, and health says NOT_SERVING
        with pytest.raises(grpc.RpcError) as e:
            d.stub().GetSession(pb.GetSessionRequest(session_id="other"), timeout=10)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        deadline = time.monotonic() + 10
        while grpc.StatusCode.UNAVAILABLE not in client.codes and time.monotonic() < deadline:
            time.sleep(0.05)
        assert grpc.StatusCode.UNAVAILABLE in client.codes
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + 10
        while True:
            st = health_pb2_grpc.HealthStub(d.channel()).Check(health_pb2.HealthCheckRequest(), timeout=5).status
            if st == health_pb2.HealthCheckResponse.NOT_SERVING or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert st == health_pb2.HealthCheckResponse.NOT_SERVING
        time.sleep(0.5)
        acked_while_down = len(client.acked)
        redis_server.start()  # AOF replays everything Redis acknowledged
        d.wait_serving(30)
        client.join(300)
        assert client.error is None, client.error
        assert len(client.acked) == 150 and acked_while_down < 150
        assert d.proc.pid == pid and d.proc.poll() is None, "the daemon was not restarted"
        _check(d, tiny_model, "steady", pieces)
    finally:
        d.close()
