"""Session state to bytes and back: safetensors with a JSON header, never pickle.

The bytes carry the model digest they were made with, the counters, and a
sha256 of every tensor, so that a truncated, corrupted or foreign snapshot is
refused with a message that says which, before any state is built from it.

What a snapshot stores (version 3): what defines a state (`StreamState.tensors()`)
less what the model already holds.  That is the pending token ids, the stepped
key/value caches (none before the first step) and theta, the fast weights, only
once a step has changed them: before its first step a state's theta is the
model's initial theta (`state.initial_theta`), so the header says `"theta":
"initial"` and no fast weight is stored; loading takes the model's, which the
model digest in the header pins down bit for bit.  After a step theta is stored
as it is: an SGD step changes every fast weight (a difference from theta_0 is
dense and as large as theta itself; bench/session_bytes.py measures it), so there
is nothing smaller that stays exact.  The pending tokens' provisional
activations are recomputed on load.

Older versions still load: version 2 stored theta always (a stored theta equal to
the initial one is replaced by the shared tensors on load), version 1 also the
provisional activations (dropped and recomputed).
"""

from __future__ import annotations

import hashlib
import json
import struct

import safetensors.torch
import torch

from model.cache import cache_spec
from model.checkpoint import digest_of
from model.network import TTTModel
from model.state import StreamState

FORMAT = "memoryd-session-state"
VERSION = "3"
READABLE = ("1", "2", "3")
THETA_INITIAL, THETA_STORED = "initial", "stored"
"""The header's `theta`: the model's initial fast weights (none stored), or the stored ones."""


class SnapshotError(ValueError):
    """Bytes that are not a usable snapshot of this model's session state."""


class ModelMismatchError(SnapshotError):
    """A valid snapshot, made with another model."""


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equal (torch.equal takes -0.0 for 0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def state_to_bytes(state: StreamState) -> bytes:
    if state.frozen:  # it read tokens that no log holds, and never stepped them (model/state.py)
        raise ValueError("a frozen state (provisional context, StreamState.frozen_copy) is never persisted")
    initial = state.theta_is_initial()
    tensors = {
        k: v.detach().to("cpu").contiguous()
        for k, v in state.tensors().items()
        if not (initial and k.startswith("fast."))
    }
    meta = {
        "format": FORMAT,
        "version": VERSION,
        "model_digest": digest_of(state.model),
        "position": str(state.position),
        "steps": str(state.steps),
        "inner_lr": repr(float(state.inner_lr)),
        "theta": THETA_INITIAL if initial else THETA_STORED,
        "checksum": _checksum(tensors),
    }
    # One metadata key holding sorted JSON: safetensors writes several keys in hash
    # order, and byte-stable snapshots let stores and exports compare checksums.
    return safetensors.torch.save(tensors, metadata={FORMAT: json.dumps(meta, sort_keys=True)})


def read_metadata(data: bytes) -> dict[str, str]:
    """The snapshot's JSON header metadata, without reading any tensor."""
    if len(data) < 8:
        raise SnapshotError(f"snapshot is truncated: {len(data)} bytes, not even a header")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise SnapshotError(f"snapshot is truncated: header says {n} bytes, {len(data) - 8} follow")
    try:
        header = json.loads(data[8 : 8 + n])
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SnapshotError(f"snapshot header is corrupted: {e}") from e
    outer = header.get("__metadata__") if isinstance(header, dict) else None
    try:
        meta = json.loads(outer[FORMAT]) if isinstance(outer, dict) and FORMAT in outer else None
    except json.JSONDecodeError as e:
        raise SnapshotError(f"snapshot header is corrupted: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not all(isinstance(v, str) for v in meta.values()):
        raise SnapshotError(f"bytes are not a memoryd session snapshot (no {FORMAT} header)")
    if meta.get("version") not in READABLE:
        raise SnapshotError(f"snapshot version {meta.get('version')!r} is not supported (reads {', '.join(READABLE)})")
    return meta


def _expect(cond: bool, msg: str) -> None:
    if not cond:
        raise SnapshotError(f"snapshot is inconsistent: {msg}")


def state_from_bytes(model: TTTModel, data: bytes) -> StreamState:
    """Rebuild a state for `model`; raises SnapshotError / ModelMismatchError."""
    meta = read_metadata(data)
    digest = digest_of(model)
    if meta.get("model_digest") != digest:
        raise ModelMismatchError(f"snapshot was made with model {meta.get('model_digest')}, this model is {digest}")
    try:
        tensors = safetensors.torch.load(bytes(data))
    except Exception as e:
        raise SnapshotError(f"snapshot is corrupted: {e}") from e
    if _checksum(tensors) != meta.get("checksum"):
        raise SnapshotError("snapshot is corrupted: tensor checksum does not match")
    try:
        position, steps, inner_lr = int(meta["position"]), int(meta["steps"]), float(meta["inner_lr"])
    except (KeyError, ValueError) as e:
        raise SnapshotError(f"snapshot counters are missing or malformed: {e}") from e
    if meta["version"] == "1":  # provisional activations: a cache, recomputed below
        tensors = {k: v for k, v in tensors.items() if not k.startswith(("pending.out", "pending_kv."))}
    theta = meta.get("theta", THETA_STORED)  # versions 1 and 2 always stored it
    if theta not in (THETA_INITIAL, THETA_STORED):
        raise SnapshotError(f"snapshot header has theta {theta!r}, expected {THETA_INITIAL!r} or {THETA_STORED!r}")
    return _build(model, tensors, position, steps, inner_lr, theta == THETA_INITIAL)


def _build(
    model: TTTModel, t: dict[str, torch.Tensor], position: int, steps: int, inner_lr: float, theta_initial: bool
) -> StreamState:
    cfg = model.cfg
    fresh = StreamState.fresh(model, inner_lr=inner_lr)
    device, dtype = fresh.pending_out.device, fresh.pending_out.dtype
    b, spec = cfg.mini_batch_size, cache_spec(cfg)
    hkv, hd = cfg.kv_heads, cfg.head_dim

    def take(name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        _expect(name in t, f"tensor {name} is missing")
        x = t.pop(name)
        if shape is not None:
            _expect(tuple(x.shape) == shape, f"tensor {name} has shape {list(x.shape)}, expected {list(shape)}")
        return x

    tokens = take("pending.tokens")
    p = tokens.numel()
    _expect(tokens.dtype == torch.int64 and tokens.dim() == 1, "pending.tokens must be 1-D int64")
    _expect(bool(((tokens >= 0) & (tokens < cfg.vocab_size)).all()), "pending token ids out of vocabulary")
    _expect(
        position == steps * b + p and p <= b and (p > 0 or position == 0),
        f"position {position} does not match {steps} steps and {p} pending tokens",
    )
    state = fresh
    state.position, state.steps = position, steps
    state.pending_tokens = tokens.to(device)
    if theta_initial:  # fresh.fast is the model's shared initial theta
        _expect(not any(k.startswith("fast.") for k in t), "theta is marked initial but fast weights are stored")
    else:
        stored = {k: take(f"fast.{k}", tuple(v.shape[1:])).to(device, v.dtype)[None] for k, v in fresh.fast.items()}
        if steps > 0 or not all(_same_bits(stored[k], v) for k, v in fresh.fast.items()):
            state.fast = stored  # else: an older snapshot's copy of theta_0; keep sharing the model's

    def cache(prefix: str, length: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        if length == 0:
            _expect(f"{prefix}.k" not in t, f"{prefix} should be empty")
            return None
        k = take(f"{prefix}.k", (hkv, length, hd))
        v = take(f"{prefix}.v", (hkv, length, hd))
        return k.to(device, dtype)[None], v.to(device, dtype)[None]

    state.kv = [cache(f"kv.{i}", spec.length(steps * b)) for i in range(cfg.num_layers)]
    _expect(not t, f"unexpected tensors {sorted(t)}")
    with torch.no_grad():
        state.refresh_pending()
    return state
