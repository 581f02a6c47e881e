"""memoryd SDK: a Python client of the memoryd gRPC service (grpcio + protobuf only; no torch).

    from memoryd_sdk import MemoryClient
    with MemoryClient("127.0.0.1:50051") as client:
        s = client.create_session(metadata={"agent": "planner"})
        s.add_message("user", "The launch moved to Thursday.")
        print(s.chat("When is the launch?", max_tokens=32).text)

Modules, one job each: `aio` (the proto's calls, deadlines, retries: the one core),
`aio_session` (a session as an object: offsets, chat helpers), `aio_generation` (a
generation stream), `client` / `session` / `generation` (the same for sync code: the core
run on a private loop thread by `blocking`), `errors` (one exception per status), `types`
(results), `retry`, `connection` (channels, TLS, tokens), `chat` (turn formats: the model's,
or plain text), `export_file` (an export as a file), `requests` (building the proto
requests), `iterators`, and `langchain` (a LangChain chat model; the `langchain` extra).
The generated stubs live in `memoryd_sdk.proto` (regenerate with scripts/gen_proto.sh).
"""

from memoryd_sdk.aio import AsyncMemoryClient
from memoryd_sdk.aio_generation import AsyncGenerateStream
from memoryd_sdk.aio_session import AsyncSession
from memoryd_sdk.chat import DEFAULT_TEMPLATE, ChatTemplate, PlainTemplate, ServerTemplate
from memoryd_sdk.client import MemoryClient
from memoryd_sdk.errors import (
    Aborted,
    AlreadyExists,
    Cancelled,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    MemorydError,
    MetadataConflict,
    NotFound,
    OffsetConflict,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from memoryd_sdk.export_file import ExportFormatError
from memoryd_sdk.generation import GenerateStream
from memoryd_sdk.requests import SamplingParams
from memoryd_sdk.retry import RetryPolicy
from memoryd_sdk.session import Session
from memoryd_sdk.types import (
    AppendResult,
    ChatReply,
    ExportHeader,
    FinishReason,
    GenerateChunk,
    GenerateResult,
    LogText,
    ModelInfo,
    RecalledSpan,
    RecallOptions,
    Sample,
    SessionInfo,
    TokenLogprob,
)

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_TEMPLATE",
    "Aborted",
    "AlreadyExists",
    "AppendResult",
    "AsyncGenerateStream",
    "AsyncMemoryClient",
    "AsyncSession",
    "Cancelled",
    "ChatReply",
    "ChatTemplate",
    "DataLoss",
    "DeadlineExceeded",
    "ExportFormatError",
    "ExportHeader",
    "FailedPrecondition",
    "FinishReason",
    "GenerateChunk",
    "GenerateResult",
    "GenerateStream",
    "Internal",
    "InvalidArgument",
    "LogText",
    "MemoryClient",
    "MemorydError",
    "MetadataConflict",
    "ModelInfo",
    "NotFound",
    "OffsetConflict",
    "PermissionDenied",
    "PlainTemplate",
    "RecallOptions",
    "RecalledSpan",
    "ResourceExhausted",
    "RetryPolicy",
    "Sample",
    "SamplingParams",
    "ServerTemplate",
    "Session",
    "SessionInfo",
    "TokenLogprob",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
]
