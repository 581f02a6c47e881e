"""torchrun with 2 CPU processes (gloo) equals 1 process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import safetensors.torch
import torch
from trainer_helpers import prepared_data, tiny_config

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def test_two_processes_match_one(tmp_path: Path) -> None:
    data = prepared_data(tmp_path)
    cfgs = {}
    for name in ("one", "two"):
        cfg = tiny_config(data, tmp_path / name, steps=3, global_batch=4, micro_batch=1)
        cfgs[name] = tmp_path / f"{name}.json"
        cfgs[name].write_text(json.dumps(cfg))
    _run([sys.executable, "-m", "trainer", "train", "--config", str(cfgs["one"])])
    _run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "trainer", "train", "--config", str(cfgs["two"])]
    )  # fmt: skip
    one = safetensors.torch.load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    two = safetensors.torch.load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    init = json.loads((tmp_path / "two" / "final" / "trainer.json").read_text())
    assert init["world"] == 2
    for k in one:
        torch.testing.assert_close(one[k], two[k], rtol=1e-4, atol=1e-5)
    log = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert len(log) == 3 and log[-1]["tokens"] == 3 * 4 * 32
