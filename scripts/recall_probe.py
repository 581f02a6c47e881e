"""Recall beyond the window through the real daemon (issue 9).

    python scripts/recall_probe.py --out runs/memory/recall.json [--probes 10] [--filler-tokens 1400]

For each condition a real `memoryd serve` (embedded Redis, loopback port) and the SDK:

- default: the daemon's default model (no --checkpoint), test-time steps on;
- steps-off: the same conversion with inner lr 0 (window 1024 + 4 sinks);
- full-attention: the same weights with a window longer than the session, inner lr 0.

Each probe is a session: a user turn states a fact (a code word), the assistant
acknowledges, a user turn of filler text (Python documentation) pushes the fact past
the 1024-token window, then `chat` asks for the code word (greedy).  A probe counts
as recalled when the reply contains the word.  The same probes without filler (the
fact inside the window) show whether the model can answer at all.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
for p in (ROOT, ROOT / "sdk", ROOT / "scripts"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

from memoryd_sdk import MemoryClient  # noqa: E402

WORDS = (
    "marigold", "tangerine", "osprey", "quartz", "juniper", "lantern", "saffron", "walrus", "cobalt", "thimble",
    "pelican", "obsidian", "paprika", "zeppelin", "hazelnut", "kestrel",
)  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def daemon(data_dir: Path, checkpoint: Path | None, log: Path) -> Iterator[str]:
    """`memoryd serve` on a free loopback port until the block ends; yields its address."""
    address = f"127.0.0.1:{free_port()}"
    args = [sys.executable, "-m", "memoryd", "serve", "--listen", address, "--metrics-port", "0"]
    args += ["--data-dir", str(data_dir), "--torch-threads", "1"]
    if checkpoint is not None:
        args += ["--checkpoint", str(checkpoint)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "sdk")]), "OMP_NUM_THREADS": "1"}
    with log.open("w") as f:
        proc = subprocess.Popen(args, stdout=f, stderr=f, stdin=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                with MemoryClient(address) as c:
                    c.model_info(timeout=2)
                break
            except Exception:  # noqa: BLE001 - not up yet
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"memoryd did not start; see {log}") from None
                time.sleep(1)
        yield address
    finally:
        proc.terminate()
        proc.wait(timeout=600)


def variant(checkpoint: Path, out: Path, **changes: object) -> Path:
    """A copy of `checkpoint` (same weights, same tokenizer) under a config with `changes`, once."""
    from memory_eval import with_config

    from model.checkpoint import load_checkpoint, save_checkpoint

    if not (out / "config.json").is_file():
        model = with_config(load_checkpoint(checkpoint), **changes)
        save_checkpoint(model, out, checkpoint / model.cfg.tokenizer)
    return out


def filler_text(corpus: Path, chars: int) -> str:
    """Plain prose from the Python docs, about `chars` characters (no code word in it)."""
    parts, n = [], 0
    for f in sorted(corpus.rglob("*.txt")):
        for para in f.read_text(errors="replace").split("\n\n"):
            if para.strip() and not para.lstrip().startswith((".", "*", "=", "-", ":")):
                parts.append(" ".join(para.split()))
                n += len(parts[-1])
                if n >= chars:
                    return "\n\n".join(parts)
    return "\n\n".join(parts)


def probe(address: str, word: str, filler: str | None) -> dict[str, object]:
    with MemoryClient(address, timeout=1800) as client:
        s = client.create_session(metadata={"probe": word})
        try:
            s.add_message("user", f"Please remember this: the secret code word is {word}. I will ask for it later.")
            fact_end = s.add_message("assistant", f"Understood. The secret code word is {word}.").offset
            behind = 0
            if filler is not None:
                behind = s.add_message("user", "Here are some notes to read:\n\n" + filler).offset - fact_end
            reply = s.chat("What is the secret code word? Answer with the word only.", max_tokens=16)
            return {"word": word, "reply": reply.text, "recalled": word in reply.text.lower(), "filler_tokens": behind}
        finally:
            s.delete()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--probes", type=int, default=10)
    ap.add_argument("--filler-chars", type=int, default=5000, help="about 1,100 SmolLM2 tokens: past the window")
    ap.add_argument("--corpus", type=Path, default=ROOT / "data" / "corpora" / "python-doc" / "_sources")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "memory" / "recall")
    args = ap.parse_args(argv)

    from memoryd.default_model import DEFAULT_MINI_BATCH, default_checkpoint

    args.work.mkdir(parents=True, exist_ok=True)
    default = default_checkpoint(args.work / "data")
    conditions = {
        "default": None,
        "steps-off": variant(default.path, args.work / "steps-off", inner_lr=0.0),
        "full-attention": variant(default.path, args.work / "full", inner_lr=0.0, window_size=8192, attention_sinks=0),
    }
    filler = filler_text(args.corpus, args.filler_chars)
    words = WORDS[: args.probes]
    result: dict[str, object] = {"probes": len(words), "mini_batch": DEFAULT_MINI_BATCH, "conditions": {}}
    for name, ckpt in conditions.items():
        with daemon(args.work / "data", ckpt, args.work / f"{name}.log") as address:
            rows = {
                "beyond_window": [probe(address, w, filler) for w in tqdm(words, desc=f"{name} beyond")],
                "in_window": [probe(address, w, None) for w in tqdm(words, desc=f"{name} in-window")],
            }
        result["conditions"][name] = {  # type: ignore[index]
            **{f"{k}_recalled": sum(bool(r["recalled"]) for r in v) for k, v in rows.items()},
            **rows,
        }
        counts = {k: v for k, v in result["conditions"][name].items() if k.endswith("recalled")}  # type: ignore[index]
        print(name, counts, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
