"""Learning-rate schedule: linear warm-up, then cosine (or linear) decay to ``min_lr``.

A pure function of the optimizer step, wrapped in a ``LambdaLR`` so DeepSpeed steps it at
gradient-accumulation boundaries and saves it in its checkpoints.
"""

from __future__ import annotations

import math

import torch

from actcomp_dist.training.config import TrainSection


def learning_rate(step: int, train: TrainSection) -> float:
    """The learning rate used by optimizer step ``step`` (0-based)."""
    if train.warmup_steps and step < train.warmup_steps:
        return train.lr * (step + 1) / train.warmup_steps
    if train.lr_decay == "constant":
        return train.lr
    decay_steps = max(1, train.steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / decay_steps)
    if train.lr_decay == "cosine":
        factor = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        factor = 1.0 - progress
    return train.min_lr + (train.lr - train.min_lr) * factor


def build_lr_scheduler(optimizer: torch.optim.Optimizer, train: TrainSection):
    base = train.lr if train.lr > 0 else 1.0
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate(step, train) / base
    )
