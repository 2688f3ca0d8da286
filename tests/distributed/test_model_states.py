"""Model-state bytes per rank: measured from the live tensors of real DeepSpeed runs against
the planner (issue 12).

2 gloo ranks train the tiny LLaMA (and a 2-block 60m-shaped one) for 2 steps per layout (ZeRO
0-3, fp32 and bf16, ``lift`` and ``subspace``, DP=2 and TP=2/DP=1); the trainer's probe measures
:func:`~actcomp_dist.memory.model_state_bytes` around each optimizer step (after the last
backward and inside each parameter group's update) and records the largest in
``metrics.jsonl``. The planner predicts the same peak in closed form. Criterion: the issue's 5%
on the total (an acceptance criterion, not a tolerance), and the prediction is a lower bound;
parameters, subspace masters, projection caches and the data-parallel reduction bytes have no
rounding and match to the byte. What is left of the total's difference is DeepSpeed's alignment
of its flat partitions and Adam's step counters, which only add (observed below 0.02%).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from actcomp_dist.memory import ModelStateProbe, model_state_bytes
from tests.helpers.distributed import run_distributed
from tests.helpers.runs import tiny_config

LAYOUTS = {
    "zero0_fp32_lift": ["deepspeed.zero_optimization.stage=0"],
    "zero1_bf16_lift": ["deepspeed.zero_optimization.stage=1", "train.precision=bf16"],
    "zero2_bf16_lift": ["deepspeed.zero_optimization.stage=2", "train.precision=bf16"],
    # Every tiny matrix is below ZeRO-3's default persistence threshold (1e5 elements: kept
    # whole on every rank, which the planner leaves out); at 1B only the norms are.
    "zero3_bf16_lift": [
        "deepspeed.zero_optimization.stage=3",
        "deepspeed.zero_optimization.stage3_param_persistence_threshold=0",
        "train.precision=bf16",
    ],
    "zero0_fp32_subspace": [
        "deepspeed.zero_optimization.stage=0",
        "compression.grad_mode=subspace",
    ],
    "zero1_bf16_subspace": [
        "deepspeed.zero_optimization.stage=1",
        "train.precision=bf16",
        "compression.grad_mode=subspace",
    ],
    "zero2_bf16_subspace": [
        "deepspeed.zero_optimization.stage=2",
        "train.precision=bf16",
        "compression.grad_mode=subspace",
    ],
    # A 60m-shaped model (d 512, FFN 1376, 8 heads; 2 blocks to stay quick on a CPU).
    "60m_zero2_bf16_lift": [
        "model.name=60m",
        "model.overrides.num_layers=2",
        "deepspeed.zero_optimization.stage=2",
        "train.precision=bf16",
    ],
    "60m_zero2_bf16_subspace": [
        "model.name=60m",
        "model.overrides.num_layers=2",
        "deepspeed.zero_optimization.stage=2",
        "train.precision=bf16",
        "compression.grad_mode=subspace",
    ],
    # Per-site learning-rate factors split the matrices into three param groups: the gradients'
    # peak is while ZeRO-1 steps the largest one (qkv, fc1, fc2), the second, with the flat
    # partition of every group's gradients still alive.
    "60m_zero1_bf16_lr_scale": [
        "model.name=60m",
        "model.overrides.num_layers=2",
        "deepspeed.zero_optimization.stage=1",
        "train.precision=bf16",
        'train.lr_scale={"qkv": 0.5, "fc1": 0.5, "fc2": 0.5, "proj": 0.25}',
    ],
    "tp2_zero1_bf16_subspace": [
        "parallel.tensor_parallel=2",
        "deepspeed.zero_optimization.stage=1",
        "train.precision=bf16",
        "compression.grad_mode=subspace",
    ],
}


def _states_rank(rank: int, world_size: int, raws: list[dict]) -> list[dict]:
    from actcomp_dist.memory_model import optimizer_group_sizes
    from actcomp_dist.training.config import run_config_from_dict
    from actcomp_dist.training.model_states import (
        gradient_reduction_bytes,
        lr_factors,
        predicted_model_states,
    )
    from actcomp_dist.training.trainer import Trainer

    results = []
    for raw in raws:
        trainer = Trainer(run_config_from_dict(raw))
        history = trainer.train().history
        predicted = predicted_model_states(trainer.config, trainer.model, trainer.ctx.dp_size)
        merger = trainer.merger
        config = trainer.config
        sizes = optimizer_group_sizes(
            trainer.model.config,
            config.compression,
            config.parallel.tensor_parallel,
            lr_factors(config),
        )
        p_bytes = 4 if config.train.precision == "fp32" else 2
        results.append(
            {
                "recorded": [r["model_state_bytes"] for r in history],
                "predicted": predicted,
                "reduction": gradient_reduction_bytes(trainer.model),
                "smallest_group_share": min(sizes) * p_bytes // trainer.ctx.dp_size,
                # ZeRO 1/2 subspace: the Adam moments this rank keeps ([its rows, r] fp32).
                "subspace_moments": sum(
                    4 * m.numel() for pair in getattr(merger, "moments", {}).values() for m in pair
                ),
            }
        )
        trainer.close()
    return results


@pytest.mark.distributed
def test_measured_model_states_match_the_planner(tmp_path, corpus):
    common = ["train.steps=2", "train.eval_interval=0", "compression.cache_projection=true"]
    raws = [
        tiny_config(tmp_path / name, corpus, *common, *overrides)
        for name, overrides in LAYOUTS.items()
    ]
    ranks = run_distributed(_states_rank, 2, tmp_path, raws, timeout=300)
    for name, result in zip(LAYOUTS, ranks[0], strict=True):
        measured = result["recorded"][-1]  # step 2: Adam's moments exist at every stage
        predicted = result["predicted"]
        assert measured["parameters"] == predicted.parameters, name
        assert measured["projection_cache"] == predicted.projection_cache > 0, name
        assert measured["subspace_masters"] == predicted.detail["subspace_masters_bytes"], name
        expected = predicted.total - predicted.engine_buffers  # the bucket is a transient
        # The total: the acceptance criterion for a prediction (issue 12: within 5%),
        # not a rounding tolerance. What is left is only ever added by DeepSpeed (its flat
        # partitions' alignment padding, Adam's step counters), so the planner is a lower
        # bound, exactly; observed 8 - 524 bytes above it (< 0.02%).
        assert expected <= measured["total"] <= 1.05 * expected, (name, measured, expected)
        # The gradients alone: what is above the prediction is DeepSpeed's alignment padding
        # (observed 0 - 516 bytes); a group's gradients wrongly counted as alive or freed
        # during the step would be at least the smallest group's share of them.
        excess = measured["gradients"] - predicted.gradients
        assert 0 <= excess < result["smallest_group_share"], (name, excess)
        reduction = predicted.detail["dp_reduction_bytes"]
        assert result["reduction"] == reduction, name
        assert (reduction["compressed"] > 0) == ("subspace" in name), name
    by_name = dict(zip(LAYOUTS, ranks[0], strict=True))
    # ZeRO 0 reduces no m x n gradient for the subspace weights (DeepSpeed would otherwise give
    # each a zero one): gradients are exactly the trained parameters', no alignment padding.
    zero0 = by_name["zero0_fp32_subspace"]
    assert zero0["recorded"][-1]["gradients"] == zero0["predicted"].gradients
    # bf16 at DP=2: each rank keeps half of every compressed weight's fp32 master.
    masters = by_name["zero2_bf16_subspace"]["recorded"][-1]["subspace_masters"]
    weights = by_name["zero2_bf16_subspace"]["predicted"].detail["subspace_weights"]
    assert masters == 4 * weights // 2
    # ZeRO 1/2: no m x r proxy among the parameters; the moments are this rank's rows only
    # (half of every m x r at DP=2 on an even m), and the model states are at most the lift
    # run's at the same stage — measured on this rank from the live tensors.
    for layout in ("zero1_bf16", "zero2_bf16", "60m_zero2_bf16"):
        subspace, lift = by_name[f"{layout}_subspace"], by_name[f"{layout}_lift"]
        detail = subspace["predicted"].detail
        assert subspace["recorded"][-1]["parameters"] == lift["recorded"][-1]["parameters"]
        assert subspace["subspace_moments"] == 8 * detail["subspace_row_elements"]
        assert 2 * detail["subspace_row_elements"] == detail["subspace_gradient_elements"]
        assert detail["subspace_proxies"] == 0
        assert subspace["recorded"][-1]["total"] <= lift["recorded"][-1]["total"], layout


def test_model_state_bytes_counts_each_storage_once_by_category():
    """Closed form on a plain model: two parameters that are views of one flat buffer (as in
    ZeRO's flat groups) count as the buffer; a module buffer is not model state; inside
    AdamW's step the gradients (own storages) and the moments plus a 4-byte step counter per
    parameter exist."""
    flat = torch.zeros(110)  # 100 used + 10 elements of padding
    model = nn.Module()
    model.a = nn.Parameter(flat[:64].view(8, 8))
    model.b = nn.Parameter(flat[64:100].view(6, 6))
    model.register_buffer("table", torch.ones(1000))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    probe = ModelStateProbe(model, optimizer)
    model.a.grad, model.b.grad = torch.ones(8, 8), torch.ones(6, 6)
    optimizer.step()
    measured = probe.last
    assert measured["parameters"] == 110 * 4
    assert measured["gradients"] == 100 * 4
    assert measured["optimizer_state"] == 2 * 100 * 4 + 2 * 4
    assert measured["total"] == 110 * 4 + 100 * 4 + 808
    optimizer.zero_grad(set_to_none=True)  # after the step: no gradients
    assert model_state_bytes(model, optimizer)["gradients"] == 0
    probe.remove()


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_subspace_model_states_of_1b_never_exceed_the_uncompressed_run(zero_stage):
    """Issue 12's target in the planner (whose ZeRO 1/2 accounting the test above checks
    against live tensors): LLaMA 1B (vocabulary 32000), bf16, ``compact`` r = n/4 on qkv, fc1
    and fc2 in ``subspace`` mode keeps no more model state per GPU than the uncompressed run at
    every data-parallel size from 1 to 4096. At ZeRO 1/2 no m x r tensor is whole on a rank.
    Without the projection cache (the default, and configs/llama1b_compact.json's): the cache
    (n x r per layer, 0.46 GB at 1B) is whole on every rank by design."""
    from actcomp_dist.config import CompressionConfig
    from actcomp_dist.memory_model import predict_model_states
    from actcomp_dist.models import get_model_config

    model = get_model_config("1b", vocab_size=32000)
    compact = CompressionConfig(
        method="compact",
        rank=0.25,
        grad_mode="subspace",
        sites=["qkv", "fc1", "fc2"],
    )
    for dp in (2**k for k in range(13)):
        states = {
            name: predict_model_states(
                model, compression, precision="bf16", zero_stage=zero_stage, data_parallel=dp
            )
            for name, compression in (("none", CompressionConfig()), ("subspace", compact))
        }
        subspace, none = states["subspace"], states["none"]
        assert subspace.total <= none.total, (dp, subspace, none)
        assert subspace.parameters == none.parameters  # no replicated proxies
