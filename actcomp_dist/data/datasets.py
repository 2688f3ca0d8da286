"""Train/validation GPT datasets over indexed data, built by megatron-core.

megatron-core's ``BlendedMegatronDatasetBuilder`` with ``GPTDatasetConfig`` and ``GPTDataset``
does the work, as in Megatron-LM:

- the documents of each ``.bin/.idx`` prefix are split into contiguous train/validation/test
  ranges by the ``split`` weights (``"98,2,0"``); the test range is held out and never returned;
- within a split, documents are shuffled (numpy, ``seed``), concatenated and cut into samples of
  ``seq_length + 1`` tokens that cross document boundaries; ``tokens`` is the first
  ``seq_length``, ``labels`` the last ``seq_length`` (shifted by one), ``loss_mask`` is all ones
  (end-of-document tokens are learned, not masked) and ``position_ids`` count ``0..seq_length-1``;
- as many epochs as ``train_samples`` / ``valid_samples`` need, and the sample order shuffled;
- the three index arrays are cached as ``.npy`` files in ``cache_dir`` under a hash of every
  input (paths, seed, lengths, split, tokenizer model), so later runs load them instead.

No attention mask is materialised (``create_attention_mask=False``): attention is causal via
``scaled_dot_product_attention``, and a ``[1, s, s]`` mask per sample would cost more than the
tokens.

Several prefixes are blended in proportion to ``weights``, by default their token counts.
(megatron-core caps an unweighted blend at one epoch of its parts; explicit weights lift that.)

Processes. The builder must be called on every rank when ``torch.distributed`` is initialised:
megatron-core builds the index cache on rank 0, barriers, then loads it on the other ranks
(``cache_dir`` must therefore be shared by all ranks, as in Megatron-LM). Every rank keeps the
full datasets; the sampler (``sampler.py``) picks each data-parallel rank's samples, so the
tensor-parallel ranks of one replica read identical batches without a broadcast. Without
``torch.distributed`` a lock file in ``cache_dir`` serialises concurrent processes instead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import (
    convert_split_vector_to_split_matrix,
    parse_and_normalize_split,
)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset
from torch.utils.data import Dataset

from actcomp_dist.data.locking import file_lock
from actcomp_dist.data.tokenizer import Tokenizer

_SPLIT_NAMES = ("train", "validation", "test")


def build_gpt_datasets(
    paths: Sequence[str | Path],
    tokenizer: Tokenizer,
    *,
    seq_length: int,
    seed: int,
    split: str = "98,2,0",
    train_samples: int,
    valid_samples: int,
    cache_dir: str | Path,
    weights: Sequence[float] | None = None,
) -> tuple[Dataset, Dataset | None]:
    """Build the train and validation datasets over the indexed datasets ``paths``.

    Args:
        paths: ``.bin/.idx`` path prefixes (a trailing ``.bin`` or ``.idx`` is ignored).
        tokenizer: the tokenizer the data was written with (its ``eod``; its model's hash keys
            the index cache).
        seq_length: tokens per sample; each sample reads ``seq_length + 1`` tokens.
        seed: shuffles documents and samples.
        split: ``"train,validation,test"`` weights over each prefix's documents, e.g.
            ``"98,2,0"``; the test share is held out.
        train_samples: the train dataset holds at least this many samples (more epochs if
            needed; a single path gives at least one full epoch, a blend exactly this many).
        valid_samples: the same for validation; 0 builds none.
        cache_dir: where the index arrays are cached (shared by all ranks).
        weights: blending weights, one per path (default: proportional to token counts).

    Returns:
        ``(train, validation)``; validation is None when ``split`` gives it no share or
        ``valid_samples`` is 0. Items are dicts of ``tokens``, ``labels`` (int64),
        ``loss_mask`` (float32), ``position_ids``, plus ``dataset_id`` for a blend.
    """
    prefixes = [_prefix(path) for path in paths]
    if not prefixes:
        raise ValueError("no data paths given")
    _check_positive_int("seq_length", seq_length)
    _check_positive_int("train_samples", train_samples)
    if not isinstance(valid_samples, int) or valid_samples < 0:
        raise ValueError(f"valid_samples must be an int >= 0, got {valid_samples!r}")
    split_matrix = _split_matrix(split)

    token_counts = []
    for prefix in prefixes:
        documents = IndexedDataset(prefix)
        _check_split_has_documents(prefix, len(documents), split, split_matrix)
        token_counts.append(int(documents.sequence_lengths.sum(dtype="int64")))
    if weights is None:
        weights = token_counts if len(prefixes) > 1 else None
    elif len(weights) != len(prefixes) or any(w <= 0 for w in weights):
        raise ValueError(
            f"weights must be {len(prefixes)} positive numbers (one per path), got {list(weights)}"
        )

    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=(prefixes, None if weights is None else [float(w) for w in weights]),
        split=split,
        path_to_cache=str(cache_dir),
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
    )
    sizes = [train_samples, valid_samples, 0]
    # Every rank builds: samples are chosen per data-parallel rank by the sampler.
    if torch.distributed.is_initialized():
        builder = BlendedMegatronDatasetBuilder(GPTDataset, sizes, _everywhere, config)
        train, valid, _ = builder.build()
    else:
        with file_lock(Path(cache_dir) / ".gpt_index_cache.lock"):
            builder = _SingleProcessBuilder(GPTDataset, sizes, _everywhere, config)
            train, valid, _ = builder.build()
    return train, valid if valid_samples > 0 else None


def _everywhere() -> bool:
    return True


class _SingleProcessBuilder(BlendedMegatronDatasetBuilder):
    """The builder for a process without ``torch.distributed``.

    megatron-core 0.16.1's ``BlendedDataset`` calls ``torch.distributed.get_rank()`` on an index
    cache miss without checking that a process group exists, so blending fails outside a
    distributed run. Here its blending indices are not cached: they are rebuilt in memory
    (compiled helper, milliseconds; megatron-core logs a warning that it cannot save them),
    while the per-prefix GPT indices, the expensive part, still are.
    """

    @staticmethod
    def build_generic_dataset(
        cls: type, is_built_on_rank: Callable[[], bool], synchronize_ranks: bool, *args: Any
    ) -> Any:
        if cls is BlendedDataset:
            datasets, weights, size, config = args
            args = (datasets, weights, size, dataclasses.replace(config, path_to_cache=None))
        return BlendedMegatronDatasetBuilder.build_generic_dataset(
            cls, is_built_on_rank, synchronize_ranks, *args
        )


def _prefix(path: str | Path) -> str:
    prefix = str(path)
    if prefix.endswith((".bin", ".idx")):
        prefix = prefix[: -len(".bin")]
    for suffix in (".bin", ".idx"):
        if not Path(prefix + suffix).is_file():
            raise FileNotFoundError(
                f"indexed dataset file not found: {prefix + suffix} (data paths are .bin/.idx "
                f"prefixes, as written by tools/preprocess_data.py)"
            )
    return prefix


def _split_matrix(split: str) -> list[tuple[float, float] | None]:
    try:
        weights = [float(part) for part in split.split(",")]
    except (AttributeError, ValueError):
        weights = []
    if not 1 <= len(weights) <= 3 or any(w < 0 for w in weights) or weights[0] <= 0:
        raise ValueError(
            f"split must be 'train,validation,test' weights, non-negative with a positive train "
            f"share, e.g. '98,2,0'; got {split!r}"
        )
    return convert_split_vector_to_split_matrix(parse_and_normalize_split(split))


def _check_split_has_documents(
    prefix: str, num_documents: int, split: str, split_matrix: list[tuple[float, float] | None]
) -> None:
    # megatron-core would loop forever building epochs of a split without tokens.
    for name, bounds in zip(_SPLIT_NAMES, split_matrix, strict=True):
        if bounds is None:
            continue
        # The same rounding as BlendedMegatronDatasetBuilder._build_megatron_dataset_splits.
        begin, end = (int(round(bound * float(num_documents))) for bound in bounds)
        if end <= begin:
            raise ValueError(
                f"split {split!r} leaves the {name} split of {prefix} no documents (it has "
                f"{num_documents}); give that split a larger share or zero, or use more documents"
            )


def _check_positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
