"""Elastic resume: continue a run at another data-parallel or tensor-parallel size.

A checkpoint records its layout (world size, ``parallel.tensor_parallel``, ZeRO stage). A
resume at another layout is accepted in these cases, and refused otherwise with one line
naming old -> new (:func:`check_layout_change`: no collective, nothing written):

- **Another data-parallel size, ZeRO 0-2** (the same TP size and stage). Nothing is lost:
  the weights of a TP rank are the same on every data-parallel rank (its DeepSpeed
  ``mp_rank_TT_model_states.pt``); at ZeRO 0 that file also holds the whole optimizer state,
  so DeepSpeed's own load is used. At ZeRO 1/2 each data-parallel rank saved its contiguous
  piece of every parameter group's flat fp32 master and AdamW moments; DeepSpeed 0.19 refuses
  to load them at another size, so :func:`reshard_zero_partitions` concatenates the saved
  pieces (without their padding) into the whole flat group, and each new rank takes its own
  piece as DeepSpeed partitions it (equal pieces of the group padded to a multiple of the new
  size). The flat order of a group's parameters does not depend on the data-parallel size, so
  this is a copy, not a numerical change. The ``subspace`` state kept outside DeepSpeed
  (:class:`~actcomp_dist.optim.subspace_partitioned.PartitionedSubspaceAdam`'s moments and the
  :class:`~actcomp_dist.optim.subspace_proxy.SubspaceMerger`'s fp32 masters, rows
  ``owned_rows(m, d, D)`` per rank) is resharded the same way by rows
  (:func:`reshard_subspace_state`). The data position is the number of global samples
  consumed (:mod:`actcomp_dist.data.sampler`), so with the same global batch the run reads
  the same samples per step, and the steps after the resume compute what the run continued
  at the old layout computes: the same micro-batch gradients, summed over ranks or
  accumulated over micro-batches (for 2 terms the same float sum), except the gradient
  norm's sum of squares, which ZeRO groups by partition (a rounding apart; through the clip
  coefficient it reaches the update).
- **Another TP size** (any data-parallel size with it). Every saved TP rank's weights, fp32
  masters and AdamW moments (ZeRO 1/2: regathered over its data-parallel ranks and split per
  parameter by DeepSpeed's recorded ``param_shapes``; ZeRO 0: the torch optimizer's state,
  in the model's parameter order, which does not depend on the TP size) go through the
  full-weight mapping (:mod:`actcomp_dist.models.weights`): merged into the logical tensors
  and re-split for the new TP size. AdamW's state is per element, so the moments take the
  weights' mapping exactly; the model keeps the checkpoint's padded vocabulary (it must divide
  by the new TP size). Steps after the resume match the run continued at the old TP size up
  to the order of the row-parallel sums. The ``subspace`` state is not resharded (it lives in
  each TP shard's projection space), nor the state of a mixed-precision ZeRO 0 optimizer
  (DeepSpeed's wrapper): those need ``checkpoint.reset_optimizer: true``, and are refused
  without it, naming both layouts.
- **``checkpoint.reset_optimizer: true``** (any accepted layout, the same one included):
  the weights as above (``mp_rank`` files, merged and re-split at another TP size), but
  AdamW's moments and step counts and the subspace state start fresh (the fp32 masters from
  the weights as saved in the training precision), while the step, the data position and the
  LR and compression schedules continue.

Not elastic: ZeRO 3 (its partitioned parameters; use DeepSpeed's universal checkpoint
tools), a change of ZeRO stage, and a TP change of a run with state outside the full-weight
mapping (``subtoken`` vectors, per TP shard; LoRA/LoRI adapters). The RNG state of a rank
that did not exist in the saved run is rank 0's (the model has no dropout: nothing in a step
reads it).

The layout change is logged like an accepted setting change (``resume_changed`` in
``metrics.jsonl`` under ``parallel.layout``, and a warning line).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from actcomp_dist.optim.subspace_proxy import owned_rows
from actcomp_dist.training.checkpoint import CheckpointError

# Keys of DeepSpeed ZeRO 1/2's optimizer state dict (deepspeed.checkpoint.constants).
_FP32_PARTITIONS = "single_partition_of_fp32_groups"
_BASE_STATE = "base_optimizer_state"
_GROUP_PADDINGS = "group_paddings"
LAYOUT_KEY = "parallel.layout"


@dataclass(frozen=True)
class Layout:
    world_size: int
    tensor_parallel: int
    zero_stage: int

    @property
    def data_parallel(self) -> int:
        return self.world_size // self.tensor_parallel

    def __str__(self) -> str:
        return (
            f"{self.world_size} ranks (TP {self.tensor_parallel} x DP {self.data_parallel}, "
            f"ZeRO {self.zero_stage})"
        )


def _zero_stage(config_dict: dict[str, Any]) -> int:
    return int((config_dict.get("deepspeed") or {}).get("zero_optimization", {}).get("stage", 0))


def saved_layout(state: dict[str, Any]) -> Layout:
    """The layout of the run that wrote trainer state ``state``."""
    config = state["config"]
    return Layout(state["world_size"], config["parallel"]["tensor_parallel"], _zero_stage(config))


def config_layout(config, world_size: int) -> Layout:
    return Layout(world_size, config.parallel.tensor_parallel, _zero_stage(config.to_dict()))


def check_layout_change(
    path: Path, state: dict[str, Any], config, world_size: int
) -> dict[str, list]:
    """``{}`` for a resume at the saved layout, ``{"parallel.layout": [old, new]}`` for an
    elastic one; raises :class:`CheckpointError` (one line, old -> new, what to do) for a
    layout change this module cannot resume. No collective."""
    old, new = saved_layout(state), config_layout(config, world_size)
    if (old.world_size, old.tensor_parallel) == (new.world_size, new.tensor_parallel):
        return {}
    prefix = f"checkpoint {path} was written by {old}; this run has {new}"
    if old.zero_stage != new.zero_stage:
        raise CheckpointError(
            f"{prefix}: an elastic resume keeps the ZeRO stage; resume with "
            f"deepspeed.zero_optimization.stage={old.zero_stage}"
        )
    if new.zero_stage == 3:
        raise CheckpointError(
            f"{prefix}: ZeRO 3 checkpoints resume at the same layout only; resume with "
            f"{old.world_size} ranks at parallel.tensor_parallel={old.tensor_parallel}"
        )
    if old.tensor_parallel != new.tensor_parallel:
        not_resharded = (
            "the subspace optimizer state (grad_mode='subspace') lives in each TP shard's "
            "projection space"
            if config.compression.grad_mode == "subspace"
            else "ZeRO 0 keeps a mixed-precision optimizer's state in DeepSpeed's wrapper"
            if new.zero_stage == 0 and config.train.precision != "fp32"
            else None
        )
        if not_resharded is not None and not config.checkpoint.reset_optimizer:
            raise CheckpointError(
                f"{prefix}: {not_resharded} and is not resharded across TP sizes; resume at "
                f"parallel.tensor_parallel={old.tensor_parallel}, or set "
                f"checkpoint.reset_optimizer=true to resume the weights with fresh optimizer "
                f"state"
            )
        finetune = getattr(config, "finetune", None)
        per_shard = (
            f"finetune.mode={finetune.mode!r} (adapter B matrices are not in the full-weight "
            f"mapping)"
            if finetune is not None and finetune.mode != "full"
            else "compression.method='subtoken' (its vectors are per TP shard)"
            if config.compression.method == "subtoken"
            else None
        )
        if per_shard is not None:
            raise CheckpointError(
                f"{prefix}: {per_shard} cannot be resharded to another TP size; resume at "
                f"parallel.tensor_parallel={old.tensor_parallel}"
            )
        vocab = (state.get("model_config") or {}).get("vocab_size")
        if vocab is not None and vocab % new.tensor_parallel:
            raise CheckpointError(
                f"{prefix}: the checkpoint's padded vocabulary {vocab} does not divide by "
                f"parallel.tensor_parallel={new.tensor_parallel}"
            )
    return {LAYOUT_KEY: [str(old), str(new)]}


# -- loading -----------------------------------------------------------------------------------


def _tag_dir(path: Path) -> Path:
    return path / path.name


def _model_states(path: Path, tp_rank: int) -> dict[str, Any]:
    file = _tag_dir(path) / f"mp_rank_{tp_rank:02d}_model_states.pt"
    return torch.load(file, map_location="cpu", weights_only=False)


def _zero_partitions(path: Path, tp_rank: int, dp_size: int) -> list[dict[str, Any]]:
    """Every saved data-parallel rank's ZeRO 1/2 optimizer state of TP rank ``tp_rank``."""
    states = []
    for dp_rank in range(dp_size):
        name = f"zero_pp_rank_{dp_rank}_mp_rank_{tp_rank:02d}_optim_states.pt"
        found = sorted(_tag_dir(path).glob(f"*{name}"))  # bf16_ prefix in bf16 runs
        if len(found) != 1:
            raise CheckpointError(f"checkpoint {path}: expected one *{name}, found {len(found)}")
        states.append(torch.load(found[0], map_location="cpu", weights_only=False))
    return [s["optimizer_state_dict"] for s in states]


def _group_state(saved: dict[str, Any], group: int) -> tuple[dict[str, Any], int]:
    """Saved rank's AdamW state of flat group ``group`` and the padding at its end (DeepSpeed
    saves the whole torch state dict, or with ``elastic_checkpoint`` one unpadded dict per
    group)."""
    base = saved[_BASE_STATE]
    if isinstance(base, dict):
        return base["state"][group], saved[_GROUP_PADDINGS][group]
    return base[group], 0


def _own_piece(
    pieces: list[torch.Tensor], group: int, numel: int, rank: int, partition: torch.Tensor
) -> torch.Tensor:
    """Rank ``rank``'s piece of flat group ``group`` (``numel`` values) whose saved pieces,
    without padding, are ``pieces``; shaped, placed and typed like ``partition``."""
    whole = torch.cat([p.reshape(-1) for p in pieces])
    if whole.numel() != numel:
        raise CheckpointError(
            f"ZeRO parameter group {group} holds {whole.numel()} values in the checkpoint and "
            f"{numel} in this model: it was not written for this model"
        )
    piece = partition.numel()  # DeepSpeed's pieces are equal: [rank * piece, (rank + 1) * piece)
    out = torch.zeros_like(partition)
    start, end = min(numel, rank * piece), min(numel, (rank + 1) * piece)
    out[: end - start] = whole[start:end]
    return out


@torch.no_grad()
def reshard_zero_partitions(zero_optimizer, saved: list[dict[str, Any]]) -> None:
    """Set DeepSpeed ZeRO 1/2 ``zero_optimizer``'s fp32 partitions and AdamW state from
    ``saved``, the optimizer state dicts of every data-parallel rank of the saved run (in
    data-parallel order, any number of them): whole flat groups, re-split for this rank."""
    optimizer = zero_optimizer.optimizer  # the torch AdamW over the flat fp32 partitions
    for group, partition in enumerate(zero_optimizer.single_partition_of_fp32_groups):
        process_group = zero_optimizer.real_dp_process_group[group]
        rank, size = dist.get_rank(process_group), dist.get_world_size(process_group)
        numel = sum(p.numel() for p in zero_optimizer.bit16_groups[group])
        assert partition.numel() * size >= numel, (partition.numel(), size, numel)
        fp32 = [s[_FP32_PARTITIONS][group] for s in saved]  # saved without padding
        partition.copy_(_own_piece(fp32, group, numel, rank, partition))
        states = [_group_state(s, group) for s in saved]
        restored = {}
        for key, value in states[0][0].items():
            if torch.is_tensor(value) and value.dim() > 0:  # per element: exp_avg, exp_avg_sq
                unpadded = [s[key][: s[key].numel() - padding] for s, padding in states]
                restored[key] = _own_piece(unpadded, group, numel, rank, partition)
            else:  # the step count, the same on every rank
                restored[key] = value.clone() if torch.is_tensor(value) else value
        optimizer.state[partition] = restored
    zero_optimizer._load_global_state(saved[0])  # loss scaler, clip (the same on every rank)
    zero_optimizer._link_all_hp_params()  # DeepSpeed's views of the state, as after its load


def reshard_subspace_state(
    saved: list[dict[str, Any]], dp_rank: int, dp_size: int
) -> dict[str, Any]:
    """A subspace merger's state dict for data-parallel rank ``dp_rank`` of ``dp_size`` from
    ``saved``, the state dicts of every data-parallel rank of the saved run (same TP rank, in
    data-parallel order): the fp32 masters' and the moments' rows concatenated and re-split
    by :func:`~actcomp_dist.optim.subspace_proxy.owned_rows`."""

    def mine(pieces: list[torch.Tensor]) -> torch.Tensor:
        whole = torch.cat(pieces)  # [m, ...]: rank d saved rows owned_rows(m, d, D)
        start, end = owned_rows(whole.shape[0], dp_rank, dp_size)
        return whole[start:end].clone()

    first = saved[0]
    out: dict[str, Any] = {"dp_size": dp_size, "dp_rank": dp_rank}
    out["masters"] = {k: mine([s["masters"][k] for s in saved]) for k in first["masters"]}
    if "moments" in first:
        out["steps"] = first["steps"]
        out["moments"] = {
            k: tuple(mine([s["moments"][k][i] for s in saved]) for i in range(2))
            for k in first["moments"]
        }
    return out


def _per_parameter_state(
    path: Path, old: Layout, tp_rank: int, names_by_group: list[list[str]]
) -> tuple[dict[str, dict[str, torch.Tensor]], Any]:
    """Saved TP rank ``tp_rank``'s fp32 weights and AdamW moments per parameter name
    (``{name: {"param", "exp_avg", "exp_avg_sq"}}``, the TP shards' shapes) and the AdamW step
    count. ZeRO 1/2: each group's flat state regathered over the saved data-parallel ranks and
    split by DeepSpeed's recorded ``param_shapes``; ZeRO 0: the torch optimizer's state, whose
    parameter order is the model's (``names_by_group``, the same at every TP size)."""
    model_states = _model_states(path, tp_rank)
    out: dict[str, dict[str, torch.Tensor]] = {}
    step = None
    if old.zero_stage == 0:
        optimizer, module = model_states["optimizer"], model_states["module"]
        for group, names in zip(optimizer["param_groups"], names_by_group, strict=True):
            for index, name in zip(group["params"], names, strict=True):
                state = optimizer["state"][index]
                step = state["step"]
                out[name] = {"param": module[name].float(), **_moments(state)}
        return out, step
    saved = _zero_partitions(path, tp_rank, old.data_parallel)
    for group, shapes in enumerate(model_states["param_shapes"]):
        whole = {"param": torch.cat([s[_FP32_PARTITIONS][group].reshape(-1) for s in saved])}
        states = [_group_state(s, group) for s in saved]
        for key, value in states[0][0].items():
            if torch.is_tensor(value) and value.dim() > 0:
                unpadded = [s[key][: s[key].numel() - padding] for s, padding in states]
                whole[key] = torch.cat([u.reshape(-1) for u in unpadded])
            else:
                step = value
        offset = 0
        for name, shape in shapes.items():
            numel = shape.numel()
            out[name] = {k: v[offset : offset + numel].view(shape) for k, v in whole.items()}
            offset += numel
    return out, step


def _moments(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if torch.is_tensor(v) and v.dim() > 0}


@torch.no_grad()
def _load_tp_resharded_state(path: Path, state: dict[str, Any], old: Layout, engine, model, ctx):
    """Weights, fp32 masters and AdamW moments of every saved TP rank merged into the logical
    tensors and re-split for this rank (AdamW's state is per element, so the moments take the
    weights' mapping), then set where this rank's optimizer keeps them."""
    from actcomp_dist.models import LlamaConfig
    from actcomp_dist.models.weights import merge_shards, shard_full_state_dict

    names = {id(p): n for n, p in model.named_parameters()}
    zero = engine.optimizer if old.zero_stage else None
    groups = (
        zero.bit16_groups
        if zero is not None
        else [g["params"] for g in engine.optimizer.param_groups]
    )
    names_by_group = [[names[id(p)] for p in group] for group in groups]
    saved, step = [], None
    for t in range(old.tensor_parallel):
        per_parameter, step = _per_parameter_state(path, old, t, names_by_group)
        saved.append(per_parameter)
    old_config = LlamaConfig.from_dict(state["model_config"])
    local = {}
    for key in saved[0][next(iter(saved[0]))]:
        full = merge_shards([{n: v[key] for n, v in shard.items()} for shard in saved], old_config)
        local[key] = shard_full_state_dict(full, model.config, ctx.tp_rank, ctx.tp_size)
    for group, params in zip(names_by_group, groups, strict=True):
        for name, param in zip(group, params, strict=True):
            param.copy_(local["param"][name])  # the 16-bit weight: the master, rounded
    if zero is None:  # the torch AdamW on the parameters themselves
        for name, param in zip(
            (n for group in names_by_group for n in group),
            (p for group in groups for p in group),
            strict=True,
        ):
            moments = {k: local[k][name].clone() for k in local if k != "param"}
            engine.optimizer.state[param] = {"step": step.clone(), **moments}
        return
    for group, partition in enumerate(zero.single_partition_of_fp32_groups):
        rank = dist.get_rank(zero.real_dp_process_group[group])
        numel = sum(p.numel() for p in groups[group])
        whole = {
            k: torch.cat([local[k][n].reshape(-1) for n in names_by_group[group]]) for k in local
        }
        partition.copy_(_own_piece([whole["param"]], group, numel, rank, partition))
        zero.optimizer.state[partition] = {
            "step": step.clone() if torch.is_tensor(step) else step,
            **{
                k: _own_piece([v], group, numel, rank, partition)
                for k, v in whole.items()
                if k != "param"
            },
        }
    zero._link_all_hp_params()


@torch.no_grad()
def _load_tp_resharded_weights(
    path: Path, state: dict[str, Any], old: Layout, model, tp_rank: int, tp_size: int
) -> None:
    """The model's parameters from every saved TP rank's shards, merged into the logical
    weights and re-split for this rank (:mod:`actcomp_dist.models.weights`)."""
    from actcomp_dist.models import LlamaConfig
    from actcomp_dist.models.weights import merge_shards, shard_full_state_dict

    parameters = dict(model.named_parameters())
    shards = []
    for t in range(old.tensor_parallel):
        module = _model_states(path, t)["module"]
        per_rank_state = [
            k for k in module if k not in parameters and not k.endswith("_extra_state")
        ]
        if per_rank_state:
            raise CheckpointError(
                f"checkpoint {path}: {per_rank_state[0]} (compressor state, per TP shard) "
                f"cannot be resharded to another parallel.tensor_parallel; resume at "
                f"parallel.tensor_parallel={old.tensor_parallel}"
            )
        shards.append({k: v for k, v in module.items() if k in parameters})
    old_config = LlamaConfig.from_dict(state["model_config"])
    full = merge_shards(shards, old_config)
    local = shard_full_state_dict(full, model.config, tp_rank, tp_size)
    for name, value in local.items():
        parameters[name].copy_(value)


def load_elastic(
    path: Path,
    state: dict[str, Any],
    engine,
    merger,
    model,
    ctx,
    reset_optimizer: bool,
) -> dict[str, Any]:
    """Collective: load checkpoint ``path`` (trainer state ``state``) at this run's layout,
    which :func:`check_layout_change` accepted; returns this rank's saved state (RNG)."""
    old, rank = saved_layout(state), dist.get_rank()
    same_tp = old.tensor_parallel == ctx.tp_size
    if same_tp and not reset_optimizer and old.zero_stage == 0:
        # ZeRO 0: the TP rank's file holds the weights and the whole optimizer state.
        engine.load_checkpoint(str(path), tag=path.name)
    else:
        if same_tp:
            engine.load_checkpoint(
                str(path),
                tag=path.name,
                load_module_only=True,
                load_optimizer_states=False,
                load_lr_scheduler_states=False,
            )
        elif reset_optimizer:
            _load_tp_resharded_weights(path, state, old, model, ctx.tp_rank, ctx.tp_size)
            if hasattr(engine.optimizer, "refresh_fp32_params"):  # masters <- the weights
                engine.optimizer.refresh_fp32_params()
        else:
            _load_tp_resharded_state(path, state, old, engine, model, ctx)
        saved = _model_states(path, ctx.tp_rank if same_tp else 0)
        scheduler = engine.lr_scheduler
        scheduler.load_state_dict(saved["lr_scheduler"])
        # The next step's LR, which DeepSpeed's optimizer load would have restored with the
        # optimizer's param groups (the scheduler sets it only when it steps).
        for group, lr in zip(
            scheduler.optimizer.param_groups, scheduler.get_last_lr(), strict=True
        ):
            group["lr"] = lr
        engine.global_steps = saved["global_steps"]
        engine.global_samples = saved.get("global_samples", 0)
        engine.skipped_steps = saved["skipped_steps"]
        if same_tp and not reset_optimizer:
            reshard_zero_partitions(
                engine.optimizer, _zero_partitions(path, ctx.tp_rank, old.data_parallel)
            )
    if merger is not None:
        if reset_optimizer:
            merger.reset_state()
        else:
            saved_ranks = [d * old.tensor_parallel + ctx.tp_rank for d in range(old.data_parallel)]
            states = [
                torch.load(path / f"rank_{r:05d}.pt", weights_only=False)["subspace_masters"]
                for r in saved_ranks
            ]
            merger.load_state_dict(reshard_subspace_state(states, ctx.dp_rank, ctx.dp_size))
    own = path / f"rank_{rank:05d}.pt"
    return torch.load(own if own.is_file() else path / "rank_00000.pt", weights_only=False)
