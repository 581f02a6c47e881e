"""CUDA paths agree with CPU fp32 (runs only where a CUDA device exists)."""

from __future__ import annotations

import pytest
import torch

from model import StreamState, init_model, preset
from model.attention import flash_available

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def run(model, tokens: torch.Tensor, impl: str, pieces: int = 3) -> StreamState:
    state = StreamState.fresh(model, impl=impl)
    for piece in tokens.split(pieces * 7):
        state.append(piece)
    return state


@pytest.fixture(scope="module")
def setup():
    cfg = preset("small", window_size=256, mini_batch_size=64)
    cpu = init_model(cfg, seed=0).requires_grad_(False)
    tokens = torch.randint(0, 256, (700,), generator=torch.Generator().manual_seed(0))
    return cfg, cpu, tokens, run(cpu, tokens, "sdpa")


@pytest.mark.parametrize(
    ("dtype", "impl", "tol"),
    [
        (torch.float32, "sdpa", 2e-3),
        (torch.float32, "math", 2e-3),
        (torch.bfloat16, "sdpa", 1.5e-1),
        (torch.bfloat16, "flash", 1.5e-1),
    ],
)
def test_cuda_matches_cpu(setup, dtype, impl, tol):
    cfg, _, tokens, reference = setup
    if impl == "flash" and not flash_available(torch.device("cuda")):
        pytest.skip("flash-attn is not importable here")
    gpu_model = init_model(cfg, seed=0).to("cuda", dtype).requires_grad_(False)
    state = run(gpu_model, tokens.cuda(), impl)
    assert state.steps == reference.steps
    got, want = state.logits().float().cpu(), reference.logits()
    # Compare log-probabilities: what sampling and scoring see.
    err = (torch.log_softmax(got, -1) - torch.log_softmax(want, -1)).abs().max().item()
    assert err < tol, f"{dtype} {impl}: max |dlogp| {err}"
    for name, w in reference.fast.items():
        torch.testing.assert_close(state.fast[name].float().cpu(), w, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_pooled_decode_matches_per_row(setup, dtype):
    """Batched decode on the GPU with the decode lane's pool (model/pool.py: one attention call a layer)
    against the same batch attending per row: rows at different positions, some past the window."""
    from model.batch import decode
    from model.pool import DecodePool

    cfg, _, tokens, _ = setup
    gpu_model = init_model(cfg, seed=0).to("cuda", dtype).requires_grad_(False)
    lengths = (5, 90, 300, 520)
    a = [run(gpu_model, tokens[:n].cuda(), "sdpa") for n in lengths]
    b = [run(gpu_model, tokens[:n].cuda(), "sdpa") for n in lengths]
    pool = DecodePool(cfg)
    for t in range(6):
        nxt = [int(x) for x in tokens[600 + 4 * t : 604 + 4 * t]]
        pooled, per_row = decode(a, nxt, pool).float(), decode(b, nxt).float()
        err = (torch.log_softmax(pooled, -1) - torch.log_softmax(per_row, -1)).abs().max().item()
        assert err < (1e-4 if dtype == torch.float32 else 1.5e-1), f"tick {t}: max |dlogp| {err}"
    assert pool.nbytes() > 0
