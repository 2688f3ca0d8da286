"""The pretraining loop: config in, trained model, checkpoints and metrics out.

Order of set-up (each step needs the previous one):

1. validate the config against the world size the launcher announced (no collective yet, so
   a bad config fails the same way on every rank and nothing hangs);
2. check that no live run holds ``RUN_DIR/LOCK``, the checkpoint to resume from (marker,
   file hashes, compression config, layout), then the model config (the first check that
   imports megatron-core);
3. process group; rank 0 takes the run-directory lock (:mod:`actcomp_dist.training.run_lock`);
   Megatron parallel state, seeds;
4. data: the embedded corpus or the configured indexed datasets, the resumable loader;
5. model (tensor-parallel LLaMA with compressed layers), then activation checkpointing;
6. DeepSpeed engine (ZeRO, precision, AdamW, LR schedule, clipping);
7. resume state; then the loop: micro-batches -> one optimizer step -> (if DeepSpeed applied
   it) subspace merge and compression schedule -> non-finite verdict -> log / evaluate /
   checkpoint / preemption check. A non-finite loss or gradient norm is caught before the
   optimizer step changes anything (see :mod:`actcomp_dist.training.guard`).
"""

from __future__ import annotations

import json
import math
import random
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from actcomp_dist.memory import ModelStateProbe, SavedTensorCounter
from actcomp_dist.seeds import check_seed_agreement
from actcomp_dist.training import checkpoint as ckpt
from actcomp_dist.training.activation_checkpointing import apply_activation_checkpointing
from actcomp_dist.training.config import ConfigError, RunConfig, validate_model, validate_run
from actcomp_dist.training.distributed import init_distributed, launch_info
from actcomp_dist.training.drift import data_fingerprint, describe, refused, resume_drift
from actcomp_dist.training.flops import device_peak_flops, model_flops_per_token
from actcomp_dist.training.guard import (
    NonFiniteError,
    NonFiniteGuard,
    parameters_finite,
    poison,
)
from actcomp_dist.training.metrics import MetricsLogger, format_bytes, format_duration
from actcomp_dist.training.run_lock import acquire_run_lock, check_run_lock
from actcomp_dist.training.schedule import restart_lr_schedule
from actcomp_dist.training.signals import PreemptionHandler
from actcomp_dist.training.watchdog import start_watchdog

VOCAB_MULTIPLE = 128  # pad the vocabulary like Megatron (per tensor-parallel rank)


@dataclass
class TrainResult:
    steps_done: int
    final_loss: float | None
    val_loss: float | None
    preempted: bool
    history: list[dict[str, Any]] = field(default_factory=list)


def _print0(*args) -> None:
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, flush=True)


def padded_vocab_size(vocab: int, tp: int) -> int:
    multiple = VOCAB_MULTIPLE * tp
    return math.ceil(vocab / multiple) * multiple


def _check_resume(config: RunConfig, world_size: int) -> tuple[Path | None, dict | None, dict]:
    """The checkpoint to resume from, its trainer state and the accepted changes of
    exactness-relevant settings (``checkpoint.allow_changes``), or ``(None, None, {})``; raises
    :class:`~actcomp_dist.training.checkpoint.CheckpointError` (no collective, nothing
    written) for a damaged checkpoint or one whose settings this config changes."""
    directory = config.checkpoint_dir
    path = ckpt.resolve_resume(directory, config.checkpoint.resume)
    if path is None:
        if ckpt.complete_checkpoints(directory):
            raise ckpt.CheckpointError(
                f"{directory} already holds checkpoints of a run; set checkpoint.resume=latest "
                f"to continue it, or choose another run_dir / checkpoint.dir"
            )
        return None, None, {}
    state = ckpt.verify_checkpoint(path, config.compression.to_dict())
    saved_tp = state["config"]["parallel"]["tensor_parallel"]
    if state["world_size"] != world_size or saved_tp != config.parallel.tensor_parallel:
        raise ckpt.CheckpointError(
            f"checkpoint {path} was written by {state['world_size']} ranks at "
            f"parallel.tensor_parallel={saved_tp}; this run has {world_size} ranks at "
            f"parallel.tensor_parallel={config.parallel.tensor_parallel}: exact resume needs "
            f"the same layout"
        )
    drift = resume_drift(state, config)
    not_allowed = refused(drift, config.checkpoint.allow_changes)
    if not_allowed:
        raise ckpt.CheckpointError(
            f"checkpoint {path} was written with other settings that an exact resume needs "
            f"({describe(not_allowed)}); resume with the original settings, list a deliberate "
            f"change in checkpoint.allow_changes, or start a new run_dir"
        )
    return path, state, drift


def _build_data(config: RunConfig, dp_rank: int, dp_size: int, consumed: int):
    from actcomp_dist.data.corpus import ensure_embedded_corpus
    from actcomp_dist.data.datasets import build_gpt_datasets
    from actcomp_dist.data.tokenizer import load_tokenizer

    data, train = config.data, config.train
    data_dir = Path(config.run_dir) / "data"
    weights = None
    if data.paths:
        tokenizer_path, prefixes, weights = data.tokenizer, data.prefixes, data.weights
    else:
        corpus = ensure_embedded_corpus(data_dir, vocab_size=data.embedded_vocab_size)
        tokenizer_path, prefixes = corpus.tokenizer_model, [corpus.data_prefix]
    tokenizer = load_tokenizer(tokenizer_path)
    eval_samples = train.eval_iters * train.micro_batch_size * dp_size
    train_ds, valid_ds = build_gpt_datasets(
        prefixes,
        tokenizer,
        seq_length=data.seq_length,
        seed=train.seed,
        split=data.split,
        train_samples=train.steps * train.global_batch_size,
        valid_samples=eval_samples,
        cache_dir=data_dir / "index-cache",
        weights=weights,
    )
    loader, valid_loader = build_loaders(config, train_ds, valid_ds, dp_rank, dp_size, consumed)
    return tokenizer, loader, valid_loader


def build_loaders(config: RunConfig, train_ds, valid_ds, dp_rank: int, dp_size: int, consumed: int):
    """This rank's train loader from data position ``consumed`` and its validation loader
    (always from the start; ``None`` without a validation set)."""
    from actcomp_dist.data.sampler import build_data_loader

    micro = config.train.micro_batch_size
    loader = build_data_loader(
        train_ds,
        micro_batch_size=micro,
        consumed_samples=consumed,
        dp_rank=dp_rank,
        dp_size=dp_size,
        num_workers=config.data.num_workers,
    )
    valid_loader = None
    if valid_ds is not None:
        valid_loader = build_data_loader(
            valid_ds, micro_batch_size=micro, consumed_samples=0, dp_rank=dp_rank, dp_size=dp_size
        )
    return loader, valid_loader


def _model_config(config: RunConfig, vocab: int, tp: int):
    from actcomp_dist.models import get_model_config

    overrides = dict(config.model.overrides)
    overrides.setdefault("seq_length", config.data.seq_length)
    overrides.setdefault("vocab_size", padded_vocab_size(vocab, tp))
    if overrides["vocab_size"] < vocab:
        raise ConfigError(
            f"model.vocab_size={overrides['vocab_size']} is smaller than the tokenizer's "
            f"vocabulary {vocab}"
        )
    try:
        return get_model_config(config.model.name, **overrides)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model: {err}") from None


def _batch_to(batch: dict[str, torch.Tensor], device: torch.device):
    return (
        batch["tokens"].to(device),
        batch["labels"].to(device),
        batch["loss_mask"].to(device),
    )


def _mean_loss(losses: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    return losses.sum() / loss_mask.sum().clamp(min=1)


def _dp_mean(values: list[torch.Tensor], group) -> float:
    total = torch.stack([v.float() for v in values]).mean().reshape(1)
    dist.all_reduce(total, group=group)
    return total.item() / dist.get_world_size(group)


def _memory_record(device: torch.device) -> dict[str, int]:
    """This rank's memory, named by what it is: the CUDA allocator's allocated, reserved and
    peak allocated bytes on a GPU, the process's peak resident set on a CPU; ``peak_bytes`` is
    the peak of either."""
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        return {
            "allocated_bytes": torch.cuda.memory_allocated(device),
            "reserved_bytes": torch.cuda.memory_reserved(device),
            "peak_allocated_bytes": peak,
            "peak_bytes": peak,
        }
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {"peak_rss_bytes": peak, "peak_bytes": peak}


# A resumed run that changes one of these trains another schedule than the one it started:
# allowed (extending a run is common), but said in the log and in metrics.jsonl.
RESUME_WATCHED = ("steps", "lr", "min_lr", "warmup_steps", "lr_decay")


def resume_changes(saved: dict[str, Any], config: RunConfig) -> dict[str, list]:
    """``{"train.KEY": [checkpoint value, config value]}`` for each :data:`RESUME_WATCHED` key
    that differs between the checkpoint's config ``saved`` and ``config``."""
    now = config.to_dict()["train"]
    before = saved.get("train", {})
    return {
        f"train.{key}": [before.get(key), now[key]]
        for key in RESUME_WATCHED
        if before.get(key) != now[key]
    }


def _describe(model, config: RunConfig) -> None:
    from actcomp_dist.models import parameter_count

    comp = config.compression
    sites = ", ".join(comp.sites) if comp.method != "none" else "-"
    ranks = sorted(
        {
            (m.site, getattr(m.compressor, "rank", None) or m.compressor.compressed_width)
            for m in model.modules()
            if hasattr(m, "compressor") and m.compression.method != "none"
        }
    )
    _print0(
        f"model {config.model.name}: {parameter_count(model.config):,} parameters | "
        f"compression {comp.method} (sites: {sites}"
        + (f"; ranks {', '.join(f'{s}={r}' for s, r in ranks)}" if ranks else "")
        + f") | activation checkpointing {config.activation_checkpointing.mode}"
        + f" | block ops {'efficient' if config.memory.efficient_ops else 'naive'}"
    )


class Trainer:
    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.created = time.perf_counter()  # start-up time, for the end-of-run summary
        info = launch_info()
        self.validate(info.world_size)
        check_run_lock(config.run_dir)
        self.resume_path, self.resume_state, self.accepted_drift = _check_resume(
            config, info.world_size
        )
        # The data identity, saved with every checkpoint (compared on resume).
        self.fingerprint = data_fingerprint(config)
        validate_model(config)
        self.world_size = info.world_size
        self.device = init_distributed(info, config.train.collective_timeout_s)
        self.run_lock = acquire_run_lock(config.run_dir)
        self.watchdog = None
        try:
            self._set_up()
            self.watchdog = start_watchdog(config, self.model, lambda: self.step, self.run_lock)
        except BaseException:
            self.close()
            raise

    def _set_up(self) -> None:
        """Everything after the process group and the lock (released if this raises)."""
        config = self.config
        from actcomp_dist.parallel import state
        from actcomp_dist.parallel.deepspeed_mpu import MegatronMPU

        self.ctx = state.initialize_model_parallel(config.parallel.tensor_parallel)
        train = config.train
        random.seed(train.seed)
        np.random.seed(train.seed)
        torch.manual_seed(train.seed)

        self.step = self.resume_state["step"] if self.resume_state else 0
        # The step of the last checkpoint saved or resumed from (None: none yet).
        self.saved_step = self.step if self.resume_state else None
        self.consumed = self.resume_state["consumed_samples"] if self.resume_state else 0
        self.tokenizer, self.loader, self.valid_loader = self.build_data(self.consumed)
        model_config = _model_config(config, self.tokenizer.vocab_size, self.ctx.tp_size)
        self.model = self.build_model(model_config)
        ac = config.activation_checkpointing
        apply_activation_checkpointing(self.model, ac.mode, ac.num_layers)

        from actcomp_dist.training.engine import build_engine

        self.engine = build_engine(config, self.model, self.world_size, MegatronMPU())
        self.schedule = self.model.compression_schedule
        self.guard = NonFiniteGuard(train.on_nonfinite, train.max_skipped_steps, train.precision)
        self.model_states = ModelStateProbe(self.model, self.engine.optimizer, self.engine.merger)
        # A resume may extend the run or change its LR settings: said with the first record
        # this run logs, and the restored LR schedule made to follow the new settings.
        # Accepted changes of exactness-relevant settings (checkpoint.allow_changes) are
        # logged the same way.
        schedule_changes = (
            resume_changes(self.resume_state["config"], config) if self.resume_state else {}
        )
        self.resume_changes = {**schedule_changes, **self.accepted_drift}
        if self.resume_path is not None:
            self._load(self.resume_path)
            if schedule_changes:
                restart_lr_schedule(self.engine.lr_scheduler, train)

        self.run_dir = Path(config.run_dir)
        self.rank = dist.get_rank()
        if self.rank == 0:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.json").write_text(
                json.dumps(config.to_dict(), indent=2, sort_keys=True)
            )
        self.logger = MetricsLogger(
            self.run_dir,
            enabled=self.rank == 0,
            tensorboard=config.logging.tensorboard,
            resume_step=self.step if self.resume_path is not None else None,
            total_steps=train.steps,
            wandb=config.logging.wandb,
            config=config.to_dict(),
        )

    # -- set-up hooks (overridden by the fine-tuning trainer) ---------------------------------
    def validate(self, world_size: int) -> None:
        """Config rules that need the world size (no collective); raises ConfigError."""
        validate_run(self.config, world_size)

    def build_data(self, consumed: int):
        """``(tokenizer, train loader, valid loader or None)`` from data position ``consumed``;
        the batches are dicts of ``tokens``, ``labels``, ``loss_mask``."""
        return _build_data(self.config, self.ctx.dp_rank, self.ctx.dp_size, consumed)

    def build_model(self, model_config) -> torch.nn.Module:
        """The model the engine will train (on ``self.device``), before activation
        checkpointing and DeepSpeed."""
        from actcomp_dist.models import build_llama

        return build_llama(
            model_config,
            self.config.compression,
            sequence_parallel=self.config.parallel.sequence_parallel,
            init_seed=self.config.train.seed,
            device=self.device,
            efficient_ops=self.config.memory.efficient_ops,
            loss_chunk_tokens=self.config.memory.chunked_loss_tokens,
            storage_policy=self.config.memory.storage_policy,
        )

    # -- checkpoints -------------------------------------------------------------------------
    def _trainer_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "consumed_samples": self.consumed,
            "schedule": self.schedule.state_dict(),
            "guard": self.guard.state_dict(),
            # Every parameter finite on every rank, checked when this state was saved.
            "healthy": True,
            "world_size": self.world_size,
            "config": self.config.to_dict(),
            # The model as built (vocabulary padded, overrides applied): what export tools need.
            "model_config": self.model.config.to_dict(),
            # The tokenizer's and the data files' identity (compared on resume).
            "fingerprint": self.fingerprint,
        }

    def _rank_state(self) -> dict[str, Any]:
        merger = self.engine.merger
        return {
            "rng": ckpt.rng_state(),
            "subspace_masters": merger.state_dict() if merger is not None else {},
        }

    def save(self) -> Path:
        """Collective. Refuses (:class:`NonFiniteError`, nothing written) to save parameters
        that are not all finite: such a state can only have been reached around the guard
        (a fault in memory, a path without DeepSpeed's overflow check)."""
        merger = self.engine.merger
        masters = [m for _, m in merger.masters.values()] if merger is not None else []
        if not parameters_finite(self.model, masters):
            raise NonFiniteError(
                f"step {self.step}: some parameters are not finite; nothing saved (the last "
                f"checkpoint is intact)"
            )
        ckpt.check_disk_space(self.config.checkpoint_dir, self.step, self._first_save_estimate())
        self.saved_step = self.step
        path = ckpt.save_checkpoint(
            self.config.checkpoint_dir,
            self.step,
            self.engine.engine,
            self._trainer_state(),
            self._rank_state(),
            keep=self.config.checkpoint.keep,
        )
        _print0(f"saved checkpoint {path}")
        return path

    def _first_save_estimate(self) -> int:
        """Bytes of a first checkpoint: every weight in the training precision, and per
        trained weight an fp32 master (mixed precision) and AdamW's two fp32 moments."""
        weight_bytes = 4 if self.config.train.precision == "fp32" else 2
        per_trained = 8 + (0 if weight_bytes == 4 else 4)
        total = sum(p.numel() for p in self.model.parameters())
        trained = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        # This rank's shard of a TP layer; the ranks of a TP group hold different shards.
        return (total * weight_bytes + trained * per_trained) * self.ctx.tp_size

    def _load(self, path: Path) -> None:
        rank_state = ckpt.load_checkpoint(path, self.engine.engine)
        self.schedule.load_state_dict(self.resume_state["schedule"])
        self.guard.load_state_dict(self.resume_state.get("guard", {}))
        ckpt.set_rng_state(rank_state["rng"])
        if self.engine.merger is not None:
            self.engine.merger.load_state_dict(rank_state["subspace_masters"])
        _print0(f"resumed from {path} at step {self.step}")

    # -- activation memory -------------------------------------------------------------------
    def predicted_saved_activation_bytes(self) -> int:
        """The analytic model's saved-activation bytes of one micro-batch on this rank."""
        from actcomp_dist.memory_model import ActivationSetting, predict_saved_activations

        config, model_config = self.config, self.model.config
        setting = ActivationSetting(
            micro_batch_size=config.train.micro_batch_size,
            seq_length=config.data.seq_length,
            dtype_bytes=torch.finfo(next(self.model.parameters()).dtype).bits // 8,
            tensor_parallel=config.parallel.tensor_parallel,
            sequence_parallel=config.parallel.sequence_parallel,
            rope_positions=model_config.seq_length,
            tp_rank=self.ctx.tp_rank,
            efficient_ops=self.config.memory.efficient_ops,
            loss_chunk_tokens=self.config.memory.chunked_loss_tokens,
            storage=self.config.memory.storage_policy,
        )
        ac = config.activation_checkpointing
        return predict_saved_activations(
            model_config, config.compression, setting, ac.mode, ac.num_layers
        ).total

    def _report_activation_memory(self, batch, measured: int) -> None:
        """Print the model summary and the activation memory of one micro-batch: measured,
        predicted, and measured again on the same batch with compression switched off."""
        from actcomp_dist.layers import compression_disabled

        _describe(self.model, self.config)
        predicted = self.predicted_saved_activation_bytes()
        line = (
            f"saved activations per micro-batch (per rank): measured {format_bytes(measured)}, "
            f"predicted {format_bytes(predicted)}"
        )
        if self.config.compression.method != "none":
            tokens, labels, mask = batch
            # Forward only, same batch; the graph is dropped without a backward.
            with compression_disabled(self.model), SavedTensorCounter() as counter:
                self.engine.engine(tokens, labels, mask)
            full = counter.total_bytes
            # In the memory-efficient block an uncompressed site's input is kept by another op
            # anyway, so compression can add bytes (its compressed copy) instead of saving.
            verb = "saves" if full >= measured else "adds"
            line += (
                f"; uncompressed {format_bytes(full)} -> compression {verb} "
                f"{format_bytes(abs(full - measured))} "
                f"({100.0 * abs(full - measured) / max(full, 1):.1f}%)"
            )
        _print0(line)

    def _report_model_states(self) -> None:
        """Print this rank's model-state bytes measured in the last optimizer step, the
        planner's prediction and the data-parallel gradient reduction per step."""
        from actcomp_dist.training.model_states import describe_model_states

        _print0(describe_model_states(self.config, self.model, self.ctx, self.model_states.last))

    # -- loop --------------------------------------------------------------------------------
    def evaluate(self) -> float | None:
        if self.valid_loader is None:
            return None
        engine = self.engine.engine
        engine.eval()
        losses = []
        with torch.no_grad():
            for i, batch in enumerate(self.valid_loader):
                if i >= self.config.train.eval_iters:
                    break
                tokens, labels, mask = _batch_to(batch, self.device)
                losses.append(_mean_loss(engine(tokens, labels, mask), mask))
        engine.train()
        return _dp_mean(losses, self.ctx.dp_group) if losses else None

    def close(self) -> None:
        """Release the run-directory lock and forget the parallel state this trainer created
        (the process group stays), so that :func:`run_pretraining` can run again in the same
        process. Idempotent."""
        from actcomp_dist.parallel import state

        if self.watchdog is not None:
            self.watchdog.stop()
        if self.run_lock is not None:
            self.run_lock.release()
        if state.is_initialized():
            state.destroy()

    def train(self) -> TrainResult:
        config, engine = self.config, self.engine.engine
        train = config.train
        if self.step >= train.steps:
            _print0(
                f"nothing to train: the checkpoint is at step {self.step} and train.steps="
                f"{train.steps} (raise train.steps to continue this run)"
            )
        # One rank watches the stop file (a stat per step on a shared file system); the
        # all-reduce in should_stop tells the others.
        stop_file = self.run_dir / "STOP" if self.rank == 0 else None
        handler = PreemptionHandler(stop_file).install()
        data = iter(self.loader)
        history: list[dict[str, Any]] = []
        last_loss = last_val = None
        preempted = stop_requested = False
        tokens_per_step = train.global_batch_size * config.data.seq_length
        flops_per_token = model_flops_per_token(self.model.config, config.data.seq_length)
        peak_flops = device_peak_flops(self.device)
        first_step, started = self.step, time.perf_counter()
        # The steps since the last logged record: their losses and time (the record's means).
        interval_losses: list[float] = []
        interval_time = 0.0
        pending_changes = dict(self.resume_changes)
        engine.train()
        described = states_reported = False

        def log_interval(record: dict[str, Any]) -> None:
            self.logger.log(
                self._interval_record(
                    record,
                    interval_losses,
                    interval_time,
                    started,
                    first_step,
                    flops_per_token,
                    peak_flops,
                    pending_changes,
                )
            )

        try:
            while self.step < train.steps:
                check_seed_agreement(self.model, self.step)  # at start-up and after resamples
                start = time.perf_counter()
                lr = self.engine.lr_scheduler.get_last_lr()[0]
                micro_losses = []
                saved_bytes = 0
                self.model_states.reset()
                accumulation = self.engine.gradient_accumulation_steps
                for micro in range(accumulation):
                    tokens, labels, mask = _batch_to(next(data), self.device)
                    if micro == 0:
                        with SavedTensorCounter() as counter:
                            loss = _mean_loss(engine(tokens, labels, mask), mask)
                        saved_bytes = counter.total_bytes
                        first_batch = (tokens, labels, mask)
                    else:
                        loss = _mean_loss(engine(tokens, labels, mask), mask)
                    micro_losses.append(loss.detach())
                    if micro == accumulation - 1:
                        # Before the backward that ends the step: the same verdict on every
                        # rank; a non-finite loss makes DeepSpeed skip the step (guard.py).
                        last_loss = _dp_mean(micro_losses, self.ctx.dp_group)
                        loss_finite = math.isfinite(last_loss)
                        if not loss_finite:
                            loss = poison(loss)
                    engine.backward(loss)
                    if micro == accumulation - 1:
                        self.model_states.measure()  # what backward left, before the step
                    engine.step()
                applied = engine.was_step_applied()
                if applied:
                    if self.engine.merger is not None:
                        self.engine.merger.merge(lr)
                    self.schedule.advance()
                stop_reason = self.guard.after_step(self.step + 1, loss_finite, applied)
                self.step += 1
                self.consumed += train.global_batch_size
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                step_time = time.perf_counter() - start
                if not described:
                    self._report_activation_memory(first_batch, saved_bytes)
                    described = True
                # After the second step: the first creates Adam's moments group by group.
                if not states_reported and (history or self.step == train.steps):
                    self._report_model_states()
                    states_reported = True
                interval_losses.append(last_loss)
                interval_time += step_time
                record = {"step": self.step, "loss": last_loss, "lr": lr}
                grad_norm = engine.get_global_grad_norm()
                record["grad_norm"] = None if grad_norm is None else float(grad_norm)
                record["step_time_s"] = step_time
                record["tokens_per_s"] = tokens_per_step / step_time
                record["saved_activation_bytes"] = saved_bytes
                record.update(_memory_record(self.device))
                record["model_state_bytes"] = self.model_states.last
                record["skipped_steps"] = engine.skipped_steps
                if not applied:
                    record["skipped"] = True
                if stop_reason is not None:
                    history.append(record)
                    log_interval(record)
                    raise NonFiniteError(stop_reason)
                if train.eval_interval and (
                    self.step % train.eval_interval == 0 or self.step == train.steps
                ):
                    last_val = self.evaluate()
                    if last_val is not None:
                        record["val_loss"] = last_val
                history.append(record)
                if (
                    self.step % config.logging.interval == 0
                    or "val_loss" in record
                    or not applied
                    or self.step == train.steps
                ):
                    log_interval(record)
                    interval_losses, interval_time, pending_changes = [], 0.0, {}
                interval = config.checkpoint.interval
                if interval and self.step % interval == 0 and self.step < train.steps:
                    self.save()
                if handler.should_stop(self.device):
                    stop_requested = True
                    if self.step < train.steps:
                        _print0(f"preemption requested: saving at step {self.step} and exiting")
                        preempted = True
                    break
            # At the end (unless checkpoint.at_end is off), or where a preemption or stop request
            # stopped the run; never twice for one step (an interval save just before, or a
            # resumed run that had nothing left to do).
            if self.saved_step != self.step and (config.checkpoint.at_end or stop_requested):
                self.save()
            if stop_requested:
                handler.consume_stop_file()
        finally:
            handler.uninstall()
            self.logger.close()
        result = TrainResult(self.step, last_loss, last_val, preempted, history)
        _print0(self.summary(result, first_step, started))
        return result

    def _interval_record(
        self,
        record: dict[str, Any],
        losses: list[float],
        seconds: float,
        started: float,
        first_step: int,
        flops_per_token: float,
        peak_flops: float | None,
        changes: dict[str, list],
    ) -> dict[str, Any]:
        """The record logged for the interval that ends with ``record``'s step: the mean loss
        and step time over the interval's ``losses`` and ``seconds``, tokens seen, time, ETA,
        achieved model TFLOP/s and MFU, and the schedule changes of a resume (once)."""
        train = self.config.train
        tokens_per_step = train.global_batch_size * self.config.data.seq_length
        out = dict(record)
        out["loss"] = math.fsum(losses) / len(losses)
        out["interval_steps"] = len(losses)
        out["step_time_s"] = seconds / len(losses)
        out["tokens_per_s"] = tokens_per_step / out["step_time_s"]
        out["tokens"] = self.step * tokens_per_step
        out["time"] = time.time()
        elapsed = time.perf_counter() - started
        out["elapsed_s"] = elapsed
        done = self.step - first_step
        out["eta_s"] = elapsed / done * (train.steps - self.step) if done else None
        # Model flops of the whole model over every rank's time, per device.
        out["model_tflops_per_s"] = out["tokens_per_s"] * flops_per_token / 1e12 / self.world_size
        if peak_flops is not None:
            out["mfu"] = out["model_tflops_per_s"] * 1e12 / peak_flops
        if changes:
            out["resume_changed"] = changes
            out["warnings"] = [
                f"resumed from step {self.resume_state['step']} with changed settings: "
                + ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changes.items())
            ]
        return out

    def summary(self, result: TrainResult, first_step: int, started: float) -> str:
        """The end-of-run report: what was trained, how fast, where everything went.
        ``started``: when the loop started (``time.perf_counter``)."""
        train = self.config.train
        steps = result.steps_done - first_step
        tokens = steps * train.global_batch_size * self.config.data.seq_length
        seconds = time.perf_counter() - started
        how = "stopped early (preemption)" if result.preempted else "done"
        lines = [
            f"{how}: step {result.steps_done}/{train.steps}, {steps} steps this run "
            f"({tokens:,} tokens) in {format_duration(seconds)}"
            + (f" ({tokens / seconds:,.0f} tok/s)" if steps and seconds > 0 else "")
            + f" after {format_duration(started - self.created)} of start-up"
        ]
        losses = []
        if result.final_loss is not None:
            losses.append(f"loss {result.final_loss:.4f} at step {result.steps_done}")
        if result.val_loss is not None:
            losses.append(f"val_loss {result.val_loss:.4f}")
        if losses:
            lines.append("  " + ", ".join(losses))
        if self.saved_step is not None:
            checkpoint = self.config.checkpoint_dir / ckpt.checkpoint_name(self.saved_step)
            lines.append(f"  checkpoint: {checkpoint}")
            lines.append(
                f"  export to Hugging Face: python tools/convert_hf_llama.py to-hf {checkpoint} "
                f"OUT_DIR"
            )
        lines.append(f"  metrics: {self.logger.path}")
        if self.config.logging.tensorboard:
            lines.append(f"  tensorboard: {self.run_dir / 'tensorboard'}")
        if self.config.logging.wandb is not None:
            url = self.logger.wandb_url
            lines.append(f"  wandb: {url or self.run_dir / 'wandb'}")
        return "\n".join(lines)


def run_pretraining(config: RunConfig) -> TrainResult:
    """Train as ``config`` says; collective (every rank calls it). Returns this rank's
    history."""
    trainer = Trainer(config)
    try:
        return trainer.train()
    finally:
        trainer.close()
