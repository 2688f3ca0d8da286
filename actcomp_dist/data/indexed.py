"""Writing megatron-core indexed datasets (``PREFIX.bin`` / ``PREFIX.idx``).

Every document is tokenised, followed by the tokenizer's end-of-document id, and added as one
sequence and one document with megatron-core's ``IndexedDatasetBuilder``, the writer its GPT
dataset reads back. Token ids are stored as ``uint16`` when the vocabulary allows it
(``DType.optimal_dtype``), ``int32`` otherwise.

The files are written under temporary names and renamed into place only when complete, so an
interrupted or failed run never leaves (or overwrites with) a truncated dataset.

Long inputs report progress (documents, tokens, documents per second) to stderr every few
seconds; documents are encoded in batches, which SentencePiece spreads over its threads.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TextIO

from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

from actcomp_dist.data.documents import iter_documents
from actcomp_dist.data.tokenizer import Tokenizer, load_tokenizer

ENCODE_BATCH_DOCUMENTS = 512


@dataclass(frozen=True)
class IndexedDatasetStats:
    """What :func:`write_indexed_dataset` wrote."""

    prefix: str
    num_documents: int
    num_tokens: int


def write_indexed_dataset(
    documents: Iterable[str],
    tokenizer: Tokenizer,
    output_prefix: str | Path,
    *,
    progress_every_s: float = 5.0,
    progress_stream: TextIO | None = None,
) -> IndexedDatasetStats:
    """Tokenise ``documents`` (each + eod) into ``output_prefix``.bin/.idx.

    Args:
        documents: one string per document.
        tokenizer: encodes the documents; its ``eod`` ends each one.
        output_prefix: the dataset path without extension; parent directories are created.
        progress_every_s: seconds between progress lines.
        progress_stream: where progress goes (default: ``sys.stderr``).

    Returns:
        the counts of documents and tokens (eod included) written.
    """
    output_prefix = Path(output_prefix)
    output_prefix.parent.mkdir(parents=True, exist_ok=True)
    final_bin = output_prefix.with_name(output_prefix.name + ".bin")
    final_idx = output_prefix.with_name(output_prefix.name + ".idx")
    partial = output_prefix.with_name(f".{output_prefix.name}.partial-{os.getpid()}")
    partial_bin = partial.with_name(partial.name + ".bin")
    partial_idx = partial.with_name(partial.name + ".idx")
    progress = _Progress(progress_every_s, progress_stream or sys.stderr)
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    try:
        builder = IndexedDatasetBuilder(str(partial_bin), dtype=dtype)
        for batch in _batches(documents, ENCODE_BATCH_DOCUMENTS):
            for token_ids in tokenizer.encode_batch(batch):
                token_ids.append(tokenizer.eod)
                builder.add_document(token_ids, [len(token_ids)])
                progress.update(len(token_ids))
        builder.finalize(str(partial_idx))
        if progress.documents == 0:
            raise ValueError(f"no documents to write to {output_prefix}: every input was empty")
        os.replace(partial_bin, final_bin)
        os.replace(partial_idx, final_idx)
    finally:
        partial_bin.unlink(missing_ok=True)
        partial_idx.unlink(missing_ok=True)
    progress.finish()
    return IndexedDatasetStats(str(output_prefix), progress.documents, progress.tokens)


def preprocess_files(
    input_paths: Sequence[str | Path],
    tokenizer_model: str | Path,
    output_prefix: str | Path,
    *,
    json_key: str = "text",
    progress_every_s: float = 5.0,
) -> IndexedDatasetStats:
    """Text or JSONL files (see :mod:`.documents`) -> indexed dataset ``output_prefix``.bin/.idx.

    Missing inputs or tokenizer raise ``FileNotFoundError`` before anything is written.
    """
    tokenizer = load_tokenizer(tokenizer_model)
    documents = iter_documents(input_paths, json_key=json_key)
    return write_indexed_dataset(
        documents, tokenizer, output_prefix, progress_every_s=progress_every_s
    )


def _batches(items: Iterable[str], size: int) -> Iterator[list[str]]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


class _Progress:
    """Counts documents and tokens; prints a rate line at most every ``every_s`` seconds."""

    def __init__(self, every_s: float, stream: TextIO) -> None:
        self.every_s = every_s
        self.stream = stream
        self.documents = 0
        self.tokens = 0
        self.start = time.monotonic()
        self.last_report = self.start

    def update(self, tokens: int) -> None:
        self.documents += 1
        self.tokens += tokens
        now = time.monotonic()
        if now - self.last_report >= self.every_s:
            self.last_report = now
            self._report(now)

    def finish(self) -> None:
        self._report(time.monotonic())

    def _report(self, now: float) -> None:
        elapsed = max(now - self.start, 1e-9)
        print(
            f"[preprocess] {self.documents:,} documents, {self.tokens:,} tokens, "
            f"{self.documents / elapsed:,.0f} docs/s, {elapsed:.1f} s",
            file=self.stream,
            flush=True,
        )
