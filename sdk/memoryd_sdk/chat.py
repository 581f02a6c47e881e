"""How conversation turns become session text.

The default, `PlainTemplate`, writes each turn as::

    <|user|>
    What changed since yesterday?<|end|>
    <|assistant|>
    The deploy was rolled back.<|end|>

i.e. `<|{role}|>` + newline + content + `<|end|>` + newline.  A reply is generated after
the prompt `<|assistant|>\\n` and stops at `<|end|>` (the "next turn marker"); the
server commits the tokens that formed the stop string, so after the generation the SDK
appends whatever the template says closes the turn (`"\\n"` after a stop string,
`"<|end|>\\n"` after a length or end-of-sequence stop) and the session text stays in
the same shape whichever way a reply ended.

It is plain text on purpose: memoryd's byte-level presets have no special tokens, and
the markers survive any tokenizer.  A checkpoint that ships its own chat template
(special tokens, a Jinja template in its tokenizer config) plugs in by implementing the
`ChatTemplate` protocol below and passing it as `Session(..., template=...)` or
`MemoryClient(..., template=...)`; nothing else in the SDK knows the format.
"""

from __future__ import annotations

import re
from typing import Protocol

from memoryd_sdk.types import FinishReason


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

    def close(self, finish: FinishReason) -> str:
        """Text to append after a committed reply so the turn is closed ('' if nothing)."""
        ...


_ROLE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class PlainTemplate:
    """`<|role|>\\ncontent<|end|>\\n` (see the module docstring)."""

    end = "<|end|>"

    def _check_role(self, role: str) -> None:
        if not _ROLE.match(role):
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

    def close(self, finish: FinishReason) -> str:
        return "\n" if finish == FinishReason.STOP_STRING else self.end + "\n"


DEFAULT_TEMPLATE = PlainTemplate()
