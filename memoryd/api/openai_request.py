"""An OpenAI chat-completions request, checked field by field and turned into memoryd's terms.

Why a refusal list rather than ignoring what we do not support: an agent that asks for
tools or a JSON response format and silently gets one plain reply will misbehave in ways
that are hard to trace.  Every field is either mapped (model, messages, stop, seed,
max_tokens, stream, user, and memoryd's own `recall`), forwarded by name to the daemon's sampling settings (any field of
`memoryd_sdk.SamplingParams`: temperature, top_p, top_k, min_p, the penalties, logit_bias,
logprobs, top_logprobs, n; their types are checked here, their ranges by the daemon, so a
new sampling parameter needs nothing here), accepted only at its neutral value
(`parallel_tool_calls: false`, a text response format), or refused with OpenAI's error shape
naming it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from memoryd_sdk import SamplingParams

MAX_STOPS = 4
ROLES = ("system", "developer", "user", "assistant", "tool")
AS_SYSTEM = "developer"
"""OpenAI's newer name for system messages: read as a system turn (chat templates know `system`, not this)."""


class RequestError(Exception):
    """A request we refuse: HTTP `status` with OpenAI's `{"error": {message, type, param, code}}`."""

    def __init__(
        self,
        message: str,
        param: str | None = None,
        code: str = "invalid_value",
        *,
        status: int = 400,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.message, self.param, self.code, self.status, self.type = message, param, code, status, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class ChatRequest:
    """What memoryd uses of a chat-completions request."""

    model: str
    messages: tuple[tuple[str, str], ...]
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    temperature: float = 1.0  # OpenAI's default: sampling, not greedy
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    user: str | None = None
    sampling: tuple[tuple[str, Any], ...] = ()
    """Further sampling settings, by their `memoryd_sdk.SamplingParams` names."""
    recall: bool = True
    """memoryd's extension field (`extra_body={"recall": False}`): whether the reply is generated with the
    session's recalled spans placed before the prompt (the generation's recall ask; on by default, as for
    the SDK's `chat`)."""

    @property
    def n(self) -> int:
        return int(dict(self.sampling).get("n", 1))

    @property
    def logprobs(self) -> bool:
        return bool(dict(self.sampling).get("logprobs", False))


# Fields accepted only at the value that means "nothing special": anything else is refused.
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "parallel_tool_calls": (False,),
    "response_format": ({"type": "text"},),
}
MAPPED = {
    "model",
    "messages",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "stop",
    "seed",
    "user",
    "recall",
}
_DEFAULTS = SamplingParams()
FORWARDED = {f.name: getattr(_DEFAULTS, f.name) for f in fields(SamplingParams) if f.name not in MAPPED}
"""Sampling settings passed to the daemon as they are (name -> the SDK's default, whose type they must have)."""


def _forwarded(name: str, v: Any) -> Any:
    """A forwarded setting, checked for its type (the daemon checks its range); JSON keys become ids."""
    like = FORWARDED[name]
    if isinstance(like, bool):
        ok = isinstance(v, bool)
    elif isinstance(like, int | float):
        ok = not isinstance(v, bool) and isinstance(v, int if isinstance(like, int) else int | float)
    elif isinstance(like, Mapping):
        ok = isinstance(v, dict) and all(
            isinstance(k, str) and k.lstrip("-").isdigit() and isinstance(b, int | float) and not isinstance(b, bool)
            for k, b in v.items()
        )
        v = {int(k): float(b) for k, b in v.items()} if ok else v
    elif isinstance(like, Sequence):
        ok = isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)
    else:
        ok = False
    if not ok:
        kind = {bool: "true or false", int: "an integer", float: "a number"}.get(type(like), "")
        kind = kind or ("an object of token id -> number" if isinstance(like, Mapping) else "a list of integers")
        raise RequestError(f"'{name}' must be {kind}, got {v!r}", name, "invalid_type")
    return v


def _number(body: dict[str, Any], name: str, lo: float, hi: float) -> float | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= v <= hi:
        raise RequestError(f"'{name}' must be a number from {lo} to {hi}, got {v!r}", name, "invalid_value")
    return float(v)


def _int(body: dict[str, Any], name: str, lo: int) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise RequestError(f"'{name}' must be an integer of at least {lo}, got {v!r}", name, "invalid_value")
    return v


def _content(m: dict[str, Any], where: str) -> str:
    c = m.get("content")
    if isinstance(c, str):
        return c
    if isinstance(c, list):
        parts = []
        for j, part in enumerate(c):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(
                    f"{where}.content[{j}]: only text parts are supported ({{'type': 'text', 'text': ...}})",
                    f"{where}.content",
                    "unsupported_content",
                )
            parts.append(part["text"])
        return "".join(parts)
    raise RequestError(f"{where}.content must be a string or a list of text parts", f"{where}.content", "invalid_type")


def _messages(raw: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(raw, list) or not raw:
        raise RequestError("'messages' must be a non-empty list of {role, content}", "messages", "invalid_type")
    out = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise RequestError(f"{where} must be an object with 'role' and 'content'", where, "invalid_type")
        extra = sorted(set(m) - {"role", "content"})
        if extra:
            raise RequestError(
                f"{where}.{extra[0]} is not supported by memoryd (messages carry only role and content)",
                f"{where}.{extra[0]}",
                "unsupported_parameter",
            )
        role = m.get("role")
        if role not in ROLES:
            raise RequestError(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}", f"{where}.role")
        out.append(("system" if role == AS_SYSTEM else role, _content(m, where)))
    return tuple(out)


def _stop(raw: Any) -> tuple[str, ...]:
    if raw is None:
        return ()
    stops = [raw] if isinstance(raw, str) else raw
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOPS:
        raise RequestError(f"'stop' must be a string or a list of up to {MAX_STOPS} non-empty strings", "stop")
    return tuple(stops)


def parse_chat_request(body: Any) -> ChatRequest:
    """The request, or `RequestError` naming the first field we cannot honour."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object", None, "invalid_json")
    for name, value in body.items():
        if name in MAPPED or name in FORWARDED or value is None:
            continue
        if name in NEUTRAL:
            if value not in NEUTRAL[name]:
                raise RequestError(
                    f"'{name}' = {value!r} is not supported by memoryd (only {NEUTRAL[name][0]!r})",
                    name,
                    "unsupported_value",
                )
            continue
        raise RequestError(f"'{name}' is not supported by memoryd", name, "unsupported_parameter")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise RequestError("'model' is required (GET /v1/models lists it)", "model", "missing_required_parameter")
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise RequestError("'stream' must be true or false", "stream")
    options = body.get("stream_options")
    if options is not None and (not stream or not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise RequestError("'stream_options' takes only {'include_usage': bool}, with stream", "stream_options")
    if body.get("max_tokens") is not None and body.get("max_completion_tokens") is not None:
        raise RequestError("give 'max_tokens' or 'max_completion_tokens', not both", "max_tokens")
    max_tokens = _int(body, "max_tokens", 1) or _int(body, "max_completion_tokens", 1)
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise RequestError("'user' must be a string (it names the memoryd session)", "user")
    recall = body.get("recall")
    if recall is not None and not isinstance(recall, bool):
        raise RequestError(
            f"'recall' must be true or false (memoryd's extension: recall the session's spans), got {recall!r}",
            "recall",
            "invalid_type",
        )
    _int(body, "n", 1)  # the daemon reads n = 0 as proto3's unset (one sample); OpenAI refuses it
    temperature = _number(body, "temperature", 0, 2)
    top_p = _number(body, "top_p", 0, 1)
    return ChatRequest(
        model=model,
        messages=_messages(body.get("messages")),
        stream=stream,
        include_usage=bool((options or {}).get("include_usage")),
        max_tokens=max_tokens,
        temperature=1.0 if temperature is None else temperature,
        top_p=1.0 if top_p is None else top_p,
        top_k=_int(body, "top_k", 0) or 0,
        stop=_stop(body.get("stop")),
        seed=_int(body, "seed", 0),
        user=user or None,
        recall=True if recall is None else recall,
        sampling=tuple((k, _forwarded(k, v)) for k, v in body.items() if k in FORWARDED and v is not None),
    )
