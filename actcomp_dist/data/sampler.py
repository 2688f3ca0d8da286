"""The data position: which samples each data-parallel rank reads, and resuming from it.

The GPT dataset is already shuffled (``datasets.py``), so the global sample order is simply
``0, 1, 2, ...``. Each step of the iteration takes the next ``micro_batch_size * dp_size``
global samples and data-parallel rank ``r`` reads the ``r``-th run of ``micro_batch_size`` of
them, as Megatron-LM's ``MegatronPretrainingSampler`` does. The whole data position is therefore
one integer, ``consumed_samples``: the number of global samples all ranks have consumed
(``optimizer steps * global batch size``). A checkpoint saves it; a run resumed from it yields
exactly the micro-batches the uninterrupted run would have yielded next. Because it counts global
samples, the position stays meaningful if a run resumes with another data-parallel size.

Iteration stops before a step that the dataset cannot fill completely, so every rank always
gets the same number of full micro-batches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sized

from torch.utils.data import DataLoader, Dataset


class PretrainingSampler:
    """Batch sampler: this rank's micro-batches of sample indices, from ``consumed_samples`` on.

    Args:
        total_samples: samples in the dataset (``len(dataset)``).
        consumed_samples: global samples already consumed by all ranks (the data position).
        micro_batch_size: samples per micro-batch on one rank.
        dp_rank: this rank's index in the data-parallel group.
        dp_size: the data-parallel group size.
    """

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        dp_rank: int,
        dp_size: int,
    ) -> None:
        for name, value, minimum in (
            ("total_samples", total_samples, 0),
            ("consumed_samples", consumed_samples, 0),
            ("micro_batch_size", micro_batch_size, 1),
            ("dp_size", dp_size, 1),
        ):
            if not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
        if not isinstance(dp_rank, int) or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank must be in [0, {dp_size}), got {dp_rank!r}")
        if consumed_samples > total_samples:
            raise ValueError(
                f"consumed_samples={consumed_samples} is beyond the dataset's {total_samples} "
                f"samples; build the dataset with more train samples"
            )
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size

    @property
    def _global_step_size(self) -> int:
        return self.micro_batch_size * self.dp_size

    def __len__(self) -> int:
        return (self.total_samples - self.consumed_samples) // self._global_step_size

    def __iter__(self) -> Iterator[list[int]]:
        first = self.consumed_samples + self.dp_rank * self.micro_batch_size
        for step in range(len(self)):
            start = first + step * self._global_step_size
            yield list(range(start, start + self.micro_batch_size))


def build_data_loader(
    dataset: Dataset,
    *,
    micro_batch_size: int,
    consumed_samples: int,
    dp_rank: int,
    dp_size: int,
    num_workers: int = 0,
) -> DataLoader:
    """A ``DataLoader`` of this rank's micro-batches from data position ``consumed_samples``.

    Batches are dicts of stacked tensors (``tokens``, ``labels``, ``loss_mask``, ...) of leading
    dimension ``micro_batch_size``. Worker processes change nothing in the order.
    """
    if not isinstance(dataset, Sized):
        raise TypeError(f"dataset must have a length, got {type(dataset).__name__}")
    sampler = PretrainingSampler(
        total_samples=len(dataset),
        consumed_samples=consumed_samples,
        micro_batch_size=micro_batch_size,
        dp_rank=dp_rank,
        dp_size=dp_size,
    )
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
    )
