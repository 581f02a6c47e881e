"""A stalled Redis (the real redis-server, SIGSTOPped) under every call, streaming ones included: each
call that needs Redis answers UNAVAILABLE within the daemon's Redis timeout (issue 10).

The bound asserted is the timeout plus half of it: generous for a loaded machine, and still below
the two timeouts a call took when it queued behind another call stuck on Redis (the bug: 2 x TIMEOUT
less the 0.3 s it arrived after the stuck call, 3.7 s against the bound's 3 s).  The timeout is the
daemon's `--redis-timeout`, 2 s here: the dozen calls below each wait it out in turn, so it sets
this test's length (at 3 s it took 13 s more)."""

from __future__ import annotations

import concurrent.futures
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from memoryd_sdk.proto import memoryd_pb2 as pb
from service_fixtures import Daemon, RedisServer, tiny_checkpoint  # noqa: F401 (fixture)

TIMEOUT = 2.0
BOUND = TIMEOUT * 1.5
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


@pytest.fixture
def stalled(tmp_path: Path, tiny_checkpoint: Path) -> Iterator[tuple[Daemon, RedisServer]]:  # noqa: F811
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    # a 1-byte budget keeps only the session in use hot: the others are written out and dropped
    d = Daemon(
        tmp_path / "memoryd", tiny_checkpoint, redis.url, "--redis-timeout", str(TIMEOUT), "--memory-budget", "1"
    )
    d.start()
    try:
        yield d, redis
    finally:
        if redis.proc is not None and redis.proc.poll() is None:
            redis.proc.send_signal(signal.SIGCONT)
        try:
            d.close()
        finally:
            redis.kill(signal.SIGTERM)


def timed(fn: Callable[[], object]) -> tuple[grpc.StatusCode, float, str]:
    t0 = time.monotonic()
    try:
        r = fn()
        if hasattr(r, "__next__"):
            list(r)
        code, details = grpc.StatusCode.OK, ""
    except grpc.RpcError as e:
        code, details = e.code(), e.details()
    return code, time.monotonic() - t0, details


def test_stalled_redis_every_call_answers_within_the_timeout(stalled: tuple[Daemon, RedisServer]) -> None:
    d, redis = stalled
    s = d.stub()
    for sid in ("cold", "hot"):
        s.CreateSession(pb.CreateSessionRequest(session_id=sid))
        s.Append(pb.AppendRequest(session_id=sid, tokens=list(range(40))))
    assert s.GetSession(pb.GetSessionRequest(session_id="hot")).hot
    export = list(s.ExportSession(pb.ExportSessionRequest(session_id="hot")))
    export[0].header.session_id = "imported"
    # "cold" is dropped for "hot" by a background eviction (snapshot, then release): wait for it
    deadline = time.monotonic() + 30
    while s.ListSessions(pb.ListSessionsRequest()).sessions[0].hot and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not s.ListSessions(pb.ListSessionsRequest()).sessions[0].hot

    redis.proc.send_signal(signal.SIGSTOP)
    # a generation on a hot session that commits nothing needs no Redis: it is answered
    free = timed(lambda: s.Generate(pb.GenerateRequest(session_id="hot", max_tokens=4), timeout=60))
    assert free[0] == grpc.StatusCode.OK and free[1] < BOUND, free
    # a streaming Generate(commit=false) queued behind an Append stuck on Redis (same session); the
    # failed append's outcome is unknown, so the hot copy is dropped and the generation needs Redis
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        append = pb.AppendRequest(session_id="hot", tokens=[1], expected_offset=40)
        stuck = pool.submit(timed, lambda: s.Append(append, timeout=60))
        time.sleep(0.3)
        gen = timed(lambda: s.Generate(pb.GenerateRequest(session_id="hot", max_tokens=8), timeout=60))
        first = stuck.result()
    assert first[0] == UNAVAILABLE and first[1] < BOUND, first
    assert gen[0] == UNAVAILABLE and gen[1] < BOUND, gen
    calls = {
        "Generate(commit=false), cold": lambda: s.Generate(
            pb.GenerateRequest(session_id="cold", max_tokens=8), timeout=60
        ),
        "Generate(commit=true)": lambda: s.Generate(
            pb.GenerateRequest(session_id="cold", max_tokens=4, commit=True), timeout=60
        ),
        "ExportSession": lambda: s.ExportSession(pb.ExportSessionRequest(session_id="cold"), timeout=60),
        "CreateSession": lambda: s.CreateSession(pb.CreateSessionRequest(session_id="new"), timeout=60),
        "GetSession": lambda: s.GetSession(pb.GetSessionRequest(session_id="cold"), timeout=60),
        "ListSessions": lambda: s.ListSessions(pb.ListSessionsRequest(), timeout=60),
        "DeleteSession": lambda: s.DeleteSession(pb.DeleteSessionRequest(session_id="cold"), timeout=60),
        "ResetSession": lambda: s.ResetSession(pb.ResetSessionRequest(session_id="cold"), timeout=60),
        "ForkSession": lambda: s.ForkSession(
            pb.ForkSessionRequest(session_id="cold", new_session_id="fork"), timeout=60
        ),
        "Append": lambda: s.Append(pb.AppendRequest(session_id="cold", tokens=[1]), timeout=60),
        "AppendStream": lambda: s.AppendStream(iter([pb.AppendRequest(session_id="cold", tokens=[1])]), timeout=60),
        "ImportSession": lambda: s.ImportSession(iter(export), timeout=60),
    }
    answers = {name: timed(fn) for name, fn in calls.items()}
    model = timed(lambda: s.GetModel(pb.GetModelRequest()))
    redis.proc.send_signal(signal.SIGCONT)
    print({name: round(a[1], 2) for name, a in answers.items()}, "generate behind append:", round(gen[1], 2))
    for name, (code, seconds, details) in answers.items():
        assert code == UNAVAILABLE and seconds < BOUND, (name, code, seconds, details)
        assert "retry" in details, (name, details)
    assert model[0] == grpc.StatusCode.OK, model  # GetModel needs no Redis

    # once Redis is back the calls succeed. The stuck append may have landed (its command was in
    # Redis's socket when Redis stopped): its outcome was unknown, which is why it was UNAVAILABLE.
    d.wait_serving()
    offset = s.GetSession(pb.GetSessionRequest(session_id="hot")).offset
    assert offset in (40, 41)
    assert s.Append(pb.AppendRequest(session_id="hot", tokens=[2], expected_offset=offset)).offset == offset + 1
    assert [m.done for m in s.Generate(pb.GenerateRequest(session_id="hot", max_tokens=2))][-1]
