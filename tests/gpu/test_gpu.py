"""The CUDA path: what runs only on a GPU (``pytest -m gpu``; each test skips on a CPU machine).

``tools/gpu_check.py`` runs this file first on a lent GPU. The same source runs on CPU/gloo in
the rest of the suite; what differs on a GPU and is checked here:

- the compressed layers in bf16 on the device (cuBLAS GEMMs, on-device projection generators)
  against a float64 computation of the same formulas on the CPU;
- the tensor-parallel layers on an NCCL world of one rank against the single-device layer;
- the LLaMA model's forward and backward with SDPA's fused kernels (flash, memory-efficient)
  against the math kernel, and which kernel PyTorch picks by default;
- saved-activation bytes on the device equal the analytic model's prediction, byte for byte;
- apex's fused RMSNorm, when apex is importable, against the plain PyTorch norm;
- the 8-bit storage policies (pack/unpack bounds, exact forward loss) and LoRAct's low-rank
  storage (cuSOLVER's QR; exact at full rank) on the device;
- ``offload``: pinned host copies on a side stream, bit-identical to ``keep``, the saved bytes
  split by device as predicted, the allocator's bytes lower by the predicted amount.

Tolerances: bf16 results are compared with float64 through rounding bounds: bf16 GEMMs
accumulate in fp32 (``gamma_k`` of fp32) and round each stage's output to bf16 (``u = 2^-8``),
each term times the magnitude of the terms (tests/helpers/tolerances.py).
"""

from __future__ import annotations

import dataclasses
import os
import socket

import pytest
import torch

from tests.helpers.tolerances import UNIT_ROUNDOFF, assert_within_rounding, gamma

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


def _assert_bf16_gemm_close(got, expected, magnitude, length, roundings, msg):
    """A bf16 GEMM chain accumulates in fp32 and rounds each stage's output to bf16: the error
    is at most ``(gamma_k(fp32) + roundings * u_bf16) * magnitude`` (each rounding is relative to
    an intermediate whose size the magnitude bounds)."""
    bound = (gamma(length, torch.float32) + roundings * UNIT_ROUNDOFF[torch.bfloat16]) * magnitude
    error = (got.double().cpu() - expected.double()).abs()
    assert (error <= bound).all(), (msg, (error - bound).max().item())


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
    _assert_bf16_gemm_close(y, xb @ w.t(), xb.abs() @ w.abs().t(), width, 1, "out")
    _assert_bf16_gemm_close(x.grad, gb @ w, gb.abs() @ w.abs(), out, 1, "dx")
    if method == "none":
        expected, magnitude = gb.t() @ xb, gb.abs().t() @ xb.abs()
        length, roundings = tokens, 1
    else:
        compressor = layer.compressor
        seeds = compressor.current_seeds()
        p_device = compressor.projection(seeds, torch.device(DEVICE), torch.float32)
        p = compressor.projection(seeds, torch.device("cpu"), torch.float32).double()
        torch.testing.assert_close(p_device.cpu().double(), p, rtol=0, atol=0)
        # Z = X P, G = g^T Z and the lift G P^T are each rounded to bf16 (P itself is bf16 in
        # the bf16 layer: its rounding is one more).
        expected = (gb.t() @ (xb @ p)) @ p.t()
        magnitude = (gb.abs().t() @ (xb.abs() @ p.abs())) @ p.abs().t()
        length, roundings = width + tokens + p.shape[1], 5
    _assert_bf16_gemm_close(layer.weight.grad, expected, magnitude, length, roundings, "dW")


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

        common = dict(config=megatron, init_method=init, bias=False, compression=cfg, layer_id=1)
        column = CompressedColumnParallelLinear(
            width, out, gather_output=False, site="fc1", **common
        ).to(DEVICE)
        row = CompressedRowParallelLinear(
            width, out, input_is_parallel=True, skip_bias_add=False, site="fc2", **common
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
    from actcomp_dist.models import build_llama

    model, tokens = llama_on_device
    fp32 = model.config.replace(params_dtype=torch.float32)
    reference = build_llama(fp32, model.compression, device=DEVICE)
    state = {
        k: v.float() if v is not None and v.is_floating_point() else v
        for k, v in model.state_dict().items()
    }
    reference.load_state_dict(state)
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
    from actcomp_dist.ablation.measure import masked_mean_loss
    from actcomp_dist.memory import saved_activation_bytes
    from actcomp_dist.memory_model import ActivationSetting, predict_saved_activations

    model, tokens = llama_on_device
    # Separate tensors, as the data loader gives them (a slice would keep its whole storage).
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    mask = torch.ones(inputs.shape, device=DEVICE)
    measured = saved_activation_bytes(lambda: masked_mean_loss(model(inputs, labels, mask), mask))
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


@pytest.mark.parametrize("policy", ["int8", "fp8"])
def test_8bit_storage_on_device_within_its_element_bound(policy):
    """Pack/unpack of the 8-bit storage policies on the device (bf16 activations, CUDA's
    float8 cast and rounding) stays within the per-element bound the CPU tests derive."""
    from actcomp_dist.storage import StoragePolicy, element_error_bound

    quantizer = StoragePolicy(swiglu=policy).quantizer("swiglu")
    generator = torch.Generator().manual_seed(0)
    x = (torch.randn(256, 512, generator=generator) * 3).to(DEVICE, torch.bfloat16)
    x[7] = 0  # an all-zero row / group stores zero codes
    restored = quantizer.unpack(quantizer.pack(x), x)
    assert restored.device.type == "cuda" and restored.dtype == x.dtype
    bound = element_error_bound(policy, x).cpu()
    # The final cast back to bf16 rounds once more: |fl(y) - y| <= u |y| <= u / (1 - u) |fl(y)|.
    u = UNIT_ROUNDOFF[torch.bfloat16]
    bound = bound + u / (1 - u) * restored.double().abs().cpu()
    error = (restored.double() - x.double()).abs().cpu()
    assert (error <= bound).all(), (error - bound).max()


@pytest.mark.parametrize("policy", ["int8", "fp8"])
def test_llama_with_8bit_storage_on_device_keeps_the_exact_loss(llama_on_device, policy):
    """Only what backward reads is quantised: the forward loss on the device equals the
    model without the policy bit for bit, and backward runs (SDPA re-run on the device)."""
    from actcomp_dist.models import build_llama
    from actcomp_dist.storage import StoragePolicy

    model, tokens = llama_on_device
    storage = StoragePolicy(attention=policy, swiglu=policy)
    quantized = build_llama(model.config, model.compression, storage_policy=storage, device=DEVICE)
    quantized.load_state_dict(model.state_dict())
    loss = quantized.loss(tokens[:, :-1], tokens[:, 1:])
    with torch.no_grad():
        reference = model.loss(tokens[:, :-1], tokens[:, 1:])
    assert torch.equal(loss.detach(), reference)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in quantized.parameters() if p.grad is not None)


@pytest.mark.parametrize("policy", ["int8", "fp8"])
def test_8bit_attention_on_device_runs_sdpa_again_and_bytes_equal_the_prediction(
    llama_on_device, policy
):
    """On CUDA the 8-bit attention keeps packed q, k, v only (no output, no log-sum-exp) and
    runs the SDPA forward again in backward (``stores_attention_output`` is false there);
    proj packs its input itself. The saved bytes equal the memory model's
    ``device_type="cuda"`` formula to the byte."""
    from actcomp_dist.ablation.measure import masked_mean_loss
    from actcomp_dist.memory import saved_activation_bytes
    from actcomp_dist.memory_model import ActivationSetting, predict_saved_activations
    from actcomp_dist.models import build_llama
    from actcomp_dist.storage import StoragePolicy, stores_attention_output

    model, tokens = llama_on_device
    storage = StoragePolicy(attention=policy)
    quantized = build_llama(model.config, model.compression, storage_policy=storage, device=DEVICE)
    quantized.load_state_dict(model.state_dict())
    q = torch.zeros(1, 4, 8, 16, device=DEVICE, dtype=torch.bfloat16)
    assert not stores_attention_output(q, q, q, False, storage.quantizer("attention"))
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    mask = torch.ones(inputs.shape, device=DEVICE)
    measured = saved_activation_bytes(
        lambda: masked_mean_loss(quantized(inputs, labels, mask), mask)
    )
    setting = ActivationSetting(
        micro_batch_size=tokens.shape[0],
        seq_length=tokens.shape[1] - 1,
        dtype_bytes=2,
        rope_positions=model.config.seq_length,
        storage=storage,
        device_type="cuda",
    )
    predicted = predict_saved_activations(
        model.config, model.compression, setting, "none", None
    ).total
    assert measured == predicted


def test_llama_with_lowrank_storage_on_device_is_exact_at_full_rank(single_rank):
    """LoRAct's low-rank storage on the device (cuSOLVER's QR of the bf16 norm outputs and
    ``[gate | up]``): at full rank ``L Q^T`` is the stored tensor up to rounding, so the loss is
    bit-identical to ``keep``'s and every gradient is as accurate against float64 as ``keep``'s
    (the bound of tests/distributed/test_lowrank_storage.py); at a low rank the loss is still bit-identical
    and backward runs."""
    from actcomp_dist.models import build_llama, full_state_dict, get_model_config
    from actcomp_dist.models.weights import load_full_weights
    from actcomp_dist.storage import StoragePolicy
    from tests.helpers.llama_reference import (
        loss_and_full_grads,
        next_token_batch,
        random_full_weights,
        reference_grads,
    )
    from tests.helpers.tolerances import assert_as_accurate_as

    config = get_model_config("tiny", seq_length=32)
    full = random_full_weights(config, seed=1)
    tokens, labels = next_token_batch(config)
    policies = {
        "keep": None,
        "full": StoragePolicy(norm=f"lowrank:{config.hidden_size}", swiglu="lowrank:1.0"),
        "low": StoragePolicy(norm="lowrank:0.125", swiglu="lowrank:16"),
    }
    results = {}
    for name, policy in policies.items():
        model = build_llama(config, init_seed=0, storage_policy=policy, device=DEVICE)
        load_full_weights(model, full)
        for param in model.parameters():  # as DeepSpeed's bf16 engine
            param.data = param.data.to(torch.bfloat16)
        loss, grads = loss_and_full_grads(model, tokens.to(DEVICE), labels.to(DEVICE))
        results[name] = loss.cpu(), {k: v.cpu() for k, v in grads.items()}
    weights = {k: v.cpu() for k, v in full_state_dict(model).items()}
    assert torch.equal(results["full"][0], results["keep"][0])
    assert torch.equal(results["low"][0], results["keep"][0])
    assert all(torch.isfinite(g).all() for g in results["low"][1].values())
    reference = reference_grads(weights, config, tokens, labels)
    assert_as_accurate_as(
        results["full"][1], results["keep"][1], reference, torch.bfloat16, "lowrank full rank"
    )


def _flushed_allocated(device) -> int:
    """``memory_allocated`` once every pending stream use has completed: a block freed while
    another stream still used it (``record_stream``) returns to the pool only when the
    allocator next processes its events, which an allocation does."""
    torch.cuda.synchronize(device)
    torch.empty(1, device=device)
    return torch.cuda.memory_allocated(device)


OFFLOAD_ALL = {"norm": "offload", "attention": "offload", "swiglu": "offload"}


def _offload_config():
    """tiny with 8 blocks: the saving (8 blocks) stands well clear of the peak's slack (two)."""
    from actcomp_dist.models import get_model_config

    return get_model_config("tiny", num_layers=8, seq_length=128, params_dtype=torch.bfloat16)


def _offload_batch(config):
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (4, 129), generator=generator).to(DEVICE)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def test_offload_on_device_equals_keep_bit_for_bit(single_rank):
    """``memory.policy`` ``offload`` (pinned host copies on a side stream, copied back on the
    compute stream in backward) against ``keep`` on the same bf16 weights and batch: loss and
    every gradient bit-identical (a copy, not an encoding). Under the math SDPA kernel, whose
    backward is deterministic (flash attention's backward accumulates dQ with atomics), so
    the first assertion checks that premise: ``keep`` twice gives the same bits."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from actcomp_dist.models import build_llama
    from actcomp_dist.storage import StoragePolicy

    config = _offload_config()
    inputs, labels = _offload_batch(config)
    results = []
    for policy in (None, None, StoragePolicy.from_mapping(OFFLOAD_ALL)):
        model = build_llama(config, init_seed=0, storage_policy=policy, device=DEVICE)
        with sdpa_kernel(SDPBackend.MATH):
            loss = model.loss(inputs, labels)
            loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
        results.append((loss.detach(), grads))
    (loss_keep, grads_keep), (loss_again, grads_again), (loss_off, grads_off) = results
    assert torch.equal(loss_again, loss_keep)
    assert all(torch.equal(grads_again[n], g) for n, g in grads_keep.items())
    assert torch.equal(loss_off, loss_keep)
    for name, grad in grads_keep.items():
        assert torch.equal(grads_off[name], grad), name


def test_offload_on_device_frees_the_predicted_device_bytes(single_rank):
    """The same models under the default (fused) kernels:

    - the saved tensors split by device: the CUDA bytes are the memory model's device
      prediction, the CPU (pinned) bytes its ``host_offload``, each to the byte;
    - after forward (pending copies flushed), the allocator holds less by the predicted
      difference of device bytes, up to its rounding: every block is a multiple of 512 bytes,
      so each saved tensor may hold up to 511 bytes more than its size (at most 16 tensors
      per block differ between the two);
    - the peak (``max_memory_allocated``) over forward and backward falls by at least the
      predicted difference less twice one block's offloaded bytes (backward brings one
      block's tensors back at a time, and the attention re-run builds its output again).
    """
    from actcomp_dist import CompressionConfig
    from actcomp_dist.ablation.measure import masked_mean_loss
    from actcomp_dist.memory import SavedTensorCounter
    from actcomp_dist.memory_model import ActivationSetting, predict_saved_activations
    from actcomp_dist.models import build_llama
    from actcomp_dist.storage import StoragePolicy

    config = _offload_config()
    inputs, labels = _offload_batch(config)
    mask = torch.ones(inputs.shape, device=DEVICE)
    offload = StoragePolicy.from_mapping(OFFLOAD_ALL)
    device = torch.device(DEVICE)
    results = {}
    for name, policy in (("keep", None), ("offload", offload)):
        model = build_llama(config, init_seed=0, storage_policy=policy, device=DEVICE)
        # Warm-up: the RoPE table cache, the side stream, the kernels' workspaces.
        masked_mean_loss(model(inputs, labels, mask), mask).backward()
        model.zero_grad(set_to_none=True)
        before = _flushed_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        with SavedTensorCounter() as counter:
            loss = masked_mean_loss(model(inputs, labels, mask), mask)
        forward = _flushed_allocated(device) - before
        loss.backward()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - before
        results[name] = (dict(counter.by_device), forward, peak)
        del model, loss
    _, forward_keep, peak_keep = results["keep"]
    by_device, forward_off, peak_off = results["offload"]
    setting = ActivationSetting(4, 128, dtype_bytes=2, rope_positions=config.seq_length)
    keep_prediction = predict_saved_activations(config, CompressionConfig(), setting)
    predicted = predict_saved_activations(
        config, CompressionConfig(), dataclasses.replace(setting, storage=offload)
    )
    assert by_device.get("cpu", 0) == predicted.host_total > 0
    assert by_device.get("cuda", 0) == predicted.total
    saving = keep_prediction.total - predicted.total
    rounding = 511 * 16 * config.num_layers
    assert saving > 10 * rounding  # the check below means something
    assert abs((forward_keep - forward_off) - saving) <= rounding, (forward_keep, forward_off)
    block_host = predicted.host_total // config.num_layers
    assert peak_keep - peak_off >= saving - 2 * block_host - rounding, (peak_keep, peak_off)
