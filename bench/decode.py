"""Greedy decode cost against context length: memoryd beside Hugging Face transformers.

    python bench/decode.py --json                                  # the default model, 1K and 16K
    python bench/decode.py --json --contexts 1024,2048             # a quick run (a few minutes)
    python bench/decode.py --json --preset small --contexts 1024,4096,16384,65536
    python bench/decode.py --json --checkpoint DIR --device cuda --dtype bfloat16

Every model reads the same token ids (random ids from the vocabulary after a BOS,
seeded, so both sides do identical work whatever the text) in pieces of 1K tokens,
growing to the largest context.  At each requested context it records the
throughput of the 1K piece that reached it, then decodes greedily and records the
median milliseconds per token.  The models take turns, piece by piece and decoded
token by decoded token, so that load changes on a shared machine hit all of them
alike:

- memoryd: one `StreamState` ingests the context (test-time steps included); decode
  runs on an O(1) clone, each token `state.append([t]); state.logits()`.  This is the
  model the daemon serves: `--checkpoint` as given, otherwise the default model
  (SmolLM2-135M-Instruct converted once into the data dir, with its shipped adapter).
  One token in every mini-batch also takes a test-time step; the median leaves it
  out, its cost is in the ingest figure.
- transformers: `LlamaForCausalLM` with a `DynamicCache` (use_cache=True, the
  default attention implementation); the context is prefilled in the same 1K pieces,
  each decoded token is one forward of one token, and the cache is cropped back to
  the context afterwards.  For the default model it loads the same weights, from the
  SmolLM2 GGUF that the conversion read; for `--preset` and `--checkpoint` it is a
  random Llama of the same shapes (decode cost does not depend on the values; the
  JSON says which).
- full-attention (presets only): our network with the same shapes, no fast layers
  and an unbounded KV cache, the in-house baseline of earlier runs.

Threads are explicit (`--torch-threads`, default 1) and reported: torch's default
takes every core, and with 2 threads beside other work on a 2-core machine its
small per-token ops can be several times slower than with 1 (a thread waits at every
barrier for a core that is busy elsewhere).  1 is also the daemon's default.

Ingesting 16K tokens through test-time training on one core takes minutes; run the
full measurement in the background (`nice -n 10 ... > out.json &`), or pass a short
`--contexts` for a quick look.  Prints one JSON line; timings are measurements of
this machine in this run: compare ratios within one run, not across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

from model import StreamState, TTTModel, init_model, preset  # noqa: E402
from model.config import ModelConfig  # noqa: E402

APPEND = 1024
SEED = 0


@dataclass(frozen=True)
class Source:
    """The memoryd model under test and where its transformers twin comes from."""

    model: TTTModel
    name: str
    gguf: Path | None
    """The GGUF the model was converted from (transformers loads the same weights), or None."""
    adapter: str = ""


@dataclass(frozen=True)
class Measured:
    decode_ms: dict[str, float]
    ingest_tok_s: dict[str, float]
    state_bytes: int


def full_attention_twin(cfg: ModelConfig) -> ModelConfig:
    """Same shapes, no fast layers, full attention (the in-house baseline with a KV cache)."""
    data = cfg.model_dump()
    data.update(model_type="full-attention", num_fast_layers=0, window_size=None, attention_sinks=0)
    return ModelConfig(**data)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def context_ids(cfg: ModelConfig, n: int) -> torch.Tensor:
    """BOS, then n - 1 seeded random ids from the vocabulary (the same for every model)."""
    gen = torch.Generator().manual_seed(SEED)
    ids = torch.randint(0, cfg.vocab_size, (n,), generator=gen)
    ids[0] = cfg.bos_token_id
    return ids


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds `fn` took (device work included)."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


class Side(Protocol):
    """One model under test: it reads the context piece by piece and decodes from it."""

    def feed(self, piece: torch.Tensor) -> None: ...

    def begin_decode(self) -> int:
        """Start decoding at the current context; returns the greedy first token."""
        ...

    def step(self, token: int) -> int:
        """Read one token; returns the greedy next."""
        ...

    def end_decode(self) -> None:
        """Back to the context, so that the next piece continues it."""
        ...

    def nbytes(self) -> int: ...


class MemorydSide:
    """One `StreamState`; decoding runs on an O(1) clone of it."""

    def __init__(self, model: TTTModel) -> None:
        self.state = StreamState.fresh(model)
        self.fork = self.state

    def feed(self, piece: torch.Tensor) -> None:
        self.state.append(piece)

    def begin_decode(self) -> int:
        self.fork = self.state.clone()
        return int(self.fork.logits().argmax())

    def step(self, token: int) -> int:
        self.fork.append([token])
        return int(self.fork.logits().argmax())

    def end_decode(self) -> None:
        self.fork = self.state

    def nbytes(self) -> int:
        return self.state.nbytes()


class TransformersSide:
    """A transformers causal LM with a `DynamicCache`, cropped back after each decode."""

    def __init__(self, hf: torch.nn.Module) -> None:
        from transformers import DynamicCache

        self.hf, self.cache = hf, DynamicCache(config=hf.config)
        self.next_token, self.decoded = 0, 0

    @torch.no_grad()
    def _forward(self, tokens: torch.Tensor) -> int:
        out = self.hf(input_ids=tokens[None], cache=self.cache, use_cache=True, logits_to_keep=1)
        return int(out.logits[0, -1].argmax())

    def feed(self, piece: torch.Tensor) -> None:
        self.next_token = self._forward(piece)

    def begin_decode(self) -> int:
        self.decoded = 0
        return self.next_token

    def step(self, token: int) -> int:
        self.decoded += 1
        return self._forward(torch.tensor([token], device=self.hf.device))

    def end_decode(self) -> None:
        length = self.cache.get_seq_length()
        self.cache.crop(-self.decoded)
        if self.cache.get_seq_length() != length - self.decoded:
            raise RuntimeError(f"the transformers cache did not crop {self.decoded} tokens off {length}")

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.cache.layers for t in (layer.keys, layer.values))


def measure(
    sides: dict[str, Side], ids: torch.Tensor, contexts: list[int], n: int, device: torch.device
) -> dict[str, Measured]:
    """Feed every side the same 1K pieces; at each context decode n tokens on all of them,
    one token of each side in turn, so that load changes on a shared machine hit every
    side alike.  ms/token is the median of the n."""
    decode: dict[str, dict[str, float]] = {k: {} for k in sides}
    ingest: dict[str, dict[str, float]] = {k: {} for k in sides}
    ids = ids.to(device)
    with tqdm(total=max(contexts) * len(sides), unit="tok", desc="ingest", file=sys.stderr) as bar:
        for end in range(APPEND, max(contexts) + 1, APPEND):
            piece = ids[end - APPEND : end]
            for label, side in sides.items():
                bar.set_postfix_str(label)
                dt = timed(lambda side=side, piece=piece: side.feed(piece), device)
                bar.update(APPEND)
                if end in contexts:
                    ingest[label][str(end)] = APPEND / dt
            if end not in contexts:
                continue
            bar.set_postfix_str(f"decoding at {end}")
            tokens = {k: side.begin_decode() for k, side in sides.items()}
            times: dict[str, list[float]] = {k: [] for k in sides}
            for _ in range(n):
                for label, side in sides.items():
                    sync(device)
                    t0 = time.perf_counter()
                    tokens[label] = side.step(tokens[label])
                    sync(device)
                    times[label].append((time.perf_counter() - t0) * 1e3)
            for label, side in sides.items():
                decode[label][str(end)] = statistics.median(times[label])
                side.end_decode()
    return {k: Measured(decode[k], ingest[k], side.nbytes()) for k, side in sides.items()}


def llama_config(cfg: ModelConfig, positions: int) -> object:
    """A transformers LlamaConfig with our model's shapes (for a random twin)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=positions,
        rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.norm_eps,
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
    )


def load_transformers(
    source: Source, positions: int, device: torch.device, dtype: torch.dtype
) -> tuple[torch.nn.Module, str]:
    """The transformers model to compare with and a description of its weights."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    if source.gguf is not None:
        hf = AutoModelForCausalLM.from_pretrained(source.gguf.parent, gguf_file=source.gguf.name, dtype=dtype)
        weights = f"the same weights, from {source.gguf.name}"
    else:
        torch.manual_seed(SEED)
        hf = LlamaForCausalLM(llama_config(source.model.cfg, positions)).to(dtype)
        weights = "random, the same shapes as the memoryd model"
    return hf.to(device).eval().requires_grad_(False), weights


def load_source(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> Source:
    """The model as the daemon would serve it: a preset, `--checkpoint` as it is, or the
    default model (converted once into the data dir) with its shipped adapter."""
    if args.preset:
        return Source(init_model(preset(args.preset), seed=SEED), f"preset {args.preset}", gguf=None)
    from memoryd.default_model import FALLBACK_NAME
    from memoryd.server import load_model
    from memoryd.settings import load_settings
    from model.gguf_source import find_smollm2_gguf

    overrides = {k: v for k, v in (("checkpoint", args.checkpoint), ("data_dir", args.data_dir)) if v is not None}
    model, _path, name, adapter = load_model(load_settings(overrides), str(device))
    gguf = find_smollm2_gguf() if args.checkpoint is None and name != FALLBACK_NAME else None
    return Source(model.to(dtype).requires_grad_(False), name, gguf, adapter)


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores)"


def config_summary(cfg: ModelConfig) -> dict:
    return cfg.model_dump(
        include={
            "vocab_size",
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_fast_layers",
            "window_size",
            "mini_batch_size",
            "attention_sinks",
        }
    )


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--default-model", action="store_true", help="the daemon's default model (the default)")
    which.add_argument("--checkpoint", type=Path, help="a checkpoint dir, served as it is")
    which.add_argument("--preset", help="a random model of a preset's shapes (adds the full-attention twin)")
    p.add_argument("--data-dir", type=Path, help="where the default model is converted (default: memoryd's)")
    p.add_argument("--contexts", default="1024,16384", help="context lengths, multiples of 1024")
    p.add_argument("--decode-tokens", type=int, default=32, help="tokens decoded per context (median taken)")
    p.add_argument("--torch-threads", type=int, default=1, help="torch intra-op threads (see the docstring)")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers side")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument(
        "--json",
        action="store_true",
        help="accepted for bench/serve.py's command line; the output is always one JSON line",
    )
    args = p.parse_args()
    args.contexts = sorted({int(c) for c in args.contexts.split(",")})
    if any(c < APPEND or c % APPEND for c in args.contexts):
        p.error(f"--contexts must be positive multiples of {APPEND}, got {args.contexts}")
    if args.decode_tokens < 1 or args.torch_threads < 1:
        p.error("--decode-tokens and --torch-threads must be at least 1")
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.torch_threads)
    torch.set_num_interop_threads(1)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    load_start, t0 = os.getloadavg(), time.perf_counter()
    source = load_source(args, device, dtype)
    cfg = source.model.cfg
    sides: dict[str, Side] = {"memoryd": MemorydSide(source.model)}
    if args.preset:
        twin = init_model(full_attention_twin(cfg), seed=SEED).to(device, dtype).requires_grad_(False)
        sides["full-attention"] = MemorydSide(twin)
    hf_info = None
    if not args.no_transformers:
        import transformers

        hf, weights = load_transformers(source, max(args.contexts) + args.decode_tokens, device, dtype)
        sides["transformers"] = TransformersSide(hf)
        hf_info = {"version": transformers.__version__, "weights": weights, "attn": hf.config._attn_implementation}
    runs = measure(sides, context_ids(cfg, max(args.contexts)), args.contexts, args.decode_tokens, device)
    result = {
        "device": describe(device),
        "model": source.name,
        "adapter": source.adapter,
        "config": {"dtype": args.dtype, **config_summary(cfg)},
        "threads": {"torch": torch.get_num_threads(), "interop": torch.get_num_interop_threads()},
        "loadavg_1m": {"start": round(load_start[0], 2), "end": round(os.getloadavg()[0], 2)},
        "contexts": args.contexts,
        "decode_tokens": args.decode_tokens,
        "transformers": hf_info,
        "decode_ms": {k: r.decode_ms for k, r in runs.items()},
        "ingest_tok_s": {k: r.ingest_tok_s for k, r in runs.items()},
        "state_bytes": {k: r.state_bytes for k, r in runs.items()},
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    if "transformers" in runs:
        ours, theirs = runs["memoryd"].decode_ms, runs["transformers"].decode_ms
        result["decode_speedup_vs_transformers"] = {c: theirs[c] / ours[c] for c in ours}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
