"""VeLoRA's site ``v`` on the LLaMA model: the value rows of the fused QKV.

The fused QKV keeps its exact input for q and k, and VeLoRA's v-row weight gradient
``velora_scale (g_v^T S) (x) v`` (``S = X_groups v``) equals the exact v-row gradient with each
sub-token projected on ``v`` (``actcomp_dist.compression.row_slice``). References:

- the same model, same weights and batch, method ``none``: the loss, every input gradient
  and every other weight gradient bit for bit (only the v rows' weight gradient changes), and
  the v rows equal the float64 projection of the exact run's v rows, within the rounding of
  the projection (a d-term dot product, ``v * velora_scale``, their product, and 0.1 rounded
  to fp32: ``d + 3`` terms);
- at TP = 2 (with and without sequence parallelism) the same, each rank projecting the v rows
  of its own key/value groups (a wrong row would leave a v row exact or project a q/k row),
  with one sub-token vector on every rank (block 0's equal to TP = 1's bit for bit without
  SP);
- saved activations: exactly the uncompressed model's (counted bytes), as the memory model
  predicts.

The layer-level reference (separate q, k linears and a VeLoRA ``CompressedLinear`` v) is in
``tests/unit/test_row_slice.py``.
"""

from __future__ import annotations

import pytest
import torch

from actcomp_dist import CompressionConfig
from actcomp_dist.ablation.measure import measure_model_forward
from actcomp_dist.memory_model import ActivationSetting, predict_saved_activations
from actcomp_dist.models import build_llama, gather_full, get_model_config
from actcomp_dist.parallel import state
from tests.helpers.distributed import run_distributed
from tests.helpers.tolerances import assert_rounded_from_exact

SMALL = get_model_config("tiny").replace(seq_length=32)
GROUPS, SCALE = 32, 0.1  # the paper's 32 sub-token groups and LLaMA fine-tuning scale
VELORA_V = CompressionConfig(method="subtoken", groups=GROUPS, velora_scale=SCALE, sites=("v",))
BATCH = 2


def _tokens() -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    return torch.randint(0, SMALL.vocab_size, (BATCH, SMALL.seq_length + 1), generator=generator)


def _run_rank(rank: int, world_size: int, sequence_parallel: bool) -> dict:
    """The exact and the ``v`` model from the same weights on the same batch: loss, full
    gradients, saved bytes, and (``v``) each layer's sub-token vector on this rank."""
    state.initialize_model_parallel(world_size)
    batch = _tokens()
    out = {}
    for name, compression in (("exact", CompressionConfig()), ("v", VELORA_V)):
        model = build_llama(SMALL, compression, sequence_parallel=sequence_parallel, init_seed=0)
        model.train()
        loss = model.loss(batch[:, :-1], batch[:, 1:])
        loss.backward()
        out[name] = {
            "loss": loss.detach(),
            "grads": gather_full(model, {n: p.grad for n, p in model.named_parameters()}),
            # The trainer's forward (masked mean loss) on token ids with their own storages,
            # as the memory model counts them.
            "saved": measure_model_forward(
                model,
                batch[:, :-1].contiguous(),
                batch[:, 1:].contiguous(),
                torch.ones(BATCH, SMALL.seq_length),
            ).total,
        }
    out["vectors"] = [
        layer.attention.value_rows.projector.subtoken_vector.clone() for layer in model.layers
    ]
    return out


def _velora_projection(grad: torch.Tensor, vector: torch.Tensor, absolute: bool = False):
    """float64 ``velora_scale ((grad)_groups . v) (x) v`` of a [m, h] gradient (on absolute
    values: the magnitude of its terms)."""
    grad, vector = grad.double(), vector.double()
    if absolute:
        grad, vector = grad.abs(), vector.abs()
    m = grad.shape[0]
    scalars = grad.reshape(m, GROUPS, -1) @ vector  # [m, G]
    return (SCALE * scalars.unsqueeze(-1) * vector).reshape(m, -1)


@pytest.fixture(scope="module")
def tp1(tmp_path_factory):
    return run_distributed(_run_rank, 1, tmp_path_factory.mktemp("tp1"), False)[0]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("tp, sequence_parallel", [(1, False), (2, False), (2, True)])
def test_value_rows_get_velora_gradient_and_the_rest_stays_exact(
    tmp_path, tp1, tp, sequence_parallel
):
    ranks = [tp1] if tp == 1 else run_distributed(_run_rank, tp, tmp_path, sequence_parallel)
    result = ranks[0]
    exact, velora = result["exact"], result["v"]
    assert torch.equal(velora["loss"], exact["loss"])  # the forward is unchanged
    d = SMALL.hidden_size // GROUPS
    for name, grad in velora["grads"].items():
        if not name.endswith("self_attn.v_proj.weight"):
            assert torch.equal(grad, exact["grads"][name]), name
            continue
        layer = int(name.split(".")[2])
        vector = result["vectors"][layer]
        assert_rounded_from_exact(
            grad,
            _velora_projection(exact["grads"][name], vector),
            _velora_projection(exact["grads"][name], vector, absolute=True),
            length=d + 3,  # d-term dot product, v * velora_scale, the product; 0.1 in fp32
            msg=name,
        )
        assert not torch.equal(grad, exact["grads"][name])  # projected, not left exact
    # One sub-token vector on every rank (the mean over every rank's tokens). Without SP each
    # rank sees every token and the sum over ranks doubles the statistics exactly, so block
    # 0, whose input (embedding, norm) is the same at any TP size, has TP = 1's vector bit for
    # bit; later blocks' inputs differ from TP = 1's by the rounding of the row-parallel sums.
    for layer, vector in enumerate(result["vectors"]):
        assert all(torch.equal(r["vectors"][layer], vector) for r in ranks), layer
    if not sequence_parallel:
        assert torch.equal(result["vectors"][0], tp1["vectors"][0])

    # Saved activations: the same bytes as the uncompressed model, as the memory model predicts.
    setting = ActivationSetting(
        BATCH,
        SMALL.seq_length,
        tensor_parallel=tp,
        sequence_parallel=sequence_parallel,
    )
    predicted_exact = predict_saved_activations(SMALL, CompressionConfig(), setting).total
    predicted_v = predict_saved_activations(SMALL, VELORA_V, setting).total
    assert velora["saved"] == exact["saved"] == predicted_exact == predicted_v
