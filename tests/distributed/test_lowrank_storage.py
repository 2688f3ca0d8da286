"""``memory.policy`` ``norm: lowrank:R`` and ``swiglu: lowrank:R`` (LoRAct's norm and act_fn
modes) and ``norm: int8`` / ``fp8`` in the LLaMA model: a block norm's packed output shared by
the uncompressed linear that reads it.

References:

- **Full rank** (``R`` = the width): ``Q`` is square and orthonormal, so ``L Q^T = A Q Q^T``
  is ``A`` up to rounding and the model's gradients are the exact ones. The forward is
  untouched (the loss is bit-identical to ``keep``'s); the gradients are compared with the
  float64 reference model as :mod:`tests.distributed.test_efficient_ops` compares the memory-efficient
  block: the error against float64 at most twice the ``keep`` model's plus one rounding of the
  largest reference value (the factorisation only adds roundings of the same magnitude; a
  wrong term, such as another rank's ``Q`` lifting a shard's ``L`` under sequence parallelism,
  would be of the order of the gradient). fp32 and bf16, TP = 1, 2, 2 + SP.
- **Low rank**: the gradients equal a float64 computation from the same reconstruction
  ``L Q^T`` (the factors the layer kept), with a rounding bound derived from the reduction
  lengths (norm + qkv: LoRAct's rule, input gradient through the exact weight, weight gradient
  at the reconstruction); FC2 after the SwiGLU: the ``keep`` backward evaluated at the
  reconstruction, bit for bit.
- **8-bit norm**: qkv's weight gradient is the ``keep`` layer's at the dequantised output, bit
  for bit; the norm's gradients equal the float64 closed form there within rounding; the whole
  model at TP = 1, 2, 2 + SP keeps the loss bit-identical and the gradients within the 8-bit
  element error (2^-4, relative Frobenius) of ``keep``'s. The same whole-model check for the
  8-bit attention (its backward from the packed output proj also keeps and the log-sum-exp:
  each rank's heads and output slice; another head's output, say, fails it).
- **Memory**: byte-exact against the memory model in ``tests/integration/test_memory_plan.py``.
"""

from __future__ import annotations

import pytest
import torch

from actcomp_dist.models import build_llama, full_state_dict, get_model_config
from actcomp_dist.parallel import state
from actcomp_dist.storage import LowRankStorage, StoragePolicy
from tests.helpers.distributed import run_distributed
from tests.helpers.llama_reference import (
    assert_exact_loss_and_as_accurate_as_keep,
    loaded_llama,
    loss_and_full_grads,
    next_token_batch,
    random_full_weights,
)
from tests.helpers.storage import fc2_grads
from tests.helpers.tolerances import assert_within_8bit_error

SMALL = get_model_config("tiny", seq_length=32)
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
UNIT_ROUNDOFF_FP32 = 2.0**-24
# Full rank: every block norm at R = h, [gate | up] at the ratio 1.0 (k = its local width).
FULL_RANK = StoragePolicy(norm=f"lowrank:{SMALL.hidden_size}", swiglu="lowrank:1.0")


def _model(dtype, full, storage_policy=None, sequence_parallel=False):
    return loaded_llama(
        SMALL, full, dtype, sequence_parallel=sequence_parallel, storage_policy=storage_policy
    )


def _full_rank_run(full, sequence_parallel=False):
    tokens, labels = next_token_batch(SMALL)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        for name, policy in (("keep", None), ("lowrank", FULL_RANK)):
            model = _model(dtype, full, policy, sequence_parallel)
            out[dtype, name] = loss_and_full_grads(model, tokens, labels)
        out[dtype, "weights"] = full_state_dict(model)
    return out


def _assert_full_rank_exact(results):
    for dtype in (torch.float32, torch.bfloat16):
        assert_exact_loss_and_as_accurate_as_keep(
            results[dtype, "lowrank"],
            results[dtype, "keep"],
            results[dtype, "weights"],
            SMALL,
            dtype,
            dtype,
        )


def test_full_rank_gives_the_exact_gradients(single_rank):
    _assert_full_rank_exact(_full_rank_run(random_full_weights(SMALL, seed=1)))


def _tp_run(rank, world_size, sequence_parallel, full):
    state.initialize_model_parallel(world_size)
    out = _full_rank_run(full, sequence_parallel)
    return out if rank == 0 else None


@pytest.mark.distributed
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2_sp"])
def test_full_rank_gives_the_exact_gradients_at_tp2(tmp_path, sequence_parallel):
    full = random_full_weights(SMALL, seed=1)
    _assert_full_rank_exact(run_distributed(_tp_run, 2, tmp_path, sequence_parallel, full)[0])


# ----------------------------------------------------------------------------- low rank


def _norm_into_qkv(policy: str):
    """The first block's input norm (weight 1 + 0.1 N(0, 1)) under ``memory.policy.norm =
    policy`` applied to a random ``x`` [s, b, h], and the qkv linear that reads its output
    ``y``; the generator goes on to draw the caller's gradients."""
    model = build_llama(SMALL, init_seed=0, storage_policy=StoragePolicy(norm=policy))
    norm, qkv = model.layers[0].input_norm, model.layers[0].attention.qkv
    generator = torch.Generator().manual_seed(5)
    h = SMALL.hidden_size
    norm.weight.data = 1 + 0.1 * torch.randn(h, generator=generator)
    x = torch.randn(16, 2, h, generator=generator).requires_grad_(True)  # [s, b, h]
    return norm, qkv, x, norm(x), generator


def test_norm_and_linear_at_low_rank_are_the_float64_backward_at_the_reconstruction(
    single_rank,
):
    """``norm: lowrank:8``: the norm keeps ``(L, Q)``, qkv keeps the same two tensors; qkv's
    input gradient is exact, its weight gradient and the norm's backward read ``L Q^T``."""
    norm, qkv, x, y, generator = _norm_into_qkv("lowrank:8")
    h = SMALL.hidden_size
    packer, (low, q) = y.stored_as  # [N, k], [h, k]
    seen = {}
    y.register_hook(lambda grad: seen.setdefault("dy", grad))
    out, _ = qkv(y, stored=(packer, (low, q)))
    grad_out = torch.randn(out.shape, generator=generator)
    out.backward(grad_out)

    # LoRAct's rule: the gradient into y is g W, bit for bit (no factor involved).
    weight = qkv.weight.detach()
    assert torch.equal(seen["dy"], grad_out.matmul(weight))

    n_tokens, k, m = low.shape[0], low.shape[1], weight.shape[0]
    g = grad_out.double().reshape(-1, m)
    low64, q64, w64, weight64 = (
        low.double(),
        q.double(),
        norm.weight.detach().double(),
        weight.double(),
    )
    y_hat = low64 @ q64.t()  # [N, h], the reconstruction both backwards read
    x64 = x.detach().double().reshape(-1, h)
    rstd = torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + norm.eps)
    dy = g @ weight64
    x_hat = y_hat / w64
    dn = dy * w64
    dx64 = rstd * (dn - x_hat * (dn * x_hat).mean(-1, keepdim=True))
    dnorm64 = (dy * x_hat).sum(0)
    dweight64 = g.t() @ y_hat

    # Rounding bounds (first order, u = 2^-24), from the reduction lengths: the weight gradient
    # (g^T L) Q^T reduces over N then k; the norm reads L Q^T (length k) / w, g W (length m),
    # rstd (length h) and its own mean over h; the norm-weight gradient then sums N terms.
    u = UNIT_ROUNDOFF_FP32
    x_hat_abs = (low64.abs() @ q64.abs().t()) / w64.abs()
    dn_abs = (g.abs() @ weight64.abs()) * w64.abs()
    bound_weight = (n_tokens + k + 2) * u * (g.abs().t() @ low64.abs() @ q64.abs().t())
    bound_x = (
        (m + k + h + 8) * u * rstd * (dn_abs + x_hat_abs * (dn_abs * x_hat_abs).mean(-1, True))
    )
    bound_norm = (n_tokens + m + k + 4) * u * ((g.abs() @ weight64.abs()) * x_hat_abs).sum(0)
    assert ((qkv.weight.grad.double() - dweight64).abs() <= bound_weight).all()
    assert ((x.grad.double().reshape(-1, h) - dx64).abs() <= bound_x).all()
    assert ((norm.weight.grad.double() - dnorm64).abs() <= bound_norm).all()
    # Not vacuous: rank 8 of 64 random tokens is far from y, and so are the gradients.
    y64 = y.detach().double().reshape(-1, h)
    assert (y64 - y_hat).norm() > 0.1 * y64.norm()
    assert (g.t() @ y64 - dweight64).abs().max() > 1e3 * bound_weight.max()


@DTYPES
def test_fc2_at_low_rank_is_the_keep_backward_at_the_reconstruction(single_rank, dtype):
    """``swiglu: lowrank:0.25``: FC2 keeps the factors of ``[gate | up]``; its backward is the
    ``keep`` backward run on ``L Q^T``, bit for bit, and its forward reads the exact tensor."""
    fc2 = build_llama(SMALL, init_seed=0).layers[0].mlp.fc2.to(dtype)
    f = SMALL.ffn_hidden_size
    generator = torch.Generator().manual_seed(1)
    gate_up = torch.randn(16, 2, 2 * f, generator=generator).to(dtype)  # [s, b, 2f]
    grad_out = torch.randn(16, 2, SMALL.hidden_size, generator=generator).to(dtype)
    storage = StoragePolicy(swiglu="lowrank:0.25").packer("swiglu")
    assert isinstance(storage, LowRankStorage) and storage.width(2 * f) == 2 * f // 4
    reconstruction = storage.unpack(storage.pack(gate_up), gate_up)

    out, d_source, d_weight = fc2_grads(fc2, gate_up, grad_out, storage)
    out_keep, *_ = fc2_grads(fc2, gate_up, grad_out, None)
    assert torch.equal(out, out_keep)
    _, d_source_at, d_weight_at = fc2_grads(fc2, reconstruction, grad_out, None)
    assert torch.equal(d_source, d_source_at) and torch.equal(d_weight, d_weight_at)
    assert not torch.equal(reconstruction, gate_up)  # rank 64 of 256 columns: not exact


def test_low_rank_model_forward_is_unchanged(single_rank):
    """Only what backward reads changes: the loss is bit-identical to ``keep``'s and every
    gradient is finite."""
    full = random_full_weights(SMALL, seed=1)
    tokens, labels = next_token_batch(SMALL)
    keep_loss, _ = loss_and_full_grads(_model(torch.float32, full), tokens, labels)
    policy = StoragePolicy(norm="lowrank:0.125", swiglu="lowrank:16")
    loss, grads = loss_and_full_grads(_model(torch.float32, full, policy), tokens, labels)
    assert torch.equal(loss, keep_loss)
    assert all(torch.isfinite(grad).all() for grad in grads.values())


# ----------------------------------------------------------------------------- 8-bit norm


@pytest.mark.parametrize("policy", ["int8", "fp8"])
def test_norm_8bit_backward_is_the_float64_backward_at_the_dequantised_output(single_rank, policy):
    """``norm: int8`` / ``fp8``: the norm keeps its output in 8 bits and qkv keeps the same
    codes and scales. qkv's weight gradient is the ``keep`` layer's at the dequantised output,
    bit for bit; the norm's gradients equal the float64 closed form at it within rounding."""
    norm, qkv, x, y, generator = _norm_into_qkv(policy)
    h = SMALL.hidden_size
    packer, packed = y.stored_as
    dequantised = packer.unpack(packed, y)
    out, _ = qkv(y, stored=(packer, packed))
    grad_out = torch.randn(out.shape, generator=generator)
    out.backward(grad_out)
    weight_grad = qkv.weight.grad.clone()

    qkv.weight.grad = None
    keep_out, _ = qkv(dequantised.detach())
    keep_out.backward(grad_out)
    assert torch.equal(weight_grad, qkv.weight.grad)  # the keep layer at the dequantised y
    assert not torch.equal(dequantised, y)

    m = qkv.weight.shape[0]
    g = grad_out.double().reshape(-1, m)
    w64, weight64 = norm.weight.detach().double(), qkv.weight.detach().double()
    y_hat = dequantised.detach().double().reshape(-1, h)
    x64 = x.detach().double().reshape(-1, h)
    rstd = torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + norm.eps)
    dy, x_hat = g @ weight64, y_hat / w64
    dn = dy * w64
    dx64 = rstd * (dn - x_hat * (dn * x_hat).mean(-1, keepdim=True))
    # Rounding (u = 2^-24): g W (length m), rstd (length h), the norm's mean over h; the
    # norm-weight gradient sums N terms.
    u = UNIT_ROUNDOFF_FP32
    x_hat_abs, dn_abs = x_hat.abs(), (g.abs() @ weight64.abs()) * w64.abs()
    bound_x = (m + h + 8) * u * rstd * (dn_abs + x_hat_abs * (dn_abs * x_hat_abs).mean(-1, True))
    bound_norm = (g.shape[0] + m + 4) * u * ((g.abs() @ weight64.abs()) * x_hat_abs).sum(0)
    assert ((x.grad.double().reshape(-1, h) - dx64).abs() <= bound_x).all()
    assert ((norm.weight.grad.double() - (dy * x_hat).sum(0)).abs() <= bound_norm).all()


#: The 8-bit policies run at TP 1 / 2 / 2 + SP: 8-bit norms (shared with qkv / fc1), and the
#: 8-bit attention (on CPU: backward from its packed output, which proj keeps too, and the
#: log-sum-exp; each rank packs its own heads' q, k, v and its slice of the output).
POLICIES_8BIT = {
    "norm": StoragePolicy(norm="int8", swiglu="int8"),
    "attention": StoragePolicy(attention="int8"),
}


def _run_8bit(sequence_parallel=False, kind="norm"):
    """Loss and full gradients of keep and of an 8-bit policy (fp32), on this TP layout."""
    full = random_full_weights(SMALL, seed=1)
    tokens, labels = next_token_batch(SMALL)
    out = {}
    for name, policy in (("keep", None), ("int8", POLICIES_8BIT[kind])):
        model = _model(torch.float32, full, policy, sequence_parallel)
        out[name] = loss_and_full_grads(model, tokens, labels)
    return out


def _assert_8bit_close(results):
    """Forward untouched (bit-identical loss); gradients within the 8-bit element error 2^-4
    of ``keep``'s in relative Frobenius norm (as tests/unit/test_storage_policies.py holds the
    other 8-bit kinds; a mis-gathered sequence shard would be an O(1) error)."""
    (loss, grads), (keep_loss, keep_grads) = results["int8"], results["keep"]
    assert torch.equal(loss, keep_loss)
    flat = torch.cat([grads[name].reshape(-1) for name in sorted(keep_grads)])
    exact = torch.cat([keep_grads[name].reshape(-1) for name in sorted(keep_grads)])
    assert_within_8bit_error(flat, exact)


@pytest.mark.parametrize("kind", list(POLICIES_8BIT))
def test_8bit_model_gradients_close(single_rank, kind):
    _assert_8bit_close(_run_8bit(kind=kind))


def _tp_8bit_run(rank, world_size, sequence_parallel, kind):
    state.initialize_model_parallel(world_size)
    out = _run_8bit(sequence_parallel, kind)
    return out if rank == 0 else None


@pytest.mark.distributed
@pytest.mark.parametrize("kind", list(POLICIES_8BIT))
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2_sp"])
def test_8bit_model_gradients_close_at_tp2(tmp_path, sequence_parallel, kind):
    _assert_8bit_close(run_distributed(_tp_8bit_run, 2, tmp_path, sequence_parallel, kind)[0])
