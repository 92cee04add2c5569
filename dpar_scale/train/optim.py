"""The optimizer (AdamW, weight decay on matrices only) and the learning-rate schedule (warm-up, then constant
or cosine)."""
from __future__ import annotations

import math

import torch

from dpar_scale.config import Config


def lr_lambda(cfg: Config):
    warmup, total, schedule, floor = cfg.optim.warmup_steps, cfg.train.steps, cfg.optim.schedule, cfg.optim.min_lr_ratio

    def factor(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "cosine":
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    return factor


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    # Weight decay on matrices only (LlamaGen's choice): not on norms, biases or the start/class vectors.
    # After TP + FSDP parameters live on different device meshes (or none), and one foreach op cannot mix them, so
    # each (decay, mesh) pair is its own parameter group; one process has exactly the two groups it always had.
    from torch.distributed.tensor import DTensor

    groups: dict = {}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        mesh = p.device_mesh if isinstance(p, DTensor) else None
        groups.setdefault((p.dim() >= 2, mesh), []).append(p)
    order = sorted(groups, key=lambda k: (not k[0], str(k[1])))
    param_groups = [{"params": groups[k], "weight_decay": cfg.optim.weight_decay if k[0] else 0.0} for k in order]
    return torch.optim.AdamW(param_groups, lr=cfg.optim.lr, betas=cfg.optim.betas, foreach=True)
