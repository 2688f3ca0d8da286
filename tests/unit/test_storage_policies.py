"""8-bit storage policies (``memory.policy``: ``int8`` / ``fp8`` for ``swiglu`` and ``attention``).

References:

- **Packing**: per element ``|x - unpack(pack(x))|`` within the closed-form bound of
  :func:`actcomp_dist.storage.element_error_bound` (int8: half a step ``absmax / 254`` per group;
  fp8 e4m3: ``2^-4 |x|`` plus ``2^-10`` of the row scale), bytes exactly ``saved_bytes``.
- **Mechanism**: the 8-bit backward is the exact backward evaluated at the dequantised copy,
  bit for bit (FC2 after the SwiGLU; on the CPU flash kernel SDPA's backward op from the
  dequantised q, k, v, o and the forward's log-sum-exp, elsewhere SDPA's backward at the
  dequantised q, k, v after its forward again), and forward results are unchanged. With exact
  stored tensors the stored-output backward is SDPA's own, bit for bit.
- **Error against float64**: the exact float64 gradient at the dequantised copy differs from
  the exact float64 gradient at the original by at most a bound derived from the element
  bound (SwiGLU: closed form through ``silu``; attention: the gradient map's Jacobian along the
  segment between the two points). Together with the bit-for-bit mechanism this bounds the
  error of the 8-bit training step against float64.
- **Config**: unknown kinds and policies, policies a kind cannot take yet, and 8-bit storage
  on the naive block are refused with one line naming the field.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from actcomp_dist.ablation.variants import VariantError, parse_variant
from actcomp_dist.models import build_llama, get_model_config
from actcomp_dist.models.llama import swiglu
from actcomp_dist.storage import (
    IMPLEMENTED,
    LINEAR_SITES,
    Quantizer,
    StoragePolicy,
    attention_with_stored_output,
    element_error_bound,
    stores_attention_output,
)
from actcomp_dist.training.config import ConfigError, run_config_from_dict
from tests.helpers.storage import fc2_grads
from tests.helpers.tolerances import assert_within_8bit_error

POLICIES_8BIT = ("int8", "fp8")
# max |silu'(x)| = 1.0998 (at x = 2.3994) and max |silu''(x)| = 0.5 (at x = 0).
SILU_PRIME_MAX, SILU_SECOND_MAX = 1.1, 0.5
UNIT_ROUNDOFF_FP32 = 2.0**-24


def _quantizer(policy):
    return StoragePolicy(swiglu=policy).quantizer("swiglu")


def _roundtrip(policy, x):
    quantizer = _quantizer(policy)
    return quantizer.unpack(quantizer.pack(x), x)


def _spread(shape, seed):
    """Values over several orders of magnitude, an all-zero row and a row with one outlier:
    what stresses a shared scale."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator) * 10.0 ** torch.randint(
        -3, 2, shape, generator=generator
    )
    x.view(-1, shape[-1])[0] = 0.0
    x.view(-1, shape[-1])[1, 3] = 1e3
    return x


# ----------------------------------------------------------------------------- packing


@pytest.mark.parametrize("policy", POLICIES_8BIT)
@pytest.mark.parametrize("shape", [(6, 128), (4, 3, 96), (8, 16)])
def test_packing_error_within_element_bound_and_bytes_exact(policy, shape):
    x = _spread(shape, seed=sum(shape))
    quantizer = _quantizer(policy)
    packed = quantizer.pack(x)
    restored = quantizer.unpack(packed, x)
    assert restored.shape == x.shape and restored.dtype == x.dtype
    error = (restored.double() - x.double()).abs()
    assert (error <= element_error_bound(policy, x)).all()
    assert torch.equal(restored.view(-1, shape[-1])[0], torch.zeros(shape[-1]))  # zero row
    nbytes = sum(t.untyped_storage().nbytes() for t in packed)
    assert nbytes == quantizer.saved_bytes(x.numel(), shape[-1])


@pytest.mark.parametrize("policy", POLICIES_8BIT)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_packing_is_the_plain_formula_and_leaves_the_input(policy, dtype):
    """The packer's fused passes give the codes and scales of the formula written plainly:
    ``s = max(|x.float()|) / L`` per group (int8, L = 127) or row (fp8, L = 448), codes
    ``round(x * L / max)`` (int8) or the e4m3 cast (fp8); a non-contiguous input too, and the
    input is not modified (the packer scales a bf16 input's fp32 copy in place)."""
    x = _spread((4, 6, 128), seed=7).to(dtype).transpose(0, 1)  # not contiguous
    before = x.clone()
    codes, scale = _quantizer(policy).pack(x)
    width, limit = (64, 127.0) if policy == "int8" else (128, 448.0)
    rows = x.float().reshape(-1, width)
    absmax = rows.abs().amax(-1, keepdim=True).clamp_min(2.0**-100)
    plain = rows * (limit / absmax)
    if policy == "int8":
        assert torch.equal(codes, plain.round().to(torch.int8))
    else:
        expected = plain.to(torch.float8_e4m3fn)
        assert torch.equal(codes.view(torch.uint8), expected.view(torch.uint8))
    assert torch.equal(scale, absmax / limit)
    assert torch.equal(x, before)


# ----------------------------------------------------------------------------- SwiGLU + FC2


def _swiglu_grads64(gate_up, weight, grad_out):
    """Exact float64 gradients of ``sum(grad_out * (swiglu(gate_up) @ weight^T))``."""
    source = gate_up.double().requires_grad_(True)
    weight = weight.double().requires_grad_(True)
    out = swiglu(source) @ weight.t()
    out.backward(grad_out.double())
    return source.grad, weight.grad


@pytest.mark.parametrize("policy", POLICIES_8BIT)
def test_swiglu_8bit_backward_is_exact_backward_at_dequantised_and_bounded(single_rank, policy):
    config = get_model_config("tiny", seq_length=16)
    fc2 = build_llama(config, init_seed=0).layers[0].mlp.fc2
    f = config.ffn_hidden_size
    generator = torch.Generator().manual_seed(1)
    gate_up = torch.randn(16, 2, 2 * f, generator=generator)  # [s, b, 2f]
    grad_out = torch.randn(16, 2, config.hidden_size, generator=generator)
    storage = _quantizer(policy)
    dequantised = _roundtrip(policy, gate_up)

    out, d_source, d_weight = fc2_grads(fc2, gate_up, grad_out, storage)
    out_keep, d_source_keep, d_weight_keep = fc2_grads(fc2, gate_up, grad_out, None)
    assert torch.equal(out, out_keep)  # forward reads the exact [gate | up]
    # Mechanism: the keep backward run on the dequantised copy, bit for bit.
    _, d_source_deq, d_weight_deq = fc2_grads(fc2, dequantised, grad_out, None)
    assert torch.equal(d_source, d_source_deq) and torch.equal(d_weight, d_weight_deq)
    # Against float64 at the original point: the 8-bit error and rounding.
    d_source64, d_weight64 = _swiglu_grads64(gate_up, fc2.weight.detach(), grad_out)
    d_source64_deq, d_weight64_deq = _swiglu_grads64(dequantised, fc2.weight.detach(), grad_out)

    # Bound of the 8-bit error (a = gate, b = up; delta the element bounds): with
    # h = silu(a) b, |h(a^, b^) - h(a, b)| <= max|silu'| da (|b| + db) + |silu(a)| db;
    # dW = g^T h, so |dW^ - dW| <= |g|^T dh. dX = g W is exact; d up = dX silu(a) changes by
    # <= |dX| max|silu'| da, d gate = dX b silu'(a) by <= |dX| (max|silu'| db + max|silu''| da
    # (|b| + db)).
    delta = element_error_bound(policy, gate_up)
    a, b = gate_up.double().chunk(2, dim=-1)
    da, db = delta.chunk(2, dim=-1)
    dh = SILU_PRIME_MAX * da * (b.abs() + db) + F.silu(a).abs() * db
    g = grad_out.double().reshape(-1, config.hidden_size)
    bound_weight = g.abs().t() @ dh.reshape(-1, f)
    dx = (g @ fc2.weight.detach().double()).abs().reshape(dh.shape)
    bound_source = torch.cat(
        [
            dx * (SILU_PRIME_MAX * db + SILU_SECOND_MAX * da * (b.abs() + db)),
            dx * SILU_PRIME_MAX * da,
        ],
        dim=-1,
    )
    assert ((d_weight64_deq - d_weight64).abs() <= bound_weight).all()
    assert ((d_source64_deq - d_source64).abs() <= bound_source).all()
    # fp32 rounding of the 8-bit step against float64 at the dequantised point: reductions of
    # length N (dW) and h (dX), bounded by (k + 8) u sum |terms| (a few extra roundings for
    # silu, the products and the casts).
    n_tokens = g.shape[0]
    h64 = swiglu(dequantised.double()).reshape(-1, f)
    rounding_weight = (n_tokens + 8) * UNIT_ROUNDOFF_FP32 * (g.abs().t() @ h64.abs())
    assert ((d_weight.double() - d_weight64_deq).abs() <= rounding_weight).all()
    a_deq, b_deq = dequantised.double().chunk(2, dim=-1)
    dx_abs = (g.abs() @ fc2.weight.detach().double().abs()).reshape(dh.shape)
    factor = torch.cat(
        [b_deq.abs() * SILU_PRIME_MAX, F.silu(a_deq).abs() + 1.0], dim=-1
    )  # |d(swiglu)/d(gate, up)| (with a margin for the silu rounding)
    rounding_source = (
        (config.hidden_size + 8) * UNIT_ROUNDOFF_FP32 * torch.cat([dx_abs, dx_abs], dim=-1) * factor
    )
    assert ((d_source.double() - d_source64_deq).abs() <= rounding_source).all()
    # The bound is not vacuous: the 8-bit error is a visible fraction of it.
    assert (d_weight64_deq - d_weight64).abs().max() > 1e-3 * bound_weight.max()


# ----------------------------------------------------------------------------- attention


def _attention64(q, k, v, groups_per_head):
    """Causal attention in float64 written out (GQA: query head i reads group i // ratio)."""
    k = k.repeat_interleave(groups_per_head, dim=1)
    v = v.repeat_interleave(groups_per_head, dim=1)
    s = q.shape[-2]
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    mask = torch.ones(s, s, dtype=torch.bool).tril()
    return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v


def _attention_backward64(q, k, v, o, lse, grad_out, groups_per_head):
    """SDPA's backward from the stored ``(q, k, v, o, lse)``, written out (what the flash
    kernel's backward computes): ``P = exp(q k^T / sqrt(d) - lse)`` (causal), ``dV = P^T dO``,
    ``dS = P (dO V^T - rowsum(dO o))``, ``dQ = dS K / sqrt(d)``, ``dK = dS^T Q / sqrt(d)``;
    ``dK``, ``dV`` summed over the query heads of each group."""
    b, heads, s, d = q.shape
    kx = k.repeat_interleave(groups_per_head, dim=1)
    vx = v.repeat_interleave(groups_per_head, dim=1)
    scale = d**-0.5
    mask = torch.ones(s, s, dtype=torch.bool).tril()
    p = torch.exp(q @ kx.transpose(-1, -2) * scale - lse[..., None]).masked_fill(~mask, 0.0)
    dv = p.transpose(-1, -2) @ grad_out
    ds = p * (grad_out @ vx.transpose(-1, -2) - (grad_out * o).sum(-1, keepdim=True))
    dq = ds @ kx * scale
    dk = ds.transpose(-1, -2) @ q * scale

    def per_group(t):
        return t.view(b, heads // groups_per_head, groups_per_head, s, d).sum(2)

    return dq, per_group(dk), per_group(dv)


def _heads_last(x, heads):
    s, b, width = x.shape
    return x.view(s, b, heads, width // heads).permute(1, 2, 0, 3)


class _ExactPacker(Quantizer):
    """Stores a copy: the stored-output backward on exact q, k, v, o."""

    name = "exact"

    def pack(self, x):
        return (x.detach().clone(),)

    def unpack(self, packed, like):
        return packed[0]

    def saved_bytes(self, numel, last_dim):
        raise NotImplementedError


ATTENTION_SHAPE = {"heads": 4, "groups": 2, "s": 8, "d": 16}


def _attention_inputs(dtype=torch.float32, seed=2):
    heads, groups, s, d = (ATTENTION_SHAPE[k] for k in ("heads", "groups", "s", "d"))
    generator = torch.Generator().manual_seed(seed)
    q, k, v = (
        torch.randn(1, n, s, d, generator=generator).to(dtype) for n in (heads, groups, groups)
    )
    grad_out = torch.randn(s, 1, heads * d, generator=generator).to(dtype)  # proj's layout
    return (q, k, v), grad_out


def _attention_grads(inputs, grad_out, quantizer=None):
    """Output [s, b, heads d] and input gradients: stored by ``quantizer``, or SDPA's own."""
    leaves = [t.detach().requires_grad_(True) for t in inputs]
    if quantizer is not None:
        out = attention_with_stored_output(*leaves, quantizer, enable_gqa=True)
    else:
        out4 = F.scaled_dot_product_attention(*leaves, is_causal=True, enable_gqa=True)
        b, heads, s, d = out4.shape
        out = out4.permute(2, 0, 1, 3).reshape(s, b, heads * d)
    out.backward(grad_out)
    return out, [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_attention_stored_output_backward_is_sdpa_backward_on_exact_inputs(dtype):
    """With exact q, k, v, o (a copying packer) the backward from the stored output and
    log-sum-exp is SDPA's own backward bit for bit (the kernel's forward and backward ops are
    the ones SDPA's autograd runs; GQA without an expanded copy)."""
    inputs, grad_out = _attention_inputs(dtype)
    assert stores_attention_output(*inputs, True, _ExactPacker())
    out, grads = _attention_grads(inputs, grad_out, _ExactPacker())
    out_sdpa, grads_sdpa = _attention_grads(inputs, grad_out)
    assert torch.equal(out, out_sdpa)
    for got, want in zip(grads, grads_sdpa, strict=True):
        assert torch.equal(got, want)


def test_attention_backward_formula_is_sdpa_gradient_in_float64():
    """The float64 formula the bound below differentiates is SDPA's gradient: at the exact
    output and log-sum-exp it equals autograd through the written-out float64 attention. Both
    are float64 (u = 1.1e-16) with reductions of length s = 8 and d = 16 over O(1) terms:
    their difference is ~1e-15; 1e-12 leaves room, a wrong term is O(1e-1)."""
    (q, k, v), grad_out = _attention_inputs(torch.float64)
    ratio = ATTENTION_SHAPE["heads"] // ATTENTION_SHAPE["groups"]
    heads = ATTENTION_SHAPE["heads"]
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    out = _attention64(*leaves, ratio)
    grad4 = _heads_last(grad_out, heads)
    out.backward(grad4)
    s, d = q.shape[-2:]
    kx = k.repeat_interleave(ratio, dim=1)
    scores = (q @ kx.transpose(-1, -2) / d**0.5).masked_fill(
        ~torch.ones(s, s, dtype=torch.bool).tril(), float("-inf")
    )
    lse = scores.logsumexp(-1)
    formula = _attention_backward64(q, k, v, out.detach(), lse, grad4, ratio)
    for got, leaf in zip(formula, leaves, strict=True):
        assert (got - leaf.grad).abs().max() <= 1e-12


@pytest.mark.parametrize("policy", POLICIES_8BIT)
def test_attention_8bit_backward_from_stored_output_and_bounded(policy):
    """8-bit q, k, v and o with the forward's exact log-sum-exp, no SDPA forward again.

    Mechanism: forward is SDPA's (bit for bit), proj's copy of the output is the attention's
    packed output (the same tensors), and backward is the flash kernel's backward op on the
    dequantised q, k, v, o with the forward's log-sum-exp, bit for bit.

    Error against float64: the gradient map ``G(q, k, v, o)`` at the forward's log-sum-exp
    (:func:`_attention_backward64`), at the stored point and at the dequantised one. By the
    mean value theorem ``|G(x^) - G(x)| <= sup_t |J(x + t (x^ - x))| |x^ - x|``; the sup over
    5 points of the segment (G is smooth, the segment short), ``|x^ - x|`` by the element
    bound of each packed tensor (o's in its packed layout, proj's). The softmax from the
    dequantised q, k and the exact lse no longer sums to one and ``rowsum(dO o^)`` is not the
    re-run's: both are first-order in the packing error, which is what the bound charges.
    Together with the bit-for-bit mechanism this bounds the 8-bit step against float64 (the
    fp32 rounding is the kernel's, as ``keep``'s)."""
    inputs, grad_out = _attention_inputs()
    quantizer = StoragePolicy(attention=policy).quantizer("attention")
    heads = ATTENTION_SHAPE["heads"]
    ratio = heads // ATTENTION_SHAPE["groups"]
    out, grads_8bit = _attention_grads(inputs, grad_out, quantizer)
    out_keep, _ = _attention_grads(inputs, grad_out)
    assert torch.equal(out, out_keep)  # forward is SDPA's
    stored_by, packed = out.stored_as
    assert stored_by is quantizer
    assert all(torch.equal(a, b) for a, b in zip(packed, quantizer.pack(out), strict=True))

    dequantised = [quantizer.unpack(quantizer.pack(t), t) for t in inputs]
    out_deq = quantizer.unpack(packed, out)  # [s, b, heads d]
    _, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(*inputs, is_causal=True)
    want = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        _heads_last(grad_out, heads), *dequantised, _heads_last(out_deq, heads), lse, 0.0, True
    )
    for got, expected in zip(grads_8bit, want, strict=True):
        assert torch.equal(got, expected)

    stored = [*inputs, out.detach()]
    restored = [*dequantised, out_deq]
    sizes = [t.numel() for t in stored]
    lse64, grad64 = lse.double(), _heads_last(grad_out.double(), heads)

    def gradient_map(flat):
        parts = [p.view_as(t) for p, t in zip(flat.split(sizes), stored, strict=True)]
        q, k, v, o = *parts[:3], _heads_last(parts[3], heads)
        grads = _attention_backward64(q, k, v, o, lse64, grad64, ratio)
        return torch.cat([g.reshape(-1) for g in grads])

    x = torch.cat([t.double().reshape(-1) for t in stored])
    x_deq = torch.cat([t.double().reshape(-1) for t in restored])
    delta = torch.cat([element_error_bound(policy, t).reshape(-1) for t in stored])
    jacobians = [
        torch.autograd.functional.jacobian(gradient_map, x + t * (x_deq - x), vectorize=True).abs()
        for t in (0.0, 0.25, 0.5, 0.75, 1.0)
    ]
    bound = torch.stack(jacobians).amax(0) @ delta
    error = (gradient_map(x_deq) - gradient_map(x)).abs()
    assert (error <= bound).all()
    assert error.max() > 1e-3 * bound.max()  # not vacuous


@pytest.mark.parametrize("policy", POLICIES_8BIT)
def test_attention_8bit_forward_again_off_the_flash_kernel(policy):
    """Where the kernel keeps no log-sum-exp (here the math kernel; on CUDA always) the
    attention keeps packed q, k, v only and backward is SDPA's backward at the dequantised
    copies, bit for bit; proj packs the output itself (``stored_as`` is ``None``)."""
    inputs, grad_out = _attention_inputs()
    quantizer = StoragePolicy(attention=policy).quantizer("attention")
    with sdpa_kernel(SDPBackend.MATH):
        assert not stores_attention_output(*inputs, True, quantizer)
        out, grads_8bit = _attention_grads(inputs, grad_out, quantizer)
        out_keep, _ = _attention_grads(inputs, grad_out)
        dequantised = [quantizer.unpack(quantizer.pack(t), t) for t in inputs]
        _, grads_deq = _attention_grads(dequantised, grad_out)
    assert out.stored_as is None
    assert torch.equal(out, out_keep)
    for got, want in zip(grads_8bit, grads_deq, strict=True):
        assert torch.equal(got, want)
    # Autocast casts SDPA's inputs, not the kernel's op: the forward again keeps SDPA's result.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not stores_attention_output(*inputs, True, quantizer)
        out, _ = _attention_grads(inputs, grad_out, quantizer)
        assert out.dtype == torch.bfloat16 and out.stored_as is None


# ----------------------------------------------------------------------------- the model


@pytest.mark.parametrize("policy", POLICIES_8BIT)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_model_forward_is_unchanged_and_gradients_close(single_rank, policy, dtype):
    """Only what backward reads is 8-bit: the loss is bit-identical to ``keep``'s; the
    gradients of the whole model stay close to ``keep``'s (relative Frobenius error below the
    8-bit element error, 2^-4; the per-op bounds are tested above)."""
    config = get_model_config("tiny", seq_length=32)
    generator = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, config.vocab_size, (2, 32), generator=generator)
    labels = torch.randint(0, config.vocab_size, (2, 32), generator=generator)
    results = {}
    for name, storage in (
        ("keep", None),
        (policy, StoragePolicy(attention=policy, swiglu=policy)),
    ):
        model = build_llama(config, init_seed=0, storage_policy=storage, loss_chunk_tokens=16)
        for param in model.parameters():
            param.data = param.data.to(dtype)
        loss = model.loss(tokens, labels)
        loss.backward()
        results[name] = (
            loss.detach(),
            torch.cat([p.grad.float().reshape(-1) for p in model.parameters()]),
        )
    assert torch.equal(results["keep"][0], results[policy][0])
    exact, quantised = results["keep"][1], results[policy][1]
    assert_within_8bit_error(quantised, exact, policy)


def test_naive_block_refuses_8bit_storage(single_rank):
    with pytest.raises(ValueError, match=r"needs the memory-efficient block"):
        build_llama("tiny", efficient_ops=False, storage_policy=StoragePolicy(swiglu="int8"))


# ----------------------------------------------------------------------------- config, variants


def test_policy_config_defaults_and_validation():
    memory = run_config_from_dict({}).memory
    assert memory.policy == {} and memory.storage_policy == StoragePolicy()
    assert StoragePolicy().is_exact
    set_ = run_config_from_dict({"memory": {"policy": {"swiglu": "int8", "attention": "fp8"}}})
    assert set_.memory.storage_policy.changes() == {"attention": "fp8", "swiglu": "int8"}
    cases = {
        "unknown kind": ({"mlp": "int8"}, "memory.policy has unknown kind(s) ['mlp']; valid kinds"),
        "unknown policy": ({"swiglu": "int4"}, "memory.policy.swiglu='int4' is not a policy"),
        "not a string": ({"swiglu": 8}, "memory.policy.swiglu=8 is not a policy"),
        "not implemented": (
            {"qkv": "int8"},
            "memory.policy.qkv='int8' is not implemented yet for kind 'qkv'; implemented: "
            "['keep', 'compress']",
        ),
        "offload": ({"fc1": "offload"}, "memory.policy.fc1='offload' is not implemented"),
        "lowrank": ({"attention": "lowrank:8"}, "'lowrank:8' is not implemented yet"),
        "lowrank rank": ({"norm": "lowrank:1.5"}, "memory.policy.norm='lowrank:1.5' is not a"),
    }
    for name, (policy, message) in cases.items():
        with pytest.raises(ConfigError) as error:
            run_config_from_dict({"memory": {"policy": policy}})
        assert message in str(error.value), name
    with pytest.raises(ConfigError, match=r"memory.policy=.*needs memory.efficient_ops=true"):
        run_config_from_dict({"memory": {"efficient_ops": False, "policy": {"swiglu": "int8"}}})
    with pytest.raises(ConfigError, match=r"memory.policy='int8' must be an object"):
        run_config_from_dict({"memory": {"policy": "int8"}})
    assert set(IMPLEMENTED["attention"]) == {"keep", "int8", "fp8", "recompute", "offload"}
    assert set(IMPLEMENTED["swiglu"]) == {
        "keep",
        "int8",
        "fp8",
        "lowrank:R",
        "recompute",
        "offload",
    }
    assert set(IMPLEMENTED["norm"]) == {"keep", "int8", "fp8", "lowrank:R", "offload"}
    assert set(IMPLEMENTED["block_input"]) == {"keep", "int8", "fp8", "lowrank:R", "offload"}
    assert all(set(IMPLEMENTED[site]) == {"keep", "compress"} for site in LINEAR_SITES)


def test_storage_variants():
    cases = {
        "int8": ("int8", "none", "none"),
        "fp8+ac_selective": ("ac_selective+fp8", "none", "selective"),
        "compact:0.25+int8": ("compact:0.25+int8", "compact", "none"),
        "int8+compact:0.25+ac_full": ("compact:0.25+ac_full+int8", "compact", "full"),
        "ac_lowrank:0.25": ("ac_lowrank:0.25", "none", "none"),
        "ac_lowrank:64+ac_selective": ("ac_selective+ac_lowrank:64", "none", "selective"),
        "lowrank:0.125+ac_lowrank:8": ("lowrank:0.125+ac_lowrank:8", "lowrank", "none"),
        # ac_full_BLOCK: full checkpointing keeping the block input packed (block_input).
        "ac_full_lowrank:0.25": ("ac_full_lowrank:0.25", "none", "full"),
        "compact:0.25+ac_full_int8": ("compact:0.25+ac_full_int8", "compact", "full"),
        "ac_full_fp8+int8": ("ac_full_fp8+int8", "none", "full"),
        # Pre-norm sublayer checkpointing; with norm factors, LoRAct's pre-norm mode.
        "ac_sublayer": ("ac_sublayer", "none", "sublayer"),
        "ac_sublayer+ac_lowrank:0.125": ("ac_sublayer+ac_lowrank:0.125", "none", "sublayer"),
        "compact:0.25+ac_sublayer": ("compact:0.25+ac_sublayer", "compact", "sublayer"),
        # recompute_KIND: memory.policy.KIND = recompute.
        "recompute_swiglu": ("recompute_swiglu", "none", "none"),
        "compact:0.25+recompute_attention": ("compact:0.25+recompute_attention", "compact", "none"),
        # STORAGE@KIND/KIND: 8 bits on the kinds named, listed in KINDS order.
        "int8@swiglu/norm": ("int8@norm/swiglu", "none", "none"),
        "fp8@norm+ac_selective": ("ac_selective+fp8@norm", "none", "selective"),
        "int8@swiglu/attention": ("int8", "none", "none"),
        "compact:0.25+int8@norm/attention/swiglu": (
            "compact:0.25+int8@norm/attention/swiglu",
            "compact",
            "none",
        ),
    }
    for text, (name, method, ac_mode) in cases.items():
        variant = parse_variant(text)
        assert (variant.name, variant.method, variant.ac_mode) == (name, method, ac_mode), text
        assert parse_variant(variant.name) == variant
    raw = parse_variant("fp8").apply({"memory": {"policy": {"norm": "keep"}}})
    assert raw["memory"]["policy"] == {"norm": "keep", "attention": "fp8", "swiglu": "fp8"}
    assert parse_variant("int8").storage_policy({}) == StoragePolicy(
        attention="int8", swiglu="int8"
    )
    assert parse_variant("none").storage_policy({"swiglu": "fp8"}) == StoragePolicy(swiglu="fp8")
    assert parse_variant("int8@swiglu/norm").storage_policy({"attention": "fp8"}) == StoragePolicy(
        norm="int8", attention="fp8", swiglu="int8"
    )
    assert parse_variant("int8@norm/swiglu").slug == "int8-norm-swiglu"
    # ac_lowrank:R: LoRAct's norm and act_fn modes; the compression method lowrank is separate.
    assert parse_variant("ac_lowrank:0.25").storage_policy({"attention": "int8"}) == StoragePolicy(
        norm="lowrank:0.25", swiglu="lowrank:0.25", attention="int8"
    )
    raw = parse_variant("lowrank:0.125+ac_lowrank:8").apply({})
    assert raw["compression"]["method"] == "lowrank" and raw["compression"]["rank"] == 0.125
    assert raw["memory"]["policy"] == {"norm": "lowrank:8", "swiglu": "lowrank:8"}
    assert parse_variant("ac_full_lowrank:16+ac_lowrank:8").storage_policy({}) == StoragePolicy(
        block_input="lowrank:16", norm="lowrank:8", swiglu="lowrank:8"
    )
    assert parse_variant("recompute_swiglu").storage_policy({}) == StoragePolicy(swiglu="recompute")
    raw = parse_variant("compact:0.25+ac_full_int8").apply({"memory": {"policy": {"norm": "fp8"}}})
    assert raw["activation_checkpointing"]["mode"] == "full"
    assert raw["memory"]["policy"] == {"norm": "fp8", "block_input": "int8"}
    for bad, message in (
        (
            "ac_full_int4",
            "'ac_full_int4' is not ac_full_int8, ac_full_fp8, ac_full_offload or ac_full_lowrank",
        ),
        (
            "ac_full_lowrank:1.5",
            "is not ac_full_int8, ac_full_fp8, ac_full_offload or ac_full_lowrank:RANK",
        ),
        ("ac_full_int8+ac_selective", "names two checkpointing modes"),
        ("ac_full_fp8+naive", "ac_full_fp8 packs the block input, which needs the memory-eff"),
        ("ac_sublayer+naive", "ac_sublayer re-runs each sublayer from what the memory-efficient"),
        ("int8+fp8", "at most one of ['int8', 'fp8', 'offload']"),
        ("int8+naive", "int8 storage needs the memory-efficient block"),
        (
            "ac_lowrank:8+int8",
            "at most one of ['int8', 'fp8', 'offload'] (or their @KIND/KIND forms)",
        ),
        (
            "int8@norm+fp8@swiglu",
            "at most one of ['int8', 'fp8', 'offload'] (or their @KIND/KIND forms)",
        ),
        ("int8@", "'int8@' needs int8@KIND/KIND... with distinct KINDs from ['norm', 'attent"),
        ("int8@qkv", "'int8@qkv' needs int8@KIND/KIND... with distinct KINDs from ['norm', 'a"),
        ("fp8@norm/norm", "'fp8@norm/norm' needs fp8@KIND/KIND... with distinct KINDs"),
        ("int8@norm+naive", "int8@norm storage needs the memory-efficient block"),
        ("offload@norm", "'offload@norm': offload takes no @KIND form"),
        ("ac_lowrank:8+naive", "ac_lowrank:8 storage needs the memory-efficient block"),
        ("ac_lowrank:1.5", "needs ac_lowrank:RANK with RANK a ratio in (0, 1]"),
        ("ac_lowrank", "needs ac_lowrank:RANK"),
    ):
        with pytest.raises(VariantError, match=re.escape(message)):
            parse_variant(bad)
