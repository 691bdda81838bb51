"""Optimisation: which parameters decay, the learning-rate schedule, the loss, and gradient clipping."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:
    from .settings import TrainConfig


class TrainingDiverged(RuntimeError):
    """The loss (or the gradient) became NaN or infinite; the last good checkpoint is kept."""


# parameter names weight decay never touches
NO_DECAY = ("threshold", "decay_logit", ".table.", "norm", ".ln.", ".taps")


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay only matrices of Linear layers: never norms, biases, embeddings, thresholds or learned membrane decays
    (pulling a decay's logit to 0 would pull every tau towards 2)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.dim() < 2 or any(part in name for part in NO_DECAY)
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to lr, then cosine decay to min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def grad_norm(model: torch.nn.Module, clip: float) -> Tensor:
    """Total gradient norm, clipped to `clip` when clip > 0 (after DDP's all-reduce: the same on every rank)."""
    params = [p for p in model.parameters() if p.grad is not None]
    if clip > 0:
        return torch.nn.utils.clip_grad_norm_(params, clip)
    return torch.nn.utils.get_total_norm([p.grad for p in params])
