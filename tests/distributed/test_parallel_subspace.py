"""``subspace`` mode across tensor- and data-parallel ranks (4 gloo ranks: TP=2 x DP=2).

Reference: the same tiny LLaMA at TP=1, DP=1 on the concatenated batch. Each data-parallel
replica sees half of the batch; ``SubspaceAdamW`` averages the m x r compressed gradients over
the data-parallel group (one flat all-reduce of m x r tensors, never m x n), which must give
the compressed gradient of the mean loss over the whole batch. Gathered over TP into the
logical (unsharded) layout, every compressed gradient must match the reference up to float
reduction order: the rounding bound ``2 gamma_k |g|^T |X| |P|`` of tests/helpers/tolerances.py, with the
magnitude taken from the reference layers' own inputs and upstream gradients and ``k`` the
total length of the reductions on the forward and backward path (a first-order bound: the
inputs' own errors are counted through their magnitudes). One optimizer step must then move
every compressed weight by the subspace rule ``W - lr alpha N(G_hat) P^T`` evaluated in float64
from that layout's own compressed gradient and its own projection shard. (Comparing the updated
weights across layouts directly would be ill-posed: Adam's first direction
``G_hat / (|G_hat| + eps)`` turns reduction-order noise in entries near ``eps`` into
differences of order one; the rule and the layout invariance of ``G_hat`` together imply the
same step.)
"""

from __future__ import annotations

import pytest
import torch

from actcomp_dist.subspace import is_subspace_parameter
from tests.helpers.distributed import run_distributed
from tests.helpers.tolerances import assert_within_rounding, gamma

BATCH, SEQ = 4, 16
LR, EPS, SCALE = 1e-2, 1e-8, 0.25  # SubspaceAdamW: lr, eps, subspace_scale (alpha)


def _compressed_layers(model):
    for layer in model.layers:
        yield from (layer.attention.qkv, layer.mlp.fc1, layer.mlp.fc2)


def _named_dense_rows(model):
    """The layers whose projection is a dense row shard (``G_hat`` replicated over TP)."""
    for name, module in model.named_modules():
        compressor = getattr(module, "compressor", None)
        if compressor is not None and compressor.layout.partial_sum:
            yield name, module


def _capture_magnitudes(model):
    """Hooks that record, per compressed layer, ``|g|^T |X| |P|`` [m, r] in float64: the
    magnitude of the terms of its compressed gradient ``g^T X P``."""
    magnitudes = {}

    def hook(layer, inputs, kwargs, output):
        # FC2 of the memory-efficient block receives [gate | up] and the SwiGLU as its input
        # recipe (``input_fn``): its input X is the recipe's result.
        x = inputs[0].detach()
        if kwargs.get("input_fn") is not None:
            x = kwargs["input_fn"](x)
        x = x.double().abs().reshape(-1, x.shape[-1])  # [N, n]
        seeds = layer.compressor.current_seeds()
        p = layer.weight.subspace.projection(x.device, torch.float64, seeds).abs()  # [n, r]
        xp = x @ p  # [N, r]
        if layer.compressor.layout.partial_sum:  # Z sums every rank's features: so do its terms
            torch.distributed.all_reduce(xp, group=layer.tp_group)

        def grad_hook(grad):
            g = grad.detach().double().abs().reshape(-1, grad.shape[-1])  # [N, m]
            magnitudes[layer.weight] = g.t() @ xp

        output[0].register_hook(grad_hook)

    handles = [
        layer.register_forward_hook(hook, with_kwargs=True) for layer in _compressed_layers(model)
    ]
    return magnitudes, handles


def _subspace_rule_violation(weight, before, ghat, seeds) -> float:
    """How far (in units of its rounding bound) one SubspaceAdamW step from zero moments moved
    ``weight`` away from ``before - lr alpha N P^T``, evaluated in float64 from the layout's
    own compressed gradient ``ghat`` [m, r] and projection shard."""
    ghat = ghat.double()
    p = weight.subspace.projection(weight.device, torch.float64, seeds)  # [n, r]
    # First Adam step: m = (1 - b1) g, v = (1 - b2) g^2, bias-corrected with 1 - b^1.
    step_size = LR / (1 - 0.9)
    direction = (0.1 * ghat) / ((0.001 * ghat.square()).sqrt() / (0.001**0.5) + EPS)
    expected = before.double() - step_size * SCALE * (direction @ p.t())
    # The float32 evaluation rounds N (a few operations), the length-r product and the update.
    magnitude = before.double().abs() + step_size * SCALE * (direction.abs() @ p.abs().t())
    bound = 2 * gamma(p.shape[1] + 8, torch.float32) * magnitude
    return ((weight.detach().double() - expected).abs() / bound).max().item()


def _subspace_run(rank, world_size, tp):
    import torch.distributed as dist

    from actcomp_dist import CompressionConfig
    from actcomp_dist.models import build_llama, gather_full, get_model_config
    from actcomp_dist.models.weights import weight_layout
    from actcomp_dist.optim import SubspaceAdamW
    from actcomp_dist.parallel import state

    ctx = state.initialize_model_parallel(tp)
    config = get_model_config("tiny", seq_length=SEQ)
    compression = CompressionConfig(
        method="compact", rank=0.25, grad_mode="subspace", seed=11, resample_every=1
    )
    model = build_llama(config, compression, init_seed=5)
    optimizer = SubspaceAdamW(
        model.parameters(), lr=LR, eps=EPS, subspace_scale=SCALE, process_group=ctx.dp_group
    )

    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (BATCH, SEQ + 1), generator=generator)
    share = BATCH // ctx.dp_size
    mine = tokens[ctx.dp_rank * share : (ctx.dp_rank + 1) * share]
    magnitudes, handles = _capture_magnitudes(model)
    model.loss(mine[:, :-1], mine[:, 1:]).backward()
    for handle in handles:
        handle.remove()
    optimizer.all_reduce_compressed_grads()
    # Ordinary gradients: average over DP too (what DeepSpeed/DDP do), for the step below.
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=ctx.dp_group)
            p.grad.div_(ctx.dp_size)

    # gather_full maps every parameter; only the subspace entries are compared.
    local = {
        n: p.subspace.grad if is_subspace_parameter(p) else torch.zeros_like(p)
        for n, p in model.named_parameters()
    }
    compressed = {k: v.clone() for k, v in gather_full(model, local).items()}
    # A dense row-parallel layer's G_hat [m, r] is not sharded: every TP rank holds all of it.
    dense_rows = {f"{name}.weight" for name, layer in _named_dense_rows(model)}
    replicated = {
        entry.logical[0]: entry.parameter
        for entry in weight_layout(config)
        if entry.parameter in dense_rows
    }
    compressed.update({k: local[p].clone() for k, p in replicated.items()})
    # The magnitudes of the data-parallel mean: the mean of the replicas' magnitudes.
    local = {
        n: magnitudes[p] if p in magnitudes else torch.zeros_like(p, dtype=torch.float64)
        for n, p in model.named_parameters()
    }
    for tensor in local.values():
        dist.all_reduce(tensor, group=ctx.dp_group)
        tensor.div_(ctx.dp_size)
    magnitude = gather_full(model, local)
    magnitude.update({k: local[p] for k, p in replicated.items()})
    subspace = [p for p in model.parameters() if is_subspace_parameter(p)]
    before = {p: p.detach().clone() for p in subspace}
    steps = {p: (p.subspace.grad.clone(), p.subspace.seeds) for p in subspace}
    optimizer.step()  # the all-reduce above already averaged; step() repeats it on equal values
    violation = max(_subspace_rule_violation(p, before[p], *steps[p]) for p in subspace)
    names = sorted(
        k
        for k in compressed
        if any(s in k for s in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"))
    )
    return {
        "compressed": {k: compressed[k] for k in names},
        "magnitude": {k: magnitude[k] for k in names},
        "rule_violation": violation,
    }


@pytest.mark.slow
@pytest.mark.distributed
def test_subspace_tp2_dp2_equals_tp1_on_concatenated_batch(tmp_path):
    (reference,) = run_distributed(_subspace_run, 1, tmp_path, 1, timeout=180)
    results = run_distributed(_subspace_run, 4, tmp_path, 2, timeout=300)
    assert reference["compressed"], "no subspace gradients compared"
    from actcomp_dist.models import get_model_config

    c = get_model_config("tiny", seq_length=SEQ)
    # Every reduction on the forward and backward path, summed (each pass: per block the norm,
    # qkv, attention scores and values, output projection, norm, fc1, fc2; then the final
    # norm, the output layer and the softmax over the vocabulary), plus the contraction over
    # the tokens, the projection and the data-parallel mean.
    per_block = 6 * c.hidden_size + c.head_dim + SEQ + c.ffn_hidden_size
    path = c.num_layers * per_block + 2 * c.hidden_size + c.vocab_size
    length = 2 * path + BATCH * SEQ + c.ffn_hidden_size + 2
    for run in [reference, *results]:
        assert run["rule_violation"] <= 1.0, run["rule_violation"]
    for result in results:
        for name, expected in reference["compressed"].items():
            assert_within_rounding(
                result["compressed"][name],
                expected,
                reference["magnitude"][name],
                length,
                msg=name,
            )
