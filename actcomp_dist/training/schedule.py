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
    """Each param group's lr is its initial lr (``train.lr x`` its ``lr_scale``) times
    ``learning_rate(step) / train.lr``: the factor holds through warm-up and decay."""
    base = train.lr if train.lr > 0 else 1.0
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate(step, train) / base
    )


def restart_lr_schedule(scheduler, train: TrainSection) -> None:
    """Make a ``LambdaLR`` restored from a checkpoint follow ``train``'s schedule.

    Its state (``base_lrs``, and the optimizer's current ``lr``) holds the learning rates of
    the run that wrote the checkpoint, while its lambda is built from this run's ``train``:
    with other LR settings (a resume that changes ``train.lr`` or ``train.steps``) the next
    step would use the old rate and the later ones a mix of both. Here the base and the
    current rate are recomputed from ``train`` at the restored step, each group's times its
    ``lr_scale`` (a resume cannot change those: :mod:`actcomp_dist.training.drift`).
    """
    base = train.lr if train.lr > 0 else 1.0
    scheduler.base_lrs = [
        base * group.get("lr_scale", 1.0) for group in scheduler.optimizer.param_groups
    ]
    lrs = [
        base_lr * lr_lambda(scheduler.last_epoch)
        for base_lr, lr_lambda in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)
    ]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr
    scheduler._last_lr = lrs


def schedule_lr(scheduler) -> float:
    """The schedule's learning rate for the next step, before any ``train.lr_scale`` factor
    (what the metrics log as ``lr`` and the subspace merge steps with): a group's with factor 1
    when there is one (the subspace proxies' group always is), else the first group's divided
    by its factor."""
    groups = scheduler.optimizer.param_groups
    lrs = scheduler.get_last_lr()
    for group, lr in zip(groups, lrs, strict=True):
        if group.get("lr_scale", 1.0) == 1.0:
            return lr
    return lrs[0] / groups[0]["lr_scale"]
