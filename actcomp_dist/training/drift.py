"""What a resume may not change: the settings a checkpoint's state only means something for.

An exact resume repeats the steps the original run would have taken. That needs the same model
shape, adapter (mode, seed, rank, targets, mask), compression (refused by the checkpoint's
marker, :func:`~actcomp_dist.training.checkpoint.verify_checkpoint`), precision, seed (data
order, dropout-free init), the alpha of each site's subspace update (``subspace`` mode), the
learning-rate factor of each parameter group (``train.lr_scale``: it decides the param groups),
tokenizer and data. :func:`resume_drift` lists every such setting
that differs between the checkpoint and the config, as ``{"key": [old, new]}``; the trainer
refuses the resume (one line, every rank, before the engine is built) unless each changed key
is in ``checkpoint.allow_changes``, and logs the accepted ones as ``resume_changed``.

The parallel layout (world size, ``parallel.tensor_parallel``, ZeRO stage) is not compared
here and cannot be allowed here: a change of it passes only through
:func:`~actcomp_dist.training.elastic.check_layout_change` (another data-parallel size, or TP
size with ``checkpoint.reset_optimizer``), which refuses the rest and logs the change as
``resume_changed["parallel.layout"]``.

The data identity is a fingerprint, not the paths alone: per indexed-dataset prefix the
``.bin``'s size and the SHA-256 of its ``.idx`` (the ``.idx`` holds every document's length and
offset, so another corpus or another tokenisation changes it; it is small next to the ``.bin``,
which may be terabytes and is not hashed). File times are not used: copying a corpus to another
filesystem changes them and would refuse a valid resume. The tokenizer is its file's SHA-256;
fine-tuning JSONL files are hashed whole (they are small).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from actcomp_dist.training.checkpoint import file_sha256

# Config keys (dotted prefixes) whose change breaks an exact resume. ``data.num_workers`` only
# changes how batches are loaded, not which.
EXACT_PREFIXES = (
    "model.",
    "finetune.mode",
    "finetune.adapter.",
    "finetune.mask",
    "train.precision",
    "train.seed",
    "train.subspace_scale.",
    "train.lr_scale.",
    "data.",
    "fingerprint.",
)
NOT_EXACT = ("data.num_workers", "finetune.adapter.cache_A")

# Changes that can be accepted with ``checkpoint.allow_changes``: those that leave every saved
# tensor's shape alone (a changed model shape, adapter rank, targets or mode cannot load).
# ``data.KEY`` stands for any field of the data section but ``data.seq_length`` (the model's
# shape); ``data.fingerprint`` accepts changed data files at the same paths.
ALLOWABLE = (
    "train.precision",
    "train.seed",
    "train.subspace_scale",
    "data.fingerprint",
    "finetune.adapter.seed",
    "finetune.adapter.alpha",
)

# Watched schedule keys: accepted by default, with a warning and ``resume_changed`` (a run is
# often extended); listing them in ``allow_changes`` is valid and changes nothing.
SCHEDULE_KEYS = ("steps", "lr", "min_lr", "warmup_steps", "lr_decay")


def _tokenizer_file(path: Path) -> Path | None:
    from actcomp_dist.data.tokenizer import HF_TOKENIZER_FILE, SENTENCEPIECE_FILE

    if path.is_dir():
        for name in (HF_TOKENIZER_FILE, SENTENCEPIECE_FILE):
            if (path / name).is_file():
                return path / name
        return None
    return path if path.is_file() else None


def data_fingerprint(config) -> dict[str, Any]:
    """``{"fingerprint.tokenizer": sha256, "fingerprint.data.PREFIX": "BYTES:sha256(idx)",
    "fingerprint.file.PATH": sha256}`` for the files the config reads (nothing for the embedded
    corpus, which is generated from the code and ``data.embedded_vocab_size``)."""
    data = config.data
    out: dict[str, Any] = {}
    if data.tokenizer:
        file = _tokenizer_file(Path(data.tokenizer))
        if file is not None:
            out["fingerprint.tokenizer"] = file_sha256(file)
    for prefix in data.prefixes:
        bin_file, idx_file = Path(prefix + ".bin"), Path(prefix + ".idx")
        if bin_file.is_file() and idx_file.is_file():
            out[f"fingerprint.data.{prefix}"] = f"{bin_file.stat().st_size}:{file_sha256(idx_file)}"
    for name in ("train", "valid"):
        for file in getattr(data, name, None) or []:
            if Path(file).is_file():
                out[f"fingerprint.file.{file}"] = file_sha256(Path(file))
    return out


def _flatten(values: Any, prefix: str, out: dict[str, Any]) -> dict[str, Any]:
    if isinstance(values, dict) and values:
        for key, value in values.items():
            _flatten(value, f"{prefix}.{key}" if prefix else str(key), out)
    else:
        out[prefix] = values
    return out


def _exact(key: str) -> bool:
    return key.startswith(EXACT_PREFIXES) and key not in NOT_EXACT


def _model_view(config_dict: dict[str, Any], model_config: dict[str, Any] | None) -> dict:
    """The model as built when it can be resolved without the tokenizer (so a named config and
    the same shape spelled as overrides agree), else the model section as written."""
    model = config_dict.get("model", {})
    if model_config is not None and not model.get("init_from"):
        return {f"model.{k}": v for k, v in model_config.items()}
    return _flatten(model, "model", {})


def _resolved_model(config, saved_model_config: dict[str, Any] | None) -> dict | None:
    """This config's LlamaConfig as the trainer will build it, with the checkpoint's vocabulary
    (the vocabulary follows from the tokenizer, compared by its own fingerprint)."""
    if saved_model_config is None or getattr(config.model, "init_from", None):
        return None
    from actcomp_dist.models import get_model_config

    overrides = {
        "seq_length": config.data.seq_length,
        "vocab_size": saved_model_config.get("vocab_size"),
        **config.model.overrides,
    }
    try:
        return get_model_config(config.model.name, **overrides).to_dict()
    except (TypeError, ValueError):
        return None  # validate_model has said why already


def _adapter_view(config_dict: dict[str, Any], section_class) -> dict:
    """A fine-tuning run's adapter as resolved (defaults filled in, so ``{}`` and the written-out
    defaults agree) under ``finetune.adapter.*``; nothing for pretraining or mode ``full``."""
    values = config_dict.get("finetune")
    if section_class is None or not values or values.get("mode") == "full":
        return {}
    import dataclasses

    try:
        adapter = dataclasses.asdict(section_class(**values).adapter_config())
    except (TypeError, ValueError):
        return _flatten(values.get("adapter") or {}, "finetune.adapter", {})
    adapter.pop("method")  # finetune.mode
    adapter["targets"] = list(adapter["targets"])
    return _flatten(adapter, "finetune.adapter", {})


def _subspace_scale_view(config_dict: dict[str, Any]) -> dict:
    """``train.subspace_scale.SITE``: the alpha each site's subspace update is scaled by (so
    ``0.25`` and ``{"default": 0.25}`` agree); nothing for runs that are not in ``subspace``
    mode, which never read it."""
    from actcomp_dist.config import TRANSFORMER_SITES
    from actcomp_dist.optim.subspace_proxy import site_subspace_scale

    compression, train = config_dict.get("compression"), config_dict.get("train")
    if not isinstance(compression, dict) or compression.get("grad_mode") != "subspace":
        return {}
    scale = train.get("subspace_scale", 0.25) if isinstance(train, dict) else 0.25
    try:
        return {
            f"train.subspace_scale.{site}": site_subspace_scale(scale, site)
            for site in TRANSFORMER_SITES
        }
    except (TypeError, ValueError):  # validate_run has said why already
        return {"train.subspace_scale.default": scale}


def _lr_scale_view(config_dict: dict[str, Any]) -> dict:
    """``train.lr_scale.GROUP``: each parameter group's factor (so ``{}``, a checkpoint
    without the field and ``{"default": 1}`` agree). Not allowable: the factors decide how the
    parameters are split into the optimizer's param groups, which the saved state follows."""
    from actcomp_dist.training.config import LR_SCALE_KEYS, lr_scale_factor

    train = config_dict.get("train")
    scale = train.get("lr_scale", {}) if isinstance(train, dict) else {}
    if not isinstance(scale, dict):  # validate_run has said why already
        return {"train.lr_scale.default": scale}
    return {f"train.lr_scale.{g}": lr_scale_factor(scale, g) for g in LR_SCALE_KEYS[1:]}


def _settings(config_dict: dict[str, Any], model: dict[str, Any] | None, section_class) -> dict:
    rest = {k: v for k, v in config_dict.items() if k != "model"}
    if isinstance(rest.get("finetune"), dict):
        rest["finetune"] = {k: v for k, v in rest["finetune"].items() if k != "adapter"}
    if isinstance(rest.get("train"), dict):
        rest["train"] = {
            k: v for k, v in rest["train"].items() if k not in ("subspace_scale", "lr_scale")
        }
    return {
        **_flatten(rest, "", {}),
        **_model_view(config_dict, model),
        **_adapter_view(config_dict, section_class),
        **_subspace_scale_view(config_dict),
        **_lr_scale_view(config_dict),
    }


def resume_drift(saved: dict[str, Any], config) -> dict[str, list]:
    """``{"key": [checkpoint value, config value]}`` for each exactness-relevant setting that
    differs between the checkpoint's trainer state ``saved`` and ``config`` (compression is
    the marker's check). Keys of settings absent from an older checkpoint are not compared."""
    now_dict = config.to_dict()
    before_dict = saved.get("config", {})
    now_model = _resolved_model(config, saved.get("model_config"))
    finetune = type(getattr(config, "finetune", None)) if hasattr(config, "finetune") else None
    before = {
        **_settings(before_dict, saved.get("model_config") if now_model else None, finetune),
        **saved.get("fingerprint", {}),
    }
    now = {**_settings(now_dict, now_model, finetune), **data_fingerprint(config)}
    changed = {}
    for key in sorted(set(before) | set(now)):
        if not _exact(key):
            continue
        if key.startswith("fingerprint.") and key not in before:
            continue  # an older checkpoint without fingerprints, or a new file
        old, new = before.get(key), now.get(key)
        if old != new:
            changed[key] = [old, new]
    return changed


def allowable_keys(config) -> list[str]:
    """The keys ``checkpoint.allow_changes`` may list for ``config``."""
    data = sorted(
        f"data.{k}" for k in config.to_dict()["data"] if k not in ("seq_length", "num_workers")
    )
    return sorted({*ALLOWABLE, *data, *(f"train.{k}" for k in SCHEDULE_KEYS)})


def refused(changes: dict[str, list], allowed: list[str]) -> dict[str, list]:
    """The changes that ``allowed`` does not accept. A fingerprint follows the setting that
    names its file: the tokenizer's is accepted by ``data.tokenizer``, a data file's by the
    setting listing it (``data.paths``, ``data.train``, ``data.valid``); ``data.fingerprint``
    accepts any (other files at the same paths)."""

    def accepted(key: str) -> bool:
        if key in allowed or (key.startswith("fingerprint.") and "data.fingerprint" in allowed):
            return True
        if key.startswith("train.subspace_scale."):
            return "train.subspace_scale" in allowed
        if key == "fingerprint.tokenizer":
            return "data.tokenizer" in allowed
        if key.startswith(("fingerprint.data.", "fingerprint.file.")):
            return any(a in allowed for a in ("data.paths", "data.train", "data.valid"))
        return False

    return {k: v for k, v in changes.items() if not accepted(k)}


def describe(changes: dict[str, list]) -> str:
    """``key: checkpoint OLD -> config NEW; ...`` (digests shortened to 12 characters)."""

    def short(value: Any) -> str:
        text = repr(value)
        return text if len(text) <= 40 else text[:37] + "...'"

    return "; ".join(
        f"{k}: checkpoint {short(old)} -> config {short(new)}" for k, (old, new) in changes.items()
    )
