"""How conversation turns become session text.

When the served model has a chat template (a converted instruct model such as the
default SmolLM2; `MemoryClient.model_info().chat_messages`), `Session.add_message`
and `Session.chat` send role-tagged messages and the *server* formats them with that
template (`ServerTemplate` below stands for it): the session then reads exactly as
the model was tuned to read a conversation, and the reply is closed by the
template's own turn closing, in the same atomic commit.

Otherwise the SDK formats turns itself.  The default, `PlainTemplate`, writes each
turn as::

    <|user|>
    What changed since yesterday?<|end|>
    <|assistant|>
    The deploy was rolled back.<|end|>

i.e. `<|{role}|>` + newline + content + `<|end|>` + newline.  A reply is generated after
the prompt `<|assistant|>\\n` and stops at `<|end|>`; the server commits exactly the
reply text it sent (not the stop string's tokens) followed by the template's `close()`
(`"<|end|>\\n"`), in the same committed generation, so the turn is closed once and
cleanly whichever way the reply ended.

It is plain text on purpose: memoryd's byte-level presets have no special tokens, and
the markers survive any tokenizer.  Any other format plugs in by implementing the
`ChatTemplate` protocol below and passing it as `Session(..., template=...)` or
`MemoryClient(..., template=...)` (an explicit template always wins over the model's).
"""

from __future__ import annotations

import re
from typing import Protocol


class ChatTemplate(Protocol):
    """What `Session.add_message` and `Session.chat` need from a chat format."""

    def turn(self, role: str, content: str) -> str:
        """The text of one whole turn."""
        ...

    def reply_prefix(self, role: str) -> str:
        """Text that opens a turn of `role` for the model to complete."""
        ...

    def stop(self) -> list[str]:
        """Stop strings that end a generated turn."""
        ...

    def close(self) -> str:
        """Text committed right after a reply (cut before its stop string) to close the turn."""
        ...


_ROLE = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # fullmatch: `$` would let a trailing newline through


class PlainTemplate:
    """`<|role|>\\ncontent<|end|>\\n` (see the module docstring)."""

    end = "<|end|>"

    def _check_role(self, role: str) -> None:
        if not _ROLE.fullmatch(role):
            raise ValueError(f"role must be 1-64 characters from [A-Za-z0-9_.-], got {role!r}")

    def turn(self, role: str, content: str) -> str:
        self._check_role(role)
        if self.end in content:
            # The marker inside a turn would end it early for every later reader of the session.
            raise ValueError(f"message content must not contain the turn marker {self.end!r}")
        return f"<|{role}|>\n{content}{self.end}\n"

    def reply_prefix(self, role: str) -> str:
        self._check_role(role)
        return f"<|{role}|>\n"

    def stop(self) -> list[str]:
        return [self.end]

    def close(self) -> str:
        return self.end + "\n"


DEFAULT_TEMPLATE = PlainTemplate()


class ServerTemplate:
    """The served model's own chat template, applied by the server (see the module docstring)."""

    reply_role = "assistant"

    def __repr__(self) -> str:
        return "ServerTemplate()"


SERVER_TEMPLATE = ServerTemplate()


def turn_text(template: ChatTemplate, message: object) -> str:
    """A chat turn (`(role, content)` or `{"role", "content"}`) formatted by a client-side template."""
    from collections.abc import Mapping

    role, content = (message["role"], message["content"]) if isinstance(message, Mapping) else message  # type: ignore[misc]
    return template.turn(role, content)
