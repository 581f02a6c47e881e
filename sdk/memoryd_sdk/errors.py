"""One exception class per gRPC status memoryd returns, so agents catch what they can act on.

`grpc.RpcError` says "something failed" and hides the code behind a method call; an agent
wants `except OffsetConflict as e: resume_from(e.offset)`.  Every class keeps the server's
message (it names the field and the limit) and, where the server sent one, the session's
current offset from the trailing metadata `memoryd-offset`.
"""

from __future__ import annotations

from typing import Any

import grpc

OFFSET_KEY = "memoryd-offset"
CONFLICT_KEY = "memoryd-conflict"
"""Sent with ABORTED: what the refused compare-and-set was on ("offset" or "metadata")."""
RETRY_AFTER_KEY = "memoryd-retry-after-ms"
"""Sent with RESOURCE_EXHAUSTED when the daemon refused a call for load (its queue), not for its size."""


class MemorydError(Exception):
    """A failed memoryd call: `code` (grpc.StatusCode), `message`, and `offset` when the server sent one."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    retryable: bool = False
    """Whether the SDK retries it on its own (only statuses where nothing changed, or the server dedups)."""

    retry_after: float | None = None
    """Seconds the server asked the client to wait before trying again (an overloaded daemon), or None."""

    def __init__(self, message: str, offset: int | None = None, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.offset = offset
        if code is not None:
            self.code = code

    def __str__(self) -> str:
        where = f" (session offset {self.offset})" if self.offset is not None else ""
        return f"{self.code.name}: {self.message}{where}"


class InvalidArgument(MemorydError):
    """The request is malformed (bad id, token outside the vocabulary, bad sampling settings); nothing changed."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(MemorydError):
    """No such session in this tenant (or it expired); another tenant's session reads as this too."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(MemorydError):
    """The session id is taken."""

    code = grpc.StatusCode.ALREADY_EXISTS


class Aborted(MemorydError):
    """ABORTED: a compare-and-set was refused and nothing changed (the base of the two below; raised as
    itself only when the server did not say what conflicted, e.g. a proxy's ABORTED)."""

    code = grpc.StatusCode.ABORTED


class OffsetConflict(Aborted):
    """ABORTED: the session is not at the offset this client expected (someone else appended or reset).

    `offset` is the session's current offset, so the caller can re-read and decide; the
    `Session` object has already moved its own `offset` there.
    """


class MetadataConflict(Aborted):
    """ABORTED: an entry of `expected_metadata` differs from the session's (update_session's compare-and-set);
    nothing changed: read the session again and decide."""


class ResourceExhausted(MemorydError):
    """Over a server limit (tokens per append, max_tokens, message size, sessions per tenant)."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(MemorydError):
    """The session (or an export) belongs to another model than the one this daemon serves."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Unauthenticated(MemorydError):
    """Auth is on and the bearer token is missing or unknown."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(MemorydError):
    """Not returned by memoryd today (other tenants' sessions read as NOT_FOUND); kept for proxies in front."""

    code = grpc.StatusCode.PERMISSION_DENIED


class Unavailable(MemorydError):
    """Redis away, daemon shutting down or unreachable, or another daemon holds the lease; safe to retry."""

    code = grpc.StatusCode.UNAVAILABLE
    retryable = True


class DeadlineExceeded(MemorydError):
    """The per-call deadline passed; the call may or may not have landed (appends dedup on retry)."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED
    retryable = True


class Cancelled(MemorydError):
    """The call was cancelled (by this client, or the server going away mid-call)."""

    code = grpc.StatusCode.CANCELLED


class Internal(MemorydError):
    """A server bug; the message says what, and the session is unchanged."""

    code = grpc.StatusCode.INTERNAL


class DataLoss(MemorydError):
    """A stored snapshot or log entry failed its checksum."""

    code = grpc.StatusCode.DATA_LOSS


class Unimplemented(MemorydError):
    """The server does not know this call (an older daemon, or not memoryd at all)."""

    code = grpc.StatusCode.UNIMPLEMENTED


_BY_CODE: dict[grpc.StatusCode, type[MemorydError]] = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        Aborted,
        ResourceExhausted,
        FailedPrecondition,
        Unauthenticated,
        PermissionDenied,
        Unavailable,
        DeadlineExceeded,
        Cancelled,
        Internal,
        DataLoss,
        Unimplemented,
    )
}


def error_class(code: grpc.StatusCode) -> type[MemorydError]:
    """The exception class of a status code (`MemorydError` itself for codes memoryd never sends)."""
    return _BY_CODE.get(code, MemorydError)


def _offset_of(metadata: Any) -> int | None:
    for key, value in metadata or ():
        if key == OFFSET_KEY:
            try:
                return int(value.decode() if isinstance(value, bytes) else value)
            except ValueError:
                return None
    return None


def _retry_after_of(metadata: Any) -> float | None:
    for key, value in metadata or ():
        if key == RETRY_AFTER_KEY:
            try:
                return max(0.0, int(value.decode() if isinstance(value, bytes) else value) / 1000)
            except ValueError:
                return None
    return None


def _conflict_of(metadata: Any) -> str:
    for key, value in metadata or ():
        if key == CONFLICT_KEY:
            return value.decode() if isinstance(value, bytes) else str(value)
    return ""


def _aborted_class(conflict: str, offset: int | None) -> type[Aborted]:
    """Which ABORTED: the server names the conflict (a daemon before `memoryd-conflict` sent the offset only
    with offset conflicts)."""
    if conflict == "metadata":
        return MetadataConflict
    if conflict == "offset" or (not conflict and offset is not None):
        return OffsetConflict
    return Aborted


def from_rpc_error(e: grpc.RpcError) -> MemorydError:
    """The typed exception of a grpc error (sync `grpc.RpcError` or `grpc.aio.AioRpcError`)."""
    code = e.code() if hasattr(e, "code") else grpc.StatusCode.UNKNOWN
    details = (e.details() if hasattr(e, "details") else None) or str(code.name)
    trailing = e.trailing_metadata() if hasattr(e, "trailing_metadata") else None
    offset = _offset_of(trailing)
    cls = _aborted_class(_conflict_of(trailing), offset) if code == grpc.StatusCode.ABORTED else error_class(code)
    err = cls(details, offset=offset, code=code)
    err.retry_after = _retry_after_of(trailing)
    err.__cause__ = e
    return err
