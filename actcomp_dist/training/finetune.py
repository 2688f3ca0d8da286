"""Fine-tuning: the pretraining recipe (:class:`~actcomp_dist.training.trainer.Trainer`) with
a prompt/response data source and three modes, as hooks.

    deepspeed --num_gpus 2 launch/finetune.py --config configs/finetune_tiny_lori.json

The config (:mod:`actcomp_dist.training.finetune_config`) is the pretraining one plus
``model.init_from``, JSONL ``data.train`` / ``data.valid`` and a ``finetune`` section. The hooks:

- ``validate``: :func:`~actcomp_dist.training.finetune_config.validate_finetune`;
- ``build_data``: JSONL rows (or a synthetic task) -> masked samples -> the resumable loader
  (:mod:`actcomp_dist.data.jsonl`); the data position is ``consumed_samples`` as in
  pretraining, so resuming is exact. The loss of a micro-batch is the mean over its response
  tokens: the logged ``loss`` / ``val_loss`` are the response losses;
- ``build_model``: random init or a Hugging Face LLaMA (``model.init_from``), then the
  adapters of mode ``lora`` / ``lori`` (base frozen) and LoRI-S's masks;
- ``save``: the checkpoint, then the adapter (``finetune.adapter_dir``).

LoRI-S (LoRI, arXiv 2504.07448, section 3.2: the mask of a task comes from a dense LoRI
adapter trained on that task): either two runs, a dense one and then ``--set
'finetune.mask={"sparsity": 0.9, "calibration_adapter": "RUN1/adapter"}'`` with another
``run_dir``, or one run with ``finetune.mask={"sparsity": 0.9, "calibration_steps": N}``:
:func:`calibrate` first trains the dense adapter for N steps as a run of its own in
``RUN_DIR/calibration`` (same data, seed and optimizer settings; it resumes like any run and is
not repeated once complete), then the masked adapter trains from B = 0 and step 0 with the
masks of that adapter's global magnitude threshold.

**Continual learning** (``finetune.previous``: the saved adapters of tasks 0 .. t-1, in order):
the run trains task t's adapter while the earlier ones are loaded frozen (``requires_grad``
off, outside the optimizer: they stay bit for bit what was saved) and stay in the forward, as
the model after task t-1 computes. Each task's A comes from the base seed and the task index
(``AdapterConfig.task``), so the tasks' adapters are independent; a calibration adapter
(``calibration_steps``) is trained on task t with the same frozen predecessors.

``train.export_hf`` writes the merged model (adapters folded into the base weights) at the end.

Not implemented yet: ``init_from`` a pretraining checkpoint, tokenised-row caching, the global
(rather than per-micro-batch) normalisation of the response loss.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from actcomp_dist.adapters import (
    adapter_parameter_count,
    apply_adapters,
    compute_masks,
    load_adapter,
    save_adapter,
    set_adapter_trainable,
    start_masked_training,
)
from actcomp_dist.data.jsonl import (
    JsonlError,
    PromptResponseDataset,
    encode_rows,
    read_jsonl,
    synthetic_rows,
)
from actcomp_dist.models.hf import build_llama_from_hf
from actcomp_dist.training.config import CheckpointSection, ConfigError
from actcomp_dist.training.distributed import launch_info
from actcomp_dist.training.finetune_config import FinetuneRunConfig, validate_finetune
from actcomp_dist.training.run_lock import check_run_lock
from actcomp_dist.training.trainer import (
    Trainer,
    TrainResult,
    build_loaders,
    check_resume,
    eval_samples,
    load_run_tokenizer,
    model_build_options,
    print0,
    total_train_samples,
)


def finetune_rows(config: FinetuneRunConfig) -> tuple[list[dict], list[dict]]:
    """``(training rows, validation rows)``: of ``data.synthetic_task``, or read from the
    JSONL files of ``data.train`` / ``data.valid``."""
    data, seed = config.data, config.train.seed
    if data.synthetic_task is not None:
        train_rows = synthetic_rows(data.synthetic_task, data.synthetic_rows, seed)
        valid_rows = synthetic_rows(data.synthetic_task, max(data.synthetic_rows // 8, 1), seed + 1)
        return train_rows, valid_rows
    train_rows = [r for path in data.train for r in read_jsonl(path)]
    valid_rows = [r for path in data.valid for r in read_jsonl(path)]
    return train_rows, valid_rows


class FinetuneTrainer(Trainer):
    """:class:`Trainer` with the fine-tuning data, model initialisation and modes."""

    config: FinetuneRunConfig

    def validate(self, world_size: int) -> None:
        validate_finetune(self.config, world_size)

    @property
    def adapter_dir(self) -> Path:
        ft = self.config.finetune
        return Path(ft.adapter_dir or Path(self.config.run_dir) / "adapter")

    def build_data(self, consumed: int):
        config = self.config
        data, train = config.data, config.train
        tokenizer = load_run_tokenizer(config)
        try:
            train_rows, valid_rows = finetune_rows(config)
            encoding = {
                "prompt_template": data.prompt_template,
                "loss_on": data.loss_on,
                "append_eos": data.append_eos,
            }
            train_samples, dropped = encode_rows(train_rows, tokenizer, data.seq_length, **encoding)
            valid_samples, valid_dropped = encode_rows(
                valid_rows, tokenizer, data.seq_length, **encoding
            )
            print0(
                f"fine-tuning data: {len(train_samples)} training rows ({dropped} dropped), "
                f"{len(valid_samples)} validation rows ({valid_dropped} dropped)"
            )
            dp_rank, dp_size = self.ctx.dp_rank, self.ctx.dp_size
            train_ds = PromptResponseDataset(
                train_samples, total_train_samples(config), train.seed, shuffle=True
            )
            valid_ds = None
            if valid_samples:
                valid_ds = PromptResponseDataset(
                    valid_samples, eval_samples(config, dp_size), train.seed, shuffle=False
                )
        except JsonlError as err:  # a user error in the data: exit code 2 like a config error
            raise ConfigError(str(err)) from None
        loader, valid_loader = build_loaders(config, train_ds, valid_ds, dp_rank, dp_size, consumed)
        return tokenizer, loader, valid_loader

    def build_model(self, model_config) -> torch.nn.Module:
        config = self.config
        init_from = config.model.init_from
        if init_from is None:
            model = super().build_model(model_config)
        else:
            model = build_llama_from_hf(
                init_from,
                config.compression,
                seq_length=config.data.seq_length,
                device=self.device,
                parallel=self.ctx,
                **model_build_options(config),
            )
            if model.config.vocab_size < self.tokenizer.vocab_size:
                raise ConfigError(
                    f"model.init_from={init_from}: vocabulary {model.config.vocab_size} is "
                    f"smaller than data.tokenizer's {self.tokenizer.vocab_size}"
                )
        mode = config.finetune.mode
        if mode != "full":
            sites = apply_adapters(model, config.finetune.adapter_config(), "default")
            # Continual learning: the earlier tasks' adapters, in the forward but frozen.
            for index, directory in enumerate(config.finetune.previous):
                load_adapter(model, directory, f"task{index}")
                set_adapter_trainable(model, f"task{index}", False)
            if config.finetune.mask is not None:
                self._start_masked(model)
            count = adapter_parameter_count(model, "default")
            print0(
                f"finetune {mode}: adapters on {len(sites)} linears, {count:,} trainable"
                + (
                    f" (task {config.finetune.task}; the {config.finetune.task} earlier "
                    f"task adapter(s) frozen)"
                    if config.finetune.previous
                    else ""
                )
            )
        else:
            print0("finetune full: every weight trains")
        return model

    def _start_masked(self, model) -> None:
        """LoRI-S: B of the calibration adapter -> one global magnitude threshold -> masks;
        then B = 0 and training inside the masks (collective over the TP group). On resume the
        same masks are computed again and the checkpoint then restores B (and the masks)."""
        calibration = calibration_adapter_dir(self.config)
        load_adapter(model, calibration, "default")
        threshold = compute_masks(model, name="default")
        start_masked_training(model, "default")
        print0(
            f"LoRI-S: masks from {calibration} at sparsity "
            f"{self.config.finetune.adapter_config().sparsity} (threshold {threshold:.3g}); "
            f"B restarts from 0"
        )

    def save(self) -> Path:
        path = super().save()
        if self.config.finetune.mode != "full":
            save_adapter(self.model, self.adapter_dir, "default")
            print0(f"saved adapter {self.adapter_dir}")
        return path


def calibration_adapter_dir(config: FinetuneRunConfig) -> Path:
    """The dense adapter LoRI-S masks come from: ``finetune.mask.calibration_adapter``, or the
    one :func:`calibrate` trains (``RUN_DIR/calibration/adapter``)."""
    mask = config.finetune.mask
    if mask.get("calibration_adapter") is not None:
        return Path(mask["calibration_adapter"])
    return Path(config.run_dir) / "calibration" / "adapter"


def calibration_config(config: FinetuneRunConfig) -> FinetuneRunConfig:
    """The dense-LoRI run of ``finetune.mask.calibration_steps`` steps: ``config`` without the
    mask, in ``RUN_DIR/calibration`` (its adapter in ``RUN_DIR/calibration/adapter``), resumed
    from its own latest checkpoint, saved only at its end, no evaluation and no export."""
    calibration = copy.deepcopy(config)
    steps = config.finetune.mask["calibration_steps"]
    calibration.run_dir = str(Path(config.run_dir) / "calibration")
    calibration.finetune.mask = None
    calibration.finetune.adapter_dir = None
    calibration.train.steps = steps
    calibration.train.warmup_steps = min(config.train.warmup_steps, steps)
    calibration.train.eval_interval = 0
    calibration.train.export_hf = False
    calibration.checkpoint = CheckpointSection(interval=0, resume="latest", keep=1)
    return calibration


def calibrate(config: FinetuneRunConfig) -> TrainResult | None:
    """Collective. For ``finetune.mask.calibration_steps``: train the dense calibration
    adapter (:func:`calibration_config`) unless its run is already complete; ``None`` when
    there is nothing to calibrate. ``config`` is validated first, so a bad config exits before
    anything is written or any collective runs."""
    mask = config.finetune.mask
    if config.finetune.mode != "lori" or mask is None or mask.get("calibration_steps") is None:
        return None
    world_size = launch_info().world_size
    validate_finetune(config, world_size)
    # The masked run's directory and checkpoint, checked before the calibration writes.
    check_run_lock(config.run_dir)
    check_resume(config, world_size)
    print0(
        f"LoRI-S calibration: a dense LoRI adapter, {mask['calibration_steps']} steps, in "
        f"{Path(config.run_dir) / 'calibration'}"
    )
    trainer = FinetuneTrainer(calibration_config(config))
    try:
        return trainer.train()
    finally:
        trainer.close()


def run_finetuning(config: FinetuneRunConfig) -> TrainResult:
    """Fine-tune as ``config`` says (after the calibration run LoRI-S's
    ``calibration_steps`` asks for); collective (every rank calls it)."""
    if not isinstance(config, FinetuneRunConfig):
        raise ConfigError(f"run_finetuning needs a FinetuneRunConfig, got {type(config).__name__}")
    calibrated = calibrate(config)
    if calibrated is not None and calibrated.preempted:
        return calibrated
    trainer = FinetuneTrainer(config)
    try:
        return trainer.train()
    finally:
        trainer.close()
