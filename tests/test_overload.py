"""Issue 20 through a real daemon and a real redis-server: sessions pinned while a call needs them,
deadlines honoured (work nobody will use is dropped, work safe to finish is finished), early
refusals, leases kept for queued work, and long appends through the SDK's defaults.

The blocker in these tests is one long append on another session: with `--tick-tokens` above its
length it runs as one compute-lane plan, so whatever is queued behind it waits a known while.
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from memoryd_sdk import MemoryClient, RetryPolicy
from memoryd_sdk.proto import memoryd_pb2 as pb
from memoryd_sdk.requests import APPEND_TOKENS_PER_SECOND
from service_fixtures import Daemon, RedisServer, redis_server, tiny_checkpoint, tiny_model  # noqa: F401 (fixtures)

BLOCK_SECONDS = 6.0
"""How long the blocking append holds the compute lane: several times the 1 s lease and the 0.5 s
deadlines below.  A fixed token count does not say that: 1,200 tokens took 4-5 s on a busy machine
and 0.6 s on a quiet one, so the count comes from the tiny model's measured rate (`block`)."""
DEFAULT_MODEL_TOKENS_PER_SECOND = 90.0
"""What the default model appends at on this machine alone (docs/service.md, 80-100 tokens/s)."""


def metric(d: Daemon, name: str) -> float:
    """The sum of a Prometheus metric's samples (all labels) from the daemon's exporter."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{d.metrics_port}/metrics", timeout=5).read().decode()
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{re.escape(name)}(\{{[^}}]*\}})? (\S+)$", line)
        if m:
            total += float(m.group(2))
    return total


def calls_logged(d: Daemon, method: str) -> list[dict[str, Any]]:
    out = []
    for line in d.log_path.read_text().splitlines():
        if line.startswith("{"):
            rec = json.loads(line)
            if rec.get("call") == method:
                out.append(rec)
    return out


def tokens(n: int, seed: int = 0) -> list[int]:
    return [1 + (i * 7 + seed) % 250 for i in range(n)]


@pytest.fixture
def daemon_factory(tmp_path: Path, tiny_checkpoint: Path, redis_server: RedisServer) -> Iterator[Callable[..., Daemon]]:  # noqa: F811
    made: list[Daemon] = []

    def make(*extra: str) -> Daemon:
        d = Daemon(tmp_path / f"d{len(made)}", tiny_checkpoint, redis_server.url, *extra)
        made.append(d)
        d.start()
        return d

    yield make
    for d in made:
        d.close()


def create(stub: Any, sid: str, n: int = 16) -> int:
    stub.CreateSession(pb.CreateSessionRequest(session_id=sid), timeout=30)
    return stub.Append(pb.AppendRequest(session_id=sid, tokens=tokens(n)), timeout=60).offset if n else 0


@pytest.fixture(scope="module")
def block(tiny_model) -> int:  # noqa: F811
    """Tokens of the blocking append: the tiny model's append rate on one thread, as the daemon runs it,
    measured here, times BLOCK_SECONDS (never fewer than 1,200)."""
    import torch

    from model import StreamState

    torch.set_num_threads(1)
    n = 1024
    t0 = time.perf_counter()
    StreamState.fresh(tiny_model).append(tokens(n, 3))
    return max(1200, int(n / (time.perf_counter() - t0) * BLOCK_SECONDS))


def part(block: int, share: float) -> int:
    """`share` of the blocking append (never fewer than 1,200 tokens, as `block`), for a test that needs
    it to outlast a single 0.5 s wait: half of it took 1.7-2.9 s in the daemon (the whole of it 3.7-6.6 s)."""
    return max(1200, int(block * share))


def blocker(stub: Any, sid: str, n: int) -> tuple[threading.Thread, dict[str, Any]]:
    """A long append on `sid` in a thread (it holds the compute lane for one plan)."""
    out: dict[str, Any] = {}

    def run() -> None:
        t0 = time.monotonic()
        out["resp"] = stub.Append(pb.AppendRequest(session_id=sid, tokens=tokens(n, 3), append_id="block"), timeout=300)
        out["seconds"] = time.monotonic() - t0

    t = threading.Thread(target=run)
    t.start()
    return t, out


def test_a_session_loaded_for_a_call_is_not_evicted_before_it_runs(daemon_factory, block: int) -> None:
    """Budget for one session.  A call on A runs; B's load must wait for room; a second call on A
    arrives meanwhile.  It pins A, so A stays hot and B loads after both: two loads in all (before
    issue 20, B's load queued A's eviction ahead of the second call, which loaded A again)."""
    d = daemon_factory("--memory-budget", "1", "--tick-tokens", str(block + 1))
    stub = d.stub()
    create(stub, "a")
    create(stub, "b")
    d.kill()
    d.start()
    stub = d.stub()
    t, out = blocker(stub, "a", block)
    time.sleep(0.5)  # A loaded, its long append running
    got_b: dict[str, Any] = {}
    tb = threading.Thread(target=lambda: got_b.setdefault("b", stub.GetSession(pb.GetSessionRequest(session_id="b"))))
    tb.start()
    time.sleep(0.3)
    second = stub.Append(pb.AppendRequest(session_id="a", tokens=tokens(5), append_id="second"), timeout=300)
    t.join()
    tb.join()
    assert out["resp"].offset == 16 + block and second.offset == 16 + block + 5
    assert got_b["b"].offset == 16 and got_b["b"].hot
    assert metric(d, "memoryd_session_loads_total") == 2, d.log_tail()
    assert metric(d, "memoryd_evictions_total") == 1  # A, once both its calls had run


def test_deadlines_drop_what_nobody_uses_and_finish_what_is_safe(daemon_factory, block: int) -> None:
    """A fresh daemon has not priced its work yet (its first append is the blocker), so nothing is
    refused early (that is the next test): B's calls queue behind the blocker and their deadlines
    pass there.  The append without an append_id and the dry-run generation are dropped unrun; the
    append with one runs to the end, and its retry is answered as a duplicate."""
    d = daemon_factory("--tick-tokens", str(block + 1))
    stub = d.stub()
    create(stub, "block", 0)
    start = create(stub, "b", 0)
    for sid in ("b", "block"):  # both hot: nothing ahead of B's calls is priced yet
        assert stub.GetSession(pb.GetSessionRequest(session_id=sid), timeout=30).hot
    t, out = blocker(stub, "block", block)
    time.sleep(0.5)  # the long append runs; B's work queues behind it
    for call in (
        lambda: stub.Append(pb.AppendRequest(session_id="b", tokens=tokens(40)), timeout=0.5),
        lambda: list(
            stub.Generate(pb.GenerateRequest(session_id="b", prompt_tokens=tokens(9), max_tokens=8), timeout=0.5)
        ),
        lambda: stub.Append(pb.AppendRequest(session_id="b", tokens=tokens(30), append_id="keep"), timeout=0.5),
    ):
        with pytest.raises(grpc.RpcError) as e:
            call()
        assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    t.join()
    assert out["seconds"] > 1.5, "the blocker must outlast the deadlines for this test to mean anything"
    deadline = time.monotonic() + 30
    while stub.GetSession(pb.GetSessionRequest(session_id="b"), timeout=30).offset == start:
        assert time.monotonic() < deadline, "the append with an append_id was not finished"
        time.sleep(0.1)
    # only the append with an append_id ran: the other two were dropped, no token was generated
    assert stub.GetSession(pb.GetSessionRequest(session_id="b"), timeout=30).offset == start + 30
    assert metric(d, "memoryd_tokens_generated_total") == 0
    assert metric(d, "memoryd_dropped_work_total") >= 2
    retry = stub.Append(pb.AppendRequest(session_id="b", tokens=tokens(30), append_id="keep"), timeout=30)
    assert retry.duplicate and retry.offset == start + 30
    codes = [c["code"] for c in calls_logged(d, "Append") if c.get("session") == "b"]
    assert codes == ["DEADLINE_EXCEEDED", "DEADLINE_EXCEEDED", "OK"], codes
    assert [c["code"] for c in calls_logged(d, "Generate")] == ["DEADLINE_EXCEEDED"]


def test_a_full_queue_refuses_at_once_with_a_retry_hint(daemon_factory, block: int) -> None:
    block = part(block, 0.5)  # the call arrives 0.5 s in and is refused at once (1,200+ tokens queued)
    d = daemon_factory("--tick-tokens", str(block + 1), "--max-queued-tokens", "1000")
    stub = d.stub()
    create(stub, "block")
    start = create(stub, "b")
    t, _ = blocker(stub, "block", block)
    time.sleep(0.5)
    t0 = time.monotonic()
    with pytest.raises(grpc.RpcError) as e:
        stub.Append(pb.AppendRequest(session_id="b", tokens=tokens(10), append_id="x"), timeout=60)
    took = time.monotonic() - t0
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_queued_tokens" in e.value.details()
    hint = dict(e.value.trailing_metadata() or ())
    assert int(hint["memoryd-retry-after-ms"]) > 0
    assert took < 1.0, took
    t.join()
    assert stub.GetSession(pb.GetSessionRequest(session_id="b"), timeout=30).offset == start


def test_a_load_queued_longer_than_the_lease_keeps_its_session(daemon_factory, block: int) -> None:
    d = daemon_factory("--tick-tokens", str(block + 1), "--lease-seconds", "1")
    stub = d.stub()
    create(stub, "block")
    create(stub, "b")
    d.kill()
    d.start()  # both cold
    stub = d.stub()
    stub.GetSession(pb.GetSessionRequest(session_id="block"), timeout=30)
    t, out = blocker(stub, "block", block)
    time.sleep(0.3)
    got = stub.GetSession(pb.GetSessionRequest(session_id="b"), timeout=120)  # its replay waits for the blocker
    t.join()
    assert out["seconds"] > 3, "the load must wait longer than the 1 s lease for this test to mean anything"
    assert got.hot
    time.sleep(1.5)  # a few rounds of lease renewal
    stub.Append(pb.AppendRequest(session_id="b", tokens=tokens(4), append_id="after"), timeout=30)
    assert "lost the lease" not in d.log_path.read_text()
    assert metric(d, "memoryd_session_loads_total") == 2  # block and b, once each


def test_a_client_that_gave_up_while_it_loaded_finds_it_hot(daemon_factory, block: int) -> None:
    block = part(block, 0.5)  # its replay (1.7-2.7 s) outlasts the first call's 0.5 s deadline 3x and more
    d = daemon_factory("--tick-tokens", str(block + 1), "--snapshot-interval", "100000")
    stub = d.stub()
    create(stub, "long", 16)
    stub.Append(pb.AppendRequest(session_id="long", tokens=tokens(block, 5)), timeout=300)
    d.kill()  # kill -9: no snapshot, the whole log to replay
    d.start()
    stub = d.stub()
    with pytest.raises(grpc.RpcError) as e:
        stub.GetSession(pb.GetSessionRequest(session_id="long"), timeout=0.5)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + 120
    while metric(d, "memoryd_session_loads_total") < 1:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    t0 = time.monotonic()
    info = stub.GetSession(pb.GetSessionRequest(session_id="long"), timeout=30)
    assert info.hot and info.offset == 16 + block
    assert time.monotonic() - t0 < 1.0
    assert metric(d, "memoryd_session_loads_total") == 1, "the retry found the load done, not started another"
    assert [c["code"] for c in calls_logged(d, "GetSession")][-2:] == ["DEADLINE_EXCEEDED", "OK"]


def test_an_8000_token_append_through_the_sdk_defaults_lands_once(daemon_factory) -> None:
    """The SDK's defaults against the default model, scaled in time to the tiny model: every
    duration the SDK allows (its timeout, its append rate) is multiplied by how much slower per
    token the default model is, so the test sees the ratios a user of the default model sees."""
    d = daemon_factory()
    with MemoryClient(d.address) as probe:
        s = probe.create_session("probe")
        t0 = time.monotonic()
        s.append(tokens(1000), timeout=300)
        per_token = (time.monotonic() - t0) / 1000
    k = per_token * DEFAULT_MODEL_TOKENS_PER_SECOND  # seconds here per second with the default model
    defaults = MemoryClient.__init__.__kwdefaults__
    timeout, rate = defaults["timeout"] * k, APPEND_TOKENS_PER_SECOND / k
    assert 8000 * per_token > timeout, "with a fixed per-attempt deadline it would never land (issue 20)"
    with MemoryClient(d.address, timeout=timeout, append_rate=rate, retry=RetryPolicy()) as c:
        s = c.create_session("tool-output")
        res = s.append(tokens(8000, 9))
    assert res.offset == 8000 and not res.duplicate
    mine = [r for r in calls_logged(d, "Append") if r.get("session") == "tool-output"]
    assert [r["code"] for r in mine] == ["OK"], mine


def test_the_budget_plans_a_session_at_its_full_size(tiny_model) -> None:  # noqa: F811
    """`full_state_bytes` (what residency charges a load and a call's working copy) is at least what
    a state holds once it has stepped and filled its window, and not much more."""
    from model import StreamState
    from model.state import full_state_bytes

    cfg = tiny_model.cfg
    state = StreamState.fresh(tiny_model)
    state.append(tokens(cfg.window_size + 3 * cfg.mini_batch_size + 5))
    assert state.steps > 0
    assert state.nbytes() <= full_state_bytes(tiny_model) <= 1.1 * state.nbytes()


def test_idle_time_before_a_busy_spell_is_not_the_daemons_pace() -> None:
    """The pace is the interval between calls served while others wait.  A daemon idle for a while, then
    given two calls at once, must not take the idle time for its pace: it once priced one 10-token call
    ahead at 270 s after an idle spell and refused every call with a 30 s deadline."""
    from memoryd.sessions.admission import Backlog

    backlog = Backlog(0, lambda: 0.0, lambda: 0.0)
    with backlog.admitted(1, False):
        pass
    time.sleep(0.5)  # idle
    with backlog.admitted(1, False):  # busy from here
        time.sleep(0.2)
        with backlog.admitted(1, False):
            pass  # served 0.2 s into the busy spell, 0.7 s after the last call served: the pace is 0.2 s
    assert 0.15 < backlog.pace < 0.45, backlog.pace


def log_records(d: Daemon) -> list[dict[str, Any]]:
    """The daemon's JSON log lines, in order."""
    return [json.loads(line) for line in d.log_path.read_text().splitlines() if line.startswith("{")]


def test_a_hot_idle_session_takes_its_turn_behind_an_earlier_load(daemon_factory, block: int, tiny_model) -> None:  # noqa: F811
    """Calls take turns in arrival order (issue 20, the tail).  Room for A, C working and B's load
    only once A is evicted.  B's load evicts A, whose snapshot waits behind C's long append; a call
    on A arrives meanwhile.  It waits for its turn behind B, so A goes and is loaded again after B:
    before, it pinned A on arrival, A stayed hot, and B waited for whatever A's client sent next
    (a closed loop of clients kept their sessions hot, and calls needing a load waited up to 30 s)."""
    from model import StreamState
    from model.state import full_state_bytes

    full = full_state_bytes(tiny_model)
    small = StreamState.fresh(tiny_model)
    small.append(tokens(16))
    # held while B waits: A (idle) + C (working: its state and a full copy) + B's reservation (two full states)
    budget = 3 * full + small.nbytes() + small.nbytes() // 2
    d = daemon_factory("--memory-budget", str(budget), "--tick-tokens", str(block + 1))
    stub = d.stub()
    for sid in ("a", "b", "c"):
        create(stub, sid)
    d.kill()
    d.start()  # all cold, A's log not in any snapshot (its eviction writes one)
    stub = d.stub()
    before = len(log_records(d))
    stub.GetSession(pb.GetSessionRequest(session_id="a"), timeout=30)
    t, out = blocker(stub, "c", block)
    time.sleep(0.5)  # C loaded, its long append running
    got: dict[str, Any] = {}
    tb = threading.Thread(target=lambda: got.setdefault("b", stub.GetSession(pb.GetSessionRequest(session_id="b"))))
    tb.start()
    time.sleep(0.5)  # B's turn evicts A: A's snapshot waits behind C's append
    second = stub.Append(pb.AppendRequest(session_id="a", tokens=tokens(5), append_id="later"), timeout=120)
    t.join()
    tb.join()
    assert out["seconds"] > 1.5, "the blocker must outlast the arrivals for this test to mean anything"
    assert second.offset == 16 + 5 and got["b"].offset == 16
    records = log_records(d)[before:]
    assert [r["session"] for r in records if r.get("event") == "loaded"] == ["a", "c", "b", "a"], d.log_tail()
    served = [(r["call"], r.get("session")) for r in records if r.get("code") == "OK"]
    assert served.index(("GetSession", "b")) < served.index(("Append", "a")), served


def test_a_load_reserves_what_it_holds_once_it_has_read_the_head(daemon_factory, block: int, tiny_model) -> None:  # noqa: F811
    """A load's room is made in its turn for two full states (nothing is known of the session yet),
    and comes down to what the load holds once it has read the session's head and snapshot: an empty
    session's load holds almost nothing.  Room for D at rest, C's long append, and one load reserved
    at two full states beside another that has read its head: A's load waits behind C's append on the
    compute lane, and B's turn finds room without evicting D.  Before, A held its two full states
    until it was built, and B's turn evicted D (bench/serve.py: 16 new sessions appended at once
    evicted two of those already appended, whose generations then waited for a reload)."""
    from model import StreamState
    from model.state import full_state_bytes

    full = full_state_bytes(tiny_model)
    small = StreamState.fresh(tiny_model)
    small.append(tokens(16))
    empty_load = 2 * full // 8  # far more than an empty session's load holds (its keys' slots for a mini-batch)
    # held at B's turn: D at rest + C (an empty state working: a full copy) + A's load + B's (two full states)
    budget = 3 * full + small.nbytes() + empty_load
    d = daemon_factory("--memory-budget", str(budget), "--tick-tokens", str(block + 1))
    stub = d.stub()
    create(stub, "d")
    for sid in ("a", "b", "c"):
        create(stub, sid, 0)
    d.kill()
    d.start()
    stub = d.stub()
    assert stub.GetSession(pb.GetSessionRequest(session_id="d"), timeout=30).hot
    t, out = blocker(stub, "c", block)
    time.sleep(0.5)  # C loaded, its long append running
    got: dict[str, Any] = {}
    threads = []
    for sid in ("a", "b"):
        th = threading.Thread(
            target=lambda sid=sid: got.setdefault(sid, stub.GetSession(pb.GetSessionRequest(session_id=sid)))
        )
        th.start()
        threads.append(th)
        time.sleep(0.5)  # A's load has read its head; its build waits behind C's append
    t.join()
    for th in threads:
        th.join()
    assert out["seconds"] > 1.5, "the blocker must outlast the arrivals for this test to mean anything"
    assert got["a"].hot and got["b"].hot and got["a"].offset == got["b"].offset == 0
    assert metric(d, "memoryd_evictions_total") == 0, d.log_tail()
    assert stub.GetSession(pb.GetSessionRequest(session_id="d"), timeout=30).hot


def test_an_eviction_writes_a_snapshot_only_when_the_state_stepped_since_the_last(daemon_factory, tiny_model) -> None:  # noqa: F811
    """Room for one session.  A session that took no test-time step since its newest snapshot is
    evicted without writing one (its reload replays the log's tail, under one mini-batch, exactly);
    once it has stepped, its eviction writes one, and the reload replays nothing."""
    import torch

    from model import StreamState, state_from_bytes

    b = tiny_model.cfg.mini_batch_size
    d = daemon_factory("--memory-budget", "1")
    stub = d.stub()
    create(stub, "a", b - 3)  # no step yet
    create(stub, "b", b - 3)  # its load evicts A
    stub.GetSession(pb.GetSessionRequest(session_id="a"), timeout=30)  # evicts B, reloads A
    assert metric(d, "memoryd_snapshots_total") == 0
    assert metric(d, "memoryd_evictions_total") == 2
    reload = [r for r in log_records(d) if r.get("event") == "loaded" and r["session"] == "a"][-1]
    assert reload["replayed"] == b - 3 and reload["snapshot_bytes"] == 0
    more = tokens(3 * b, 1)
    stub.Append(pb.AppendRequest(session_id="a", tokens=more), timeout=30)  # steps
    stub.GetSession(pb.GetSessionRequest(session_id="b"), timeout=30)  # evicts A: a snapshot now
    assert metric(d, "memoryd_snapshots_total") == 1
    got = stub.GetSession(pb.GetSessionRequest(session_id="a"), timeout=30)
    reload = [r for r in log_records(d) if r.get("event") == "loaded" and r["session"] == "a"][-1]
    assert got.offset == 4 * b - 3 and reload["replayed"] == 0 and reload["snapshot_bytes"] > 0
    chunks = list(stub.ExportSession(pb.ExportSessionRequest(session_id="a"), timeout=60))
    served = state_from_bytes(tiny_model, b"".join(x.data for x in chunks[1:])).tensors()
    solo = StreamState.fresh(tiny_model)
    solo.append(tokens(b - 3))
    solo.append(more)
    ref = solo.tensors()
    assert sorted(served) == sorted(ref) and all(torch.equal(served[k], ref[k]) for k in ref)


def test_a_pinned_short_session_is_charged_what_its_call_can_hold(tiny_model) -> None:  # noqa: F811
    """Residency charges a pinned session its state and its call's working copy.  The copy shares the
    state's tensors and owns what it makes new, at most a state of position + tokens (`Engine.copy_bytes`):
    measured here, a copy owns no more than that; a short session's call is charged that, not a full
    state; a call that does not say what it reads, a full one."""
    from memoryd.engine.core import Engine
    from memoryd.engine.scheduler import Budget
    from memoryd.sessions.residency import Hot, Residency
    from model import StreamState
    from model.state import state_bytes_bound

    def owned(copy: StreamState, orig: StreamState) -> int:
        def storages(s: StreamState) -> dict[int, int]:
            ts = [*s.tensors().values(), s.pending_out]
            ts += [t for live in s.live_kv if live is not None for t in (live.buf.k, live.buf.v)]
            return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in ts}

        mine, theirs = storages(copy), storages(orig)
        return sum(n for ptr, n in mine.items() if ptr not in theirs)

    engine = Engine(tiny_model, Budget(tokens=512, rows=8))
    full, b = engine.full_bytes, tiny_model.cfg.mini_batch_size
    for position in (0, 3, b, 2 * b + 1):
        for n in (1, b - 1, b + 2, 2 * b):
            state = StreamState.fresh(tiny_model)
            if position:
                state.append(tokens(position))
            copy = state.clone()
            copy.append(tokens(n, 4))
            bound = engine.copy_bytes(position, n)
            assert owned(copy, state) <= bound, (position, n)
    assert engine.copy_bytes(10**6, 1) == full, "a long session's copy is a full state"
    # a copy that steps nowhere shares theta: a dry-run generation is charged its keys and activations
    assert engine.copy_bytes(2 * b + 1, 1) < state_bytes_bound(tiny_model, 2 * b + 2)
    window = tiny_model.cfg.window_size
    for position in (0, b + 3, window + 2 * b):  # a frozen copy (a recall generation's) keeps all it reads
        for n in (1, b + 2, 2 * window):
            state = StreamState.fresh(tiny_model)
            if position:
                state.append(tokens(position))
            copy = state.frozen_copy()
            for piece in range(0, n, 50):  # as a generation reads it: context, then a token at a time
                copy.append(tokens(min(50, n - piece), 7))
            assert owned(copy, state) <= engine.copy_bytes(position, 0, n), (position, n)
    assert engine.copy_bytes(10**6, 1, 4 * window) > full, "a long frozen read outgrows a full state"

    state = StreamState.fresh(tiny_model)
    state.append(tokens(5))
    hot = Residency(budget=10 * full)
    hot.copy_bytes, hot.copy_bound = full, engine.copy_bytes
    key = ("t", "short")
    hot.put(key, Hot(state=state, fence=1, gen=0, snap_pos=0, snap_steps=0, nbytes=state.nbytes()))
    assert hot.charge(key) == state.nbytes()
    hot.pin(key, 3)
    assert hot.charge(key) == state.nbytes() + engine.copy_bytes(5, 3) < state.nbytes() + full
    hot.pin(key, None)  # a second call, reading what it does not say: a full copy
    assert hot.charge(key) == state.nbytes() + full
    hot.unpin(key, None)
    hot.pin(key, 3, 4 * window)  # a generation with recall: its frozen copy, larger than a full state here
    assert hot.charge(key) == state.nbytes() + engine.copy_bytes(5, 3, 4 * window) > state.nbytes() + full
    hot.unpin(key, 3, 4 * window)
    hot.unpin(key, 3)
    assert hot.charge(key) == state.nbytes() and not hot.pinned(key)
