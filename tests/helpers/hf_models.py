"""Tiny random Hugging Face causal LMs and the references the ``actcomp_dist.hf`` tests share.

Built from their configs (nothing downloaded), with weights from
:func:`tests.helpers.hf_weights.randomize_weights`. transformers and peft are imported when a
model is built: a test module that uses these skips itself with ``pytest.importorskip`` first.
"""

from __future__ import annotations

import copy
import os

import torch

from actcomp_dist.hf import apply_memory_policy
from tests.helpers.hf_weights import randomize_weights
from tests.helpers.tolerances import UNIT_ROUNDOFF, assert_as_accurate_as, gamma

os.environ.setdefault("HF_HUB_OFFLINE", "1")

HIDDEN, INTERMEDIATE, LAYERS, HEADS, GROUPS, VOCAB = 64, 96, 2, 4, 2, 256
BATCH, SEQ = 2, 16
TOKENS = BATCH * SEQ
FAMILIES = ("llama", "mistral", "qwen2")
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA_RANK = 8


def make_model(family: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    """A tiny random causal LM of ``family`` built from its config (nothing downloaded).

    Weights at std 1/sqrt(fan-in) and norm weights away from 1 (a norm backward that ignored
    its weight could not go unnoticed)."""
    import transformers

    kwargs = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=GROUPS,
        max_position_embeddings=64,
        use_cache=False,
    )
    kwargs.update(overrides)
    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[family]
    torch.manual_seed(seed)
    model = model_class(config_class(**kwargs))
    randomize_weights(model, seed)
    return model.train()


def make_lora_model(family: str = "llama", seed: int = 0, policy_first: bool = False):
    """PEFT LoRA r=``LORA_RANK`` on all seven projections of :func:`make_model`; B random (PEFT's
    zero init would make A's gradient zero and hide a wrong one). ``policy_first``: ``exact``
    applied to the base model before PEFT wraps it (same weights)."""
    import peft

    config = peft.LoraConfig(
        r=LORA_RANK, lora_alpha=16, target_modules=ALL_LINEAR, init_lora_weights=False
    )
    base = make_model(family, seed)
    if policy_first:
        apply_memory_policy(base, "exact", loss_chunk_tokens=None)
    torch.manual_seed(seed + 1)
    return peft.get_peft_model(base, config)


def make_hf_model(
    directory,
    *,
    groups: int = 2,
    tie: bool = False,
    dtype: torch.dtype = torch.float32,
    max_shard_size: str | None = None,
    seed: int = 0,
):
    """A tiny random ``LlamaForCausalLM`` saved to ``directory``; returns the model (fp32 eval).

    Weights at std 1/sqrt(fan-in) and norm weights away from 1, so attention is far from
    uniform and a wrong layout (q/k order, GQA grouping, gate/up) cannot go unnoticed.
    """
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=groups,
        max_position_embeddings=32,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    randomize_weights(model, seed)
    model = model.to(dtype)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    return model.float().eval()


def random_tokens(seed: int = 0) -> torch.Tensor:
    """[BATCH, SEQ] token ids drawn uniformly from the vocabulary of :func:`make_model`."""
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(seed))


def causal_lm_loss(model, tokens) -> torch.Tensor:
    """The model's own loss with the tokens as their labels (transformers shifts them)."""
    return model(input_ids=tokens, labels=tokens).loss


def loss_and_grads(model, tokens, autocast: bool = False):
    """Loss and a copy of every parameter gradient, from zeroed gradients; ``autocast``: the
    forward under CPU bf16 autocast."""
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        loss = causal_lm_loss(model, tokens)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def float64_grads(model, tokens) -> dict[str, torch.Tensor]:
    """The gradients of a float64 copy of ``model`` (the model itself is left as it is)."""
    reference = copy.deepcopy(model).double()
    _, grads = loss_and_grads(reference, tokens)
    return grads


def assert_as_accurate_as_unpatched(patched, unpatched, reference, dtype, what=""):
    """Per tensor: max |patched - float64| <= 2 max |unpatched - float64| + eps max |float64|
    (:func:`tests.helpers.tolerances.assert_as_accurate_as`), over the same set of gradients.

    Both errors come from rounding the same quantities in reductions of the same lengths, so a
    patched op is held to twice the unpatched model's error plus one rounding of the largest
    reference value; a wrong term would be of the order of the gradient itself."""
    assert set(patched) == set(unpatched) == set(reference)
    assert_as_accurate_as(patched, unpatched, reference, dtype, what)


def fused_loss_rounding_bound(model, tokens, labels, num_items, autocast=False) -> float:
    """Twice the rounding bound of the causal-LM loss computed from the model's hidden states
    (the output layer and cross-entropy; tests/unit/test_hf_loss.py derives it), so two
    evaluations of it (transformers' loss, the fused one) differ by at most this:
    the logits' error times ``A = sum_i 2 max_v (|h_i| |W|^T)_v`` plus the fp32 log-sum-exp
    and sum's ``gamma_{V + n} B``, ``B = sum_i |lse_i| + |z_yi|``, both over the normaliser.
    Under bf16 autocast the logits' error is the rounding of ``h``, ``W`` and ``z`` to bf16
    (``3 u_bf16``) plus the fp32 accumulation of the GEMM (as PyTorch's bf16 GEMMs
    accumulate)."""
    causal_lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    with torch.no_grad():
        hidden = causal_lm.model(input_ids=tokens).last_hidden_state.double()
    weight = causal_lm.lm_head.weight.detach().double()
    target = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:]
    rows, picked = hidden[target != -100], target[target != -100]  # [n, h], [n]
    normaliser = rows.shape[0] if num_items is None else num_items
    z = rows @ weight.t()  # [n, V]
    logits_part = 2 * (rows.abs() @ weight.abs().t()).amax(1).sum().item() / normaliser
    lse_part = torch.logsumexp(z, 1).abs() + z.gather(1, picked[:, None]).abs().squeeze(1)
    lse_part = lse_part.sum().item() / normaliser
    logits_rounding = gamma(weight.shape[1], torch.float32)
    if autocast:
        logits_rounding += 3 * UNIT_ROUNDOFF[torch.bfloat16]
    reduction = weight.shape[0] + rows.shape[0]
    return 2 * (logits_rounding * logits_part + gamma(reduction, torch.float32) * lse_part)
