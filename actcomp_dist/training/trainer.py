"""The pretraining recipe: config in, trained model, checkpoints and metrics out.

:class:`Trainer` builds a run in this fixed order, one small function each (each step needs
the ones before it):

1. **validate** the config against the world size the launcher announced (no collective yet,
   so a bad config fails the same way on every rank and nothing hangs);
2. **resume checks**: no live run holds ``RUN_DIR/LOCK``; the checkpoint to resume from
   (marker, file hashes, compression config, settings, layout: an elastic resume at another
   data-parallel or TP size, :mod:`actcomp_dist.training.elastic`; :func:`check_resume`);
   then the model config (the first check that imports megatron-core). Still no collective,
   nothing written;
3. **distributed init**: the process group; rank 0 takes the run-directory lock
   (:mod:`actcomp_dist.training.run_lock`);
4. **parallel state** (Megatron tensor / data-parallel groups) and **seeds**;
5. **data** (:meth:`Trainer.build_data`): the embedded corpus or the configured indexed
   datasets, the resumable loader from the checkpoint's data position;
6. **model** (:meth:`Trainer.build_model`): the tensor-parallel LLaMA with the compression and
   memory policy of the config applied to its linears, then activation checkpointing;
7. **engine** (:func:`~actcomp_dist.training.engine.build_engine`): DeepSpeed with ZeRO,
   precision, AdamW, the LR schedule and clipping; the non-finite guard;
8. **resume**: weights, optimizer, schedules, RNG and subspace masters from the checkpoint
   (resharded for another layout, or the optimizer state fresh with
   ``checkpoint.reset_optimizer``);
9. **run directory and logging**: ``config.json`` and the metrics logger (rank 0 writes).

Then :meth:`Trainer.train` loops: one :func:`~actcomp_dist.training.step.train_step` (the
micro-batches, the optimizer step, the subspace merge and the compression schedule) -> the
non-finite verdict -> measure -> log / evaluate / checkpoint -> preemption check. A
non-finite loss or gradient norm is caught before the optimizer step changes anything (see
:mod:`actcomp_dist.training.guard`).

Fine-tuning (:mod:`actcomp_dist.training.finetune`) is this recipe with other
``validate`` / ``build_data`` / ``build_model`` / ``save`` hooks.
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

from actcomp_dist.data.corpus import ensure_embedded_corpus
from actcomp_dist.data.datasets import build_gpt_datasets
from actcomp_dist.data.sampler import build_data_loader
from actcomp_dist.data.tokenizer import load_tokenizer
from actcomp_dist.layers import compression_disabled
from actcomp_dist.memory import ModelStateProbe, SavedTensorCounter
from actcomp_dist.memory_model import ActivationSetting, predict_saved_activations
from actcomp_dist.models import build_llama, get_model_config, parameter_count
from actcomp_dist.parallel import state as parallel_state
from actcomp_dist.parallel.deepspeed_mpu import MegatronMPU
from actcomp_dist.parallel.state import ParallelContext
from actcomp_dist.seeds import check_seed_agreement
from actcomp_dist.site_effects import describe_site_effects, site_effects
from actcomp_dist.training import checkpoint as ckpt
from actcomp_dist.training.activation_checkpointing import apply_activation_checkpointing
from actcomp_dist.training.config import ConfigError, RunConfig, validate_model, validate_run
from actcomp_dist.training.distributed import init_distributed, launch_info
from actcomp_dist.training.drift import data_fingerprint, describe, refused, resume_drift
from actcomp_dist.training.elastic import LAYOUT_KEY, check_layout_change, load_elastic
from actcomp_dist.training.engine import build_engine
from actcomp_dist.training.export import export_at_end
from actcomp_dist.training.flops import device_peak_flops, model_flops_per_token
from actcomp_dist.training.guard import NonFiniteError, NonFiniteGuard, parameters_finite
from actcomp_dist.training.metrics import MetricsLogger, format_bytes, format_duration
from actcomp_dist.training.model_states import describe_model_states
from actcomp_dist.training.run_lock import acquire_run_lock, check_run_lock
from actcomp_dist.training.schedule import restart_lr_schedule
from actcomp_dist.training.signals import PreemptionHandler
from actcomp_dist.training.step import (
    StepResult,
    batch_to,
    data_parallel_mean,
    masked_mean_loss,
    train_step,
)
from actcomp_dist.training.watchdog import start_watchdog

VOCAB_MULTIPLE = 128  # pad the vocabulary like Megatron (per tensor-parallel rank)


@dataclass
class TrainResult:
    steps_done: int
    final_loss: float | None
    val_loss: float | None
    preempted: bool
    history: list[dict[str, Any]] = field(default_factory=list)


def print0(*args) -> None:
    """``print`` on rank 0 only (every rank before the process group exists)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*args, flush=True)


def padded_vocab_size(vocab: int, tp: int) -> int:
    multiple = VOCAB_MULTIPLE * tp
    return math.ceil(vocab / multiple) * multiple


# -- set-up steps, in the order Trainer runs them ----------------------------------------------


# How a resume with checkpoint.reset_optimizer is logged (with the accepted changes).
RESET_KEY = "optimizer_state"


def check_resume(config: RunConfig, world_size: int) -> tuple[Path | None, dict | None, dict]:
    """The checkpoint to resume from, its trainer state and the accepted changes of
    exactness-relevant settings (``checkpoint.allow_changes``), of the parallel layout
    (``parallel.layout``, :mod:`actcomp_dist.training.elastic`) and ``optimizer_state`` when
    ``checkpoint.reset_optimizer`` is set, or ``(None, None, {})``; raises
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
    # Another data-parallel size (ZeRO 0-2) or TP size (a subspace run's with
    # checkpoint.reset_optimizer): the elastic path; any other layout change is refused here.
    layout_change = check_layout_change(path, state, config, world_size)
    drift = resume_drift(state, config)
    not_allowed = refused(drift, config.checkpoint.allow_changes)
    if not_allowed:
        raise ckpt.CheckpointError(
            f"checkpoint {path} was written with other settings that an exact resume needs "
            f"({describe(not_allowed)}); resume with the original settings, list a deliberate "
            f"change in checkpoint.allow_changes, or start a new run_dir"
        )
    if config.checkpoint.reset_optimizer:
        layout_change[RESET_KEY] = ["from checkpoint", "reset"]
    return path, state, {**drift, **layout_change}


def seed_everything(seed: int) -> None:
    """Python's, NumPy's and torch's global generators (the model's initialisation and the
    compression layers draw from their own seeded generators)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def embedded_corpus(config: RunConfig):
    """The embedded default corpus (tokenizer + indexed dataset), built under
    ``RUN_DIR/data`` on first use."""
    data_dir = Path(config.run_dir) / "data"
    return ensure_embedded_corpus(data_dir, vocab_size=config.data.embedded_vocab_size)


def load_run_tokenizer(config: RunConfig, corpus=None):
    """``data.tokenizer``, or else the embedded corpus's (``corpus``, built if not given)."""
    if config.data.tokenizer:
        return load_tokenizer(config.data.tokenizer)
    return load_tokenizer((corpus or embedded_corpus(config)).tokenizer_model)


def total_train_samples(config: RunConfig) -> int:
    """Samples the whole run trains on (every data-parallel rank together)."""
    return config.train.steps * config.train.global_batch_size


def eval_samples(config: RunConfig, dp_size: int) -> int:
    """Samples one evaluation reads (``train.eval_iters`` micro-batches on every
    data-parallel rank)."""
    return config.train.eval_iters * config.train.micro_batch_size * dp_size


def build_pretraining_data(config: RunConfig, dp_rank: int, dp_size: int, consumed: int):
    """``(tokenizer, train loader, valid loader or None)`` of the configured indexed datasets
    (``data.paths``) or the embedded corpus, from data position ``consumed``."""
    data, train = config.data, config.train
    if data.paths:
        corpus, prefixes, weights = None, data.prefixes, data.weights
    else:
        corpus = embedded_corpus(config)
        prefixes, weights = [corpus.data_prefix], None
    tokenizer = load_run_tokenizer(config, corpus)
    train_ds, valid_ds = build_gpt_datasets(
        prefixes,
        tokenizer,
        seq_length=data.seq_length,
        seed=train.seed,
        split=data.split,
        train_samples=total_train_samples(config),
        valid_samples=eval_samples(config, dp_size),
        cache_dir=Path(config.run_dir) / "data" / "index-cache",
        weights=weights,
    )
    loader, valid_loader = build_loaders(config, train_ds, valid_ds, dp_rank, dp_size, consumed)
    return tokenizer, loader, valid_loader


def build_loaders(config: RunConfig, train_ds, valid_ds, dp_rank: int, dp_size: int, consumed: int):
    """This rank's train loader from data position ``consumed`` and its validation loader
    (always from the start; ``None`` without a validation set)."""
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


def build_model_config(config: RunConfig, vocab: int, tp: int, padded_vocab: int | None = None):
    """The :class:`~actcomp_dist.models.LlamaConfig` of ``model.name`` with the overrides,
    the data's sequence length and the tokenizer's vocabulary padded for ``tp`` ranks (or
    ``padded_vocab``: a resumed checkpoint's, which an elastic resume at another TP size
    keeps)."""
    overrides = dict(config.model.overrides)
    overrides.setdefault("seq_length", config.data.seq_length)
    overrides.setdefault("vocab_size", padded_vocab or padded_vocab_size(vocab, tp))
    if overrides["vocab_size"] < vocab:
        raise ConfigError(
            f"model.vocab_size={overrides['vocab_size']} is smaller than the tokenizer's "
            f"vocabulary {vocab}"
        )
    try:
        return get_model_config(config.model.name, **overrides)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model: {err}") from None


def build_pretraining_model(
    config: RunConfig,
    model_config,
    device: torch.device,
    parallel: ParallelContext | None = None,
):
    """The LLaMA model on ``device`` with the compression (``compression``) and memory policy
    (``memory.*``) of ``config`` applied to its linears, initialised from ``train.seed``,
    sharded over ``parallel``'s tensor-parallel group (``None``: the global parallel state)."""
    return build_llama(
        model_config,
        config.compression,
        init_seed=config.train.seed,
        device=device,
        parallel=parallel,
        **model_build_options(config),
    )


def model_build_options(config: RunConfig) -> dict:
    """What a LLaMA model is built with from ``config`` besides its shape, compression and
    weights: sequence parallelism and the ``memory.*`` policies (the keyword arguments of
    :func:`~actcomp_dist.models.build_llama` and
    :func:`~actcomp_dist.models.hf.build_llama_from_hf` alike)."""
    return dict(
        sequence_parallel=config.parallel.sequence_parallel,
        efficient_ops=config.memory.efficient_ops,
        loss_chunk_tokens=config.memory.chunked_loss_tokens,
        storage_policy=config.memory.storage_policy,
    )


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


def write_run_config(run_dir: Path, config: RunConfig) -> None:
    """``RUN_DIR/config.json``: the config as resolved (defaults, ``--set`` overrides)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True))


# -- measurement and reports -------------------------------------------------------------------


def memory_record(device: torch.device) -> dict[str, int]:
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


def describe_model(model, config: RunConfig) -> str:
    """One line: the model, its compression (sites, ranks), activation checkpointing and
    block ops."""
    comp = config.compression
    sites = ", ".join(comp.sites) if comp.method != "none" else "-"
    ranks = sorted(
        {
            (m.site, getattr(m.compressor, "rank", None) or m.compressor.compressed_width)
            for m in model.modules()
            if hasattr(m, "compressor") and m.compression.method != "none"
        }
    )
    return (
        f"model {config.model.name}: {parameter_count(model.config):,} parameters | "
        f"compression {comp.method} (sites: {sites}"
        + (f"; ranks {', '.join(f'{s}={r}' for s, r in ranks)}" if ranks else "")
        + f") | activation checkpointing {config.activation_checkpointing.mode}"
        + f" | block ops {'efficient' if config.memory.efficient_ops else 'naive'}"
    )


@dataclass
class LogInterval:
    """The steps since the last logged record (their losses and time: the logged means),
    and the resume's changed settings, said once with the first record."""

    started: float  # when the loop started (time.perf_counter)
    first_step: int
    flops_per_token: float
    peak_flops: float | None
    pending_changes: dict[str, list]
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, loss: float, seconds: float) -> None:
        self.losses.append(loss)
        self.seconds += seconds

    def restart(self) -> None:
        self.losses, self.seconds, self.pending_changes = [], 0.0, {}


class Trainer:
    """One training run: :meth:`__init__` builds it (collective), :meth:`train` runs it,
    :meth:`close` releases what it holds. Fine-tuning overrides the hooks ``validate``,
    ``build_data``, ``build_model`` and ``save``."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.created = time.perf_counter()  # start-up time, for the end-of-run summary
        info = launch_info()
        self.world_size = info.world_size
        # 1. validate: no collective yet, so every rank fails alike and nothing hangs.
        self.validate(info.world_size)
        # 2. resume checks (still no collective, nothing written): no live run holds the
        # directory, the checkpoint is complete and fits this config, the model config builds.
        check_run_lock(config.run_dir)
        self.resume_path, self.resume_state, self.accepted_drift = check_resume(
            config, info.world_size
        )
        # The data identity, saved with every checkpoint (compared on resume).
        self.fingerprint = data_fingerprint(config)
        validate_model(config)
        # 3. distributed init: the process group (collectives time out after
        #    train.collective_timeout_s), then rank 0 takes the run-directory lock.
        self.device = init_distributed(info, config.train.collective_timeout_s)
        self.run_lock = acquire_run_lock(config.run_dir)
        self.watchdog = None
        try:
            self._build()
            # 10. the watchdog: a rank with no progress for train.collective_timeout_s names
            #     the stopped ranks and exits (actcomp_dist/training/watchdog.py).
            self.watchdog = start_watchdog(config, self.model, lambda: self.step, self.run_lock)
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        """Steps 4-9 of the set-up (the lock is released by ``__init__`` if one raises)."""
        config = self.config
        # 4. parallel state, seeds.
        self.ctx = parallel_state.initialize_model_parallel(config.parallel.tensor_parallel)
        seed_everything(config.train.seed)
        # 5. data, from the checkpoint's data position.
        resumed = self.resume_state
        self.step = resumed["step"] if resumed else 0
        # The step of the last checkpoint saved or resumed from (None: none yet).
        self.saved_step = self.step if resumed else None
        self.consumed = resumed["consumed_samples"] if resumed else 0
        self.tokenizer, self.loader, self.valid_loader = self.build_data(self.consumed)
        # 6. model: compression and memory policy applied at build, then activation
        # checkpointing (it wraps the built blocks).
        saved_vocab = (resumed.get("model_config") or {}).get("vocab_size") if resumed else None
        model_config = build_model_config(
            config, self.tokenizer.vocab_size, self.ctx.tp_size, padded_vocab=saved_vocab
        )
        self.model = self.build_model(model_config)
        ac = config.activation_checkpointing
        apply_activation_checkpointing(self.model, ac.mode, ac.num_layers)
        # 7. engine: DeepSpeed (ZeRO, precision, AdamW, LR schedule, clipping), the subspace
        # merger, the compression schedule the layers share, the non-finite guard.
        self.build_deepspeed()
        # 8. resume: everything the checkpoint holds.
        self.apply_resume()
        # 9. run directory and logging (rank 0 writes).
        self.build_logging()

    # -- set-up hooks (overridden by the fine-tuning trainer) ---------------------------------
    def validate(self, world_size: int) -> None:
        """Config rules that need the world size (no collective); raises ConfigError."""
        validate_run(self.config, world_size)

    def build_data(self, consumed: int):
        """``(tokenizer, train loader, valid loader or None)`` from data position ``consumed``;
        the batches are dicts of ``tokens``, ``labels``, ``loss_mask``."""
        return build_pretraining_data(self.config, self.ctx.dp_rank, self.ctx.dp_size, consumed)

    def build_model(self, model_config) -> torch.nn.Module:
        """The model the engine will train (on ``self.device``), before activation
        checkpointing and DeepSpeed."""
        return build_pretraining_model(self.config, model_config, self.device, self.ctx)

    # -- set-up steps 7-9 ----------------------------------------------------------------------
    def build_deepspeed(self) -> None:
        train = self.config.train
        built = build_engine(self.config, self.model, self.world_size, MegatronMPU())
        self.engine = built.engine  # deepspeed.DeepSpeedEngine
        self.optimizer = built.optimizer
        self.lr_scheduler = built.lr_scheduler
        self.merger = built.merger
        self.schedule = self.model.compression_schedule
        self.guard = NonFiniteGuard(train.on_nonfinite, train.max_skipped_steps, train.precision)
        self.model_states = ModelStateProbe(self.model, self.optimizer, self.merger)

    def apply_resume(self) -> None:
        """Load the checkpoint (if any). A resume may extend the run or change its LR
        settings: said with the first record this run logs, and the restored LR schedule made
        to follow the new settings. Accepted changes of exactness-relevant settings
        (``checkpoint.allow_changes``) are logged the same way."""
        schedule_changes = (
            resume_changes(self.resume_state["config"], self.config) if self.resume_state else {}
        )
        self.resume_changes = {**schedule_changes, **self.accepted_drift}
        if self.resume_path is not None:
            self._load(self.resume_path)
            if schedule_changes:
                restart_lr_schedule(self.lr_scheduler, self.config.train)

    def build_logging(self) -> None:
        config = self.config
        self.run_dir = Path(config.run_dir)
        self.rank = dist.get_rank()
        if self.rank == 0:
            write_run_config(self.run_dir, config)
        self.logger = MetricsLogger(
            self.run_dir,
            enabled=self.rank == 0,
            tensorboard=config.logging.tensorboard,
            resume_step=self.step if self.resume_path is not None else None,
            total_steps=config.train.steps,
            wandb=config.logging.wandb,
            config=config.to_dict(),
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
        return {
            "rng": ckpt.rng_state(),
            "subspace_masters": self.merger.state_dict() if self.merger is not None else {},
        }

    def save(self) -> Path:
        """Collective. Refuses (:class:`NonFiniteError`, nothing written) to save parameters
        that are not all finite: such a state can only have been reached around the guard
        (a fault in memory, a path without DeepSpeed's overflow check)."""
        merger = self.merger
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
            self.engine,
            self._trainer_state(),
            self._rank_state(),
            keep=self.config.checkpoint.keep,
        )
        print0(f"saved checkpoint {path}")
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
        drift = self.accepted_drift
        if LAYOUT_KEY in drift or RESET_KEY in drift:
            rank_state = load_elastic(
                path,
                self.resume_state,
                self.engine,
                self.merger,
                self.model,
                self.ctx,
                reset_optimizer=self.config.checkpoint.reset_optimizer,
            )
            for key in (LAYOUT_KEY, RESET_KEY):
                if key in drift:
                    print0(f"warning: elastic resume: {key} {drift[key][0]} -> {drift[key][1]}")
        else:
            rank_state = ckpt.load_checkpoint(path, self.engine)
        self.schedule.load_state_dict(self.resume_state["schedule"])
        self.guard.load_state_dict(self.resume_state.get("guard", {}))
        ckpt.set_rng_state(rank_state["rng"])
        if self.merger is not None and LAYOUT_KEY not in drift and RESET_KEY not in drift:
            self.merger.load_state_dict(rank_state["subspace_masters"])
        print0(f"resumed from {path} at step {self.step}")

    # -- activation memory -------------------------------------------------------------------
    def _activation_setting(self) -> ActivationSetting:
        """This rank's micro-batch shape, as the analytic memory model takes it."""
        config, model_config = self.config, self.model.config
        return ActivationSetting(
            micro_batch_size=config.train.micro_batch_size,
            seq_length=config.data.seq_length,
            dtype_bytes=torch.finfo(next(self.model.parameters()).dtype).bits // 8,
            tensor_parallel=config.parallel.tensor_parallel,
            sequence_parallel=config.parallel.sequence_parallel,
            rope_positions=model_config.seq_length,
            tp_rank=self.ctx.tp_rank,
            efficient_ops=config.memory.efficient_ops,
            loss_chunk_tokens=config.memory.chunked_loss_tokens,
            storage=config.memory.storage_policy,
            device_type=self.device.type,
        )

    def predicted_saved_activations(self):
        """The analytic model's saved activations of one micro-batch on this rank
        (:class:`~actcomp_dist.memory_model.ActivationPrediction`)."""
        ac = self.config.activation_checkpointing
        return predict_saved_activations(
            self.model.config,
            self.config.compression,
            self._activation_setting(),
            ac.mode,
            ac.num_layers,
        )

    def predicted_saved_activation_bytes(self) -> int:
        """The analytic model's saved-activation bytes of one micro-batch on this rank: every
        byte autograd keeps for backward, on the device and (``memory.policy`` ``offload``)
        in host memory, as :class:`~actcomp_dist.memory.SavedTensorCounter` counts them."""
        predicted = self.predicted_saved_activations()
        return predicted.total + predicted.host_total

    def _report_activation_memory(self, batch, measured: int) -> None:
        """Print the model summary and the activation memory of one micro-batch: measured,
        predicted, and measured again on the same batch with compression switched off."""
        print0(describe_model(self.model, self.config))
        prediction = self.predicted_saved_activations()
        predicted = prediction.total + prediction.host_total
        line = (
            f"saved activations per micro-batch (per rank): measured {format_bytes(measured)}, "
            f"predicted {format_bytes(predicted)}"
        )
        if prediction.host_total:
            line += f" (of which {format_bytes(prediction.host_total)} in pinned host memory)"
        if self.config.compression.method != "none":
            tokens, labels, mask = batch
            # Forward only, same batch; the graph is dropped without a backward.
            with compression_disabled(self.model), SavedTensorCounter() as counter:
                self.engine(tokens, labels, mask)
            full = counter.total_bytes
            # In the memory-efficient block an uncompressed site's input is kept by another op
            # anyway, so compression can add bytes (its compressed copy) instead of saving.
            verb = "saves" if full >= measured else "adds"
            line += (
                f"; uncompressed {format_bytes(full)} -> compression {verb} "
                f"{format_bytes(abs(full - measured))} "
                f"({100.0 * abs(full - measured) / max(full, 1):.1f}%)"
            )
        print0(line)
        # Per site, what compressing it removes given what its neighbours keep (predicted,
        # exact), with a plain-words warning for each site that removes nothing.
        ac = self.config.activation_checkpointing
        effects = site_effects(
            self.model.config,
            self.config.compression,
            self._activation_setting(),
            ac.mode,
            ac.num_layers,
        )
        for site_line in describe_site_effects(effects, format_bytes):
            print0(site_line)

    def _report_model_states(self) -> None:
        """Print this rank's model-state bytes measured in the last optimizer step, the
        planner's prediction and the data-parallel gradient reduction per step."""
        print0(describe_model_states(self.config, self.model, self.ctx, self.model_states.last))

    # -- loop --------------------------------------------------------------------------------
    def evaluate(self) -> float | None:
        if self.valid_loader is None:
            return None
        engine = self.engine
        engine.eval()
        losses = []
        with torch.no_grad():
            for i, batch in enumerate(self.valid_loader):
                if i >= self.config.train.eval_iters:
                    break
                tokens, labels, mask = batch_to(batch, self.device)
                losses.append(masked_mean_loss(engine(tokens, labels, mask), mask))
        engine.train()
        return data_parallel_mean(losses, self.ctx.dp_group) if losses else None

    def close(self) -> None:
        """Release the run-directory lock and forget the parallel state this trainer created
        (the process group stays), so that :func:`run_pretraining` can run again in the same
        process. Idempotent."""
        if self.watchdog is not None:
            self.watchdog.stop()
        if self.run_lock is not None:
            self.run_lock.release()
        if parallel_state.is_initialized():
            parallel_state.destroy()

    def train(self) -> TrainResult:
        config, train = self.config, self.config.train
        if self.step >= train.steps:
            print0(
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
        interval = LogInterval(
            started=time.perf_counter(),
            first_step=self.step,
            flops_per_token=model_flops_per_token(self.model.config, config.data.seq_length),
            peak_flops=device_peak_flops(self.device),
            pending_changes=dict(self.resume_changes),
        )
        self.engine.train()
        self.first_step = self.step  # of this run (a resumed run starts at its checkpoint's)
        described = states_reported = False
        try:
            while self.step < train.steps:
                check_seed_agreement(self.model, self.step)  # at start-up and after resamples
                result, step_time, stop_reason = self._train_one_step(data)
                last_loss = result.loss
                if not described:
                    self._report_activation_memory(
                        result.first_micro_batch, result.saved_activation_bytes
                    )
                    described = True
                # After the second step: the first creates Adam's moments group by group.
                if not states_reported and (history or self.step == train.steps):
                    self._report_model_states()
                    states_reported = True
                interval.add(result.loss, step_time)
                record = self._step_record(result, step_time)
                if stop_reason is not None:
                    history.append(record)
                    self._log(record, interval)
                    raise NonFiniteError(stop_reason)
                if self._evaluation_due(self.step):
                    last_val = self.evaluate()
                    if last_val is not None:
                        record["val_loss"] = last_val
                history.append(record)
                if self._log_due(record):
                    self._log(record, interval)
                    interval.restart()
                if self._checkpoint_due():
                    self.save()
                if handler.should_stop(self.device):
                    stop_requested = True
                    if self.step < train.steps:
                        print0(f"preemption requested: saving at step {self.step} and exiting")
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
        if not preempted:
            self.hf_export = export_at_end(self)
        print0(self.summary(result, interval.first_step, interval.started))
        return result

    # -- the loop's parts ----------------------------------------------------------------------
    def _measurement_due(self, step: int) -> bool:
        """Whether step ``step`` (1-based) counts its saved activations and measures its
        model states: the first two steps of this run (the start-up reports: the activation
        memory after the first, the model states after the second, when Adam's moments
        exist), the steps that log on schedule (every ``logging.interval``), the steps that
        evaluate, and the last step. The other steps run without the saved-tensor hook and
        the model-state walk, which cost a few percent of a small model's step (more for
        8-bit storage: its codes and scales are more tensors to hook), so that their times
        are those of training alone."""
        return (
            step <= self.first_step + 2
            or step % self.config.logging.interval == 0
            or step == self.config.train.steps
            or self._evaluation_due(step)
        )

    def _train_one_step(self, data) -> tuple[StepResult, float, str | None]:
        """One optimizer step on the next batches of ``data``, the non-finite verdict, the
        data position moved on: ``(result, seconds, the reason to stop or None)``."""
        start, cpu_start = time.perf_counter(), time.process_time()
        measured = self._measurement_due(self.step + 1)
        self.model_states.reset()
        self.model_states.active = measured
        result = train_step(
            self.engine,
            data,
            self.schedule,
            device=self.device,
            dp_group=self.ctx.dp_group,
            merger=self.merger,
            count_saved_activations=measured,
            after_last_backward=self.model_states.measure,  # what backward left, before the step
        )
        stop_reason = self.guard.after_step(self.step + 1, result.loss_finite, result.applied)
        self.step += 1
        self.consumed += self.config.train.global_batch_size
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        # This process's CPU time (all its threads) of the step: on a shared CPU it does not
        # count the time other jobs held the cores, which the wall time does.
        self.step_cpu_s = time.process_time() - cpu_start
        return result, time.perf_counter() - start, stop_reason

    def _step_record(self, result: StepResult, step_time: float) -> dict[str, Any]:
        """The metrics of the step just done (``step`` is its 1-based number)."""
        train = self.config.train
        tokens_per_step = train.global_batch_size * self.config.data.seq_length
        record = {"step": self.step, "loss": result.loss, "lr": result.lr}
        record["grad_norm"] = result.grad_norm
        record["step_time_s"] = step_time
        record["tokens_per_s"] = tokens_per_step / step_time
        record["step_cpu_s"] = self.step_cpu_s
        # Only on the steps that measure (``_measurement_due``); absent on the others.
        if result.saved_activation_bytes is not None:
            record["saved_activation_bytes"] = result.saved_activation_bytes
        record.update(memory_record(self.device))
        if self.model_states.last is not None:
            record["model_state_bytes"] = self.model_states.last
        record["skipped_steps"] = self.engine.skipped_steps
        if not result.applied:
            record["skipped"] = True
        return record

    def _evaluation_due(self, step: int) -> bool:
        every = self.config.train.eval_interval
        return bool(every) and (step % every == 0 or step == self.config.train.steps)

    def _log_due(self, record: dict[str, Any]) -> bool:
        return (
            self.step % self.config.logging.interval == 0
            or "val_loss" in record
            or bool(record.get("skipped"))
            or self.step == self.config.train.steps
        )

    def _checkpoint_due(self) -> bool:
        every = self.config.checkpoint.interval
        return bool(every) and self.step % every == 0 and self.step < self.config.train.steps

    def _log(self, record: dict[str, Any], interval: LogInterval) -> None:
        """Log the record for the interval that ends with ``record``'s step: the mean loss
        and step time over the interval, tokens seen, time, ETA, achieved model TFLOP/s and
        MFU, and the schedule changes of a resume (once)."""
        train = self.config.train
        tokens_per_step = train.global_batch_size * self.config.data.seq_length
        losses = interval.losses
        out = dict(record)
        out.pop("step_cpu_s")  # one step's; the history keeps it (tools/ablate.py reads it)
        out["loss"] = math.fsum(losses) / len(losses)
        out["interval_steps"] = len(losses)
        out["step_time_s"] = interval.seconds / len(losses)
        out["tokens_per_s"] = tokens_per_step / out["step_time_s"]
        out["tokens"] = self.step * tokens_per_step
        out["time"] = time.time()
        elapsed = time.perf_counter() - interval.started
        out["elapsed_s"] = elapsed
        done = self.step - interval.first_step
        out["eta_s"] = elapsed / done * (train.steps - self.step) if done else None
        # Model flops of the whole model over every rank's time, per device.
        out["model_tflops_per_s"] = (
            out["tokens_per_s"] * interval.flops_per_token / 1e12 / self.world_size
        )
        if interval.peak_flops is not None:
            out["mfu"] = out["model_tflops_per_s"] * 1e12 / interval.peak_flops
        changes = interval.pending_changes
        if changes:
            out["resume_changed"] = changes
            out["warnings"] = [
                f"resumed from step {self.resume_state['step']} with changed settings: "
                + ", ".join(f"{key} {old!r} -> {new!r}" for key, (old, new) in changes.items())
            ]
        self.logger.log(out)

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
        export = getattr(self, "hf_export", None)
        if self.saved_step is not None:
            checkpoint = self.config.checkpoint_dir / ckpt.checkpoint_name(self.saved_step)
            lines.append(f"  checkpoint: {checkpoint}")
            if export is None:
                lines.append(
                    f"  export to Hugging Face: actcomp-convert-hf to-hf {checkpoint} OUT_DIR"
                )
        if export is not None:
            lines.append(f"  Hugging Face export: {export}")
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
