"""The method's weight gradient on a slice of a fused linear's rows (VeLoRA's ``v`` site).

Reference: separate q and k ``nn.Linear``\\ s and a VeLoRA ``CompressedLinear`` v (method
``subtoken``: saves the sub-token scalars ``S = X_groups v``, weight gradient
``velora_scale (g^T S) (x) v``) with the fused layer's rows as weights, on the same input and
output gradient. The fused layer's q/k rows and input gradient are exact; its v rows equal the
VeLoRA layer's. Both sides are compared with a float64 evaluation, within rounding bounds
from the reduction lengths (``tests/helpers/tolerances.py``).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from actcomp_dist import CompressedLinear, CompressionConfig
from actcomp_dist.compression import BlockLayout, build_compressor
from actcomp_dist.compression.row_slice import RowSliceGradient, fused_qkv_value_rows
from actcomp_dist.config import check_model_sites
from actcomp_dist.seeds import CompressionSchedule
from tests.helpers.tolerances import assert_rounded_from_exact, assert_within_rounding

HIDDEN, GROUPS_KV, HEADS_PER_GROUP, HEAD_DIM = 16, 2, 2, 4
SUBTOKENS, SCALE, TOKENS = 4, 0.1, 24
VELORA = CompressionConfig(method="subtoken", groups=SUBTOKENS, velora_scale=SCALE, sites=("v",))


def test_value_rows_of_the_fused_layout():
    # [q q k v] per group of head_dim 3: v at rows 9..11 and 21..23.
    assert fused_qkv_value_rows(2, 2, 3).tolist() == [9, 10, 11, 21, 22, 23]
    # One query head per group (MHA): [q k v] per group.
    assert fused_qkv_value_rows(3, 1, 2).tolist() == [4, 5, 10, 11, 16, 17]


def _rows(kind: str) -> list[int]:
    per_group = (HEADS_PER_GROUP + 2) * HEAD_DIM
    offset = {"q": 0, "k": HEADS_PER_GROUP * HEAD_DIM, "v": (HEADS_PER_GROUP + 1) * HEAD_DIM}
    width = HEADS_PER_GROUP * HEAD_DIM if kind == "q" else HEAD_DIM
    return [g * per_group + offset[kind] + i for g in range(GROUPS_KV) for i in range(width)]


def test_fused_qkv_with_value_slice_equals_separate_q_k_and_velora_v():
    generator = torch.Generator().manual_seed(0)
    m = GROUPS_KV * (HEADS_PER_GROUP + 2) * HEAD_DIM
    fused = nn.Linear(HIDDEN, m, bias=False)
    with torch.no_grad():
        fused.weight.copy_(torch.randn(m, HIDDEN, generator=generator))
    compressor = build_compressor(
        VELORA, BlockLayout(HIDDEN), 0, "v", CompressionSchedule(VELORA.resample_every)
    )
    value_rows = RowSliceGradient(
        compressor, fused_qkv_value_rows(GROUPS_KV, HEADS_PER_GROUP, HEAD_DIM)
    )
    value_rows.attach(fused.weight)

    rows = {kind: _rows(kind) for kind in "qkv"}
    assert rows["v"] == value_rows.rows.tolist()
    separate = {kind: nn.Linear(HIDDEN, len(rows[kind]), bias=False) for kind in "qk"}
    separate["v"] = CompressedLinear(
        HIDDEN, len(rows["v"]), bias=False, compression=VELORA, all_reduce=None
    )
    for kind, layer in separate.items():
        with torch.no_grad():
            layer.weight.copy_(fused.weight[rows[kind]])

    x = torch.randn(TOKENS, HIDDEN, generator=generator) + 0.5  # a mean away from 0
    g = torch.randn(TOKENS, m, generator=generator)
    x_fused = x.clone().requires_grad_()
    value_rows.maybe_initialize(x_fused)
    fused(x_fused).backward(g)
    x_separate = x.clone().requires_grad_()
    for kind, layer in separate.items():
        layer(x_separate).backward(g[:, rows[kind]])
    vector = separate["v"].compressor.subtoken_vector
    assert torch.equal(compressor.subtoken_vector, vector)  # one rule, one input

    # q and k rows: exact, g^T x (N-term sums) on both sides.
    magnitude = g.abs().t().double() @ x.abs().double()
    for kind in "qk":
        assert_within_rounding(
            fused.weight.grad[rows[kind]],
            separate[kind].weight.grad,
            magnitude[rows[kind]],
            TOKENS,
            msg=kind,
        )
    # v rows: velora_scale ((g_v^T x)_groups . v) (x) v, from S on the VeLoRA side and from
    # the exact gradient on the fused side: N + d-term sums, the product with v * 0.1, 0.1
    # rounded to fp32.
    g_v, v64 = g[:, rows["v"]].double(), vector.double()

    def velora(grad, vec):
        scalars = grad.reshape(grad.shape[0], SUBTOKENS, -1) @ vec
        return (SCALE * scalars.unsqueeze(-1) * vec).reshape(grad.shape[0], -1)

    exact = velora(g_v.t() @ x.double(), v64)
    bound = velora(g_v.abs().t() @ x.abs().double(), v64.abs())
    length = TOKENS + HIDDEN // SUBTOKENS + 3
    for name, grad in (
        ("fused", fused.weight.grad[rows["v"]]),
        ("velora", separate["v"].weight.grad),
    ):
        assert_rounded_from_exact(grad, exact, bound, length, msg=name)
    assert not torch.allclose(fused.weight.grad[rows["v"]], (g[:, rows["v"]].t() @ x))
    # Input gradient: exact, g W (an m-term sum on the fused side, three shorter ones summed).
    assert_within_rounding(
        x_fused.grad, x_separate.grad, g.abs().double() @ fused.weight.abs().double(), m
    )


@pytest.mark.parametrize(
    "sites, method, message",
    [
        (("v", "fc2"), "compact", "needs a method whose weight gradient is a projection"),
        (("qkv", "v"), "subtoken", "names both 'qkv' and 'v'"),
        (("v_proj",), "subtoken", "unknown site(s) ['v_proj']"),
    ],
)
def test_sites_the_model_cannot_build_are_refused(sites, method, message):
    with pytest.raises(ValueError) as err:
        check_model_sites(CompressionConfig(method=method, sites=sites))
    assert message in str(err.value)
    check_model_sites(CompressionConfig(method="subtoken", sites=("v", "fc2")))  # the paper's


def test_run_config_refuses_v_with_a_method_that_cannot_serve_it():
    """At config load (before any process group): a ConfigError naming the file and key,
    which the launchers turn into exit code 2 on every rank."""
    from pathlib import Path

    from actcomp_dist.training.config import ConfigError, load_run_config

    path = Path(__file__).resolve().parents[2] / "configs" / "tiny_compact.json"
    with pytest.raises(ConfigError) as err:
        load_run_config(path, ['compression={"method": "compact", "sites": ["v", "fc2"]}'])
    assert str(err.value).startswith(f"{path}: compression.sites 'v'"), str(err.value)
    config = load_run_config(path, ['compression={"method": "subtoken", "sites": ["v", "fc2"]}'])
    assert config.compression.sites == ("v", "fc2")
