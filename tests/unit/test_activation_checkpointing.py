"""Activation checkpointing composes with compression.

References: the same model without checkpointing. Every mode must give a bit-identical loss
(the forward runs the same float operations), for ``compact`` too because the recompute
rebuilds the same projection from the same seeds, and for ``lowrank`` because the recompute
replays the schedule's per-call counter and redraws the forward's sample. Gradients are
bit-identical too, except with selective recompute in the naive block: there the recomputed
RMSNorm outputs make
autograd add a residual stream's gradient contributions in another order, so those gradients
are compared with a float64 reference (the model written from its logical weights in float64,
``tests/helpers/llama_reference.reference_logits``; for ``compact`` its compressed weights' gradient
lifted as ``G P P^T`` with the layer's projection): each must be as accurate as the
un-checkpointed model's (tests/tolerances.assert_as_accurate_as).
Saved bytes are exact storage counts, so their order is asserted strictly.
"""

from __future__ import annotations

import pytest
import torch

from actcomp_dist import CompressionConfig
from actcomp_dist.memory import saved_activation_bytes
from actcomp_dist.models import build_llama, full_state_dict, gather_full, get_model_config
from actcomp_dist.training.activation_checkpointing import apply_activation_checkpointing
from tests.helpers.llama_reference import reference_grads
from tests.helpers.tolerances import assert_as_accurate_as

CONFIG = get_model_config("tiny", seq_length=32, num_layers=2)


def _model(method: str, mode: str, num_layers=None, efficient_ops=True):
    model = build_llama(
        CONFIG,
        CompressionConfig(method=method, rank=0.25, seed=3),
        init_seed=0,
        efficient_ops=efficient_ops,
    )
    apply_activation_checkpointing(model, mode, num_layers)
    return model


def _batch():
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, CONFIG.vocab_size, (2, 33), generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


def _loss_and_grads(model):
    tokens, labels = _batch()
    loss = model.loss(tokens, labels)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


# The compressed sites' logical weights: their gradient under ``compact`` is G P P^T.
_LIFTED = {
    ("attention", "qkv"): ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("mlp", "fc1"): ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp", "fc2"): ("mlp.down_proj",),
}


def _float64_grads(model, method):
    """float64 gradients of the loss w.r.t. the logical weights; ``compact``'s compressed
    weights get the exact gradient lifted through the layer's own (fp32-drawn) projection."""
    tokens, labels = _batch()
    reference = reference_grads(full_state_dict(model), CONFIG, tokens, labels)
    if method == "compact":
        for i, layer in enumerate(model.layers):
            for (part, site), names in _LIFTED.items():
                compressor = getattr(getattr(layer, part), site).compressor
                p = compressor.projection(
                    compressor.current_seeds(), torch.device("cpu"), torch.float64
                )
                for name in names:
                    key = f"model.layers.{i}.{name}.weight"
                    reference[key] = reference[key] @ p @ p.t()
    return reference


@pytest.mark.parametrize("efficient_ops", [True, False], ids=["efficient", "naive"])
@pytest.mark.parametrize("method", ["none", "compact", "lowrank"])
@pytest.mark.parametrize("mode,num_layers", [("selective", None), ("full", None), ("full", 1)])
def test_checkpointing_matches_no_checkpointing_exactly(
    single_rank, method, mode, num_layers, efficient_ops
):
    plain = _model(method, "none", efficient_ops=efficient_ops)
    ref_loss, ref_grads = _loss_and_grads(plain)
    loss, grads = _loss_and_grads(_model(method, mode, num_layers, efficient_ops))
    assert torch.equal(loss, ref_loss)
    if efficient_ops or mode != "selective":  # the same ops in the same order
        for name, grad in ref_grads.items():
            assert torch.equal(grads[name], grad), name
        return
    reference = _float64_grads(plain, method)
    assert_as_accurate_as(
        gather_full(plain, grads), gather_full(plain, ref_grads), reference, torch.float32, method
    )


def _saved(method: str, mode: str, num_layers=None, efficient_ops=False) -> int:
    model = _model(method, mode, num_layers, efficient_ops)
    tokens, labels = _batch()
    return saved_activation_bytes(lambda: model.loss(tokens, labels))


def test_saved_bytes_fall_with_compression_and_checkpointing(single_rank):
    """In the naive block; the memory-efficient one is tested in tests/distributed/test_efficient_ops.py."""
    none = _saved("none", "none")
    compact = _saved("compact", "none")
    selective_compact = _saved("compact", "selective")
    full_compact = _saved("compact", "full")
    assert none > compact > selective_compact > full_compact
    # Full checkpointing keeps each block's input (s*b*h fp32) — visible to the counter.
    block_input = 32 * 2 * CONFIG.hidden_size * 4
    assert full_compact >= CONFIG.num_layers * block_input
    assert _saved("compact", "full", 1) > full_compact
