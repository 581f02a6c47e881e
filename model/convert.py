"""Convert a pretrained Llama-family model into a TTT-E2E checkpoint (`python -m model convert`).

A source is a Hugging Face directory (config.json, *.safetensors, tokenizer.json)
or a llama.cpp GGUF file (see `model.gguf_source`).  Both are read into one
`LlamaSource` (Hugging Face tensor names, float32), then mapped onto our names:

    model.embed_tokens                 -> embed
    layers.i.input_layernorm           -> blocks.i.attn_norm
    layers.i.self_attn.{q,k,v,o}_proj  -> blocks.i.attn.{q,k,v,o}
    layers.i.post_attention_layernorm  -> blocks.i.mlp_norm
    layers.i.mlp.{gate,up,down}_proj   -> blocks.i.mlp.{w1,w3,w2}
    model.norm, lm_head                -> final_norm, lm_head

with the variant flags of a Llama (no qk-norm, no post-norms, GQA, tied or
untied head).  Each of the last S blocks gets a fast MLP chosen so that the
converted network computes exactly what the source did (`fast_init`):

- "new": a new fast MLP whose output projection w2 is zero (it adds exactly 0);
- "moved": the block's own pretrained MLP moved into the fast slot (fast_norm :=
  mlp_norm, fast_mlp := mlp) and the static MLP zeroed (it adds exactly 0).  The
  block computes h + mlp(norm(h)) + 0, as before, but test-time training now
  updates weights that already do something, which is what makes a converted
  model learn from its context (docs/memory_beyond_window.md).

Why a zero w2 still lets test-time training learn: the fast MLP's output is
w2 a with a = silu(w1 x) * (w3 x).  The loss gradient w.r.t. w2 is
(dL/d out) a^T, and a is non-zero because w1 and w3 are random normal(0, 0.02),
so the first step moves w2 off zero.  (The gradients w.r.t. w1 and w3 go through
w2 and are zero at that first step only.)  Zeroing w1 or w3 instead would make a
zero and freeze all three: the point of the init is that exactly one factor of the
product is zero, as LoRA does with its B matrix.

Anything the network cannot reproduce exactly (biases, other RoPE scalings,
partial RoPE, a head_dim other than hidden/heads, other activations or
architectures) is refused with an error that names it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import safetensors.torch
import torch

from model.checkpoint import save_checkpoint
from model.config import ModelConfig, RopeScaling
from model.gguf_source import UnsupportedSourceError, read_gguf, write_gguf_tokenizer
from model.network import TTTModel

TOKENIZER_FILE = "tokenizer.json"
DEFAULT_WINDOW = 2048
FastInit = Literal["new", "moved"]
FAST_INITS: tuple[str, ...] = get_args(FastInit)
DEFAULT_SINKS = 4
"""Converted models keep their first 4 positions visible beyond the window: models
trained with full attention park attention on their first tokens ("attention
sinks"), and without them most of what SWA loses beyond the window is that, not
lost context (measured on SmolLM2: 1.66 vs 2.23 nats beyond a 2048 window, full
attention 1.64).  Inside the window nothing changes."""

_LAYER_MAP = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn.q",
    "self_attn.k_proj": "attn.k",
    "self_attn.v_proj": "attn.v",
    "self_attn.o_proj": "attn.o",
    "post_attention_layernorm": "mlp_norm",
    "mlp.gate_proj": "mlp.w1",
    "mlp.up_proj": "mlp.w3",
    "mlp.down_proj": "mlp.w2",
}

__all__ = [
    "FastInit",
    "LlamaSource",
    "UnsupportedSourceError",
    "build_model",
    "convert",
    "read_source",
    "target_config",
    "to_checkpoint_tensors",
]


@dataclass
class LlamaSource:
    """A Llama-family model as read from disk: shapes, flags and float32 tensors (HF names)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    norm_eps: float
    rope_theta: float
    rope_scaling: RopeScaling | None
    tie_embeddings: bool
    bos_token_id: int
    eos_token_id: int
    chat_template: str | None
    tensors: dict[str, torch.Tensor]
    path: Path

    def write_tokenizer(self, out_file: Path) -> None:
        """Write the source's tokenizer as a `tokenizers` tokenizer.json."""
        if self.path.is_file():
            write_gguf_tokenizer(self.path, out_file)
        else:
            shutil.copyfile(self.path / TOKENIZER_FILE, out_file)


# -- reading sources -------------------------------------------------------------------------


def read_source(path: str | Path) -> LlamaSource:
    """Read a Hugging Face Llama directory or a `.gguf` file, refusing what we cannot reproduce."""
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        raw = read_gguf(p)
    elif p.is_dir():
        raw = _read_hf_dir(p)
    else:
        raise FileNotFoundError(f"{p} is neither a Hugging Face model directory nor a .gguf file")
    for key in ("bos_token_id", "eos_token_id"):
        if not isinstance(raw[key], int):
            raise UnsupportedSourceError(f"{p}: {key} must be one integer id, got {raw[key]!r}")
    bad = [n for n in raw["tensors"] if n.endswith(".bias")]
    if bad:
        raise UnsupportedSourceError(f"{p}: biases are not supported ({', '.join(sorted(bad)[:4])})")
    return LlamaSource(**raw, path=p)


def _read_hf_dir(d: Path) -> dict[str, Any]:
    cfg_file = d / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{d} has no config.json: not a Hugging Face model directory")
    if not (d / TOKENIZER_FILE).is_file():
        raise FileNotFoundError(f"{d} has no {TOKENIZER_FILE}: the converted model needs the source's tokenizer")
    c = json.loads(cfg_file.read_text())
    _check_hf_config(c, d)
    heads = int(c["num_attention_heads"])
    rope_theta, rope_scaling = _hf_rope(c, d)
    files = sorted(d.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{d} has no *.safetensors weights (pickled .bin weights are never loaded)")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        tensors.update({k: v.float() for k, v in safetensors.torch.load_file(str(f)).items()})
    tie = c.get("tie_word_embeddings")
    if tie is None:  # transformers' LlamaConfig defaults to untied; trust the files over the default
        tie = "lm_head.weight" not in tensors
    if tie:
        tensors.pop("lm_head.weight", None)  # some savers write the tied copy too
    eos = c.get("eos_token_id")
    if isinstance(eos, list) and eos:
        eos = eos[0]  # the first is the end-of-text id; chat ends are in the template
    return dict(
        vocab_size=int(c["vocab_size"]),
        hidden_size=int(c["hidden_size"]),
        num_layers=int(c["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(c.get("num_key_value_heads") or heads),
        intermediate_size=int(c["intermediate_size"]),
        norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        tie_embeddings=tie,
        bos_token_id=c.get("bos_token_id"),
        eos_token_id=eos,
        chat_template=_hf_chat_template(d),
        tensors=tensors,
    )


def _check_hf_config(c: dict[str, Any], d: Path) -> None:
    model_type = c.get("model_type")
    archs = c.get("architectures") or ["LlamaForCausalLM"]
    if model_type != "llama" or archs != ["LlamaForCausalLM"]:
        raise UnsupportedSourceError(
            f"{d}: model_type {model_type!r} / architectures {archs} is not supported (only llama, LlamaForCausalLM)"
        )
    for key in ("attention_bias", "mlp_bias"):
        if c.get(key):
            raise UnsupportedSourceError(f"{d}: {key}=true is not supported (the network has no biases)")
    if c.get("hidden_act", "silu") != "silu":
        raise UnsupportedSourceError(f"{d}: hidden_act {c['hidden_act']!r} is not supported (only silu)")
    head_dim = c.get("head_dim")
    if head_dim is not None and head_dim != c["hidden_size"] // c["num_attention_heads"]:
        raise UnsupportedSourceError(f"{d}: head_dim {head_dim} != hidden_size/num_attention_heads is not supported")


def _hf_rope(c: dict[str, Any], d: Path) -> tuple[float, RopeScaling | None]:
    """RoPE base and scaling from either spelling: transformers 5's `rope_parameters`, or
    the older `rope_theta` + `rope_scaling`."""
    params = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
    theta = float(params.pop("rope_theta", c.get("rope_theta", 10000.0)))
    rope_type = params.pop("rope_type", params.pop("type", "default"))
    if params.pop("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedSourceError(f"{d}: partial_rotary_factor is not supported")
    if rope_type == "default":
        return theta, None
    if rope_type == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        return theta, RopeScaling(**{k: params[k] for k in keys})
    raise UnsupportedSourceError(f"{d}: rope scaling type {rope_type!r} is not supported (only default and llama3)")


def _hf_chat_template(d: Path) -> str | None:
    """The chat template from chat_template.jinja, chat_template.json or tokenizer_config.json."""
    if (d / "chat_template.jinja").is_file():
        return (d / "chat_template.jinja").read_text()
    for name in ("chat_template.json", "tokenizer_config.json"):
        f = d / name
        if f.is_file():
            tpl = json.loads(f.read_text()).get("chat_template")
            if isinstance(tpl, list):  # named templates: take the default one
                tpl = next((t["template"] for t in tpl if t.get("name") == "default"), None)
            if isinstance(tpl, str):
                return tpl
    return None


# -- mapping onto our network ----------------------------------------------------------------


def target_config(
    src: LlamaSource,
    window: int | None,
    mini_batch: int | None,
    fast_layers: int | None,
    attention_sinks: int = DEFAULT_SINKS,
    inner_lr: float = 1.0,
    inner_clip: float = 1.0,
    sink_horizon: int | None = None,
) -> ModelConfig:
    """Our config for `src`: its shapes and flags plus the TTT-E2E keys."""
    k = DEFAULT_WINDOW if window is None else window
    b = max(1, k // 8) if mini_batch is None else mini_batch  # the reference's k/b = 8192/1024
    s = max(1, src.num_layers // 4) if fast_layers is None else fast_layers
    return ModelConfig(
        model_type="ttt-e2e",
        vocab_size=src.vocab_size,
        hidden_size=src.hidden_size,
        num_layers=src.num_layers,
        num_heads=src.num_heads,
        num_kv_heads=src.num_kv_heads,
        intermediate_size=src.intermediate_size,
        num_fast_layers=s,
        window_size=k,
        mini_batch_size=b,
        inner_lr=inner_lr,
        inner_clip=inner_clip,
        attention_sinks=attention_sinks,
        sink_horizon=sink_horizon if attention_sinks else None,
        rope_theta=src.rope_theta,
        rope_scaling=src.rope_scaling,
        qk_norm=False,
        post_norm=False,
        tie_embeddings=src.tie_embeddings,
        norm_eps=src.norm_eps,
        bos_token_id=src.bos_token_id,
        eos_token_id=src.eos_token_id,
        tokenizer=TOKENIZER_FILE,
        chat_template=src.chat_template,
    )


def to_checkpoint_tensors(
    src: LlamaSource, cfg: ModelConfig, seed: int = 0, fast_init: FastInit = "new"
) -> dict[str, torch.Tensor]:
    """Our tensors for `src`: renamed source weights plus identity-preserving fast MLPs."""
    if fast_init not in FAST_INITS:
        raise ValueError(f"fast_init {fast_init!r} is not one of {', '.join(FAST_INITS)}")
    out: dict[str, torch.Tensor] = {}
    unused = set(src.tensors)

    def take(hf: str, ours: str) -> None:
        if hf not in src.tensors:
            raise UnsupportedSourceError(f"{src.path}: tensor {hf} is missing")
        out[ours] = src.tensors[hf]
        unused.discard(hf)

    take("model.embed_tokens.weight", "embed.weight")
    take("model.norm.weight", "final_norm.weight")
    if not cfg.tie_embeddings:
        take("lm_head.weight", "lm_head.weight")
    for i in range(cfg.num_layers):
        for hf, ours in _LAYER_MAP.items():
            take(f"model.layers.{i}.{hf}.weight", f"blocks.{i}.{ours}.weight")
    unused = {n for n in unused if not n.endswith("rotary_emb.inv_freq")}  # a cached table, recomputed
    if unused:
        raise UnsupportedSourceError(f"{src.path}: tensors with no place in the network: {', '.join(sorted(unused))}")

    gen = torch.Generator().manual_seed(seed)
    d, f = cfg.hidden_size, cfg.intermediate_size
    for i in range(cfg.first_fast_layer, cfg.num_layers):
        p = f"blocks.{i}."
        if fast_init == "moved":  # h + fast(norm(h)) + 0 == h + mlp(norm(h)): still exact
            out[p + "fast_norm.weight"] = out[p + "mlp_norm.weight"]
            out[p + "mlp_norm.weight"] = torch.ones(d)
            for w in ("w1", "w2", "w3"):
                out[p + f"fast_mlp.{w}.weight"] = out[p + f"mlp.{w}.weight"]
                out[p + f"mlp.{w}.weight"] = torch.zeros_like(out[p + f"mlp.{w}.weight"])
            continue
        out[p + "fast_norm.weight"] = torch.ones(d)
        out[p + "fast_mlp.w1.weight"] = torch.randn(f, d, generator=gen) * cfg.init_std
        out[p + "fast_mlp.w3.weight"] = torch.randn(f, d, generator=gen) * cfg.init_std
        out[p + "fast_mlp.w2.weight"] = torch.zeros(d, f)  # the fast MLP adds exactly 0 at first
    return out


def build_model(
    src: LlamaSource, cfg: ModelConfig, seed: int = 0, fast_init: FastInit = "new", dtype: torch.dtype = torch.float32
) -> TTTModel:
    """The converted network in memory (frozen, eval mode): what `convert` saves."""
    tensors = to_checkpoint_tensors(src, cfg, seed, fast_init)
    with torch.device("meta"):
        model = TTTModel(cfg)
    model = model.to_empty(device="cpu")
    model.load_state_dict(tensors, strict=True)
    return model.to(dtype=dtype).requires_grad_(False).eval()


def convert(
    source: str | Path,
    out_dir: str | Path,
    window: int | None = None,
    mini_batch: int | None = None,
    fast_layers: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    attention_sinks: int = DEFAULT_SINKS,
    fast_init: FastInit = "new",
    inner_lr: float = 1.0,
    inner_clip: float = 1.0,
    sink_horizon: int | None = None,
) -> TTTModel:
    """Convert `source` into a checkpoint at `out_dir` (tokenizer.json beside it); returns the model."""
    src = read_source(source)
    cfg = target_config(src, window, mini_batch, fast_layers, attention_sinks, inner_lr, inner_clip, sink_horizon)
    model = build_model(src, cfg, seed, fast_init, dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    src.write_tokenizer(out / TOKENIZER_FILE)
    save_checkpoint(model, out)
    return model


# -- command line (registered by model.cli) --------------------------------------------------

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_convert_command(sub: Any) -> None:
    """Register `convert` on model.cli's subparsers."""
    c = sub.add_parser("convert", help="convert a Hugging Face Llama directory or a GGUF file into a checkpoint")
    c.add_argument("--from", dest="source", required=True, help="HF model directory or .gguf file")
    c.add_argument("--out", required=True, help="checkpoint directory to write")
    c.add_argument("--window", type=int, default=None, help=f"sliding window k (default {DEFAULT_WINDOW})")
    c.add_argument("--mini-batch", type=int, default=None, help="TTT mini-batch b (default k/8)")
    c.add_argument("--fast-layers", type=int, default=None, help="suffix blocks with a fast MLP (default L/4)")
    c.add_argument(
        "--attention-sinks", type=int, default=DEFAULT_SINKS, help="leading positions always visible (0: pure SWA)"
    )
    c.add_argument(
        "--fast-init",
        choices=FAST_INITS,
        default="new",
        help="fast MLPs: new (w2 = 0) or moved (the block's pretrained MLP, static MLP zeroed)",
    )
    c.add_argument("--inner-lr", type=float, default=1.0, help="test-time SGD step size eta")
    c.add_argument("--inner-clip", type=float, default=1.0, help="global-norm clip of the test-time gradient")
    c.add_argument("--seed", type=int, default=0, help="seed of the fast MLPs' w1, w3 (fast-init new)")
    c.add_argument(
        "--sink-horizon", type=int, default=None, help="see the sinks at most this far back (config.sink_horizon)"
    )
    c.add_argument("--dtype", choices=sorted(_DTYPES), default="float32", help="stored weight type")
    c.set_defaults(fn=_cmd_convert)


def _cmd_convert(args: Any) -> int:
    model = convert(
        args.source,
        args.out,
        args.window,
        args.mini_batch,
        args.fast_layers,
        args.seed,
        _DTYPES[args.dtype],
        attention_sinks=args.attention_sinks,
        fast_init=args.fast_init,
        inner_lr=args.inner_lr,
        inner_clip=args.inner_clip,
        sink_horizon=args.sink_horizon,
    )
    cfg = model.cfg
    n = sum(p.numel() for p in model.parameters())
    print(
        f"wrote {args.out}: {cfg.num_layers} blocks ({cfg.num_fast_layers} with fast MLPs), window {cfg.window_size}, "
        f"mini-batch {cfg.mini_batch_size}, {n:,} parameters, {model.digest}"
    )
    return 0
