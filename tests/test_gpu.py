"""The CUDA path: what runs only on a GPU (``pytest -m gpu``; each test skips on a CPU machine).

``tools/gpu_check.py`` runs this file first on a lent GPU. The same source runs on CPU/gloo in
the rest of the suite; what differs on a GPU and is checked here:

- the compressed layers in bf16 on the device (cuBLAS GEMMs, on-device projection generators)
  against a float64 computation of the same formulas on the CPU;
- the tensor-parallel layers on an NCCL world of one rank against the single-device layer;
- the LLaMA model's forward and backward with SDPA's fused kernels (flash, memory-efficient)
  against the math kernel, and which kernel PyTorch picks by default;
- saved-activation bytes on the device equal the analytic model's prediction, byte for byte;
- apex's fused RMSNorm, when apex is importable, against the plain PyTorch norm.

Tolerances: bf16 results are compared with float64 through the rounding bound of
tests/tolerances.py (``2 gamma_k`` times the magnitude of the terms, ``u = 2^-8``).
"""

from __future__ import annotations

import os
import socket

import pytest
import torch

from tests.tolerances import assert_within_rounding

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

DEVICE = "cuda"


def _inputs(tokens: int, width: int, out: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, width, generator=generator, dtype=torch.float64)
    g = torch.randn(tokens, out, generator=generator, dtype=torch.float64)
    return x, g


@pytest.mark.parametrize("method", ["none", "compact"])
def test_compressed_linear_bf16_on_device_matches_float64(method):
    """Output and input gradient are exact formulas of the bf16 operands; the weight gradient
    of ``compact`` is ``(g^T (X P)) P^T`` with the layer's own P (regenerated on the device
    from the stored seeds, then compared with the same P generated on the CPU)."""
    from actcomp_dist import CompressedLinear, CompressionConfig

    width, out, tokens = 256, 128, 512
    cfg = CompressionConfig(method=method, rank=0.25, seed=3)
    torch.manual_seed(0)
    layer = CompressedLinear(width, out, bias=False, compression=cfg, layer_id=2, site="fc1")
    layer = layer.to(DEVICE, torch.bfloat16)
    x64, g64 = _inputs(tokens, width, out)
    x = x64.to(DEVICE, torch.bfloat16).requires_grad_(True)
    g = g64.to(DEVICE, torch.bfloat16)
    y = layer(x)
    y.backward(g)
    # The bf16 operands, exactly, in float64 on the CPU.
    xb, gb = x.detach().double().cpu(), g.double().cpu()
    w = layer.weight.detach().double().cpu()
    assert_within_rounding(y.cpu(), xb @ w.t(), xb.abs() @ w.abs().t(), width, torch.bfloat16)
    assert_within_rounding(x.grad.cpu(), gb @ w, gb.abs() @ w.abs(), out, torch.bfloat16)
    if method == "none":
        expected, magnitude = gb.t() @ xb, gb.abs().t() @ xb.abs()
        length = tokens
    else:
        compressor = layer.compressor
        seeds = compressor.current_seeds()
        p_device = compressor.projection(seeds, torch.device(DEVICE), torch.float32)
        p = compressor.projection(seeds, torch.device("cpu"), torch.float32).double()
        torch.testing.assert_close(p_device.cpu().double(), p, rtol=0, atol=0)
        # Z = X P is saved in bf16: its rounding enters the bound through the chain length.
        expected = (gb.t() @ (xb @ p)) @ p.t()
        magnitude = (gb.abs().t() @ (xb.abs() @ p.abs())) @ p.abs().t()
        length = width + tokens + p.shape[1] + 2
    assert_within_rounding(
        layer.weight.grad.cpu(), expected, magnitude, length, torch.bfloat16, msg="dW"
    )


def _nccl_world_of_one(tmp_path):
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(port)
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1)
    return True


def test_parallel_layers_on_nccl_world_of_one_match_single_device_layer(tmp_path):
    """Column- and row-parallel compressed layers at TP=1 over NCCL: the same output and
    gradients as :class:`CompressedLinear` with the same weights and seed (column-parallel
    shares its projection; row-parallel's block-diagonal projection differs, so only output
    and input gradient are compared there)."""
    import torch.distributed as dist
    from megatron.core import ModelParallelConfig

    from actcomp_dist import CompressedLinear, CompressionConfig
    from actcomp_dist.parallel import (
        CompressedColumnParallelLinear,
        CompressedRowParallelLinear,
        state,
    )

    created = _nccl_world_of_one(tmp_path)
    try:
        state.initialize_model_parallel(1)
        cfg = CompressionConfig(method="compact", rank=0.25, seed=5)
        megatron = ModelParallelConfig(
            tensor_model_parallel_size=1, use_cpu_initialization=True, params_dtype=torch.float32
        )
        width, out, tokens = 128, 96, 64

        def init(weight):
            return torch.nn.init.normal_(weight, std=0.02)

        column = CompressedColumnParallelLinear(
            width,
            out,
            config=megatron,
            init_method=init,
            bias=False,
            gather_output=False,
            compression=cfg,
            layer_id=1,
            site="fc1",
        ).to(DEVICE)
        row = CompressedRowParallelLinear(
            width,
            out,
            config=megatron,
            init_method=init,
            bias=False,
            input_is_parallel=True,
            skip_bias_add=False,
            compression=cfg,
            layer_id=1,
            site="fc2",
        ).to(DEVICE)
        x64, g64 = _inputs(tokens, width, out, seed=1)
        for layer, site in ((column, "fc1"), (row, "fc2")):
            single = CompressedLinear(
                width, out, bias=False, compression=cfg, layer_id=1, site=site
            ).to(DEVICE)
            with torch.no_grad():
                single.weight.copy_(layer.weight)
            x_a = x64.float().to(DEVICE).view(tokens, 1, width).requires_grad_(True)
            x_b = x64.float().to(DEVICE).view(tokens, 1, width).requires_grad_(True)
            g = g64.float().to(DEVICE).view(tokens, 1, out)
            y_a, _ = layer(x_a)
            y_a.backward(g)
            y_b = single(x_b)
            y_b.backward(g)
            xb, gb = x64.float().double(), g64.float().double()
            w = layer.weight.detach().double().cpu()
            magnitude_y = (xb.abs() @ w.abs().t()).view(tokens, 1, out)
            magnitude_dx = (gb.abs() @ w.abs()).view(tokens, 1, width)
            assert_within_rounding(y_a.cpu(), y_b.cpu(), magnitude_y, width, msg=f"{site} out")
            assert_within_rounding(
                x_a.grad.cpu(), x_b.grad.cpu(), magnitude_dx, out, msg=f"{site} dx"
            )
            if site == "fc1":
                p = layer.compressor.projection(
                    layer.compressor.current_seeds(), torch.device("cpu"), torch.float64
                )
                magnitude = (gb.abs().t() @ (xb.abs() @ p.abs())) @ p.abs().t()
                assert_within_rounding(
                    layer.weight.grad.cpu(),
                    single.weight.grad.cpu(),
                    magnitude,
                    tokens + width + p.shape[1],
                    msg="fc1 dW",
                )
        assert dist.get_backend() == "nccl"
    finally:
        if state.is_initialized():
            state.destroy()
        if created:
            dist.destroy_process_group()


def _sdpa_backends():
    from torch.nn.attention import SDPBackend

    return {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "math": SDPBackend.MATH,
    }


@pytest.fixture(scope="module")
def llama_on_device(tmp_path_factory):
    import torch.distributed as dist

    from actcomp_dist import CompressionConfig
    from actcomp_dist.models import build_llama, get_model_config
    from actcomp_dist.parallel import state

    created = not dist.is_initialized()
    if created:
        store = tmp_path_factory.mktemp("dist") / "store"
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    state.initialize_model_parallel(1)
    config = get_model_config("tiny", seq_length=128, params_dtype=torch.bfloat16)
    model = build_llama(config, CompressionConfig(method="compact", rank=0.25), device=DEVICE)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (4, 129), generator=generator).to(DEVICE)
    yield model, tokens
    state.destroy()
    if created:
        dist.destroy_process_group()


def _loss_and_grads(model, tokens, backend):
    from torch.nn.attention import sdpa_kernel

    model.zero_grad(set_to_none=True)
    with sdpa_kernel(_sdpa_backends()[backend]):
        loss = model.loss(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
    grads = {n: p.grad.detach().double().clone() for n, p in model.named_parameters()}
    return loss.detach().double(), grads


@pytest.mark.parametrize("kernel", ["flash", "efficient"])
def test_llama_fused_attention_kernels_are_as_accurate_as_math_kernel(llama_on_device, kernel):
    """Loss and every gradient of the bf16 model with a fused SDPA kernel and with the math
    kernel, each against the same model in fp32 (math kernel, no TF32): the fused kernel must
    be at least about as accurate as the math kernel. Both are bf16 evaluations of one
    function whose rounding errors are sums of many independent terms, so their error norms
    agree within a small factor (2 here); a floor of one bf16 unit of the reference covers a
    math-kernel error that happens to be tiny."""
    import copy

    model, tokens = llama_on_device
    reference = copy.deepcopy(model).float()
    loss_ref, grads_ref = _loss_and_grads(reference, tokens, "math")
    loss_math, grads_math = _loss_and_grads(model, tokens, "math")
    loss_fused, grads_fused = _loss_and_grads(model, tokens, kernel)
    unit = 2.0**-8
    floor = unit * abs(loss_ref.item())
    assert abs(loss_fused - loss_ref) <= 2 * abs(loss_math - loss_ref) + floor
    for name, ref in grads_ref.items():
        floor = unit * ref.norm().item()
        error_math = (grads_math[name] - ref).norm().item()
        error_fused = (grads_fused[name] - ref).norm().item()
        assert error_fused <= 2 * error_math + floor, (name, error_fused, error_math)


def test_default_attention_kernel_is_fused(llama_on_device):
    """With the defaults PyTorch picks a fused kernel for this model (no s x s matrix kept):
    the math kernel is disabled and the model still runs."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model, tokens = llama_on_device
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
        loss = model.loss(tokens[:, :-1], tokens[:, 1:])
    assert torch.isfinite(loss)


def test_saved_bytes_on_device_equal_the_prediction(llama_on_device):
    from actcomp_dist import CompressionConfig
    from actcomp_dist.memory import saved_activation_bytes
    from actcomp_dist.memory_model import ActivationSetting, predict_saved_activations

    model, tokens = llama_on_device
    measured = saved_activation_bytes(lambda: model.loss(tokens[:, :-1], tokens[:, 1:]))
    setting = ActivationSetting(
        micro_batch_size=tokens.shape[0],
        seq_length=tokens.shape[1] - 1,
        dtype_bytes=2,
        rope_positions=model.config.seq_length,
    )
    predicted = predict_saved_activations(
        model.config, CompressionConfig(method="compact", rank=0.25), setting, "none", None
    ).total
    assert measured == predicted


def test_apex_fused_norm_matches_plain_norm():
    apex_norm = pytest.importorskip("apex.normalization.fused_layer_norm")
    from actcomp_dist.models.llama import RMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(512, eps=1e-5, dtype=torch.bfloat16).to(DEVICE)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(64, 512, device=DEVICE, dtype=torch.bfloat16)
    fused = norm(x)  # apex's kernel on CUDA when importable
    x32 = x.float()
    normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16)
    plain = norm.weight * normed
    # Both round the fp32 statistic's result to bf16 and multiply by the weight: two bf16
    # roundings of the same value (the fp32 mean over 512 terms is far below bf16's unit).
    magnitude = plain.detach().double().abs().cpu()
    assert_within_rounding(fused.cpu(), plain.cpu(), magnitude, 2, torch.bfloat16)
    assert apex_norm is not None
