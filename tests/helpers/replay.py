"""The model's float64 replay: the reference of runs that reorder fp32 sums.

A run at another ZeRO stage or tensor-parallel layout computes the same fp32 sums as plain data
parallelism in another order, so its losses, gradient norms and weights after a few Adam steps
are not bit-identical to any other run's. :func:`replay_run` repeats a trainer's steps on one
process on a fresh model, in fp32 and in float64 (``model.double()``), with the same samples,
projections and closed-form learning rate; :func:`assert_as_accurate_as_replay` then asks that
the run be as accurate as the fp32 replay, both against the float64 one
(:func:`tests.helpers.tolerances.assert_as_accurate_as`). :func:`train_and_replay_rank` is the
rank function for :func:`tests.helpers.distributed.run_distributed` that trains configs and
replays them (rank 0 in float64 while rank 1 replays in fp32), :func:`fp32_and_float64_replays`
picks a config's two replays out of its result.
"""

from __future__ import annotations

import torch

from actcomp_dist.subspace import is_subspace_parameter
from actcomp_dist.training.schedule import learning_rate
from tests.helpers.tolerances import assert_as_accurate_as


def history_losses(history: list[dict]) -> torch.Tensor:
    """The losses of per-step records, in float64."""
    return torch.tensor([r["loss"] for r in history], dtype=torch.float64)


def history_norms(history: list[dict]) -> torch.Tensor:
    """The gradient norms of per-step records, in float64."""
    return torch.tensor([r["grad_norm"] for r in history], dtype=torch.float64)


def dp_averaged_loss(model, dataset, step: int, train, world_size: int) -> torch.Tensor:
    """The loss a DP world of ``world_size`` ranks averages at ``step``: each rank's micro-batch
    of the global batch, in the trainer's order, replayed on one process."""
    micro = train.micro_batch_size
    losses = []
    for dp_rank in range(world_size):
        first = step * train.global_batch_size + dp_rank * micro
        batch = [dataset[i] for i in range(first, first + micro)]
        tokens = torch.stack([torch.as_tensor(b["tokens"]) for b in batch])
        labels = torch.stack([torch.as_tensor(b["labels"]) for b in batch])
        losses.append(model.loss(tokens, labels))
    return sum(losses) / world_size


def replay_run(
    trainer, config, world_size: int, dtype: torch.dtype, reset_optimizer_at: int | None = None
) -> dict:
    """The trainer's steps replayed on one process on a fresh model in ``dtype`` (float64:
    ``model.double()``, the model's float64 replay) on the same samples, the same projections
    (the model's seeds and schedule) and the closed-form lr: ``torch.optim.AdamW`` on the
    ordinary parameters (weight decay on matrices, lr x their ``train.lr_scale`` factor),
    ``SubspaceAdamW``'s rule on the subspace weights (at the schedule's lr, as the engine's
    proxies), one global clip over both; the optimizer state starts afresh at step
    ``reset_optimizer_at`` (``checkpoint.reset_optimizer``). Per step: the DP-averaged loss,
    the gradient norm DeepSpeed logs and clips with (before clipping; ordinary and m x r
    gradients, in ``dtype``) and the ordinary gradients' alone; the final weights, the names
    of the subspace ones and each ordinary parameter's lr factor.

    Not all float64: ``SubspaceAdamW`` keeps float32 moments (and takes the m x r gradient in
    float32), so in the float64 replay a subspace weight's update (about lr x alpha = 7.5e-4 per
    element) is rounded at 2^-24 of itself, some 20 times below the fp32 runs' rounding of the
    weights themselves (2^-24 |W|, |W| ~ 0.02)."""
    from actcomp_dist.models import build_llama
    from actcomp_dist.models.kinds import parameter_group
    from actcomp_dist.optim import SubspaceAdamW
    from actcomp_dist.optim.clip import gradients
    from actcomp_dist.training.config import lr_scale_factor

    train, dataset = config.train, trainer.loader.dataset
    model = build_llama(
        trainer.model.config,
        config.compression,
        init_seed=train.seed,
        device="cpu",
        efficient_ops=config.memory.efficient_ops,  # the same block and head as trained
        loss_chunk_tokens=config.memory.chunked_loss_tokens,
    ).to(dtype)
    named = list(model.named_parameters())
    subspace = {n: p for n, p in named if is_subspace_parameter(p)}
    ordinary = {n: p for n, p in named if n not in subspace}
    factors = {n: lr_scale_factor(train.lr_scale, parameter_group(n)) for n in ordinary}
    hyper = {"lr": train.lr, "betas": tuple(train.betas), "eps": train.eps}

    def fresh_optimizers() -> list[torch.optim.Optimizer]:
        plain = torch.optim.AdamW(
            [
                {
                    "params": [p],
                    "weight_decay": train.weight_decay if p.dim() >= 2 else 0.0,
                    "lr_scale": factors[n],
                }
                for n, p in ordinary.items()
            ],
            foreach=False,
            **hyper,
        )
        if not subspace:
            return [plain]
        rule = SubspaceAdamW(
            [{"params": list(subspace.values()), "lr_scale": 1.0}],
            weight_decay=train.weight_decay,
            subspace_scale=train.subspace_scale,
            **hyper,
        )
        return [plain, rule]

    def norm(grads: list[torch.Tensor]) -> torch.Tensor:
        # As DeepSpeed's clip_grad_norm_ (the ZeRO 0 norm): one ``norm()`` per tensor, then
        # the root of their sum of squares. The layouts' norm algorithms differ (partitioned,
        # flattened, per tensor); this is the coarsest of them: torch's CPU ``norm()`` adds in
        # a few vector lanes, not by cascade (fp32: measured 8 u at 2^16 elements, 34 u at
        # 2^18, where ``pow(2).sum()`` stays at 1-2 u), so the fp32 replay's error includes
        # the rounding of the longest reductions a layout's norm may make.
        return torch.stack([g.norm() for g in grads]).pow(2).sum().sqrt()

    optimizers = fresh_optimizers()
    losses, norms, ordinary_norms = [], [], []
    for step in range(train.steps):
        if step == reset_optimizer_at:
            optimizers = fresh_optimizers()
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                group["lr"] = group["lr_scale"] * learning_rate(step, train)
        loss = dp_averaged_loss(model, dataset, step, train, world_size)
        loss.backward()
        losses.append(loss.item())
        ordinary_norms.append(norm([p.grad for p in ordinary.values()]).item())
        grads = gradients(model.parameters())
        total = norm(grads)
        norms.append(total.item())
        if train.clip_grad > 0:  # DeepSpeed's (and torch's) rule: min(1, clip / (norm + 1e-6))
            scale = (train.clip_grad / (total + 1e-6)).clamp(max=1.0)
            with torch.no_grad():
                for grad in grads:
                    grad.mul_(scale)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
        model.compression_schedule.advance()
    return {
        "losses": torch.tensor(losses, dtype=torch.float64),
        "norms": torch.tensor(norms, dtype=torch.float64),
        "ordinary_norms": torch.tensor(ordinary_norms, dtype=torch.float64),
        "weights": {n: p.detach() for n, p in named},
        "subspace": set(subspace),
        "factors": factors,
    }


def train_and_replay_rank(
    rank: int, world_size: int, raws: list[dict], replays: list[dict | None]
) -> list[dict]:
    """Train each config with the Trainer (its history); where ``replays`` gives
    :func:`replay_run`'s keyword arguments (a TP 1 run), replay it before the next config: rank 0
    as the model's float64 replay while rank 1 replays it in fp32."""
    from actcomp_dist.training.config import run_config_from_dict
    from actcomp_dist.training.trainer import Trainer

    assert world_size == 2
    dtype = {0: torch.float64, 1: torch.float32}[rank]
    results = []
    for raw, replay in zip(raws, replays, strict=True):
        config = run_config_from_dict(raw)
        trainer = Trainer(config)
        try:
            result = {"history": trainer.train().history}
            if replay is not None:
                assert config.parallel.tensor_parallel == 1  # the replay builds a TP 1 model
                micro_batches = config.train.global_batch_size // config.train.micro_batch_size
                result["replay"] = replay_run(trainer, config, micro_batches, dtype, **replay)
        finally:
            trainer.close()
        results.append(result)
    return results


def fp32_and_float64_replays(results: list[list[dict]], index: int) -> tuple[dict, dict]:
    """Config ``index``'s (fp32 replay, float64 replay) from :func:`train_and_replay_rank`."""
    return results[1][index]["replay"], results[0][index]["replay"]


def assert_as_accurate_as_replay(
    history: list[dict], replay: dict, exact: dict, msg: object, dtype=torch.float32
) -> None:
    """A run's losses and gradient norms are as accurate as the fp32 ``replay`` of its steps,
    both against the float64 replay ``exact`` (:func:`~tests.helpers.tolerances.
    assert_as_accurate_as`; steps in ``history`` are 1-based, the replays' 0-based)."""
    steps = [r["step"] - 1 for r in history]
    assert_as_accurate_as(
        {"loss": history_losses(history), "grad_norm": history_norms(history)},
        {"loss": replay["losses"][steps], "grad_norm": replay["norms"][steps]},
        {"loss": exact["losses"][steps], "grad_norm": exact["norms"][steps]},
        dtype,
        msg,
    )
