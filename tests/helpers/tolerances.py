"""Tolerances derived from the numbers, not from one CPU.

Two float computations of the same quantity that differ only in reduction order (a sum split
over tensor-parallel ranks, a different GEMM blocking, another CPU's SIMD width) are each
within the classic rounding-error bound of the exact value. For a sum of ``k`` products

    |fl(sum_i a_i b_i) - sum_i a_i b_i| <= gamma_k * sum_i |a_i| |b_i|,
    gamma_k = k u / (1 - k u),  u = the unit roundoff of the dtype,

and a chain of products ``A B C`` evaluated in any order obeys the same bound with ``k`` the
sum of the chain's reduction lengths and ``|A| |B| |C|`` (element-wise absolute values) as the
magnitude. Two such evaluations therefore differ by at most ``2 gamma_k |A||B||C|``. The
magnitude, not the result, sets the scale: where the terms cancel the result is small but its
rounding error is not, which is why a fixed relative tolerance fails on some machines and not
on others.
"""

from __future__ import annotations

import torch

UNIT_ROUNDOFF = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    torch.bfloat16: 2.0**-8,
    torch.float16: 2.0**-11,
}


def gamma(length: int, dtype: torch.dtype) -> float:
    """``gamma_k`` of the rounding-error analysis for a reduction of ``length`` terms."""
    ku = length * UNIT_ROUNDOFF[dtype]
    if ku >= 1:
        raise ValueError(f"a reduction of {length} terms in {dtype} has no meaningful bound")
    return ku / (1 - ku)


def assert_within_rounding(
    actual: torch.Tensor,
    expected: torch.Tensor,
    magnitude: torch.Tensor,
    length: int,
    dtype: torch.dtype = torch.float32,
    msg: str = "",
) -> None:
    """``actual`` and ``expected`` are two evaluations in ``dtype`` of one quantity whose terms
    have element-wise ``magnitude`` (the same computation on absolute values, in float64) and
    whose reductions add up to ``length``: each is within ``gamma * magnitude`` of the exact
    value, so they may differ by twice that, element by element."""
    assert actual.shape == expected.shape == magnitude.shape, (
        msg,
        actual.shape,
        expected.shape,
        magnitude.shape,
    )
    bound = 2 * gamma(length, dtype) * magnitude.double()
    _assert_below(actual, expected, bound, f"the rounding bound 2*gamma_{length}*magnitude", msg)


def assert_rounded_from_exact(
    actual: torch.Tensor,
    exact: torch.Tensor,
    magnitude: torch.Tensor,
    length: int,
    dtype: torch.dtype = torch.float32,
    msg: str = "",
) -> None:
    """``actual`` is one evaluation in ``dtype`` of a quantity and ``exact`` its float64 value
    from the same (exactly representable) inputs: ``actual`` is within ``gamma_length(dtype) *
    magnitude`` of the exact value and ``exact`` within ``gamma_length(float64) * magnitude``,
    so they differ by at most the sum, element by element. ``length`` counts the reduction
    terms plus one for each rounded input that is not exactly the float64 one (a projection
    scaled by ``1/sqrt(r)`` in ``dtype``, say)."""
    assert actual.shape == exact.shape == magnitude.shape, (
        msg,
        actual.shape,
        exact.shape,
        magnitude.shape,
    )
    bound = (gamma(length, dtype) + gamma(length, torch.float64)) * magnitude.double()
    _assert_below(actual, exact, bound, f"the rounding bound gamma_{length}*magnitude", msg)


def assert_as_accurate_as(
    candidate: dict[str, torch.Tensor],
    baseline: dict[str, torch.Tensor],
    reference: dict[str, torch.Tensor],
    dtype: torch.dtype,
    msg: object = "",
    baseline_dtype: torch.dtype | None = None,
) -> None:
    """Two evaluations in ``dtype`` of the same tensors through a whole model (a candidate and
    the baseline it must not be worse than) against a float64 ``reference``, where the
    reductions are too many and too nested for an element-wise bound. Per tensor:

        max |candidate - float64| <= 2 max |baseline - float64| + eps max |float64|.

    Both errors come from rounding the same quantities in reductions of the same lengths, so
    a reordered reduction moves the error by a factor of order one, not by the size of the
    quantity; a wrong term would be of the order of the tensor itself, 10^4-10^6 times these
    errors. ``eps`` (one rounding of the largest value) covers a tensor that the baseline
    happens to get (nearly) exact.

    ``baseline_dtype``: the baseline ran the same computation in a finer dtype (an fp32 run as
    the baseline of a bf16 one). To first order every rounding error is ``u |x|`` for the value
    ``x`` it rounds, carried to the result by the same (linearised) computation, so the error
    bound grows with the unit roundoff ``u``: the whole right-hand side above, taken in the
    baseline's dtype, is scaled by ``u(dtype) / u(baseline_dtype)``. It is a scale, not a
    proof: where the finer run does not round at all (its inputs are exact) the coarser one
    may."""
    baseline_dtype = baseline_dtype or dtype
    eps = torch.finfo(baseline_dtype).eps
    ratio = UNIT_ROUNDOFF[dtype] / UNIT_ROUNDOFF[baseline_dtype]
    for name, ref in reference.items():
        ref = ref.double()
        err_candidate = (candidate[name].double() - ref).abs().max().item()
        err_baseline = (baseline[name].double() - ref).abs().max().item()
        bound = ratio * (2 * err_baseline + eps * ref.abs().max().item())
        assert err_candidate <= bound, (msg, name, err_candidate, err_baseline, bound)


def _assert_below(actual, expected, bound, bound_name, msg) -> None:
    diff = (actual.double() - expected.double()).abs()
    excess = diff - bound
    if (excess > 0).any():
        worst = int(excess.argmax())
        raise AssertionError(
            f"{msg}: {(excess > 0).sum().item()} of {diff.numel()} elements differ by more than "
            f"{bound_name}; worst at flat index {worst}: "
            f"|diff| {diff.flatten()[worst].item():.3e} > bound {bound.flatten()[worst].item():.3e}"
        )


#: Relative Frobenius error allowed between a whole model's gradients with 8-bit stored
#: activations (``int8`` / ``fp8`` storage policies) and with exact ones. What it covers: every
#: stored tensor is within 2^-4 of itself in relative Frobenius norm: e4m3 keeps 3 mantissa bits
#: (round to nearest: each element within 2^-4 relative, subnormals within 2^-10 of the row
#: scale, far below 2^-4 of the row's norm >= 448 scales), and an int8 group of 64 with step
#: absmax / 127 is off by at most sqrt(64) absmax / 254 ~ 2^-5 of its norm (>= absmax). The
#: gradients are linear in each stored tensor (the recomputed softmax / silu derivatives to first
#: order), so each gradient's error is the sum, over the stored tensors it flows through, of
#: that tensor's relative error times the part of the gradient that flows through it; with
#: round-to-nearest errors of random sign these add up like the RMS element error (e4m3:
#: 2^-4 / sqrt(3) ~ 0.58 x 2^-4), not like the maximum. It is not a rigorous bound (a gradient
#: whose terms cancel has a larger relative error than its factors). Measured: Hugging Face
#: tiny models (test_hf_policy, test_hf_peft) fp8 at 0.40-0.67 of it, int8 at 0.08-0.15 (fp32),
#: mixed int8 / fp8 in bf16 at 0.45-0.65; our LLaMA (test_storage_policies) fp8 0.31-0.32, int8
#: 0.07-0.10; 8-bit norms at TP 1 / 2 (test_lowrank_storage) 0.13-0.15. A mis-gathered shard or
#: a wrong scale is an O(1) error, 16 times this.
EIGHT_BIT_GRADIENT_ERROR = 2.0**-4


def assert_within_8bit_error(actual: torch.Tensor, exact: torch.Tensor, msg: object = "") -> None:
    """``actual`` (flat gradients of a model with 8-bit stored activations) is finite and within
    :data:`EIGHT_BIT_GRADIENT_ERROR` of ``exact`` in relative Frobenius norm."""
    assert torch.isfinite(actual).all(), msg
    error = (actual.double() - exact.double()).norm().item()
    scale = exact.double().norm().item()
    assert error <= EIGHT_BIT_GRADIENT_ERROR * scale, (msg, error / scale)
