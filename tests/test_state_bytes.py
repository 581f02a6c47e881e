"""What a session costs (issue 17): a state that has taken no step shares the model's initial
fast weights (no copy in memory, none in its snapshot), its byte count is only what it owns,
and every snapshot, with or without theta, old format or new, restores the state of a solo
replay bit for bit."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

from model import SnapshotError, StreamState, init_model, preset, state_from_bytes, state_to_bytes
from model.checkpoint import digest_of
from model.snapshot import FORMAT, _checksum, read_metadata
from model.state import initial_theta

B = 8  # the tiny preset's mini-batch


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return init_model(preset("tiny"), seed=5).requires_grad_(False)


def tokens(n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), generator=g).tolist()


def theta_bytes(model) -> int:
    return sum(t.nbytes for t in initial_theta(model).values())


def owned_bytes(state: StreamState) -> int:
    """What an unstepped state owns, counted by hand: its pending ids, the provisional
    activations and each layer's growing key/value buffer."""
    live = sum(2 * x.buf.k.nbytes for x in state.live_kv if x is not None)
    return state.pending_tokens.untyped_storage().nbytes() + state.pending_out.untyped_storage().nbytes() + live


def solo(model, pieces: list[list[int]]) -> StreamState:
    s = StreamState.fresh(model)
    for p in pieces:
        s.append(p)
    return s


def assert_same(a: StreamState, b: StreamState) -> None:
    ta, tb = a.tensors(), b.tensors()
    assert sorted(ta) == sorted(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape, k
        assert torch.equal(ta[k].view(torch.uint8), tb[k].view(torch.uint8)), k
    assert (a.position, a.steps) == (b.position, b.steps)
    assert torch.equal(a.logits(), b.logits())


def v2_bytes(state: StreamState) -> bytes:
    """The bytes the version 2 writer made (theta always stored, no `theta` header key)."""
    tensors = {k: v.detach().contiguous() for k, v in state.tensors().items()}
    meta = {
        "format": FORMAT,
        "version": "2",
        "model_digest": digest_of(state.model),
        "position": str(state.position),
        "steps": str(state.steps),
        "inner_lr": repr(float(state.inner_lr)),
        "checksum": _checksum(tensors),
    }
    return safetensors.torch.save(tensors, metadata={FORMAT: json.dumps(meta, sort_keys=True)})


# -- in memory ---------------------------------------------------------------------------------


def test_unstepped_states_share_the_models_theta(model):
    a, b = StreamState.fresh(model), solo(model, [tokens(5)])
    params = model.initial_fast_weights()
    for k, p in params.items():
        # float32: theta_0 is a view of the model's own parameter, so no session copies it
        assert a.fast[k].untyped_storage().data_ptr() == p.untyped_storage().data_ptr(), k
        assert b.fast[k] is a.fast[k], k
    assert a.theta_is_initial() and b.theta_is_initial()
    assert a.nbytes() == 0
    assert b.nbytes() == owned_bytes(b) > 0
    assert b.nbytes() < theta_bytes(model)


def test_a_step_makes_theta_the_sessions_own(model):
    s = solo(model, [tokens(B + 3)])
    assert s.steps == 1 and not s.theta_is_initial()
    init = initial_theta(model)
    assert all(not torch.equal(s.fast[k], init[k]) for k in init), "an SGD step changes every fast weight"
    own_theta = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in s.fast.values()}.values())
    assert own_theta >= theta_bytes(model)
    assert s.nbytes() == own_theta + owned_bytes(s)


def test_a_fork_of_an_unstepped_state_still_shares(model):
    a = solo(model, [tokens(6)])
    b = a.clone()
    b.append(tokens(1, seed=3))
    assert b.theta_is_initial() and a.theta_is_initial()
    b.append(tokens(B, seed=4))
    assert not b.theta_is_initial() and a.theta_is_initial()


def test_a_half_precision_model_copies_theta_once_not_per_session():
    m = init_model(preset("tiny"), seed=6).requires_grad_(False).to(torch.bfloat16)
    a, b = StreamState.fresh(m), StreamState.fresh(m)
    for k in a.fast:
        assert a.fast[k].dtype == torch.float32 and a.fast[k] is b.fast[k], k
    assert a.nbytes() == 0
    # the cached copy follows the parameters (an optimizer step, an adapter load)
    name = next(iter(a.fast))
    param = dict(m.named_parameters())[name]
    with torch.no_grad():
        param.add_(1.0)
    c = StreamState.fresh(m)
    assert torch.equal(c.fast[name][0], param.float()) and not torch.equal(c.fast[name], a.fast[name])
    assert not a.theta_is_initial() and c.theta_is_initial()


# -- snapshots ---------------------------------------------------------------------------------


@pytest.mark.parametrize("pieces", [[], [[7]], [tokens(3), tokens(2, 1)], [tokens(B)]])
def test_an_unstepped_snapshot_stores_no_theta_and_restores_bit_exact(model, pieces):
    s = solo(model, pieces) if pieces else StreamState.fresh(model)
    data = state_to_bytes(s)
    assert read_metadata(data)["theta"] == "initial"
    stored = safetensors.torch.load(data)
    assert not any(k.startswith("fast.") for k in stored)
    assert len(data) < theta_bytes(model)
    back = state_from_bytes(model, data)
    assert back.theta_is_initial() and back.nbytes() == s.nbytes()
    assert state_to_bytes(back) == data
    if pieces:
        # against a replay of the log in one call: the state does not depend on the cut either
        assert_same(back, solo(model, [[t for p in pieces for t in p]]))
        more = tokens(2 * B + 1, seed=9)
        back.append(more)
        s.append(more)
        assert_same(back, s)


def test_a_stepped_snapshot_stores_theta_and_restores_bit_exact(model):
    pieces = [tokens(5), tokens(B * 3 + 2, 1), tokens(1, 2)]
    s = solo(model, pieces)
    assert s.steps == 3
    data = state_to_bytes(s)
    assert read_metadata(data)["theta"] == "stored"
    stored = safetensors.torch.load(data)
    assert {k for k in stored if k.startswith("fast.")} == {f"fast.{k}" for k in s.fast}
    back = state_from_bytes(model, data)
    assert not back.theta_is_initial()
    assert_same(back, solo(model, [[t for p in pieces for t in p]]))
    assert state_to_bytes(back) == data


@pytest.mark.parametrize("n", [0, 5, B + 5])
def test_version_2_snapshots_still_load(model, n):
    s = solo(model, [tokens(n)]) if n else StreamState.fresh(model)
    old = v2_bytes(s)
    assert read_metadata(old)["version"] == "2"
    back = state_from_bytes(model, old)
    assert (back.position, back.steps) == (s.position, s.steps)
    for k, t in s.tensors().items():
        assert torch.equal(back.tensors()[k], t), k
    # an unstepped one comes back sharing the model's theta (its stored copy is theta_0)
    assert back.theta_is_initial() == (s.steps == 0)
    assert state_to_bytes(back) == state_to_bytes(s)


def test_version_2_theta_that_is_not_theta_0_is_kept(model):
    """A stored theta at step 0 that differs from the model's (it cannot come from this code, but
    bytes are bytes) is restored as stored, never silently replaced."""
    s = solo(model, [tokens(4)])
    s.fast = {k: v + 0.5 for k, v in s.fast.items()}
    back = state_from_bytes(model, v2_bytes(s))
    assert not back.theta_is_initial()
    for k in s.fast:
        assert torch.equal(back.fast[k], s.fast[k]), k


def _forge(data: bytes, tensors: dict[str, torch.Tensor], **meta: str) -> bytes:
    m = {**read_metadata(data), **meta, "checksum": _checksum(tensors)}
    return safetensors.torch.save(tensors, metadata={FORMAT: json.dumps(m)})


def test_theta_marked_initial_with_weights_stored_is_refused(model):
    s = solo(model, [tokens(4)])
    data = state_to_bytes(s)
    tensors = {k: v.contiguous() for k, v in s.tensors().items()}  # with fast.*
    with pytest.raises(SnapshotError, match="theta is marked initial but fast weights are stored"):
        state_from_bytes(model, _forge(data, tensors))
    with pytest.raises(SnapshotError, match="theta 'delta'"):
        state_from_bytes(model, _forge(data, dict(safetensors.torch.load(data)), theta="delta"))


def test_theta_marked_stored_but_missing_is_refused(model):
    s = solo(model, [tokens(4)])
    data = state_to_bytes(s)
    with pytest.raises(SnapshotError, match=r"tensor fast\..* is missing"):
        state_from_bytes(model, _forge(data, dict(safetensors.torch.load(data)), theta="stored"))


# -- through a real daemon and Redis ------------------------------------------------------------


def test_bench_session_bytes_through_the_daemon():
    """bench/session_bytes.py on the tiny preset: an unstepped session's snapshot (written by the
    daemon's SIGTERM, read back from Redis) holds no theta and its hot bytes none either; a
    stepped one holds its theta; both restore bit for bit as a solo replay."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, str(root / "bench" / "session_bytes.py"), "--json", "--preset", "tiny", "--sizes", "0,5,20"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True)
    out = json.loads(run.stdout)
    theta = out["model"]["theta_bytes"]
    s = out["sessions"]
    assert all(r["bit_exact"] for r in s.values()), s
    assert (s["5"]["steps"], s["5"]["export_theta"], s["5"]["snapshot_position"]) == (0, "initial", 5)
    assert s["5"]["snapshot_bytes"] < theta and 0 < s["5"]["hot_bytes"] < theta
    assert s["0"]["hot_bytes"] == 0
    assert s["20"]["steps"] == 2 and s["20"]["export_theta"] == "stored"
    assert s["20"]["snapshot_bytes"] > theta and s["20"]["hot_bytes"] > theta
