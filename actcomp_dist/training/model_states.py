"""Model states of a training run: measured on this rank, predicted by the planner, and the
data-parallel gradient traffic of one step; printed in the trainer's start-up report."""

from __future__ import annotations

from typing import Any

from torch import nn

from actcomp_dist.memory_model import ModelStates, predict_model_states
from actcomp_dist.optim.subspace_proxy import subspace_layers
from actcomp_dist.subspace import is_subspace_parameter
from actcomp_dist.training.config import LR_SCALE_KEYS, RunConfig, lr_scale_factor
from actcomp_dist.training.metrics import format_bytes


def predicted_model_states(config: RunConfig, model: nn.Module, dp_size: int) -> ModelStates:
    """The planner's model states per rank for this run's model, ZeRO stage and layout."""
    zero = config.deepspeed.get("zero_optimization", {})
    return predict_model_states(
        model.config,
        config.compression,
        precision=config.train.precision,
        zero_stage=zero.get("stage", 0),
        data_parallel=dp_size,
        tensor_parallel=config.parallel.tensor_parallel,
        reduce_bucket_size=int(zero.get("reduce_bucket_size", 500_000_000)),
        lr_factors=lr_factors(config),
    )


def lr_factors(config: RunConfig) -> dict[str, float]:
    """Each ``train.lr_scale`` group's factor (``default`` resolved): they decide the
    optimizer's param groups, whose sizes set the gradients' peak at ZeRO 1-3."""
    return {g: lr_scale_factor(config.train.lr_scale, g) for g in LR_SCALE_KEYS if g != "default"}


def gradient_reduction_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes of gradients each rank hands to the data-parallel reduction per optimizer step:
    ``compressed`` (the m x r gradients of ``subspace`` layers: on their proxies at ZeRO 0,
    reduce-scattered by rows at ZeRO 1/2) and
    ``ordinary`` (every other trained parameter; compressed weights in ``lift`` mode included:
    their gradient is m x n). Gradients travel in the parameters' dtype."""
    out = {"compressed": 0, "ordinary": 0}
    for layer in subspace_layers(model):
        weight = layer.weight
        out["compressed"] += (
            weight.shape[0] * layer.compressor.compressed_width * weight.element_size()
        )
    proxies = {id(m.subspace_proxy) for m in model.modules() if hasattr(m, "subspace_proxy")}
    for param in model.parameters():
        # ZeRO-3 leaves an empty tensor in the module; ``ds_numel`` is the parameter's size.
        nbytes = getattr(param, "ds_numel", param.numel()) * param.element_size()
        trained = param.requires_grad and not is_subspace_parameter(param)
        if trained and id(param) not in proxies:
            out["ordinary"] += nbytes
    return out


def describe_model_states(
    config: RunConfig, model: nn.Module, ctx: Any, measured: dict[str, int] | None
) -> str:
    predicted = predicted_model_states(config, model, ctx.dp_size)
    # The gradient bucket is a transient of the reduction, not state the probe sees.
    expected = predicted.total - predicted.engine_buffers
    parts = []
    if measured is not None:
        shown = ", ".join(
            f"{name} {format_bytes(value)}"
            for name, value in measured.items()
            if value and name != "total"
        )
        parts.append(f"measured {format_bytes(measured['total'])} ({shown})")
    parts.append(f"predicted {format_bytes(expected)}")
    comm = gradient_reduction_bytes(model)
    return (
        f"model states per rank: {'; '.join(parts)} | data-parallel gradient reduction per "
        f"step: {format_bytes(comm['compressed'])} compressed (m x r) + "
        f"{format_bytes(comm['ordinary'])} ordinary"
    )
