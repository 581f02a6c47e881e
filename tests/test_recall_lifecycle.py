"""The recall index across a session's life: real redis-server (AOF), the daemon's own Sessions in process.

The first tests call the daemon's own Sessions in process (what the Recall rpc calls), where a
crash can be placed between two Redis writes; the last go through a real `memoryd serve` and
the SDK. Snapshots every mini-batch, so the session's token log is trimmed all the time and what is
recalled can only come from the recall log. kill -9 is modelled by dropping a Sessions
without its shutdown flush and starting another with the same daemon id, and by SIGKILL
of redis-server (AOF fsync always) and a restart on the same port.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
from cluster_fixtures import LocalCluster, redis_cluster  # noqa: F401 (fixture)
from memoryd_sdk import MemoryClient, Session
from memoryd_sdk import NotFound as SdkNotFound
from sdk_fixtures import TOKENS
from service_fixtures import Daemon, RedisServer, tiny_checkpoint, tiny_model  # noqa: F401 (fixtures)

from memoryd.engine.core import Engine
from memoryd.engine.scheduler import Budget
from memoryd.errors import InvalidArgument, NotFound
from memoryd.sessions.calls import Sessions
from memoryd.sessions.recall import transfer
from memoryd.sessions.recall.pages import Run
from memoryd.settings import Settings
from memoryd.store import heads
from memoryd.store.db import Store
from memoryd.store.redis_client import connect
from model.tokenizer import ByteTokenizer

ASYNC = pytest.mark.asyncio(loop_scope="function")

FACTS = {
    "vault": "The vault access code is QX-7731, changed on 4 May.",
    "sister": "Margarethe, my sister, moved to Valparaiso in April.",
    "invoice": "The invoice from Brightwater Ltd totals 4812 euros.",
    "flight": "Flight LH 2291 to Reykjavik departs from gate B44.",
}
FILLER = "The agent ran the test suite again and summarised the output for the next step of the plan. "


def text_tokens(text: str) -> list[int]:
    return list(text.encode())


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    r = RedisServer(tmp_path / "redis")
    r.start()
    yield r
    r.kill(signal.SIGTERM)


class Harness:
    def __init__(self, url: str, model: object, settings: Settings) -> None:
        self.url, self.model, self.s = url, model, settings
        self.daemons: list[Sessions] = []

    def start(self) -> Sessions:
        store = Store(connect(self.url, 5.0), ttl_seconds=self.s.ttl_seconds)
        engine = Engine(self.model, Budget(tokens=4096, rows=4))
        d = Sessions(engine, ByteTokenizer(), store, self.s)
        self.daemons.append(d)
        return d

    async def crash(self, d: Sessions) -> None:
        """kill -9: nothing flushed, nothing released; only the process's resources go."""
        await d.engine.close()
        await d.store.r.aclose()


@pytest_asyncio.fixture
async def harness(redis_server: RedisServer, tiny_model: object, tmp_path: Path) -> AsyncIterator[Harness]:  # noqa: F811
    s = Settings(instance_id="recall-test", snapshot_interval=1, data_dir=tmp_path / "data", metrics_port=0)
    h = Harness(redis_server.url, tiny_model, s)
    yield h
    for d in h.daemons:
        for task in list(d._bg):
            task.cancel()
        await d.engine.close()
        await d.store.r.aclose()


async def fill(d: Sessions, tenant: str, sid: str, facts: list[str], filler_each: int = 6) -> None:
    for f in facts:
        for _ in range(filler_each):
            await d.append(tenant, sid, text_tokens(FILLER), None, "")
        await d.append(tenant, sid, text_tokens(FACTS[f] + " "), None, "")
    await d.append(tenant, sid, text_tokens(FILLER * 3), None, "")


async def recalled(d: Sessions, key: tuple[str, str], query: str, k: int = 3) -> list[tuple[int, int, str, float]]:
    return [(s.start, s.end, s.text, s.score) for s in await d.recall(key, query, k)]


def found(spans: list[tuple[int, int, str, float]], fact: str) -> bool:
    return any(FACTS[fact][:30] in text for _, _, text, _ in spans)


QUERIES = {
    "vault": "what is the code of the vault?",
    "sister": "where does Margarethe live now?",
    "invoice": "how much does Brightwater want?",
    "flight": "which gate for the Reykjavik flight?",
}


@ASYNC
async def test_recall_survives_snapshots_kill9_and_a_redis_restart(harness: Harness, redis_server: RedisServer) -> None:
    d = harness.start()
    key = ("t1", "s")
    await d.create(*key, {})
    await fill(d, *key, ["vault", "sister", "invoice"])
    head = await heads.read(d.store, *key)
    assert head is not None and head.snap_off > 1000  # the token log was trimmed: recall must not need it
    before = {q: await recalled(d, key, QUERIES[q]) for q in ("vault", "sister", "invoice")}
    for fact, spans in before.items():
        assert found(spans[:1], fact), (fact, spans)
        assert all(0 <= s < e <= head.offset and sc > 0 for s, e, _, sc in spans)
        assert [sc for *_, sc in spans] == sorted((sc for *_, sc in spans), reverse=True)

    await harness.crash(d)
    redis_server.kill(signal.SIGKILL)
    redis_server.start()
    d2 = harness.start()
    after = {q: await recalled(d2, key, QUERIES[q]) for q in before}
    assert after == before  # same spans, same text, bit-identical scores


@ASYNC
async def test_a_crash_between_commit_and_copy_is_caught_up_on_load(harness: Harness) -> None:
    harness.s = harness.s.model_copy(update={"snapshot_interval": 10_000})  # keep the token log whole
    d = harness.start()
    key = ("t1", "c")
    await d.create(*key, {})
    await fill(d, *key, ["vault", "flight"])
    want = await recalled(d, key, QUERIES["flight"])
    assert found(want[:1], "flight")
    await harness.crash(d)
    # what a crash right after the commits and before their copies leaves: a recall log that stops early
    r = Store(connect(harness.url, 5.0))
    tail = "md:rx:{t1}:tail:c"
    data = await r.r.get(tail)
    await r.r.set(tail, data[: len(data) // 2])
    await r.r.aclose()
    d2 = harness.start()
    assert await recalled(d2, key, QUERIES["flight"]) == want


@ASYNC
async def test_a_fork_recalls_only_its_prefix_and_shares_it(harness: Harness) -> None:
    d = harness.start()
    parent, child = ("t1", "p"), ("t1", "f")
    await d.create(*parent, {})
    await fill(d, *parent, ["vault"])
    pages_before = await d.store.r.hlen("md:rx:{t1}:rc")
    info = await d.fork("t1", "p", "f", None, None)
    x = info.head.offset
    # O(1): the fork wrote a tip pointing at the parent's pages (its tail sealed into one more page), no copy
    assert await d.store.r.hlen("md:rx:{t1}:rc") <= pages_before + 1
    assert not await d.store.r.exists("md:rx:{t1}:tail:f")
    await fill(d, *child, ["flight"], filler_each=2)
    await fill(d, *parent, ["invoice"], filler_each=2)

    assert found(await recalled(d, child, QUERIES["vault"]), "vault")
    assert found(await recalled(d, child, QUERIES["flight"]), "flight")
    assert not found(await recalled(d, child, QUERIES["invoice"], k=8), "invoice")
    assert found(await recalled(d, parent, QUERIES["invoice"]), "invoice")
    assert not found(await recalled(d, parent, QUERIES["flight"], k=8), "flight")
    # the fork's spans before X are the parent's spans before X
    vault_child = await recalled(d, child, QUERIES["vault"], k=1)
    assert vault_child[0][1] <= x
    # and from a cold start (rebuilt from Redis), the same answers
    await harness.crash(d)
    d2 = harness.start()
    assert await recalled(d2, child, QUERIES["vault"], k=1) == vault_child
    assert not found(await recalled(d2, child, QUERIES["invoice"], k=8), "invoice")


@ASYNC
async def test_a_fork_of_a_fork_at_a_sealed_page(harness: Harness) -> None:
    d = harness.start()
    await d.create("t1", "a", {})
    await fill(d, "t1", "a", ["vault", "sister", "invoice", "flight"], filler_each=12)  # several 4096-token pages
    await d.fork("t1", "a", "b", None, None)
    await d.append("t1", "b", text_tokens("Unrelated chatter. " * 10), None, "")
    await d.fork("t1", "b", "c", None, None)
    for sid in "abc":
        for fact in FACTS:
            assert found(await recalled(d, ("t1", sid), QUERIES[fact]), fact), (sid, fact)
    await d.delete("t1", "a")
    await d.delete("t1", "b")
    for fact in FACTS:  # c still holds what a and b shared with it
        assert found(await recalled(d, ("t1", "c"), QUERIES[fact]), fact), fact
    await d.delete("t1", "c")
    assert await d.store.r.hlen("md:rx:{t1}:rc") == 0
    assert not [k async for k in d.store.r.scan_iter("md:rx:*")] or set(
        [k async for k in d.store.r.scan_iter("md:rx:*")]
    ) <= {b"md:rx:{t1}:rc"}


@ASYNC
async def test_reset_and_delete_drop_it(harness: Harness) -> None:
    d = harness.start()
    key = ("t1", "r")
    await d.create(*key, {})
    await fill(d, *key, ["vault"])
    assert found(await recalled(d, key, QUERIES["vault"]), "vault")
    await d.reset(*key, None)
    assert await recalled(d, key, QUERIES["vault"], k=8) == []
    await fill(d, *key, ["sister"], filler_each=1)
    assert not found(await recalled(d, key, QUERIES["vault"], k=8), "vault")
    assert found(await recalled(d, key, QUERIES["sister"]), "sister")
    await d.delete(*key)
    with pytest.raises(NotFound):
        await d.recall(key, QUERIES["sister"], 3)
    assert [k async for k in d.store.r.scan_iter("md:rx:*")] in ([], [b"md:rx:{t1}:rc"])
    await d.create(*key, {})  # a new session with the id: nothing of the old one
    await d.append(*key, text_tokens(FILLER), None, "")
    assert not found(await recalled(d, key, QUERIES["sister"], k=8), "sister")


@ASYNC
async def test_another_tenant_gets_not_found(harness: Harness) -> None:
    d = harness.start()
    await d.create("t1", "x", {})
    await fill(d, "t1", "x", ["vault"], filler_each=1)
    with pytest.raises(NotFound):
        await d.recall(("t2", "x"), QUERIES["vault"], 3)
    with pytest.raises(NotFound):
        await d.recall(("t1", "nope"), QUERIES["vault"], 3)


@ASYNC
async def test_a_stale_tip_of_a_deleted_session_is_not_reused(harness: Harness) -> None:
    d = harness.start()
    key = ("t1", "z")
    await d.create(*key, {})
    await fill(d, *key, ["vault"], filler_each=1)
    tip = await d.store.r.hgetall("md:rx:{t1}:tip:z")
    tail = await d.store.r.get("md:rx:{t1}:tail:z")
    await d.delete(*key)
    # a crash between the session's delete and its recall log's: the old tip is still there
    await d.store.r.hset("md:rx:{t1}:tip:z", mapping=tip)
    await d.store.r.set("md:rx:{t1}:tail:z", tail)
    await d.create(*key, {})
    await d.append(*key, text_tokens(FILLER), None, "")
    assert not found(await recalled(d, key, QUERIES["vault"], k=8), "vault")
    await asyncio.sleep(0)


@ASYNC
async def test_on_a_redis_cluster_with_sessions_on_other_slots(
    redis_cluster: LocalCluster,  # noqa: F811
    tiny_model: object,  # noqa: F811
    tmp_path: Path,
) -> None:
    """The recall keys of a tenant share one slot; its sessions' keys are spread over the masters."""
    s = Settings(instance_id="recall-cluster", snapshot_interval=1, data_dir=tmp_path / "data", metrics_port=0)
    h = Harness(redis_cluster.url, tiny_model, s)
    try:
        d = h.start()
        await d.create("tc", "a", {})
        await fill(d, "tc", "a", ["vault", "sister"], filler_each=2)
        await d.fork("tc", "a", "b", None, None)
        await fill(d, "tc", "b", ["flight"], filler_each=1)
        want = {f: await recalled(d, ("tc", "b"), QUERIES[f]) for f in ("vault", "sister", "flight")}
        assert all(found(v[:1], f) for f, v in want.items())
        await h.crash(d)
        d2 = h.start()
        assert {f: await recalled(d2, ("tc", "b"), QUERIES[f]) for f in want} == want
        assert not found(await recalled(d2, ("tc", "a"), QUERIES["flight"], k=8), "flight")
        for sid in "ab":
            await d2.delete("tc", sid)
        assert await d2.store.r.hlen("md:rx:{tc}:rc") == 0
    finally:
        for d in h.daemons:
            await d.engine.close()
            await d.store.r.aclose()


@ASYNC
async def test_import_rebuilds_it_from_the_exports_recall_log(harness: Harness) -> None:
    d = harness.start()
    src = ("t1", "src")
    await d.create(*src, {})
    await fill(d, *src, ["vault", "invoice"])
    want = {f: await recalled(d, src, QUERIES[f]) for f in ("vault", "invoice")}
    head, data = await d.export(*src)
    log = await d.export_recall(head)
    assert log.startswith(transfer.MAGIC) and len(log) > 4 * head.offset  # every token, 4 bytes each

    bad = {
        b"not a recall log": "does not start with",
        log[:-2]: "bytes follow",
        transfer.encode([Run(head.offset - 2, [65, 66, 67])]): "past the state's offset",
        transfer.encode([Run(0, [65, 999])]): "outside the vocabulary",
        transfer.encode([Run(10, [65, 66]), Run(11, [67])]): "overlaps",
    }
    for raw, why in bad.items():
        with pytest.raises(InvalidArgument, match=why):
            await d.import_("t2", "copy", {}, data, head.offset, raw)
        with pytest.raises(NotFound):  # nothing was created
            await d.get("t2", "copy")
    with pytest.raises(InvalidArgument, match="offset"):
        await d.import_("t2", "copy", {}, data, None, log)

    await d.import_("t2", "copy", {}, data, head.offset, log)
    assert {f: await recalled(d, ("t2", "copy"), QUERIES[f]) for f in want} == want
    await fill(d, "t2", "copy", ["flight"], filler_each=1)  # and it grows from there
    grown = {f: await recalled(d, ("t2", "copy"), QUERIES[f]) for f in ("vault", "invoice", "flight")}
    assert all(found(v[:1], f) for f, v in grown.items())
    await harness.crash(d)
    d2 = harness.start()
    assert {f: await recalled(d2, ("t2", "copy"), QUERIES[f]) for f in grown} == grown

    await d2.import_("t2", "bare", {}, data, head.offset)  # an export without its recall log: no history to recall
    assert await recalled(d2, ("t2", "bare"), QUERIES["vault"], k=8) == []


@ASYNC
async def test_ttl_expiry_drops_it(harness: Harness) -> None:
    harness.s = harness.s.model_copy(update={"ttl_seconds": 2, "snapshot_interval": 10_000})  # recall keys: 4 s
    d = harness.start()
    key = ("t1", "ttl")
    await d.create(*key, {})
    await d.append(*key, text_tokens(FILLER + FACTS["vault"]), None, "")
    assert found(await recalled(d, key, QUERIES["vault"]), "vault")
    assert 2 < await d.store.r.ttl("md:rx:{t1}:tip:ttl") <= 4
    await harness.crash(d)  # nothing keeps it alive any more
    await asyncio.sleep(4.5)
    d2 = harness.start()
    assert [k async for k in d2.store.r.scan_iter("md:rx:{t1}:*")] in ([], [b"md:rx:{t1}:rc"])
    with pytest.raises(NotFound):
        await d2.recall(key, QUERIES["vault"], 3)


# -- through a real daemon and the SDK ------------------------------------------------------------

PLAIN = (
    "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from model import init_model, preset, save_checkpoint

    out = tmp_path_factory.mktemp("ckpt-recall-life") / "tiny-chat"
    save_checkpoint(init_model(preset("tiny").model_copy(update={"chat_template": PLAIN}), seed=0), out)
    return out


@pytest.fixture
def served(tmp_path: Path, chat_checkpoint: Path) -> Iterator[tuple[Daemon, RedisServer]]:
    """redis-server (AOF, fsync always) + `memoryd serve` with two tenants, a snapshot every mini-batch."""
    r = RedisServer(tmp_path / "redis")
    r.start()
    tokens = ",".join(f"{tok}={tenant}" for tenant, tok in TOKENS.items())
    d = Daemon(tmp_path / "memoryd", chat_checkpoint, r.url, "--auth-tokens", tokens, "--snapshot-interval", "1")
    try:
        d.start()
        yield d, r
    finally:
        d.close()
        r.kill(signal.SIGTERM)


def told(s: Session, facts: list[str], filler_each: int = 4) -> None:
    for f in facts:
        for _ in range(filler_each):
            s.add_message("tool", FILLER)
        s.add_message("user", FACTS[f])


def spans(s: Session, fact: str, k: int = 3) -> list[tuple[int, int, str, float]]:
    return [(x.start_offset, x.end_offset, x.text, x.score) for x in s.recall(QUERIES[fact], k=k)]


ANSWERS = {"vault": "QX-7731", "sister": "Valparaiso", "invoice": "4812", "flight": "B44"}


def sdk_found(got: list[tuple[int, int, str, float]], fact: str) -> bool:
    """The answer is in a span (byte tokens and no turn token here: 96-byte windows may cut a sentence)."""
    return any(ANSWERS[fact] in text for _, _, text, _ in got)


def test_sdk_recall_is_the_same_after_kill9_of_daemon_and_redis(served: tuple[Daemon, RedisServer]) -> None:
    d, r = served
    with MemoryClient(d.address, token=TOKENS["alice"]) as c:
        s = c.create_session()
        told(s, ["vault", "sister", "invoice"])
        before = {f: spans(s, f) for f in ("vault", "sister", "invoice")}
        assert all(sdk_found(v[:1], f) for f, v in before.items()), before
        sid = s.id
    d.kill(signal.SIGKILL)
    r.kill(signal.SIGKILL)
    r.start()
    d.start()
    with MemoryClient(d.address, token=TOKENS["alice"]) as c:
        s = c.session(sid)
        assert {f: spans(s, f) for f in before} == before
        with MemoryClient(d.address, token=TOKENS["bob"]) as other, pytest.raises(SdkNotFound):
            other.session(sid).recall(QUERIES["vault"])


def test_sdk_fork_reset_delete(served: tuple[Daemon, RedisServer]) -> None:
    d, _ = served
    with MemoryClient(d.address, token=TOKENS["alice"]) as c:
        parent = c.create_session()
        told(parent, ["vault"])
        child = parent.fork()
        told(child, ["flight"], filler_each=1)
        told(parent, ["invoice"], filler_each=1)
        assert sdk_found(spans(child, "vault"), "vault") and sdk_found(spans(child, "flight"), "flight")
        assert not sdk_found(spans(child, "invoice", k=8), "invoice")
        assert sdk_found(spans(parent, "invoice"), "invoice")
        assert not sdk_found(spans(parent, "flight", k=8), "flight")
        assert all(e <= child.info().offset for _, e, _, _ in spans(child, "vault", k=8))
        parent.reset()
        assert parent.recall(QUERIES["vault"], k=8) == []
        assert sdk_found(spans(child, "vault"), "vault")  # the fork keeps what it shared
        parent.delete()
        with pytest.raises(SdkNotFound):
            parent.recall(QUERIES["vault"])
        assert sdk_found(spans(child, "vault"), "vault")
