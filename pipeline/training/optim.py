"""Optimizer and learning-rate schedule of the SAM paper's recipe (appendix A)."""
from __future__ import annotations

import math
from typing import Any, Mapping

import torch


def lr_factor(step: int, warmup: int, total: int, decay_at: list[float], factor: float) -> float:
    """Linear warmup, then a step decay by ``factor`` at each fraction of ``total`` in ``decay_at``."""
    if step < warmup:
        return (step + 1) / warmup
    return factor ** sum(step >= int(f * total) for f in decay_at)


def make_optimizer(model: torch.nn.Module, optim: Mapping[str, Any]) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases, norms and embeddings tables of size 1 (ndim < 2)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": float(optim["weight_decay"])}, {"params": rest, "weight_decay": 0.0}],
        lr=float(optim["lr"]), betas=tuple(optim["betas"]),
    )


def make_scheduler(optimizer: torch.optim.Optimizer, optim: Mapping[str, Any],
                   steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """``lr_factor`` over ``steps`` with the warmup and decays of ``optim`` (stage.optim)."""
    warmup, decay_at, factor = int(optim["warmup_steps"]), list(optim["decay_at"]), float(optim["decay_factor"])
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, steps, decay_at, factor))


def cosine_factor(step: int, warmup: int, total: int, final: float) -> float:
    """Linear warmup to 1, then a cosine to ``final`` at ``total`` steps (the detector's)."""
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return final + (1 - final) * 0.5 * (1 + math.cos(math.pi * t))
