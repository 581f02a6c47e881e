"""Helpers of the API-edge tests: raw-bytes calls on any method, tenants, the proto's documented codes."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import grpc
from memoryd_sdk.proto import memoryd_pb2 as pb
from service_fixtures import ROOT, auth_md

SERVICE = pb.DESCRIPTOR.services_by_name["MemoryService"]
PROTO = ROOT / "proto" / "memoryd" / "v1" / "memoryd.proto"
TENANTS = ("edge", "codes", "full", "ids", "limits", "foreign", "bob")
AUTH_FLAG = ",".join(f"tok-{t}={t}" for t in TENANTS)
CODE_NAMES = {c.name for c in grpc.StatusCode}


def md(tenant: str) -> tuple[tuple[str, str], ...]:
    return auth_md(f"tok-{tenant}")


def raw_call(channel: grpc.Channel, method: str, payloads: list[bytes], metadata=(), timeout: float = 30) -> object:
    """Call `method` with these request bytes, as they are (no serializer): one for unary requests, a
    stream for client-streaming ones. Returns the response bytes (a list of them when streamed)."""
    m = SERVICE.methods_by_name[method]
    path = f"/{SERVICE.full_name}/{method}"
    kind = {
        (False, False): channel.unary_unary,
        (False, True): channel.unary_stream,
        (True, False): channel.stream_unary,
        (True, True): channel.stream_stream,
    }[m.client_streaming, m.server_streaming]
    arg = iter(payloads) if m.client_streaming else payloads[0]
    out = kind(path)(arg, metadata=metadata, timeout=timeout)
    return list(out) if m.server_streaming else out


def _error_of(fn: Callable[[], object]) -> grpc.RpcError | None:
    """The error a call ends with, reading a server stream to its end (None: it succeeded)."""
    try:
        r = fn()
        if hasattr(r, "__next__"):
            list(r)
    except grpc.RpcError as e:
        return e
    return None


def status_of(fn: Callable[[], object]) -> grpc.StatusCode:
    e = _error_of(fn)
    return grpc.StatusCode.OK if e is None else e.code()


def rpc_error(fn: Callable[[], object]) -> grpc.RpcError:
    e = _error_of(fn)
    assert e is not None, "the call succeeded"
    return e


def documented_codes(proto: Path = PROTO) -> dict[str, set[str]]:
    """Per rpc, the status codes its comment lists (lines `//   CODE  why`), common codes excluded."""
    text = proto.read_text()
    body = text[text.index("service MemoryService {") :]
    out: dict[str, set[str]] = {}
    codes: set[str] = set()
    for line in body.splitlines():
        m = re.match(r"\s*//\s{2,}([A-Z][A-Z_]+)\b", line)
        if m and m.group(1) in CODE_NAMES:
            codes.add(m.group(1))
        elif r := re.match(r"\s*rpc (\w+)\(", line):
            out[r.group(1)] = codes
            codes = set()
        elif not line.strip().startswith("//"):
            codes = set()
        if line.startswith("}"):
            break
    return out


def common_codes(proto: Path = PROTO) -> set[str]:
    """The codes of the file's "common to every call" section."""
    text = proto.read_text()
    section = text[text.index("Status codes common to every call") : text.index("service MemoryService {")]
    section = section[: section.index("Sessions of another model")]
    return {m.group(1) for m in re.finditer(r"^//\s{2,}([A-Z][A-Z_]+)\b", section, re.M) if m.group(1) in CODE_NAMES}
