"""One SDK core (issue 11): the sync client is the async one run on a private loop, so both expose the
same methods with the same parameters, and what the async client once did differently (no
commit_stop/commit_suffix on complete, exports held whole in memory, imports built as one list)
now behaves as the sync client always did, because it is the same code."""

from __future__ import annotations

import asyncio
import inspect
import io
import threading
import tracemalloc

import pytest
from memoryd_sdk import (
    AsyncGenerateStream,
    AsyncMemoryClient,
    AsyncSession,
    FinishReason,
    GenerateStream,
    MemoryClient,
    Session,
)
from memoryd_sdk.blocking import public_methods

pytest.register_assert_rewrite("sdk_fixtures")
from sdk_fixtures import TOKENS  # noqa: E402
from service_fixtures import Daemon  # noqa: E402

pytest_plugins = ["sdk_fixtures"]

PAIRS = [(MemoryClient, AsyncMemoryClient), (Session, AsyncSession), (GenerateStream, AsyncGenerateStream)]


def params(sig: inspect.Signature) -> list[tuple[str, object, object]]:
    return [(p.name, p.kind, p.default) for p in sig.parameters.values()]


@pytest.mark.parametrize(("sync_cls", "async_cls"), PAIRS, ids=lambda c: c.__name__)
def test_same_methods_same_parameters(sync_cls: type, async_cls: type) -> None:
    sync, aio = public_methods(sync_cls), public_methods(async_cls)
    assert set(sync) == set(aio), f"only sync: {set(sync) - set(aio)}; only async: {set(aio) - set(sync)}"
    for name in sync:
        assert params(sync[name]) == params(aio[name]), name
    assert len(sync) >= 3


def test_no_method_is_written_twice() -> None:
    """The sync classes write no call of their own: each public method is a twin made from the async
    one (`blocking.mirror`), except `close`, which also stops the loop thread."""
    for sync_cls, async_cls in PAIRS[:2]:
        for name in public_methods(sync_cls):
            if (sync_cls, name) == (MemoryClient, "close"):
                continue
            assert getattr(getattr(sync_cls, name), "mirrors", None) is vars(async_cls)[name], name


def test_sync_client_is_usable_inside_a_running_loop(sdk_daemon: Daemon) -> None:
    """The sync client's own loop thread means sync code called from async code still works."""

    async def inside() -> int:
        with MemoryClient(sdk_daemon.address, token=TOKENS["alice"]) as c:
            s = c.create_session()
            return s.append("from inside a loop").offset

    assert asyncio.run(inside()) == 18


@pytest.mark.timeout(60)
def test_a_piece_source_may_call_the_sync_client(sdk_daemon: Daemon) -> None:
    """`append_stream` reads a sync source in a worker thread, so a source that itself calls the
    client (a tool that looks something up) does not wait forever on the loop it is holding."""
    with MemoryClient(sdk_daemon.address, token=TOKENS["alice"]) as c:
        s, other = c.create_session(), c.create_session()
        other.append("abcd")

        def pieces():
            yield "offset of the other session: "
            yield str(c.get_session(other.id).offset)

        assert s.append_stream(pieces()).offset == len("offset of the other session: 4")


@pytest.mark.asyncio
async def test_async_complete_commit_stop_and_suffix(sdk_daemon: Daemon) -> None:
    async with AsyncMemoryClient(sdk_daemon.address, token=TOKENS["alice"]) as c:
        s = await c.create_session()
        await s.append("abc")
        peek = await c.complete(s.id, max_tokens=8)
        stop = peek.text[2:4]  # a stop string greedy decoding is sure to write
        assert len(stop) == 2, peek.text
        a, b = (await c.fork_session(s.id)).session_id, (await c.fork_session(s.id)).session_id
        cut = await c.complete(a, max_tokens=8, stop=stop, commit=True, expected_offset=3, commit_suffix="!!")
        whole = await c.complete(b, max_tokens=8, stop=stop, commit=True, commit_stop=True, commit_suffix="!!")
        assert cut.finish_reason == whole.finish_reason == FinishReason.STOP_STRING and cut.tokens == whole.tokens
        assert whole.committed_tokens == whole.generated_tokens + 2  # every sampled token, then the suffix
        assert cut.committed_tokens < whole.committed_tokens  # the stop's tokens left out
        assert (await c.get_session(a)).offset == 3 + cut.committed_tokens


class CountingWriter(io.RawIOBase):
    """A sink that keeps only a byte count and the largest single write (so memory says what was held)."""

    def __init__(self) -> None:
        self.n, self.largest, self.threads = 0, 0, set()

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:  # type: ignore[override]
        self.n += len(b)
        self.largest = max(self.largest, len(b))
        self.threads.add(threading.current_thread().name)
        return len(b)


@pytest.mark.asyncio
async def test_async_export_streams_and_import_reads_lazily(sdk_daemon: Daemon) -> None:
    async with AsyncMemoryClient(sdk_daemon.address, token=TOKENS["alice"]) as c:
        s = await c.create_session()
        await s.append("streamed export " * 20)
        out = CountingWriter()
        tracemalloc.start()
        header = await s.export(out, chunk_bytes=4096)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert out.n > header.total_bytes > 8 * 4096  # header + state, written in pieces
        assert out.largest <= 4096 + 1024  # no write held more than one chunk (+ the file header)
        assert peak < header.total_bytes  # the state was never held whole
        assert threading.current_thread().name not in out.threads  # file I/O off the event loop

        buf = io.BytesIO()
        await s.export(buf)
        data = buf.getvalue()
        reads: list[int] = []

        class Tracked(io.BytesIO):
            def read(self, n: int = -1) -> bytes:  # type: ignore[override]
                reads.append(n)
                return super().read(n)

        src = Tracked(data)
        copy = await c.import_session(src, session_id=f"{s.id}-copy")
        assert copy.offset == s.offset
        assert reads and max(reads) <= 1 << 20  # read a chunk at a time, never the whole file
