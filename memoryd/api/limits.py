"""Every limit a request is checked against, in one place: the checks read it and GetModel reports it.

Keeping the numbers here (not scattered as constants beside each check) is what lets
`GetModel.limits` be complete: the checks read the same `ServerLimits` message that
GetModel sends, so a limit a check uses has to be a field of it.
"""

from __future__ import annotations

from memoryd_sdk.proto import memoryd_pb2 as pb

from memoryd.engine.work import SamplingLimits
from memoryd.settings import Settings

MAX_SESSION_ID_CHARS = 128
MAX_APPEND_ID_CHARS = 128
MAX_ROLE_CHARS = 64  # memoryd.sessions.chat.ROLE_RE
MAX_META_ENTRIES, MAX_META_KEY_CHARS, MAX_META_VALUE_CHARS = 64, 128, 4096
MAX_STOP_STRINGS, MAX_STOP_STRING_CHARS, MAX_STOP_TOKENS = 16, 256, 64
MAX_TEMPERATURE = 100.0
DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 100, 1000
DEFAULT_CHUNK_BYTES, MAX_CHUNK_BYTES = 1 << 20, 4 << 20
MIN_CHUNK_BYTES = 4096
"""Export/import data chunks below this cost a message (and its framing) per few bytes: a 100 MB state
in 1-byte chunks is 10^8 messages. 4 KiB keeps the per-message overhead near 1%."""
CHUNK_FRAMING = 1024
"""Room left for a SessionChunk's framing under max_message_bytes."""
MAX_RECALL_K, DEFAULT_RECALL_K = 64, 8
"""Spans one recall may return: 8 is what the benchmark's hit rate is measured at (bench/recall.py); 64
bounds one answer (64 turns of text) and one search's ranking work."""
MAX_RECALL_QUERY_CHARS = 4096
"""A query is a question or a user turn, not a document: 4096 characters (about 1,000 tokens) is a long
turn, and bounds the search's per-term work."""
DEFAULT_RECALL_BUDGET_TOKENS = 512
"""Tokens of recalled context a generation gets by default: half the default model's 1,024-token
window, leaving the other half for the prompt and the reply (eight agent turns fit in it)."""
TEXT_CHARS_PER_TOKEN = 8
"""Text is refused before encoding when it has more characters than this many per allowed token:
no tokenizer here makes tokens longer than that on average, so nothing encodable is lost."""


def sampling_limits(s: Settings, vocab_size: int) -> SamplingLimits:
    """What a GenerateRequest's sampling settings are checked against (`SamplingParams.check`)."""
    return SamplingLimits(
        vocab_size=vocab_size,
        max_tokens=s.max_generate_tokens,
        max_temperature=MAX_TEMPERATURE,
        max_stop=MAX_STOP_STRINGS,
        max_stop_chars=MAX_STOP_STRING_CHARS,
        max_stop_tokens=MAX_STOP_TOKENS,
    )


def server_limits(s: Settings, vocab_size: int, window_size: int) -> pb.ServerLimits:
    """The limits of one server (settings + the served model's vocabulary), as GetModel reports them.

    The checks read this very message, so what a client is told is what it is held to.  `window_size`
    (0: full attention) caps recalled context, which must fit in the attention window."""
    max_chunk = min(MAX_CHUNK_BYTES, s.max_message_bytes - CHUNK_FRAMING)  # settings: max_message_bytes >= 64 KiB
    sampling = sampling_limits(s, vocab_size)
    return pb.ServerLimits(
        max_append_tokens=s.max_append_tokens,
        max_append_text_chars=s.max_append_tokens * TEXT_CHARS_PER_TOKEN,
        max_generate_tokens=s.max_generate_tokens,
        max_message_bytes=s.max_message_bytes,
        max_metadata_entries=MAX_META_ENTRIES,
        max_metadata_key_chars=MAX_META_KEY_CHARS,
        max_metadata_value_chars=MAX_META_VALUE_CHARS,
        max_stop_strings=MAX_STOP_STRINGS,
        max_stop_string_chars=MAX_STOP_STRING_CHARS,
        max_stop_tokens=MAX_STOP_TOKENS,
        max_top_k=vocab_size,
        max_temperature=MAX_TEMPERATURE,
        max_import_bytes=s.max_import_bytes,
        max_sessions_per_tenant=s.max_sessions_per_tenant,
        default_page_size=DEFAULT_PAGE_SIZE,
        max_page_size=MAX_PAGE_SIZE,
        default_chunk_bytes=min(DEFAULT_CHUNK_BYTES, max_chunk),
        min_chunk_bytes=MIN_CHUNK_BYTES,
        max_chunk_bytes=max_chunk,
        max_session_id_chars=MAX_SESSION_ID_CHARS,
        max_append_id_chars=MAX_APPEND_ID_CHARS,
        max_role_chars=MAX_ROLE_CHARS,
        max_n=sampling.max_n,
        max_top_logprobs=sampling.max_top_logprobs,
        max_logit_bias_entries=sampling.max_logit_bias,
        max_recall_k=MAX_RECALL_K,
        default_recall_k=DEFAULT_RECALL_K,
        max_recall_query_chars=MAX_RECALL_QUERY_CHARS,
        default_recall_budget_tokens=min(DEFAULT_RECALL_BUDGET_TOKENS, window_size or DEFAULT_RECALL_BUDGET_TOKENS),
        max_recall_budget_tokens=window_size or s.max_append_tokens,
    )
