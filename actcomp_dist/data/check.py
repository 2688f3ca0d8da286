"""Start-up checks of indexed datasets (``PREFIX.bin`` / ``PREFIX.idx``), before any collective.

The ``.idx`` is parsed with megatron-core's own reader (the one its GPT dataset uses), and the
``.bin`` must hold exactly the bytes the index describes (a truncated copy, or a ``.bin`` of
another dataset, is caught here rather than as a read past the end during training). The
largest token id is read from the ``.bin`` in chunks, up to :data:`MAX_SCAN_BYTES`; beyond
that the scan is skipped (and said), as it would cost a full read of the corpus at every start.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAX_SCAN_BYTES = 1 << 30
SCAN_CHUNK_ITEMS = 1 << 24


class DataFileError(ValueError):
    """An indexed dataset's files are unreadable or inconsistent (message names the file)."""


@dataclass(frozen=True)
class IndexedFiles:
    prefix: str
    num_tokens: int
    bin_bytes: int
    max_token_id: int | None  # None: not scanned (larger than MAX_SCAN_BYTES), or no tokens


def check_indexed_dataset(prefix: str, max_scan_bytes: int = MAX_SCAN_BYTES) -> IndexedFiles:
    """Parse ``prefix.idx``, compare it with ``prefix.bin``'s size, scan the largest token id;
    raises :class:`DataFileError` naming the file and what is wrong."""
    from megatron.core.datasets.indexed_dataset import _IndexReader

    idx, bin_file = Path(prefix + ".idx"), Path(prefix + ".bin")
    try:
        index = _IndexReader(str(idx), multimodal=False)
    except (AssertionError, ValueError, KeyError, struct.error, OSError) as err:
        raise DataFileError(
            f"data.paths: {idx} is not a readable megatron-core index ({err or type(err).__name__}); "
            f"rewrite the dataset with tools/preprocess_data.py"
        ) from None
    try:
        lengths, pointers = index.sequence_lengths, index.sequence_pointers
        count = len(lengths)
        dtype, item = index.dtype, index.dtype_size
        expected = int(pointers[-1]) + int(lengths[-1]) * item if count else 0
        num_tokens = int(lengths.sum(dtype=np.int64))
    finally:
        del index
    actual = bin_file.stat().st_size
    if actual != expected:
        raise DataFileError(
            f"data.paths: {bin_file} holds {actual} bytes but {idx.name} describes {expected} "
            f"({count} sequences of {np.dtype(dtype).name}): the .bin is truncated or belongs to "
            f"another dataset"
        )
    max_id = None
    if 0 < actual <= max_scan_bytes:
        tokens = np.memmap(bin_file, dtype=dtype, mode="r")
        max_id = max(
            int(tokens[i : i + SCAN_CHUNK_ITEMS].max())
            for i in range(0, len(tokens), SCAN_CHUNK_ITEMS)
        )
        del tokens
    return IndexedFiles(prefix, num_tokens, actual, max_id)


def check_data_files(prefixes: list[str], vocab_size: int) -> list[str]:
    """Every prefix checked, and its tokens inside the tokenizer's ``vocab_size``; returns the
    prefixes not scanned for their largest token id (too large)."""
    skipped = []
    for prefix in prefixes:
        files = check_indexed_dataset(prefix)
        if files.max_token_id is None:
            if files.bin_bytes:
                skipped.append(prefix)
        elif files.max_token_id >= vocab_size:
            raise DataFileError(
                f"data.paths: {prefix}.bin holds token id {files.max_token_id}, outside the "
                f"vocabulary of data.tokenizer ({vocab_size} ids): the dataset was written with "
                f"another tokenizer"
            )
    return skipped
