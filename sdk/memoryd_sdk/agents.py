"""`MemorydSession`: an OpenAI Agents SDK session whose conversation lives in a memoryd session.

The Agents SDK keeps a conversation in a `Session` (its docs ship SQLite and Redis ones):
the `Runner` reads the history with `get_items`, runs the agent, and stores the new items
with `add_items`.  `MemorydSession` implements that protocol over one memoryd session, so
the conversation is also *memory*:

- **The items themselves** (their JSON, exactly as given) are kept durably with the
  session, in its metadata (`UpdateSession`, one atomic compare-and-set per change), so
  `get_items` returns exactly what was added, after a daemon crash and restart too, and
  they travel with an export.
- **Their text** is appended to the session in its chat format (user and assistant turns,
  tool calls and their outputs as `tool` turns), so the session's model reads the whole
  conversation, and `recall` / `ask` / `MemorydChat` on the same session know it.

What the protocol's mutations do to the model's memory:

- `pop_item` removes the newest item from the items (the next `get_items` no longer has
  it, so the Runner does not send it again).  The session's model has already read its
  text and **cannot un-learn it**: its fast weights took gradient steps on it, and the
  token log keeps it.  A pop does not rewind the weights; to also rewind the memory, fork
  the session before the turn you may want to take back (`AsyncSession.fork`), or
  `clear_session` and start over.
- `clear_session` removes every item **and resets the memoryd session** (offset 0, the
  initial weights): the conversation is gone from the items and from the model.

Limits: the items live in metadata entries of at most 4,096 characters, at most 64 per
session (the daemon's `ServerLimits.max_metadata_*`), so a session holds up to about
250,000 characters of item JSON; `add_items` past that raises `ResourceExhausted` naming
the fix.  One writer per session at a time (as with the Agents SDK's own sessions): a
concurrent change is detected (compare-and-set) and raised, never merged silently.

Install with the SDK's `agents` extra: `pip install "memoryd-sdk[agents]"`.

    from agents import Agent, Runner
    from memoryd_sdk.agents import MemorydSession
    session = MemorydSession("user-42", target="127.0.0.1:50051")
    result = await Runner.run(agent, "What did I tell you yesterday?", session=session)
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from memoryd_sdk.aio import DEFAULT_TARGET, AsyncMemoryClient
from memoryd_sdk.aio_session import AsyncSession
from memoryd_sdk.connection import TLS
from memoryd_sdk.errors import AlreadyExists, MetadataConflict, NotFound, OffsetConflict, ResourceExhausted
from memoryd_sdk.types import SessionInfo

if TYPE_CHECKING:
    from agents.items import TResponseInputItem
    from agents.memory.session_settings import SessionSettings

HEADER = "agents.items"
"""Metadata key of the items' header: JSON {"n": items, "chunks": chunk keys, "v": a nonce per write}."""
CHUNK_PREFIX = "agents.items."
MAX_VALUE_CHARS = 4096
"""The daemon's `ServerLimits.max_metadata_value_chars` (fixed in memoryd/api/limits.py)."""
MAX_ENTRIES = 64
"""The daemon's `ServerLimits.max_metadata_entries`."""
CONFLICT_RETRIES = 3
"""Appends retried after `OffsetConflict` (another writer appended to the session meanwhile; the append id
keeps each retry exactly-once)."""

Turn = tuple[str, str]


# -- items as text -----------------------------------------------------------------------------


def _text_of(content: object) -> str:
    """A message's content as text: a string, or the text of its parts (input_text, output_text, refusal)."""
    if isinstance(content, str):
        return content
    if isinstance(content, Iterable):
        parts = []
        for p in content:
            if isinstance(p, Mapping):
                t = p.get("text") or p.get("refusal")
                if isinstance(t, str):
                    parts.append(t)
        return "\n".join(parts)
    return ""


def turns_of(item: Mapping[str, Any]) -> list[Turn]:
    """The chat turns the session's model reads for one Agents SDK item (none for items without text).

    Messages keep their role (developer as system); a function call is an assistant turn naming
    the call, its output a `tool` turn.  Reasoning and other items carry no conversation text.
    """
    kind = item.get("type")
    role = item.get("role")
    if role is not None and kind in (None, "message"):
        text = _text_of(item.get("content"))
        return [("system" if role == "developer" else str(role), text)] if text else []
    if kind == "function_call":
        return [("assistant", f"[tool call {item.get('name')}({item.get('arguments', '')})]")]
    if kind == "function_call_output":
        out = item.get("output")
        text = out if isinstance(out, str) else _text_of(out) or json.dumps(out)
        return [("tool", text)] if text else []
    return []


# -- items as metadata -------------------------------------------------------------------------


def _lines(items: list[Any]) -> str:
    """JSON lines: one item per line (json.dumps escapes newlines inside strings)."""
    return "".join(json.dumps(i, separators=(",", ":"), sort_keys=False) + "\n" for i in items)


def _chunks(text: str) -> list[str]:
    return [text[i : i + MAX_VALUE_CHARS] for i in range(0, len(text), MAX_VALUE_CHARS)]


def stored_items(metadata: Mapping[str, str]) -> tuple[str, list[Any]]:
    """(the header as stored, '' if none; the items) from a session's metadata."""
    raw = metadata.get(HEADER, "")
    if not raw:
        return "", []
    header = json.loads(raw)
    text = "".join(metadata[f"{CHUNK_PREFIX}{i}"] for i in range(header["chunks"]))
    items = [json.loads(line) for line in text.splitlines()]
    if len(items) != header["n"]:
        raise ValueError(f"the session's stored items are inconsistent: {len(items)} lines, header says {header['n']}")
    return raw, items


def items_update(old: Mapping[str, str], items: list[Any]) -> tuple[dict[str, str], str]:
    """The metadata entries to write so the session holds `items` (changed chunks, removed ones, the header)."""
    chunks = _chunks(_lines(items))
    old_n = json.loads(old[HEADER])["chunks"] if old.get(HEADER) else 0
    patch = {f"{CHUNK_PREFIX}{i}": c for i, c in enumerate(chunks) if old.get(f"{CHUNK_PREFIX}{i}") != c}
    patch |= {f"{CHUNK_PREFIX}{i}": "" for i in range(len(chunks), old_n)}
    header = json.dumps({"n": len(items), "chunks": len(chunks), "v": uuid.uuid4().hex[:12]}) if items else ""
    patch[HEADER] = header
    others = sum(1 for k in old if k != HEADER and not k.startswith(CHUNK_PREFIX))
    if others + len(chunks) + (1 if items else 0) > MAX_ENTRIES:
        raise ResourceExhausted(
            f"the session's items would need {len(chunks)} metadata entries of {MAX_VALUE_CHARS} characters and "
            f"{others} others are used (at most {MAX_ENTRIES}): clear_session(), or use a new session for a new "
            "conversation"
        )
    return patch, header


# -- the session -------------------------------------------------------------------------------


class MemorydSession:
    """An Agents SDK `Session` over the memoryd session `session_id` (created on first use).

    `target` / `token` / `tls` / `timeout` (seconds per call: reading a long item's text takes
    longer on a CPU) as `AsyncMemoryClient`; or pass `client` (then used on the loop it belongs
    to).  Without one, a client is made per event loop (the Runner's `run_sync` runs a fresh
    loop each time, and a gRPC channel belongs to one loop).
    `metadata`: labels for the session when this object creates it.
    """

    session_settings: SessionSettings | None = None

    def __init__(
        self,
        session_id: str,
        *,
        target: str = DEFAULT_TARGET,
        token: str | None = None,
        tls: TLS = None,
        client: AsyncMemoryClient | None = None,
        timeout: float = 30.0,
        metadata: dict[str, str] | None = None,
        session_settings: SessionSettings | None = None,
    ) -> None:
        self.session_id = session_id
        self.target, self.token, self.tls, self.timeout = target, token, tls, timeout
        self.metadata = {"created_by": "openai-agents", **(metadata or {})}
        self.session_settings = session_settings
        self._client = client
        self._clients: dict[int, tuple[asyncio.AbstractEventLoop, AsyncMemoryClient]] = {}

    # -- plumbing ----------------------------------------------------------------------------

    def _aclient(self) -> AsyncMemoryClient:
        if self._client is not None:
            return self._client
        loop = asyncio.get_running_loop()
        held = self._clients.get(id(loop))
        if held is None or held[0] is not loop:
            held = (loop, AsyncMemoryClient(self.target, self.token, self.tls, timeout=self.timeout))
            self._clients[id(loop)] = held
        return held[1]

    async def close(self) -> None:
        """Close the client of the running loop (one passed in is the caller's to close)."""
        held = self._clients.pop(id(asyncio.get_running_loop()), None)
        if held is not None:
            await held[1].close()

    async def _info(self) -> SessionInfo:
        """The session's info, creating the session if it does not exist yet."""
        client = self._aclient()
        try:
            return await client.get_session(self.session_id)
        except NotFound:
            try:
                s = await client.create_session(self.session_id, metadata=self.metadata)
            except AlreadyExists:
                return await client.get_session(self.session_id)
            assert s.last_info is not None
            return s.last_info

    async def _store(self, old: SessionInfo, items: list[Any]) -> None:
        """Make the stored items `items`: one compare-and-set on the header read in `old`."""
        patch, header = items_update(old.metadata, items)
        expected = {HEADER: old.metadata.get(HEADER, "")}
        try:
            await self._aclient().update_session(self.session_id, patch, expected)
        except MetadataConflict:
            now = (await self._info()).metadata.get(HEADER, "")
            if header and now == header:
                return  # our own write landed and its answer was lost: the retry saw it
            raise MetadataConflict(
                f"the items of session {self.session_id!r} were changed by another writer meanwhile; "
                "nothing was stored: read them again (get_items) and retry"
            ) from None

    async def _append_text(self, first_index: int, items: list[Any]) -> None:
        """Append the items' text as chat turns, once: the append id is the items' position and content."""
        turns = [t for i in items for t in turns_of(i)]
        if not turns:
            return
        digest = hashlib.sha256(_lines(items).encode()).hexdigest()[:40]
        aid = f"agents:{first_index}:{digest}"
        s: AsyncSession = self._aclient().session(self.session_id)
        for attempt in range(CONFLICT_RETRIES + 1):
            try:
                await s.add_messages(list(turns), append_id=aid)
                return
            except OffsetConflict:
                if attempt == CONFLICT_RETRIES:
                    raise

    # -- the Agents SDK's Session protocol ---------------------------------------------------

    async def get_items(self, limit: int | None = None) -> list[TResponseInputItem]:
        """The conversation's items, oldest first; with `limit`, the newest `limit` of them."""
        _, items = stored_items((await self._info()).metadata)
        if limit is not None:
            items = items[-limit:] if limit > 0 else []
        return items

    async def add_items(self, items: list[TResponseInputItem]) -> None:
        """Append items: their text to the session (the model reads it), then their JSON to the stored items."""
        if not items:
            return
        info = await self._info()
        _, held = stored_items(info.metadata)
        new = [json.loads(json.dumps(i)) for i in items]  # plain JSON, as it will be read back
        items_update(info.metadata, held + new)  # over the limit: refuse before the model reads anything
        await self._append_text(len(held), new)
        await self._store(info, held + new)

    async def pop_item(self) -> TResponseInputItem | None:
        """Remove and return the newest item (None when there is none).

        The session's model keeps what it read (see the module doc: weights cannot un-learn).
        """
        info = await self._info()
        _, held = stored_items(info.metadata)
        if not held:
            return None
        await self._store(info, held[:-1])
        return held[-1]

    async def clear_session(self) -> None:
        """Remove every item and reset the memoryd session (its model forgets the conversation too)."""
        info = await self._info()
        await self._store(info, [])
        await self._aclient().reset_session(self.session_id)
