"""The DeepSpeed engine around our model: optimizer, LR schedule, ZeRO, clipping, precision.

Our run config owns the training hyper-parameters (``train.*``); the ``deepspeed`` section owns
everything else DeepSpeed knows (ZeRO stage and its tuning, communication, ...): see
:mod:`actcomp_dist.training.deepspeed_config` for how the two meet.

The optimizer is AdamW built here (a plain ``torch.optim.AdamW``, so nothing is compiled on a
CPU) with weight decay on matrices only, and the LR schedule is ours (warm-up + cosine); both
are handed to ``deepspeed.initialize`` so DeepSpeed steps, clips and checkpoints them.

``subspace`` mode: the compressed weights are not given to the optimizer. At ZeRO 0 their
m x r gradients arrive on ``subspace_proxy`` parameters (see
:mod:`actcomp_dist.optim.subspace_proxy`) that DeepSpeed treats like any other parameter —
one data-parallel average, one global norm clip, one LR schedule — and a
:class:`SubspaceMerger` folds each step into the weights. At ZeRO 1/2 a proxy would stay whole
on every rank, so :class:`PartitionedSubspaceAdam` keeps the m x r gradients, Adam moments and
fp32 masters instead, each rank its rows, and joins DeepSpeed's norm clip
(:mod:`actcomp_dist.optim.subspace_partitioned`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from actcomp_dist.models.kinds import parameter_group
from actcomp_dist.optim.subspace_partitioned import PartitionedSubspaceAdam
from actcomp_dist.optim.subspace_proxy import (
    SubspaceMerger,
    attach_subspace_proxies,
    skip_subspace_weights_in_zero0_reduction,
    subspace_layers,
)
from actcomp_dist.training.config import ConfigError, RunConfig, TrainSection, lr_scale_factor
from actcomp_dist.training.deepspeed_config import deepspeed_config
from actcomp_dist.training.schedule import build_lr_scheduler


@dataclass
class Engine:
    engine: Any  # deepspeed.DeepSpeedEngine
    optimizer: Any
    lr_scheduler: Any
    merger: SubspaceMerger | None
    gradient_accumulation_steps: int


def _param_groups(model: nn.Module, train: TrainSection, exclude: set[int]) -> list[dict]:
    """The optimizer's param groups: weight decay on matrices only, and one group per
    ``train.lr_scale`` factor (:func:`~actcomp_dist.models.kinds.parameter_group`). Each group
    starts at ``train.lr x factor`` and carries its ``lr_scale``: the schedule's ``LambdaLR``
    multiplies that initial lr, so warm-up and decay keep the ratio at every step. Groups come
    in order of first appearance, decayed ones first, parameters in model order: with every
    factor 1 they are the two groups (matrices, vectors) of a run without the field."""
    grouped: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad or id(param) in exclude:
            continue
        factor = lr_scale_factor(train.lr_scale, parameter_group(name))
        grouped.setdefault((param.dim() >= 2, factor), []).append(param)
    keys = sorted(grouped, key=lambda key: not key[0])  # stable: decayed groups first
    return [
        {
            "params": grouped[(decay, factor)],
            "weight_decay": train.weight_decay if decay else 0.0,
            "lr": train.lr * factor,
            "lr_scale": factor,
        }
        for decay, factor in keys
    ]


def build_engine(config: RunConfig, model: nn.Module, world_size: int, mpu) -> Engine:
    """Create the optimizer, LR schedule and DeepSpeed engine (collective)."""
    import deepspeed

    train = config.train
    ds_config = deepspeed_config(config, world_size)
    merger = None
    exclude: set[int] = set()
    proxies: list[nn.Parameter] = []
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    if config.compression.grad_mode == "subspace":
        if stage not in (0, 1, 2):
            raise ConfigError(f"grad_mode='subspace' needs ZeRO stage 0-2, got {stage}")
        if stage == 0:
            proxies = attach_subspace_proxies(model)
        exclude = {id(layer.weight) for layer in subspace_layers(model)} | {id(p) for p in proxies}
    groups = _param_groups(model, train, exclude)
    if proxies:  # stepped at the schedule's lr; the merger scales by train.subspace_scale
        groups.append({"params": proxies, "weight_decay": 0.0, "lr": train.lr, "lr_scale": 1.0})
    optimizer = torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=train.lr,
        betas=tuple(train.betas),
        eps=train.eps,
        foreach=False,
    )
    lr_scheduler = build_lr_scheduler(optimizer, train)
    engine, ds_optimizer, _, ds_scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        config=ds_config,
        mpu=mpu,
    )
    # After deepspeed.initialize: DeepSpeed casts the module to bf16/fp16 in place, and the
    # merger keeps fp32 masters only of weights that are not fp32 when it is built. The fp32
    # masters of 16-bit weights are partitioned over the data-parallel group.
    dp_group = mpu.get_data_parallel_group() if mpu is not None else None
    if proxies:  # ZeRO 0, fp32 (validate_run refuses 16-bit): the proxies are the torch AdamW's
        merger = SubspaceMerger(
            model, train.subspace_scale, train.weight_decay, process_group=dp_group
        )
        skip_subspace_weights_in_zero0_reduction(engine, model)
    elif config.compression.grad_mode == "subspace":
        # ZeRO 1/2: gradients, moments and masters partitioned by rows, outside DeepSpeed
        # (DeepSpeed would keep a replicated m x r proxy per weight).
        merger = PartitionedSubspaceAdam(
            model,
            train.subspace_scale,
            train.weight_decay,
            betas=tuple(train.betas),
            eps=train.eps,
            process_group=dp_group,
            model_parallel_group=mpu.get_model_parallel_group() if mpu is not None else None,
        )
        merger.attach_to(ds_optimizer)
    if stage == 0 and train.precision == "fp32":
        per_parameter = train.clip_grad if train.clip_grad_scope == "parameter" else None
        _skip_non_finite_fp32_steps(engine, per_parameter)
    return Engine(
        engine=engine,
        optimizer=ds_optimizer,
        lr_scheduler=ds_scheduler,
        merger=merger,
        gradient_accumulation_steps=ds_config["gradient_accumulation_steps"],
    )


def _skip_non_finite_fp32_steps(engine, per_parameter_max_norm: float | None = None) -> None:
    """Give ZeRO 0 in fp32 the overflow skip every other DeepSpeed path has.

    There DeepSpeed steps the torch optimizer directly: it clips in ``clip_fp32_gradients``
    with its own ``clip_grad_norm_`` (global over the model-parallel group, proxies included)
    but drops the norm (``get_global_grad_norm()`` would be ``None``), and it steps whatever
    the gradients hold. Here the optimizer's ``step`` computes the same norm first (clipping
    as DeepSpeed would; ``max_norm=inf`` leaves the gradients alone when clipping is off) and
    sets ``overflow`` instead of stepping when it is not finite; DeepSpeed's
    ``_take_model_step`` reads ``optimizer.overflow`` and ``optimizer._global_grad_norm``, so
    the skip is counted and the LR schedule held as on the ZeRO paths. The gradients are
    all-reduced over data parallelism by then, so every rank computes the same norm.

    ``per_parameter_max_norm`` (``train.clip_grad_scope='parameter'``, DeepSpeed's clip then
    off): after the global norm's finiteness check, each parameter tensor is clipped to it on
    its own (:func:`~actcomp_dist.optim.clip.clip_grad_norm_per_parameter_`); the logged
    norm stays the global one, before clipping.
    """
    from deepspeed.runtime.utils import clip_grad_norm_

    from actcomp_dist.optim.clip import clip_grad_norm_per_parameter_

    optimizer = engine.optimizer  # the torch AdamW itself: no DeepSpeed wrapper at ZeRO 0 fp32
    step = optimizer.step
    max_norm = engine.gradient_clipping() or math.inf

    def guarded_step(closure=None):
        norm = clip_grad_norm_(
            parameters=engine.module.parameters(), max_norm=max_norm, mpu=engine.mpu
        )
        optimizer._global_grad_norm = norm
        optimizer.overflow = not bool(torch.isfinite(norm).all())
        if optimizer.overflow:
            return None
        if per_parameter_max_norm is not None:
            tp_group = engine.mpu.get_model_parallel_group() if engine.mpu is not None else None
            clip_grad_norm_per_parameter_(
                [p for p in engine.module.parameters() if p.requires_grad],
                per_parameter_max_norm,
                tp_group,
            )
        return step(closure)

    optimizer.step = guarded_step
    engine.clip_fp32_gradients = lambda: None  # done in guarded_step, before the check
