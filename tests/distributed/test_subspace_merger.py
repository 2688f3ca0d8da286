"""The subspace merger's partitioned fp32 masters (2 gloo ranks against one process).

Reference: the same merge in float64 (``W (1 - lr wd) + alpha S P^T`` from the same fp32
master, proxy and projection). At DP=1 each rank keeps the whole master, at DP=2 its
``ceil(m / 2)`` rows; both are compared with the float64 value within the rounding bound of
the length-r product, and the bf16 weight must be exactly the rounded masters of all ranks
(the all-gather moves rows, it computes nothing).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from actcomp_dist import CompressedLinear, CompressionConfig
from actcomp_dist.optim.subspace_proxy import SubspaceMerger, attach_subspace_proxies, owned_rows
from tests.helpers.compression_reference import gaussian_projection
from tests.helpers.distributed import run_distributed
from tests.helpers.tolerances import assert_within_rounding

# Output widths: odd (uneven row split), and 1 (fewer rows than ranks: one rank owns none).
SHAPES = [(16, 7), (12, 1), (20, 10)]  # (n, m)
RANK, SEED, ALPHA, LR, WEIGHT_DECAY = 4, 5, 0.25, 0.1, 0.1


def _model() -> nn.Module:
    torch.manual_seed(0)
    cfg = CompressionConfig(method="compact", rank=RANK, grad_mode="subspace", seed=SEED)
    model = nn.ModuleList(
        CompressedLinear(n, m, bias=False, compression=cfg, layer_id=i, site="fc1")
        for i, (n, m) in enumerate(SHAPES)
    )
    attach_subspace_proxies(model)
    return model.to(torch.bfloat16)


def _set_step(model: nn.Module, step: int) -> list[torch.Tensor]:
    """What an optimizer step leaves: a proxy value S [m, r] and the seeds of P."""
    generator = torch.Generator().manual_seed(50 + step)
    deltas = []
    for layer in model:
        delta = torch.randn(layer.weight.shape[0], RANK, generator=generator)
        layer.subspace_proxy.data.copy_(delta)
        deltas.append(layer.subspace_proxy.detach().float())  # bf16-rounded, as merged
        layer.weight.subspace.seeds = layer.compressor.current_seeds()
    return deltas


def _merge_rank(rank: int, world_size: int) -> dict:
    results = {}
    for name, group in (("dp1", None), ("dp2", dist.group.WORLD)):
        model = _model()
        merger = SubspaceMerger(model, ALPHA, WEIGHT_DECAY, process_group=group)
        deltas = []
        for step in range(2):
            deltas.append(_set_step(model, step))
            merger.merge(LR)
            for layer in model:  # the merge resets each proxy and forgets the seeds
                assert not layer.subspace_proxy.any()
                assert layer.weight.subspace.seeds is None
        results[name] = {
            "weights": [layer.weight.detach().clone() for layer in model],
            "masters": [merger.masters[id(layer)] for layer in model],
            "state": merger.state_dict(),
            "master_bytes": merger.master_bytes(),
        }
        results["deltas"] = deltas
        results["w0"] = [layer.weight.detach().float() for layer in _model()]
    # A checkpoint of this rank's partition resumes into a fresh merger, and refuses another
    # data-parallel layout.
    fresh = SubspaceMerger(_model(), ALPHA, WEIGHT_DECAY, process_group=dist.group.WORLD)
    fresh.load_state_dict(results["dp2"]["state"])
    results["reloaded"] = [m for _, m in fresh.masters.values()]
    with pytest.raises(ValueError, match="saved by data-parallel rank 0 of 1"):
        fresh.load_state_dict(results["dp1"]["state"])
    return results


def _reference(w0: torch.Tensor, deltas: list[torch.Tensor], layer_id: int) -> tuple:
    """float64 masters after the two merges, and the magnitude of their terms."""
    n = w0.shape[1]
    w, magnitude = w0.double(), w0.double().abs()
    # [n, r], epoch 0 at both steps; rounded to bf16 like the forward's (and the merge's) P.
    p = gaussian_projection(SEED, layer_id, "fc1", 0, n, RANK).float().bfloat16().double()
    for delta in deltas:
        w = w * (1 - LR * WEIGHT_DECAY) + ALPHA * delta.double() @ p.t()
        magnitude = magnitude + ALPHA * delta.double().abs() @ p.abs().t()
    return w, magnitude


@pytest.mark.distributed
def test_partitioned_masters_match_the_whole_master_and_float64(tmp_path):
    ranks = run_distributed(_merge_rank, 2, tmp_path, timeout=120)
    for i, (n, m) in enumerate(SHAPES):
        w0 = ranks[0]["w0"][i]
        expected, magnitude = _reference(w0, [step[i] for step in ranks[0]["deltas"]], i)
        for rank, result in enumerate(ranks):
            # DP=1: every rank holds the whole master.
            start, whole = result["dp1"]["masters"][i]
            assert start == 0 and whole.shape == (m, n)
            # Two steps, each one product of length r plus a scaling: 2 (r + 2) roundings.
            assert_within_rounding(whole, expected, magnitude, 2 * (RANK + 2), msg=f"dp1 {i}")
            # DP=2: only this rank's rows.
            lo, hi = owned_rows(m, rank, 2)
            start, part = result["dp2"]["masters"][i]
            assert (start, part.shape) == (lo, (hi - lo, n))
            assert_within_rounding(
                part, expected[lo:hi], magnitude[lo:hi], 2 * (RANK + 2), msg=f"dp2 {i} r{rank}"
            )
            assert torch.equal(result["reloaded"][i], part)
        # Every rank's bf16 weight is the rounded concatenation of the ranks' rows.
        rows = torch.cat([r["dp2"]["masters"][i][1] for r in ranks]).to(torch.bfloat16)
        for result in ranks:
            assert torch.equal(result["dp2"]["weights"][i], rows)
            assert torch.equal(
                result["dp1"]["weights"][i], result["dp1"]["masters"][i][1].bfloat16()
            )
    # The partition holds each master row exactly once: bytes add up to the whole master.
    whole_bytes = sum(4 * n * m for n, m in SHAPES)
    assert ranks[0]["dp1"]["master_bytes"] == whole_bytes
    assert sum(r["dp2"]["master_bytes"] for r in ranks) == whole_bytes


def test_owned_rows_cover_every_row_once():
    for rows in (1, 2, 7, 8, 13):
        for dp in (1, 2, 3, 8):
            ranges = [owned_rows(rows, r, dp) for r in range(dp)]
            covered = [i for lo, hi in ranges for i in range(lo, hi)]
            assert covered == list(range(rows)), (rows, dp, ranges)
