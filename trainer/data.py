"""Reading prepared token shards: training windows and evaluation sequences.

Training windows are drawn from the step number alone
(`numpy.random.default_rng([seed, step])`), never from an iterator's position,
so a resumed run, a run on more processes and an uninterrupted one see exactly
the same sequences in the same order: every process draws the whole global
batch and keeps its own slice.

Evaluation sequences lie inside one document (no BOS within them), so position
t of every sequence really has t tokens of the same document as context, which
is what a per-position NLL curve is meant to show.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from trainer.prepare import META_FILE, DataError


class TokenShards:
    """The memory-mapped shards of one split of a prepared data directory."""

    def __init__(self, data_dir: str | Path, split: str) -> None:
        root = Path(data_dir)
        meta_file = root / META_FILE
        if not meta_file.is_file():
            raise DataError(f"{root} is not a prepared data directory ({META_FILE} missing); run `trainer prepare`")
        try:
            self.meta = json.loads(meta_file.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{meta_file} is not valid JSON: {e}") from e
        splits = self.meta.get("splits", {})
        if split not in splits:
            raise DataError(f"{meta_file} has no {split!r} split (has {sorted(splits)})")
        dtype = np.dtype(self.meta["dtype"])
        self.arrays: list[np.ndarray] = []
        for shard in splits[split]["shards"]:
            path = root / shard["file"]
            if not path.is_file():
                raise DataError(f"shard {path} listed in {meta_file} is missing")
            if path.stat().st_size != shard["tokens"] * dtype.itemsize:
                raise DataError(f"shard {path} has {path.stat().st_size} bytes, expected {shard['tokens']} tokens")
            if shard["tokens"]:
                self.arrays.append(np.memmap(path, dtype=dtype, mode="r"))
        self.split = split
        self.bos = int(self.meta["bos_token_id"])
        self.vocab_size = int(self.meta["vocab_size"])
        self.tokens = sum(a.size for a in self.arrays)

    def sample(self, seed: int, step: int, count: int, length: int) -> torch.Tensor:
        """`count` windows [count, length] for one optimizer step, uniformly over start positions."""
        starts_per = np.array([max(a.size - length + 1, 0) for a in self.arrays], dtype=np.int64)
        total = int(starts_per.sum())
        if total <= 0:
            raise DataError(
                f"{self.split} split has no shard of {length} tokens (longest {max(a.size for a in self.arrays)})"
            )
        rng = np.random.default_rng([seed, step])
        flat = rng.integers(0, total, size=count)
        bounds = np.cumsum(starts_per)
        rows = []
        for f in flat:
            i = int(np.searchsorted(bounds, f, side="right"))
            off = int(f - (bounds[i - 1] if i else 0))
            rows.append(np.asarray(self.arrays[i][off : off + length], dtype=np.int64))
        return torch.from_numpy(np.stack(rows))

    def document_sequences(self, length: int, limit: int | None = None) -> torch.Tensor:
        """Windows [N, length] that lie inside one document: the document's first `length`
        tokens, then its following non-overlapping pieces of `length - 1` predictions each.

        With `limit`, N windows evenly spread over all of them (every document gets its
        share instead of the first documents filling the quota).
        """
        found: list[tuple[int, int]] = []
        for i, a in enumerate(self.arrays):
            starts = np.flatnonzero(np.asarray(a) == self.bos)
            ends = np.append(starts[1:], a.size)
            for s, e in zip(starts, ends, strict=True):
                found.extend((i, int(o)) for o in range(int(s), int(e) - length + 1, length - 1))
        if not found:
            raise DataError(f"{self.split} split has no document of {length} tokens or more")
        if limit is not None and limit < len(found):
            found = [found[int(j)] for j in np.linspace(0, len(found) - 1, limit).round()]
        return torch.from_numpy(
            np.stack([np.asarray(self.arrays[i][o : o + length], dtype=np.int64) for i, o in found])
        )
