"""The training configuration: one pydantic model, read from YAML or JSON plus overrides.

Every field has a sane default except the data directory and the output
directory, so an experiment file states only what it changes.  Validation
happens here, before any data is read or any weight is built, and errors name
the key, because a typo in a config should cost seconds, not a training run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from model.config import PRESETS, ModelConfig

Mode = Literal["meta", "pretrain"]


class ConfigError(ValueError):
    """A training config that cannot be used; the message names the key and the fix."""


class ModelSpec(BaseModel):
    """Which network to build: a preset plus overrides, or a checkpoint to start from."""

    model_config = ConfigDict(extra="forbid")

    preset: str | None = "small"
    overrides: dict[str, Any] = Field(default_factory=dict)
    init_from: str | None = None
    """A checkpoint directory to start from (extension fine-tuning); its config wins,
    except that `overrides` may change `mini_batch_size`, `window_size` and `inner_lr`."""

    @model_validator(mode="after")
    def _check(self) -> ModelSpec:
        if self.init_from is None and self.preset is None:
            raise ValueError("model needs a preset or init_from")
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        return self


class OptimSpec(BaseModel):
    """Outer AdamW and its schedule (spec: model.md, "Meta-learning"; the authors' optimizers.py)."""

    model_config = ConfigDict(extra="forbid")

    lr: float = Field(default=3e-3, gt=0)
    init_lr: float = Field(default=0.0, ge=0)
    end_lr: float = Field(default=1e-5, ge=0)
    warmup_steps: int = Field(default=10, ge=0)
    b1: float = Field(default=0.9, ge=0, lt=1)
    b2: float = Field(default=0.95, ge=0, lt=1)
    eps: float = Field(default=1e-8, gt=0)
    weight_decay: float = Field(default=0.1, ge=0)
    decay_embedding: bool = True
    """The authors decay every weight (emb_wd=True); False excludes the token embedding."""
    clip: float = Field(default=1.0, gt=0)
    inner_lr_init: float = Field(default=0.1, ge=0)
    """Meta mode: the inner step size warms up linearly from this to the model's
    inner_lr over `inner_warmup_steps` (the authors' ilr_init)."""
    inner_warmup_steps: int | None = Field(default=None, ge=0)
    """None: the same as warmup_steps (as in the authors' configs)."""


class TrainConfig(BaseModel):
    """Everything a training run needs; saved beside every checkpoint it writes."""

    model_config = ConfigDict(extra="forbid")

    mode: Mode = "meta"
    model: ModelSpec = Field(default_factory=ModelSpec)
    data: str
    out: str
    seq_len: int = Field(default=1024, gt=0)
    global_batch: int = Field(default=8, gt=0)
    """Sequences per optimizer step, over all processes and accumulation steps."""
    micro_batch: int = Field(default=1, gt=0)
    """Sequences per forward pass on one process; global_batch / (world * micro_batch)
    micro-batches are accumulated per step."""
    steps: int = Field(default=100, gt=0)
    optim: OptimSpec = Field(default_factory=OptimSpec)
    seed: int = 0
    checkpoint_every: int = Field(default=0, ge=0)
    """Save a resumable checkpoint every N steps (0: only at the end)."""
    log_every: int = Field(default=1, gt=0)
    probe_every: int = Field(default=10, ge=0)
    """Log each mini-batch's inner loss before and after its step every N steps (0: never)."""
    stop_at: int | None = Field(default=None, gt=0)
    """Stop (with a checkpoint) after this step while keeping the schedule of `steps`:
    a run cut short on purpose, resumable later."""
    trainable: Literal["all", "fast"] = "all"
    """"fast": only theta_0, the fast MLPs' initial weights, is learned; the backbone
    stays frozen (adapter meta-learning on a converted pretrained model).  Frozen
    prefix blocks then run without an autograd graph, which makes meta-learning a
    pretrained model affordable on small hardware."""
    activation_checkpointing: bool = True
    threads: int | None = Field(default=None, gt=0)
    device: str = "auto"
    """"auto": CUDA when available, else CPU."""
    bf16: bool = True
    """bf16 autocast on CUDA (CPU always runs fp32)."""
    progress: bool = True

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        if self.global_batch % self.micro_batch:
            raise ValueError(f"global_batch {self.global_batch} must be a multiple of micro_batch {self.micro_batch}")
        return self


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for k in keys[:-1]:
        nxt = node.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"override {dotted!r}: {k!r} is not a section")
        node = nxt
    node[keys[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """KEY=VALUE with a dotted key; the value is parsed as YAML (numbers, bools, lists)."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like key.path=value")
    return key.strip(), yaml.safe_load(raw)


def read_config_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    text = p.read_text()
    try:
        raw = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"{p} is not valid {'JSON' if p.suffix == '.json' else 'YAML'}: {e}") from e
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{p} must hold a mapping of config keys, got {type(raw).__name__}")
    return raw


def build_config(raw: dict[str, Any], overrides: list[str] | None = None, source: str = "config") -> TrainConfig:
    """Validate raw keys plus `key.path=value` overrides; errors name every bad key."""
    tree = json.loads(json.dumps(raw))
    for item in overrides or []:
        _set_path(tree, *parse_override(item))
    try:
        return TrainConfig(**tree)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(x) for x in err['loc']) or 'config'}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"{source} is not a valid training config: {problems}") from e


def load_config(path: str | Path, overrides: list[str] | None = None) -> TrainConfig:
    return build_config(read_config_file(path), overrides, str(path))


def model_config_for(spec: ModelSpec, base: ModelConfig | None = None) -> ModelConfig:
    """The network's config: a preset with overrides, or a checkpoint's with overrides."""
    if base is not None:
        allowed = {"mini_batch_size", "window_size", "inner_lr", "inner_clip", "rope_theta", "attention_sinks"}
        bad = sorted(set(spec.overrides) - allowed)
        if bad:
            raise ConfigError(
                f"model.overrides {bad} cannot change a checkpoint's shapes; only {sorted(allowed)} may be set"
            )
        merged = {**base.to_json_dict(), **spec.overrides}
    else:
        merged = {**PRESETS[spec.preset or ""], **spec.overrides}
    try:
        return ModelConfig(**merged)
    except ValidationError as e:
        problems = "; ".join(
            f"model.overrides.{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in e.errors()
        )
        raise ConfigError(f"invalid model config: {problems}") from e
