"""``memory.policy.block_input`` under full activation checkpointing: the checkpointed block
keeps its input packed (``lowrank:R``: LoRAct's layer mode; ``int8`` / ``fp8``) and backward
re-runs it from the unpacked copy.

References:

- **The rule** (one block, fp32 and bf16, every packer): forward is the ``keep`` block's at the
  exact input, bit for bit; backward equals the plain (uncheckpointed) block's autograd run on
  the reconstruction ``x_hat``, bit for bit (the same ops on the same tensor): every gradient
  inside the block at ``x_hat``, the input gradient ``g + J_F(x_hat)^T g``. The identity branch
  is exact: with ``F`` zeroed (proj and fc2 weights 0) the input gradient is ``g`` itself
  although ``x_hat != x``.
- **Full rank** (``lowrank:h``): ``Q`` is square and orthonormal, ``L Q^T`` is ``x`` up to
  rounding; with float64 parameters the model's gradients are as accurate against the
  all-float64 reference as the ``keep`` + full-checkpointing model's
  (``_assert_full_rank_exact``), loss bit-identical; TP = 1, 2, 2 + SP (a rank reconstructing
  another rank's sequence shard would be an O(1) error). float64 parameters so that the
  factorisation's own rounding stays far below the fp32 norms' (an fp32 Householder QR
  perturbs the input by ~h u, a hundred roundings); fp32 and bf16 are covered by the
  bit-for-bit rule above.
- **Low rank**: loss bit-identical to ``keep``; gradients finite and not equal to ``keep``'s.
- **Memory**: byte-exact against the memory model in ``tests/integration/test_memory_plan.py``.
"""

from __future__ import annotations

import pytest
import torch

from actcomp_dist.models import build_llama, get_model_config
from actcomp_dist.models.weights import load_full_weights
from actcomp_dist.parallel import state
from actcomp_dist.storage import StoragePolicy, storage_for
from actcomp_dist.training.activation_checkpointing import (
    apply_activation_checkpointing,
    checkpoint_packed_input,
)
from actcomp_dist.training.config import ConfigError, run_config_from_dict
from tests.helpers.distributed import run_distributed
from tests.helpers.llama_reference import (
    assert_exact_loss_and_as_accurate_as_keep,
    loaded_llama,
    loss_and_full_grads,
    next_token_batch,
    random_full_weights,
)

SMALL = get_model_config("tiny", seq_length=32)
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
PACKERS = pytest.mark.parametrize("policy", ["lowrank:8", "int8", "fp8"])


def _model(dtype, full, storage_policy=None, sequence_parallel=False, mode="full"):
    model = loaded_llama(
        SMALL, full, dtype, sequence_parallel=sequence_parallel, storage_policy=storage_policy
    )
    apply_activation_checkpointing(model, mode, None)
    return model


def _block_grads(layer, x, rope, grad_out, packer=None):
    """Output, input gradient and parameter gradients of one block (checkpointed with the
    packed input when ``packer`` is given, else plain autograd)."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    if packer is None:
        out = layer(x, rope)
    else:
        out = checkpoint_packed_input(layer.forward, packer, x, rope)
    out.backward(grad_out)
    grads = {name: p.grad.clone() for name, p in layer.named_parameters()}
    return out.detach(), x.grad, grads


def _block_case(dtype, seed=3):
    model = build_llama(SMALL, init_seed=0)
    load_full_weights(model, random_full_weights(SMALL, seed=1))
    layer = model.layers[0].to(dtype)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 2, SMALL.hidden_size, generator=generator).to(dtype)  # [s, b, h]
    grad_out = torch.randn(x.shape, generator=generator).to(dtype)
    return layer, x, model.rope(32, dtype), grad_out


@DTYPES
@PACKERS
def test_block_backward_is_the_block_at_the_reconstruction(single_rank, dtype, policy):
    layer, x, rope, grad_out = _block_case(dtype)
    packer = storage_for(policy)
    x_hat = packer.unpack(packer.pack(x), x)  # the same seeded factors / codes as inside

    out, grad_x, grads = _block_grads(layer, x, rope, grad_out, packer)
    out_keep, grad_x_keep, grads_keep = _block_grads(layer, x, rope, grad_out)
    out_at, grad_x_at, grads_at = _block_grads(layer, x_hat, rope, grad_out)

    assert torch.equal(out, out_keep)  # forward from the exact input
    assert torch.equal(grad_x, grad_x_at)
    assert all(torch.equal(grads[name], grads_at[name]) for name in grads_keep)
    # Not vacuous: the reconstruction differs from x, and so do the gradients.
    assert not torch.equal(x_hat, x)
    assert not torch.equal(grad_x, grad_x_keep)


@DTYPES
@PACKERS
def test_identity_branch_is_exact(single_rank, dtype, policy):
    """``F = 0`` (proj and fc2 weights zero): the block is the identity, its input gradient is
    ``g`` bit for bit although backward re-runs it on ``x_hat != x``."""
    layer, x, rope, grad_out = _block_case(dtype)
    layer.attention.proj.weight.data.zero_()
    layer.mlp.fc2.weight.data.zero_()
    packer = storage_for(policy)
    out, grad_x, _ = _block_grads(layer, x, rope, grad_out, packer)
    assert torch.equal(out, x)
    assert torch.equal(grad_x, grad_out)
    assert not torch.equal(packer.unpack(packer.pack(x), x), x)


FULL_RANK = StoragePolicy(block_input=f"lowrank:{SMALL.hidden_size}")


def _full_rank_run(full, sequence_parallel=False):
    """Loss and full gradients of the full-rank and the ``keep`` model (both under full
    activation checkpointing, float64 parameters)."""
    tokens, labels = next_token_batch(SMALL)
    return {
        name: loss_and_full_grads(
            _model(torch.float64, full, policy, sequence_parallel), tokens, labels
        )
        for name, policy in (("keep", None), ("lowrank", FULL_RANK))
    }


def _assert_full_rank_exact(results, full):
    """Full rank: ``Q`` is square and orthonormal, so ``L Q^T`` is the block input up to the
    float64 rounding of the factorisation (LowRankStorage factorises float64 inputs in float64;
    a few length-h reductions, ~1e-14 relative). The models' norms compute in fp32 (as Hugging
    Face's), so each model's dominant error is one fp32 rounding of every normalised input,
    propagated through the network, and the factorisation's perturbation can only flip some of
    those roundings: both models against the all-float64 reference at fp32's unit roundoff
    (tests/helpers/tolerances.py assert_as_accurate_as: the full-rank model's error at most
    twice the ``keep`` model's plus one fp32 rounding of the largest entry). A rank lifting
    another rank's shard, or a missing term, is an error of the order of the gradient."""
    assert_exact_loss_and_as_accurate_as_keep(
        results["lowrank"], results["keep"], full, SMALL, torch.float32, "full rank"
    )


def test_full_rank_block_input_gives_the_exact_gradients(single_rank):
    full = random_full_weights(SMALL, seed=1)
    _assert_full_rank_exact(_full_rank_run(full), full)


def _tp_run(rank, world_size, sequence_parallel, full):
    state.initialize_model_parallel(world_size)
    out = _full_rank_run(full, sequence_parallel)
    return out if rank == 0 else None


@pytest.mark.distributed
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2_sp"])
def test_full_rank_block_input_gives_the_exact_gradients_at_tp2(tmp_path, sequence_parallel):
    full = random_full_weights(SMALL, seed=1)
    _assert_full_rank_exact(run_distributed(_tp_run, 2, tmp_path, sequence_parallel, full)[0], full)


@PACKERS
def test_packed_block_input_model_forward_is_unchanged(single_rank, policy):
    full = random_full_weights(SMALL, seed=1)
    tokens, labels = next_token_batch(SMALL)
    keep_loss, keep_grads = loss_and_full_grads(_model(torch.float32, full), tokens, labels)
    model = _model(torch.float32, full, StoragePolicy(block_input=policy))
    loss, grads = loss_and_full_grads(model, tokens, labels)
    assert torch.equal(loss, keep_loss)
    assert all(torch.isfinite(grad).all() for grad in grads.values())
    assert any(not torch.equal(grads[name], keep_grads[name]) for name in keep_grads)


def test_packed_block_input_needs_full_checkpointing(single_rank):
    full = random_full_weights(SMALL, seed=1)
    for mode in ("none", "selective"):
        with pytest.raises(ValueError, match="needs activation_checkpointing.mode='full'"):
            _model(torch.float32, full, StoragePolicy(block_input="int8"), mode=mode)
    with pytest.raises(ConfigError, match=r"block_input='lowrank:8'.*mode='full' \(got 'sel"):
        run_config_from_dict(
            {
                "memory": {"policy": {"block_input": "lowrank:8"}},
                "activation_checkpointing": {"mode": "selective"},
            }
        )
    config = run_config_from_dict(
        {
            "memory": {"policy": {"block_input": "lowrank:8"}},
            "activation_checkpointing": {"mode": "full"},
        }
    )
    assert config.memory.storage_policy.block_input == "lowrank:8"
