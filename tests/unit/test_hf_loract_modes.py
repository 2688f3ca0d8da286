"""LoRAct's layer and pre-norm sublayer modes of ``actcomp_dist.hf.apply_memory_policy``.

- Layer mode (``block_input=lowrank:R``, preset ``"loract-layer"``): each decoder layer keeps the
  factors ``L``, ``Q`` of its input ``x`` and is re-run from ``x_hat = L Q^T`` in backward.
- Pre-norm sublayer mode (``norm=lowrank:R`` with ``attention`` and ``swiglu`` at
  ``recompute``, preset ``"loract-sublayer"``): each norm keeps ``rstd`` and the factors of
  its output ``y``; the attention / MLP sublayer keeps those same factors and is re-run from
  ``y_hat = L Q^T``; the norm's closed-form backward reads ``y_hat``.

References: LoRAct's rules written out independently here, on the unpatched model: a wrapped
module returns its exact forward value, ``f(x)``, but its gradients are those of ``f`` at the
reconstruction (``f(x_hat') + (f(x) - f(x_hat')).detach()`` with
``x_hat' = x + (x_hat - x).detach()``: the path from ``x`` through the identity of
``x_hat'`` is exact, which is the residual branch of a decoder layer). Run in float64 (the
reference) and float32 (an independent float32 implementation of the same rule); the patched
model must be as accurate as the latter against the former (twice its error plus one
rounding of the largest value: both round the same quantities in reductions of the same
lengths, with bit-identical factors since the forward is bit-identical; a wrong wiring would
be off by the size of the approximation, R = 4 of 64 columns here). Bytes: exact counts
against closed forms.
Policies applied with ``loss_chunk_tokens=None`` (transformers' loss; see test_hf_policy),
except one test of the modes with the default fused loss (what tools/hf_memory.py measures).
"""

from __future__ import annotations

import copy

import pytest
import torch

from actcomp_dist.config import CompressionConfig
from actcomp_dist.hf import apply_memory_policy
from actcomp_dist.memory import saved_activation_bytes_by_module
from actcomp_dist.storage import LowRankStorage
from tests.helpers.hf_models import (
    HEADS,
    HIDDEN,
    LAYERS,
    SEQ,
    TOKENS,
    assert_as_accurate_as_unpatched,
    causal_lm_loss,
    fused_loss_rounding_bound,
    loss_and_grads,
    make_lora_model,
    make_model,
    random_tokens,
)

peft = pytest.importorskip("peft")

RANK = 4  # of HIDDEN = 64 columns: far from exact, so a misplaced factor shows
LAYER_MODE = {"block_input": f"lowrank:{RANK}"}
SUBLAYER_MODE = {"norm": f"lowrank:{RANK}", "attention": "recompute", "swiglu": "recompute"}


class _OncePerTensor:
    """LoRAct's storage with the columns drawn afresh in every call, as the patched model's,
    factorising each tensor once however many times it is packed (the rule below packs a
    norm output in the norm and again in the sublayer reading it; the patched model keeps one
    factorisation for both): with the global RNG seeded alike, the draws are taken in the
    patched model's order."""

    def __init__(self) -> None:
        self.storage = LowRankStorage(RANK, fresh_columns=True)
        self.packed: list[tuple[torch.Tensor, tuple[torch.Tensor, ...]]] = []  # keeps x alive

    def pack(self, x):
        for seen, factors in self.packed:
            if seen.data_ptr() == x.data_ptr() and seen.shape == x.shape:
                return factors
        factors = self.storage.pack(x)
        self.packed.append((x, factors))
        return factors

    def unpack(self, packed, like):
        return self.storage.unpack(packed, like)


#: The global RNG seed of every run whose column draws must agree.
DRAWS_SEED = 7


def _at_reconstruction(forward, storage, attention: bool = False):
    """``forward`` with LoRAct's rule: exact value, gradients at ``x_hat = unpack(pack(x))``
    (an attention returns ``(output, weights)``: the output follows the rule)."""

    def wrapped(hidden_states, *args, **kwargs):
        x = hidden_states
        x_hat = storage.unpack(storage.pack(x), x)
        x_hat = x + (x_hat - x).detach()  # identity to x, value x_hat
        with torch.no_grad():
            exact = forward(x, *args, **kwargs)
        approx = forward(x_hat, *args, **kwargs)
        if attention:
            return approx[0] + (exact[0] - approx[0]).detach(), None
        return approx + (exact - approx).detach()

    return wrapped


class _NormReadingReconstruction(torch.autograd.Function):
    """RMSNorm with Hugging Face's forward whose backward is the closed form on
    ``x_hat = y_hat / weight`` (LoRAct's norm mode: the norm keeps ``rstd`` and ``y``'s factors):
    ``dx = rstd (dn - x_hat mean(dn x_hat))``, ``dn = g weight``; ``dw = sum(g x_hat)``."""

    @staticmethod
    def forward(ctx, x, weight, eps, storage):
        rstd = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
        y = weight * (x * rstd)
        ctx.save_for_backward(storage.unpack(storage.pack(y), y), weight, rstd)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        y_hat, weight, rstd = ctx.saved_tensors
        x_hat = y_hat / weight
        dn = grad_y * weight
        grad_x = rstd * (dn - x_hat * (dn * x_hat).mean(-1, keepdim=True))
        return grad_x, (grad_y * x_hat).reshape(-1, x_hat.shape[-1]).sum(0), None, None


def _rule_model(model, mode: str):
    """A copy of the unpatched ``model`` whose decoder layers follow LoRAct's rule by hand."""
    model = copy.deepcopy(model)
    storage = _OncePerTensor()
    for module in model.modules():
        if type(module).__name__ != "LlamaDecoderLayer":
            continue
        if mode == "layer":
            module.forward = _at_reconstruction(module.forward, storage)
            continue
        for norm in (module.input_layernorm, module.post_attention_layernorm):
            norm.forward = lambda x, norm=norm: _NormReadingReconstruction.apply(
                x, norm.weight, norm.variance_epsilon, storage
            )
        module.self_attn.forward = _at_reconstruction(
            module.self_attn.forward, storage, attention=True
        )
        module.mlp.forward = _at_reconstruction(module.mlp.forward, storage)
    return model


def _rule_grads(model, tokens, mode, dtype):
    rule = _rule_model(model, mode).to(dtype)
    torch.manual_seed(DRAWS_SEED)
    return loss_and_grads(rule, tokens)[1]


@pytest.mark.parametrize("mode", ["layer", "sublayer"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_modes_follow_loract_rules_against_float64(mode, lora):
    tokens = random_tokens()
    model = (make_lora_model if lora else make_model)()
    loss, _ = loss_and_grads(model, tokens)
    reference = _rule_grads(model, tokens, mode, torch.float64)
    rule32 = _rule_grads(model, tokens, mode, torch.float32)
    apply_memory_policy(
        model, LAYER_MODE if mode == "layer" else SUBLAYER_MODE, loss_chunk_tokens=None
    )
    torch.manual_seed(DRAWS_SEED)
    patched_loss, patched = loss_and_grads(model, tokens)
    assert torch.equal(patched_loss, loss)  # the forward is exact
    assert_as_accurate_as_unpatched(patched, rule32, reference, torch.float32, mode)


@pytest.mark.parametrize("mode", ["layer", "sublayer"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_modes_with_the_fused_loss_follow_loract_rules_against_float64(mode, lora):
    """The default ``loss_chunk_tokens`` (the fused output layer + loss) under the layer and
    sublayer modes changes the loss and gradients by rounding only: the loss within the fused
    loss's rounding bound of transformers' (tests/helpers/hf_models.py), the gradients as
    accurate against the float64 rule as the float32 rule with transformers' loss (the bound of the test above;
    a gradient the fused loss dropped or scaled wrongly would be off by its own size)."""
    tokens = random_tokens()
    model = (make_lora_model if lora else make_model)()
    loss, _ = loss_and_grads(model, tokens)
    reference = _rule_grads(model, tokens, mode, torch.float64)
    rule32 = _rule_grads(model, tokens, mode, torch.float32)
    apply_memory_policy(model, LAYER_MODE if mode == "layer" else SUBLAYER_MODE)
    torch.manual_seed(DRAWS_SEED)
    patched_loss, patched = loss_and_grads(model, tokens)
    bound = fused_loss_rounding_bound(model, tokens, tokens, None)
    assert (patched_loss - loss).abs().item() <= bound, (patched_loss, loss, bound)
    assert_as_accurate_as_unpatched(patched, rule32, reference, torch.float32, mode)


@pytest.mark.parametrize("mode", ["layer", "sublayer"])
@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non_reentrant"])
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_modes_compose_with_hf_gradient_checkpointing(mode, reentrant, lora):
    """Under HF gradient checkpointing (either variant) the same loss and gradients as without
    it (layer mode takes HF's place: one re-run; sublayer mode is re-run inside HF's)."""
    tokens = random_tokens()
    build = make_lora_model if lora else make_model
    policy = LAYER_MODE if mode == "layer" else SUBLAYER_MODE
    plain = apply_memory_policy(build(), policy, loss_chunk_tokens=None)
    torch.manual_seed(DRAWS_SEED)
    loss, grads = loss_and_grads(plain, tokens)
    model = apply_memory_policy(build(), policy, loss_chunk_tokens=None)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    if lora and reentrant and mode == "sublayer":
        model.enable_input_require_grads()  # HF's reentrant checkpoint needs it (not ours)
    # The columns are drawn in every call (global RNG); HF's checkpointing replays the RNG
    # state in its re-run, so it draws the same columns.
    torch.manual_seed(DRAWS_SEED)
    checkpointed_loss, checkpointed = loss_and_grads(model, tokens)
    assert torch.equal(checkpointed_loss, loss)
    assert set(checkpointed) == set(grads)
    for name, grad in grads.items():
        # The same ops on the same (bit-identical) inputs and factors.
        assert torch.equal(checkpointed[name], grad), name


#: What a re-run layer or sublayer keeps besides its input: the tensors of its call (the RoPE
#: cos / sin, [1, S, head_dim] fp32 each, and the position ids, [1, S] int64), the same
#: tensors for every layer, so counted once.
ROPE_BYTES = 2 * SEQ * (HIDDEN // HEADS) * 4 + SEQ * 8


def _layer_bytes(model, tokens) -> int:
    by_module = saved_activation_bytes_by_module(model, lambda: causal_lm_loss(model, tokens))
    return sum(n for name, n in by_module.items() if ".layers." in name)


def test_layer_mode_keeps_the_input_factors_only():
    """Per decoder layer ``(N + h) R`` elements (``L``, ``Q``) and nothing else of the layer;
    ``exact`` under HF gradient checkpointing keeps the ``N h`` input instead."""
    tokens = random_tokens()
    model = apply_memory_policy(make_lora_model(), "exact", loss_chunk_tokens=None)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert _layer_bytes(model, tokens) == 4 * LAYERS * TOKENS * HIDDEN
    apply_memory_policy(model, LAYER_MODE, loss_chunk_tokens=None)  # takes HF checkpointing's place
    assert _layer_bytes(model, tokens) == 4 * LAYERS * (TOKENS + HIDDEN) * RANK + ROPE_BYTES
    model.gradient_checkpointing_disable()
    assert _layer_bytes(model, tokens) == 4 * LAYERS * (TOKENS + HIDDEN) * RANK + ROPE_BYTES


def test_sublayer_mode_keeps_one_factorisation_per_norm():
    """A sublayer keeps nothing but its norm's factors (one storage for norm and sublayer):
    per norm the fp32 ``rstd`` (N) and ``(N + h) R`` factors. The first norm under PEFT has
    nothing upstream to differentiate: it keeps no ``rstd`` (its factors are still kept, by
    the attention that reads them)."""
    tokens = random_tokens()
    model = apply_memory_policy(make_lora_model(), SUBLAYER_MODE, loss_chunk_tokens=None)
    per_norm = TOKENS + (TOKENS + HIDDEN) * RANK
    expected = 4 * (2 * LAYERS * per_norm - TOKENS) + ROPE_BYTES
    assert _layer_bytes(model, tokens) == expected
    full = apply_memory_policy(make_model(), SUBLAYER_MODE, loss_chunk_tokens=None)
    assert _layer_bytes(full, tokens) == 4 * 2 * LAYERS * per_norm + ROPE_BYTES


def test_preset_ranks_and_refusals():
    model = make_lora_model()
    apply_memory_policy(model, "loract-sublayer", loss_chunk_tokens=None)
    norm = model.base_model.model.model.layers[0].input_layernorm
    assert norm._actcomp_norm.rank == HIDDEN // 8
    apply_memory_policy(model, "loract-layer", loss_chunk_tokens=None)
    assert model.base_model.model.model.layers[0]._actcomp_block_input.rank == HIDDEN // 8
    classes = [type(m) for m in model.modules()]
    with pytest.raises(ValueError, match="nothing to compress"):
        apply_memory_policy(
            model, LAYER_MODE, compression=CompressionConfig("compact"), loss_chunk_tokens=None
        )
    with pytest.raises(ValueError, match="memory.policy.norm='recompute' is not served"):
        apply_memory_policy(model, {"norm": "recompute"}, loss_chunk_tokens=None)
    assert [type(m) for m in model.modules()] == classes
