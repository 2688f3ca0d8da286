"""The partitioned subspace optimizer (ZeRO 1/2) on 2 gloo ranks against one process and
float64.

Each micro-batch's ``G_hat`` enters through ``accumulate_compressed_grad`` (what the layers'
backward calls), so the reduce-scatter in backward, the row accumulators, the data-parallel
mean, the clip coefficient, Adam and the merge are all exercised. The gradients are small
integers: every sum of them is exact in fp32 and bf16 whatever the order, so the DP=2 run and
the DP=1 run (fed the same global mean) see identical gradients. Then:

- moments and gradient norms are element-wise identical ops on identical values: equal bit
  for bit, DP=2 rows against the DP=1 rows;
- the weights go through ``W (1 - lr wd) + alpha S P^T`` with ``S`` from Adam: compared with
  float64 within the rounding bound of that chain (Adam's element-wise ops, about 12 roundings
  relative to ``|S|``, then the length-r product), and the 16-bit weight is exactly the
  rounded fp32 masters of both ranks.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
from torch import nn

from actcomp_dist import CompressedLinear, CompressionConfig
from actcomp_dist.autograd import accumulate_compressed_grad
from actcomp_dist.optim.subspace_partitioned import PartitionedSubspaceAdam
from actcomp_dist.optim.subspace_proxy import attach_subspace_proxies, owned_rows
from tests.helpers.compression_reference import gaussian_projection
from tests.helpers.distributed import run_distributed
from tests.helpers.tolerances import assert_within_rounding

# Output widths: odd (uneven row split), and 1 (fewer rows than ranks: one rank owns none).
SHAPES = [(16, 7), (12, 1), (20, 10)]  # (n, m)
RANK, SEED, ALPHA, LR, WEIGHT_DECAY = 4, 5, 0.25, 0.1, 0.1
BETAS, EPS = (0.9, 0.999), 1e-8
STEPS, MICRO_BATCHES, DP = 2, 2, 2
CLIP = [1.0, 0.5]  # the engine's clip coefficient at each step


def _model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    cfg = CompressionConfig(method="compact", rank=RANK, grad_mode="subspace", seed=SEED)
    model = nn.ModuleList(
        CompressedLinear(n, m, bias=False, compression=cfg, layer_id=i, site="fc1")
        for i, (n, m) in enumerate(SHAPES)
    )
    return model.to(dtype)


def _gradient(step: int, micro: int, dp_rank: int, layer: int) -> torch.Tensor:
    """An integer G_hat [m, r] in [-4, 4] (exact in bf16; so are its sums here)."""
    generator = torch.Generator().manual_seed(1000 * step + 100 * micro + 10 * dp_rank + layer)
    return torch.randint(-4, 5, (SHAPES[layer][1], RANK), generator=generator).float()


def _mean_gradient(step: int, layer: int) -> torch.Tensor:
    """What the optimizer steps with: the sum over micro-batches, mean over ranks."""
    return sum(_gradient(step, k, d, layer) for k in range(MICRO_BATCHES) for d in range(DP)) / DP


def _train(dtype: torch.dtype, group, rank: int) -> dict:
    model = _model(dtype)
    optimizer = PartitionedSubspaceAdam(model, ALPHA, WEIGHT_DECAY, BETAS, EPS, process_group=group)
    norms = []
    for step in range(STEPS):
        for micro in range(MICRO_BATCHES):
            for i, layer in enumerate(model):
                seeds = layer.compressor.current_seeds()
                if group is None:  # one process: the whole global batch (mean over ranks)
                    ghat = sum(_gradient(step, micro, d, i) for d in range(DP)) / DP
                else:
                    ghat = _gradient(step, micro, rank, i)
                accumulate_compressed_grad(layer.weight, ghat.to(dtype), seeds)
                assert layer.weight.subspace.grad is None  # handed on, not kept whole
        norms.append(optimizer.squared_norm())
        optimizer.clip_coefficient = CLIP[step]
        optimizer.merge(LR)
        assert not optimizer.grads
    return {
        "weights": [layer.weight.detach().clone() for layer in model],
        "masters": [optimizer.masters.get(id(layer)) for layer in model],
        "moments": [optimizer.moments[id(layer.weight)] for layer in model],
        "norms": norms,
        "state": optimizer.state_dict(),
        "state_bytes": {k: sum(t.nbytes for t in v) for k, v in optimizer.state_tensors().items()},
    }


def _rank(rank: int, world_size: int) -> dict:
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        for name, group in (("dp1", None), ("dp2", dist.group.WORLD)):
            results[(dtype, name)] = _train(dtype, group, rank)
    # A checkpoint of this rank's partition resumes into a fresh optimizer, and refuses
    # another data-parallel layout and a checkpoint of the proxies' layout.
    fresh = PartitionedSubspaceAdam(
        _model(torch.bfloat16), ALPHA, WEIGHT_DECAY, BETAS, EPS, process_group=dist.group.WORLD
    )
    fresh.load_state_dict(results[(torch.bfloat16, "dp2")]["state"])
    results["reloaded"] = {
        "steps": fresh.steps,
        "masters": [m for _, m in fresh.masters.values()],
        "moments": list(fresh.moments.values()),
    }
    with pytest.raises(ValueError, match="saved by data-parallel rank 0 of 1"):
        fresh.load_state_dict(results[(torch.bfloat16, "dp1")]["state"])
    with pytest.raises(ValueError, match="proxies"):
        fresh.load_state_dict({"dp_size": 2, "dp_rank": rank, "masters": {}})
    return results


def _reference(w0: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 weight after the steps, and the magnitude of its terms."""
    n = w0.shape[1]
    # [n, r], epoch 0 at every step; rounded to the weight's dtype like the forward's P.
    p = gaussian_projection(SEED, layer, "fc1", 0, n, RANK).float().to(w0.dtype).double()
    w, magnitude = w0.double(), w0.double().abs()
    exp_avg = torch.zeros(w0.shape[0], RANK, dtype=torch.float64)
    exp_avg_sq = torch.zeros_like(exp_avg)
    for step in range(STEPS):
        grad = _mean_gradient(step, layer).double() * CLIP[step]
        exp_avg = BETAS[0] * exp_avg + (1 - BETAS[0]) * grad
        exp_avg_sq = BETAS[1] * exp_avg_sq + (1 - BETAS[1]) * grad**2
        t = step + 1
        denom = (exp_avg_sq / (1 - BETAS[1] ** t)).sqrt() + EPS
        delta = -LR / (1 - BETAS[0] ** t) * exp_avg / denom  # [m, r]
        w = w * (1 - LR * WEIGHT_DECAY) + ALPHA * delta @ p.t()
        magnitude = magnitude + ALPHA * delta.abs() @ p.abs().t()
    return w, magnitude


@pytest.mark.distributed
def test_partitioned_subspace_adam_matches_one_process_and_float64(tmp_path):
    ranks = run_distributed(_rank, DP, tmp_path, timeout=120)
    for dtype in (torch.float32, torch.bfloat16):
        w0 = [layer.weight.detach() for layer in _model(dtype)]
        for rank, results in enumerate(ranks):
            dp1, dp2 = results[(dtype, "dp1")], results[(dtype, "dp2")]
            # The joint norm's subspace part: exact sums of exact squares, then the clip.
            expected = [
                sum(_mean_gradient(s, i).pow(2).sum() for i in range(len(SHAPES)))
                for s in range(STEPS)
            ]
            assert [float(x) for x in dp2["norms"]] == [float(x) for x in expected]
            assert [float(x) for x in dp1["norms"]] == [float(x) for x in expected]
            for i, (_, m) in enumerate(SHAPES):
                lo, hi = owned_rows(m, rank, DP)
                for whole, part in zip(dp1["moments"][i], dp2["moments"][i], strict=True):
                    assert part.shape == (hi - lo, RANK)
                    assert torch.equal(part, whole[lo:hi]), (dtype, rank, i)
                expected, magnitude = _reference(w0[i], i)
                # Adam's chain (~12 roundings relative to |S|) and the length-r product, for
                # each step; the fp32 master (or fp32 weight) holds the result.
                length = STEPS * (RANK + 12)
                for run in (dp1, dp2):
                    master = run["masters"][i]
                    value = run["weights"][i] if master is None else master[1]
                    rows = slice(0, m) if run is dp1 or master is None else slice(lo, hi)
                    assert_within_rounding(
                        value, expected[rows], magnitude[rows], length, msg=f"{dtype} {i}"
                    )
        # Every rank's weight is the rounded concatenation of the ranks' rows.
        for i in range(len(SHAPES)):
            if dtype == torch.bfloat16:
                rows = torch.cat([r[(dtype, "dp2")]["masters"][i][1] for r in ranks])
                for results in ranks:
                    assert torch.equal(results[(dtype, "dp2")]["weights"][i], rows.bfloat16())
            else:
                first, second = (r[(dtype, "dp2")]["weights"][i] for r in ranks)
                assert torch.equal(first, second)
    # Each m x r row and each master row lives on exactly one rank: the ranks' bytes add up to
    # the whole (moments: 2 x 4 bytes per element; masters: 4 bytes per weight element).
    whole_moments = sum(8 * m * RANK for _, m in SHAPES)
    whole_masters = sum(4 * n * m for n, m in SHAPES)
    bf16 = [r[(torch.bfloat16, "dp2")]["state_bytes"] for r in ranks]
    assert sum(b["optimizer_state"] for b in bf16) == whole_moments
    assert sum(b["subspace_masters"] for b in bf16) == whole_masters
    assert all(b["gradients"] == 0 for b in bf16)  # after the merge
    # The checkpoint round trip.
    for results in ranks:
        state = results[(torch.bfloat16, "dp2")]
        reloaded = results["reloaded"]
        assert reloaded["steps"] == STEPS
        saved_masters = [master for _, master in state["masters"]]
        for mine, saved in zip(reloaded["masters"], saved_masters, strict=True):
            assert torch.equal(mine, saved)
        for mine, saved in zip(reloaded["moments"], state["moments"], strict=True):
            assert all(torch.equal(a, b) for a, b in zip(mine, saved, strict=True))


def test_refuses_proxies_and_owns_no_m_by_r_tensor_whole():
    """A model with proxies belongs to the ZeRO 0 path; without a group the rows are all."""
    model = _model(torch.float32)
    optimizer = PartitionedSubspaceAdam(model, ALPHA, WEIGHT_DECAY, BETAS, EPS)
    assert optimizer.rows == {
        id(layer.weight): (0, m) for layer, (_, m) in zip(model, SHAPES, strict=True)
    }
    assert math.isclose(optimizer.clip_coefficient, 1.0)
    with_proxies = _model(torch.float32)
    attach_subspace_proxies(with_proxies)
    with pytest.raises(ValueError, match="no proxies"):
        PartitionedSubspaceAdam(with_proxies, ALPHA, WEIGHT_DECAY, BETAS, EPS)


def test_zero1_bf16_with_fp32_gradient_accumulation_is_refused_at_start_up(tmp_path):
    """DeepSpeed steps ZeRO 1 + bf16 + fp32 gradient accumulation with its BF16_Optimizer,
    whose norm clip the partitioned state cannot join: one line naming the key, before any
    collective (validate_run); the default accumulation (the parameters' dtype) is served."""
    from actcomp_dist.training.config import ConfigError, run_config_from_dict, validate_run

    def config(**deepspeed):
        return run_config_from_dict(
            {
                "run_dir": str(tmp_path / "run"),  # the embedded corpus: no files opened
                "compression": {"method": "compact", "rank": 0.25, "grad_mode": "subspace"},
                "train": {"precision": "bf16"},
                "deepspeed": {"zero_optimization": {"stage": 1}, **deepspeed},
            }
        )

    validate_run(config(), 2)
    validate_run(config(data_types={"grad_accum_dtype": "bf16"}), 2)
    with pytest.raises(ConfigError, match="deepspeed.data_types.grad_accum_dtype unset or 'bf16'"):
        validate_run(config(data_types={"grad_accum_dtype": "fp32"}), 2)
