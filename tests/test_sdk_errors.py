"""Which SDK exception an ABORTED becomes: OffsetConflict only when the server says the offset conflicted.

A real gRPC server on 127.0.0.1 stands in for a daemon that answers GetSession with ABORTED and the
trailing metadata each case needs (memoryd's own answers are covered end to end in test_sdk_client.py
and test_agents_session.py); the client is the real MemoryClient.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
from memoryd_sdk import Aborted, MemoryClient, MetadataConflict, OffsetConflict

from memoryd.api.service import SERVICE

CASES = {
    "offset": ((("memoryd-offset", "7"), ("memoryd-conflict", "offset")), OffsetConflict, 7),
    "old-daemon-offset": ((("memoryd-offset", "7"),), OffsetConflict, 7),
    "metadata": ((("memoryd-conflict", "metadata"),), MetadataConflict, None),
    "unsaid": ((), Aborted, None),
}


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    def get_session(raw: bytes, context: grpc.ServicerContext) -> bytes:
        trailers, _, _ = CASES[dict(context.invocation_metadata())["case"]]
        context.set_trailing_metadata(trailers)
        context.abort(grpc.StatusCode.ABORTED, "refused")

    handler = grpc.unary_unary_rpc_method_handler(get_session)
    srv = grpc.server(futures.ThreadPoolExecutor(2))
    srv.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE.full_name, {"GetSession": handler}),))
    port = srv.add_insecure_port("127.0.0.1:0")
    srv.start()
    yield f"127.0.0.1:{port}"
    srv.stop(None)


@pytest.mark.parametrize("case", sorted(CASES))
def test_aborted_maps_by_what_conflicted(server: str, case: str) -> None:
    _, cls, offset = CASES[case]
    with MemoryClient(server, metadata=(("case", case),)) as c, pytest.raises(Aborted) as e:
        c.get_session("s")
    assert type(e.value) is cls and e.value.offset == offset and e.value.code == grpc.StatusCode.ABORTED
