"""Hugging Face LLaMA checkpoints <-> our tensor-parallel LLaMA.

A Hugging Face LLaMA directory is ``config.json`` plus the weights in safetensors, either one
``model.safetensors`` or shards listed by ``model.safetensors.index.json``. Its tensor names are
exactly the logical names of :mod:`actcomp_dist.models.weights`, and its q/k rows are already
in the rotate-half order our RoPE uses (Hugging Face's own conversion permuted Meta's
interleaved originals), so conversion is renaming, fusing and sharding only — nothing is
permuted or rescaled, and a round trip is bit-exact.

Loading (:func:`build_llama_from_hf`, :func:`load_hf_weights`) reads only this rank's slices
of each tensor through safetensors' lazy slicing (``safe_open(...).get_slice``), so a rank of a
7B model at TP = 8 reads about an eighth of the file and never holds the full model. Exporting
(:func:`export_hf`) is collective: the ranks gather one parameter at a time over their TP group
and rank 0 writes shards of at most ``max_shard_bytes``, so rank 0 holds one shard plus one
gathered tensor, not the whole model.

Supported: ``LlamaForCausalLM`` with SiLU, no attention/MLP biases, ``head_dim = hidden /
heads``, default (unscaled) RoPE, grouped-query attention and tied embeddings. The vocabulary is
used as is (no padding), so it must divide by the TP size; rope-scaled checkpoints (LLaMA 3.1's
``rope_type: llama3``) are refused with a ``ValueError`` rather than silently run with the
wrong positions.

``transformers`` is never imported here: the config is plain JSON and the weights are read with
the ``safetensors`` package.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from actcomp_dist.models.configs import LlamaConfig, check_tensor_parallel
from actcomp_dist.models.hf_tokenizer import special_token_ids, write_tokenizer_files
from actcomp_dist.models.llama import LlamaModel, build_llama
from actcomp_dist.models.weights import (
    WeightEntry,
    _merge,
    _unfuse,
    logical_shapes,
    weight_layout,
)
from actcomp_dist.parallel import state as parallel_state
from actcomp_dist.parallel.collectives import all_gather_dim0
from actcomp_dist.parallel.state import ParallelContext

CONFIG_NAME = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
#: Hugging Face's default shard size for ``save_pretrained``.
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
#: Files of a model directory that are not weights and are copied along on export.
COMPANION_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
)
# Non-weight tensors older checkpoints contain (recomputed rotary tables).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)

_HF_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ----------------------------------------------------------------------------- config


def config_from_hf(
    hf_config: Mapping[str, Any],
    *,
    seq_length: int | None = None,
    params_dtype: torch.dtype | str | None = None,
) -> LlamaConfig:
    """A Hugging Face LLaMA ``config.json`` (as a dict) -> :class:`LlamaConfig`.

    ``seq_length`` defaults to ``max_position_embeddings`` (it sizes the rotary tables);
    ``params_dtype`` defaults to the checkpoint's ``dtype`` / ``torch_dtype`` (float32 if
    absent). Raises ``ValueError`` naming the field for architectures the model does not
    implement.
    """
    model_type = hf_config.get("model_type", "llama")
    if model_type != "llama":
        raise ValueError(f"config.json has model_type={model_type!r}; only 'llama' is supported")
    checks = {
        "hidden_act": ("silu", hf_config.get("hidden_act", "silu")),
        "attention_bias": (False, hf_config.get("attention_bias", False)),
        "mlp_bias": (False, hf_config.get("mlp_bias", False)),
    }
    for name, (supported, value) in checks.items():
        if value != supported:
            raise ValueError(f"config.json has {name}={value!r}; only {supported!r} is supported")
    heads = hf_config["num_attention_heads"]
    hidden = hf_config["hidden_size"]
    head_dim = hf_config.get("head_dim") or hidden // heads
    if head_dim * heads != hidden:
        raise ValueError(
            f"config.json has head_dim={head_dim} with hidden_size={hidden} and "
            f"num_attention_heads={heads}; only head_dim = hidden_size / heads is supported"
        )
    rope = hf_config.get("rope_parameters") or hf_config.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(
            f"config.json uses rope_type={rope_type!r}; only unscaled RoPE ('default') is "
            f"implemented"
        )
    rope_theta = rope.get("rope_theta", hf_config.get("rope_theta", 10000.0))
    groups = hf_config.get("num_key_value_heads") or heads
    if params_dtype is None:
        name = hf_config.get("dtype") or hf_config.get("torch_dtype") or "float32"
        if name not in _HF_DTYPES:
            raise ValueError(f"config.json has dtype={name!r}; supported: {list(_HF_DTYPES)}")
        params_dtype = _HF_DTYPES[name]
    return LlamaConfig(
        hidden_size=hidden,
        ffn_hidden_size=hf_config["intermediate_size"],
        num_layers=hf_config["num_hidden_layers"],
        num_attention_heads=heads,
        num_query_groups=None if groups == heads else groups,
        vocab_size=hf_config["vocab_size"],
        seq_length=seq_length or hf_config.get("max_position_embeddings", 2048),
        rms_norm_eps=hf_config.get("rms_norm_eps", 1e-6),
        rope_theta=float(rope_theta),
        init_method_std=hf_config.get("initializer_range", 0.02),
        tie_embeddings=hf_config.get("tie_word_embeddings", False),
        params_dtype=params_dtype,
    )


def config_to_hf(
    config: LlamaConfig,
    *,
    dtype: torch.dtype | None = None,
    base: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """:class:`LlamaConfig` -> a Hugging Face ``config.json`` dict (transformers >= 4.x and 5.x
    read it). ``base``: the source checkpoint's config, whose other fields (token ids,
    ``max_position_embeddings``, ...) are kept; the architecture fields come from ``config``."""
    dtype = dtype or config.params_dtype
    out = dict(base or {})
    out.pop("torch_dtype", None)
    out.pop("rope_scaling", None)
    out.update(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        hidden_size=config.hidden_size,
        intermediate_size=config.ffn_hidden_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.query_groups,
        head_dim=config.head_dim,
        vocab_size=config.vocab_size,
        rms_norm_eps=config.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        rope_theta=config.rope_theta,
        tie_word_embeddings=config.tie_embeddings,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        initializer_range=config.init_method_std,
        dtype=str(dtype).removeprefix("torch."),
    )
    out.setdefault("max_position_embeddings", config.seq_length)
    return out


def read_hf_config(
    directory: str | Path,
    *,
    seq_length: int | None = None,
    params_dtype: torch.dtype | str | None = None,
) -> LlamaConfig:
    """The :class:`LlamaConfig` of a Hugging Face model directory (see :func:`config_from_hf`)."""
    return config_from_hf(
        _read_json(Path(directory) / CONFIG_NAME), seq_length=seq_length, params_dtype=params_dtype
    )


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; is {path.parent} a Hugging Face model?")
    return json.loads(path.read_text())


# ----------------------------------------------------------------------------- reading


class HFCheckpointReader:
    """Lazy access to the tensors of a Hugging Face model directory (sharded or not).

    Use as a context manager; :meth:`get` reads a whole tensor, :meth:`get_rows` /
    :meth:`get_columns` only a contiguous slice of it.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory)
        index = self.directory / INDEX_FILE
        single = self.directory / SINGLE_FILE
        if index.is_file():
            weight_map = _read_json(index)["weight_map"]
        elif single.is_file():
            weight_map = None
        else:
            raise FileNotFoundError(
                f"{self.directory} has neither {SINGLE_FILE} nor {INDEX_FILE}; only safetensors "
                f"checkpoints are supported"
            )
        self._stack = ExitStack()
        self._handles: dict[str, Any] = {}
        if weight_map is None:
            handle = self._open(SINGLE_FILE)
            self._file_of = {name: SINGLE_FILE for name in handle.keys()}
        else:
            self._file_of = dict(weight_map)

    def _open(self, filename: str):
        if filename not in self._handles:
            path = self.directory / filename
            if not path.is_file():
                raise FileNotFoundError(f"{path} is listed in {INDEX_FILE} but does not exist")
            self._handles[filename] = self._stack.enter_context(safe_open(path, framework="pt"))
        return self._handles[filename]

    def __enter__(self) -> HFCheckpointReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._stack.close()
        self._handles.clear()

    def names(self) -> list[str]:
        return list(self._file_of)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._slice(name).get_shape())

    def _slice(self, name: str):
        if name not in self._file_of:
            raise KeyError(f"{self.directory} has no tensor {name!r}")
        return self._open(self._file_of[name]).get_slice(name)

    def get(self, name: str) -> torch.Tensor:
        return self._open(self._file_of[name]).get_tensor(name)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._slice(name)[start:stop]

    def get_columns(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._slice(name)[:, start:stop]


def _check_checkpoint(reader: HFCheckpointReader, config: LlamaConfig) -> None:
    """Every logical weight present with its shape; nothing unknown (before reading data)."""
    shapes = logical_shapes(config)
    names = set(reader.names())
    ignorable = {n for n in names if n.endswith(_IGNORED_SUFFIXES)}
    if config.tie_embeddings:
        ignorable.add("lm_head.weight")  # some tied checkpoints store the shared copy too
    missing = sorted(set(shapes) - names)
    unexpected = sorted(names - set(shapes) - ignorable)
    if missing or unexpected:
        raise ValueError(
            f"{reader.directory} does not match its config.json: missing {missing[:8]}, "
            f"unexpected {unexpected[:8]}"
        )
    for name, shape in shapes.items():
        if reader.shape(name) != shape:
            raise ValueError(
                f"{reader.directory}: {name} has shape {reader.shape(name)}, config.json needs "
                f"{shape}"
            )


def _read_local_shard(
    reader: HFCheckpointReader, entry: WeightEntry, config: LlamaConfig, rank: int, size: int
) -> torch.Tensor:
    """Rank ``rank``'s shard of one model parameter, reading only the slices it needs.

    The same tensor :func:`~actcomp_dist.models.weights.shard_full_state_dict` cuts from the
    full weights (a test checks it bit for bit)."""
    if entry.kind == "replicated":
        return reader.get(entry.logical[0])
    if entry.kind in ("rows", "columns"):
        name = entry.logical[0]
        dim = 0 if entry.kind == "rows" else 1
        per_rank = reader.shape(name)[dim] // size
        read = reader.get_rows if dim == 0 else reader.get_columns
        return read(name, rank * per_rank, (rank + 1) * per_rank)
    if entry.kind == "gate_up":
        per_rank = config.ffn_hidden_size // size
        return torch.cat(
            [reader.get_rows(n, rank * per_rank, (rank + 1) * per_rank) for n in entry.logical]
        )
    assert entry.kind == "qkv", entry.kind
    groups, d = config.query_groups // size, config.head_dim
    q_rows, kv_rows = groups * config.heads_per_group * d, groups * d
    q_name, k_name, v_name = entry.logical
    q = reader.get_rows(q_name, rank * q_rows, (rank + 1) * q_rows)
    k = reader.get_rows(k_name, rank * kv_rows, (rank + 1) * kv_rows)
    v = reader.get_rows(v_name, rank * kv_rows, (rank + 1) * kv_rows)
    hidden = q.shape[-1]
    per_group = [  # [q heads of g | k_g | v_g] per local group, as the model fuses them
        q.reshape(groups, config.heads_per_group * d, hidden),
        k.reshape(groups, d, hidden),
        v.reshape(groups, d, hidden),
    ]
    return torch.cat(per_group, dim=1).reshape(-1, hidden)


def read_hf_rank_state_dict(
    directory: str | Path, config: LlamaConfig, tp_rank: int, tp_size: int
) -> dict[str, torch.Tensor]:
    """Rank ``tp_rank``'s parameters (model names, the checkpoint's dtype) from a Hugging Face
    directory, reading only this rank's slices. Pure: needs no process group."""
    check_tensor_parallel(config, tp_size)
    with HFCheckpointReader(directory) as reader:
        _check_checkpoint(reader, config)
        return {
            e.parameter: _read_local_shard(reader, e, config, tp_rank, tp_size)
            for e in weight_layout(config)
        }


def read_hf_state_dict(directory: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a Hugging Face directory by its name (the logical weights)."""
    with HFCheckpointReader(directory) as reader:
        return {name: reader.get(name) for name in reader.names()}


@torch.no_grad()
def load_hf_weights(model, directory: str | Path) -> None:
    """Copy this rank's shards of a Hugging Face checkpoint into ``model`` (cast to the model's
    dtype), one parameter at a time. Strict: the checkpoint must match ``model.config``."""
    group = model.tp_group
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    check_tensor_parallel(model.config, size)
    parameters = dict(model.named_parameters())
    with HFCheckpointReader(directory) as reader:
        _check_checkpoint(reader, model.config)
        for entry in weight_layout(model.config):
            shard = _read_local_shard(reader, entry, model.config, rank, size)
            assert shard.shape == parameters[entry.parameter].shape, (entry.parameter, shard.shape)
            parameters[entry.parameter].copy_(shard)


def build_llama_from_hf(
    directory: str | Path,
    compression=None,
    *,
    sequence_parallel: bool = False,
    seq_length: int | None = None,
    params_dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
    efficient_ops: bool = True,
    loss_chunk_tokens: int | None = None,
    storage_policy=None,
    parallel: ParallelContext | None = None,
) -> LlamaModel:
    """Build a :class:`~actcomp_dist.models.LlamaModel` from a Hugging Face LLaMA directory,
    sharded over ``parallel``'s tensor-parallel group, each rank reading its own slices, and
    move it to ``device`` (default: ``parallel.device``). ``parallel``: as for
    :func:`~actcomp_dist.models.build_llama` (``None``: the global parallel state's context,
    read once here)."""
    parallel = parallel or parallel_state.get_parallel_context()
    config = read_hf_config(directory, seq_length=seq_length, params_dtype=params_dtype)
    model = build_llama(
        config,
        compression,
        sequence_parallel=sequence_parallel,
        device="cpu",
        efficient_ops=efficient_ops,
        loss_chunk_tokens=loss_chunk_tokens,
        storage_policy=storage_policy,
        parallel=parallel,
    )
    load_hf_weights(model, directory)
    return model.to(device if device is not None else parallel.device)


# ----------------------------------------------------------------------------- writing


def save_hf_checkpoint(
    directory: str | Path,
    tensors: Mapping[str, torch.Tensor] | Iterator[tuple[str, torch.Tensor]],
    hf_config: Mapping[str, Any],
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> None:
    """Write ``config.json`` and the tensors as Hugging Face safetensors (one file, or shards
    of at most ``max_shard_bytes`` with ``model.safetensors.index.json``). ``tensors`` may be
    an iterator of ``(name, tensor)``: only one shard is held at a time."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    items = tensors.items() if isinstance(tensors, Mapping) else tensors
    shards: list[list[str]] = []
    weight_map: dict[str, int] = {}
    current: dict[str, torch.Tensor] = {}
    current_bytes = total_bytes = total_parameters = 0

    def flush() -> None:
        nonlocal current, current_bytes
        if current:
            index = len(shards)
            save_file(current, str(directory / f"_shard_{index}.tmp"), metadata={"format": "pt"})
            shards.append(list(current))
            weight_map.update(dict.fromkeys(current, index))
        current, current_bytes = {}, 0

    for name, tensor in items:
        tensor = tensor.detach().to("cpu").contiguous()
        nbytes = tensor.numel() * tensor.element_size()
        if current and current_bytes + nbytes > max_shard_bytes:
            flush()
        current[name] = tensor
        current_bytes += nbytes
        total_bytes += nbytes
        total_parameters += tensor.numel()
    flush()

    for stale in [
        SINGLE_FILE,
        INDEX_FILE,
        *(p.name for p in directory.glob("model-*.safetensors")),
    ]:
        (directory / stale).unlink(missing_ok=True)
    if len(shards) == 1:
        (directory / "_shard_0.tmp").rename(directory / SINGLE_FILE)
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        for i, name in enumerate(names):
            (directory / f"_shard_{i}.tmp").rename(directory / name)
        index = {
            "metadata": {"total_size": total_bytes, "total_parameters": total_parameters},
            "weight_map": {n: names[i] for n, i in sorted(weight_map.items())},
        }
        (directory / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    (directory / CONFIG_NAME).write_text(json.dumps(dict(hf_config), indent=2, sort_keys=True))


def iter_full_weights(
    model, local_tensor: Callable[[str, torch.Tensor], torch.Tensor] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Collective: the model's logical weights (Hugging Face names), one parameter at a time,
    gathered over its TP group; every rank gets every tensor.

    ``local_tensor(parameter_name, parameter)``: what to gather instead of the raw local
    parameter (e.g. the parameter with merged adapters); it must keep the shard's shape.
    """
    config = model.config
    group = model.tp_group
    size = dist.get_world_size(group)
    parameters = dict(model.named_parameters())
    for entry in weight_layout(config):
        tensor = parameters[entry.parameter].detach()
        if local_tensor is not None:
            tensor = local_tensor(entry.parameter, tensor)
        if entry.kind == "replicated" or size == 1:
            shards = [tensor] * size
        else:
            shards = list(all_gather_dim0(tensor.unsqueeze(0), group).unbind(0))
        fused = _merge(entry.kind, shards)
        yield from zip(entry.logical, _unfuse(entry, fused, config), strict=True)


def export_hf(
    model,
    directory: str | Path,
    *,
    dtype: torch.dtype | None = None,
    base_directory: str | Path | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    local_tensor: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    tokenizer: str | Path | None = None,
) -> None:
    """Collective: write ``model`` as a Hugging Face LLaMA directory (rank 0 writes).

    ``dtype``: cast on export (default: the parameters' dtype). ``base_directory``: the
    checkpoint the model was loaded from; its ``config.json`` fields other than the
    architecture (token ids, ``max_position_embeddings``) and its tokenizer / generation
    files are carried over. ``local_tensor``: see :func:`iter_full_weights`. ``tokenizer``:
    the tokenizer the model was trained with (a SentencePiece ``.model`` or a
    ``tokenizer.json``); its files, special-token ids and a ``generation_config.json`` are
    written (:mod:`actcomp_dist.models.hf_tokenizer`), replacing the base directory's.
    """
    is_writer = dist.get_rank() == 0
    dtype = dtype or model.config.params_dtype
    base = _read_json(Path(base_directory) / CONFIG_NAME) if base_directory else None

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in iter_full_weights(model, local_tensor):
            yield name, tensor.to(dtype)

    if is_writer:
        hf_config = config_to_hf(model.config, dtype=dtype, base=base)
        if tokenizer is not None:
            hf_config.update(special_token_ids(tokenizer))
        save_hf_checkpoint(directory, tensors(), hf_config, max_shard_bytes=max_shard_bytes)
        copy_companion_files(base_directory, directory)
        if tokenizer is not None:
            write_tokenizer_files(directory, tokenizer, model_max_length=model.config.seq_length)
    else:
        for _ in tensors():  # take part in every gather
            pass
    dist.barrier()


def copy_companion_files(base_directory: str | Path | None, directory: str | Path) -> None:
    """Copy the tokenizer and generation files of ``base_directory`` (if any) into
    ``directory``."""
    for name in COMPANION_FILES if base_directory else ():
        source = Path(base_directory) / name
        if source.is_file():
            shutil.copyfile(source, Path(directory) / name)


# ----------------------------------------------------------------------------- our shards

TP_CONFIG_NAME = "actcomp_model.json"


def _tp_shard_name(rank: int, size: int) -> str:
    return f"model_tp{rank:02d}-of-{size:02d}.safetensors"


def write_tp_shards(
    directory: str | Path, config: LlamaConfig, shards: list[Mapping[str, torch.Tensor]]
) -> None:
    """Write every TP rank's parameters (model names) as ``model_tpRR-of-TT.safetensors`` with
    ``actcomp_model.json`` (the :class:`LlamaConfig` and the TP size): a checkpoint each rank
    of a run at that TP size loads without reading anyone else's weights."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for rank, shard in enumerate(shards):
        tensors = {name: t.detach().cpu().contiguous() for name, t in shard.items()}
        save_file(tensors, str(directory / _tp_shard_name(rank, len(shards))))
    meta = {"model": config.to_dict(), "tensor_parallel": len(shards)}
    (directory / TP_CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True))


def read_tp_shards(directory: str | Path) -> tuple[LlamaConfig, list[dict[str, torch.Tensor]]]:
    """What :func:`write_tp_shards` wrote: the config and every rank's parameters."""
    from safetensors.torch import load_file

    directory = Path(directory)
    meta = _read_json(directory / TP_CONFIG_NAME)
    config = LlamaConfig.from_dict(meta["model"])
    size = meta["tensor_parallel"]
    shards = [load_file(str(directory / _tp_shard_name(r, size))) for r in range(size)]
    return config, shards


def read_deepspeed_shards(
    checkpoint: str | Path, config: LlamaConfig
) -> list[dict[str, torch.Tensor]]:
    """Every TP rank's parameters from a DeepSpeed checkpoint directory (ZeRO stage 0-2, whose
    ``mp_rank_RR_model_states.pt`` hold the module's full parameters per TP rank; for ZeRO-3
    consolidate first with DeepSpeed's ``zero_to_fp32``). Buffers are dropped."""
    files = sorted(Path(checkpoint).rglob("mp_rank_*_model_states.pt"))
    if not files:
        raise FileNotFoundError(f"no mp_rank_*_model_states.pt under {checkpoint}")
    names = [e.parameter for e in weight_layout(config)]
    shards = []
    for path in files:
        module = torch.load(path, map_location="cpu", weights_only=False)["module"]
        missing = [n for n in names if n not in module]
        if missing:
            raise ValueError(
                f"{path} lacks {missing[:4]}: not a checkpoint of this model config (or a "
                f"ZeRO-3 checkpoint, whose parameters are partitioned)"
            )
        shards.append({n: module[n] for n in names})
    return shards
