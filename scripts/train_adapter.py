"""Meta-learn the default model's fast weights and export them as memoryd's adapter (issue 9).

    python scripts/train_adapter.py --config trainer/configs/adapter_default_h200.yaml [--budget 540] [KEY=VALUE ...]

1. The default checkpoint (`memoryd.default_model`, converted once into data/) is the
   backbone, unless the config's `model.init_from` already exists.
2. The corpus is prepared with `trainer prepare` (the checkpoint's tokenizer) unless the
   config's `data` directory exists.  The validation documents of
   scripts/memory_eval.py are left out, and the test corpus (Shakespeare) is never
   read, so the held-out figures stay held out.
3. `trainer train` runs in a child process under a wall-clock budget: the config saves
   a checkpoint every few steps, so a run that meets the budget still leaves its last
   checkpoint instead of nothing.
4. The fast weights of the final (or latest) checkpoint are written to
   `memoryd/adapters/<DEFAULT_NAME>.safetensors` (`--adapter-out` to change), after
   checking that every other weight equals the backbone's: an adapter trained on
   another backbone would load (the shapes fit) and serve garbage.

The same script runs a tiny CPU smoke test (tests/test_train_adapter.py) with a tiny
checkpoint and corpus passed as overrides.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import safetensors.torch
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(ROOT))

from model.checkpoint import load_checkpoint  # noqa: E402
from model.network import fast_weight_names  # noqa: E402
from trainer.config import load_config  # noqa: E402


class AdapterError(ValueError):
    """A trained checkpoint that does not fit the backbone it claims; the message says which weight."""


def latest_checkpoint(out: Path) -> Path | None:
    """`out/final`, else the last `out/step-*` written whole (config and weights present)."""
    candidates = [out / "final", *sorted(out.glob("step-*"), reverse=True)]
    for c in candidates:
        if (c / "config.json").is_file() and (c / "model.safetensors").is_file():
            return c
    return None


def export_adapter(trained: Path, backbone: Path, out_file: Path) -> dict[str, object]:
    """Write the fast weights of `trained` to `out_file` if its other weights are `backbone`'s."""
    model, base = load_checkpoint(trained), load_checkpoint(backbone)
    if model.cfg != base.cfg:
        raise AdapterError(f"{trained} has another config than the backbone {backbone}")
    fast = fast_weight_names(model.cfg)
    own, ref = model.state_dict(), base.state_dict()
    for name, w in ref.items():
        if name not in fast and not torch.equal(own[name], w):
            raise AdapterError(f"{trained}: {name} differs from the backbone's: train with trainable 'fast'")
    moved = sum(float((own[n] - ref[n]).norm()) for n in fast)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_suffix(".tmp")
    safetensors.torch.save_file({n: own[n].contiguous() for n in fast}, str(tmp))
    tmp.rename(out_file)
    return {"adapter": str(out_file), "from": str(trained), "tensors": len(fast), "distance_from_backbone": moved}


def prepare_corpus(data: Path, tokenizer: Path, corpus: Path, exclude: Sequence[str]) -> None:
    """Token shards of `corpus` minus the files named in `exclude` (paths relative to it)."""
    from trainer.prepare import prepare

    keep = corpus.parent / (corpus.name + "-train")
    if not keep.is_dir():
        skip = set(exclude)
        for f in sorted(p for p in corpus.rglob("*") if p.is_file()):
            rel = f.relative_to(corpus).as_posix()
            if rel not in skip:
                (keep / rel).parent.mkdir(parents=True, exist_ok=True)
                (keep / rel).write_bytes(f.read_bytes())
    prepare([keep], data, tokenizer=str(tokenizer))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", type=Path, required=True)
    ap.add_argument("--budget", type=float, default=540.0, help="wall-clock seconds for training")
    ap.add_argument("--corpus", type=Path, default=ROOT / "data" / "corpora" / "python-doc")
    ap.add_argument("--exclude", type=Path, default=ROOT / "scripts" / "memory_val_files.txt")
    ap.add_argument("--adapter-out", type=Path, default=None)
    ap.add_argument("overrides", nargs="*", help="trainer config overrides, key.path=value")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.overrides)

    from memoryd.default_model import ADAPTER_DIR, DEFAULT_NAME, default_checkpoint

    backbone = Path(cfg.model.init_from) if cfg.model.init_from else None
    if backbone is None or not (backbone / "config.json").is_file():
        backbone = default_checkpoint(ROOT / "data").path
        args.overrides = [*args.overrides, f"model.init_from={backbone}"]
    if not Path(cfg.data, "meta.json").is_file():
        exclude = args.exclude.read_text().split() if args.exclude.is_file() else []
        prepare_corpus(Path(cfg.data), backbone, args.corpus, exclude)

    t0 = time.monotonic()
    cmd = [sys.executable, "-m", "trainer", "train", "--config", str(args.config), *args.overrides]
    try:
        rc = subprocess.run(cmd, cwd=ROOT, timeout=args.budget, check=False).returncode
    except subprocess.TimeoutExpired:
        rc = None  # out of budget: export the last checkpoint it saved
    trained = latest_checkpoint(Path(cfg.out))
    if trained is None:
        print(f"training left no checkpoint in {cfg.out} (exit {rc})", file=sys.stderr)
        return 1
    out_file = args.adapter_out or ADAPTER_DIR / f"{DEFAULT_NAME}.safetensors"
    report = export_adapter(trained, backbone, out_file)
    report.update(train_exit=rc, train_seconds=round(time.monotonic() - t0, 1))
    print(json.dumps(report))
    return 0 if rc in (0, None) else rc


if __name__ == "__main__":
    raise SystemExit(main())
