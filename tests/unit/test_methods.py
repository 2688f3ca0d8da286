"""The shared test matrix: every registered compression method against ``nn.Linear``.

A method registered with ``@register_compressor`` joins this matrix automatically (its default
config fields are used; the rank and group count below fit every built-in method). What every
method must satisfy: the forward output and the input and bias
gradients are exactly ``nn.Linear``'s, only the weight gradient is approximated, the saved
tensors are in the compute dtype, nothing of size N x n is kept, and the global RNG is never
touched. ``none`` is the exact oracle: its weight gradient is bit-identical too.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from actcomp_dist import CompressedLinear, CompressionConfig, list_compressors
from actcomp_dist.compression import get_compressor_class
from actcomp_dist.memory import saved_activation_bytes
from tests.helpers.compression_reference import saved_tensors

IN_FEATURES, OUT_FEATURES = 32, 24
DTYPES = [torch.float32, torch.bfloat16]
# [N, n] and [b, s, n] inputs; N = 64 tokens either way.
INPUT_SHAPES = [(64, IN_FEATURES), (4, 16, IN_FEATURES)]


def _method_configs() -> list[pytest.param]:
    """One config per method, and per value of each choice-valued option it declares
    (projections, algorithms). rank=0.5 and groups=4 compress every built-in method to a
    fraction of the width."""
    out = []
    for method in list_compressors():
        choices = get_compressor_class(method).choices
        variants = [{name: v} for name, values in choices.items() for v in values] or [{}]
        for extra in variants:
            cfg = CompressionConfig(method=method, rank=0.5, groups=4, seed=7, **extra)
            out.append(pytest.param(cfg, id="-".join([method, *map(str, extra.values())])))
    return out


METHOD_CONFIGS = _method_configs()


def _pair(
    cfg: CompressionConfig, dtype: torch.dtype, bias: bool = True
) -> tuple[nn.Linear, CompressedLinear]:
    """An ``nn.Linear`` and a ``CompressedLinear`` built from the same RNG state."""
    torch.manual_seed(0)
    reference = nn.Linear(IN_FEATURES, OUT_FEATURES, bias=bias, dtype=dtype)
    torch.manual_seed(0)
    layer = CompressedLinear(
        IN_FEATURES, OUT_FEATURES, bias=bias, dtype=dtype, compression=cfg, layer_id=1, site="fc1"
    )
    return reference, layer


def _run(module: nn.Module, x: torch.Tensor, grad_out: torch.Tensor):
    x = x.clone().requires_grad_()
    out = module(x)
    out.backward(grad_out)
    return out, x.grad


def _inputs(shape, dtype, seed=1):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=generator).to(dtype)
    grad_out = torch.randn(*shape[:-1], OUT_FEATURES, generator=generator).to(dtype)
    return x, grad_out


def test_every_builtin_method_is_registered():
    assert {"none", "compact", "lowrank", "subtoken"} <= set(list_compressors())


@pytest.mark.parametrize("cfg", METHOD_CONFIGS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_same_parameters_as_nn_linear(cfg, dtype):
    """Same shapes, init (same RNG draws) and state-dict tensors as ``nn.Linear``."""
    reference, layer = _pair(cfg, dtype)
    assert torch.equal(layer.weight, reference.weight)
    assert torch.equal(layer.bias, reference.bias)
    assert layer.weight.dtype == dtype
    reference_state = reference.state_dict()
    for key, value in layer.state_dict().items():
        if key in reference_state:
            assert torch.equal(value, reference_state[key])
        else:  # only method state (e.g. the sub-token vector) may be added
            assert key.startswith("compressor.")
    assert set(reference_state) <= set(layer.state_dict())


@pytest.mark.parametrize("cfg", METHOD_CONFIGS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", INPUT_SHAPES, ids=["2d", "3d"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_output_input_grad_and_bias_grad_exact(cfg, dtype, shape, bias):
    reference, layer = _pair(cfg, dtype, bias)
    x, grad_out = _inputs(shape, dtype)
    out_ref, dx_ref = _run(reference, x, grad_out)
    out, dx = _run(layer, x, grad_out)
    assert out.dtype == dtype and dx.dtype == dtype
    assert torch.equal(out, out_ref)
    assert torch.equal(dx, dx_ref)
    if bias:
        assert torch.equal(layer.bias.grad, reference.bias.grad)
    assert layer.weight.grad.shape == reference.weight.grad.shape
    assert layer.weight.grad.dtype == dtype


@pytest.mark.parametrize("cfg", METHOD_CONFIGS)
def test_input_grad_exact_for_non_contiguous_input(cfg):
    reference, layer = _pair(cfg, torch.float32)
    x, grad_out = _inputs((16, 4, IN_FEATURES), torch.float32)
    x = x.transpose(0, 1)  # [4, 16, n], not contiguous
    grad_out = grad_out.transpose(0, 1)
    out_ref, dx_ref = _run(reference, x, grad_out)
    out, dx = _run(layer, x, grad_out)
    assert torch.equal(out, out_ref)
    assert torch.equal(dx, dx_ref)


@pytest.mark.parametrize("cfg", METHOD_CONFIGS)
@pytest.mark.parametrize("shape", INPUT_SHAPES, ids=["2d", "3d"])
def test_autocast_matches_nn_linear_under_autocast(cfg, shape):
    """float32 parameters under ``torch.autocast(bfloat16)`` (torch AMP): the same output,
    input and bias gradients as nn.Linear under autocast, gradients in the parameters' dtype,
    and what is saved for backward is in the autocast (compute) dtype."""
    reference, layer = _pair(cfg, torch.float32)
    x, grad_out = _inputs(shape, torch.float32)
    grad_out = grad_out.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_ref, dx_ref = _run(reference, x, grad_out)
        out, dx = _run(layer, x, grad_out)
        saved = saved_tensors(lambda: layer(x.clone().requires_grad_()))
    assert out.dtype == torch.bfloat16 and dx.dtype == torch.float32
    assert torch.equal(out, out_ref)
    assert torch.equal(dx, dx_ref)
    assert torch.equal(layer.bias.grad, reference.bias.grad)
    assert layer.weight.grad.dtype == torch.float32
    assert saved and all(t.dtype == torch.bfloat16 for t in saved)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", INPUT_SHAPES, ids=["2d", "3d"])
def test_none_is_bit_identical_to_nn_linear(dtype, shape):
    """The oracle: output, input, weight and bias gradients all bit for bit."""
    reference, layer = _pair(CompressionConfig(method="none"), dtype)
    x, grad_out = _inputs(shape, dtype)
    out_ref, dx_ref = _run(reference, x, grad_out)
    out, dx = _run(layer, x, grad_out)
    assert torch.equal(out, out_ref)
    assert torch.equal(dx, dx_ref)
    assert torch.equal(layer.weight.grad, reference.weight.grad)
    assert torch.equal(layer.bias.grad, reference.bias.grad)


def test_default_config_is_the_oracle():
    layer = CompressedLinear(IN_FEATURES, OUT_FEATURES)
    assert layer.compression == CompressionConfig(method="none")
    assert layer.compressor.is_identity


@pytest.mark.parametrize("cfg", METHOD_CONFIGS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_saved_tensors_are_compressed_and_in_compute_dtype(cfg, dtype):
    """Every tensor kept for backward is in the layer's dtype, and a compressing method keeps
    nothing as large as the input X [N, n] (that is the point of compressing)."""
    _, layer = _pair(cfg, dtype)
    x, _ = _inputs(INPUT_SHAPES[1], dtype)
    x.requires_grad_()
    layer(x)  # the first training batch sets up data-dependent state (sub-token vector)
    saved = saved_tensors(lambda: layer(x).sum())
    assert saved and all(t.dtype == dtype for t in saved)
    n_tokens = x.numel() // IN_FEATURES
    if layer.compressor.is_identity:
        assert [t.numel() for t in saved] == [n_tokens * IN_FEATURES]
    else:
        assert all(t.untyped_storage().nbytes() < x.untyped_storage().nbytes() for t in saved)
        assert sum(t.numel() for t in saved) < n_tokens * IN_FEATURES


@pytest.mark.parametrize("cfg", METHOD_CONFIGS)
def test_global_rng_untouched(cfg):
    """Projections and samples come from their own generators: dropout streams unaffected."""
    _, layer = _pair(cfg, torch.float32)
    x, grad_out = _inputs(INPUT_SHAPES[1], torch.float32)
    state = torch.get_rng_state()
    _run(layer, x, grad_out)
    _run(layer, x, grad_out)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("cfg", METHOD_CONFIGS)
def test_no_grad_and_frozen_weight_match_nn_linear(cfg):
    reference, layer = _pair(cfg, torch.float32)
    x, grad_out = _inputs(INPUT_SHAPES[1], torch.float32)
    with torch.no_grad():
        assert torch.equal(layer(x), reference(x))
    reference.weight.requires_grad_(False)
    layer.weight.requires_grad_(False)
    out_ref, dx_ref = _run(reference, x, grad_out)
    out, dx = _run(layer, x, grad_out)
    assert torch.equal(out, out_ref) and torch.equal(dx, dx_ref)
    assert torch.equal(layer.bias.grad, reference.bias.grad)


@pytest.mark.parametrize("cfg", METHOD_CONFIGS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_declared_saved_width_is_what_the_layer_saves(cfg, dtype):
    """``saved_width`` (what the memory model predicts from) is, to the byte, what the layer
    keeps: ``N * per_token + basis`` elements of the compute dtype."""
    _, layer = _pair(cfg, dtype)
    x, _ = _inputs(INPUT_SHAPES[1], dtype)
    x.requires_grad_()
    layer(x)  # data-dependent set-up first, as in training
    declared = get_compressor_class(cfg.method).saved_width(cfg, layer.compressor.layout)
    assert declared.per_token == layer.compressor.compressed_width
    n_tokens = x.numel() // IN_FEATURES
    itemsize = torch.finfo(dtype).bits // 8
    expected = (n_tokens * declared.per_token + declared.basis) * itemsize
    assert saved_activation_bytes(lambda: layer(x).sum()) == expected


@pytest.mark.parametrize("method", list_compressors())
def test_declared_options_are_config_fields(method):
    """What a method declares names real ``CompressionConfig`` fields, and its ablation option
    is one it reads; every declared choice is accepted by the config."""
    cls = get_compressor_class(method)
    fields = set(CompressionConfig().to_dict())
    assert set(cls.options) <= fields
    assert set(cls.choices) <= set(cls.options)
    assert cls.ablation_option is None or cls.ablation_option in cls.options
    for option, values in cls.choices.items():
        for value in values:
            assert getattr(CompressionConfig(method=method, **{option: value}), option) == value
