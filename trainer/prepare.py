"""`prepare`: text files, directories and JSONL into uint16/uint32 token shards.

The corpus is streamed: one document is read, tokenised and appended to the
open shard file at a time, so memory holds one document, never the corpus.
Every document starts with BOS, which is what the model's loss mask and the
evaluation's document-start windows key on.  Each document goes to the
validation split when a hash of its name falls under `val_fraction`: the split
is deterministic, independent of file order, and never cuts a document in two
(no validation text leaks into training).  Shards are raw little-endian arrays
that `numpy.memmap` reads back; `meta.json` lists them with their lengths.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
from tqdm import tqdm

from model.config import ModelConfig
from model.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer

TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".rst", ".rest", ".text", ""}
JSONL_SUFFIXES = {".jsonl", ".ndjson"}
META_FILE = "meta.json"


class DataError(ValueError):
    """Input or prepared data that cannot be used; the message names the path."""


def iter_files(inputs: list[str | Path]) -> list[tuple[Path, str]]:
    """Every readable input file, directories walked recursively, in sorted order.

    Each comes with its name for the train/validation split: the path relative to the
    input directory it was found in (the file name for a file given directly), so a
    corpus gets the same split wherever it lies on disk.
    """
    files: list[tuple[Path, str]] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and _kind(f) is not None)
            if not found:
                raise DataError(f"{p} holds no text, markdown, reST or JSONL files")
            files.extend((f, f.relative_to(p).as_posix()) for f in found)
        elif p.is_file():
            if _kind(p) is None:
                raise DataError(f"{p}: unsupported file type {p.suffix!r} (text, .md, .rst, .jsonl)")
            files.append((p, p.name))
        else:
            raise DataError(f"input {p} does not exist")
    return files


def _kind(p: Path) -> str | None:
    s = p.suffix.lower()
    if s in JSONL_SUFFIXES:
        return "jsonl"
    if s in TEXT_SUFFIXES:
        return "text"
    return None


def iter_documents(files: list[tuple[Path, str]], text_field: str) -> Iterator[tuple[Path, str, str]]:
    """(file, name, text) per document: one per text file, one per JSONL line."""
    for f, key in files:
        if _kind(f) == "jsonl":
            with f.open(encoding="utf-8") as fh:
                for n, line in enumerate(fh, 1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{f}:{n} is not valid JSON: {e}") from e
                    if not isinstance(row, dict) or not isinstance(row.get(text_field), str):
                        raise DataError(f"{f}:{n} has no string field {text_field!r}")
                    yield f, f"{key}:{n}", row[text_field]
        else:
            yield f, key, f.read_text(encoding="utf-8", errors="replace")


def is_validation(name: str, val_fraction: float, seed: int) -> bool:
    h = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(h[:8], "little") / 2**64 < val_fraction


@dataclass
class _ShardWriter:
    """Appends token arrays to numbered shard files of at most `shard_tokens` tokens."""

    out: Path
    split: str
    dtype: np.dtype
    shard_tokens: int
    shards: list[dict] = field(default_factory=list)
    documents: int = 0
    _fh: BinaryIO | None = None

    def write(self, tokens: np.ndarray) -> None:
        self.documents += 1
        while tokens.size:
            if self._fh is None or self.shards[-1]["tokens"] >= self.shard_tokens:
                self._open()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            part, tokens = tokens[:room], tokens[room:]
            self._fh.write(part.astype(self.dtype).tobytes())
            self.shards[-1]["tokens"] += int(part.size)

    def _open(self) -> None:
        self.close()
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self._fh = (self.out / name).open("wb")
        self.shards.append({"file": name, "tokens": 0})

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def load_prepare_tokenizer(spec: str) -> tuple[Tokenizer, int, str]:
    """(tokenizer, vocab size, name): "bytes", a tokenizer.json path, or a checkpoint directory.

    A checkpoint brings its own tokenizer *and* its BOS/EOS ids and vocabulary, which
    is what training from it (a converted pretrained model) needs: a bare tokenizer.json
    gets two new ids past its vocabulary instead.
    """
    if Path(spec).is_dir():
        from model.checkpoint import CheckpointError, read_config
        from model.tokenizer import load_tokenizer

        try:
            cfg = read_config(spec)
            return load_tokenizer(cfg, spec), cfg.vocab_size, f"checkpoint:{Path(spec).name}"
        except (CheckpointError, FileNotFoundError) as e:
            raise DataError(f"tokenizer {spec!r} is a directory but not a usable checkpoint: {e}") from e
    if spec == "bytes":
        cfg = ModelConfig(vocab_size=258, hidden_size=8, num_layers=1, num_heads=1, intermediate_size=8,
                          num_fast_layers=1, window_size=8, mini_batch_size=8)  # fmt: skip
        return ByteTokenizer(cfg.bos_token_id, cfg.eos_token_id), cfg.vocab_size, "bytes"
    p = Path(spec)
    if not p.is_file():
        raise DataError(f"tokenizer {spec!r} is neither 'bytes', a checkpoint directory nor an existing tokenizer.json")
    from tokenizers import Tokenizer as _Tok

    vocab = _Tok.from_file(str(p)).get_vocab_size()
    return HFTokenizer(p, bos_id=vocab, eos_id=vocab + 1), vocab + 2, p.name


def prepare(
    inputs: list[str | Path],
    out: str | Path,
    tokenizer: str = "bytes",
    val_fraction: float = 0.05,
    text_field: str = "text",
    shard_tokens: int = 1 << 27,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Tokenise `inputs` into `out`/{train,val}-NNNNN.bin and `out`/meta.json; returns the meta."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    files = iter_files(inputs)
    tok, vocab, tok_name = load_prepare_tokenizer(tokenizer)
    dtype = np.dtype("<u2") if vocab <= 1 << 16 else np.dtype("<u4")
    outp = Path(out)
    outp.mkdir(parents=True, exist_ok=True)
    writers = {s: _ShardWriter(outp, s, dtype, shard_tokens) for s in ("train", "val")}
    total_bytes = sum(f.stat().st_size for f, _ in files)
    with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="prepare", disable=not progress) as bar:
        last: Path | None = None
        for file, name, text in iter_documents(files, text_field):
            ids = np.asarray([tok.bos_id, *tok.encode(text)], dtype=np.int64)
            split = "val" if is_validation(name, val_fraction, seed) else "train"
            writers[split].write(ids)
            if file != last:  # the bar counts input bytes, one file at a time
                bar.update(file.stat().st_size)
                last = file
    for w in writers.values():
        w.close()
    if not writers["train"].shards:
        raise DataError("no training documents: the inputs are empty or all went to validation")
    meta = {
        "tokenizer": tok_name,
        "vocab_size": vocab,
        "bos_token_id": tok.bos_id,
        "eos_token_id": tok.eos_id,
        "dtype": dtype.str,
        "val_fraction": val_fraction,
        "seed": seed,
        "inputs": [str(i) for i in inputs],
        "splits": {
            s: {"documents": w.documents, "tokens": sum(x["tokens"] for x in w.shards), "shards": w.shards}
            for s, w in writers.items()
        },
    }
    (outp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return meta
