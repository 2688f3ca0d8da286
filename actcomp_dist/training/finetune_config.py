"""The fine-tuning run config: the pretraining :class:`~actcomp_dist.training.config.RunConfig`
(same sections, ``--set`` overrides, checkpoints, metrics) with three changes (see
``notes/finetune_design.md``):

``model.init_from``
    ``null``: ``model.name`` initialised at random (seed ``train.seed``); or a local Hugging Face
    LLaMA directory (``config.json`` + safetensors; ``model.name`` and ``model.overrides`` are
    then not used, the sequence length is ``data.seq_length``). Needs ``data.tokenizer``.

``data`` (replaces ``paths`` / ``split``, which must stay unset)
    ``train`` / ``valid``: lists of JSONL files (rows: :mod:`actcomp_dist.data.jsonl`).
    ``tokenizer``: a SentencePiece ``.model``; ``null`` = the embedded corpus tokenizer
    (``embedded_vocab_size`` pieces, built under ``RUN_DIR/data``). ``seq_length``: tokens per
    sample. ``loss_on``: ``response`` (default) or ``all`` (prompt tokens too).
    ``prompt_template``: a format string with ``{prompt}`` (default ``"{prompt}"``).
    ``append_eos``: end every row with EOS, trained on (default true). ``synthetic_task``: no
    files, a generated task (``reverse_words``: the prompt's words in reverse order; ``sort_words``: sorted) for the
    tiny configs; ``synthetic_rows``: how many rows it generates. ``num_workers``: data-loader
    worker processes.

``finetune``
    ``mode``: ``full`` (every weight trained, the linears compressed as ``compression`` says),
    ``lora`` or ``lori`` (adapters on ``adapter.targets``, base frozen: only the adapters'
    parameters reach the optimizer). ``adapter`` (lora/lori only): the
    :class:`~actcomp_dist.adapters.AdapterConfig` fields ``rank``, ``alpha``, ``targets``,
    ``seed``, ``cache_A``, ``input_compression`` (lora only). ``mask`` (lori only): ``null``
    (dense LoRI) or ``{"sparsity": 0.9, "calibration_adapter": DIR}`` (LoRI-S: the masks keep
    the ``1 - sparsity`` largest-magnitude B entries, one threshold over all B matrices, of the
    dense LoRI adapter saved in ``DIR`` by an earlier calibration run with the same ``adapter``
    settings; training restarts from B = 0 inside them), or ``{"sparsity": 0.9,
    "calibration_steps": N}`` (the same in one run: the dense adapter trains first for N steps
    in ``RUN_DIR/calibration``). ``adapter_dir``: where the
    adapter is saved (B, and A for LoRA; LoRI's A is regenerated from the seed and never
    stored) at every checkpoint and at the end; ``null`` = ``RUN_DIR/adapter``.
    ``previous`` (lori only): continual learning, the saved adapters of tasks 0 .. t-1 in
    order; they are loaded frozen and this run trains task t, whose A seed derives from
    ``adapter.seed`` and t. Each must be a LoRI adapter of task i at position i with this
    run's rank, targets and seed.

Importing this module does not import megatron-core or DeepSpeed (the launcher loads the
config before it installs the filters of their start-up messages); the adapter package,
which does, is imported where an adapter setting is checked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from actcomp_dist.data.jsonl import LOSS_ON, SYNTHETIC_TASKS
from actcomp_dist.training.config import (
    ConfigError,
    DataSection,
    ModelSection,
    RunConfig,
    check_bool,
    check_positive_int,
    load_run_config,
    run_config_from_dict,
    validate_run,
)

MODES = ("full", "lora", "lori")
ADAPTER_KEYS = ("rank", "alpha", "targets", "seed", "cache_A", "input_compression")


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
        check_bool("data.append_eos", self.append_eos)
        check_positive_int("data.synthetic_rows", self.synthetic_rows)
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


MASK_KEYS = ("sparsity", "calibration_adapter", "calibration_steps")


@dataclass
class FinetuneSection:
    """``mode``: full | lora | lori; ``adapter``: AdapterConfig fields (lora/lori);
    ``mask``: lori only, ``null`` (dense LoRI) or ``{"sparsity", "calibration_adapter" |
    "calibration_steps"}`` (LoRI-S); ``adapter_dir``: where the adapter is saved (``null`` =
    ``RUN_DIR/adapter``); ``previous``: lori only, the saved adapters of the earlier tasks of a
    continual-learning sequence, in order (loaded frozen; this run trains task
    ``len(previous)``)."""

    mode: str = "lori"
    adapter: dict[str, Any] | None = None
    mask: dict[str, Any] | None = None
    adapter_dir: str | None = None
    previous: list[str] = field(default_factory=list)

    @property
    def task(self) -> int:
        """The index of the task this run trains (0 unless earlier tasks are ``previous``)."""
        return len(self.previous) if isinstance(self.previous, list) else 0

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
            steps = self.mask.get("calibration_steps")
            if (calibration is None) == (steps is None):
                raise ConfigError(
                    "finetune.mask needs exactly one of calibration_adapter (the directory of a "
                    "saved dense LoRI adapter: the adapter_dir of a run with finetune.mask=null) "
                    "and calibration_steps (train that dense adapter first, in this run)"
                )
            if calibration is not None and (not isinstance(calibration, str) or not calibration):
                raise ConfigError(
                    f"finetune.mask.calibration_adapter={calibration!r} must be the directory "
                    f"of a saved dense LoRI adapter"
                )
            if steps is not None:
                check_positive_int("finetune.mask.calibration_steps", steps)
            self.adapter_config()  # checks the sparsity
        if not isinstance(self.previous, list) or not all(
            isinstance(p, str) and p for p in self.previous
        ):
            raise ConfigError(
                f"finetune.previous={self.previous!r} must be a list of saved adapter "
                f"directories (the earlier tasks', in order)"
            )
        if self.previous and self.mode != "lori":
            raise ConfigError(
                f"finetune.previous (continual learning) is for mode 'lori'; mode "
                f"{self.mode!r} trains one task (set finetune.previous=[])"
            )
        if self.adapter_dir is not None and (
            not isinstance(self.adapter_dir, str) or not self.adapter_dir
        ):
            raise ConfigError(f"finetune.adapter_dir={self.adapter_dir!r} must be a path or null")

    def adapter_config(self):
        """The :class:`~actcomp_dist.adapters.AdapterConfig` of a lora / lori run."""
        from actcomp_dist.adapters import AdapterConfig  # megatron-core: see the module docstring

        values = {} if self.adapter is None else self.adapter
        if not isinstance(values, dict):
            raise ConfigError(f"finetune.adapter must be an object, got {values!r}")
        unknown = sorted(set(values) - set(ADAPTER_KEYS))
        if unknown:
            raise ConfigError(
                f"unknown key(s) {[f'finetune.adapter.{k}' for k in unknown]}; valid keys in "
                f"'finetune.adapter': {sorted(ADAPTER_KEYS)} (the method is finetune.mode)"
            )
        extra = {"method": self.mode, "task": self.task}
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
        **RunConfig.SECTIONS,
        "model": FinetuneModelSection,
        "data": FinetuneDataSection,
        "finetune": FinetuneSection,
    }


def finetune_config_from_dict(raw: dict[str, Any], source: str = "<config>") -> FinetuneRunConfig:
    return run_config_from_dict(raw, source, config_class=FinetuneRunConfig)


def load_finetune_config(path: str | Path, overrides: list[str] = ()) -> FinetuneRunConfig:
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
    if ft.mask is not None and ft.mask.get("calibration_adapter") is not None:
        check_calibration_adapter(ft)
    check_previous_adapters(ft)
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


def check_calibration_adapter(ft: FinetuneSection) -> None:
    from actcomp_dist.adapters import read_adapter_config  # megatron-core: see the module docstring

    directory = ft.mask["calibration_adapter"]
    try:
        _, saved, linears = read_adapter_config(directory)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"finetune.mask.calibration_adapter: {err}") from None
    ours = ft.adapter_config()
    for key in ("method", "rank", "targets", "seed", "task"):
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


def check_previous_adapters(ft: FinetuneSection) -> None:
    """``finetune.previous`` must be the adapters of tasks 0, 1, ... of this sequence: LoRI,
    in order, with this run's rank, targets and base seed (each task's A seed derives from the
    base seed and the task index, so an adapter of another sequence has other A matrices)."""
    if not ft.previous:
        return
    from actcomp_dist.adapters import read_adapter_config  # megatron-core: see the module docstring

    ours = ft.adapter_config()
    for index, directory in enumerate(ft.previous):
        key = f"finetune.previous[{index}]={directory}"
        try:
            _, saved, _ = read_adapter_config(directory)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"finetune.previous[{index}]: {err}") from None
        if saved.method != "lori":
            raise ConfigError(f"{key} is a {saved.method!r} adapter; continual learning is LoRI's")
        if saved.task != index:
            raise ConfigError(
                f"{key} is the adapter of task {saved.task}, not task {index}: list every "
                f"earlier task's adapter once, in training order (task 0 first); this run "
                f"would train task {ft.task}"
            )
        for name in ("rank", "targets", "seed"):
            if getattr(saved, name) != getattr(ours, name):
                raise ConfigError(
                    f"{key} was trained with adapter {name}={getattr(saved, name)!r}, this run "
                    f"has finetune.adapter {name}={getattr(ours, name)!r}: the tasks of one "
                    f"sequence share rank, targets and base seed"
                )
