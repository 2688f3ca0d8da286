"""``subspace`` mode across tensor- and data-parallel ranks (4 gloo ranks: TP=2 x DP=2).

Reference: the same tiny LLaMA at TP=1, DP=1 on the concatenated batch. Each data-parallel
replica sees half of the batch; ``SubspaceAdamW`` averages the m x r compressed gradients over
the data-parallel group (one flat all-reduce of m x r tensors, never m x n), which must give
the compressed gradient of the mean loss over the whole batch. Gathered over TP into the
logical (unsharded) layout, every compressed gradient must match the reference up to float
reduction order (rtol 1e-4: sums over 2 ranks and 2 replicas in another order). One optimizer
step must then move the compressed weights identically. (Ordinary weights are not compared
after the step: Adam's first update ``g / (|g| + eps)`` turns reduction-order noise in
gradients near ``eps`` into visible differences; their gradients are covered elsewhere.)
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed import run_distributed

BATCH, SEQ = 4, 16


def _subspace_run(rank, world_size, tp):
    import torch.distributed as dist

    from actcomp_dist import CompressionConfig
    from actcomp_dist.models import build_llama, gather_full, get_model_config
    from actcomp_dist.optim import SubspaceAdamW
    from actcomp_dist.parallel import state

    ctx = state.initialize_model_parallel(tp)
    config = get_model_config("tiny", seq_length=SEQ)
    compression = CompressionConfig(
        method="compact", rank=0.25, grad_mode="subspace", seed=11, resample_every=1
    )
    model = build_llama(config, compression, init_seed=5)
    optimizer = SubspaceAdamW(model.parameters(), lr=1e-2, process_group=ctx.dp_group)

    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (BATCH, SEQ + 1), generator=generator)
    share = BATCH // ctx.dp_size
    mine = tokens[ctx.dp_rank * share : (ctx.dp_rank + 1) * share]
    model.loss(mine[:, :-1], mine[:, 1:]).backward()
    optimizer.all_reduce_compressed_grads()
    # Ordinary gradients: average over DP too (what DeepSpeed/DDP do), for the step below.
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, group=ctx.dp_group)
            p.grad.div_(ctx.dp_size)

    # gather_full maps every parameter; only the subspace entries are compared.
    local = {
        n: p.compressed_grad if hasattr(p, "subspace_projection") else torch.zeros_like(p)
        for n, p in model.named_parameters()
    }
    compressed = {k: v.clone() for k, v in gather_full(model, local).items()}
    optimizer.step()  # the all-reduce above already averaged; step() repeats it on equal values
    weights = gather_full(model, {n: p.detach() for n, p in model.named_parameters()})
    names = sorted(
        k
        for k in compressed
        if any(s in k for s in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"))
    )
    return {
        "compressed": {k: compressed[k] for k in names},
        "weights": {k: v.detach().clone() for k, v in weights.items()},
    }


@pytest.mark.slow
@pytest.mark.distributed
def test_subspace_tp2_dp2_equals_tp1_on_concatenated_batch(tmp_path):
    (reference,) = run_distributed(_subspace_run, 1, tmp_path, 1, timeout=180)
    results = run_distributed(_subspace_run, 4, tmp_path, 2, timeout=300)
    assert reference["compressed"], "no subspace gradients compared"
    for result in results:
        for name, expected in reference["compressed"].items():
            torch.testing.assert_close(
                result["compressed"][name], expected, rtol=1e-4, atol=1e-6, msg=name
            )
        for name in reference["compressed"]:
            expected = reference["weights"][name]
            torch.testing.assert_close(
                result["weights"][name], expected, rtol=1e-4, atol=1e-6, msg=name
            )
