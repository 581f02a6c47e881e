"""bench/decode.py runs end to end on a tiny preset and prints the JSON line it documents.

The transformers side here is a random Llama of the preset's shapes (the GGUF is only
needed for the default model).  Timings are printed, never asserted.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "decode.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_decode_bench_tiny_preset_prints_one_json_line() -> None:
    proc = run("--json", "--preset", "tiny", "--contexts", "1024,2048", "--decode-tokens", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout
    out = json.loads(lines[0])
    assert out["model"] == "preset tiny"
    assert out["threads"] == {"torch": 1, "interop": 1}
    assert out["contexts"] == [1024, 2048] and out["decode_tokens"] == 3
    assert out["transformers"]["weights"].startswith("random")
    sides = {"memoryd", "full-attention", "transformers"}
    for key in ("decode_ms", "ingest_tok_s"):
        assert set(out[key]) == sides
        for figures in out[key].values():
            assert set(figures) == {"1024", "2048"}
            assert all(math.isfinite(v) and v > 0 for v in figures.values())
    assert set(out["state_bytes"]) == sides
    # The caches that grow with the context: full attention and transformers hold all 2048
    # positions, memoryd at most a window plus a mini-batch.
    assert out["state_bytes"]["memoryd"] < out["state_bytes"]["transformers"]
    assert set(out["decode_speedup_vs_transformers"]) == {"1024", "2048"}


def test_decode_bench_refuses_contexts_that_are_not_whole_pieces() -> None:
    proc = run("--preset", "tiny", "--contexts", "1000")
    assert proc.returncode == 2
    assert "--contexts must be positive multiples of 1024" in proc.stderr
