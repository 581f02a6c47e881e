"""What the gRPC edge tells clients about the served model, as one value built once at startup.

The service reads these fields (GetModel, the request limits, the vocabulary bound on token ids)
and nothing else of the model: memoryd/server.py builds the value from the loaded model's config,
so the edge never reaches through the session layer to the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from model.config import ModelConfig


@dataclass(frozen=True)
class ModelInfo:
    """The served model, as the edge describes it (GetModel's `ModelInfo`, less the server's limits)."""

    name: str
    digest: str
    """The model's digest: sessions are stored under it (model/checkpoint.py: digest_of)."""
    model_type: str
    vocab_size: int
    """Token ids at or above it are refused at the edge."""
    bos_token_id: int
    eos_token_id: int
    tokenizer: str
    """"bytes" or "huggingface"."""
    chat_template: str
    window_size: int
    """Sliding-window attention span (0: full attention)."""
    mini_batch_size: int
    """Tokens per TTT step."""
    num_fast_layers: int
    num_layers: int
    attention_sinks: int
    adapter: str = ""
    """The adapter applied on top of the checkpoint (its path or name; "" for none)."""

    @classmethod
    def of(cls, cfg: ModelConfig, digest: str, name: str = "", adapter: str = "") -> ModelInfo:
        return cls(
            name=name,
            digest=digest,
            model_type=cfg.model_type,
            vocab_size=cfg.vocab_size,
            bos_token_id=cfg.bos_token_id,
            eos_token_id=cfg.eos_token_id,
            tokenizer="bytes" if cfg.tokenizer == "bytes" else "huggingface",
            chat_template=cfg.chat_template or "",
            window_size=cfg.window_size or 0,
            mini_batch_size=cfg.mini_batch_size,
            num_fast_layers=cfg.num_fast_layers,
            num_layers=cfg.num_layers,
            attention_sinks=getattr(cfg, "attention_sinks", 0),
            adapter=adapter,
        )
