"""``actcomp_dist.hf.apply_memory_policy`` on tiny transformers Llama / Mistral / Qwen2 models.

References:

- **Forward**: the patched norm and MLP run Hugging Face's ops in the same order, so losses are
  bit-identical to the unpatched model's (fp32, bf16 autocast, under PEFT LoRA and HF gradient
  checkpointing).
- **Gradients** (``exact``): the RMSNorm backward is a closed form on a recovered
  ``x_hat = y / weight`` (one rounding away from the forward's), so gradients differ from the
  unpatched model's by rounding. Both are compared with the unpatched model run in float64: the
  patched error must be no larger than twice the unpatched one plus one rounding of the largest
  reference value (both errors come from rounding the same quantities in reductions of the
  same lengths; a wrong term would be of the order of the gradient itself).
- **8-bit** (``int8`` / ``fp8``): forward unchanged (bit-identical loss); the gradients of the
  whole model within the 8-bit element error (relative Frobenius error <= 2^-4, what it covers
  and its measured margin in tests/helpers/tolerances.py); the per-op bounds against float64
  are tested in tests/unit/test_storage_policies.py.
- **Memory**: exact saved-byte counts (``actcomp_dist.memory``) against closed forms derived in
  each test from what each op keeps.

The policies are applied with ``loss_chunk_tokens=None`` (transformers' own loss) here and in
the other block tests (test_hf_peft, test_hf_loract, test_hf_loract_modes): they test the
blocks, whose forward is bit-identical. The fused loss that ``apply_memory_policy`` applies by
default is tested against transformers' loss in tests/unit/test_hf_loss.py.
"""

from __future__ import annotations

import pytest
import torch

from actcomp_dist.hf import apply_memory_policy
from actcomp_dist.memory import saved_activation_bytes, saved_activation_bytes_by_module
from actcomp_dist.storage import StoragePolicy
from tests.helpers.hf_models import (
    FAMILIES,
    GROUPS,
    HEADS,
    HIDDEN,
    INTERMEDIATE,
    LAYERS,
    TOKENS,
    assert_as_accurate_as_unpatched,
    causal_lm_loss,
    float64_grads,
    loss_and_grads,
    make_model,
    random_tokens,
)
from tests.helpers.tolerances import assert_within_8bit_error

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")


# ----------------------------------------------------------------------------- exact


@pytest.mark.parametrize("family", FAMILIES)
def test_exact_losses_and_grads_equal_unpatched(family):
    model, tokens = make_model(family), random_tokens()
    loss, grads = loss_and_grads(model, tokens)
    reference = float64_grads(model, tokens)
    apply_memory_policy(model, "exact", loss_chunk_tokens=None)
    patched_loss, patched_grads = loss_and_grads(model, tokens)
    assert torch.equal(patched_loss, loss)
    assert_as_accurate_as_unpatched(patched_grads, grads, reference, torch.float32, family)


def _exact_saving_full_finetuning(layers=LAYERS, tokens=TOKENS, bytes_per=4) -> int:
    """Bytes ``exact`` removes from a fully trained model's forward: per norm (two per layer and
    the final one) Hugging Face keeps its input and the normalised tensor besides its output
    (kept as the next projection's input) and ``rstd``: 2 hidden-sized tensors. Per MLP it keeps
    ``silu(gate)`` and the product ``h`` besides ``gate`` and ``up``: 2 intermediate-sized."""
    per_token = layers * (2 * 2 * HIDDEN + 2 * INTERMEDIATE) + 2 * HIDDEN
    return tokens * per_token * bytes_per


@pytest.mark.parametrize("family", FAMILIES)
def test_exact_saved_bytes_closed_form(family):
    model, tokens = make_model(family), random_tokens()
    before = saved_activation_bytes_by_module(model, lambda: causal_lm_loss(model, tokens))
    apply_memory_policy(model, "exact", loss_chunk_tokens=None)
    after = saved_activation_bytes_by_module(model, lambda: causal_lm_loss(model, tokens))
    assert sum(before.values()) - sum(after.values()) == _exact_saving_full_finetuning()
    for layer in range(LAYERS):
        prefix = f"model.layers.{layer}"
        for norm in ("input_layernorm", "post_attention_layernorm"):
            # The output y (shared with q/k/v's or gate/up's input) and the fp32 rstd.
            assert after[f"{prefix}.{norm}"] == TOKENS * (HIDDEN + 1) * 4
        assert after[f"{prefix}.mlp"] == TOKENS * 2 * INTERMEDIATE * 4  # gate and up
        for leaf in ("q_proj", "gate_proj", "mlp.act_fn", "mlp.down_proj"):
            assert not any(name.endswith(leaf) and name.startswith(prefix) for name in after)
        # Attention unchanged: no alias of a projection output to remove.
        assert after[f"{prefix}.self_attn"] == before[f"{prefix}.self_attn"]


# ----------------------------------------------------------------------------- 8-bit


def _attention_saved_bytes(policy: StoragePolicy) -> int:
    """One layer's attention (its module and o_proj): q, k after RoPE, v and the output (o_proj's
    input) fp32 and the fp32 log-sum-exp per head under ``keep``; under 8-bit q, k, v packed, no
    log-sum-exp, and the output kept by o_proj. RoPE's cos / sin are counted separately."""
    head_dim = HIDDEN // HEADS
    widths = (HEADS * head_dim, GROUPS * head_dim, GROUPS * head_dim)
    out = TOKENS * HEADS * head_dim * 4
    quantizer = policy.quantizer("attention")
    if quantizer is None:
        return sum(TOKENS * w * 4 for w in widths) + out + TOKENS * HEADS * 4
    return sum(quantizer.saved_bytes(TOKENS * w, head_dim) for w in widths) + out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("bits", ["int8", "fp8"])
def test_8bit_policies_forward_unchanged_grads_bounded_bytes_exact(family, bits):
    model, tokens = make_model(family), random_tokens()
    apply_memory_policy(model, "exact", loss_chunk_tokens=None)
    exact_loss, exact_grads = loss_and_grads(model, tokens)
    exact_bytes = saved_activation_bytes(lambda: causal_lm_loss(model, tokens))
    policy = StoragePolicy(attention=bits, swiglu=bits)
    apply_memory_policy(model, {"attention": bits, "swiglu": bits}, loss_chunk_tokens=None)
    loss, grads = loss_and_grads(model, tokens)
    assert torch.equal(loss, exact_loss)
    flat = torch.cat([grads[n].reshape(-1) for n in exact_grads])
    exact_flat = torch.cat([g.reshape(-1) for g in exact_grads.values()])
    assert_within_8bit_error(flat, exact_flat, (family, bits))
    quantised_bytes = saved_activation_bytes(lambda: causal_lm_loss(model, tokens))
    swiglu_keep = 2 * TOKENS * INTERMEDIATE * 4
    swiglu_8bit = 2 * policy.quantizer("swiglu").saved_bytes(TOKENS * INTERMEDIATE, INTERMEDIATE)
    per_layer = (swiglu_keep - swiglu_8bit) + (
        _attention_saved_bytes(StoragePolicy()) - _attention_saved_bytes(policy)
    )
    assert exact_bytes - quantised_bytes == LAYERS * per_layer


def test_int8_preset_is_the_8bit_mapping():
    """The ``"int8"`` preset is ``{"attention": "int8", "swiglu": "int8"}`` (tested above):
    the same loss, gradients and bytes, bit for bit."""
    tokens = random_tokens()
    runs = []
    for policy in ("int8", {"attention": "int8", "swiglu": "int8"}):
        model = apply_memory_policy(make_model(), policy, loss_chunk_tokens=None)
        loss, grads = loss_and_grads(model, tokens)
        runs.append(
            (loss, grads, saved_activation_bytes(lambda m=model: causal_lm_loss(m, tokens)))
        )
    (loss, grads, nbytes), (map_loss, map_grads, map_bytes) = runs
    assert torch.equal(loss, map_loss) and nbytes == map_bytes
    assert (
        all(torch.equal(grads[n], map_grads[n]) for n in map_grads)
        and grads.keys() == map_grads.keys()
    )


def test_8bit_attention_refuses_a_padding_mask():
    model = make_model()
    apply_memory_policy(model, {"attention": "int8"}, loss_chunk_tokens=None)
    tokens = random_tokens()
    mask = torch.ones_like(tokens)
    mask[0, -3:] = 0
    with pytest.raises(ValueError, match="attention mask"):
        model(input_ids=tokens, attention_mask=mask, labels=tokens)
    with torch.no_grad():  # inference is Hugging Face's own attention
        model(input_ids=tokens, attention_mask=mask)


# ----------------------------------------------------------------------------- bad input


def _classes(model):
    return [type(m) for m in model.modules()]


@pytest.mark.parametrize(
    "policy, match",
    [
        ("fast", "unknown preset"),
        ({"norm": "int8"}, "memory.policy.norm='int8'"),
        ({"swiglu": "int4"}, "memory.policy.swiglu='int4' is not a policy"),
        ({"mlp": "keep"}, "unknown kind"),
        ({"qkv": "compress"}, "memory.policy.qkv"),
    ],
)
def test_bad_policies_are_refused_and_nothing_is_patched(policy, match):
    model = make_model()
    classes = _classes(model)
    with pytest.raises(ValueError, match=match):
        apply_memory_policy(model, policy, loss_chunk_tokens=None)
    assert _classes(model) == classes


def test_unsupported_models_are_refused_and_nothing_is_patched():
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)
    )
    with pytest.raises(ValueError, match="GPT2LMHeadModel has no supported decoder layer.*Llama"):
        apply_memory_policy(gpt2, "exact", loss_chunk_tokens=None)
    qwen3 = transformers.Qwen3ForCausalLM(
        transformers.Qwen3Config(
            vocab_size=64,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=16,
        )
    )
    classes = _classes(qwen3)
    with pytest.raises(ValueError, match="Qwen3DecoderLayer, not a supported decoder layer"):
        apply_memory_policy(qwen3, "exact", loss_chunk_tokens=None)
    assert _classes(qwen3) == classes
    gelu = make_model(hidden_act="gelu")
    classes = _classes(gelu)
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        apply_memory_policy(gelu, "exact", loss_chunk_tokens=None)
    assert _classes(gelu) == classes
