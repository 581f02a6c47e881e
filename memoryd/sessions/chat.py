"""Role-tagged messages into session text, with the checkpoint's own chat template.

A checkpoint converted from an instruct model carries its Jinja chat template in
config.json.  Templates come from files on disk, so they are rendered in jinja2's
`ImmutableSandboxedEnvironment` only (no attribute tricks, no mutation of the
arguments), with the same options transformers uses (`trim_blocks`,
`lstrip_blocks`), so the text is the text the model was tuned on.

A session is a stream: messages arrive over many calls, and the text they add must
be the text that rendering the whole conversation at once would give.  Templates
render a conversation as a whole, and some look at more than the message at hand:
SmolLM2's writes a default system prompt before the first message when that
message is not a system message.  So:

- messages that go into an *empty* session (offset 0) open the conversation and
  are rendered as they are (the default system prompt, a BOS token, whatever the
  template puts first, comes with them);
- later messages are rendered after a stand-in first message (`ANCHOR`, a system
  message) and only the text after the stand-in's rendering is used: what the
  template writes for a message that is not first;
- the generation prompt (`add_generation_prompt`) is the text the template adds
  for it after the messages, and a generated reply is closed with the text that
  follows an assistant message's content (`closing`), so that prompt + reply +
  closing is exactly the rendering of the reply as an assistant message.

This holds for templates where a message's text depends on the message itself and
on whether it is the first one, as with ChatML-style templates.  Each template is
checked at load time (`check`) on probe conversations split at every point; one
that fails is reported (`problem`) and messages are refused under it, rather than
written in a shape the model was not tuned on.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path
from typing import TYPE_CHECKING

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

if TYPE_CHECKING:  # annotations only: importing model/ would import torch into the session layer
    from model.config import ModelConfig
    from model.tokenizer import Tokenizer

ROLE_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
"""Matched with fullmatch (`^...$` with `match` lets a trailing newline through)."""
STANDARD_ROLES = frozenset({"system", "user", "assistant", "tool"})
"""The roles chat templates are written for (OpenAI's chat format, which Hugging Face templates follow;
`tool` is an agent's tool output). A template that renders any role string (ChatML's
`<|im_start|>{{ role }}`, SmolLM2's) was still tuned on these, so a role such as "wizard" is refused
rather than written in a shape the model never saw."""
_TAG = re.compile(r"\{[{%](.*?)[%}]\}", re.S)
_QUOTED_WORD = re.compile(r"['\"]([A-Za-z0-9_.-]{1,64})['\"]")
ANCHOR = {"role": "system", "content": "memoryd-anchor"}
_PLACEHOLDER = "memoryd-reply"


@dataclass(frozen=True)
class Message:
    role: str
    content: str

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


class TemplateError(ValueError):
    """The template refused the messages (its raise_exception, or a Jinja error); the message says why."""


class TemplateRefused(TemplateError):
    """The template's own `raise_exception`: it does not accept these messages (e.g. roles out of order)."""


def _raise(message: str) -> None:
    raise TemplateRefused(message)


def template_roles(source: str) -> frozenset[str]:
    """The roles a chat template takes: STANDARD_ROLES plus every role it names itself.

    A role the template names is a quoted word in a tag that reads a message's role
    (Llama 3.1's `message.role == "ipython"`); the keys `role` and `content` are not roles.
    """
    named = set()
    for tag in _TAG.findall(source):
        if "role" in tag:
            named.update(w for w in _QUOTED_WORD.findall(tag) if w not in ("role", "content"))
    return STANDARD_ROLES | named


class ChatFormat:
    """A compiled, checked chat template and the special-token strings message content may not hold."""

    def __init__(
        self,
        template: str,
        bos_token: str = "",
        eos_token: str = "",
        specials: Sequence[str] = (),
        special_ids: Sequence[int] = (),
    ) -> None:
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        self.source = template
        self.roles = template_roles(template)
        self._tpl = env.from_string(template)
        self._extra = {"bos_token": bos_token, "eos_token": eos_token}
        self.specials = tuple(s for s in specials if s)
        self.reply_stop_ids = frozenset(special_ids)
        """The special tokens' ids: a chat reply ends at any of them.  Message content may not hold a special
        token (`check_messages`), so a reply that drew one could not be kept or sent back as a message
        (a small model sometimes opens the next turn itself, `<|im_start|>`, before closing its own)."""
        self.generation_prompt = ""
        self.closing = ""
        self.problem: str | None = None
        try:
            self.generation_prompt = self._suffix([], True)
            self.closing = self._closing()
            self.problem = self.check()
        except (TemplateError, jinja2.TemplateError) as e:
            self.problem = f"the chat template fails on a plain conversation: {e}"

    # -- rendering ---------------------------------------------------------------------------

    def _render(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        try:
            return self._tpl.render(messages=messages, add_generation_prompt=add_generation_prompt, **self._extra)
        except TemplateError:
            raise
        except jinja2.TemplateError as e:
            raise TemplateError(f"the chat template failed: {e}") from e

    def _suffix(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        """What rendering `messages` (and the generation prompt) adds after the stand-in first message."""
        base = self._render([ANCHOR], False)
        full = self._render([ANCHOR, *messages], add_generation_prompt)
        if not full.startswith(base):
            raise TemplateError("the chat template rewrites earlier messages when one is added: it cannot stream")
        return full[len(base) :]

    def _closing(self) -> str:
        """Text after an assistant message's content: rendering it = generation prompt + content + closing."""
        head = self._render([ANCHOR], False) + self.generation_prompt + _PLACEHOLDER
        full = self._render([ANCHOR, {"role": "assistant", "content": _PLACEHOLDER}], False)
        if not full.startswith(head):
            raise TemplateError("an assistant message is not the generation prompt followed by its content")
        return full[len(head) :]

    def render(self, messages: Sequence[Message], start: bool, add_generation_prompt: bool = False) -> str:
        """The text `messages` add to a session; `start`: the session is empty (the conversation opens)."""
        msgs = [m.as_dict() for m in messages]
        if start:
            return self._render(msgs, add_generation_prompt)
        return self._suffix(msgs, add_generation_prompt)

    # -- checks ------------------------------------------------------------------------------

    def check_messages(self, messages: Sequence[Message]) -> None:
        """Roles are names the template takes; content may not hold the model's special tokens (they would
        forge turns)."""
        for i, m in enumerate(messages):
            if not ROLE_RE.fullmatch(m.role):
                raise TemplateError(f"message {i}: role must be 1-64 characters from [A-Za-z0-9_.-], got {m.role!r}")
            if m.role not in self.roles:
                takes = ", ".join(sorted(self.roles))
                raise TemplateError(f"message {i}: role {m.role!r} is not one this chat template takes ({takes})")
            for s in self.specials:
                if s in m.content:
                    raise TemplateError(
                        f"message {i}: content contains {s!r}, a special token of this model's chat format "
                        "(it would end or forge a turn for every later reader of the session); remove it"
                    )

    def check(self) -> str | None:
        """None if incremental rendering equals whole rendering on probe conversations, else why not."""
        probes = [
            [("system", "Be brief."), ("user", "Hi there"), ("assistant", "Hello!"), ("user", "Plans?")],
            [("user", "Hi there"), ("assistant", "Hello!"), ("user", "Plans?"), ("assistant", "None yet.")],
        ]
        checked = 0
        for probe in probes:
            msgs = [Message(r, c) for r, c in probe]
            try:
                problem = self._check_probe(msgs)
            except TemplateRefused:  # a conversation this template does not accept: not its to stream
                continue
            if problem is not None:
                return problem
            checked += 1
        return None if checked else "the chat template refuses every probe conversation"

    def _check_probe(self, msgs: list[Message]) -> str | None:
        """None if `msgs`, cut at every point, stream to the text of rendering them at once."""
        whole = self._render([m.as_dict() for m in msgs], False)
        for cuts in _all_cuts(len(msgs)):
            parts = [msgs[a:b] for a, b in zip((0, *cuts), (*cuts, len(msgs)), strict=True)]
            pieces = [self.render(p, start=i == 0) for i, p in enumerate(parts)]
            if "".join(pieces) != whole:
                return f"rendering {[len(p) for p in parts]} messages at a time differs from rendering them at once"
        for k, m in enumerate(msgs):
            if m.role != "assistant":
                continue
            asked = self.render(msgs[:k], start=True, add_generation_prompt=True)
            streamed = asked + m.content + self.closing
            if streamed != self._render([x.as_dict() for x in msgs[: k + 1]], False):
                return "generation prompt + reply + closing differs from rendering the reply as a message"
        return None


def _all_cuts(n: int) -> list[tuple[int, ...]]:
    return [c for r in range(n) for c in combinations(range(1, n), r)]


def special_tokens(checkpoint_dir: Path, cfg: ModelConfig) -> list[str]:
    """The special-token strings of a tokenizer.json (added tokens marked special)."""
    if cfg.tokenizer == "bytes":
        return []
    path = checkpoint_dir / cfg.tokenizer
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return []
    return [a["content"] for a in data.get("added_tokens", []) if a.get("special") and a.get("content")]


def chat_format_for(cfg: ModelConfig, checkpoint_dir: Path, tokenizer: Tokenizer) -> ChatFormat | None:
    """The checkpoint's chat format, or None when its config has no chat template."""
    if not cfg.chat_template:
        return None
    specials = special_tokens(checkpoint_dir, cfg)
    by_id = {}
    for name, tid in (("bos_token", cfg.bos_token_id), ("eos_token", cfg.eos_token_id)):
        try:
            by_id[name] = tokenizer.decode([tid])
        except (ValueError, IndexError, OverflowError):  # no such id: the template may not use it anyway
            by_id[name] = ""
    ids = [tokenizer.encode(s) for s in specials]
    return ChatFormat(
        cfg.chat_template, by_id["bos_token"], by_id["eos_token"], specials, [i[0] for i in ids if len(i) == 1]
    )
