"""The on-disk form of an exported session, so an export can sit in a file or flow through any byte stream.

Layout (all of it, in order)::

    b"MEMORYD-EXPORT/1\\n"               magic line (format version 1)
    4 bytes, big-endian unsigned         length N of the header
    N bytes                              memoryd.v1.ExportHeader (protobuf; size, sha256, model digest)
    header.total_bytes bytes             the session state (safetensors; never pickle)
    header.recall_log_bytes bytes        the recall log: the history recall searches (none in
                                         exports from before it; then 0)

The header is the server's own message, so import sends it back unchanged and the
server checks the state bytes and the recall log against their sizes and sha256s; the
SDK checks them too on the way in and out, so a truncated file fails before any network
traffic.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterator
from typing import BinaryIO

from memoryd_sdk.proto import memoryd_pb2 as pb

MAGIC = b"MEMORYD-EXPORT/1\n"
READ_CHUNK = 1 << 20
Dest = str | os.PathLike | BinaryIO
"""A file path, or a binary stream (`open(..., 'wb')`, `io.BytesIO`, a socket's makefile)."""


class ExportFormatError(ValueError):
    """The bytes are not a memoryd export written by this SDK (or were cut short)."""


def write_header(out: BinaryIO, header: pb.ExportHeader) -> None:
    raw = header.SerializeToString()
    out.write(MAGIC + struct.pack(">I", len(raw)) + raw)


def _read_exact(src: BinaryIO, n: int, what: str) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        piece = src.read(n - len(buf))
        if not piece:
            raise ExportFormatError(f"the export ends early: {what} has {len(buf)} of {n} bytes")
        buf += piece
    return bytes(buf)


def read_header(src: BinaryIO) -> pb.ExportHeader:
    magic = _read_exact(src, len(MAGIC), "the magic line")
    if magic != MAGIC:
        raise ExportFormatError(f"not a memoryd export (starts with {magic[:16]!r}, expected {MAGIC!r})")
    (n,) = struct.unpack(">I", _read_exact(src, 4, "the header length"))
    header = pb.ExportHeader()
    header.ParseFromString(_read_exact(src, n, "the header"))
    return header


def iter_data(src: BinaryIO, header: pb.ExportHeader, chunk: int = READ_CHUNK) -> Iterator[bytes]:
    """The state bytes in pieces, checked against the header's size and sha256 once all are read."""
    return _checked(src, header.total_bytes, header.sha256, "state", chunk)


def iter_recall_log(src: BinaryIO, header: pb.ExportHeader, chunk: int = READ_CHUNK) -> Iterator[bytes]:
    """The recall log's bytes (after the state's) in pieces, checked like the state's; none if the
    header announces none."""
    if not header.recall_log_bytes and not header.recall_log_sha256:
        return iter(())
    return _checked(src, header.recall_log_bytes, header.recall_log_sha256, "recall log", chunk)


def _checked(src: BinaryIO, size: int, sha256: str, what: str, chunk: int) -> Iterator[bytes]:
    left, digest = size, hashlib.sha256()
    while left:
        piece = src.read(min(chunk, left))
        if not piece:
            raise ExportFormatError(f"the export ends early: {left} of {size} {what} bytes missing")
        digest.update(piece)
        left -= len(piece)
        yield piece
    if digest.hexdigest() != sha256:
        raise ExportFormatError(f"the export's {what} bytes do not match the sha256 in its header")
