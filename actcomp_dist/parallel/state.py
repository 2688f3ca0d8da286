"""The one place that initialises and looks up the tensor- and data-parallel process groups.

Megatron-core keeps its process groups in module-level globals of
``megatron.core.parallel_state``; its layers (``ColumnParallelLinear``, ``RowParallelLinear``,
``VocabParallelEmbedding``) and ``vocab_parallel_cross_entropy`` look them up there. We create
them through megatron-core so those layers work unchanged, and every other module of this
package asks this module (or is handed a :class:`ParallelContext`), never megatron directly.

CPU/gloo and GPU/NCCL use the same call. megatron-core 0.16.1's ``initialize_model_parallel``
creates its groups with the default backend of the world group (``backend=None``), so under a
gloo world every group is a gloo group and nothing touches CUDA. It only calls ``torch.cuda``
for SHARP (``use_sharp``) and partial distributed-optimizer instances, which we never enable.
We pass ``create_gloo_process_groups=False``: those extra gloo copies of the data-parallel
groups serve only megatron's own distributed optimizer, which this package does not use
(DeepSpeed owns the optimizer), and under a gloo world they would merely duplicate groups.

Only tensor parallelism (with optional sequence parallelism, which reuses the TP group) and
data parallelism are supported; pipeline and context parallelism stay at 1.

Validation happens before any collective, from values every rank has (the world size and the
requested TP size), so a bad configuration raises the same ``ValueError`` on every rank and
nothing hangs waiting for a peer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state


@dataclass(frozen=True)
class ParallelContext:
    """This rank's view of the tensor- and data-parallel layout.

    Fields:
        tp_group / tp_rank / tp_size: the tensor-parallel group (also the sequence-parallel
            group) and this rank's position in it.
        dp_group / dp_rank / dp_size: the data-parallel group (ranks holding the same TP
            shard) and this rank's position in it.
        device: where this rank's tensors live: the current CUDA device under NCCL, else CPU.
    """

    tp_group: dist.ProcessGroup
    tp_rank: int
    tp_size: int
    dp_group: dist.ProcessGroup
    dp_rank: int
    dp_size: int
    device: torch.device


def validate_tensor_parallel_size(world_size: int, tensor_parallel_size: int) -> None:
    """Raise ``ValueError`` unless ``tensor_parallel_size`` is a positive divisor of
    ``world_size``. Pure, so config validation can call it before any process group exists."""
    if isinstance(tensor_parallel_size, bool) or not isinstance(tensor_parallel_size, int):
        raise ValueError(
            f"tensor_parallel_size must be an int, got {tensor_parallel_size!r} "
            f"({type(tensor_parallel_size).__name__})"
        )
    if tensor_parallel_size < 1 or world_size % tensor_parallel_size != 0:
        divisors = [d for d in range(1, world_size + 1) if world_size % d == 0]
        raise ValueError(
            f"tensor_parallel_size={tensor_parallel_size} does not divide the world size "
            f"{world_size}; valid tensor_parallel_size values: {divisors}"
        )


def initialize_model_parallel(tensor_parallel_size: int = 1) -> ParallelContext:
    """Create megatron-core's parallel groups for TP x DP on the current world.

    ``torch.distributed`` must already be initialised (by the ``deepspeed`` launcher's
    ``deepspeed.init_distributed()`` or ``torch.distributed.init_process_group``). Ranks
    ``[k*tp, (k+1)*tp)`` form a tensor-parallel group; ranks with equal ``rank % tp`` form a
    data-parallel group. Raises ``ValueError`` (on every rank, before any collective) if
    ``tensor_parallel_size`` does not divide the world size.
    """
    if not dist.is_initialized():
        raise RuntimeError(
            "torch.distributed is not initialised: call deepspeed.init_distributed() or "
            "torch.distributed.init_process_group() before initialize_model_parallel()"
        )
    validate_tensor_parallel_size(dist.get_world_size(), tensor_parallel_size)
    if is_initialized():
        raise RuntimeError("model parallel state is already initialised; call destroy() first")
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel_size,
        create_gloo_process_groups=False,
    )
    return get_parallel_context()


def is_initialized() -> bool:
    """Whether :func:`initialize_model_parallel` has run (and :func:`destroy` has not)."""
    return parallel_state.model_parallel_is_initialized()


def _require_initialized() -> None:
    if not is_initialized():
        raise RuntimeError(
            "model parallel state is not initialised: call "
            "actcomp_dist.parallel.state.initialize_model_parallel() first"
        )


def get_tp_group() -> dist.ProcessGroup:
    """The tensor-parallel (and sequence-parallel) group of this rank."""
    _require_initialized()
    return parallel_state.get_tensor_model_parallel_group()


def get_tp_rank() -> int:
    """This rank's index in its tensor-parallel group."""
    _require_initialized()
    return parallel_state.get_tensor_model_parallel_rank()


def get_tp_size() -> int:
    """The number of ranks in a tensor-parallel group."""
    _require_initialized()
    return parallel_state.get_tensor_model_parallel_world_size()


def get_dp_group() -> dist.ProcessGroup:
    """The data-parallel group of this rank: the ranks that hold the same TP shard."""
    _require_initialized()
    return parallel_state.get_data_parallel_group()


def get_dp_rank() -> int:
    """This rank's index in its data-parallel group."""
    _require_initialized()
    return parallel_state.get_data_parallel_rank()


def get_dp_size() -> int:
    """The number of ranks in a data-parallel group."""
    _require_initialized()
    return parallel_state.get_data_parallel_world_size()


def get_device() -> torch.device:
    """The device this rank computes on: the current CUDA device under NCCL, else the CPU."""
    # A default-initialised world on a GPU machine reports "cpu:gloo,cuda:nccl".
    if dist.is_initialized() and "nccl" in dist.get_backend():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def get_parallel_context() -> ParallelContext:
    """A snapshot of this rank's layout, to pass to code that should not look up globals."""
    return ParallelContext(
        tp_group=get_tp_group(),
        tp_rank=get_tp_rank(),
        tp_size=get_tp_size(),
        dp_group=get_dp_group(),
        dp_rank=get_dp_rank(),
        dp_size=get_dp_size(),
        device=get_device(),
    )


def destroy() -> None:
    """Forget megatron-core's parallel groups so :func:`initialize_model_parallel` can run
    again. The process groups themselves stay registered with ``torch.distributed`` until
    ``torch.distributed.destroy_process_group()`` tears down the world."""
    parallel_state.destroy_model_parallel()
