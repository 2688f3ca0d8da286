"""Train one variant through the real training code and measure it.

:func:`train_and_measure` builds :class:`actcomp_dist.training.trainer.Trainer` from a run
config and calls ``train()`` — the same code ``launch/pretrain.py`` runs, on one process or on
every rank the ``deepspeed`` launcher started. It then measures, with the trainer's public
attributes only (``model``, ``engine``, ``optimizer``, ``merger``, ``loader``, ``schedule``,
``ctx``):

- **saved-activation bytes per micro-batch by layer kind**: one more forward of the first
  training micro-batch under :func:`~actcomp_dist.ablation.measure.measure_saved_bytes`; its
  total is checked against the trainer's own count (``saved_activation_bytes`` of every step
  that counted: the trainer counts on its first two steps, logged, evaluated and last steps);
- **peak memory by category**: one more optimizer step, the trainer's own
  :func:`~actcomp_dist.training.step.train_step` (all micro-batches, the subspace merge, the
  compression schedule's advance) under :func:`actcomp_dist.memory.peak_memory_by_category`
  (MemTracker: parameters, gradients, optimizer state, activations, temporaries); on a GPU
  the peak is also ``torch.cuda.max_memory_allocated`` over the whole run (its counter is
  reset first);
- the predicted bytes of the analytic model (:mod:`actcomp_dist.memory_model`), for the table.

Both extra measurements run after training, so they cannot change the loss curve or the
validation loss; the trainer's timing covers only its own steps. The step times reported
(``step_time_s``, ``tokens_per_s``, ``step_cpu_s``) are medians over the steps after the warm-up
that did not count saved tensors or measure model states (``timed_steps`` lists them), so the
measurement's hooks are not in the time of what they measure.
"""

from __future__ import annotations

import shutil
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist

from actcomp_dist.ablation.measure import measure_saved_bytes
from actcomp_dist.memory import peak_memory_by_category
from actcomp_dist.models import parameter_count
from actcomp_dist.training.config import RunConfig
from actcomp_dist.training.step import batch_to, masked_mean_loss, train_step
from actcomp_dist.training.trainer import Trainer


def timed_steps(history: list[dict[str, Any]], warmup_steps: int) -> list[int]:
    """The steps whose times the ablation reports: after the warm-up, and without the
    trainer's measurements (no ``saved_activation_bytes`` in their record). A run too short to
    have such steps falls back to the steps after the warm-up, then to every step."""
    after = [r for r in history if r["step"] > warmup_steps] or history
    bare = [r for r in after if "saved_activation_bytes" not in r]
    return [r["step"] for r in bare or after]


def median_over_steps(history: list[dict[str, Any]], key: str, steps: list[int]) -> float:
    chosen = set(steps)
    return statistics.median(
        r[key] for r in history if r["step"] in chosen and r.get(key) is not None
    )


def _peak_step(trainer) -> dict[str, int]:
    """MemTracker's peak by category over one full optimizer step: the trainer's own
    :func:`~actcomp_dist.training.step.train_step` (micro-batches, the optimizer step, the
    subspace merge, the compression schedule), its micro-batches run as MemTracker's phases."""
    data = iter(trainer.loader)
    # Moved to the device before the tracker starts, as the trainer's loop holds them.
    batches = [
        {key: value.to(trainer.device) for key, value in next(data).items()}
        for _ in range(trainer.engine.gradient_accumulation_steps())
    ]
    # MemTracker tracks torch optimizers; DeepSpeed's ZeRO optimizer wraps one.
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    if not isinstance(optimizer, torch.optim.Optimizer):
        optimizer = None
    peak: dict[str, int] = {}

    def run_tracked(micro_batches) -> None:
        peak.update(peak_memory_by_category(trainer.model, optimizer, micro_batches))

    train_step(
        trainer.engine,
        iter(batches),
        trainer.schedule,
        device=trainer.device,
        dp_group=trainer.ctx.dp_group,
        merger=trainer.merger,
        run_micro_batches=run_tracked,
    )
    return peak


def train_and_measure(config: RunConfig, warmup_steps: int, keep_checkpoints: bool = False):
    """Train ``config`` and measure it (collective: every rank calls it). Returns the record
    on rank 0, ``None`` elsewhere. The run's checkpoints are deleted unless asked to keep."""
    start = time.perf_counter()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(config)
    try:
        result = trainer.train()
        history = result.history
        tokens, labels, mask = batch_to(next(iter(trainer.loader)), trainer.device)
        engine = trainer.engine
        saved = measure_saved_bytes(
            trainer.model,
            lambda: masked_mean_loss(engine(tokens, labels, mask), mask),
            len(trainer.model.layers),
        )
        predicted = trainer.predicted_saved_activation_bytes()
        peak = _peak_step(trainer)
        timed = timed_steps(history, warmup_steps)
        record = {
            "parameters": parameter_count(trainer.model.config),
            "vocab_size": trainer.model.config.vocab_size,
            "num_layers": len(trainer.model.layers),
            "world_size": trainer.world_size,
            "device": str(trainer.device),
            "saved_activation_bytes": history[0]["saved_activation_bytes"],
            "saved_activation_bytes_remeasured": saved.total,
            "saved_by_kind": saved.by_kind,
            "saved_per_layer": saved.per_layer,
            "predicted_saved_activation_bytes": predicted,
            "peak_by_category": peak,
            "peak_bytes": (
                history[-1]["peak_bytes"] if trainer.device.type == "cuda" else peak["total"]
            ),
            "step_times": [r["step_time_s"] for r in history],
            "timed_steps": timed,
            "step_time_s": median_over_steps(history, "step_time_s", timed),
            "tokens_per_s": median_over_steps(history, "tokens_per_s", timed),
            # The process's CPU seconds per step (on a CPU shared with other jobs the wall
            # time also counts their share of the cores; this does not).
            "step_cpu_s": median_over_steps(history, "step_cpu_s", timed),
            "losses": [r["loss"] for r in history],
            "val_losses": [[r["step"], r["val_loss"]] for r in history if "val_loss" in r],
            "final_loss": result.final_loss,
            "val_loss": result.val_loss,
            "steps": result.steps_done,
        }
    finally:
        trainer.close()
    rank = dist.get_rank() if dist.is_initialized() else 0
    if dist.is_initialized():
        dist.barrier()  # every rank has finished with the checkpoint directory
    if not keep_checkpoints and rank == 0:
        shutil.rmtree(config.checkpoint_dir, ignore_errors=True)
    record["wall_s"] = time.perf_counter() - start
    return record if rank == 0 else None
