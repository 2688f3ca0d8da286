"""Typed run configuration: JSON file + ``--set key.path=value`` overrides.

A run config has typed sections (``model``, ``compression``, ``parallel``,
``activation_checkpointing``, ``memory``, ``data``, ``train``, ``checkpoint``, ``logging``), a
top-level ``run_dir``, a top-level ``plugins`` list (modules imported before anything is
validated, so a compression method they register can be named in the config), and a
``deepspeed`` section handed to DeepSpeed untouched (it validates its own).
Every section is a dataclass that validates its own fields; :func:`validate_run` checks the rules
that span sections and the world size. All of it runs before any process group or collective
exists, so a bad config gives the same clear message on every rank and nothing hangs.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib
import importlib.util
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from actcomp_dist.config import (
    ROW_PARALLEL_SITES,
    TRANSFORMER_SITES,
    CompressionConfig,
    check_model_sites,
)
from actcomp_dist.storage import IMPLEMENTED, StoragePolicy, resolve_compressed_sites


class ConfigError(ValueError):
    """A user error in a run config (message names the key and the valid values)."""


@dataclass
class ModelSection:
    """``name``: a named LLaMA config (tiny, 60m, 130m, 350m, 1b, 7b); ``overrides``: any
    field of :class:`actcomp_dist.models.LlamaConfig` to change (e.g. ``num_layers``)."""

    name: str = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass
class ParallelSection:
    tensor_parallel: int = 1
    sequence_parallel: bool = False

    def validate(self) -> None:
        check_positive_int("parallel.tensor_parallel", self.tensor_parallel)
        check_bool("parallel.sequence_parallel", self.sequence_parallel)
        if self.sequence_parallel and self.tensor_parallel == 1:
            raise ConfigError(
                "parallel.sequence_parallel=true needs parallel.tensor_parallel > 1 "
                "(sequence parallelism shards along the tensor-parallel group)"
            )


AC_MODES = ("none", "selective", "full", "sublayer")


@dataclass
class ActivationCheckpointingSection:
    """``mode``: ``none``; ``selective`` (recompute the attention core and, in the naive block,
    the norms and the SwiGLU product); ``full`` (store each block's input, recompute the block);
    ``sublayer`` (keep what the norms keep, recompute the attention and MLP sublayers from the
    norm outputs; with ``memory.policy.norm: lowrank:R`` LoRAct's pre-norm sublayer mode).
    ``num_layers``: how many decoder blocks (from the first) are checkpointed; ``null`` =
    all."""

    mode: str = "none"
    num_layers: int | None = None

    def validate(self) -> None:
        if self.mode not in AC_MODES:
            raise ConfigError(
                f"activation_checkpointing.mode={self.mode!r} is not one of {list(AC_MODES)}"
            )
        if self.num_layers is not None:
            _non_negative_int("activation_checkpointing.num_layers", self.num_layers)


@dataclass
class MemorySection:
    """``efficient_ops``: the decoder blocks keep one tensor per op for backward (memory-
    efficient RMSNorm, no fused-QKV alias in attention, SwiGLU recomputed inside FC2; exact:
    same forward, same gradients up to the norm's rounding); ``false``: the naive block
    (:mod:`actcomp_dist.models.efficient_ops`). ``loss_chunk_tokens``: with the efficient ops,
    the output layer and cross-entropy run this many tokens at a time and keep no logits
    (:mod:`actcomp_dist.parallel.cross_entropy`). ``policy``: kind of saved tensor -> storage
    policy (``{"swiglu": "int8", "attention": "fp8"}``; unset kinds ``keep``;
    :mod:`actcomp_dist.storage`)."""

    efficient_ops: bool = True
    loss_chunk_tokens: int = 1024
    policy: dict[str, str] = field(default_factory=dict)

    def validate(self) -> None:
        check_bool("memory.efficient_ops", self.efficient_ops)
        check_positive_int("memory.loss_chunk_tokens", self.loss_chunk_tokens)
        if not isinstance(self.policy, dict):
            raise ConfigError(
                f"memory.policy={self.policy!r} must be an object mapping a kind to a policy"
            )
        try:
            storage = StoragePolicy.from_mapping(self.policy)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if not self.efficient_ops and not storage.is_exact:
            raise ConfigError(
                f"memory.policy={storage.changes()} needs memory.efficient_ops=true (the naive "
                f"block keeps every tensor as it is); set the policies to 'keep' or use the "
                f"efficient block"
            )

    @property
    def storage_policy(self) -> StoragePolicy:
        """What the model and the memory model take as ``storage_policy``."""
        return StoragePolicy.from_mapping(self.policy)

    @property
    def chunked_loss_tokens(self) -> int | None:
        """What the model and the memory model take as ``loss_chunk_tokens``."""
        return self.loss_chunk_tokens if self.efficient_ops else None


@dataclass
class DataSection:
    """``paths``: indexed-dataset prefixes (``PREFIX.bin/.idx``): one string, a list, or a
    weighted blend in Megatron's form, ``["0.3", "prefixA", "0.7", "prefixB"]`` or
    ``[[0.3, "prefixA"], [0.7, "prefixB"]]`` (weights are normalised; without weights several
    prefixes are blended by their token counts); empty = the embedded default corpus.
    ``tokenizer``: a SentencePiece ``.model``, a Hugging Face ``tokenizer.json`` or a
    directory holding one (required with ``paths``, and only with them).
    ``split``: train/validation/test weights. ``embedded_vocab_size``: vocabulary of the
    tokenizer trained for the embedded corpus."""

    paths: list[str] | str = field(default_factory=list)
    tokenizer: str | None = None
    seq_length: int = 128
    split: str = "98,2,0"
    embedded_vocab_size: int = 2048
    num_workers: int = 0
    # Pretraining reads tokens from ``paths`` (or the embedded corpus and its own tokenizer),
    # so a tokenizer without paths would be ignored; subclasses with other sources say False.
    tokenizer_needs_paths: ClassVar[bool] = True

    def validate(self) -> None:
        if isinstance(self.paths, str):
            self.paths = [self.paths] if self.paths else []
        parse_blend(self.paths)
        if self.paths and not self.tokenizer:
            raise ConfigError(
                "data.paths is set but data.tokenizer (a SentencePiece .model or a Hugging Face "
                "tokenizer.json) is not"
            )
        if self.tokenizer and not self.paths and self.tokenizer_needs_paths:
            raise ConfigError(
                f"data.tokenizer={self.tokenizer!r} is set but data.paths is not: the embedded "
                f"corpus brings its own tokenizer; set data.paths to the indexed datasets "
                f"written with this tokenizer, or remove data.tokenizer"
            )
        check_positive_int("data.seq_length", self.seq_length)
        check_positive_int("data.embedded_vocab_size", self.embedded_vocab_size)
        _non_negative_int("data.num_workers", self.num_workers)
        try:
            weights = [float(w) for w in self.split.split(",")]
        except (AttributeError, ValueError):
            weights = []
        if len(weights) != 3 or any(w < 0 for w in weights) or weights[0] <= 0:
            raise ConfigError(
                f"data.split={self.split!r} must be three non-negative weights "
                f"'train,valid,test' with train > 0, e.g. '98,2,0'"
            )

    @property
    def prefixes(self) -> list[str]:
        """The dataset prefixes of ``paths``, without blending weights."""
        return parse_blend(self.paths)[0]

    @property
    def weights(self) -> list[float] | None:
        """The blending weights of ``paths`` (``None``: not given)."""
        return parse_blend(self.paths)[1]


def _number(value: Any) -> float | None:
    """``value`` as a float when it is a number or a string holding one, else ``None``."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def parse_blend(paths: Any) -> tuple[list[str], list[float] | None]:
    """``data.paths`` -> ``(prefixes, weights or None)``.

    Megatron-LM's rule for a flat list: an even-length list whose even positions all parse as
    numbers is ``weight, prefix, weight, prefix, ...``; any other list of strings is prefixes.
    A list of ``[weight, prefix]`` pairs is a blend too. Weights must be finite and > 0.
    """
    form = (
        'a prefix string, a list of prefixes, ["0.3", "prefixA", "0.7", "prefixB"] or '
        '[[0.3, "prefixA"], [0.7, "prefixB"]]'
    )
    if isinstance(paths, str):
        paths = [paths]
    if not isinstance(paths, list):
        raise ConfigError(f"data.paths={paths!r} must be {form}")
    if paths and all(isinstance(p, list) for p in paths):
        pairs = paths
        if not all(len(p) == 2 and isinstance(p[1], str) for p in pairs):
            raise ConfigError(f"data.paths={paths!r}: each pair must be [weight, prefix]; {form}")
        weights, prefixes = [_number(p[0]) for p in pairs], [p[1] for p in pairs]
    elif (
        len(paths) >= 2
        and len(paths) % 2 == 0
        and all(_number(w) is not None for w in paths[0::2])
        and all(isinstance(p, str) for p in paths[1::2])
    ):
        weights, prefixes = [_number(w) for w in paths[0::2]], list(paths[1::2])
    elif all(isinstance(p, str) and p for p in paths):
        return list(paths), None
    else:
        raise ConfigError(f"data.paths={paths!r} must be {form}")
    if any(w is None or not math.isfinite(w) or w <= 0 for w in weights):
        raise ConfigError(
            f"data.paths={paths!r}: blending weights must be finite numbers > 0, got {weights}"
        )
    if not all(prefixes):
        raise ConfigError(f"data.paths={paths!r}: empty prefix")
    return prefixes, weights


PRECISIONS = ("fp32", "bf16", "fp16")
NONFINITE_POLICIES = ("stop", "skip")
# AdamW moves every weight by about lr per step whatever the gradient's scale, so a peak
# learning rate above 1 rewrites weights initialised at ~0.02 in one step: a typo, not a recipe.
MAX_LR = 1.0
CLIP_GRAD_SCOPES = ("global", "parameter")


@dataclass
class TrainSection:
    """``on_nonfinite``: what a step with a non-finite loss or gradient norm does — ``stop``
    (save nothing, exit with :data:`~actcomp_dist.training.guard.NONFINITE_EXIT_CODE`) or
    ``skip`` (no update at all; after ``max_skipped_steps`` skipped steps in a row, stop)."""

    steps: int = 100
    micro_batch_size: int = 4
    global_batch_size: int = 8
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 10
    lr_decay: str = "cosine"
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    clip_grad: float = 1.0
    # "global": one norm over every gradient (DeepSpeed's clip); "parameter": each parameter
    # tensor clipped to clip_grad on its own (LoRI's released code; ZeRO 0, fp32).
    clip_grad_scope: str = "global"
    precision: str = "fp32"
    seed: int = 1234
    # CompAct's alpha for grad_mode 'subspace': a number, or a map site -> alpha with "default"
    # (e.g. {"default": 0.25, "proj": 0.125}, the paper's alpha_out on the attention output).
    subspace_scale: float | dict[str, float] = 0.25
    # Learning-rate multipliers by parameter group ({group: factor}, LR_SCALE_KEYS; a group not
    # named takes "default", itself 1 when absent): each group's lr is factor x the schedule.
    lr_scale: dict[str, float] = field(default_factory=dict)
    eval_interval: int = 0
    eval_iters: int = 4
    on_nonfinite: str = "stop"
    max_skipped_steps: int = 10
    # ``false``; ``true`` (RUN_DIR/hf) or a directory: the Hugging Face export at the end.
    export_hf: bool | str = False
    # Seconds without progress before a rank reports the stopped ranks and exits
    # (actcomp_dist/training/watchdog.py, which explains the default).
    collective_timeout_s: float = 600.0

    def validate(self) -> None:
        if not isinstance(self.export_hf, (bool, str)) or self.export_hf == "":
            raise ConfigError(
                f"train.export_hf={self.export_hf!r} must be false, true (RUN_DIR/hf) or a "
                f"directory path"
            )
        if isinstance(self.export_hf, str) and Path(self.export_hf).is_file():
            raise ConfigError(
                f"train.export_hf={self.export_hf!r} is a file; give a directory for the "
                f"Hugging Face export"
            )
        for name in ("steps", "micro_batch_size", "global_batch_size", "eval_iters"):
            check_positive_int(f"train.{name}", getattr(self, name))
        check_positive_int("train.max_skipped_steps", self.max_skipped_steps)
        for name in ("warmup_steps", "eval_interval", "seed"):
            _non_negative_int(f"train.{name}", getattr(self, name))
        for name in ("lr", "min_lr", "weight_decay", "clip_grad", "eps"):
            _non_negative_float(f"train.{name}", getattr(self, name))
        _non_negative_float("train.collective_timeout_s", self.collective_timeout_s)
        if self.collective_timeout_s < 1:
            raise ConfigError(
                f"train.collective_timeout_s={self.collective_timeout_s} must be >= 1 (seconds "
                f"without progress before the job is stopped)"
            )
        if self.lr > MAX_LR:
            raise ConfigError(
                f"train.lr={self.lr} is above {MAX_LR}: AdamW would move every weight by about "
                f"that much per step; use a learning rate in [0, {MAX_LR}]"
            )
        if self.min_lr > self.lr:
            raise ConfigError(f"train.min_lr={self.min_lr} exceeds train.lr={self.lr}")
        if self.lr * self.weight_decay >= 1:
            raise ConfigError(
                f"train.lr * train.weight_decay = {self.lr} * {self.weight_decay} must be < 1 "
                f"(decoupled decay multiplies the weights by 1 - lr * weight_decay each step)"
            )
        if self.on_nonfinite not in NONFINITE_POLICIES:
            raise ConfigError(
                f"train.on_nonfinite={self.on_nonfinite!r} is not one of {list(NONFINITE_POLICIES)}"
            )
        if self.lr_decay not in ("cosine", "linear", "constant"):
            raise ConfigError(
                f"train.lr_decay={self.lr_decay!r} is not one of ['cosine', 'linear', 'constant']"
            )
        if self.clip_grad_scope not in CLIP_GRAD_SCOPES:
            raise ConfigError(
                f"train.clip_grad_scope={self.clip_grad_scope!r} is not one of "
                f"{list(CLIP_GRAD_SCOPES)}"
            )
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"train.precision={self.precision!r} is not one of {list(PRECISIONS)}"
            )
        if (
            not isinstance(self.betas, list)
            or len(self.betas) != 2
            or not all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.betas)
        ):
            raise ConfigError(f"train.betas={self.betas!r} must be two numbers in [0, 1)")
        _check_subspace_scale(self.subspace_scale)
        _check_lr_scale(self.lr_scale, self.lr)


SUBSPACE_SCALE_KEYS = ("default", *TRANSFORMER_SITES)


def _check_subspace_scale(scale: Any) -> None:
    """``train.subspace_scale``: a finite number > 0, or a map from ``default`` (required) and
    sites to such numbers."""
    if isinstance(scale, dict):
        unknown = sorted(set(scale) - set(SUBSPACE_SCALE_KEYS))
        if unknown:
            raise ConfigError(
                f"unknown key(s) {[f'train.subspace_scale.{k}' for k in unknown]}; valid keys in "
                f"'train.subspace_scale': {list(SUBSPACE_SCALE_KEYS)}"
            )
        if "default" not in scale:
            raise ConfigError(
                f"train.subspace_scale={scale!r} needs a 'default' entry (the alpha of the "
                f'sites it does not name), e.g. {{"default": 0.25, "proj": 0.125}}'
            )
        for key, value in scale.items():
            if not _positive_number(value):
                raise ConfigError(
                    f"train.subspace_scale.{key}={value!r} must be a finite number > 0"
                )
    elif not _positive_number(scale):
        raise ConfigError(
            f"train.subspace_scale={scale!r} must be a finite number > 0 or a map "
            f"{{site: alpha}} with keys {list(SUBSPACE_SCALE_KEYS)} ('default' required)"
        )


# The parameter groups of ``train.lr_scale``: the linear sites, the embedding, every RMSNorm
# (the blocks' and the final one), the output layer (actcomp_dist.models.kinds.parameter_group).
LR_SCALE_KEYS = ("default", *TRANSFORMER_SITES, "embedding", "norm", "output")


def _check_lr_scale(scale: Any, lr: float) -> None:
    """``train.lr_scale``: a map from LR_SCALE_KEYS to finite numbers > 0 whose product with
    ``train.lr`` stays within MAX_LR."""
    if not isinstance(scale, dict):
        raise ConfigError(
            f"train.lr_scale={scale!r} must be a map {{group: factor}} with keys "
            f'{list(LR_SCALE_KEYS)}, e.g. {{"qkv": 0.25, "proj": 0.125}}'
        )
    unknown = sorted(set(scale) - set(LR_SCALE_KEYS))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {[f'train.lr_scale.{k}' for k in unknown]}; valid keys in "
            f"'train.lr_scale': {list(LR_SCALE_KEYS)}"
        )
    for key, value in scale.items():
        if not _positive_number(value):
            raise ConfigError(f"train.lr_scale.{key}={value!r} must be a finite number > 0")
        if lr * value > MAX_LR:
            raise ConfigError(
                f"train.lr * train.lr_scale.{key} = {lr} * {value} is above {MAX_LR}: AdamW "
                f"would move those weights by about that much per step"
            )


def lr_scale_factor(scale: dict[str, float], group: str) -> float:
    """The multiplier of parameter group ``group`` under ``train.lr_scale`` ``scale``."""
    return float(scale.get(group, scale.get("default", 1.0)))


def _positive_number(value: Any) -> bool:
    return (
        not isinstance(value, bool)
        and isinstance(value, (int, float))
        and math.isfinite(value)
        and value > 0
    )


@dataclass
class CheckpointSection:
    """``dir``: where checkpoints go (default ``RUN_DIR/checkpoints``); ``interval``: save every
    N steps (0 = only at the end); ``resume``: ``null``, ``latest`` or a checkpoint path;
    ``keep``: how many complete checkpoints to keep (0 = all); ``at_end``: save when the run
    reaches ``train.steps`` (``false`` for measurement runs that need none; a preemption or stop
    request still saves); ``allow_changes``: dotted config keys a resume may change although
    the run is then no longer exact (accepted and logged; see
    :mod:`actcomp_dist.training.drift`); ``reset_optimizer``: on resume, keep the weights,
    step, data position and schedules but start the optimizer state fresh (needed to resume a
    ``subspace`` run at another ``parallel.tensor_parallel``:
    :mod:`actcomp_dist.training.elastic`)."""

    dir: str | None = None
    interval: int = 0
    resume: str | None = None
    keep: int = 0
    at_end: bool = True
    allow_changes: list[str] = field(default_factory=list)
    reset_optimizer: bool = False

    def validate(self) -> None:
        _non_negative_int("checkpoint.interval", self.interval)
        _non_negative_int("checkpoint.keep", self.keep)
        check_bool("checkpoint.at_end", self.at_end)
        check_bool("checkpoint.reset_optimizer", self.reset_optimizer)
        if self.resume is not None and (not isinstance(self.resume, str) or not self.resume):
            raise ConfigError(
                f"checkpoint.resume={self.resume!r} must be null, 'latest' or the path of a "
                f"checkpoint directory (step_NNNNNNN)"
            )
        if not isinstance(self.allow_changes, list) or not all(
            isinstance(k, str) for k in self.allow_changes
        ):
            raise ConfigError(
                f"checkpoint.allow_changes={self.allow_changes!r} must be a list of dotted "
                f'config keys, e.g. ["train.seed"]'
            )


WANDB_KEYS = ("project", "name", "mode")
WANDB_MODES = ("online", "offline", "disabled")


@dataclass
class LoggingSection:
    """``interval``: steps between progress lines and metrics records; ``tensorboard``: also
    write TensorBoard scalars to ``RUN_DIR/tensorboard`` (extra ``tensorboard``); ``wandb``:
    ``null`` or ``{"project": ..., "name": ..., "mode": "online" | "offline" | "disabled"}``
    to log to Weights & Biases (extra ``wandb``; offline writes ``RUN_DIR/wandb`` and needs no
    network); ``verbose``: keep the libraries' start-up messages that
    :mod:`actcomp_dist.training.quiet` filters."""

    interval: int = 1
    tensorboard: bool = False
    wandb: dict[str, Any] | None = None
    verbose: bool = False

    def validate(self) -> None:
        check_positive_int("logging.interval", self.interval)
        check_bool("logging.tensorboard", self.tensorboard)
        check_bool("logging.verbose", self.verbose)
        if self.wandb is None:
            return
        if not isinstance(self.wandb, dict):
            raise ConfigError(
                f"logging.wandb={self.wandb!r} must be null or an object with keys "
                f"{list(WANDB_KEYS)}"
            )
        unknown = sorted(set(self.wandb) - set(WANDB_KEYS))
        if unknown:
            raise ConfigError(
                f"unknown key(s) {[f'logging.wandb.{k}' for k in unknown]}; valid keys in "
                f"'logging.wandb': {list(WANDB_KEYS)}"
            )
        for key in ("project", "name"):
            value = self.wandb.get(key)
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(f"logging.wandb.{key}={value!r} must be a non-empty string")
        mode = self.wandb.get("mode", "online")
        if mode not in WANDB_MODES:
            raise ConfigError(f"logging.wandb.mode={mode!r} is not one of {list(WANDB_MODES)}")

    def check_installed(self) -> None:
        """The loggers this section enables are importable; else a :class:`ConfigError`
        naming the key and the extra. Checked for a run (:func:`validate_run`), not when a
        config is only read (the memory planner needs no logger)."""
        for enabled, module, key, off in (
            (self.tensorboard, "tensorboard", "logging.tensorboard", "set it to false"),
            (self.wandb is not None, "wandb", "logging.wandb", "set it to null"),
        ):
            if enabled and importlib.util.find_spec(module) is None:
                raise ConfigError(
                    f"{key} needs the {module} package, which is not installed: pip install "
                    f"'actcomp_dist[{module}]' (or pip install {module}), or {off}"
                )


@dataclass
class RunConfig:
    run_dir: str = "runs/default"
    plugins: list[str] = field(default_factory=list)
    model: ModelSection = field(default_factory=ModelSection)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    parallel: ParallelSection = field(default_factory=ParallelSection)
    activation_checkpointing: ActivationCheckpointingSection = field(
        default_factory=ActivationCheckpointingSection
    )
    memory: MemorySection = field(default_factory=MemorySection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    deepspeed: dict[str, Any] = field(default_factory=dict)

    # The typed sections, by name (a config class that extends RunConfig extends this).
    SECTIONS: ClassVar[dict[str, type]] = {
        "model": ModelSection,
        "parallel": ParallelSection,
        "activation_checkpointing": ActivationCheckpointingSection,
        "memory": MemorySection,
        "data": DataSection,
        "train": TrainSection,
        "checkpoint": CheckpointSection,
        "logging": LoggingSection,
    }

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir or Path(self.run_dir) / "checkpoints")

    def to_dict(self) -> dict[str, Any]:
        out = {"run_dir": self.run_dir}
        for f in dataclasses.fields(self):
            if f.name == "run_dir":
                continue
            value = getattr(self, f.name)
            if f.name == "compression":
                out[f.name] = value.to_dict()
            elif dataclasses.is_dataclass(value):
                out[f.name] = dataclasses.asdict(value)
            else:
                out[f.name] = copy.deepcopy(value)
        return out

    def compression_fingerprint(self) -> str:
        """Hash of everything that changes what a compressed checkpoint means."""
        blob = json.dumps(self.compression.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.lr=3e-4"`` -> (["train", "lr"], 3e-4): JSON when it parses, else a string."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key.path=value")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise ConfigError(f"--set {text!r}: empty key component")
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return path, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    raw = copy.deepcopy(raw)
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {text!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return raw


def run_config_from_dict(
    raw: dict[str, Any], source: str = "<config>", config_class: type | None = None
) -> RunConfig:
    """Build and validate a :class:`RunConfig`; unknown keys name the valid ones and ``source``.

    ``config_class``: a :class:`RunConfig` subclass with more (or other) sections, listed in
    its ``SECTIONS`` class attribute (name -> section dataclass), e.g. the fine-tuning config.
    """
    config_class = config_class or RunConfig
    sections = config_class.SECTIONS
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the config must be a JSON object")
    valid_top = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(raw) - valid_top)
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {unknown}; valid keys: {sorted(valid_top)}")
    kwargs: dict[str, Any] = {}
    if "plugins" in raw:
        kwargs["plugins"] = import_plugins(raw["plugins"], f"{source}: plugins")
    if "run_dir" in raw:
        if not isinstance(raw["run_dir"], str) or not raw["run_dir"]:
            raise ConfigError(f"{source}: run_dir must be a non-empty path string")
        kwargs["run_dir"] = raw["run_dir"]
    for name, cls in sections.items():
        if name in raw:
            kwargs[name] = _section(cls, name, raw[name], source)
    if "compression" in raw:
        if not isinstance(raw["compression"], dict):
            raise ConfigError(f"{source}: section 'compression' must be an object")
        try:
            kwargs["compression"] = CompressionConfig.from_dict(raw["compression"])
        except (ValueError, TypeError) as err:
            raise ConfigError(f"{source}: compression: {err}") from None
        _check_sites(kwargs["compression"], source)
    if "deepspeed" in raw:
        if not isinstance(raw["deepspeed"], dict):
            raise ConfigError(f"{source}: section 'deepspeed' must be an object")
        kwargs["deepspeed"] = copy.deepcopy(raw["deepspeed"])
    config = config_class(**kwargs)
    for name in sections:
        section = getattr(config, name)
        if hasattr(section, "validate"):
            try:
                section.validate()
            except ConfigError as err:
                raise ConfigError(f"{source}: {err}") from None
    _check_block_input_policy(config, source)
    _resolve_linear_site_policies(config, raw, source)
    _check_lr_scale_subspace(config, source)
    return config


def _resolve_linear_site_policies(config: RunConfig, raw: dict[str, Any], source: str) -> None:
    """``memory.policy`` ``compress`` / ``keep`` on the linear sites and ``compression.sites``
    name one thing: resolve them into ``compression.sites`` (the rule:
    :func:`actcomp_dist.storage.resolve_compressed_sites`), which the model builders read."""
    memory = getattr(config, "memory", None)
    compression = getattr(config, "compression", None)
    if memory is None or compression is None:
        return
    given = "sites" in raw.get("compression", {})
    try:
        sites = resolve_compressed_sites(
            memory.policy,
            compression.sites if given else None,
            compression.method,
            compression.sites,
        )
    except ValueError as err:
        raise ConfigError(f"{source}: {err}") from None
    if sites != compression.sites:
        config.compression = compression.replace(sites=sites)


def _check_lr_scale_subspace(config: RunConfig, source: str) -> None:
    """In ``subspace`` mode the compressed weights are stepped at lr x
    ``train.subspace_scale`` outside the optimizer's param groups: ``train.lr_scale`` naming a
    compressed site would be a second multiplier, so it is refused (``default`` applies to the
    other parameters only)."""
    train = getattr(config, "train", None)
    compression = getattr(config, "compression", None)
    if train is None or compression is None or compression.grad_mode != "subspace":
        return
    if compression.method == "none":
        return
    named = [site for site in compression.sites if site in train.lr_scale]
    if named:
        keys = [f"train.lr_scale.{site}" for site in named]
        raise ConfigError(
            f"{source}: {keys} name(s) compressed site(s) of compression.grad_mode='subspace', "
            f"whose weights are stepped at train.lr x train.subspace_scale; set "
            f"train.subspace_scale.SITE instead, or drop the key"
        )


def _check_block_input_policy(config: RunConfig, source: str) -> None:
    """A packed ``memory.policy.block_input`` packs what full checkpointing keeps; sublayer
    checkpointing reads what the memory-efficient norm keeps."""
    memory = getattr(config, "memory", None)
    checkpointing = getattr(config, "activation_checkpointing", None)
    if memory is None or checkpointing is None:
        return
    if checkpointing.mode == "sublayer" and not memory.efficient_ops:
        raise ConfigError(
            f"{source}: activation_checkpointing.mode='sublayer' re-runs each sublayer from the "
            f"norm output the memory-efficient norm keeps; it needs memory.efficient_ops=true"
        )
    policy = memory.policy.get("block_input", "keep")
    if policy != "keep" and checkpointing.mode != "full":
        raise ConfigError(
            f"{source}: memory.policy.block_input={policy!r} packs the block input that full "
            f"checkpointing keeps; it needs activation_checkpointing.mode='full' (got "
            f"{checkpointing.mode!r}), or set it to 'keep'"
        )


def import_plugins(plugins: Any, where: str = "plugins") -> list[str]:
    """Import each module named in ``plugins`` (a list of module names) and return the list.

    A plugin registers what it defines when imported (``@register_compressor``), so this runs
    before any compression config is validated; it runs on every rank, before any collective,
    and a module that cannot be imported is a :class:`ConfigError` naming it (``where`` says
    which key or option listed it).
    """
    if not isinstance(plugins, list) or not all(isinstance(p, str) and p for p in plugins):
        raise ConfigError(f"{where} must be a list of module names, got {plugins!r}")
    for name in plugins:
        try:
            importlib.import_module(name)
        except Exception as err:  # noqa: BLE001  (any import failure is the user's module's)
            reason = str(err).splitlines()[0] if str(err) else ""
            raise ConfigError(
                f"{where}: cannot import module {name!r} ({type(err).__name__}: {reason}); a "
                f"plugin is a module importable on every rank (on PYTHONPATH) that registers "
                f"its methods with @register_compressor when imported"
            ) from None
    return list(plugins)


def with_plugins(raw: dict[str, Any], plugins: list[str]) -> dict[str, Any]:
    """A copy of ``raw`` whose ``plugins`` list also names ``plugins`` (``--plugin``)."""
    raw = copy.deepcopy(raw)
    listed = raw.get("plugins", [])
    if plugins:
        if not isinstance(listed, list):
            raise ConfigError(f"plugins must be a list of module names, got {listed!r}")
        raw["plugins"] = listed + [p for p in plugins if p not in listed]
    return raw


def read_raw_config(
    path: str | Path, overrides: list[str] = (), deepspeed_file: str | Path | None = None
) -> dict[str, Any]:
    """The JSON object of a config file, with the DeepSpeed config file ``deepspeed_file`` as
    its ``deepspeed`` section (``--deepspeed_config``), then the ``--set`` overrides applied
    (not validated)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON: {err}") from None
    if deepspeed_file is not None:
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the config must be a JSON object")
        from actcomp_dist.training.deepspeed_config import merge_deepspeed_file

        raw = merge_deepspeed_file(raw, deepspeed_file)
    return apply_overrides(raw, list(overrides))


def load_run_config(
    path: str | Path,
    overrides: list[str] = (),
    config_class: type | None = None,
    deepspeed_file: str | Path | None = None,
) -> RunConfig:
    raw = read_raw_config(path, overrides, deepspeed_file)
    return run_config_from_dict(raw, source=str(path), config_class=config_class)


def _check_sites(compression: CompressionConfig, source: str) -> None:
    """The run configs build the LLaMA model: its sites (TRANSFORMER_SITES and the value-row
    slice ``v``) and their rules (:func:`actcomp_dist.config.check_model_sites`)."""
    try:
        check_model_sites(compression)
    except ValueError as err:
        raise ConfigError(f"{source}: {err}") from None


def validate_run(config: RunConfig, world_size: int) -> None:
    """Cross-section rules that need the world size; raises :class:`ConfigError`."""
    tp = config.parallel.tensor_parallel
    if world_size % tp != 0:
        raise ConfigError(
            f"parallel.tensor_parallel={tp} does not divide the world size {world_size}"
        )
    compression = config.compression
    if any(site in compression.sites for site in ROW_PARALLEL_SITES):
        from actcomp_dist.compression import get_compressor_class

        try:  # a TP size the method's row-parallel layout cannot serve
            get_compressor_class(compression.method).check_tensor_parallel(compression, tp)
        except ValueError as err:
            raise ConfigError(f"parallel.tensor_parallel={tp}: {err}") from None
    import torch

    if config.train.precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError(
            "train.precision='fp16' needs a CUDA device (DeepSpeed's fp16 optimizer and loss "
            "scaler run on GPUs only); use 'bf16' or 'fp32' on a CPU"
        )
    offloaded = config.memory.storage_policy.offloaded
    if offloaded and not torch.cuda.is_available():
        kind = offloaded[0]
        valid = [p for p in IMPLEMENTED[kind] if p != "offload"]
        raise ConfigError(
            f"memory.policy.{kind}='offload' needs a CUDA device (it keeps the tensor in "
            f"pinned host memory instead of device memory; on a CPU they are one memory, so it "
            f"would save nothing); valid on a CPU: {valid}"
        )
    if "int8" in config.memory.storage_policy.changes().values() and not torch.cuda.is_available():
        from actcomp_dist.cpu_kernels import setting as cpu_kernel_setting

        try:  # the int8 storage's CPU kernel switch, read at the first pack otherwise
            cpu_kernel_setting()
        except ValueError as err:
            raise ConfigError(f"memory.policy uses int8 on a CPU: {err}") from None
    dp = world_size // tp
    train = config.train
    per_step = train.micro_batch_size * dp
    if train.global_batch_size % per_step != 0:
        raise ConfigError(
            f"train.global_batch_size={train.global_batch_size} must be a multiple of "
            f"micro_batch_size * data_parallel_size = {train.micro_batch_size} * {dp}"
        )
    config.logging.check_installed()
    # The deepspeed section, completed from train.*, checked here (before the data cache or
    # the run directory is written) rather than when DeepSpeed first reads it.
    from actcomp_dist.training.deepspeed_config import check_deepspeed_config, deepspeed_config

    check_deepspeed_config(deepspeed_config(config, world_size))
    if config.compression.grad_mode == "subspace":
        stage = config.deepspeed.get("zero_optimization", {}).get("stage", 0)
        if stage == 3:
            raise ConfigError(
                "compression.grad_mode='subspace' is not supported with ZeRO stage 3 (its "
                "compressed weights are updated outside DeepSpeed's partitioned parameters); "
                "use ZeRO 0-2 or grad_mode='lift'"
            )
        if stage == 0 and config.train.precision != "fp32":
            raise ConfigError(
                f"compression.grad_mode='subspace' with train.precision="
                f"{config.train.precision!r} needs ZeRO stage 1 or 2: DeepSpeed's stage-0 "
                f"{config.train.precision} optimizer does not expose the fp32 copies of the "
                f"subspace proxies that each step's merge must reset"
            )
        accumulate = config.deepspeed.get("data_types", {}).get("grad_accum_dtype")
        if (
            stage == 1
            and config.train.precision == "bf16"
            and accumulate not in (None, "bf16", "bfloat16")
        ):
            raise ConfigError(
                f"compression.grad_mode='subspace' with ZeRO stage 1 in bf16 needs "
                f"deepspeed.data_types.grad_accum_dtype unset or 'bf16', got {accumulate!r}: "
                f"DeepSpeed then steps with its BF16_Optimizer, whose gradient-norm clip the "
                f"partitioned subspace state cannot join"
            )
    if config.train.clip_grad_scope == "parameter":
        stage = config.deepspeed.get("zero_optimization", {}).get("stage", 0)
        if (
            stage != 0
            or config.train.precision != "fp32"
            or (config.compression.grad_mode == "subspace")
        ):
            raise ConfigError(
                f"train.clip_grad_scope='parameter' needs deepspeed.zero_optimization.stage=0, "
                f"train.precision='fp32' and compression.grad_mode other than 'subspace' (the "
                f"torch AdamW then holds the parameters themselves); got stage {stage}, "
                f"precision {config.train.precision!r}, grad_mode "
                f"{config.compression.grad_mode!r}"
            )
    if config.parallel.sequence_parallel and config.data.seq_length % tp != 0:
        raise ConfigError(
            f"data.seq_length={config.data.seq_length} must be divisible by "
            f"parallel.tensor_parallel={tp} with sequence parallelism"
        )
    if (
        config.checkpoint.resume not in (None, "latest")
        and not Path(config.checkpoint.resume).exists()
    ):
        raise ConfigError(f"checkpoint.resume={config.checkpoint.resume!r}: no such checkpoint")
    from actcomp_dist.training.drift import allowable_keys

    allowable = allowable_keys(config)
    for key in config.checkpoint.allow_changes:
        if key not in allowable:
            raise ConfigError(
                f"checkpoint.allow_changes: {key!r} cannot be allowed (unknown, or a change "
                f"that alters saved tensor shapes or the compression); allowable: {allowable}"
            )
    for prefix in config.data.prefixes:
        for suffix in (".bin", ".idx"):
            if not Path(prefix + suffix).is_file():
                raise ConfigError(f"data.paths: {prefix + suffix} not found")
    if config.data.tokenizer:
        from actcomp_dist.data.tokenizer import load_tokenizer

        try:  # opening it is cheap, and a wrong file fails here, before any collective
            tokenizer = load_tokenizer(config.data.tokenizer)
        except (FileNotFoundError, ValueError, ImportError) as err:
            raise ConfigError(f"data.tokenizer: {err}") from None
        if config.data.prefixes:
            _check_data_files(config.data.prefixes, tokenizer.vocab_size)


def _check_data_files(prefixes: list[str], vocab_size: int) -> None:
    """Each indexed dataset's .idx parses and agrees with its .bin, and its token ids are inside
    the tokenizer's vocabulary (:mod:`actcomp_dist.data.check`)."""
    from actcomp_dist.data.check import MAX_SCAN_BYTES, DataFileError, check_data_files
    from actcomp_dist.training.distributed import launch_info

    try:
        skipped = check_data_files(prefixes, vocab_size)
    except DataFileError as err:
        raise ConfigError(str(err)) from None
    if skipped and launch_info().rank == 0:
        print(
            f"note: largest token id not checked against the vocabulary for {skipped} (over "
            f"{MAX_SCAN_BYTES >> 30} GiB each)",
            flush=True,
        )


def validate_model(config: RunConfig) -> None:
    """``model.name`` with its overrides is a valid LlamaConfig that shards
    ``parallel.tensor_parallel`` ways (the vocabulary, unless overridden, is padded to a
    multiple of the TP size once the tokenizer is known); raises :class:`ConfigError`.

    Separate from :func:`validate_run` because it imports megatron-core (through the model
    package), which a run that fails on a cheaper check need not wait for.
    """
    from actcomp_dist.models import LlamaConfig, check_tensor_parallel, get_model_config

    model, tp = config.model, config.parallel.tensor_parallel
    valid = {f.name for f in dataclasses.fields(LlamaConfig)}
    unknown = sorted(set(model.overrides) - valid)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {[f'model.{k}' for k in unknown]}; valid keys in 'model': "
            f"{sorted(valid | {'name', 'overrides'})}"
        )
    overrides = {"seq_length": config.data.seq_length, "vocab_size": 128 * tp, **model.overrides}
    try:
        built = get_model_config(model.name, **overrides)
        check_tensor_parallel(built, tp)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model: {err}") from None
    _check_compression_fits(config.compression, built, tp)


def _check_compression_fits(compression, model, tp: int) -> None:
    """Each compressed site's input width (its shard on each TP rank for a row-parallel site)
    can hold the compression: the method's ``saved_width`` raises what building the layer
    would (a rank above the width, groups not dividing it, ...)."""
    if compression.method == "none":
        return
    from actcomp_dist.compression import get_compressor_class, layer_layout

    widths = {
        "qkv": model.hidden_size,
        "proj": model.num_attention_heads * model.head_dim,
        "fc1": model.hidden_size,
        "fc2": model.ffn_hidden_size,
    }
    method = get_compressor_class(compression.method)
    for site in compression.sites:
        if site not in widths:
            continue
        row = site in ROW_PARALLEL_SITES
        for tp_rank in range(tp if row else 1):
            try:
                layout = layer_layout(
                    compression, widths[site], row_parallel=row, tp_rank=tp_rank, tp_size=tp
                )
                method.saved_width(compression, layout)
            except ValueError as err:
                raise ConfigError(
                    f"compression does not fit site {site!r} (input width {widths[site]}"
                    + (f", TP rank {tp_rank}/{tp}" if row and tp > 1 else "")
                    + f"): {err}"
                ) from None


def gradient_accumulation_steps(config: RunConfig, world_size: int) -> int:
    dp = world_size // config.parallel.tensor_parallel
    return config.train.global_batch_size // (config.train.micro_batch_size * dp)


def _section(cls, name: str, raw: Any, source: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: section {name!r} must be an object")
    valid = {f.name for f in dataclasses.fields(cls)}
    if issubclass(cls, ModelSection):
        # Unknown model keys are LlamaConfig overrides, checked when the model is built.
        known = {k: v for k, v in raw.items() if k in valid}
        overrides = dict(known.pop("overrides", {}))
        overrides.update({k: v for k, v in raw.items() if k not in valid})
        return cls(**known, overrides=overrides)
    unknown = sorted(set(raw) - valid)
    if unknown:
        raise ConfigError(
            f"{source}: unknown key(s) {[f'{name}.{k}' for k in unknown]}; valid keys in "
            f"{name!r}: {sorted(valid)}"
        )
    return cls(**copy.deepcopy(raw))


def check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}={value!r} must be an int >= 1")


def _non_negative_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{name}={value!r} must be an int >= 0")


def _non_negative_float(name: str, value: Any) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or math.isnan(value)
        or value < 0
    ):
        raise ConfigError(f"{name}={value!r} must be a number >= 0")
    # Python's JSON parser accepts Infinity (and NaN, refused above).
    if math.isinf(value):
        raise ConfigError(f"{name}={value!r} must be finite")


def check_bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"{name}={value!r} must be true or false")
