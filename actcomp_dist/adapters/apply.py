"""Attach adapters to the linears of a model, from the outside.

:func:`apply_adapters` finds the linears whose names match ``AdapterConfig.targets`` —
``nn.Linear`` or Megatron column/row-parallel linears (our compressed ones included) — and
gives each a ``module.adapters`` ``ModuleDict`` plus one forward hook that adds the enabled
adapters' outputs to the linear's output. The model's own code is unchanged and its parameter
names stay what they were (``layers.0.attention.qkv.weight``); the adapters' parameters are
``layers.0.attention.qkv.adapters.<name>.B``. Several named adapters can sit on one linear
(one per task); each has a ``multiplier`` and an ``enabled`` flag.

Contract: apply after the model is built and its weights are loaded, before it is wrapped for
data parallelism / DeepSpeed (the engine must see the adapter parameters), like any other model
conversion (torchtitan's "after build, before parallelise").

Layer ids and sites: a compressed layer's own ``layer_id`` / ``site`` (the block index in the
whole model and ``qkv`` / ``proj`` / ``fc1`` / ``fc2``); for other linears the first integer in
the module name and its last name component (as :func:`actcomp_dist.compress_linears`).
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from actcomp_dist.adapters.base import LowRankAdapter, geometry_of
from actcomp_dist.adapters.config import AdapterConfig
from actcomp_dist.adapters.registry import get_adapter_class
from actcomp_dist.layers import find_schedule

_LAYER_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")


def _is_linear(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    # Megatron column/row-parallel linears (not the vocab-parallel embedding, which has no
    # ``input_size``): a 2-D weight tagged with its partition dimension.
    weight = getattr(module, "weight", None)
    return (
        isinstance(weight, torch.Tensor)
        and weight.dim() == 2
        and hasattr(weight, "partition_dim")
        and hasattr(module, "input_size")
    )


def _matches(name: str, patterns: Iterable[str]) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(leaf, p) for p in patterns)


def find_target_linears(model: nn.Module, targets: Iterable[str]) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of every linear of ``model`` matching one of ``targets``; raises
    ``ValueError`` naming the linears there are when nothing matches."""
    targets = list(targets)
    linears = [(n, m) for n, m in model.named_modules() if n and _is_linear(m)]
    found = [(n, m) for n, m in linears if _matches(n, targets)]
    if not found:
        names = sorted({n.rsplit(".", 1)[-1] for n, _ in linears})
        raise ValueError(
            f"no linear module matches adapter targets {targets}; the model's linears are "
            f"named {names}"
        )
    return found


def _layer_and_site(name: str, module: nn.Module, position: int) -> tuple[int, str]:
    layer_id = getattr(module, "layer_id", None)
    if layer_id is None:
        index = _LAYER_INDEX.search(name)
        layer_id = int(index.group(1)) if index else position
    return layer_id, getattr(module, "site", None) or name.rsplit(".", 1)[-1]


def _add_adapter_outputs(module: nn.Module, args, kwargs, output):
    x = args[0] if args else next(iter(kwargs.values()))
    delta = None
    for adapter in module.adapters.values():
        if adapter.enabled:
            out = adapter(x)
            delta = out if delta is None else delta + out
    if delta is None:
        return output
    if isinstance(output, tuple):  # Megatron linears return (output, bias)
        return (output[0] + delta, *output[1:])
    return output + delta


def apply_adapters(
    model: nn.Module,
    config: AdapterConfig,
    name: str = "default",
    *,
    freeze_base: bool = True,
) -> list[str]:
    """Attach a ``config.method`` adapter named ``name`` to every matching linear of ``model``.

    ``freeze_base``: set ``requires_grad=False`` on every parameter that is not an adapter's.
    Returns the adapted linears' names. Raises ``ValueError`` if an adapter of that name is
    already attached, or nothing matches.
    """
    if not name or "." in name:
        raise ValueError(f"adapter name {name!r} must be non-empty and contain no '.'")
    adapter_class = get_adapter_class(config.method)
    schedule = None
    if config.input_compression is not None:
        schedule = find_schedule(model)
        if (
            schedule is not None
            and schedule.resample_every != config.input_compression.resample_every
        ):
            raise ValueError(
                f"AdapterConfig.input_compression.resample_every="
                f"{config.input_compression.resample_every} differs from the model's "
                f"compression schedule ({schedule.resample_every}); the adapters share the "
                f"model's schedule, so use the same value"
            )
    targets = find_target_linears(model, config.targets)
    for path, linear in targets:
        existing = getattr(linear, "adapters", None)
        if existing is not None and name in existing:
            raise ValueError(f"{path} already has an adapter named {name!r}")
    for position, (path, linear) in enumerate(targets):
        layer_id, site = _layer_and_site(path, linear, position)
        adapter = adapter_class(
            config,
            geometry_of(linear),
            layer_id,
            site,
            device=linear.weight.device,
            dtype=linear.weight.dtype,
            schedule=schedule,
        )
        if getattr(linear, "adapters", None) is None:
            linear.adapters = nn.ModuleDict()
            linear._adapter_hook = linear.register_forward_hook(
                _add_adapter_outputs, with_kwargs=True
            )
        linear.adapters[name] = adapter
    if freeze_base:
        adapter_parameters = {id(p) for _, _, a in iter_adapters(model) for p in a.parameters()}
        for parameter in model.parameters():
            if id(parameter) not in adapter_parameters:
                parameter.requires_grad_(False)
    return [path for path, _ in targets]


def iter_adapters(
    model: nn.Module, name: str | None = None
) -> Iterator[tuple[str, str, LowRankAdapter]]:
    """``(linear name, adapter name, adapter)`` for every attached adapter (or those named
    ``name``), in model order."""
    for path, module in model.named_modules():
        adapters = getattr(module, "adapters", None)
        if isinstance(adapters, nn.ModuleDict) and _is_linear(module):
            for adapter_name, adapter in adapters.items():
                if name is None or adapter_name == name:
                    yield path, adapter_name, adapter


def adapter_names(model: nn.Module) -> list[str]:
    """The names of the adapters attached to ``model``, in first-seen order."""
    return list(dict.fromkeys(n for _, n, _ in iter_adapters(model)))


def adapters_named(model: nn.Module, name: str) -> list[tuple[str, LowRankAdapter]]:
    """``(linear name, adapter)`` of adapter ``name``; ``ValueError`` if none is attached."""
    found = [(path, a) for path, _, a in iter_adapters(model, name)]
    if not found:
        raise ValueError(f"no adapter named {name!r}; attached: {adapter_names(model)}")
    return found


def set_adapter_enabled(model: nn.Module, name: str, enabled: bool) -> None:
    """Include (or leave out) adapter ``name`` in the forward."""
    for _, adapter in adapters_named(model, name):
        adapter.enabled = enabled


def set_adapter_multiplier(model: nn.Module, name: str, multiplier: float) -> None:
    """Weight adapter ``name``'s output by ``multiplier`` (combining several adapters)."""
    for _, adapter in adapters_named(model, name):
        adapter.multiplier = float(multiplier)


def set_adapter_trainable(model: nn.Module, name: str, trainable: bool) -> None:
    """Train (or freeze) adapter ``name``'s parameters."""
    for _, adapter in adapters_named(model, name):
        adapter.requires_grad_(trainable)


def remove_adapters(model: nn.Module, name: str | None = None) -> None:
    """Detach adapter ``name`` (all adapters if ``None``); the base model is left as it was."""
    for _, module in list(model.named_modules()):
        adapters = getattr(module, "adapters", None)
        if not isinstance(adapters, nn.ModuleDict) or not _is_linear(module):
            continue
        for adapter_name in list(adapters):
            if name is None or adapter_name == name:
                del adapters[adapter_name]
        if not len(adapters):
            module._adapter_hook.remove()
            del module._adapter_hook
            del module.adapters


def adapter_parameter_count(
    model: nn.Module, name: str | None = None, *, trainable_only: bool = True
) -> int:
    """Logical (unsharded) count of the adapters' trainable entries, the same on every rank
    and at every TP size: B inside its mask (all of B without one), plus A when trained.

    Collective over the TP group when the adapters are tensor-parallel: shards held by
    different ranks are summed, replicated tensors counted once.
    """
    sharded = replicated = 0
    group, device = None, torch.device("cpu")
    for _, _, adapter in iter_adapters(model, name):
        geometry = adapter.geometry
        group, device = group or geometry.group, adapter.B.device
        if not trainable_only or adapter.B.requires_grad:
            b_count = int(adapter.mask.sum()) if adapter.mask is not None else adapter.B.numel()
            if geometry.b_sharded:
                sharded += b_count
            elif geometry.tp_rank == 0:
                replicated += b_count
        for parameter_name, parameter in adapter.named_parameters():
            if parameter_name == "B" or (trainable_only and not parameter.requires_grad):
                continue
            # A: replicated for a column-parallel base, column-sharded for a row-parallel one.
            if geometry.mode == "row" and geometry.tp_size > 1:
                sharded += parameter.numel()
            elif geometry.tp_rank == 0:
                replicated += parameter.numel()
    total = torch.tensor([sharded + replicated], dtype=torch.int64, device=device)
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(total, group=group)
    return int(total.item())
