"""Checkpoints and session snapshots: bit-exact round trips, clear refusals, no pickle."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from model_configs import VARIANTS, micro

from model import (
    CheckpointError,
    InputError,
    ModelMismatchError,
    SnapshotError,
    StreamState,
    init_model,
    load_checkpoint,
    preset,
    save_checkpoint,
    state_from_bytes,
    state_to_bytes,
)
from model.config import ModelConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
    return init_model(preset("tiny"), seed=11).requires_grad_(False)


@pytest.fixture(scope="module")
def state(model):
    s = StreamState.fresh(model)
    s.append(torch.randint(0, 256, (45,)))
    return s


# -- checkpoints -------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_checkpoint_round_trip_is_bit_exact(tmp_path, variant):
    m = init_model(micro(variant), seed=3)
    digest = save_checkpoint(m, tmp_path / "ck")
    loaded = load_checkpoint(tmp_path / "ck")
    assert loaded.digest == digest
    assert loaded.cfg == m.cfg
    original = m.state_dict()
    assert set(loaded.state_dict()) == set(original)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, original[k]), k
    names = set(safetensors.torch.load_file(tmp_path / "ck" / "model.safetensors"))
    assert ("lm_head.weight" in names) == (not m.cfg.tie_embeddings)
    assert any("attn_post_norm" in n for n in names) == m.cfg.post_norm
    assert any("q_norm" in n for n in names) == m.cfg.qk_norm
    fast_blocks = {int(n.split(".")[1]) for n in names if ".fast_mlp." in n}
    assert fast_blocks == set(range(m.cfg.num_layers - m.cfg.num_fast_layers, m.cfg.num_layers))
    cfg_json = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg_json["model_type"] == m.cfg.model_type and cfg_json["format_version"] == 1


def _rewrite(ck: Path, tensors: dict) -> None:
    safetensors.torch.save_file(tensors, ck / "model.safetensors")


def test_checkpoint_missing_or_misshapen_tensor_is_named(tmp_path, model):
    ck = tmp_path / "ck"
    save_checkpoint(model, ck)
    tensors = safetensors.torch.load_file(ck / "model.safetensors")
    missing = dict(tensors)
    del missing["blocks.3.fast_mlp.w2.weight"]
    _rewrite(ck, missing)
    with pytest.raises(CheckpointError, match=r"missing tensor blocks\.3\.fast_mlp\.w2\.weight"):
        load_checkpoint(ck)
    bad = dict(tensors)
    bad["blocks.1.attn.q.weight"] = torch.zeros(5, 32)
    _rewrite(ck, bad)
    with pytest.raises(CheckpointError, match=r"blocks\.1\.attn\.q\.weight has shape \[5, 32\], expected \[32, 32\]"):
        load_checkpoint(ck)
    extra = dict(tensors)
    extra["surprise"] = torch.zeros(1)
    _rewrite(ck, extra)
    with pytest.raises(CheckpointError, match="unexpected tensor surprise"):
        load_checkpoint(ck)
    (ck / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_checkpoint(ck)


def test_checkpoint_bad_config_is_named(tmp_path, model):
    ck = tmp_path / "ck"
    save_checkpoint(model, ck)
    cfg = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**cfg, "window_size": 4}))
    with pytest.raises(CheckpointError, match="window_size 4 must be >= mini_batch_size 8"):
        load_checkpoint(ck)
    (ck / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(ck)
    with pytest.raises(CheckpointError, match=r"config\.json is missing"):
        load_checkpoint(tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(hidden_size=30, num_heads=4), "divisible by num_heads"),
        (dict(num_kv_heads=3, num_heads=2), "must divide num_heads"),
        (dict(window_size=4, mini_batch_size=8), "must be >= mini_batch_size"),
        (dict(num_fast_layers=0), "needs num_fast_layers >= 1"),
        (dict(num_fast_layers=9), "exceeds num_layers"),
        (dict(model_type="swa"), "has no fast layers"),
        (dict(bos_token_id=300), "outside the vocabulary"),
        (dict(hidden_size=0), "greater than 0"),
        (dict(model_type="full-attention", num_fast_layers=0, window_size=None, attention_sinks=1), "only apply"),
    ],
)
def test_config_validation(overrides, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{**preset("tiny").model_dump(), **overrides})


# -- session snapshots ------------------------------------------------------------------------


def test_state_round_trip_is_bit_exact(model, state):
    data = state_to_bytes(state)
    back = state_from_bytes(model, data)
    assert (back.position, back.steps, back.pending_count) == (state.position, state.steps, state.pending_count)
    for name, t in state.tensors().items():
        assert torch.equal(back.tensors()[name], t), name
    assert torch.equal(back.logits(), state.logits())
    assert state_to_bytes(state) == data == state_to_bytes(back)  # byte-stable
    # And it keeps streaming identically.
    more = torch.randint(0, 256, (30,))
    a, b = state.clone(), back
    a.append(more)
    b.append(more)
    for name, t in a.tensors().items():
        assert torch.equal(b.tensors()[name], t), name


def test_empty_state_round_trips(model):
    fresh = StreamState.fresh(model)
    back = state_from_bytes(model, state_to_bytes(fresh))
    assert back.position == 0 and back.pending_count == 0


def test_truncated_snapshot_is_refused(model, state):
    data = state_to_bytes(state)
    for cut in (0, 5, 100, len(data) // 2, len(data) - 1):
        with pytest.raises(SnapshotError, match=r"truncated|corrupted"):
            state_from_bytes(model, data[:cut])


def test_corrupted_snapshot_is_refused(model, state):
    data = bytearray(state_to_bytes(state))
    data[-10] ^= 0xFF  # a flipped bit in tensor data: only the checksum can tell
    with pytest.raises(SnapshotError, match="checksum"):
        state_from_bytes(model, bytes(data))
    with pytest.raises(SnapshotError, match="not a memoryd session snapshot"):
        state_from_bytes(model, safetensors.torch.save({"x": torch.zeros(2)}))


def test_other_models_snapshot_is_refused(model, state):
    other = init_model(preset("tiny"), seed=12).requires_grad_(False)
    with pytest.raises(ModelMismatchError, match="made with model sha256:"):
        state_from_bytes(other, state_to_bytes(state))


def test_inconsistent_snapshot_is_refused(model, state):
    tensors = {k: v.contiguous() for k, v in state.tensors().items()}
    tensors["kv.0.k"] = tensors["kv.0.k"][:, :3].contiguous()
    data = state_to_bytes(state)
    from model.snapshot import FORMAT, _checksum, read_metadata

    meta = {**read_metadata(data), "checksum": _checksum(tensors)}
    forged = safetensors.torch.save(tensors, metadata={FORMAT: json.dumps(meta)})
    with pytest.raises(SnapshotError, match=r"kv\.0\.k has shape"):
        state_from_bytes(model, forged)


# -- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        ([1, 2, 258], "token id 258 at index 2 is outside the vocabulary"),
        ([-1], "token id -1 at index 0"),
        ([], "empty"),
        ([[1, 2], [3, 4]], "1-D"),
        ([1.5, 2.0], "integers"),
    ],
)
def test_bad_tokens_are_refused_and_change_nothing(model, state, tokens, message):
    s = state.clone()
    before = {k: v.clone() for k, v in s.tensors().items()}
    with pytest.raises(InputError, match=message):
        s.append(tokens)
    assert s.position == state.position
    for k, v in s.tensors().items():
        assert torch.equal(v, before[k]), k


def test_logits_of_empty_session_is_an_error(model):
    with pytest.raises(InputError, match="empty"):
        StreamState.fresh(model).logits()


UNPICKLING_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def _unpickling_uses(path: Path) -> list[str]:
    """Imports of pickling modules, torch.load / torch.jit.load, and allow_pickle=True / weights_only=False."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.split(".")[0] in UNPICKLING_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in UNPICKLING_MODULES:
            found.append(node.module)
        elif isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            if name in {"torch.load", "torch.jit.load"}:
                found.append(name)
            for kw in node.keywords:
                unsafe = isinstance(kw.value, ast.Constant) and (kw.arg == "allow_pickle") == bool(kw.value.value)
                if kw.arg in {"allow_pickle", "weights_only"} and unsafe:
                    found.append(f"{name}({kw.arg}={kw.value.value})")
    return [f"{path.relative_to(REPO)}: {f}" for f in found]


def test_nothing_in_the_packages_unpickles():
    offenders = []
    for pkg in ("model", "trainer", "memoryd", "sdk", "bench", "scripts"):
        for path in (REPO / pkg).rglob("*.py"):
            offenders += _unpickling_uses(path)
    assert not offenders, offenders


def test_the_unpickling_detector_detects(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    bad = tmp_path / "bad.py"
    bad.write_text("import pickle\nimport torch, numpy as np\ntorch.load('x')\nnp.load('y', allow_pickle=True)\n")
    assert len(_unpickling_uses(bad)) == 3


# -- command line -----------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    """`python -m model ...` in a process of its own: the entry point as a user runs it."""
    return subprocess.run([sys.executable, "-m", "model", *args], capture_output=True, text=True, cwd=REPO)


def _cli_here(capsys: pytest.CaptureFixture[str], *args: str) -> subprocess.CompletedProcess:
    """The same command run by `model.cli.main` in this process, which is all `python -m model` runs
    (model/__main__.py: `raise SystemExit(main())`): the same parsing, work, output and exit status,
    without the 3 s or so each new process spends importing torch.  Each test still runs the entry
    point once as its own process (`_cli`)."""
    from model.cli import main

    capsys.readouterr()
    try:
        rc = main(list(args))
    except SystemExit as e:  # argparse's refusals
        rc = e.code if isinstance(e.code, int) else 1
    out = capsys.readouterr()
    return subprocess.CompletedProcess(["python", "-m", "model", *args], rc, out.out, out.err)


def test_cli_init_and_score(tmp_path, capsys):
    ck = tmp_path / "ck"
    r = _cli("init", "--preset", "tiny", "--out", str(ck), "--set", "inner_lr=0.5")
    assert r.returncode == 0, r.stderr
    assert json.loads((ck / "config.json").read_text())["inner_lr"] == 0.5
    toks = np.random.default_rng(0).integers(0, 256, 70).astype(np.int64)
    np.save(tmp_path / "t.npy", toks)
    outs = []
    for extra in ([], ["--append-size", "1"], ["--append-size", "13"]):
        r = _cli_here(
            capsys,
            "score",
            "--checkpoint",
            str(ck),
            "--tokens",
            str(tmp_path / "t.npy"),
            "--out",
            str(tmp_path / "nll.npy"),
            *extra,
        )
        assert r.returncode == 0, r.stderr
        summary = json.loads(r.stdout.strip().splitlines()[-1])
        nll = np.load(tmp_path / "nll.npy")
        assert nll.shape == (69,) and nll.dtype == np.float32
        assert summary["mean_nll"] == pytest.approx(float(nll.mean()), rel=1e-5)
        outs.append(nll)
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-5)
    np.testing.assert_allclose(outs[0], outs[2], atol=1e-5)
    (tmp_path / "t.txt").write_text("hello, memory")
    r = _cli_here(
        capsys, "score", "--checkpoint", str(ck), "--text", str(tmp_path / "t.txt"), "--out", str(tmp_path / "n2.npy")
    )
    assert r.returncode == 0, r.stderr
    assert np.load(tmp_path / "n2.npy").shape == (len("hello, memory"),)  # BOS + 13 bytes -> 13 predictions


def test_cli_errors_are_clear(tmp_path, capsys):
    ck = tmp_path / "ck"
    assert _cli_here(capsys, "init", "--preset", "tiny", "--out", str(ck)).returncode == 0
    np.save(tmp_path / "bad.npy", np.array([1, 2, 999]))
    r = _cli("score", "--checkpoint", str(ck), "--tokens", str(tmp_path / "bad.npy"), "--out", str(tmp_path / "o.npy"))
    assert r.returncode == 2 and "token id 999 at index 2 is outside the vocabulary" in r.stderr
    np.save(tmp_path / "f.npy", np.zeros((2, 2)))
    r = _cli_here(
        capsys, "score", "--checkpoint", str(ck), "--tokens", str(tmp_path / "f.npy"), "--out", str(tmp_path / "o.npy")
    )
    assert r.returncode == 2 and "1-D integer array" in r.stderr
    r = _cli_here(
        capsys,
        "score",
        "--checkpoint",
        str(tmp_path / "none"),
        "--tokens",
        str(tmp_path / "f.npy"),
        "--out",
        str(tmp_path / "o.npy"),
    )
    assert r.returncode == 2 and "config.json is missing" in r.stderr
    r = _cli_here(capsys, "init", "--preset", "tiny", "--out", str(ck), "--set", "window_size=2")
    assert r.returncode == 2 and "window_size 2 must be >= mini_batch_size 8" in r.stderr
