"""The hand-written float64 LLaMA the model tests compare against, and what they feed it and
the model under test: random logical weights, a next-token batch, the model built with those
weights (:func:`loaded_llama`), its loss and gathered gradients, and the check that a stored-
activation policy is as accurate as ``keep`` against the float64 gradients.

:func:`reference_logits` evaluates LLaMA from its logical weights (Hugging Face names and
shapes, :func:`actcomp_dist.models.weights.logical_shapes`) with nothing from the package but
the config: RMSNorm, RoPE as a complex rotation, grouped-query causal attention, SwiGLU, the
(possibly tied) head. In float64 it is the reference every layout (TP, SP, efficient ops,
stored-activation policies) is held to; in float32 it is the plain evaluation a model's own
fp32 error is measured against (``tests.helpers.tolerances.assert_as_accurate_as``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from actcomp_dist.models import LlamaConfig, build_llama, gather_full, load_full_weights
from actcomp_dist.models.weights import logical_shapes
from tests.helpers.tolerances import assert_as_accurate_as


def random_full_weights(config: LlamaConfig, seed: int) -> dict[str, torch.Tensor]:
    """Logical weights at a scale where attention is far from uniform (std 1/sqrt(fan-in))
    and every norm weight differs from 1, so a wrong layout or name cannot go unnoticed."""
    generator = torch.Generator().manual_seed(seed)
    full = {}
    for name, shape in logical_shapes(config).items():
        if len(shape) == 1:
            full[name] = 1.0 + 0.2 * torch.randn(shape, generator=generator)
        else:
            full[name] = torch.randn(shape, generator=generator) / math.sqrt(shape[-1])
    return full


def next_token_batch(config: LlamaConfig, b: int = 2, s: int = 32, seed: int = 0):
    """Random ``tokens`` [b, s] and their next-token ``labels`` [b, s]."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, config.vocab_size, (b, s + 1), generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


def reference_rope(x: torch.Tensor, theta: float, dtype=torch.float64) -> torch.Tensor:
    """RoPE as a complex rotation: feature pair (j, j + d/2) at position p turns by
    p * theta^(-2j/d). x: [b, heads, s, d].

    In ``dtype``: float64 is the reference; in float32 the angles are formed as Hugging Face
    forms them (``1 / theta^(2j/d)``, then ``p * inv_freq``, in float32), the plain fp32
    evaluation a model is held to (``assert_as_accurate_as``)."""
    x = x.to(dtype)
    d, s = x.shape[-1], x.shape[-2]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.int64).to(dtype) / d)
    angles = torch.arange(s, dtype=dtype)[:, None] * inv_freq[None, :]  # [s, d/2]
    real, imag = x[..., : d // 2], x[..., d // 2 :]
    cos, sin = angles.cos(), angles.sin()
    return torch.cat((real * cos - imag * sin, real * sin + imag * cos), dim=-1)


def reference_attention(x, wq, wk, wv, wo, config: LlamaConfig, dtype=torch.float64):
    """Causal softmax(Q K^T / sqrt(d)) V with query head i reading kv head i // (heads /
    groups), in ``dtype`` (float64: the reference). x: [b, s, h] -> [b, s, h]."""
    x, wq, wk, wv, wo = (t.to(dtype) for t in (x, wq, wk, wv, wo))
    b, s, _ = x.shape
    heads, groups, d = config.num_attention_heads, config.query_groups, config.head_dim
    q = (x @ wq.T).view(b, s, heads, d).transpose(1, 2)
    k = (x @ wk.T).view(b, s, groups, d).transpose(1, 2)
    v = (x @ wv.T).view(b, s, groups, d).transpose(1, 2)
    q, k = reference_rope(q, config.rope_theta, dtype), reference_rope(k, config.rope_theta, dtype)
    kv_head = torch.arange(heads) // (heads // groups)
    k, v = k[:, kv_head], v[:, kv_head]
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    causal = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)
    probs = torch.softmax(scores.masked_fill(causal, float("-inf")), dim=-1)
    return (probs @ v).transpose(1, 2).reshape(b, s, heads * d) @ wo.T


def reference_logits(
    full: dict, config: LlamaConfig, tokens: torch.Tensor, dtype=torch.float64
) -> torch.Tensor:
    """LLaMA forward from the logical weights, in ``dtype`` (float64: the reference; float32:
    the plain fp32 evaluation a model is held to). tokens [b, s] -> logits [b, s, V]."""
    w = {name: t.to(dtype) for name, t in full.items()}

    def rms_norm(x, weight):
        return weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + config.rms_norm_eps)

    x = w["model.embed_tokens.weight"][tokens]
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        attn_in = rms_norm(x, w[p + "input_layernorm.weight"])
        x = x + reference_attention(
            attn_in, *(w[p + f"self_attn.{n}_proj.weight"] for n in "qkvo"), config, dtype
        )
        mlp_in = rms_norm(x, w[p + "post_attention_layernorm.weight"])
        gate = mlp_in @ w[p + "mlp.gate_proj.weight"].T
        up = mlp_in @ w[p + "mlp.up_proj.weight"].T
        x = x + (F.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
    x = rms_norm(x, w["model.norm.weight"])
    return x @ w.get("lm_head.weight", w["model.embed_tokens.weight"]).T


def reference_loss_and_grads(full: dict, config: LlamaConfig, tokens, labels):
    """float64 mean cross-entropy of :func:`reference_logits` and its gradients with respect
    to the logical weights ``full`` (cast to float64 from whatever dtype they are in)."""
    leaves = {name: w.detach().double().requires_grad_() for name, w in full.items()}
    logits = reference_logits(leaves, config, tokens)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    loss.backward()
    return loss.detach(), {name: leaf.grad for name, leaf in leaves.items()}


def reference_grads(full: dict, config: LlamaConfig, tokens, labels) -> dict[str, torch.Tensor]:
    """The gradients of :func:`reference_loss_and_grads`."""
    return reference_loss_and_grads(full, config, tokens, labels)[1]


def loaded_llama(config: LlamaConfig, full: dict, dtype: torch.dtype, compression=None, **kwargs):
    """``build_llama(config, compression, init_seed=0, **kwargs)`` with the logical weights
    ``full`` loaded (sharded over the current TP group) and its parameters, not its buffers,
    cast to ``dtype``, as DeepSpeed's bf16 engine casts them."""
    model = build_llama(config, compression, init_seed=0, **kwargs)
    load_full_weights(model, full)
    for param in model.parameters():
        param.data = param.data.to(dtype)
    return model


def loss_and_full_grads(model, tokens, labels):
    """A model's loss and its gradients gathered to the logical (unsharded) weights."""
    loss = model.loss(tokens, labels)
    loss.backward()
    grads = gather_full(model, {n: p.grad for n, p in model.named_parameters()})
    return loss.detach(), grads


def assert_exact_loss_and_as_accurate_as_keep(
    result, keep_result, weights: dict, config: LlamaConfig, dtype: torch.dtype, msg=""
) -> None:
    """``result`` and ``keep_result``: :func:`loss_and_full_grads` of a model that stores some
    activation otherwise (at full rank, say) and of the same model keeping it, with the logical
    ``weights`` on :func:`next_token_batch`. Forward results never change: the losses are bit
    for bit equal. The gradients are as accurate against the float64 reference as ``keep``'s
    (``assert_as_accurate_as``: at most twice its error plus one rounding of the largest entry
    in ``dtype``); a missing term or a rank reading another rank's shard is an error of the
    order of the gradient itself."""
    (loss, grads), (keep_loss, keep_grads) = result, keep_result
    assert torch.equal(loss, keep_loss), msg
    tokens, labels = next_token_batch(config)
    reference = reference_grads(weights, config, tokens, labels)
    assert_as_accurate_as(grads, keep_grads, reference, dtype, msg)
