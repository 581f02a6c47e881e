"""Errors that carry their gRPC status, raised anywhere below the servicer.

The service layer turns them into a status code and message; nothing below it
imports grpc's context, so sessions and store stay testable on their own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc

if TYPE_CHECKING:
    from memoryd.store.heads import Head


class ServiceError(Exception):
    """A failure the caller should see with `code` and a message a person can act on."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, offset: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.offset = offset
        """The session's current offset, sent as trailing metadata `memoryd-offset`."""


class InvalidArgument(ServiceError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(ServiceError):
    code = grpc.StatusCode.ALREADY_EXISTS


class Aborted(ServiceError):
    code = grpc.StatusCode.ABORTED


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


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
    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(ServiceError):
    code = grpc.StatusCode.UNAUTHENTICATED


class DataLoss(ServiceError):
    code = grpc.StatusCode.DATA_LOSS
