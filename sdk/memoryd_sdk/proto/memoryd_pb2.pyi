import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_STOP_STRING: _ClassVar[FinishReason]
    FINISH_REASON_STOP_TOKEN: _ClassVar[FinishReason]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_STOP_STRING: FinishReason
FINISH_REASON_STOP_TOKEN: FinishReason

class Session(_message.Message):
    __slots__ = ("session_id", "tenant", "metadata", "created_at", "last_used_at", "model_digest", "offset", "pending_tokens", "steps", "state_bytes", "hot", "stored_bytes")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_AT_FIELD_NUMBER: _ClassVar[int]
    MODEL_DIGEST_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    PENDING_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    STATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    HOT_FIELD_NUMBER: _ClassVar[int]
    STORED_BYTES_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    tenant: str
    metadata: _containers.ScalarMap[str, str]
    created_at: _timestamp_pb2.Timestamp
    last_used_at: _timestamp_pb2.Timestamp
    model_digest: str
    offset: int
    pending_tokens: int
    steps: int
    state_bytes: int
    hot: bool
    stored_bytes: int
    def __init__(self, session_id: _Optional[str] = ..., tenant: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_used_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., model_digest: _Optional[str] = ..., offset: _Optional[int] = ..., pending_tokens: _Optional[int] = ..., steps: _Optional[int] = ..., state_bytes: _Optional[int] = ..., hot: _Optional[bool] = ..., stored_bytes: _Optional[int] = ...) -> None: ...

class CreateSessionRequest(_message.Message):
    __slots__ = ("session_id", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, session_id: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class GetSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class ListSessionsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListSessionsResponse(_message.Message):
    __slots__ = ("sessions", "next_page_token")
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedCompositeFieldContainer[Session]
    next_page_token: str
    def __init__(self, sessions: _Optional[_Iterable[_Union[Session, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeleteSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class DeleteSessionResponse(_message.Message):
    __slots__ = ("offset",)
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    offset: int
    def __init__(self, offset: _Optional[int] = ...) -> None: ...

class ResetSessionRequest(_message.Message):
    __slots__ = ("session_id", "expected_offset")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_OFFSET_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    expected_offset: int
    def __init__(self, session_id: _Optional[str] = ..., expected_offset: _Optional[int] = ...) -> None: ...

class ForkSessionRequest(_message.Message):
    __slots__ = ("session_id", "new_session_id", "metadata", "expected_offset")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    NEW_SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_OFFSET_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    new_session_id: str
    metadata: _containers.ScalarMap[str, str]
    expected_offset: int
    def __init__(self, session_id: _Optional[str] = ..., new_session_id: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., expected_offset: _Optional[int] = ...) -> None: ...

class UpdateSessionRequest(_message.Message):
    __slots__ = ("session_id", "metadata", "expected_metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    class ExpectedMetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_METADATA_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    metadata: _containers.ScalarMap[str, str]
    expected_metadata: _containers.ScalarMap[str, str]
    def __init__(self, session_id: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., expected_metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class AppendRequest(_message.Message):
    __slots__ = ("session_id", "text", "tokens", "expected_offset", "append_id", "messages")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_OFFSET_FIELD_NUMBER: _ClassVar[int]
    APPEND_ID_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    text: str
    tokens: _containers.RepeatedScalarFieldContainer[int]
    expected_offset: int
    append_id: str
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    def __init__(self, session_id: _Optional[str] = ..., text: _Optional[str] = ..., tokens: _Optional[_Iterable[int]] = ..., expected_offset: _Optional[int] = ..., append_id: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class AppendResponse(_message.Message):
    __slots__ = ("offset", "start_offset", "tokens", "steps", "duplicate", "pending_tokens")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    START_OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    PENDING_TOKENS_FIELD_NUMBER: _ClassVar[int]
    offset: int
    start_offset: int
    tokens: int
    steps: int
    duplicate: bool
    pending_tokens: int
    def __init__(self, offset: _Optional[int] = ..., start_offset: _Optional[int] = ..., tokens: _Optional[int] = ..., steps: _Optional[int] = ..., duplicate: _Optional[bool] = ..., pending_tokens: _Optional[int] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("session_id", "prompt_text", "prompt_tokens", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stop_tokens", "commit", "expected_offset", "append_id", "prompt_messages", "add_generation_prompt", "commit_stop", "commit_suffix", "presence_penalty", "frequency_penalty", "repetition_penalty", "min_p", "logit_bias", "logprobs", "top_logprobs", "n", "recall")
    class LogitBiasEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TEXT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMMIT_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_OFFSET_FIELD_NUMBER: _ClassVar[int]
    APPEND_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_MESSAGES_FIELD_NUMBER: _ClassVar[int]
    ADD_GENERATION_PROMPT_FIELD_NUMBER: _ClassVar[int]
    COMMIT_STOP_FIELD_NUMBER: _ClassVar[int]
    COMMIT_SUFFIX_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    LOGIT_BIAS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    N_FIELD_NUMBER: _ClassVar[int]
    RECALL_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    prompt_text: str
    prompt_tokens: _containers.RepeatedScalarFieldContainer[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    stop_tokens: _containers.RepeatedScalarFieldContainer[int]
    commit: bool
    expected_offset: int
    append_id: str
    prompt_messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    add_generation_prompt: bool
    commit_stop: bool
    commit_suffix: str
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float
    min_p: float
    logit_bias: _containers.ScalarMap[int, float]
    logprobs: bool
    top_logprobs: int
    n: int
    recall: RecallOptions
    def __init__(self, session_id: _Optional[str] = ..., prompt_text: _Optional[str] = ..., prompt_tokens: _Optional[_Iterable[int]] = ..., max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., stop_tokens: _Optional[_Iterable[int]] = ..., commit: _Optional[bool] = ..., expected_offset: _Optional[int] = ..., append_id: _Optional[str] = ..., prompt_messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., add_generation_prompt: _Optional[bool] = ..., commit_stop: _Optional[bool] = ..., commit_suffix: _Optional[str] = ..., presence_penalty: _Optional[float] = ..., frequency_penalty: _Optional[float] = ..., repetition_penalty: _Optional[float] = ..., min_p: _Optional[float] = ..., logit_bias: _Optional[_Mapping[int, float]] = ..., logprobs: _Optional[bool] = ..., top_logprobs: _Optional[int] = ..., n: _Optional[int] = ..., recall: _Optional[_Union[RecallOptions, _Mapping]] = ...) -> None: ...

class RecallOptions(_message.Message):
    __slots__ = ("k", "budget_tokens", "query")
    K_FIELD_NUMBER: _ClassVar[int]
    BUDGET_TOKENS_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    k: int
    budget_tokens: int
    query: str
    def __init__(self, k: _Optional[int] = ..., budget_tokens: _Optional[int] = ..., query: _Optional[str] = ...) -> None: ...

class TopLogprob(_message.Message):
    __slots__ = ("token", "logprob", "text")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    token: int
    logprob: float
    text: str
    def __init__(self, token: _Optional[int] = ..., logprob: _Optional[float] = ..., text: _Optional[str] = ...) -> None: ...

class TokenLogprob(_message.Message):
    __slots__ = ("token", "logprob", "text", "top")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOP_FIELD_NUMBER: _ClassVar[int]
    token: int
    logprob: float
    text: str
    top: _containers.RepeatedCompositeFieldContainer[TopLogprob]
    def __init__(self, token: _Optional[int] = ..., logprob: _Optional[float] = ..., text: _Optional[str] = ..., top: _Optional[_Iterable[_Union[TopLogprob, _Mapping]]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("tokens", "text", "done", "finish_reason", "offset", "generated_tokens", "duplicate", "committed_tokens", "index", "logprobs", "prompt_tokens", "recalled_spans", "recalled_tokens")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    RECALLED_SPANS_FIELD_NUMBER: _ClassVar[int]
    RECALLED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedScalarFieldContainer[int]
    text: str
    done: bool
    finish_reason: FinishReason
    offset: int
    generated_tokens: int
    duplicate: bool
    committed_tokens: int
    index: int
    logprobs: _containers.RepeatedCompositeFieldContainer[TokenLogprob]
    prompt_tokens: int
    recalled_spans: _containers.RepeatedCompositeFieldContainer[RecalledSpan]
    recalled_tokens: int
    def __init__(self, tokens: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., done: _Optional[bool] = ..., finish_reason: _Optional[_Union[FinishReason, str]] = ..., offset: _Optional[int] = ..., generated_tokens: _Optional[int] = ..., duplicate: _Optional[bool] = ..., committed_tokens: _Optional[int] = ..., index: _Optional[int] = ..., logprobs: _Optional[_Iterable[_Union[TokenLogprob, _Mapping]]] = ..., prompt_tokens: _Optional[int] = ..., recalled_spans: _Optional[_Iterable[_Union[RecalledSpan, _Mapping]]] = ..., recalled_tokens: _Optional[int] = ...) -> None: ...

class RecallRequest(_message.Message):
    __slots__ = ("session_id", "query", "k")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    K_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    query: str
    k: int
    def __init__(self, session_id: _Optional[str] = ..., query: _Optional[str] = ..., k: _Optional[int] = ...) -> None: ...

class RecallResponse(_message.Message):
    __slots__ = ("spans",)
    SPANS_FIELD_NUMBER: _ClassVar[int]
    spans: _containers.RepeatedCompositeFieldContainer[RecalledSpan]
    def __init__(self, spans: _Optional[_Iterable[_Union[RecalledSpan, _Mapping]]] = ...) -> None: ...

class ReadLogRequest(_message.Message):
    __slots__ = ("session_id", "last_tokens")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    LAST_TOKENS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    last_tokens: int
    def __init__(self, session_id: _Optional[str] = ..., last_tokens: _Optional[int] = ...) -> None: ...

class LogText(_message.Message):
    __slots__ = ("start_offset", "end_offset", "text")
    START_OFFSET_FIELD_NUMBER: _ClassVar[int]
    END_OFFSET_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    start_offset: int
    end_offset: int
    text: str
    def __init__(self, start_offset: _Optional[int] = ..., end_offset: _Optional[int] = ..., text: _Optional[str] = ...) -> None: ...

class RecalledSpan(_message.Message):
    __slots__ = ("start_offset", "end_offset", "text", "score")
    START_OFFSET_FIELD_NUMBER: _ClassVar[int]
    END_OFFSET_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    start_offset: int
    end_offset: int
    text: str
    score: float
    def __init__(self, start_offset: _Optional[int] = ..., end_offset: _Optional[int] = ..., text: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("digest", "model_type", "name", "vocab_size", "bos_token_id", "eos_token_id", "tokenizer", "chat_template", "chat_messages", "chat_problem", "chat_roles", "generation_prompt", "turn_closing", "window_size", "mini_batch_size", "num_fast_layers", "num_layers", "adapter", "max_append_tokens", "max_generate_tokens", "max_message_bytes", "attention_sinks", "limits")
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    MODEL_TYPE_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    BOS_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FIELD_NUMBER: _ClassVar[int]
    CHAT_TEMPLATE_FIELD_NUMBER: _ClassVar[int]
    CHAT_MESSAGES_FIELD_NUMBER: _ClassVar[int]
    CHAT_PROBLEM_FIELD_NUMBER: _ClassVar[int]
    CHAT_ROLES_FIELD_NUMBER: _ClassVar[int]
    GENERATION_PROMPT_FIELD_NUMBER: _ClassVar[int]
    TURN_CLOSING_FIELD_NUMBER: _ClassVar[int]
    WINDOW_SIZE_FIELD_NUMBER: _ClassVar[int]
    MINI_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_FAST_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    MAX_APPEND_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_GENERATE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_SINKS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    digest: str
    model_type: str
    name: str
    vocab_size: int
    bos_token_id: int
    eos_token_id: int
    tokenizer: str
    chat_template: str
    chat_messages: bool
    chat_problem: str
    chat_roles: _containers.RepeatedScalarFieldContainer[str]
    generation_prompt: str
    turn_closing: str
    window_size: int
    mini_batch_size: int
    num_fast_layers: int
    num_layers: int
    adapter: str
    max_append_tokens: int
    max_generate_tokens: int
    max_message_bytes: int
    attention_sinks: int
    limits: ServerLimits
    def __init__(self, digest: _Optional[str] = ..., model_type: _Optional[str] = ..., name: _Optional[str] = ..., vocab_size: _Optional[int] = ..., bos_token_id: _Optional[int] = ..., eos_token_id: _Optional[int] = ..., tokenizer: _Optional[str] = ..., chat_template: _Optional[str] = ..., chat_messages: _Optional[bool] = ..., chat_problem: _Optional[str] = ..., chat_roles: _Optional[_Iterable[str]] = ..., generation_prompt: _Optional[str] = ..., turn_closing: _Optional[str] = ..., window_size: _Optional[int] = ..., mini_batch_size: _Optional[int] = ..., num_fast_layers: _Optional[int] = ..., num_layers: _Optional[int] = ..., adapter: _Optional[str] = ..., max_append_tokens: _Optional[int] = ..., max_generate_tokens: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., attention_sinks: _Optional[int] = ..., limits: _Optional[_Union[ServerLimits, _Mapping]] = ...) -> None: ...

class ServerLimits(_message.Message):
    __slots__ = ("max_append_tokens", "max_append_text_chars", "max_generate_tokens", "max_message_bytes", "max_metadata_entries", "max_metadata_key_chars", "max_metadata_value_chars", "max_stop_strings", "max_stop_string_chars", "max_stop_tokens", "max_top_k", "max_temperature", "max_import_bytes", "max_sessions_per_tenant", "default_page_size", "max_page_size", "default_chunk_bytes", "min_chunk_bytes", "max_chunk_bytes", "max_session_id_chars", "max_append_id_chars", "max_role_chars", "max_n", "max_top_logprobs", "max_logit_bias_entries", "max_recall_k", "default_recall_k", "max_recall_query_chars", "default_recall_budget_tokens", "max_recall_budget_tokens")
    MAX_APPEND_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_APPEND_TEXT_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_GENERATE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_METADATA_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    MAX_METADATA_KEY_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_METADATA_VALUE_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_STOP_STRINGS_FIELD_NUMBER: _ClassVar[int]
    MAX_STOP_STRING_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_STOP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOP_K_FIELD_NUMBER: _ClassVar[int]
    MAX_TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    MAX_IMPORT_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_PER_TENANT_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    MIN_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSION_ID_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_APPEND_ID_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_ROLE_CHARS_FIELD_NUMBER: _ClassVar[int]
    MAX_N_FIELD_NUMBER: _ClassVar[int]
    MAX_TOP_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    MAX_LOGIT_BIAS_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    MAX_RECALL_K_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_RECALL_K_FIELD_NUMBER: _ClassVar[int]
    MAX_RECALL_QUERY_CHARS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_RECALL_BUDGET_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_RECALL_BUDGET_TOKENS_FIELD_NUMBER: _ClassVar[int]
    max_append_tokens: int
    max_append_text_chars: int
    max_generate_tokens: int
    max_message_bytes: int
    max_metadata_entries: int
    max_metadata_key_chars: int
    max_metadata_value_chars: int
    max_stop_strings: int
    max_stop_string_chars: int
    max_stop_tokens: int
    max_top_k: int
    max_temperature: float
    max_import_bytes: int
    max_sessions_per_tenant: int
    default_page_size: int
    max_page_size: int
    default_chunk_bytes: int
    min_chunk_bytes: int
    max_chunk_bytes: int
    max_session_id_chars: int
    max_append_id_chars: int
    max_role_chars: int
    max_n: int
    max_top_logprobs: int
    max_logit_bias_entries: int
    max_recall_k: int
    default_recall_k: int
    max_recall_query_chars: int
    default_recall_budget_tokens: int
    max_recall_budget_tokens: int
    def __init__(self, max_append_tokens: _Optional[int] = ..., max_append_text_chars: _Optional[int] = ..., max_generate_tokens: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_metadata_entries: _Optional[int] = ..., max_metadata_key_chars: _Optional[int] = ..., max_metadata_value_chars: _Optional[int] = ..., max_stop_strings: _Optional[int] = ..., max_stop_string_chars: _Optional[int] = ..., max_stop_tokens: _Optional[int] = ..., max_top_k: _Optional[int] = ..., max_temperature: _Optional[float] = ..., max_import_bytes: _Optional[int] = ..., max_sessions_per_tenant: _Optional[int] = ..., default_page_size: _Optional[int] = ..., max_page_size: _Optional[int] = ..., default_chunk_bytes: _Optional[int] = ..., min_chunk_bytes: _Optional[int] = ..., max_chunk_bytes: _Optional[int] = ..., max_session_id_chars: _Optional[int] = ..., max_append_id_chars: _Optional[int] = ..., max_role_chars: _Optional[int] = ..., max_n: _Optional[int] = ..., max_top_logprobs: _Optional[int] = ..., max_logit_bias_entries: _Optional[int] = ..., max_recall_k: _Optional[int] = ..., default_recall_k: _Optional[int] = ..., max_recall_query_chars: _Optional[int] = ..., default_recall_budget_tokens: _Optional[int] = ..., max_recall_budget_tokens: _Optional[int] = ...) -> None: ...

class ExportSessionRequest(_message.Message):
    __slots__ = ("session_id", "chunk_bytes")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    chunk_bytes: int
    def __init__(self, session_id: _Optional[str] = ..., chunk_bytes: _Optional[int] = ...) -> None: ...

class ExportHeader(_message.Message):
    __slots__ = ("session_id", "metadata", "model_digest", "offset", "total_bytes", "sha256", "format", "source_session_id", "recall_log_bytes", "recall_log_sha256")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    MODEL_DIGEST_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    RECALL_LOG_BYTES_FIELD_NUMBER: _ClassVar[int]
    RECALL_LOG_SHA256_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    metadata: _containers.ScalarMap[str, str]
    model_digest: str
    offset: int
    total_bytes: int
    sha256: str
    format: str
    source_session_id: str
    recall_log_bytes: int
    recall_log_sha256: str
    def __init__(self, session_id: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., model_digest: _Optional[str] = ..., offset: _Optional[int] = ..., total_bytes: _Optional[int] = ..., sha256: _Optional[str] = ..., format: _Optional[str] = ..., source_session_id: _Optional[str] = ..., recall_log_bytes: _Optional[int] = ..., recall_log_sha256: _Optional[str] = ...) -> None: ...

class SessionChunk(_message.Message):
    __slots__ = ("header", "data", "recall_log")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    RECALL_LOG_FIELD_NUMBER: _ClassVar[int]
    header: ExportHeader
    data: bytes
    recall_log: bytes
    def __init__(self, header: _Optional[_Union[ExportHeader, _Mapping]] = ..., data: _Optional[bytes] = ..., recall_log: _Optional[bytes] = ...) -> None: ...
