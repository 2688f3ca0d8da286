"""The ``deepspeed`` section of a run config: completed from ``train.*`` and checked early.

Our run config owns the training hyper-parameters (``train.*``); the ``deepspeed`` section owns
everything else DeepSpeed knows (ZeRO stage and its tuning, communication, ...) and is passed
on as written. The keys both could set (:data:`DERIVED_KEYS`) are derived from ``train.*`` and
filled in: a section may leave them out, or set them to ``"auto"`` (the convention of DeepSpeed
config files shared with Hugging Face's trainer), or to the derived value; a different value
stops the run with an error naming both, instead of silently preferring one.

The section can come from its own file (``--deepspeed_config FILE``, DeepSpeed's flag): it is
merged under the run config's ``deepspeed`` section, see :func:`merge_deepspeed_file`.

:func:`check_deepspeed_config` lets DeepSpeed's own config parser read the completed section
before anything is written (the data cache, the run directory), so a misspelt ZeRO key fails
at start-up with one line, not after the data is indexed.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

from actcomp_dist.training.config import ConfigError, RunConfig, gradient_accumulation_steps

AUTO = "auto"
#: Keys of the deepspeed section derived from train.* ("auto" accepted), as shown to users.
DERIVED_KEYS = (
    "train_micro_batch_size_per_gpu",
    "gradient_accumulation_steps",
    "train_batch_size",
    "gradient_clipping",
    "bf16.enabled",
    "fp16.enabled",
)


def deepspeed_config(config: RunConfig, world_size: int) -> dict[str, Any]:
    """The ``deepspeed`` section with the keys derived from ``train.*`` filled in (replacing
    ``"auto"``); raises :class:`ConfigError` on a contradiction or an ``"auto"`` elsewhere."""
    ds = copy.deepcopy(config.deepspeed)
    train = config.train
    for key in ("bf16", "fp16", "zero_optimization"):
        if not isinstance(ds.get(key, {}), dict):
            raise ConfigError(f"deepspeed.{key}={ds[key]!r} must be an object")
    derived = {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps(config, world_size),
        "train_batch_size": train.global_batch_size,
        # Per-parameter clipping happens in our optimizer step (training/engine.py).
        "gradient_clipping": train.clip_grad if train.clip_grad_scope == "global" else 0.0,
    }
    for key, value in derived.items():
        if key in ds and ds[key] != AUTO and ds[key] != value:
            raise ConfigError(
                f"deepspeed.{key}={ds[key]!r} contradicts the value {value!r} derived from "
                f"train.* (global_batch_size, micro_batch_size, clip_grad); remove it from the "
                f"deepspeed section"
            )
        ds[key] = value
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(
                f"deepspeed.{key} is not used: the optimizer (AdamW) and LR schedule come from "
                f"train.* (lr, min_lr, warmup_steps, lr_decay, betas, weight_decay)"
            )
    # The non-finite guard (training/guard.py) relies on DeepSpeed skipping a step whose
    # gradient norm is not finite; these two switches turn that check off.
    for section, key in (
        ("bf16", "check_grad_overflow"),
        ("zero_optimization", "compute_grad_norm"),
    ):
        if ds.get(section, {}).get(key, True) is not True:
            raise ConfigError(
                f"deepspeed.{section}.{key}={ds[section][key]!r} would let DeepSpeed apply "
                f"steps with non-finite gradients, which the non-finite guard "
                f"(train.on_nonfinite) relies on it to skip; remove it"
            )
    for precision, key in (("bf16", "bf16"), ("fp16", "fp16")):
        wanted = train.precision == precision
        section = ds.setdefault(key, {})
        if section.get("enabled", AUTO) != AUTO and bool(section["enabled"]) != wanted:
            raise ConfigError(
                f"deepspeed.{key}.enabled={section['enabled']} contradicts "
                f"train.precision={train.precision!r}"
            )
        section["enabled"] = wanted
    auto = _auto_keys(ds)
    if auto:
        raise ConfigError(
            f"deepspeed.{auto[0]}='auto' cannot be derived here: 'auto' is accepted for "
            f"{list(DERIVED_KEYS)} (from train.*); give {auto[0]} a value"
        )
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def _auto_keys(node: Any, prefix: str = "") -> list[str]:
    """The dotted keys under ``node`` whose value is still ``"auto"``."""
    if isinstance(node, dict):
        return [k for key, value in node.items() for k in _auto_keys(value, f"{prefix}{key}.")]
    return [prefix[:-1]] if node == AUTO else []


def check_deepspeed_config(ds: dict[str, Any]) -> None:
    """Let DeepSpeed's config parser read the completed section ``ds`` (no process group
    needed); its complaint becomes one :class:`ConfigError` line naming the section.

    DeepSpeed checks ``train_batch_size = micro * accumulation * data-parallel size`` for the
    world it sees (one rank without a process group, every rank with one, as it cannot know
    the tensor-parallel layout here); :func:`~actcomp_dist.training.config.validate_run` has
    checked that identity for the real layout, so the copy it reads leaves
    ``train_batch_size`` out and DeepSpeed derives it.
    """
    from deepspeed.runtime.config import DeepSpeedConfig

    checked = {key: value for key, value in ds.items() if key != "train_batch_size"}
    try:
        DeepSpeedConfig(checked)
    except (ValueError, TypeError, AssertionError, KeyError) as err:
        # One line: pydantic's message spans several and ends with a link to its docs.
        text = " ".join(str(err).split()) or type(err).__name__
        text = re.sub(r"\s*For further information visit \S+", "", text)
        raise ConfigError(f"deepspeed: {text}") from None


def merge_deepspeed_file(raw: dict[str, Any], path: str | Path) -> dict[str, Any]:
    """``raw`` (a run config's JSON) with the DeepSpeed config file ``path`` as its
    ``deepspeed`` section. Keys the run config's own ``deepspeed`` section also sets must
    agree with the file (one place decides each value); ``--set deepspeed.KEY=...`` overrides
    are applied after this and win."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--deepspeed_config {path}: file not found")
    try:
        from_file = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"--deepspeed_config {path}: not valid JSON: {err}") from None
    if not isinstance(from_file, dict):
        raise ConfigError(f"--deepspeed_config {path}: must hold a JSON object")
    in_config = raw.get("deepspeed", {})
    if not isinstance(in_config, dict):
        raise ConfigError("section 'deepspeed' must be an object")
    merged = _merge(from_file, in_config, path)
    return {**raw, "deepspeed": merged}


def _merge(base: dict, other: dict, path: Path, prefix: str = "") -> dict:
    out = copy.deepcopy(base)
    for key, value in other.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value, path, f"{prefix}{key}.")
        elif key in out and out[key] != value:
            raise ConfigError(
                f"deepspeed.{prefix}{key} is {out[key]!r} in {path} but {value!r} in the run "
                f"config's deepspeed section; set it in one place (or with --set)"
            )
        else:
            out[key] = copy.deepcopy(value)
    return out
