"""Distributed plumbing: collectives, communication counts, parallel state, DeepSpeed ``mpu``
adapter and the multi-process test helper itself.

Multi-rank tests run 2 (or 3, 4) gloo ranks through :func:`tests.helpers.distributed.run_distributed`
and compare against references computed in this process from the same seeded inputs.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist

from tests.helpers.distributed import DistributedError, DistributedTimeoutError, run_distributed
from tests.helpers.tolerances import assert_as_accurate_as

WORLD = 2
N, B, H = 3, 2, 5  # rows per rank of dimension 0, batch, hidden: tensors are [s, b, h]


def _tensor(seed: int, rank: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """The same tensor on any process: rank ``rank``'s input or upstream gradient."""
    generator = torch.Generator().manual_seed(1000 * seed + rank)
    return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)


# For each region function: the shape of its per-rank input and of its output.
_SHAPES = {
    "copy_to_tensor_parallel_region": ((N, B, H), (N, B, H)),
    "reduce_from_tensor_parallel_region": ((N, B, H), (N, B, H)),
    "gather_from_sequence_parallel_region": ((N, B, H), (WORLD * N, B, H)),
    "reduce_scatter_to_sequence_parallel_region": ((WORLD * N, B, H), (N, B, H)),
    "scatter_to_sequence_parallel_region": ((WORLD * N, B, H), (N, B, H)),
}
# Functions whose input is replicated: every rank passes rank 0's tensor.
_REPLICATED_INPUT = {"copy_to_tensor_parallel_region", "scatter_to_sequence_parallel_region"}


def _input(name: str, rank: int, dtype: torch.dtype) -> torch.Tensor:
    return _tensor(1, 0 if name in _REPLICATED_INPUT else rank, _SHAPES[name][0], dtype)


def _upstream_grad(name: str, rank: int, dtype: torch.dtype) -> torch.Tensor:
    return _tensor(2, rank, _SHAPES[name][1], dtype)


def _regions_rank(rank: int, world_size: int, dtype: torch.dtype) -> dict:
    from actcomp_dist.parallel import collectives

    group = dist.group.WORLD
    results = {}
    for name in _SHAPES:
        x = _input(name, rank, dtype).requires_grad_()
        x_before = x.detach().clone()
        output = getattr(collectives, name)(x, group)
        output.backward(_upstream_grad(name, rank, dtype))
        results[name] = {
            "output": output.detach(),
            "grad": x.grad,
            "input_unchanged": torch.equal(x.detach(), x_before),
        }
    return results


def _expected(name: str, rank: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Single-process reference (output, input gradient) of ``name`` on rank ``rank``."""
    inputs = [_input(name, r, dtype) for r in range(WORLD)]
    grads = [_upstream_grad(name, r, dtype) for r in range(WORLD)]
    rows = slice(rank * N, (rank + 1) * N)
    if name == "copy_to_tensor_parallel_region":
        return inputs[rank], grads[0] + grads[1]
    if name == "reduce_from_tensor_parallel_region":
        return inputs[0] + inputs[1], grads[rank]
    if name == "gather_from_sequence_parallel_region":
        return torch.cat(inputs), (grads[0] + grads[1])[rows]
    if name == "reduce_scatter_to_sequence_parallel_region":
        return (inputs[0] + inputs[1])[rows], torch.cat(grads)
    if name == "scatter_to_sequence_parallel_region":
        return inputs[rank][rows], torch.cat(grads)
    raise AssertionError(name)


@pytest.mark.distributed
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_regions_match_single_process_reference(tmp_path, dtype):
    """Forward values and input gradients of every region function at world size 2.

    Exact equality, also in bf16: with two ranks every reduced element is one addition of two
    values, which is commutative, so gloo's sum and the reference's ``a + b`` round the same.
    """
    per_rank = run_distributed(_regions_rank, WORLD, tmp_path, dtype)
    for rank, results in enumerate(per_rank):
        for name, result in results.items():
            expected_output, expected_grad = _expected(name, rank, dtype)
            torch.testing.assert_close(result["output"], expected_output, rtol=0, atol=0)
            torch.testing.assert_close(result["grad"], expected_grad, rtol=0, atol=0)
            assert result["output"].dtype == dtype and result["grad"].dtype == dtype
            assert result["input_unchanged"], f"{name} modified its input on rank {rank}"


def _counter_rank(rank: int, world_size: int, dtype: torch.dtype) -> dict:
    from actcomp_dist.parallel import collectives

    group = dist.group.WORLD
    counts = {}
    for name in _SHAPES:
        counter = collectives.CommCounter()
        x = _input(name, rank, dtype).requires_grad_()
        getattr(collectives, name)(x, group, counter).backward(_upstream_grad(name, rank, dtype))
        counts[name] = (dict(counter.nbytes), dict(counter.calls), counter.total_bytes)

    counter = collectives.CommCounter()
    t = _tensor(3, rank, (WORLD * N, B, H), dtype)
    collectives.all_gather_dim0(t, group, counter)
    collectives.reduce_scatter_dim0(t, group, counter)
    collectives.all_reduce_sum(t, group, counter)
    counts["plain"] = (dict(counter.nbytes), dict(counter.calls), counter.total_bytes)
    counter.reset()
    counts["after_reset"] = (dict(counter.nbytes), dict(counter.calls), counter.total_bytes)

    # A group of one rank communicates nothing and returns the input itself. (new_group is
    # collective: every rank creates every group.)
    single = [dist.new_group([r]) for r in range(world_size)][rank]
    counter = collectives.CommCounter()
    functions = [getattr(collectives, name) for name in _SHAPES] + [
        collectives.all_gather_dim0,
        collectives.reduce_scatter_dim0,
        collectives.all_reduce_sum,
    ]
    counts["single_rank_group"] = (
        all(f(t, single, counter) is t for f in functions),
        counter.total_bytes,
    )
    return counts


@pytest.mark.distributed
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_comm_counter_matches_closed_form(tmp_path, dtype):
    """Bytes = the buffer this rank contributes: the local shard for all-gather, the full
    input for reduce-scatter, the tensor for all-reduce (forward + backward of one call)."""
    local = N * B * H * dtype.itemsize  # one [N, B, H] shard
    full = WORLD * local  # one [WORLD*N, B, H] tensor
    expected = {
        # name: ({kind: bytes}, {kind: calls})
        "copy_to_tensor_parallel_region": ({"all_reduce": local}, {"all_reduce": 1}),
        "reduce_from_tensor_parallel_region": ({"all_reduce": local}, {"all_reduce": 1}),
        "gather_from_sequence_parallel_region": (
            {"all_gather": local, "reduce_scatter": full},
            {"all_gather": 1, "reduce_scatter": 1},
        ),
        "reduce_scatter_to_sequence_parallel_region": (
            {"reduce_scatter": full, "all_gather": local},
            {"reduce_scatter": 1, "all_gather": 1},
        ),
        "scatter_to_sequence_parallel_region": ({"all_gather": local}, {"all_gather": 1}),
        "plain": (
            {"all_gather": full, "reduce_scatter": full, "all_reduce": full},
            {"all_gather": 1, "reduce_scatter": 1, "all_reduce": 1},
        ),
        "after_reset": ({}, {}),
    }
    kinds = ("all_gather", "reduce_scatter", "all_reduce")
    for rank, counts in enumerate(run_distributed(_counter_rank, WORLD, tmp_path, dtype)):
        for name, (nbytes, calls) in expected.items():
            expected_nbytes = {kind: nbytes.get(kind, 0) for kind in kinds}
            expected_calls = {kind: calls.get(kind, 0) for kind in kinds}
            assert counts[name] == (
                expected_nbytes,
                expected_calls,
                sum(expected_nbytes.values()),
            ), f"{name} on rank {rank}"
        assert counts["single_rank_group"] == (True, 0)


def _bad_shape_rank(rank: int, world_size: int) -> list[str]:
    from actcomp_dist.parallel import collectives

    messages = []
    odd = torch.zeros(WORLD * N + 1, H)
    for f in (collectives.reduce_scatter_dim0, collectives.split_dim0):
        with pytest.raises(ValueError) as error:
            f(odd, dist.group.WORLD)
        messages.append(str(error.value))
    return messages


@pytest.mark.distributed
def test_dim0_not_divisible_raises_value_error_before_communicating(tmp_path):
    for messages in run_distributed(_bad_shape_rank, WORLD, tmp_path, timeout=60):
        for message in messages:
            assert f"shape ({WORLD * N + 1}, {H})" in message and f"group size {WORLD}" in message


def test_validate_tensor_parallel_size():
    from actcomp_dist.parallel.state import validate_tensor_parallel_size

    validate_tensor_parallel_size(8, 4)
    with pytest.raises(ValueError, match=r"valid tensor_parallel_size values: \[1, 2, 4, 8\]"):
        validate_tensor_parallel_size(8, 3)
    with pytest.raises(ValueError, match="does not divide"):
        validate_tensor_parallel_size(8, 0)
    with pytest.raises(ValueError, match="must be an int"):
        validate_tensor_parallel_size(8, 2.0)


def _bad_tp_rank(rank: int, world_size: int) -> tuple[str, bool, tuple[int, int]]:
    from actcomp_dist.parallel import state

    with pytest.raises(ValueError) as error:
        state.initialize_model_parallel(tensor_parallel_size=2)
    initialized_after_error = state.is_initialized()
    # The failed call left nothing behind: a valid size still initialises.
    context = state.initialize_model_parallel(tensor_parallel_size=3)
    return str(error.value), initialized_after_error, (context.tp_size, context.dp_size)


@pytest.mark.distributed
def test_tp_not_dividing_world_size_raises_same_value_error_on_every_rank(tmp_path):
    results = run_distributed(_bad_tp_rank, 3, tmp_path, timeout=60)
    messages = {message for message, _, _ in results}
    assert messages == {
        "tensor_parallel_size=2 does not divide the world size 3; "
        "valid tensor_parallel_size values: [1, 3]"
    }
    assert all(not initialized for _, initialized, _ in results)
    assert all(sizes == (3, 1) for _, _, sizes in results)


def _layout_rank(rank: int, world_size: int) -> dict:
    from actcomp_dist.parallel import state
    from actcomp_dist.parallel.deepspeed_mpu import MegatronMPU

    layouts = {}
    for tp in (2, 1):
        context = state.initialize_model_parallel(tensor_parallel_size=tp)
        mpu = MegatronMPU()
        layouts[tp] = {
            "context": (context.tp_rank, context.tp_size, context.dp_rank, context.dp_size),
            "tp_ranks": dist.get_process_group_ranks(context.tp_group),
            "dp_ranks": dist.get_process_group_ranks(context.dp_group),
            "device": context.device,
            "mpu": (
                mpu.get_model_parallel_rank(),
                mpu.get_model_parallel_world_size(),
                mpu.get_tensor_model_parallel_rank(),
                mpu.get_tensor_model_parallel_world_size(),
                mpu.get_tensor_model_parallel_src_rank(),
                mpu.get_data_parallel_rank(),
                mpu.get_data_parallel_world_size(),
                mpu.get_data_parallel_group_ranks(),
                mpu.get_pipeline_model_parallel_rank(),
                mpu.get_pipeline_model_parallel_world_size(),
            ),
            "mpu_groups": (
                dist.get_process_group_ranks(mpu.get_model_parallel_group()),
                dist.get_process_group_ranks(mpu.get_tensor_model_parallel_group()),
                dist.get_process_group_ranks(mpu.get_data_parallel_group()),
            ),
        }
        state.destroy()
        layouts[tp]["initialized_after_destroy"] = state.is_initialized()
    return layouts


@pytest.mark.distributed
def test_parallel_layout_and_deepspeed_mpu_at_world_size_4(tmp_path):
    """TP groups are consecutive ranks, DP groups strided; the mpu adapter agrees; destroy()
    allows re-initialising with another TP size in the same process."""
    for rank, layouts in enumerate(run_distributed(_layout_rank, 4, tmp_path)):
        for tp, layout in layouts.items():
            dp = 4 // tp
            tp_rank, dp_rank = rank % tp, rank // tp
            tp_ranks = [rank - tp_rank + i for i in range(tp)]
            dp_ranks = [tp_rank + tp * i for i in range(dp)]
            assert layout["context"] == (tp_rank, tp, dp_rank, dp)
            assert layout["tp_ranks"] == tp_ranks and layout["dp_ranks"] == dp_ranks
            assert layout["device"] == torch.device("cpu")
            assert layout["mpu"] == (
                tp_rank,
                tp,
                tp_rank,
                tp,
                tp_ranks[0],
                dp_rank,
                dp,
                dp_ranks,
                0,
                1,
            )
            assert layout["mpu_groups"] == (tp_ranks, tp_ranks, dp_ranks)
            assert layout["initialized_after_destroy"] is False


def test_mpu_adapter_does_not_look_like_ulysses():
    """DeepSpeed switches to Ulysses sequence parallelism (and ignores the model-parallel
    group) when an mpu has any of these; the adapter must have none of them."""
    from actcomp_dist.parallel.deepspeed_mpu import MegatronMPU

    mpu = MegatronMPU()
    for name in (
        "initialize_sequence_parallel",
        "get_sequence_parallel_world_size",
        "get_sequence_parallel_rank",
        "get_sequence_parallel_group",
        "get_sequence_data_parallel_world_size",
        "get_sequence_data_parallel_rank",
        "get_sequence_data_parallel_group",
    ):
        assert not hasattr(mpu, name), name


# DeepSpeed with a TP=2 megatron model: a two-layer MLP, fc1 column- and fc2 row-parallel.
_IN, _HIDDEN, _STEPS, _LR, _CLIP = 16, 32, 3, 1e-2, 0.05


def _mlp_batches() -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(8, _IN, generator=generator) for _ in range(_STEPS)]


def _mlp_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((y - x) ** 2).mean()


def _zero_rank(rank: int, world_size: int, stage: int) -> dict:
    import deepspeed
    from megatron.core import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from actcomp_dist.parallel import state
    from actcomp_dist.parallel.deepspeed_mpu import MegatronMPU

    context = state.initialize_model_parallel(tensor_parallel_size=world_size)
    config = ModelParallelConfig(tensor_model_parallel_size=world_size, use_cpu_initialization=True)

    def init(weight: torch.Tensor) -> None:
        torch.nn.init.normal_(weight, std=0.1)

    class MLP(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            # use_cpu_initialization draws each full weight from the global RNG and keeps this
            # rank's shard, so the full weights equal the reference's for the same seed.
            torch.manual_seed(0)
            self.fc1 = ColumnParallelLinear(
                _IN, _HIDDEN, config=config, init_method=init, bias=False, gather_output=False
            )
            self.fc2 = RowParallelLinear(
                _HIDDEN,
                _IN,
                config=config,
                init_method=init,
                bias=False,
                input_is_parallel=True,
                skip_bias_add=False,
            )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            hidden, _ = self.fc1(x)
            y, _ = self.fc2(torch.nn.functional.gelu(hidden))
            return _mlp_loss(x, y)

    model = MLP()
    ds_config = {
        "train_micro_batch_size_per_gpu": 8,
        "optimizer": {
            "type": "Adam",
            "params": {"lr": _LR, "weight_decay": 0.0, "torch_adam": True},
        },
        "gradient_clipping": _CLIP,
        "zero_optimization": {"stage": stage},
    }
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=ds_config, mpu=MegatronMPU()
    )
    norms = []
    for x in _mlp_batches():
        loss = engine(x)
        engine.backward(loss)
        engine.step()
        norms.append(float(engine.get_global_grad_norm()))

    def full_weight(weight: torch.Tensor, dim: int) -> torch.Tensor:
        with deepspeed.zero.GatheredParameters([weight], enabled=stage == 3):
            shard = weight.detach().clone()
        shards = [torch.empty_like(shard) for _ in range(world_size)]
        dist.all_gather(shards, shard, group=context.tp_group)
        return torch.cat(shards, dim)

    return {
        "norms": norms,
        "fc1": full_weight(engine.module.fc1.weight, 0),
        "fc2": full_weight(engine.module.fc2.weight, 1),
    }


def _reference_mlp(dtype: torch.dtype = torch.float64) -> dict:
    """Unsharded reference: same init, global-norm clipping as DeepSpeed, Adam, in ``dtype``
    (float64: the reference; float32: the plain run a sharded one is held to)."""
    torch.manual_seed(0)
    weights = [torch.empty(_HIDDEN, _IN), torch.empty(_IN, _HIDDEN)]
    for weight in weights:
        torch.nn.init.normal_(weight, std=0.1)
    fc1, fc2 = (w.to(dtype).requires_grad_() for w in weights)
    optimizer = torch.optim.Adam([fc1, fc2], lr=_LR)
    norms = []
    for x in _mlp_batches():
        x = x.to(dtype)
        optimizer.zero_grad()
        _mlp_loss(x, torch.nn.functional.gelu(x @ fc1.T) @ fc2.T).backward()
        norms.append(torch.nn.utils.clip_grad_norm_([fc1, fc2], _CLIP).detach())
        optimizer.step()
    return {"norms": torch.stack(norms), "fc1": fc1.detach(), "fc2": fc2.detach()}


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_zero_with_tp2_megatron_model_matches_unsharded_reference(tmp_path, stage):
    """With the mpu adapter, ZeRO at TP=2 / DP=1 computes the global gradient norm over both
    TP shards (without it DeepSpeed would average the two shards as if they were replicas).

    Tolerances: fp32 training against a float64 reference over 3 Adam steps; the sharded run
    must be as accurate as the same unsharded training in fp32 (tests/helpers/tolerances.py): the
    norms (all steps as one vector) and each final weight. A norm over one TP shard, or the
    two shards averaged as replicas, would be off by a factor of about sqrt(2).
    """
    exact, plain = _reference_mlp(), _reference_mlp(torch.float32)
    for result in run_distributed(_zero_rank, WORLD, tmp_path, stage):
        result = {**result, "norms": torch.tensor(result["norms"])}
        assert_as_accurate_as(result, plain, exact, torch.float32, stage)


def _values_rank(rank: int, world_size: int, offset: int) -> tuple[int, str, torch.Tensor, int]:
    return rank, dist.get_backend(), torch.full((2,), float(rank + offset)), torch.get_num_threads()


@pytest.mark.distributed
def test_run_distributed_returns_values_in_rank_order(tmp_path):
    results = run_distributed(_values_rank, 3, tmp_path, 10)
    for rank, (reported_rank, backend, tensor, threads) in enumerate(results):
        assert (reported_rank, backend, threads) == (rank, "gloo", 1)
        torch.testing.assert_close(tensor, torch.full((2,), float(rank + 10)))


def _raise_on_rank_1(rank: int, world_size: int) -> None:
    if rank == 1:
        raise ValueError("bad value on rank one")
    dist.barrier()  # rank 0 waits for a peer that never arrives


def _exit_on_rank_1(rank: int, world_size: int) -> None:
    if rank == 1:
        os._exit(3)
    dist.barrier()


def _sleep_forever(rank: int, world_size: int, pid_dir: str) -> None:
    with open(os.path.join(pid_dir, f"rank{rank}.pid"), "w") as f:
        f.write(str(os.getpid()))
    time.sleep(3600)


@pytest.mark.distributed
def test_run_distributed_propagates_the_failing_ranks_traceback(tmp_path):
    """The peer left blocked in a barrier is not waited for up to the timeout."""
    started = time.monotonic()
    with pytest.raises(DistributedError) as error:
        run_distributed(_raise_on_rank_1, WORLD, tmp_path, timeout=60)
    assert time.monotonic() - started < 30
    message = str(error.value)
    assert message.startswith("rank 1 of 2 failed")
    assert "ValueError: bad value on rank one" in message and "_raise_on_rank_1" in message
    assert set(error.value.failures) == {0, 1}
    assert not isinstance(error.value, DistributedTimeoutError)


@pytest.mark.distributed
def test_run_distributed_reports_a_rank_that_dies_silently(tmp_path):
    with pytest.raises(DistributedError, match=r"rank 1 of 2 failed") as error:
        run_distributed(_exit_on_rank_1, WORLD, tmp_path, timeout=60)
    assert "exit code 3" in error.value.failures[1]


@pytest.mark.distributed
def test_run_distributed_turns_a_hang_into_a_timeout_and_kills_the_ranks(tmp_path):
    with pytest.raises(DistributedTimeoutError, match=r"timed out after 3 s"):
        run_distributed(_sleep_forever, WORLD, tmp_path, str(tmp_path), timeout=3)
    for rank in range(WORLD):
        pid = int((tmp_path / f"rank{rank}.pid").read_text())
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
