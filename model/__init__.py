"""TTT-E2E in PyTorch: the network, its fast weights and its streaming state.

Knows nothing of gRPC, Redis or sessions' names.  The centre is small:
`network.TTTModel` (forward pieces), `inner.inner_step` (the test-time step) and
`state.StreamState` (append tokens, read logits).
"""

from model.checkpoint import CheckpointError, digest_of, init_model, load_checkpoint, save_checkpoint
from model.config import PRESETS, ModelConfig, preset
from model.inner import inner_step
from model.network import TTTModel
from model.snapshot import ModelMismatchError, SnapshotError, state_from_bytes, state_to_bytes
from model.state import AppendReport, InputError, StreamState

__all__ = [
    "PRESETS",
    "AppendReport",
    "CheckpointError",
    "InputError",
    "ModelConfig",
    "ModelMismatchError",
    "SnapshotError",
    "StreamState",
    "TTTModel",
    "digest_of",
    "init_model",
    "inner_step",
    "load_checkpoint",
    "preset",
    "save_checkpoint",
    "state_from_bytes",
    "state_to_bytes",
]
