"""Non-finite guard: a step whose loss or gradient norm is not finite never reaches the weights.

**Detection, with the same verdict on every rank and no extra collective.**

- Loss: the data-parallel mean of the step's micro-batch losses, all-reduced *before* the last
  micro-batch's backward (the all-reduce the trainer needs for logging anyway, moved earlier).
  A NaN or inf on any rank makes the sum non-finite on every rank, and tensor-parallel peers
  hold the same loss (the vocabulary-parallel cross-entropy all-reduces its terms).
- Gradient norm: DeepSpeed's global norm, which its optimizer step all-reduces over the
  data- and model-parallel groups. The ZeRO 1/2/3 optimizers and the fp16/bf16 optimizers
  already *skip* a step whose norm is not finite (``overflow``: the accumulated gradients are
  dropped, neither the optimizer nor the LR schedule steps, ``engine.skipped_steps`` counts
  it, ``engine.was_step_applied()`` is False on every rank). The one path without that
  check, ZeRO 0 in fp32, where DeepSpeed steps the torch optimizer itself, gets it from
  :func:`actcomp_dist.training.engine.build_engine`.

**Skipping.** DeepSpeed has no public call that discards the gradients accumulated for a
step; its overflow path is the one that does so on every ZeRO stage. A non-finite loss is
routed into it by back-propagating ``loss * NaN`` on the last micro-batch (:func:`poison`):
every gradient is NaN, so is the global norm, and DeepSpeed skips the step as it would a
loss-scale overflow. Back-propagating the loss itself would not do: a +inf loss from extreme
but finite logits has finite gradients. After the step the trainer reads
``was_step_applied()``; a skipped step also skips the subspace merge (an update applied
outside DeepSpeed) and does not advance the compression schedule, so nothing that training
state holds changes — only the data position moves past the batch, as in Megatron.

**Policy** (``train.on_nonfinite``): ``stop`` ends the run at the first non-finite step with
:class:`NonFiniteError` (exit code :data:`NONFINITE_EXIT_CODE`): nothing is saved, so the last
checkpoint stays the newest. ``skip`` goes on, and stops the same way after
``train.max_skipped_steps`` skipped steps in a row. In fp16, DeepSpeed's dynamic loss scaler
overflows by design while it searches for a scale: a skip with a finite loss there is that
search, counted and reported like any skip and tolerated (up to ``max_skipped_steps`` in a
row) under either policy.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

# Distinct from 0 (done / preempted), 1 (crash) and 2 (user error: config, data, checkpoint).
NONFINITE_EXIT_CODE = 3


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss or gradient norm and must not go on."""


def poison(loss: torch.Tensor) -> torch.Tensor:
    """``loss * NaN``: back-propagated, every gradient is NaN and DeepSpeed skips the step."""
    return loss * float("nan")


class NonFiniteGuard:
    """Counts skipped steps and decides, after each optimizer step, whether training goes on."""

    def __init__(self, policy: str, max_skipped_steps: int, precision: str) -> None:
        self.policy = policy
        self.max_skipped_steps = max_skipped_steps
        self.precision = precision
        self.consecutive_skipped = 0

    def after_step(self, step: int, loss_finite: bool, applied: bool) -> str | None:
        """The reason to stop after optimizer step ``step`` (1-based), or ``None`` to go on."""
        if applied:
            if not loss_finite:
                # Only if DeepSpeed's overflow check was switched off (engine.py refuses that).
                return (
                    f"step {step}: the loss is not finite but DeepSpeed applied the update; "
                    f"the weights can no longer be trusted (nothing saved)"
                )
            self.consecutive_skipped = 0
            return None
        self.consecutive_skipped += 1
        what = "loss" if not loss_finite else "gradient norm"
        loss_scale_search = loss_finite and self.precision == "fp16"
        if self.policy == "stop" and not loss_scale_search:
            return (
                f"step {step}: non-finite {what}; the step was not applied and nothing was "
                f"saved (train.on_nonfinite='stop'); the last checkpoint is intact: lower "
                f"train.lr or check the data, then resume with checkpoint.resume=latest"
            )
        if self.consecutive_skipped >= self.max_skipped_steps:
            return (
                f"step {step}: {self.consecutive_skipped} steps in a row skipped (last: non-finite "
                f"{what}; train.max_skipped_steps={self.max_skipped_steps}); nothing saved since "
                f"the last checkpoint"
            )
        return None

    def state_dict(self) -> dict[str, int]:
        return {"consecutive_skipped": self.consecutive_skipped}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consecutive_skipped = int(state.get("consecutive_skipped", 0))


def parameters_finite(model: torch.nn.Module, extra: list[torch.Tensor] = ()) -> bool:
    """Collective: True on every rank iff every rank's parameters (and ``extra`` tensors, e.g.
    the subspace fp32 masters) are finite. ZeRO 3 keeps each rank's shard in ``ds_tensor``."""
    tensors = [getattr(p, "ds_tensor", p) for p in model.parameters()] + list(extra)
    bad = any(t.numel() and not bool(torch.isfinite(t).all()) for t in tensors)
    device = tensors[0].device if tensors else torch.device("cpu")
    flag = torch.tensor([1.0 if bad else 0.0], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return not bool(flag.item())
