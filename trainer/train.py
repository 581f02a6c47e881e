"""`train`: the outer loop, in `meta` (TTT-E2E) or `pretrain` mode.

One optimizer step: every process draws the step's global batch of windows
(`TokenShards.sample`), keeps its slice, and for each micro-batch runs
`model.sequence.run_sequence`:

- meta: `inner=True, create_graph=True`; the loss is the mean of the
  mini-batch losses before each one's own test-time step, differentiated
  through every inner step (spec: model.md, "Meta-learning");
- pretrain: `inner=False`, a plain next-token loss with theta_0.

Each micro-batch's loss is scaled by its share of the global batch, gradients
are summed over micro-batches and processes, clipped to global norm 1.0, and
AdamW steps with the warm-up + cosine learning rate.  The inner step size warms
up from `inner_lr_init` (meta mode).
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from model.checkpoint import init_model, load_checkpoint, read_config
from model.network import TTTModel, fast_weight_names
from model.sequence import run_sequence
from trainer import dist
from trainer.config import ConfigError, TrainConfig, model_config_for
from trainer.data import TokenShards
from trainer.metrics import MetricsWriter
from trainer.optim import build_optimizer, inner_lr_at, lr_at, set_lr
from trainer.prepare import DataError
from trainer.probe import inner_before_after
from trainer.resume import (
    load_optimizer_tensors,
    read_optimizer_tensors,
    read_trainer_state,
    save_training_checkpoint,
)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    return dev


def build_model(cfg: TrainConfig, device: torch.device) -> TTTModel:
    """A fresh model from a preset, or a checkpoint's weights under its (possibly edited) config."""
    spec = cfg.model
    if spec.init_from is not None:
        base = read_config(spec.init_from)
        mcfg = model_config_for(spec, base)
        src = load_checkpoint(spec.init_from)
        model = TTTModel(mcfg)
        model.load_state_dict(src.state_dict())
    else:
        model = init_model(model_config_for(spec), seed=cfg.seed)
    return model.to(device).requires_grad_(True).train()


def check_compatible(cfg: TrainConfig, model: TTTModel, shards: TokenShards) -> None:
    mcfg = model.cfg
    if cfg.mode == "meta" and mcfg.model_type != "ttt-e2e":
        raise ConfigError(f"mode 'meta' needs a ttt-e2e model, got {mcfg.model_type!r}: use mode 'pretrain'")
    if cfg.seq_len % mcfg.mini_batch_size:
        raise ConfigError(f"seq_len {cfg.seq_len} must be a multiple of mini_batch_size {mcfg.mini_batch_size}")
    if shards.vocab_size > mcfg.vocab_size:
        raise ConfigError(f"data vocabulary {shards.vocab_size} exceeds the model's vocab_size {mcfg.vocab_size}")
    if cfg.trainable == "fast" and (cfg.mode != "meta" or mcfg.num_fast_layers == 0):
        raise ConfigError(
            "trainable 'fast' learns the fast MLPs' initial weights: it needs mode 'meta' on a ttt-e2e model"
        )
    if shards.bos != mcfg.bos_token_id:
        raise ConfigError(f"data BOS id {shards.bos} differs from the model's bos_token_id {mcfg.bos_token_id}")


def train(cfg: TrainConfig, resume: str | None = None) -> Path:
    """Run (or resume) training; returns the final checkpoint directory."""
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    info = dist.setup(device.type)
    if device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    local_batch, rem = divmod(cfg.global_batch, info.world * cfg.micro_batch)
    if rem or local_batch == 0:
        raise ConfigError(
            f"global_batch {cfg.global_batch} must be a multiple of processes x micro_batch "
            f"= {info.world} x {cfg.micro_batch}"
        )
    shards = TokenShards(cfg.data, "train")
    torch.manual_seed(cfg.seed)
    start_step, tokens_seen, wall = 0, 0, 0.0
    if resume is not None:
        state = read_trainer_state(resume)
        model = load_checkpoint(resume, device=device).requires_grad_(True).train()
        start_step, tokens_seen, wall = state["step"], state["tokens_seen"], state["wall_seconds"]
    else:
        model = build_model(cfg, device)
    check_compatible(cfg, model, shards)
    if cfg.trainable == "fast":
        fast = set(fast_weight_names(model.cfg))
        for name, p in model.named_parameters():
            p.requires_grad_(name in fast)
    opt = build_optimizer(model, cfg.optim)
    if resume is not None:
        load_optimizer_tensors(model, opt, read_optimizer_tensors(resume))
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    out = Path(cfg.out)
    if info.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=2) + "\n")
    metrics = MetricsWriter(out / "metrics.jsonl" if info.main else None, append=resume is not None)
    meta = cfg.mode == "meta"
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and cfg.bf16 else contextlib.nullcontext()
    )
    final_inner_lr = model.cfg.inner_lr
    last = cfg.steps if cfg.stop_at is None else min(cfg.stop_at, cfg.steps)
    bar = tqdm(
        total=last, initial=start_step, desc=f"train {cfg.mode}", unit="step", disable=not (cfg.progress and info.main)
    )
    micro_per_rank = local_batch
    step = start_step
    ckpt_dir = out / "final"

    def trainer_state(done: int) -> dict[str, Any]:
        return {
            "step": done,
            "tokens_seen": tokens_seen,
            "wall_seconds": wall,
            "mode": cfg.mode,
            "params": n_params,
            "world": info.world,
            "config": cfg.model_dump(mode="json"),
        }

    while step < last:
        t0 = time.perf_counter()
        lr = lr_at(cfg.optim, step, cfg.steps)
        ilr = inner_lr_at(cfg.optim, step, final_inner_lr) if meta else final_inner_lr
        set_lr(opt, lr)
        windows = shards.sample(cfg.seed, step, cfg.global_batch, cfg.seq_len + 1)
        mine = windows[
            info.rank * micro_per_rank * cfg.micro_batch : (info.rank + 1) * micro_per_rank * cfg.micro_batch
        ]
        opt.zero_grad(set_to_none=True)
        loss_sum, inner_gn_sum, first_mb, last_mb = 0.0, 0.0, 0.0, 0.0
        for i in range(micro_per_rank):
            w = mine[i * cfg.micro_batch : (i + 1) * cfg.micro_batch].to(device)
            with autocast:
                res = run_sequence(
                    model, w[:, :-1], w[:, 1:], inner=meta, inner_lr=ilr, create_graph=meta,
                    checkpoint=cfg.activation_checkpointing,
                )  # fmt: skip
            (res.loss * (cfg.micro_batch / cfg.global_batch)).backward()
            share = cfg.micro_batch
            loss_sum += float(res.loss.detach()) * share
            first_mb += float(res.minibatch_loss[:, 0].detach().mean()) * share
            last_mb += float(res.minibatch_loss[:, -1].detach().mean()) * share
            if res.grad_norm is not None:
                inner_gn_sum += float(res.grad_norm.mean()) * share
        dist.all_reduce_grads(params, info)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.optim.clip, foreach=False))
        opt.step()
        step += 1
        dt = time.perf_counter() - t0
        wall += dt
        tokens_seen += cfg.global_batch * cfg.seq_len
        sums = dist.all_reduce_scalars([loss_sum, first_mb, last_mb, inner_gn_sum], info, device)
        if step % cfg.log_every == 0 or step == last:
            row: dict[str, Any] = {
                "step": step,
                "loss": sums[0] / cfg.global_batch,
                "loss_first_minibatch": sums[1] / cfg.global_batch,
                "loss_last_minibatch": sums[2] / cfg.global_batch,
                "grad_norm": grad_norm,
                "lr": lr,
                "inner_lr": ilr,
                "tokens": tokens_seen,
                "tokens_per_s": cfg.global_batch * cfg.seq_len / dt,
                "step_seconds": dt,
            }
            if meta:
                row["inner_grad_norm"] = sums[3] / cfg.global_batch
            if cfg.probe_every and step % cfg.probe_every == 0 and model.cfg.model_type == "ttt-e2e" and info.main:
                x = mine[:1].to(device)
                row["inner_loss_before"], row["inner_loss_after"] = inner_before_after(model, x[:, :-1], x[:, 1:], ilr)
            metrics.write(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
        bar.update(1)
        if info.main and cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < last:
            save_training_checkpoint(out / f"step-{step:06d}", model, opt, trainer_state(step))
    bar.close()
    if info.main:
        save_training_checkpoint(ckpt_dir, model, opt, trainer_state(step))
    dist.barrier(info)
    metrics.close()
    dist.teardown(info)
    return ckpt_dir


__all__ = ["DataError", "train"]
