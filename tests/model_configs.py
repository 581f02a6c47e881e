"""Tiny model configs for the model tests: every model type and every variant flag."""

from __future__ import annotations

from model import ModelConfig, preset

# Small enough for naive references and gradcheck; k >= 2b so windows span mini-batches.
MICRO = dict(hidden_size=16, num_heads=2, intermediate_size=16, window_size=12, mini_batch_size=4)

VARIANTS: dict[str, dict] = {
    "ttt-e2e": {},
    "llama-style": dict(num_kv_heads=1, qk_norm=False, post_norm=False, tie_embeddings=False, num_fast_layers=2),
    "sinks": dict(attention_sinks=2),
    "far-sinks": dict(attention_sinks=2, sink_horizon=16),  # sinks seen from 16 back at most (attention.far_sinks)
    "swa": dict(model_type="swa", num_fast_layers=0),
    "full-attention": dict(model_type="full-attention", num_fast_layers=0, window_size=None),
}


def micro(variant: str = "ttt-e2e", **kw: object) -> ModelConfig:
    return preset("tiny", **{**MICRO, **VARIANTS[variant], **kw})
