"""Fine-tuning: the pretraining trainer with a prompt/response data source and three modes.

    deepspeed --num_gpus 2 launch/finetune.py --config configs/finetune_tiny_lori.json

The config is the pretraining :class:`~actcomp_dist.training.config.RunConfig` (same sections,
``--set`` overrides, checkpoints, metrics) with three changes (see ``notes/finetune_design.md``):

``model.init_from``
    ``null``: ``model.name`` initialised at random (seed ``train.seed``); or a local Hugging Face
    LLaMA directory (``config.json`` + safetensors; ``model.name`` and ``model.overrides`` are
    then not used, the sequence length is ``data.seq_length``). Needs ``data.tokenizer``.

``data`` (replaces ``paths`` / ``split``, which must stay unset)
    ``train`` / ``valid``: lists of JSONL files. A row is ``{"prompt": ..., "response": ...}``
    (the loss is on the response and EOS tokens only) or ``{"text": ...}`` (loss everywhere);
    other keys are ignored. ``tokenizer``: a SentencePiece ``.model``; ``null`` = the embedded
    corpus tokenizer (``embedded_vocab_size`` pieces, built under ``RUN_DIR/data``).
    ``seq_length``: tokens per sample. ``loss_on``: ``response`` (default) or ``all`` (prompt
    tokens too). ``prompt_template``: a format string with ``{prompt}`` (default
    ``"{prompt}"``). ``append_eos``: end every row with EOS, trained on (default true).
    ``synthetic_task``: no files, a generated task (``reverse_words``: the prompt's words in
    reverse order) for the tiny configs; ``synthetic_rows``: how many rows it generates.
    ``num_workers``: data-loader worker processes.

``finetune``
    ``mode``: ``full`` (every weight trained, the linears compressed as ``compression`` says),
    ``lora`` or ``lori`` (adapters on ``adapter.targets``, base frozen: only the adapters'
    parameters reach the optimizer). ``adapter`` (lora/lori only): the
    :class:`~actcomp_dist.adapters.AdapterConfig` fields ``rank``, ``alpha``, ``targets``,
    ``seed``, ``cache_A``, ``input_compression`` (lora only). ``mask`` (lori only): ``null``
    (dense LoRI) or ``{"sparsity": 0.9, "calibration_adapter": DIR}`` (LoRI-S: the masks keep
    the ``1 - sparsity`` largest-magnitude B entries, one threshold over all B matrices, of the
    dense LoRI adapter saved in ``DIR`` by an earlier calibration run with the same ``adapter``
    settings; training restarts from B = 0 inside them). ``adapter_dir``: where the
    adapter is saved (B, and A for LoRA; LoRI's A is regenerated from the seed and never
    stored) at every checkpoint and at the end; ``null`` = ``RUN_DIR/adapter``.

Samples: ``tokens = [BOS] + tok(template(prompt)) + tok(response) + [EOS]``; inputs
``tokens[:-1]``, labels ``tokens[1:]``, ``loss_mask[i] = 1`` iff label ``i`` is a response (or
EOS) token. A row longer than ``seq_length + 1`` loses prompt tokens from the left first, then
response tokens from the right; one with no trained token left is dropped (the count is
printed). Shorter ones are padded (EOS id, ``loss_mask`` 0). Sample ``i`` of the training set
is row ``perm_e[i mod n]`` of epoch ``e = i // n`` (a fresh seeded permutation per epoch), so the
data position is ``consumed_samples`` as in pretraining and resuming is exact. The loss of a
micro-batch is the mean over its response tokens: the logged ``loss`` / ``val_loss`` are the
response losses.

LoRI-S is two runs (as the paper calibrates on a full LoRI-D run): a dense one, then
``--set 'finetune.mask={"sparsity": 0.9, "calibration_adapter": "RUN1/adapter"}'`` with another
``run_dir``.

Not implemented yet (design note sections 3-4): the calibration phase inside one run, continual
learning, Hugging Face export at the end, ``init_from`` a pretraining checkpoint, tokenised-row
caching, the global (rather than per-micro-batch) normalisation of the response loss.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch.utils.data import Dataset

from actcomp_dist.training.config import (
    _SECTIONS,
    ConfigError,
    DataSection,
    ModelSection,
    RunConfig,
    _bool,
    _positive_int,
    validate_run,
)
from actcomp_dist.training.trainer import Trainer, TrainResult, build_loaders, print0

MODES = ("full", "lora", "lori")
LOSS_ON = ("response", "all")
SYNTHETIC_TASKS = ("reverse_words",)
ADAPTER_KEYS = ("rank", "alpha", "targets", "seed", "cache_A", "input_compression")


# ----------------------------------------------------------------------------- config


@dataclass
class FinetuneModelSection(ModelSection):
    """``ModelSection`` plus ``init_from``: ``null`` or a Hugging Face LLaMA directory."""

    init_from: str | None = None


@dataclass
class FinetuneDataSection(DataSection):
    train: list[str] = field(default_factory=list)
    valid: list[str] = field(default_factory=list)
    loss_on: str = "response"
    prompt_template: str = "{prompt}"
    append_eos: bool = True
    synthetic_task: str | None = None
    synthetic_rows: int = 512
    # data.tokenizer serves the JSONL files of data.train / data.valid.
    tokenizer_needs_paths = False

    def validate(self) -> None:
        if self.paths:
            raise ConfigError(
                "data.paths is for pretraining (indexed datasets); fine-tuning reads JSONL "
                "files from data.train / data.valid"
            )
        super().validate()
        for name in ("train", "valid"):
            value = getattr(self, name)
            if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
                raise ConfigError(f"data.{name} must be a list of JSONL files, got {value!r}")
        if self.loss_on not in LOSS_ON:
            raise ConfigError(f"data.loss_on={self.loss_on!r} is not one of {list(LOSS_ON)}")
        if not isinstance(self.prompt_template, str) or "{prompt}" not in self.prompt_template:
            raise ConfigError(
                f"data.prompt_template={self.prompt_template!r} must be a string containing "
                f"'{{prompt}}'"
            )
        try:
            self.prompt_template.format(prompt="")
        except (KeyError, IndexError, ValueError) as err:
            raise ConfigError(
                f"data.prompt_template={self.prompt_template!r} is not a valid format string "
                f"with only '{{prompt}}' ({err!r}); write literal braces as '{{{{' / '}}}}'"
            ) from None
        _bool("data.append_eos", self.append_eos)
        _positive_int("data.synthetic_rows", self.synthetic_rows)
        if self.synthetic_task is not None and self.synthetic_task not in SYNTHETIC_TASKS:
            raise ConfigError(
                f"data.synthetic_task={self.synthetic_task!r} is not one of "
                f"{list(SYNTHETIC_TASKS)} (or null)"
            )
        if self.synthetic_task is not None and (self.train or self.valid):
            raise ConfigError(
                "data.synthetic_task generates its own data: leave data.train and data.valid "
                "empty, or set data.synthetic_task=null"
            )
        if self.synthetic_task is None and not self.train:
            raise ConfigError(
                "fine-tuning needs data: data.train (JSONL files with prompt/response or text "
                "rows) or data.synthetic_task"
            )


MASK_KEYS = ("sparsity", "calibration_adapter")


@dataclass
class FinetuneSection:
    """``mode``: full | lora | lori; ``adapter``: AdapterConfig fields (lora/lori);
    ``mask``: lori only, ``null`` (dense LoRI) or ``{"sparsity", "calibration_adapter"}``
    (LoRI-S); ``adapter_dir``: where the adapter is saved (``null`` = ``RUN_DIR/adapter``)."""

    mode: str = "lori"
    adapter: dict[str, Any] | None = None
    mask: dict[str, Any] | None = None
    adapter_dir: str | None = None

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"finetune.mode={self.mode!r} is not one of {list(MODES)}")
        if self.mode == "full":
            if self.adapter is not None:
                raise ConfigError(
                    "finetune.adapter is for mode 'lora' or 'lori'; mode 'full' trains every "
                    "weight (set finetune.adapter=null)"
                )
        else:
            self.adapter_config()
        if self.mask is not None:
            if self.mode != "lori":
                raise ConfigError(
                    f"finetune.mask is for mode 'lori' (LoRI-S); mode {self.mode!r} has none"
                )
            if not isinstance(self.mask, dict):
                raise ConfigError(f"finetune.mask must be an object or null, got {self.mask!r}")
            unknown = sorted(set(self.mask) - set(MASK_KEYS))
            if unknown:
                raise ConfigError(
                    f"unknown key(s) {[f'finetune.mask.{k}' for k in unknown]}; valid keys in "
                    f"'finetune.mask': {sorted(MASK_KEYS)}"
                )
            calibration = self.mask.get("calibration_adapter")
            if not isinstance(calibration, str) or not calibration:
                raise ConfigError(
                    "finetune.mask.calibration_adapter must be the directory of a saved dense "
                    "LoRI adapter (the adapter_dir of a calibration run with finetune.mask=null)"
                )
            self.adapter_config()  # checks the sparsity
        if self.adapter_dir is not None and (
            not isinstance(self.adapter_dir, str) or not self.adapter_dir
        ):
            raise ConfigError(f"finetune.adapter_dir={self.adapter_dir!r} must be a path or null")

    def adapter_config(self):
        """The :class:`~actcomp_dist.adapters.AdapterConfig` of a lora / lori run."""
        from actcomp_dist.adapters import AdapterConfig

        values = {} if self.adapter is None else self.adapter
        if not isinstance(values, dict):
            raise ConfigError(f"finetune.adapter must be an object, got {values!r}")
        unknown = sorted(set(values) - set(ADAPTER_KEYS))
        if unknown:
            raise ConfigError(
                f"unknown key(s) {[f'finetune.adapter.{k}' for k in unknown]}; valid keys in "
                f"'finetune.adapter': {sorted(ADAPTER_KEYS)} (the method is finetune.mode)"
            )
        extra = {"method": self.mode}
        if isinstance(self.mask, dict) and "sparsity" in self.mask:
            extra["sparsity"] = self.mask["sparsity"]
        try:
            return AdapterConfig.from_dict({**values, **extra})
        except (TypeError, ValueError) as err:
            raise ConfigError(f"finetune.adapter: {err}") from None


@dataclass
class FinetuneRunConfig(RunConfig):
    model: FinetuneModelSection = field(default_factory=FinetuneModelSection)
    data: FinetuneDataSection = field(default_factory=FinetuneDataSection)
    finetune: FinetuneSection = field(default_factory=FinetuneSection)

    SECTIONS: ClassVar[dict[str, type]] = {
        **_SECTIONS,
        "model": FinetuneModelSection,
        "data": FinetuneDataSection,
        "finetune": FinetuneSection,
    }


def finetune_config_from_dict(raw: dict[str, Any], source: str = "<config>") -> FinetuneRunConfig:
    from actcomp_dist.training.config import run_config_from_dict

    return run_config_from_dict(raw, source, config_class=FinetuneRunConfig)


def load_finetune_config(path: str | Path, overrides: list[str] = ()) -> FinetuneRunConfig:
    from actcomp_dist.training.config import load_run_config

    return load_run_config(path, overrides, config_class=FinetuneRunConfig)


def validate_finetune(config: FinetuneRunConfig, world_size: int) -> None:
    """:func:`validate_run` plus the fine-tuning rules across sections; no collective."""
    validate_run(config, world_size)
    ft, data = config.finetune, config.data
    if ft.mode != "full" and config.compression.method != "none":
        raise ConfigError(
            f"finetune.mode={ft.mode!r} with compression.method={config.compression.method!r}: "
            f"the base weights are frozen, so compressing their inputs saves nothing (the "
            f"frozen layers' saved inputs are an open issue); use compression.method='none' "
            f"(LoRA's own input: finetune.adapter.input_compression)"
        )
    if ft.mode == "lora":
        adapter = ft.adapter_config()
        if (
            adapter.input_compression is not None
            and adapter.input_compression.resample_every != config.compression.resample_every
        ):
            raise ConfigError(
                f"finetune.adapter.input_compression.resample_every="
                f"{adapter.input_compression.resample_every} must equal "
                f"compression.resample_every={config.compression.resample_every} (the adapters "
                f"share the model's compression schedule)"
            )
    if ft.mask is not None:
        _check_calibration_adapter(ft)
    for name in ("train", "valid"):
        for path in getattr(data, name):
            if not Path(path).is_file():
                raise ConfigError(f"data.{name}: {path} not found")
    init_from = config.model.init_from
    if init_from is not None:
        if not isinstance(init_from, str) or not (Path(init_from) / "config.json").is_file():
            raise ConfigError(
                f"model.init_from={init_from!r}: not a Hugging Face LLaMA directory (no "
                f"config.json there)"
            )
        if not data.tokenizer:
            raise ConfigError(
                "model.init_from needs data.tokenizer (the checkpoint's tokenizer.model)"
            )
        if config.model.overrides:
            raise ConfigError(
                f"model.init_from takes the model's shape from {init_from}/config.json; remove "
                f"model overrides {sorted(config.model.overrides)} (the sequence length is "
                f"data.seq_length)"
            )


def _check_calibration_adapter(ft: FinetuneSection) -> None:
    from actcomp_dist.adapters import read_adapter_config

    directory = ft.mask["calibration_adapter"]
    try:
        _, saved, linears = read_adapter_config(directory)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"finetune.mask.calibration_adapter: {err}") from None
    ours = ft.adapter_config()
    for key in ("method", "rank", "targets", "seed"):
        if getattr(saved, key) != getattr(ours, key):
            raise ConfigError(
                f"finetune.mask.calibration_adapter={directory} was trained with {key}="
                f"{getattr(saved, key)!r}, this run has finetune.adapter {key}="
                f"{getattr(ours, key)!r}: the mask must come from the same adapter layout and A"
            )
    if any(entry["masked"] for entry in linears.values()):
        raise ConfigError(
            f"finetune.mask.calibration_adapter={directory} is already masked; calibrate with a "
            f"dense LoRI run (finetune.mask=null)"
        )


# ----------------------------------------------------------------------------- data

_WORDS = (
    "apple river stone cloud green table music light paper garden window silver "
    "orange forest summer winter yellow bridge market doctor"
).split()


def synthetic_rows(task: str, count: int, seed: int) -> list[dict[str, str]]:
    """``count`` prompt/response rows of a generated task (deterministic in ``seed``)."""
    if task != "reverse_words":
        raise ValueError(f"unknown synthetic task {task!r}; known: {list(SYNTHETIC_TASKS)}")
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 5))]
        rows.append(
            {"prompt": "reverse: " + " ".join(words) + "\n", "response": " ".join(words[::-1])}
        )
    return rows


def read_jsonl(path: str | Path) -> list[dict[str, str]]:
    """Rows of a JSONL file: ``{"prompt", "response"}`` or ``{"text"}`` (strings); a bad row
    raises :class:`ConfigError` naming the file and line."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"{where}: not valid JSON: {err}") from None
            if not isinstance(row, dict):
                raise ConfigError(f"{where}: a row must be a JSON object")
            if "prompt" in row or "response" in row:
                keys = ("prompt", "response")
            elif "text" in row:
                keys = ("text",)
            else:
                raise ConfigError(
                    f"{where}: a row needs 'prompt' and 'response', or 'text'; got keys "
                    f"{sorted(row)}"
                )
            for key in keys:
                if not isinstance(row.get(key), str):
                    raise ConfigError(f"{where}: {key!r} must be a string, got {row.get(key)!r}")
            rows.append({k: row[k] for k in keys})
    return rows


def encode_row(
    row: dict[str, str],
    tokenizer,
    seq_length: int,
    *,
    prompt_template: str = "{prompt}",
    loss_on: str = "response",
    append_eos: bool = True,
) -> dict[str, np.ndarray] | None:
    """One sample (``tokens``, ``labels`` int64 and ``loss_mask`` float32, each
    ``[seq_length]``) of a row, or ``None`` if no trained token is left after truncation."""
    bos = [tokenizer.bos] if getattr(tokenizer, "bos", None) is not None else []
    eos = [tokenizer.eod] if append_eos else []
    if "text" in row:
        head, body = bos, tokenizer.encode(row["text"]) + eos
        head_trained = True
    else:
        head = bos + tokenizer.encode(prompt_template.format(prompt=row["prompt"]))
        body = tokenizer.encode(row["response"]) + eos
        head_trained = loss_on == "all"
    budget = seq_length + 1
    if len(head) + len(body) > budget:
        # The prompt loses tokens from the left (keeping BOS), then the response from the right.
        keep_head = max(budget - len(body), min(len(bos), budget))
        if keep_head < len(head):
            head = head[: len(bos)] + head[len(head) - (keep_head - len(bos)) :]
        body = body[: budget - len(head)]
    tokens = head + body
    trained = [head_trained] * len(head) + [True] * len(body)
    mask = np.asarray(trained[1:], dtype=np.float32)
    if len(tokens) < 2 or not mask.any():
        return None
    pad = seq_length + 1 - len(tokens)
    ids = np.asarray(tokens + [tokenizer.eod] * pad, dtype=np.int64)
    return {
        "tokens": ids[:-1].copy(),
        "labels": ids[1:].copy(),
        "loss_mask": np.concatenate([mask, np.zeros(pad, dtype=np.float32)]),
    }


class FinetuneDataset(Dataset):
    """``num_samples`` samples cycling over ``samples`` (one seeded permutation per epoch when
    ``shuffle``); items are dicts of tensors, like the pretraining datasets'."""

    def __init__(
        self, samples: list[dict[str, np.ndarray]], num_samples: int, seed: int, shuffle: bool
    ) -> None:
        if not samples:
            raise ConfigError("no fine-tuning sample is left (every row was empty or dropped)")
        self.samples, self.num_samples, self.seed, self.shuffle = (
            samples,
            num_samples,
            seed,
            shuffle,
        )
        self._orders: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.num_samples

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            n = len(self.samples)
            rng = np.random.default_rng([self.seed, epoch])
            self._orders[epoch] = rng.permutation(n) if self.shuffle else np.arange(n)
        return self._orders[epoch]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        epoch, position = divmod(index, len(self.samples))
        sample = self.samples[int(self._order(epoch)[position])]
        return {key: torch.from_numpy(value) for key, value in sample.items()}


def encode_rows(rows, tokenizer, data: FinetuneDataSection) -> tuple[list[dict], int]:
    """``(samples, dropped)`` of ``rows`` under the ``data`` settings."""
    samples, dropped = [], 0
    for row in rows:
        sample = encode_row(
            row,
            tokenizer,
            data.seq_length,
            prompt_template=data.prompt_template,
            loss_on=data.loss_on,
            append_eos=data.append_eos,
        )
        if sample is None:
            dropped += 1
        else:
            samples.append(sample)
    return samples, dropped


# ----------------------------------------------------------------------------- trainer


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
        from actcomp_dist.data.tokenizer import SentencePieceTokenizer, load_tokenizer

        config = self.config
        data, train = config.data, config.train
        if data.tokenizer:
            tokenizer = load_tokenizer(data.tokenizer)
        else:
            from actcomp_dist.data.corpus import ensure_embedded_corpus

            corpus = ensure_embedded_corpus(
                Path(config.run_dir) / "data", vocab_size=data.embedded_vocab_size
            )
            tokenizer = SentencePieceTokenizer(corpus.tokenizer_model)
        if data.synthetic_task is not None:
            train_rows = synthetic_rows(data.synthetic_task, data.synthetic_rows, train.seed)
            valid_rows = synthetic_rows(
                data.synthetic_task, max(data.synthetic_rows // 8, 1), train.seed + 1
            )
        else:
            train_rows = [r for path in data.train for r in read_jsonl(path)]
            valid_rows = [r for path in data.valid for r in read_jsonl(path)]
        train_samples, dropped = encode_rows(train_rows, tokenizer, data)
        valid_samples, valid_dropped = encode_rows(valid_rows, tokenizer, data)
        print0(
            f"fine-tuning data: {len(train_samples)} training rows ({dropped} dropped), "
            f"{len(valid_samples)} validation rows ({valid_dropped} dropped)"
        )
        dp_rank, dp_size = self.ctx.dp_rank, self.ctx.dp_size
        train_ds = FinetuneDataset(
            train_samples, train.steps * train.global_batch_size, train.seed, shuffle=True
        )
        valid_ds = None
        if valid_samples:
            eval_samples = train.eval_iters * train.micro_batch_size * dp_size
            valid_ds = FinetuneDataset(valid_samples, eval_samples, train.seed, shuffle=False)
        loader, valid_loader = build_loaders(
            self.config, train_ds, valid_ds, dp_rank, dp_size, consumed
        )
        return tokenizer, loader, valid_loader

    def build_model(self, model_config) -> torch.nn.Module:
        config = self.config
        init_from = config.model.init_from
        if init_from is None:
            model = super().build_model(model_config)
        else:
            from actcomp_dist.models.hf import build_llama_from_hf

            model = build_llama_from_hf(
                init_from,
                config.compression,
                sequence_parallel=config.parallel.sequence_parallel,
                seq_length=config.data.seq_length,
                device=self.device,
                efficient_ops=config.memory.efficient_ops,
                loss_chunk_tokens=config.memory.chunked_loss_tokens,
                storage_policy=config.memory.storage_policy,
            )
            if model.config.vocab_size < self.tokenizer.vocab_size:
                raise ConfigError(
                    f"model.init_from={init_from}: vocabulary {model.config.vocab_size} is "
                    f"smaller than data.tokenizer's {self.tokenizer.vocab_size}"
                )
        mode = config.finetune.mode
        if mode != "full":
            from actcomp_dist.adapters import adapter_parameter_count, apply_adapters

            sites = apply_adapters(model, config.finetune.adapter_config(), "default")
            if config.finetune.mask is not None:
                self._start_masked(model)
            count = adapter_parameter_count(model, "default")
            print0(f"finetune {mode}: adapters on {len(sites)} linears, {count:,} trainable")
        else:
            print0("finetune full: every weight trains")
        return model

    def _start_masked(self, model) -> None:
        """LoRI-S: B of the calibration adapter -> one global magnitude threshold -> masks;
        then B = 0 and training inside the masks (collective over the TP group). On resume the
        same masks are computed again and the checkpoint then restores B (and the masks)."""
        from actcomp_dist.adapters import compute_masks, load_adapter, start_masked_training

        mask = self.config.finetune.mask
        load_adapter(model, mask["calibration_adapter"], "default")
        threshold = compute_masks(model, name="default")
        start_masked_training(model, "default")
        print0(
            f"LoRI-S: masks from {mask['calibration_adapter']} at sparsity "
            f"{self.config.finetune.adapter_config().sparsity} (threshold {threshold:.3g}); "
            f"B restarts from 0"
        )

    def save(self) -> Path:
        path = super().save()
        if self.config.finetune.mode != "full":
            from actcomp_dist.adapters import save_adapter

            save_adapter(self.model, self.adapter_dir, "default")
            print0(f"saved adapter {self.adapter_dir}")
        return path


def run_finetuning(config: FinetuneRunConfig) -> TrainResult:
    """Fine-tune as ``config`` says; collective (every rank calls it)."""
    if not isinstance(config, FinetuneRunConfig):
        raise ConfigError(f"run_finetuning needs a FinetuneRunConfig, got {type(config).__name__}")
    trainer = FinetuneTrainer(config)
    try:
        return trainer.train()
    finally:
        trainer.close()


__all__ = [
    "FinetuneDataSection",
    "FinetuneDataset",
    "FinetuneModelSection",
    "FinetuneRunConfig",
    "FinetuneSection",
    "FinetuneTrainer",
    "encode_row",
    "finetune_config_from_dict",
    "load_finetune_config",
    "read_jsonl",
    "run_finetuning",
    "synthetic_rows",
    "validate_finetune",
]
