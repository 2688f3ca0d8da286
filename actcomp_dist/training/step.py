"""One optimizer step, shared by pretraining, fine-tuning and the ablation runner.

A step is ``gradient_accumulation_steps`` micro-batches. Each is forward -> masked mean loss
-> backward -> ``engine.step()`` (DeepSpeed steps the optimizer at the last micro-batch only,
and averages the gradients over data parallelism there). After the last one, if DeepSpeed
applied the update:

- the subspace merge (``grad_mode='subspace'``: the update of the compressed weights is
  applied outside DeepSpeed's optimizer, from the proxies it just stepped);
- one advance of the compression schedule (the layers draw new projections every
  ``compression.resample_every`` applied steps).

A skipped step does neither, so nothing the training state holds changes.

**Non-finite guard hook.** Before the last micro-batch's backward, the data-parallel mean of
the step's micro-batch losses is all-reduced (the value logged anyway, so the same verdict on
every rank without an extra collective); a non-finite mean poisons that backward
(:func:`~actcomp_dist.training.guard.poison`) so that DeepSpeed's overflow path skips the step
on every ZeRO stage. What to do about a skipped step (stop, go on) is the caller's policy:
:meth:`NonFiniteGuard.after_step <actcomp_dist.training.guard.NonFiniteGuard.after_step>` with
the :class:`StepResult`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from actcomp_dist.memory import SavedTensorCounter
from actcomp_dist.training.guard import poison
from actcomp_dist.training.schedule import schedule_lr

#: A micro-batch on the device: ``(tokens, labels, loss_mask)``, each ``[b, s]``.
MicroBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass
class StepResult:
    """What one optimizer step did."""

    loss: float  # data-parallel mean of the step's micro-batch losses
    loss_finite: bool
    applied: bool  # False: DeepSpeed skipped the update (non-finite loss or gradient norm)
    grad_norm: float | None  # DeepSpeed's global gradient norm (None where it keeps none)
    lr: float  # the learning rate this step used
    first_micro_batch: MicroBatch
    saved_activation_bytes: int | None  # of the first micro-batch, when counted

    @property
    def skipped(self) -> bool:
        return not self.applied


def batch_to(batch: dict[str, torch.Tensor], device: torch.device) -> MicroBatch:
    """A loader's batch (a dict of ``tokens``, ``labels``, ``loss_mask``) on ``device``."""
    return (
        batch["tokens"].to(device),
        batch["labels"].to(device),
        batch["loss_mask"].to(device),
    )


def masked_mean_loss(losses: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """A micro-batch's loss: the sum of its masked per-token losses over the mask count."""
    return losses.sum() / loss_mask.sum().clamp(min=1)


def data_parallel_mean(values: Sequence[torch.Tensor], group) -> float:
    """The mean of ``values`` (scalars) over the micro-batches and the ranks of ``group``
    (collective over ``group``)."""
    total = torch.stack([v.float() for v in values]).mean().reshape(1)
    dist.all_reduce(total, group=group)
    return total.item() / dist.get_world_size(group)


def run_in_order(micro_batches: list[Callable[[], None]]) -> None:
    for micro_batch in micro_batches:
        micro_batch()


def train_step(
    engine: Any,
    batches: Iterator[dict[str, torch.Tensor]],
    schedule: Any,
    *,
    device: torch.device,
    dp_group: Any,
    merger: Any = None,
    count_saved_activations: bool = False,
    after_last_backward: Callable[[], None] | None = None,
    run_micro_batches: Callable[[list[Callable[[], None]]], None] = run_in_order,
) -> StepResult:
    """One optimizer step of the DeepSpeed ``engine`` on the next
    ``engine.gradient_accumulation_steps()`` batches of ``batches`` (collective: every rank).

    ``schedule``: the model's compression schedule (advanced when the update was applied);
    ``merger``: the :class:`~actcomp_dist.optim.subspace_proxy.SubspaceMerger` of a
    ``subspace`` run, else ``None``; ``dp_group``: the data-parallel group the loss is
    averaged over. ``count_saved_activations``: count the bytes the first micro-batch's
    forward saves for backward. ``after_last_backward``: called after the last backward,
    before the optimizer step (what the gradients hold then, e.g. model-state bytes).
    ``run_micro_batches``: runs the step's micro-batches, given as one callable each (the last
    one also steps the optimizer, merges and advances the schedule) — in order by default; a
    memory tracker that needs a boundary between micro-batches wraps them here.
    """
    lr = schedule_lr(engine.lr_scheduler)
    accumulation = engine.gradient_accumulation_steps()
    losses: list[torch.Tensor] = []
    # Filled in by the micro-batches (run by run_micro_batches).
    out: dict[str, Any] = {"saved_activation_bytes": None}

    def micro_batch(index: int) -> None:
        tokens, labels, mask = batch_to(next(batches), device)
        last = index == accumulation - 1
        if index == 0:
            out["first_micro_batch"] = (tokens, labels, mask)
        if index == 0 and count_saved_activations:
            with SavedTensorCounter() as counter:
                loss = masked_mean_loss(engine(tokens, labels, mask), mask)
            out["saved_activation_bytes"] = counter.total_bytes
        else:
            loss = masked_mean_loss(engine(tokens, labels, mask), mask)
        losses.append(loss.detach())
        if last:
            # Before the backward that ends the step: the same verdict on every rank; a
            # non-finite loss makes DeepSpeed skip the step (guard.py).
            out["loss"] = data_parallel_mean(losses, dp_group)
            out["loss_finite"] = math.isfinite(out["loss"])
            if not out["loss_finite"]:
                loss = poison(loss)
        engine.backward(loss)
        if last and after_last_backward is not None:
            after_last_backward()
        engine.step()
        if last:
            out["applied"] = engine.was_step_applied()
            if out["applied"]:
                if merger is not None:
                    merger.merge(lr)
                schedule.advance()

    run_micro_batches([lambda i=i: micro_batch(i) for i in range(accumulation)])
    grad_norm = engine.get_global_grad_norm()
    return StepResult(
        loss=out["loss"],
        loss_finite=out["loss_finite"],
        applied=out["applied"],
        grad_norm=None if grad_norm is None else float(grad_norm),
        lr=lr,
        first_micro_batch=out["first_micro_batch"],
        saved_activation_bytes=out["saved_activation_bytes"],
    )
