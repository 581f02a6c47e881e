"""Decode latency and ingest throughput against context length: TTT-E2E vs full attention.

    python bench/decode.py --json [--contexts 1024,4096,16384,65536] [--preset small]

For each model one session ingests a random byte context in appends of 1K tokens,
growing to the largest context.  At each requested context length it records the
throughput of the 1K append that reached it, then decodes greedily from an O(1)
clone of the session and records the median per-token latency (append one token,
read the logits).  The full-attention model has the same shapes, no fast layers
and an unbounded KV cache.  Prints one JSON line; timings are measurements of this
machine, compare the ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
from tqdm import tqdm

from model import StreamState, init_model, preset
from model.config import ModelConfig

APPEND = 1024


def full_attention_twin(cfg: ModelConfig) -> ModelConfig:
    """Same shapes, no fast layers, full attention (the baseline with a KV cache)."""
    data = cfg.model_dump()
    data.update(model_type="full-attention", num_fast_layers=0, window_size=None)
    return ModelConfig(**data)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(
    cfg: ModelConfig, contexts: list[int], decode_tokens: int, device: torch.device, dtype: torch.dtype, label: str
) -> dict:
    model = init_model(cfg, seed=0).to(device, dtype).requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    state = StreamState.fresh(model)
    decode_ms, ingest = {}, {}
    targets = sorted(contexts)
    with tqdm(total=targets[-1], unit="tok", desc=f"{label} ingest") as bar:
        while targets:
            piece = torch.randint(0, 256, (APPEND,), generator=gen).to(device)
            sync(device)
            t0 = time.perf_counter()
            state.append(piece)
            sync(device)
            dt = time.perf_counter() - t0
            bar.update(APPEND)
            if state.position >= targets[0]:
                ctx = targets.pop(0)
                ingest[str(ctx)] = APPEND / dt
                decode_ms[str(ctx)] = decode_latency(state.clone(), decode_tokens, device)
    return {"decode_ms": decode_ms, "ingest_tok_s": ingest, "state_bytes": state.nbytes()}


def decode_latency(state: StreamState, n: int, device: torch.device) -> float:
    """Median ms per greedy token: append the last choice, read the next logits."""
    token = int(state.logits().argmax())
    times = []
    for _ in range(n):
        sync(device)
        t0 = time.perf_counter()
        state.append([token])
        token = int(state.logits().argmax())
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contexts", default="1024,4096,16384,65536")
    p.add_argument("--preset", default="small")
    p.add_argument("--decode-tokens", type=int, default=48)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--json", action="store_true", help="print only the JSON line")
    args = p.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    if any(c < APPEND or c % APPEND for c in contexts):
        p.error(f"contexts must be positive multiples of {APPEND}")
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    ttt = preset(args.preset)
    result = {
        "device": describe(device),
        "config": {
            "preset": args.preset,
            "dtype": args.dtype,
            **ttt.model_dump(
                include={"hidden_size", "num_layers", "num_heads", "num_fast_layers", "window_size", "mini_batch_size"}
            ),
        },
        "decode_ms": {},
        "ingest_tok_s": {},
        "state_bytes": {},
    }
    for label, cfg in (("ttt-e2e", ttt), ("full-attention", full_attention_twin(ttt))):
        r = measure(cfg, contexts, args.decode_tokens, device, dtype, label)
        for key in ("decode_ms", "ingest_tok_s", "state_bytes"):
            result[key][label] = r[key]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
