"""Tokenizers: built-in bytes (256 byte ids + BOS + EOS) or a Hugging Face tokenizer.json."""

from __future__ import annotations

import codecs
from pathlib import Path
from typing import Protocol

from model.config import ModelConfig


class Tokenizer(Protocol):
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def stream_decoder(self) -> StreamDecoder: ...


class StreamDecoder(Protocol):
    def push(self, token: int) -> str:
        """Text that became complete with this token (may be empty)."""
        ...

    def flush(self) -> str:
        """Whatever is still held back at the end of the stream (an incomplete character as U+FFFD)."""
        ...


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; BOS and EOS come from the config (256, 257 by default)."""

    def __init__(self, bos_id: int = 256, eos_id: int = 257) -> None:
        self.bos_id, self.eos_id = bos_id, eos_id

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def stream_decoder(self) -> StreamDecoder:
        return _ByteStream()


class _ByteStream:
    def __init__(self) -> None:
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self._dec.decode(bytes([token])) if token < 256 else ""

    def flush(self) -> str:
        return self._dec.decode(b"", final=True)


class HFTokenizer:
    """A `tokenizers` tokenizer.json (no transformers needed)."""

    def __init__(self, path: str | Path, bos_id: int, eos_id: int) -> None:
        from tokenizers import Tokenizer as _Tok

        self._tok = _Tok.from_file(str(path))
        self.bos_id, self.eos_id = bos_id, eos_id

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def stream_decoder(self) -> StreamDecoder:
        return _PrefixDiffStream(self)


class _PrefixDiffStream:
    """Decodes the growing id list and emits what was added once it is stable.

    Text ending in U+FFFD may be a multi-byte character still incomplete, so it is
    held back until the next token settles it.
    """

    def __init__(self, tok: HFTokenizer) -> None:
        self._tok, self._ids, self._sent = tok, [], 0

    def push(self, token: int) -> str:
        self._ids.append(token)
        text = self._tok.decode(self._ids)
        if text.endswith("\ufffd"):
            return ""
        delta, self._sent = text[self._sent :], len(text)
        return delta

    def flush(self) -> str:
        text = self._tok.decode(self._ids)
        delta, self._sent = text[self._sent :], len(text)
        return delta


def load_tokenizer(cfg: ModelConfig, checkpoint_dir: str | Path | None) -> Tokenizer:
    if cfg.tokenizer == "bytes":
        return ByteTokenizer(cfg.bos_token_id, cfg.eos_token_id)
    if checkpoint_dir is None:
        raise ValueError(f"the config names tokenizer {cfg.tokenizer!r} but no checkpoint directory holds it")
    path = Path(checkpoint_dir) / cfg.tokenizer
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} named by the config is missing")
    return HFTokenizer(path, cfg.bos_token_id, cfg.eos_token_id)
