"""The character sets of ids and roles, and the checks the gRPC edge runs on them (INVALID_ARGUMENT naming the field).

One place for every id a client names, so the proto, docs/service.md and the checks say the
same thing:

| what | characters | length |
|---|---|---|
| session ids (`session_id`, `new_session_id`, an import header's ids) | `A-Z a-z 0-9 . _ : -` | 1-128 |
| `append_id` | printable ASCII without space (0x21-0x7e) | 1-128 (empty: none) |
| tenants (from the daemon's token config) | `A-Z a-z 0-9 . _ -` | 1-64 |
| chat roles | `A-Z a-z 0-9 _ . -`, and one the model's chat template takes | 1-64 |
| metadata keys | any character but control characters | 1-128 |

Why so narrow: ids travel as gRPC metadata (the SDK sends the session id as
`memoryd-session-id` for load balancers), in Redis key names and hash tags, in log lines and
file names of exports; a newline or a NUL in one is never what a client meant and breaks one of
those. The patterns are matched with `fullmatch`: `re.match(r"^...$")` lets a trailing newline
through (`$` matches before it), which is how a session id ending in "\\n" got past the edge.
"""

from __future__ import annotations

import re
import unicodedata
import uuid
from collections.abc import Mapping

from memoryd.api.limits import (
    MAX_APPEND_ID_CHARS,
    MAX_META_ENTRIES,
    MAX_META_KEY_CHARS,
    MAX_META_VALUE_CHARS,
    MAX_ROLE_CHARS,
    MAX_SESSION_ID_CHARS,
)
from memoryd.errors import InvalidArgument
from memoryd.sessions.chat import ROLE_RE

SESSION_ID_CHARS = "[A-Za-z0-9._:-]"
SESSION_ID_RE = re.compile(rf"{SESSION_ID_CHARS}{{1,{MAX_SESSION_ID_CHARS}}}")
APPEND_ID_RE = re.compile(rf"[\x21-\x7e]{{1,{MAX_APPEND_ID_CHARS}}}")
ROLE_CHARS = "[A-Za-z0-9_.-]"


def _shown(value: str) -> str:
    return repr(value[:140]) + ("..." if len(value) > 140 else "")


def check_session_id(sid: str, field: str = "session_id", allow_empty: bool = False) -> str:
    """`sid`, or a fresh id when it is empty and `allow_empty`; else INVALID_ARGUMENT naming `field`."""
    if not sid and allow_empty:
        return uuid.uuid4().hex
    if not SESSION_ID_RE.fullmatch(sid):
        raise InvalidArgument(
            f"{field} must be 1-{MAX_SESSION_ID_CHARS} characters from {SESSION_ID_CHARS} (letters, digits, "
            f"'.', '_', ':', '-'; no spaces or control characters), got {_shown(sid)}"
        )
    return sid


def check_append_id(aid: str, field: str = "append_id") -> str:
    """`aid` (empty: no append id), or INVALID_ARGUMENT naming `field`."""
    if aid and not APPEND_ID_RE.fullmatch(aid):
        raise InvalidArgument(
            f"{field} must be 1-{MAX_APPEND_ID_CHARS} printable ASCII characters without spaces or control "
            f"characters (0x21-0x7e), got {_shown(aid)}"
        )
    return aid


def _has_control(text: str) -> bool:
    return any(unicodedata.category(c) == "Cc" for c in text)


def _check_entries(m: dict[str, str], field: str) -> dict[str, str]:
    for k, v in m.items():
        if not k or len(k) > MAX_META_KEY_CHARS or _has_control(k):
            raise InvalidArgument(
                f"{field} keys must be 1-{MAX_META_KEY_CHARS} characters without control characters, got {_shown(k)}"
            )
        if len(v) > MAX_META_VALUE_CHARS:
            raise InvalidArgument(f"{field}[{k!r}] has {len(v)} characters; at most {MAX_META_VALUE_CHARS}")
    return m


def check_metadata(meta: Mapping[str, str], field: str = "metadata") -> dict[str, str]:
    """The metadata as a dict, or INVALID_ARGUMENT naming the entry."""
    m = dict(meta)
    if len(m) > MAX_META_ENTRIES:
        raise InvalidArgument(f"{field} has {len(m)} entries; at most {MAX_META_ENTRIES}")
    return _check_entries(m, field)


def check_metadata_patch(meta: Mapping[str, str], field: str) -> dict[str, str]:
    """Entries of an UpdateSession map, each within the limits; the count is checked on the merged result."""
    return _check_entries(dict(meta), field)


def check_role(role: str, field: str, roles: frozenset[str] | None) -> str:
    """A chat role: the character set, then (with a chat template) one of the roles it takes."""
    if not ROLE_RE.fullmatch(role):
        raise InvalidArgument(
            f"{field} must be 1-{MAX_ROLE_CHARS} characters from {ROLE_CHARS} (no spaces or control characters), "
            f"got {_shown(role)}"
        )
    if roles is not None and role not in roles:
        raise InvalidArgument(
            f"{field} {role!r} is not a role this model's chat template takes: use one of {', '.join(sorted(roles))}"
        )
    return role
