"""The on-disk form of an exported session, so an export can sit in a file or flow through any byte stream.

Layout (all of it, in order)::

    b"MEMORYD-EXPORT/1\\n"               magic line (format version 1)
    4 bytes, big-endian unsigned         length N of the header
    N bytes                              memoryd.v1.ExportHeader (protobuf; size, sha256, model digest)
    header.total_bytes bytes             the session state (safetensors; never pickle)

The header is the server's own message, so import sends it back unchanged and the
server checks the state bytes against its size and sha256; the SDK checks them too
on the way in and out, so a truncated file fails before any network traffic.
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
    left, digest = header.total_bytes, hashlib.sha256()
    while left:
        piece = src.read(min(chunk, left))
        if not piece:
            raise ExportFormatError(f"the export ends early: {left} of {header.total_bytes} state bytes missing")
        digest.update(piece)
        left -= len(piece)
        yield piece
    if digest.hexdigest() != header.sha256:
        raise ExportFormatError("the export's state bytes do not match the sha256 in its header")
