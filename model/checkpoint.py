"""Checkpoints: a directory with `config.json` and `model.safetensors` (spec: model.md).

Loading never executes code: JSON and safetensors only.  Every tensor is
checked against the config before the model is built, and each problem is
named (missing, unexpected, misshapen), because a half-loaded model would
silently serve garbage.

A model's *digest* identifies its weights: sha256 over the canonical config JSON
and the safetensors bytes.  Session snapshots record it and are refused under
any other model.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import safetensors.torch
import torch
from pydantic import ValidationError

from model.config import ModelConfig
from model.network import TTTModel

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message says what is wrong and where."""


def _canonical_config(cfg: ModelConfig) -> bytes:
    return json.dumps(cfg.to_json_dict(), sort_keys=True, separators=(",", ":")).encode()


def compute_digest(cfg: ModelConfig, weights: bytes, dtype: torch.dtype = torch.float32) -> str:
    """What names a model for its sessions: config, weight bytes and the dtype it computes in.

    A session's state is only reproducible by replaying its log with the same numerics, so a
    checkpoint served in bfloat16 is another model than the same checkpoint in float32 (its
    sessions are refused, not read with other rounding).  float32, the default, adds nothing:
    digests from before the dtype counted stay valid.
    """
    h = hashlib.sha256()
    h.update(_canonical_config(cfg))
    h.update(weights)
    if dtype != torch.float32:
        h.update(f"|compute dtype {dtype}".encode())
    return "sha256:" + h.hexdigest()


def weights_bytes(model: TTTModel) -> bytes:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    return safetensors.torch.save(tensors)


def digest_of(model: TTTModel) -> str:
    """The model's digest: as loaded (from the files) or computed from its weights."""
    digest = getattr(model, "digest", None)
    if digest is None:
        digest = compute_digest(model.cfg, weights_bytes(model), model.embed.weight.dtype)
        model.digest = digest
    return digest


def save_checkpoint(model: TTTModel, out_dir: str | Path, tokenizer_file: str | Path | None = None) -> str:
    """Write the checkpoint directory; returns the model's digest."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.cfg
    if tokenizer_file is not None:
        shutil.copyfile(tokenizer_file, out / cfg.tokenizer)
    data = weights_bytes(model)
    (out / WEIGHTS_FILE).write_bytes(data)
    (out / CONFIG_FILE).write_text(json.dumps(cfg.to_json_dict(), indent=2) + "\n")
    model.digest = compute_digest(cfg, data)
    return model.digest


def read_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    file = path / CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(f"{path} is not a checkpoint: {CONFIG_FILE} is missing")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file} is not valid JSON: {e}") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{file} must hold a JSON object")
    try:
        return ModelConfig(**raw)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(x) for x in err['loc']) or 'config'}: {err['msg']}" for err in e.errors())
        raise CheckpointError(f"{file} is not a valid model config: {problems}") from e


def check_tensors(model: TTTModel, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Raise CheckpointError naming every missing, unexpected or misshapen tensor."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = []
    for name, shape in expected.items():
        if name not in tensors:
            problems.append(f"missing tensor {name} {list(shape)}")
        elif tuple(tensors[name].shape) != shape:
            problems.append(f"tensor {name} has shape {list(tensors[name].shape)}, expected {list(shape)}")
        elif not tensors[name].dtype.is_floating_point:
            problems.append(f"tensor {name} has dtype {tensors[name].dtype}, expected a float type")
    problems += [f"unexpected tensor {name}" for name in sorted(set(tensors) - set(expected))]
    if problems:
        raise CheckpointError(f"{source} does not match its config: " + "; ".join(problems))


def load_checkpoint(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> TTTModel:
    """Load and validate a checkpoint; the model comes back frozen, in eval mode."""
    path = Path(path)
    cfg = read_config(path)
    wfile = path / WEIGHTS_FILE
    if not wfile.is_file():
        raise CheckpointError(f"{path} is not a checkpoint: {WEIGHTS_FILE} is missing")
    data = wfile.read_bytes()
    try:
        tensors = safetensors.torch.load(data)
    except Exception as e:
        raise CheckpointError(f"{wfile} is not a readable safetensors file: {e}") from e
    with torch.device("meta"):
        model = TTTModel(cfg)
    check_tensors(model, tensors, str(wfile))
    model = model.to_empty(device=device)
    model.load_state_dict(tensors)
    model = model.to(dtype=dtype)
    model.requires_grad_(False).eval()
    model.digest = compute_digest(cfg, data, dtype)
    model.source = str(path)
    return model


def init_model(cfg: ModelConfig, seed: int = 0) -> TTTModel:
    """A randomly initialised model (deterministic for a seed)."""
    model = TTTModel(cfg)
    model.reset_parameters(seed)
    return model
