"""``apply_memory_policy`` composed with PEFT LoRA, HF gradient checkpointing and bf16 autocast;
``compress_linears`` include patterns with PEFT names.

References as in tests/unit/test_hf_policy.py: losses bit-identical to the unpatched model (same ops
in the same order), gradients no less accurate than the unpatched model's against the same
model in float64, saved bytes equal to closed forms.
"""

from __future__ import annotations

import pytest
import torch

from actcomp_dist.config import CompressionConfig
from actcomp_dist.hf import apply_memory_policy
from actcomp_dist.layers import CompressedLinear, compress_linears
from actcomp_dist.memory import saved_activation_bytes_by_module
from tests.helpers.hf_models import (
    ALL_LINEAR,
    HIDDEN,
    INTERMEDIATE,
    LAYERS,
    LORA_RANK,
    TOKENS,
    assert_as_accurate_as_unpatched,
    causal_lm_loss,
    float64_grads,
    loss_and_grads,
    make_lora_model,
    make_model,
    random_tokens,
)
from tests.helpers.tolerances import assert_within_8bit_error

peft = pytest.importorskip("peft")


def _lora_saving(layers=LAYERS) -> int:
    """Bytes ``exact`` removes under LoRA with frozen base weights: a norm whose weight is frozen
    keeps its input and ``rstd`` in Hugging Face, its output and ``rstd`` patched, and LoRA A
    then keeps the same output as its input: one hidden-sized tensor per norm whose input
    needs a gradient (every norm but the first layer's input norm, whose input is the frozen
    embedding's output; the final norm's output feeds the frozen head, nothing keeps it).
    Per MLP Hugging Face keeps ``silu(gate)`` and the product (down's LoRA A input): 2
    intermediate-sized tensors."""
    norms = 2 * layers - 1
    return TOKENS * 4 * (norms * HIDDEN + layers * 2 * INTERMEDIATE)


@pytest.mark.parametrize("order", ["peft_first", "policy_first"])
def test_lora_exact_equals_unpatched_and_keeps_what_is_predicted(order):
    tokens = random_tokens()
    reference_model = make_lora_model()
    loss, grads = loss_and_grads(reference_model, tokens)
    reference = float64_grads(reference_model, tokens)
    before = saved_activation_bytes_by_module(
        reference_model, lambda: causal_lm_loss(reference_model, tokens)
    )
    if order == "peft_first":
        model = apply_memory_policy(make_lora_model(), "exact", loss_chunk_tokens=None)
    else:
        model = make_lora_model(policy_first=True)
    patched_loss, patched_grads = loss_and_grads(model, tokens)
    assert torch.equal(patched_loss, loss)
    assert all("lora_" in name for name in patched_grads)  # only the adapters train
    assert_as_accurate_as_unpatched(patched_grads, grads, reference, torch.float32, order)
    after = saved_activation_bytes_by_module(model, lambda: causal_lm_loss(model, tokens))
    assert sum(before.values()) - sum(after.values()) == _lora_saving()
    assert not any("base_layer" in name for name in after)  # frozen weights keep nothing
    for name, nbytes in after.items():
        if ".lora_B." in name:  # B keeps only A x [tokens, r]
            assert nbytes == TOKENS * LORA_RANK * 4, name
    down_a = [n for n in after if "down_proj.lora_A" in n]
    assert not down_a, down_a  # down's A reads the product recomputed from gate and up


def test_include_lora_a_matches_peft_modules_and_names_sites():
    model = make_lora_model()
    compress_linears(model, CompressionConfig(method="compact", rank=4), include=["lora_A"])
    compressed = {n: m for n, m in model.named_modules() if isinstance(m, CompressedLinear)}
    assert len(compressed) == LAYERS * len(ALL_LINEAR)
    assert all(name.endswith("lora_A.default") for name in compressed)
    sites = {m.site for m in compressed.values()}
    assert sites == {f"{leaf}.lora_A" for leaf in ALL_LINEAR}
    other = make_lora_model()
    compress_linears(other, CompressionConfig(method="compact", rank=4), include=["q_proj.lora_A"])
    assert sum(isinstance(m, CompressedLinear) for m in other.modules()) == LAYERS


def test_policy_compression_compresses_lora_a_inputs_only():
    model = make_lora_model()
    apply_memory_policy(
        model,
        "exact",
        compression=CompressionConfig(method="compact", rank=4),
        loss_chunk_tokens=None,
    )
    compressed = [n for n, m in model.named_modules() if isinstance(m, CompressedLinear)]
    leaves = ALL_LINEAR[:3] + ALL_LINEAR[4:]  # not o_proj
    assert sorted(compressed) == sorted(
        f"base_model.model.model.layers.{i}.{'self_attn' if leaf[0] in 'qkv' else 'mlp'}."
        f"{leaf}.lora_A.default"
        for i in range(LAYERS)
        for leaf in leaves
    )
    loss, _ = loss_and_grads(model, random_tokens())
    assert torch.isfinite(loss)


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_hf_gradient_checkpointing(reentrant, lora):
    """Checkpointed and patched: the same loss as the unpatched model without checkpointing,
    gradients as accurate."""
    tokens = random_tokens()
    build = make_lora_model if lora else make_model
    reference_model = build()
    loss, grads = loss_and_grads(reference_model, tokens)
    reference = float64_grads(reference_model, tokens)
    model = apply_memory_policy(build(), "exact", loss_chunk_tokens=None)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if lora and reentrant:
        model.enable_input_require_grads()  # reentrant checkpointing needs a grad-requiring input
    patched_loss, patched_grads = loss_and_grads(model, tokens)
    assert torch.equal(patched_loss, loss)
    assert_as_accurate_as_unpatched(patched_grads, grads, reference, torch.float32)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_bf16_autocast(lora):
    tokens = random_tokens()
    build = make_lora_model if lora else make_model
    reference_model = build()
    loss, grads = loss_and_grads(reference_model, tokens, autocast=True)
    reference = float64_grads(reference_model, tokens)
    model = apply_memory_policy(build(), "exact", loss_chunk_tokens=None)
    patched_loss, patched_grads = loss_and_grads(model, tokens, autocast=True)
    assert torch.equal(patched_loss, loss)
    assert_as_accurate_as_unpatched(patched_grads, grads, reference, torch.bfloat16)


def test_lora_dropout_is_replayed_in_the_recomputed_down_projection():
    """With LoRA dropout, backward re-runs down_proj (and its dropout) from gate and up: the
    re-run must draw forward's mask (saved RNG state) and leave the global RNG as forward left
    it. Same seed before each run: the masks of the unpatched and patched runs are the same."""
    config = peft.LoraConfig(
        r=LORA_RANK, target_modules=ALL_LINEAR, lora_dropout=0.25, init_lora_weights=False
    )

    def build():
        base = make_model()
        torch.manual_seed(1)
        return peft.get_peft_model(base, config)

    tokens = random_tokens()
    results = {}
    for name, model in (
        ("unpatched", build()),
        ("exact", apply_memory_policy(build(), "exact", loss_chunk_tokens=None)),
    ):
        torch.manual_seed(5)
        loss, grads = loss_and_grads(model, tokens)
        results[name] = (loss, grads, torch.get_rng_state())
    torch.manual_seed(5)
    reference = float64_grads(build(), tokens)
    assert torch.equal(results["exact"][0], results["unpatched"][0])
    assert torch.equal(results["exact"][2], results["unpatched"][2])
    assert_as_accurate_as_unpatched(
        results["exact"][1], results["unpatched"][1], reference, torch.float32
    )


@pytest.mark.parametrize("mode", ["bf16_weights", "autocast"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_bf16_8bit_and_low_rank_policies(mode, lora):
    """bf16 (weights, or fp32 weights under autocast, where RoPE's fp32 tables promote q and k):
    every policy leaves the loss bit-identical; 8-bit gradients stay within the 8-bit element
    error of ``exact``'s (relative Frobenius 2^-4, as tests/unit/test_hf_policy.py); low-rank ones
    are finite."""
    build = make_lora_model if lora else make_model
    tokens = random_tokens()
    autocast = mode == "autocast"

    def run(policy):
        model = build()
        if not autocast:
            model = model.to(torch.bfloat16)
        apply_memory_policy(model, policy, loss_chunk_tokens=None)
        loss, grads = loss_and_grads(model, tokens, autocast=autocast)
        return loss, torch.cat([g.float().reshape(-1) for g in grads.values()])

    exact_loss, exact = run("exact")
    for policy in ({"swiglu": "int8", "attention": "fp8"}, {"swiglu": "fp8", "attention": "int8"}):
        loss, grads = run(policy)
        assert torch.equal(loss, exact_loss), policy
        assert_within_8bit_error(grads, exact, policy)
    loss, grads = run("loract")
    assert torch.equal(loss, exact_loss)
    assert torch.isfinite(grads).all()
