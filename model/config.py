"""Model configuration: the keys of the checkpoint's `config.json`, validated.

One pydantic model describes all three model types (`ttt-e2e`, `swa`,
`full-attention`) and the Llama-family variant flags, so a checkpoint's
`config.json` is read, validated and written in one place.  Every error names
the key that is wrong and what would be right, because the person reading it
is usually looking at a converted or hand-edited checkpoint.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

ModelType = Literal["ttt-e2e", "swa", "full-attention"]
FORMAT_VERSION = 1


class RopeScaling(BaseModel):
    """Llama 3.1's RoPE frequency scaling (optional config key `rope_scaling`).

    Long wavelengths (beyond `original_max_position_embeddings / low_freq_factor`)
    are divided by `factor`, short ones (below `.../high_freq_factor`) are kept, and
    the band between is interpolated linearly in 1/wavelength.  Only converted
    Llama 3.x checkpoints carry it; the network's own presets use plain RoPE.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    rope_type: Literal["llama3"] = "llama3"
    factor: float = Field(gt=0.0)
    low_freq_factor: float = Field(gt=0.0)
    high_freq_factor: float = Field(gt=0.0)
    original_max_position_embeddings: int = Field(gt=0)

    @model_validator(mode="after")
    def _check(self) -> RopeScaling:
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(
                f"rope_scaling high_freq_factor {self.high_freq_factor} must exceed "
                f"low_freq_factor {self.low_freq_factor}"
            )
        return self


class ModelConfig(BaseModel):
    """Shapes and hyper-parameters of one network (spec: model.md, "Shapes and names")."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model_type: ModelType = "ttt-e2e"
    vocab_size: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    num_layers: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    num_kv_heads: int | None = Field(default=None, gt=0)
    intermediate_size: int = Field(gt=0)
    num_fast_layers: int = Field(default=0, ge=0)
    window_size: int | None = Field(default=None, gt=0)
    mini_batch_size: int = Field(gt=0)
    inner_lr: float = Field(default=1.0, ge=0.0)
    inner_clip: float = Field(default=1.0, gt=0.0)
    rope_theta: float = Field(default=500000.0, gt=0.0)
    rope_scaling: RopeScaling | None = None
    attention_sinks: int = Field(default=0, ge=0)
    """Leading positions every query may attend to besides its window (StreamingLLM's
    sinks).  0 for TTT-E2E as the paper trains it; converted full-attention models
    lean on their first token and lose most of what they lose beyond the window
    without it."""
    sink_horizon: int | None = Field(default=None, gt=0)
    """How far back a query sees the attention sinks (None: at their own positions).  A query
    at position p sees sink j at distance min(p, horizon) - j, so no distance it sees exceeds
    the horizon however long the session grows; up to the horizon nothing changes.  Without
    it a query at p sees the sinks p tokens back, past the range the model was trained on once
    a session is long: the default model (SmolLM2, trained to 8,192 positions) predicts noise
    from about 16K tokens on, with or without test-time steps (bench/long_session.py).  Per
    query, so appending in any cut gives the same result (model.md)."""
    qk_norm: bool = True
    post_norm: bool = True
    tie_embeddings: bool = True
    norm_eps: float = Field(default=1e-6, gt=0.0)
    init_std: float = Field(default=0.02, gt=0.0)
    bos_token_id: int = Field(default=256, ge=0)
    eos_token_id: int = Field(default=257, ge=0)
    tokenizer: str = "bytes"
    chat_template: str | None = None
    format_version: int = FORMAT_VERSION

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        d, h = self.hidden_size, self.num_heads
        if d % h:
            raise ValueError(f"hidden_size {d} must be divisible by num_heads {h}")
        if (d // h) % 2:
            raise ValueError(f"head dim hidden_size/num_heads = {d // h} must be even for RoPE")
        if h % self.kv_heads:
            raise ValueError(f"num_kv_heads {self.kv_heads} must divide num_heads {h}")
        if self.num_fast_layers > self.num_layers:
            raise ValueError(f"num_fast_layers {self.num_fast_layers} exceeds num_layers {self.num_layers}")
        for name in ("bos_token_id", "eos_token_id"):
            if getattr(self, name) >= self.vocab_size:
                raise ValueError(f"{name} {getattr(self, name)} is outside the vocabulary (size {self.vocab_size})")
        if self.format_version != FORMAT_VERSION:
            raise ValueError(
                f"format_version {self.format_version} is not supported (this code reads {FORMAT_VERSION})"
            )
        if self.model_type == "ttt-e2e" and self.num_fast_layers == 0:
            raise ValueError("model_type 'ttt-e2e' needs num_fast_layers >= 1")
        if self.model_type != "ttt-e2e" and self.num_fast_layers:
            raise ValueError(f"model_type {self.model_type!r} has no fast layers: set num_fast_layers 0")
        if self.model_type == "full-attention":
            if self.attention_sinks:
                raise ValueError("attention_sinks only apply with a window: full attention already sees every key")
            if self.window_size is not None:
                raise ValueError("model_type 'full-attention' attends to everything: set window_size null")
        else:
            if self.window_size is None:
                raise ValueError(f"model_type {self.model_type!r} needs a window_size")
            if self.window_size < self.mini_batch_size:
                raise ValueError(
                    f"window_size {self.window_size} must be >= mini_batch_size {self.mini_batch_size}: "
                    "the window has to cover a whole mini-batch"
                )
        if self.sink_horizon is not None:
            if not self.attention_sinks or self.window_size is None:
                raise ValueError("sink_horizon needs attention_sinks and a window: set it null, or set both")
            if self.sink_horizon < self.window_size + self.attention_sinks:
                raise ValueError(
                    f"sink_horizon {self.sink_horizon} must be >= window_size + attention_sinks "
                    f"({self.window_size + self.attention_sinks}): a sink inside a query's window is an ordinary key"
                )
        return self

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def first_fast_layer(self) -> int:
        """Index of the first suffix block: blocks before it never see fast weights."""
        return self.num_layers - self.num_fast_layers

    def to_json_dict(self) -> dict:
        out = self.model_dump(mode="json")
        # Optional keys are written only when set, so configs (and digests) of models
        # that do not use them stay as they were.
        if out["rope_scaling"] is None:
            del out["rope_scaling"]
        if out["attention_sinks"] == 0:
            del out["attention_sinks"]
        if out["sink_horizon"] is None:
            del out["sink_horizon"]
        return out


def _ttt(**kw: object) -> dict:
    base = dict(
        model_type="ttt-e2e",
        vocab_size=128256,
        window_size=8192,
        mini_batch_size=1024,
        rope_theta=500000.0,
    )
    base.update(kw)
    return base


# Reference shapes (the authors' configs/model/*.yaml with the e2e experiment overrides;
# their Llama-3 vocabulary size, but the built-in byte tokenizer until a tokenizer.json is
# placed beside the checkpoint) and small byte-level presets that run on a laptop CPU.
PRESETS: dict[str, dict] = {
    "125m": _ttt(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=1664, num_fast_layers=3),
    "350m": _ttt(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=2304, num_fast_layers=6),
    "760m": _ttt(hidden_size=1536, num_layers=24, num_heads=16, intermediate_size=3328, num_fast_layers=6),
    "1b": _ttt(hidden_size=2048, num_layers=24, num_heads=32, intermediate_size=4352, num_fast_layers=6),
    "3b": _ttt(hidden_size=2560, num_layers=32, num_heads=32, intermediate_size=5632, num_fast_layers=8),
    # Byte-level CPU presets (vocab: 256 bytes + BOS + EOS).
    "tiny": dict(
        vocab_size=258,
        hidden_size=32,
        num_layers=4,
        num_heads=2,
        intermediate_size=64,
        num_fast_layers=1,
        window_size=32,
        mini_batch_size=8,
        rope_theta=10000.0,
    ),
    "small": dict(
        vocab_size=258,
        hidden_size=256,
        num_layers=8,
        num_heads=4,
        intermediate_size=512,
        num_fast_layers=2,
        window_size=512,
        mini_batch_size=128,
        rope_theta=10000.0,
    ),
    "base": dict(
        vocab_size=258,
        hidden_size=512,
        num_layers=8,
        num_heads=8,
        intermediate_size=1024,
        num_fast_layers=2,
        window_size=1024,
        mini_batch_size=256,
        rope_theta=10000.0,
    ),
}


def preset(name: str, **overrides: object) -> ModelConfig:
    """A preset's config, with any keys overridden (validated as a whole)."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})
