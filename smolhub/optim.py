"""Optimizers and learning-rate schedules."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn

from smolhub.config import TrainConfig
from smolhub.muon import Muon, MuonWithAdamW


def adamw_param_groups(model: nn.Module, weight_decay: float, exclude: Sequence[nn.Parameter] = ()) -> list[dict]:
    """Weight decay on matrices (and embeddings) only: decaying norms' gains and biases hurts."""
    decay, no_decay = [], []
    skip = {id(p) for p in exclude}
    for p in model.parameters():  # .parameters() yields a tied weight once
        if p.requires_grad and id(p) not in skip:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def muon_params(model: nn.Module) -> list[nn.Parameter]:
    """Muon's share: the hidden weight matrices (and 3-D expert stacks), never an embedding or the head."""
    embeddings = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) or m is model.lm_head
                  for p in m.parameters()}  # their parametrizations' too (a LoRA run's new token rows)
    return [p for p in model.parameters() if p.requires_grad and p.dim() >= 2 and id(p) not in embeddings]


def build_optimizer(model: nn.Module, cfg: TrainConfig, device_type: str) -> torch.optim.Optimizer:
    def adamw(groups):
        # The fused kernel is one launch for all parameters on CUDA; the CPU keeps the exact foreach path.
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8,
                                 fused=device_type == "cuda")

    if cfg.optimizer == "adamw":
        return adamw(adamw_param_groups(model, cfg.weight_decay))
    hidden = muon_params(model)
    muon = Muon(hidden, lr=cfg.muon_lr or cfg.lr, weight_decay=cfg.weight_decay, adjust_lr_fn="match_rms_adamw",
                ns_dtype=torch.bfloat16 if device_type == "cuda" else torch.float32)
    return MuonWithAdamW(muon, adamw(adamw_param_groups(model, cfg.weight_decay, exclude=hidden)))


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak learning rate at `step` (0-based): linear warmup, then the schedule; the
    cosine reaches its floor at cfg.horizon and stays there."""
    if step < cfg.warmup_steps:
        return (step + 1) / (cfg.warmup_steps + 1)
    floor = cfg.min_lr / cfg.lr
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.horizon - cfg.warmup_steps))
    else:  # cosine_restarts: SGDR, the decay restarts from the peak every restart_period steps
        progress = ((step - cfg.warmup_steps) % cfg.restart_period) / cfg.restart_period
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
