"""``activation_checkpointing.mode: sublayer`` (pre-norm sublayer checkpointing), with
``memory.policy.norm: lowrank:R`` LoRAct's pre-norm sublayer mode, and the ``recompute``
storage policies of ``attention`` and ``swiglu`` (the same checkpoint of one sublayer).

References:

- **Exact** (``norm: keep``, uncompressed and ``compact`` on every site): the sublayers re-run
  from the very tensor the norm kept, with the same ops and the same stored seeds: loss and
  every gradient bit-identical to the uncheckpointed model, fp32 and bf16, TP = 1, 2, 2 + SP
  (mode ``sublayer``; ``attention`` and ``swiglu`` ``recompute``, each alone at TP = 1).
- **LoRAct's rule** (``norm: lowrank:8``, one block's attention sublayer, fp32 and bf16): the
  sublayer's parameter gradients and the gradient into the norm output equal plain autograd of
  the sublayer at ``y_hat = L Q^T``, bit for bit, and the norm's input and weight gradients
  equal the norm's own backward (which reads the same ``y_hat``) of that gradient, bit for
  bit. Both read the *one* factorisation: the tensors the checkpoint keeps are the norm's
  (same storage). The identity branch is exact: with proj zeroed the sublayer adds nothing and
  the input gradient is ``g`` bit for bit.
- **Memory**: byte-exact against the memory model in ``tests/integration/test_memory_plan.py``.
"""

from __future__ import annotations

import pytest
import torch

from actcomp_dist import CompressionConfig
from actcomp_dist.cost_model import Device, predict_step_time
from actcomp_dist.memory import SavedTensorCounter
from actcomp_dist.models import build_llama, get_model_config
from actcomp_dist.models.weights import load_full_weights
from actcomp_dist.parallel import state
from actcomp_dist.storage import StoragePolicy
from actcomp_dist.training.activation_checkpointing import (
    apply_activation_checkpointing,
    checkpoint_sublayer,
)
from actcomp_dist.training.config import ConfigError, run_config_from_dict
from tests.helpers.distributed import run_distributed
from tests.helpers.llama_reference import (
    loaded_llama,
    loss_and_full_grads,
    next_token_batch,
    random_full_weights,
)

SMALL = get_model_config("tiny", seq_length=32)
DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])


def _model(dtype, full, mode, compression=None, storage_policy=None, sequence_parallel=False):
    model = loaded_llama(
        SMALL,
        full,
        dtype,
        compression,
        sequence_parallel=sequence_parallel,
        storage_policy=storage_policy,
    )
    apply_activation_checkpointing(model, mode, None)
    return model


SITES = ("qkv", "proj", "fc1", "fc2")
#: name: (checkpointing mode, memory.policy), each against mode none with everything kept.
EXACT = {
    "sublayer": ("sublayer", {}),
    "recompute": ("none", {"attention": "recompute", "swiglu": "recompute"}),
}


def _exact_run(sequence_parallel=False, cases=EXACT):
    full = random_full_weights(SMALL, seed=1)
    tokens, labels = next_token_batch(SMALL)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        for method in ("none", "compact"):
            compression = CompressionConfig(method=method, rank=0.25, seed=3, sites=SITES)
            for name, (mode, policy) in {"keep": ("none", {}), **cases}.items():
                storage = StoragePolicy.from_mapping(policy)
                model = _model(dtype, full, mode, compression, storage, sequence_parallel)
                out[dtype, method, name] = loss_and_full_grads(model, tokens, labels)
    return out


def _assert_bit_identical(results, cases=EXACT):
    for dtype in (torch.float32, torch.bfloat16):
        for method in ("none", "compact"):
            keep_loss, keep_grads = results[dtype, method, "keep"]
            for case in cases:
                loss, grads = results[dtype, method, case]
                assert torch.equal(loss, keep_loss), (dtype, method, case)
                for name, grad in keep_grads.items():
                    assert torch.equal(grads[name], grad), (dtype, method, case, name)


def test_sublayer_checkpointing_with_kept_norms_is_exact(single_rank):
    _assert_bit_identical(_exact_run())


def test_recompute_of_one_sublayer_is_exact(single_rank):
    cases = {
        "attention": ("none", {"attention": "recompute"}),
        "swiglu+selective": ("selective", {"swiglu": "recompute"}),
    }
    _assert_bit_identical(_exact_run(cases=cases), cases)


def test_recompute_refused_where_it_removes_nothing():
    for kind, reason in (
        ("norm", "the norm's input instead of its output, the same N h bytes"),
        ("block_input", "is what checkpointing keeps in order to recompute"),
        ("fc1", "recompute that op's sublayer with memory.policy.attention or"),
    ):
        with pytest.raises(ConfigError) as error:
            run_config_from_dict({"memory": {"policy": {kind: "recompute"}}})
        text = str(error.value)
        assert f"memory.policy.{kind}='recompute' removes no bytes: " in text and reason in text
    with pytest.raises(ConfigError, match=r"memory.policy=\{'swiglu': 'recompute'\} needs"):
        run_config_from_dict(
            {"memory": {"efficient_ops": False, "policy": {"swiglu": "recompute"}}}
        )


def _tp_run(rank, world_size, sequence_parallel):
    state.initialize_model_parallel(world_size)
    return _exact_run(sequence_parallel)


@pytest.mark.distributed
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2_sp"])
def test_sublayer_checkpointing_with_kept_norms_is_exact_at_tp2(tmp_path, sequence_parallel):
    for results in run_distributed(_tp_run, 2, tmp_path, sequence_parallel):
        _assert_bit_identical(results)


def _attention_case(dtype, zero_proj=False):
    model = build_llama(SMALL, init_seed=0, storage_policy=StoragePolicy(norm="lowrank:8"))
    load_full_weights(model, random_full_weights(SMALL, seed=1))
    layer = model.layers[0].to(dtype)
    if zero_proj:
        layer.attention.proj.weight.data.zero_()
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(32, 2, SMALL.hidden_size, generator=generator).to(dtype)  # [s, b, h]
    grad_out = torch.randn(x.shape, generator=generator).to(dtype)
    return layer, x, model.rope(32, dtype), grad_out


def _sublayer(layer, rope):
    return lambda normed: layer.attention(normed, rope)


@DTYPES
def test_pre_norm_sublayer_follows_loracts_rule(single_rank, dtype):
    layer, x, rope, grad_out = _attention_case(dtype)
    norm, attention = layer.input_norm, _sublayer(layer, rope)

    x1 = x.clone().requires_grad_(True)
    with SavedTensorCounter() as counter:
        y = norm(x1)
        out = x1 + checkpoint_sublayer(attention, y)
    packer, (low, q) = y.stored_as
    # One factorisation: the block keeps the norm's L, Q and fp32 rstd, nothing else (the
    # checkpoint's kept tensors are the norm's, the same storage, counted once).
    factors = (low.numel() + q.numel()) * low.element_size()
    assert counter.total_bytes == factors + low.shape[0] * 4
    with torch.no_grad():  # forward from the exact norm output
        assert torch.equal(out, x + attention(y.detach()))
    out.backward(grad_out)
    grads = {name: p.grad.clone() for name, p in layer.named_parameters() if p.grad is not None}
    layer.zero_grad(set_to_none=True)

    # Reference: the sublayer at the reconstruction by plain autograd, then the norm's own
    # backward of that gradient (it reads the same factors), plus the identity branch.
    y_hat = (low @ q.t()).reshape(y.shape).detach().requires_grad_(True)
    attention(y_hat).backward(grad_out)
    x2 = x.clone().requires_grad_(True)
    norm(x2).backward(y_hat.grad)
    for name, p in layer.named_parameters():
        if name.startswith("attention."):
            assert torch.equal(grads[name], p.grad), name
    assert torch.equal(grads["input_norm.weight"], layer.input_norm.weight.grad)
    assert torch.equal(x1.grad, grad_out + x2.grad)
    assert not torch.equal(y_hat.detach(), y.detach())  # rank 8 of 64 tokens: not exact


@DTYPES
def test_pre_norm_sublayer_identity_branch_is_exact(single_rank, dtype):
    layer, x, rope, grad_out = _attention_case(dtype, zero_proj=True)
    x1 = x.clone().requires_grad_(True)
    out = x1 + checkpoint_sublayer(_sublayer(layer, rope), layer.input_norm(x1))
    out.backward(grad_out)
    assert torch.equal(out, x)
    assert torch.equal(x1.grad, grad_out)


def test_sublayer_mode_needs_the_efficient_block(single_rank):
    model = build_llama(SMALL, init_seed=0, efficient_ops=False)
    with pytest.raises(ValueError, match="'sublayer' .* needs memory.efficient_ops=true"):
        apply_activation_checkpointing(model, "sublayer", None)
    with pytest.raises(ConfigError, match="mode='sublayer' .* needs memory.efficient_ops=true"):
        run_config_from_dict(
            {"memory": {"efficient_ops": False}, "activation_checkpointing": {"mode": "sublayer"}}
        )
    config = run_config_from_dict(
        {
            "memory": {"policy": {"norm": "lowrank:0.125"}},
            "activation_checkpointing": {"mode": "sublayer"},
        }
    )
    assert config.activation_checkpointing.mode == "sublayer"


def test_recompute_variants_cost_their_sublayer_forward():
    """The planner's step-time model charges a ``recompute_KIND`` variant one more forward of
    that sublayer: 2 flops per weight of its linears per token (and the attention core)."""
    model = get_model_config("60m", seq_length=256)
    h, f, s, layers = model.hidden_size, model.ffn_hidden_size, 256, model.num_layers
    qkv = (model.num_attention_heads + 2 * model.query_groups) * model.head_dim * h
    proj = model.num_attention_heads * model.head_dim * h
    device = Device(peak_flops=1e15)
    expected = {
        "recompute_swiglu": 2.0 * (2 * f * h + f * h),
        "recompute_attention": 2.0 * (qkv + proj) + 4.0 * h * s,
    }
    for storage, work in expected.items():
        time = predict_step_time(
            model,
            CompressionConfig(),
            seq_length=s,
            micro_batch_size=2,
            storage=storage,
            device=device,
        )
        assert time.extra == {"recompute": pytest.approx(layers * work / 1e15, rel=1e-12)}
