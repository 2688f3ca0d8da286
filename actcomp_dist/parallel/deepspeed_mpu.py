"""The ``mpu`` object DeepSpeed needs to respect megatron-core's tensor-parallel layout.

``deepspeed.initialize(model=..., mpu=MegatronMPU())`` makes DeepSpeed shard ZeRO state and
average gradients over the *data-parallel* group only, count every tensor-parallel shard once
in the global gradient norm, and name checkpoints ``mp_rank_XX`` by tensor-parallel rank.
Without an ``mpu`` DeepSpeed treats every rank as a data-parallel replica and averages the
different TP shards of one weight into each other.

megatron-core's ``parallel_state`` cannot be passed as ``mpu`` itself: it has no
``get_model_parallel_rank`` / ``get_model_parallel_world_size`` /
``get_data_parallel_group_ranks``, all of which DeepSpeed 0.19.8 calls. The methods below are
exactly the ones DeepSpeed 0.19.8 calls on an ``mpu`` outside pipeline/MoE/AutoTP code:

- ZeRO 1/2 (``stage_1_and_2.py``) and ZeRO 3 (``stage3.py``): ``get_model_parallel_group``,
  ``get_model_parallel_world_size``, ``get_model_parallel_rank``,
  ``get_tensor_model_parallel_rank`` (gradient norm: replicated parameters are counted only on
  model-parallel rank 0, parameters with ``tensor_model_parallel=True`` on every rank, and the
  squared norms are summed over the model-parallel group).
- ``deepspeed.utils.groups`` and ``DeepSpeedConfig``: ``get_data_parallel_group``,
  ``get_data_parallel_world_size`` (the batch-size arithmetic ``train_batch_size =
  micro_batch * grad_accum * dp_size``), ``get_data_parallel_rank`` (data sampler).
- Gradient clipping without ZeRO (``runtime/utils.py: clip_grad_norm_``):
  ``get_model_parallel_group``, ``get_model_parallel_rank``; pipeline-aware norms query
  ``get_pipeline_model_parallel_world_size`` / ``get_pipeline_model_parallel_group``.
- Checkpointing: ``get_model_parallel_rank`` (file names), tensor and pipeline world sizes
  (checkpoint metadata), ``get_data_parallel_group_ranks`` and
  ``get_pipeline_model_parallel_rank`` (the data-parallel checkpoint writer).
- Activation checkpointing (``deepspeed.checkpointing.configure(mpu_=...)``):
  ``get_tensor_model_parallel_{rank,world_size,group}``, ``get_data_parallel_rank``.

Deliberately absent: ``initialize_sequence_parallel`` and ``get_sequence_parallel_*`` /
``get_sequence_data_parallel_*``. DeepSpeed probes for them with ``hasattr`` and, if present,
switches to its Ulysses sequence parallelism (it then ignores the model-parallel group).
Megatron-style sequence parallelism is invisible to DeepSpeed: it reuses the TP group.

"Model parallel" in DeepSpeed's sense is every rank holding a different part of the model:
megatron's tensor x pipeline group. With pipeline size 1 (all this package supports) it is
the tensor-parallel group.
"""

from __future__ import annotations

import torch.distributed as dist
from megatron.core import parallel_state

from actcomp_dist.parallel import state


class MegatronMPU:
    """Adapter from megatron-core's ``parallel_state`` to DeepSpeed's ``mpu`` protocol.

    Stateless: every call reads megatron-core's current groups, so build it after
    :func:`actcomp_dist.parallel.state.initialize_model_parallel`.
    """

    def get_model_parallel_group(self) -> dist.ProcessGroup:
        return parallel_state.get_model_parallel_group()

    def get_model_parallel_rank(self) -> int:
        return dist.get_rank(group=self.get_model_parallel_group())

    def get_model_parallel_world_size(self) -> int:
        return dist.get_world_size(group=self.get_model_parallel_group())

    def get_tensor_model_parallel_group(self) -> dist.ProcessGroup:
        return state.get_tp_group()

    def get_tensor_model_parallel_rank(self) -> int:
        return state.get_tp_rank()

    def get_tensor_model_parallel_world_size(self) -> int:
        return state.get_tp_size()

    def get_tensor_model_parallel_src_rank(self) -> int:
        """The global rank of tensor-parallel rank 0 in this rank's group."""
        return dist.get_global_rank(state.get_tp_group(), 0)

    def get_pipeline_model_parallel_group(self) -> dist.ProcessGroup:
        return parallel_state.get_pipeline_model_parallel_group()

    def get_pipeline_model_parallel_rank(self) -> int:
        return parallel_state.get_pipeline_model_parallel_rank()

    def get_pipeline_model_parallel_world_size(self) -> int:
        return parallel_state.get_pipeline_model_parallel_world_size()

    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return state.get_dp_group()

    def get_data_parallel_rank(self) -> int:
        return state.get_dp_rank()

    def get_data_parallel_world_size(self) -> int:
        return state.get_dp_size()

    def get_data_parallel_group_ranks(self) -> list[int]:
        """Global ranks of this rank's data-parallel group, in group-rank order."""
        return dist.get_process_group_ranks(state.get_dp_group())
