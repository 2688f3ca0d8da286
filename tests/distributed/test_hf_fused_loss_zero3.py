"""The fused head + loss of ``apply_memory_policy(..., loss_chunk_tokens=N)``
(:mod:`actcomp_dist.hf.loss`) under DeepSpeed ZeRO-3 on 2 gloo ranks.

The fused function reads ``lm_head.weight`` inside the causal LM's forward without calling
``lm_head``; under ZeRO-3 the module holds an empty tensor outside forward (checked here:
``stage3_param_persistence_threshold: 0`` partitions even this tiny head). The gathered
gradients (``safe_get_full_grad``) of the patched and the unpatched model are both compared
with the unpatched model run in float64 outside DeepSpeed: the patched error no larger than
twice the unpatched one plus one rounding of the largest value
(:func:`tests.helpers.tolerances.assert_as_accurate_as`), the losses within the same rule.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers.distributed import run_distributed
from tests.helpers.tolerances import assert_as_accurate_as

pytest.importorskip("transformers")
pytest.importorskip("deepspeed")

CHUNK = 16


def _zero3_step(rank, world_size, chunk):
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    from actcomp_dist.hf import apply_memory_policy
    from tests.helpers.hf_models import BATCH, make_model, random_tokens

    model = make_model()
    if chunk is not None:
        apply_memory_policy(model, "exact", loss_chunk_tokens=chunk)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        config={
            "train_micro_batch_size_per_gpu": BATCH,
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
            "zero_allow_untested_optimizer": True,  # torch's SGD
        },
    )
    tokens = random_tokens()
    loss = engine(input_ids=tokens, labels=tokens).loss
    engine.backward(loss)
    grads = {  # collective: every rank, in the same order
        name: safe_get_full_grad(param).detach().clone()
        for name, param in engine.module.named_parameters()
    }
    head_shape = tuple(engine.module.lm_head.weight.shape)
    return (loss.detach().reshape(1), grads, head_shape) if rank == 0 else None


def test_fused_loss_under_deepspeed_zero3(tmp_path):
    from tests.helpers.hf_models import make_model, random_tokens

    fused_loss, fused, fused_head = run_distributed(_zero3_step, 2, tmp_path, CHUNK, timeout=300)[0]
    plain_loss, plain, plain_head = run_distributed(_zero3_step, 2, tmp_path, None, timeout=300)[0]
    assert fused_head == plain_head == (0,)  # partitioned: the test means something
    reference_model = make_model().double()
    tokens = random_tokens()
    reference_loss = reference_model(input_ids=tokens, labels=tokens).loss
    reference_loss.backward()
    reference = {n: p.grad for n, p in reference_model.named_parameters()}
    reference["loss"] = reference_loss.detach().reshape(1)
    fused["loss"], plain["loss"] = fused_loss, plain_loss
    assert set(fused) == set(plain) == set(reference)
    assert_as_accurate_as(fused, plain, reference, torch.float32, "zero3")
