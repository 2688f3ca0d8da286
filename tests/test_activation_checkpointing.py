"""Activation checkpointing composes with compression.

References: the same model without checkpointing. Every mode must give a bit-identical loss
(the forward runs the same float operations), for ``compact`` too because the recompute
rebuilds the same projection from the same seeds, and for ``lowrank`` because the recompute
replays the schedule's per-call counter and redraws the forward's sample. Gradients agree to float32 rounding: under
recompute autograd may add a tensor's several gradient contributions in another order.
Saved bytes are exact storage counts, so their order is asserted strictly.
"""

from __future__ import annotations

import pytest
import torch

from actcomp_dist import CompressionConfig
from actcomp_dist.memory import saved_activation_bytes
from actcomp_dist.models import build_llama, get_model_config
from actcomp_dist.training.activation_checkpointing import apply_activation_checkpointing

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


@pytest.mark.parametrize("efficient_ops", [True, False], ids=["efficient", "naive"])
@pytest.mark.parametrize("method", ["none", "compact", "lowrank"])
@pytest.mark.parametrize("mode,num_layers", [("selective", None), ("full", None), ("full", 1)])
def test_checkpointing_matches_no_checkpointing_exactly(
    single_rank, method, mode, num_layers, efficient_ops
):
    ref_loss, ref_grads = _loss_and_grads(_model(method, "none", efficient_ops=efficient_ops))
    loss, grads = _loss_and_grads(_model(method, mode, num_layers, efficient_ops))
    assert torch.equal(loss, ref_loss)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def _saved(method: str, mode: str, num_layers=None, efficient_ops=False) -> int:
    model = _model(method, mode, num_layers, efficient_ops)
    tokens, labels = _batch()
    return saved_activation_bytes(lambda: model.loss(tokens, labels))


def test_saved_bytes_fall_with_compression_and_checkpointing(single_rank):
    """In the naive block; the memory-efficient one is tested in tests/test_efficient_ops.py."""
    none = _saved("none", "none")
    compact = _saved("compact", "none")
    selective_compact = _saved("compact", "selective")
    full_compact = _saved("compact", "full")
    assert none > compact > selective_compact > full_compact
    # Full checkpointing keeps each block's input (s*b*h fp32) — visible to the counter.
    block_input = 32 * 2 * CONFIG.hidden_size * 4
    assert full_compact >= CONFIG.num_layers * block_input
    assert _saved("compact", "full", 1) > full_compact
