"""The engine (memoryd/engine/): the scheduler's plans, batching through a real daemon, and
exactness of batched sessions against sequential ones (issue 13, "Must show" 1)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import random
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

from memoryd_sdk.proto import memoryd_pb2 as pb
from prometheus_client import REGISTRY
from service_fixtures import (  # noqa: F401 (fixtures)
    ROOT,
    Daemon,
    assert_same_state,
    export_bytes,
    redis_server,
    reference_state,
    state_tensors,
    tiny_checkpoint,
    tiny_model,
)

from memoryd.engine.scheduler import Budget, Plan, cut, schedule
from memoryd.engine.work import Append, Export, Generate, Rebuild, Sample, SamplingParams, Ticket
from memoryd.settings import Settings
from model.pool import DEFAULT_MAX_BYTES

B = 128  # mini-batch size of the simulated model in the scheduler tests


class FakeState:
    """What the scheduler sees of a state: nothing (it plans on tickets' integers only)."""


def append_ticket(seq: int, tokens: int, pending: int = 0) -> Ticket:
    return Ticket(Append(FakeState(), [0] * tokens), seq, cost=tokens, to_step=B - pending + 1, step_every=B)


def decode_ticket(seq: int, solo: bool = False) -> Ticket:
    """A sample's next token; `solo`: it takes a test-time step (the engine sets it from the state)."""
    sample = Sample(Generate(FakeState(), SamplingParams(), frozenset()), 0, FakeState(), random.Random(0), token=1)
    return Ticket(sample, seq, cost=B if solo else 1, solo=solo)


def run_tick(waiting: list[Ticket], plan: Plan, tick: int) -> None:
    """What the engine's update does with a plan: appends advance (unfinished ones go to the back
    of the queue), everything else is done."""
    for t, n in plan.chunks:
        t.cost -= n
        t.read += n
        t.to_step = (t.to_step - n - 1) % B + 1
        t.age, t.served = 1_000_000 + tick * 1000 + t.seq, tick
        if t.cost == 0:
            waiting.remove(t)
    for t in [*plan.decodes, *plan.solo, *plan.others]:
        t.served = tick
        waiting.remove(t)


def test_long_append_delays_a_decode_by_at_most_one_tick() -> None:
    """A 64K-token append is cut at mini-batch boundaries to the budget; a decode arriving while
    a piece of it runs is in the very next plan, and first."""
    budget = Budget(tokens=512, rows=64)
    big = append_ticket(0, 65536)
    waiting = [big]
    plans = []
    for tick in range(200):
        if tick == 3:
            waiting.append(decode_ticket(1))  # arrives while tick 2's piece runs
        if not waiting:
            break
        plan = schedule(waiting, budget)
        plans.append(plan)
        run_tick(waiting, plan, tick)
    assert [t.seq for t in plans[3].decodes] == [1], "the decode runs in the first tick after it arrived"
    assert all(p.compute_tokens <= budget.tokens for p in plans)
    read = 0
    for p in plans:
        for _, n in p.chunks:
            read += n
            # every piece ends right after a test-time step (position read+1 = k*B + 1), or at the end
            assert (read - 1) % B == 0 or read == 65536, read
    assert read == 65536 and not waiting


def test_appends_share_the_budget_and_nobody_starves() -> None:
    budget = Budget(tokens=256, rows=8)
    waiting = [append_ticket(0, 100_000), append_ticket(1, 100_000)]
    waiting += [decode_ticket(10 + i) for i in range(20)]
    small = append_ticket(5, 3, pending=40)
    served_small = None
    for tick in range(30):
        if tick == 2:
            waiting.append(small)
        plan = schedule(waiting, budget)
        assert len(plan.decodes) <= budget.rows
        assert plan.chunks, "appends move every tick, even while decodes fill the budget"
        if small in [t for t, _ in plan.chunks]:
            served_small = served_small if served_small is not None else tick
        run_tick(waiting, plan, tick)
        waiting += [decode_ticket(100 + 10 * tick + i) for i in range(8)]  # a steady stream of decodes
    assert served_small is not None and served_small <= 4, served_small
    big = [t for t in waiting if t.seq in (0, 1)]
    assert len(big) == 2 and abs(big[0].read - big[1].read) <= 2 * B, "the two long appends progress evenly"


def test_cut_respects_steps_and_room() -> None:
    t = append_ticket(0, 1000, pending=100)  # 29 tokens to the next step
    assert cut(t, 10) == 0
    assert cut(t, 29) == 29
    assert cut(t, 29 + B - 1) == 29
    assert cut(t, 29 + 2 * B) == 29 + 2 * B
    assert cut(append_ticket(0, 5), 1000) == 5


def test_decodes_on_their_lane_and_the_compute_queue_by_age() -> None:
    """Appends, rebuilds and exports share one queue in arrival order; the first that does not
    fit ends the plan (a later small item does not jump it)."""
    waiting = [append_ticket(0, 100), Ticket(Rebuild(None, [[1] * 40]), 1, cost=41), decode_ticket(2)]
    waiting += [Ticket(Export(FakeState()), 3), append_ticket(4, 300), Ticket(Export(FakeState()), 5)]
    plan = schedule(waiting, Budget(tokens=200, rows=4))
    assert [t.seq for t in plan.decodes] == [2]
    assert [(t.seq, n) for t, n in plan.chunks] == [(0, 100)]
    assert [t.seq for t in plan.others] == [1, 3], "the 300-token append does not fit: the export after it waits"


def rebuild_ticket(seq: int, replay: int) -> Ticket:
    return Ticket(Rebuild(None, [[1] * replay]), seq, cost=1 + replay)


def test_rebuilds_and_appends_share_the_lane_neither_starves() -> None:
    """Issue 20: with a rebuild always waiting (more sessions than fit), appends used to wait for
    every rebuild.  By age, an append waits only for what arrived before it, and rebuilds still
    run while appends keep coming."""
    budget = Budget(tokens=512, rows=8)
    waiting: list[Ticket] = []
    seq = iter(range(10**6))
    arrived: dict[int, int] = {}
    finished: dict[int, int] = {}
    kinds: dict[int, str] = {}
    for tick in range(400):
        for kind, make in (("rebuild", lambda s: rebuild_ticket(s, 400)), ("append", lambda s: append_ticket(s, 150))):
            t = make(next(seq))
            waiting.append(t)
            arrived[t.seq], kinds[t.seq] = tick, kind
        plan = schedule(waiting, budget)
        ahead = sum(t.cost for t in waiting)
        assert plan.compute_tokens <= budget.tokens + 401, ahead
        run_tick(waiting, plan, tick)
        for t in plan.others + [t for t, _ in plan.chunks if t.cost == 0]:
            finished[t.seq] = tick
    done = {k: [finished[s] - arrived[s] for s in finished if kinds[s] == k] for k in ("rebuild", "append")}
    assert len(done["rebuild"]) > 100 and len(done["append"]) > 100, {k: len(v) for k, v in done.items()}
    # the queue grows (more work arrives than fits), but by age: both kinds wait alike
    late_r = sorted(done["rebuild"])[len(done["rebuild"]) // 2]
    late_a = sorted(done["append"])[len(done["append"]) // 2]
    assert late_a <= late_r + 2, (late_a, late_r)


def test_a_wait_is_bounded_by_the_work_ahead_not_by_later_arrivals() -> None:
    """An item runs after at most one piece of each item queued before it, however much arrives later."""
    budget = Budget(tokens=256, rows=8)
    waiting = [append_ticket(0, 5000), rebuild_ticket(1, 200), append_ticket(2, 700)]
    mine = append_ticket(3, 100)
    waiting.append(mine)
    for tick in range(50):
        waiting += [rebuild_ticket(100 + 10 * tick + i, 100) for i in range(3)]  # later arrivals, every tick
        plan = schedule(waiting, budget)
        run_tick(waiting, plan, tick)
        if mine not in waiting:
            break
    # ahead of it: one piece of the 5000 append, the rebuild, one piece of the 700 append (one plan each at most)
    assert mine not in waiting and tick <= 3, tick


def test_every_class_starts_in_arrival_order_on_the_compute_lane() -> None:
    """Loads (rebuilds), appends and snapshots of evicted sessions (exports), mixed at random and
    arriving over time: no item's first piece runs after the first piece of an item that arrived
    later (issue 20: the wait of a call is bounded by the work queued ahead of it), whatever the sizes."""
    rng = random.Random(7)
    budget = Budget(tokens=300, rows=8)
    waiting: list[Ticket] = []
    started: dict[int, int] = {}
    """seq -> the tick of its first piece."""
    seq = 0
    for tick in range(300):
        for _ in range(rng.choice((0, 1, 1, 2))):
            kind = rng.choice(("rebuild", "append", "export"))
            if kind == "rebuild":
                waiting.append(rebuild_ticket(seq, rng.randint(0, 600)))
            elif kind == "append":
                waiting.append(append_ticket(seq, rng.randint(1, 900), pending=rng.randint(0, B - 1)))
            else:
                waiting.append(Ticket(Export(FakeState()), seq))
            seq += 1
        if not waiting:
            continue
        plan = schedule(waiting, budget)
        for t in [*plan.others, *(t for t, _ in plan.chunks)]:
            started.setdefault(t.seq, tick)
        run_tick(waiting, plan, tick)
    ticks = [started[s] for s in sorted(started)]
    assert len(ticks) > 200 and ticks == sorted(ticks), ticks


def test_lanes_plan_separately_and_solo_decodes_go_to_compute() -> None:
    """The decode lane gets the batched decodes; a decode whose token takes a test-time step goes
    to the compute lane, ahead of appends; a busy lane gets nothing, and its work waits."""
    big = append_ticket(0, 65536)
    plain = [decode_ticket(1), decode_ticket(3)]
    stepping = decode_ticket(2, solo=True)
    waiting = [big, *plain, stepping]
    budget = Budget(tokens=512, rows=8)
    both = schedule(waiting, budget)
    assert both.decodes == plain and both.solo == [stepping]
    assert [(t.seq, n) for t, n in both.chunks] == [(0, 129 + B)], "the step's mini-batch counts in the budget"
    assert both.lane("decode").tickets() == plain
    assert both.lane("compute").tickets() == [stepping, big]
    only_decode = schedule(waiting, budget, ["decode"])  # the compute lane is running a piece of `big`
    assert only_decode.decodes == plain and not only_decode.solo and not only_decode.chunks
    only_compute = schedule(waiting, budget, ["compute"])
    assert not only_compute.decodes and only_compute.solo == [stepping]


async def tokens_of(engine, request: Generate, pool_bytes: list[float] | None = None) -> list[list[int]]:
    """Every sample's tokens, read from the generation's stream (and into `pool_bytes`, the decode pool's
    bytes as each token arrives)."""
    from memoryd.engine.work import Finished

    out: list[list[int]] = [[] for _ in range(request.params.samples)]
    ends = 0
    async with engine.generate(request) as gen:
        async for item in gen:
            if pool_bytes is not None:
                pool_bytes.append(REGISTRY.get_sample_value("memoryd_decode_pool_bytes"))
            if isinstance(item, Finished):
                ends += 1
                assert len(out[item.sample]) == request.params.max_tokens and item.reason == "length"
                assert item.read == len(out[item.sample]) - 1, "the fork read every token but the last"
            else:
                out[item.sample].append(item.token)
    assert ends == request.params.samples
    return out


def greedy_reference(model, prompt: list[int], n: int) -> list[int]:
    from model import StreamState

    ref = StreamState.fresh(model)
    ref.append(prompt)
    out = []
    for _ in range(n):
        out.append(int(ref.logits().argmax()))
        ref.append([out[-1]])
    return out


def test_a_decode_never_waits_for_a_long_append_in_the_engine(tiny_model) -> None:  # noqa: F811
    """In the engine: while one compute-lane run reads a long append, another session's tokens
    are decoded one after another on the decode lane; they all finish before that run does (on
    one lane each would have waited for it).  The append's state is the solo one."""
    from memoryd.engine.core import Engine
    from memoryd.engine.work import Appended
    from model import StreamState

    long = [1 + i % 200 for i in range(2000)]  # its run takes ~0.9 s: the 3 decodes are done 0.08 s in

    async def main() -> tuple[list[str], StreamState, list[int]]:
        engine = Engine(tiny_model, Budget(tokens=len(long), rows=4))
        base, gen = StreamState.fresh(tiny_model), StreamState.fresh(tiny_model)
        gen.append([5, 6, 7])
        done: list[str] = []

        async def append() -> Appended:
            res = await engine.submit(Append(base, long))
            done.append("append")
            return res

        async def generate() -> list[int]:
            out = await tokens_of(engine, Generate(gen, SamplingParams(max_tokens=3), frozenset()))
            done.append("generate")
            return out[0]

        task = asyncio.create_task(append())
        await asyncio.sleep(0.05)  # the append's one run has started on the compute lane
        tokens = await generate()
        appended = await task
        await engine.close()
        return done, appended.state, tokens

    done, state, tokens = asyncio.run(main())
    assert done == ["generate", "append"]
    solo = StreamState.fresh(tiny_model)
    solo.append(long)
    assert_same_state(state.tensors(), solo.tensors())
    assert tokens == greedy_reference(tiny_model, [5, 6, 7], 3)


def test_n_samples_are_n_seeded_generations_in_shared_forwards(tiny_model) -> None:  # noqa: F811
    """n = 4 samples of one prompt: sample i is the generation seeded with seed + i, the samples
    differ, and they were decoded together (far fewer decode-lane forwards than 4 generations
    one after another would take); the prompt's state is untouched."""
    from memoryd.engine.core import Engine
    from model import StreamState

    prompt = [9, 8, 7, 6, 5]
    params = SamplingParams(max_tokens=12, temperature=1.5, n=4, seed=41)

    async def main() -> tuple[list[list[int]], list[list[int]], int]:
        engine = Engine(tiny_model, Budget(tokens=512, rows=16))
        state = StreamState.fresh(tiny_model)
        state.append(prompt)
        before = {k: v.clone() for k, v in state.tensors().items()}
        pooled: list[float] = []
        together = await tokens_of(engine, Generate(state, params, frozenset()), pooled)
        ticks = engine.ticks
        assert max(pooled) > 0, "the decode lane attended over its pool (model/pool.py)"
        assert REGISTRY.get_sample_value("memoryd_decode_pool_bytes") == 0, "no generation left: the pool let go"
        assert_same_state(state.tensors(), before)
        alone = []
        for i in range(4):
            one = SamplingParams(max_tokens=12, temperature=1.5, seed=41 + i)
            alone += await tokens_of(engine, Generate(state, one, frozenset()))
        await engine.close()
        return together, alone, ticks

    together, alone, ticks = asyncio.run(main())
    assert together == alone
    assert Settings.model_fields["decode_pool_bytes"].default == DEFAULT_MAX_BYTES, "the daemon's and the engine's"
    assert len({tuple(t) for t in together}) > 1, "independent samples differ"
    # 12 tokens each: 12 batched ticks, plus the solo steps of mini-batch boundaries (b = 8)
    assert ticks <= 12 + 4 * 2, f"4 samples of 12 tokens took {ticks} lane runs"


def test_cancelling_a_generation_removes_it_at_the_next_tick(tiny_model) -> None:  # noqa: F811
    """A generation whose reader goes away leaves the engine: nothing of it waits or runs after
    the tick in flight, and another generation goes on unharmed."""
    from memoryd.engine.core import Engine
    from memoryd.engine.work import Sampled
    from model import StreamState

    async def main() -> tuple[int, int, list[int]]:
        engine = Engine(tiny_model, Budget(tokens=512, rows=16))
        a, b = StreamState.fresh(tiny_model), StreamState.fresh(tiny_model)
        a.append([1, 2, 3])
        b.append([4, 5, 6])
        got = 0
        gen = engine.generate(Generate(a, SamplingParams(max_tokens=60, n=2), frozenset()))
        async for item in gen:
            got += isinstance(item, Sampled)
            if got == 3:
                break
        gen.close()
        left = len(engine._waiting) + len(engine._generations)
        ticks = engine.ticks
        other = await tokens_of(engine, Generate(b, SamplingParams(max_tokens=5), frozenset()))
        await engine.close()
        return left, engine.ticks - ticks, other[0]

    left, ticks_after, other = asyncio.run(main())
    assert left == 0, "the cancelled samples left the queue at once"
    assert ticks_after <= 5 + 2, "only the other generation's ticks (and the cancelled one in flight) ran"
    assert other == greedy_reference(tiny_model, [4, 5, 6], 5)


def test_attribute_docstrings_follow_their_attribute() -> None:
    """An attribute's docstring is the string right after its assignment; a second string after it documents
    nothing, and its neighbour reads as the wrong attribute's (Engine's fresh_bytes / full_bytes were swapped
    so)."""
    import ast
    import itertools

    dangling = []
    for path in sorted((Path(__file__).resolve().parents[1] / "memoryd").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            body = getattr(node, "body", None)
            if not isinstance(body, list):
                continue
            for prev, st in itertools.pairwise(body):
                value = st.value if isinstance(st, ast.Expr) else None
                text = isinstance(value, ast.Constant) and isinstance(value.value, str)
                if text and not isinstance(prev, (ast.Assign, ast.AnnAssign)):
                    dangling.append(f"{path.name}:{st.lineno}")
    assert dangling == []


def test_middle_layer_does_not_import_torch() -> None:
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import memoryd.sessions.calls, memoryd.sessions.ordering, memoryd.sessions.residency\n"
        "import memoryd.sessions.leases, memoryd.sessions.output\n"
        "import memoryd.engine.scheduler, memoryd.engine.work\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_middle_layer_and_store_do_not_import_grpc() -> None:
    """Every module of memoryd.sessions, memoryd.store and memoryd.engine imports with grpc and the
    generated stubs (memoryd_sdk) blocked: forwarding to other daemons lives at the edge (memoryd/api/)."""
    code = (
        "import importlib, pkgutil, sys\n"
        "sys.modules['grpc'] = None; sys.modules['memoryd_sdk'] = None\n"
        "import memoryd.sessions, memoryd.store, memoryd.engine\n"
        "n = 0\n"
        "for pkg in (memoryd.sessions, memoryd.store, memoryd.engine):\n"
        "    for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.'):\n"
        "        importlib.import_module(info.name); n += 1\n"
        "assert n >= 20, n\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_the_models_state_is_a_state_handle(tiny_model) -> None:  # noqa: F811
    """What the middle layer may read of a state (memoryd/engine/handle.py) is what the model's state has."""
    from memoryd.engine.handle import StateHandle
    from model import StreamState

    state = StreamState.fresh(tiny_model)
    state.append([1, 2, 3])
    assert isinstance(state, StateHandle)
    b = tiny_model.cfg.mini_batch_size
    assert (state.position, state.pending_count, state.nbytes() > 0) == (3, 3 - b * state.steps, True)


# -- in-process engine -----------------------------------------------------------------------------


def test_engine_batches_concurrent_decodes_into_one_forward(tiny_model) -> None:  # noqa: F811
    from memoryd.engine.core import Engine
    from model import StreamState

    async def main() -> tuple[list[int], int]:
        engine = Engine(tiny_model, Budget(tokens=512, rows=16))
        states = [StreamState.fresh(tiny_model) for _ in range(12)]
        for i, s in enumerate(states):
            s.append([1 + i, 2 + i, 3, 7])
        requests = [Generate(s, SamplingParams(max_tokens=1), frozenset()) for s in states]
        results = await asyncio.gather(*(tokens_of(engine, r) for r in requests))
        ticks = engine.ticks
        await engine.close()
        return [r[0][0] for r in results], ticks

    tokens, ticks = asyncio.run(main())
    assert ticks <= 2, f"12 generations started together ran in {ticks} ticks"
    solo = []
    for i in range(12):
        s = StreamState.fresh(tiny_model)
        s.append([1 + i, 2 + i, 3, 7])
        solo.append(int(s.logits().argmax()))
    assert tokens == solo


# -- through the daemon ------------------------------------------------------------------------------


def _metric(port: int, name: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    assert m, name
    return float(m.group(1))


def test_16_concurrent_sessions_equal_16_sequential(tmp_path: Path, tiny_checkpoint: Path, tiny_model, redis_server):  # noqa: F811
    """Appends and greedy committed generations of 16 sessions at once end with exactly the states
    and outputs of the same work done one session at a time, and the decodes really were batched."""
    d = Daemon(tmp_path / "d", tiny_checkpoint, redis_server.url, "--batch-sessions", "16", "--tick-tokens", "40")
    d.start()
    try:
        stub = d.stub()
        rng = random.Random(13)
        work = {
            f"e-{i}": [[rng.randrange(256) for _ in range(rng.randint(1, 30))] for _ in range(3)] for i in range(16)
        }

        def run(sid: str) -> list[list[int]]:
            stub.CreateSession(pb.CreateSessionRequest(session_id=sid))
            outs = []
            for piece in work[sid.removesuffix("-seq")]:
                stub.Append(pb.AppendRequest(session_id=sid, tokens=piece))
                req = pb.GenerateRequest(session_id=sid, max_tokens=6, temperature=0.0, commit=True)
                outs.append([t for r in stub.Generate(req, timeout=60) for t in r.tokens])
            return outs

        rows_before = _metric(d.metrics_port, "memoryd_engine_decode_rows_sum")
        count_before = _metric(d.metrics_port, "memoryd_engine_decode_rows_count")
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            concurrent_out = dict(zip(work, pool.map(run, work), strict=True))
        rows = _metric(d.metrics_port, "memoryd_engine_decode_rows_sum") - rows_before
        count = _metric(d.metrics_port, "memoryd_engine_decode_rows_count") - count_before
        # Appends and solo steps run on the compute lane while the decode lane takes whatever decodes
        # are waiting, so how full a batch is depends on timing here; that several rows did share
        # forwards is what this asserts (full batches: test_engine_batches_concurrent_decodes...).
        assert rows > count, f"decodes were not batched: {rows} rows in {count} forwards"
        for sid in work:
            assert run(sid + "-seq") == concurrent_out[sid], sid
        for i, sid in enumerate(work):
            conc, seq = (
                state_tensors(tiny_model, export_bytes(stub, sid)),
                state_tensors(tiny_model, export_bytes(stub, sid + "-seq")),
            )
            assert_same_state(conc, seq)
            if i < 3:  # and both equal an in-process solo replay of what was committed
                pieces = []
                for p, o in zip(work[sid], concurrent_out[sid], strict=True):
                    pieces += [p, o[:-1] if o and o[-1] == tiny_model.cfg.eos_token_id else o]
                assert_same_state(conc, reference_state(tiny_model, [x for x in pieces if x]))
    finally:
        d.close()
