"""LLaMA model configs: the `LlamaConfig` dataclass, the named sizes and a closed-form
parameter count.

The published sizes are the LLaMA variants GaLore (arXiv 2403.03507) and CompAct
(arXiv 2410.15352) pretrain on C4: vocabulary 32000 (the LLaMA SentencePiece tokenizer),
sequence length 256, untied input/output embeddings, multi-head attention. The parameter
counts :func:`parameter_count` gives for them (embeddings and output layer included):

=====  =====  ======  ======  =====  ==============  =========
name   d      ffn     layers  heads  parameters      published
=====  =====  ======  ======  =====  ==============  =========
60m    512    1376    8       8      58,073,600      58M
130m   768    2048    12      12     134,105,856     134M
350m   1024   2736    24      16     367,969,280     368M
1b     2048   5461    24      32     1,339,082,752   1.34B
7b     4096   11008   32      32     6,738,415,616   6.74B
=====  =====  ======  ======  =====  ==============  =========

(7b is LLaMA-1/2 7B itself: 6,738,415,616 is Meta's count.) The published 1b FFN width
5461 is odd, so 1b as published builds only at tensor-parallel size 1;
``get_model_config("1b", ffn_hidden_size=5464)`` is the nearest width that shards 2, 4 or 8
ways. ``tiny`` is not a published size: it trains in seconds on a CPU, and every sharded
width (heads, key/value groups, FFN, vocabulary) divides by a tensor-parallel size of 2.

A config describes the *logical* (unsharded) model only; whether it divides by a given
tensor-parallel size is checked when the model is built (:func:`check_tensor_parallel`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from actcomp_dist.config import known_fields

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class LlamaConfig:
    """The shape and initialisation of a LLaMA decoder.

    Fields:
        hidden_size: model width ``d``.
        ffn_hidden_size: SwiGLU inner width (the gate and the up projection each have it).
        num_layers: decoder blocks.
        num_attention_heads: query heads; ``hidden_size`` must be a multiple of it.
        num_query_groups: key/value heads for grouped-query attention; ``None`` means one per
            query head (multi-head attention).
        vocab_size: tokenizer vocabulary (no padding is added).
        seq_length: the training sequence length (the rotary tables cover it).
        rms_norm_eps: epsilon of every RMSNorm.
        rope_theta: rotary base.
        init_method_std: std of the normal init of every linear and embedding weight; the
            two output projections of a block (attention ``proj`` and MLP ``fc2``) use
            ``init_method_std / sqrt(2 * num_layers)`` as megatron-core does.
        tie_embeddings: share the input embedding with the output layer.
        params_dtype: dtype of the parameters (``torch.float32`` / ``bfloat16`` / ``float16``;
            the names are accepted too).
    """

    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_attention_heads: int
    vocab_size: int
    seq_length: int
    num_query_groups: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    init_method_std: float = 0.02
    tie_embeddings: bool = False
    params_dtype: torch.dtype = torch.float32

    def __post_init__(self) -> None:
        for name in (
            "hidden_size",
            "ffn_hidden_size",
            "num_layers",
            "num_attention_heads",
            "vocab_size",
            "seq_length",
        ):
            _check_positive_int(name, getattr(self, name))
        if self.num_query_groups is not None:
            _check_positive_int("num_query_groups", self.num_query_groups)
        for name in ("rms_norm_eps", "rope_theta", "init_method_std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"LlamaConfig.{name}={value!r} must be a positive number")
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"LlamaConfig.tie_embeddings={self.tie_embeddings!r} must be a bool")
        dtype = _DTYPES.get(self.params_dtype, self.params_dtype)
        if dtype not in _DTYPES.values():
            raise ValueError(
                f"LlamaConfig.params_dtype={self.params_dtype!r} is not one of {list(_DTYPES)}"
            )
        object.__setattr__(self, "params_dtype", dtype)
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"LlamaConfig.hidden_size={self.hidden_size} must be a multiple of "
                f"num_attention_heads={self.num_attention_heads}"
            )
        if self.num_attention_heads % self.query_groups != 0:
            raise ValueError(
                f"LlamaConfig.num_query_groups={self.num_query_groups} must divide "
                f"num_attention_heads={self.num_attention_heads}"
            )

    @property
    def query_groups(self) -> int:
        """Key/value heads (``num_attention_heads`` for multi-head attention)."""
        return self.num_query_groups or self.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def heads_per_group(self) -> int:
        """Query heads sharing one key/value head."""
        return self.num_attention_heads // self.query_groups

    def replace(self, **changes: Any) -> LlamaConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["params_dtype"] = str(self.params_dtype).removeprefix("torch.")
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LlamaConfig:
        return cls(**known_fields(cls, values, "model"))


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"LlamaConfig.{name}={value!r} must be an int >= 1")


def check_tensor_parallel(config: LlamaConfig, tp_size: int) -> None:
    """Raise ``ValueError`` naming the field unless every sharded width divides by ``tp_size``.

    Pure (no process group needed), so every rank raises the same error before building.
    """
    sharded = {
        "num_attention_heads": config.num_attention_heads,
        "num_query_groups": config.query_groups,
        "ffn_hidden_size": config.ffn_hidden_size,
        "vocab_size": config.vocab_size,
    }
    for name, value in sharded.items():
        if value % tp_size != 0:
            raise ValueError(
                f"LlamaConfig.{name}={value} is not divisible by the tensor-parallel size "
                f"{tp_size}; each rank must hold an equal share"
            )


def parameter_count(config: LlamaConfig) -> int:
    """Parameters of the logical (unsharded) model, in closed form."""
    d, f, v = config.hidden_size, config.ffn_hidden_size, config.vocab_size
    qkv = d * (config.num_attention_heads + 2 * config.query_groups) * config.head_dim
    proj = config.num_attention_heads * config.head_dim * d
    mlp = 3 * d * f  # gate, up, down
    norms = 2 * d
    block = qkv + proj + mlp + norms
    embeddings = v * d if config.tie_embeddings else 2 * v * d
    return embeddings + config.num_layers * block + d  # + the final norm


_PUBLISHED = dict(vocab_size=32000, seq_length=256)

MODEL_CONFIGS: dict[str, LlamaConfig] = {
    "tiny": LlamaConfig(
        hidden_size=128,
        ffn_hidden_size=352,
        num_layers=2,
        num_attention_heads=4,
        num_query_groups=2,
        vocab_size=2048,
        seq_length=128,
    ),
    "60m": LlamaConfig(
        hidden_size=512, ffn_hidden_size=1376, num_layers=8, num_attention_heads=8, **_PUBLISHED
    ),
    "130m": LlamaConfig(
        hidden_size=768, ffn_hidden_size=2048, num_layers=12, num_attention_heads=12, **_PUBLISHED
    ),
    "350m": LlamaConfig(
        hidden_size=1024, ffn_hidden_size=2736, num_layers=24, num_attention_heads=16, **_PUBLISHED
    ),
    "1b": LlamaConfig(
        hidden_size=2048, ffn_hidden_size=5461, num_layers=24, num_attention_heads=32, **_PUBLISHED
    ),
    "7b": LlamaConfig(
        hidden_size=4096,
        ffn_hidden_size=11008,
        num_layers=32,
        num_attention_heads=32,
        **_PUBLISHED,
    ),
}


def list_model_configs() -> list[str]:
    return list(MODEL_CONFIGS)


def get_model_config(name: str, **overrides: Any) -> LlamaConfig:
    """The named config, with ``overrides`` applied (e.g. ``seq_length=1024``)."""
    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model config {name!r}; available: {list_model_configs()}")
    return MODEL_CONFIGS[name].replace(**overrides) if overrides else MODEL_CONFIGS[name]
