"""Errors that carry their gRPC status, raised anywhere below the servicer.

The gRPC edge (memoryd/api/service.py) turns them into a status code and message; nothing
here imports grpc, so the session and store layers stay free of it (tests/test_engine.py checks).
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from memoryd.store.heads import Head


class Status(enum.Enum):
    """The gRPC status codes by name and number (grpc.StatusCode[status.name] is the one to send)."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16


class ServiceError(Exception):
    """A failure the caller should see with `code` and a message a person can act on."""

    code: Status = Status.INTERNAL

    def __init__(self, message: str, offset: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.offset = offset
        """The session's current offset, sent as trailing metadata `memoryd-offset`."""


class InvalidArgument(ServiceError):
    code = Status.INVALID_ARGUMENT


class NotFound(ServiceError):
    code = Status.NOT_FOUND


class AlreadyExists(ServiceError):
    code = Status.ALREADY_EXISTS


class Aborted(ServiceError):
    """A compare-and-set refused, nothing changed. `conflict` says on what, sent as the trailing metadata
    `memoryd-conflict` (so a client tells them apart): "offset" (the session is not at the expected offset;
    `offset` says where it is) or "metadata" (an expected metadata entry differs)."""

    code = Status.ABORTED

    def __init__(self, message: str, offset: int | None = None, conflict: str = "offset") -> None:
        super().__init__(message, offset)
        self.conflict = conflict


class ResourceExhausted(ServiceError):
    code = Status.RESOURCE_EXHAUSTED


class FailedPrecondition(ServiceError):
    code = Status.FAILED_PRECONDITION


class ForeignSession(FailedPrecondition):
    """The session was stored under another model: this daemon can describe, export (from its stored
    snapshot) and delete it, but not read, change or copy its state. Carries the head it read."""

    def __init__(self, head: Head, served_digest: str) -> None:
        super().__init__(
            f"session {head.session_id!r} belongs to model {head.digest}; this daemon serves {served_digest}: "
            "use a deployment serving that model (here it can only be described, exported and deleted)"
        )
        self.head = head


class Unavailable(ServiceError):
    code = Status.UNAVAILABLE


class Unauthenticated(ServiceError):
    code = Status.UNAUTHENTICATED


class DataLoss(ServiceError):
    code = Status.DATA_LOSS


class DeadlineExceeded(ServiceError):
    """The caller's deadline passed before its work ran: the work was dropped, nothing changed."""

    code = Status.DEADLINE_EXCEEDED


class Overloaded(ResourceExhausted):
    """Refused before any work: the queue ahead is over the limit or past the caller's deadline.
    `retry_after` (seconds) is sent as the trailer `memoryd-retry-after-ms`; the SDK waits that long."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.trailers = (("memoryd-retry-after-ms", str(max(1, round(retry_after * 1000)))),)
