"""Start-up checks of indexed datasets (issue 16, item 6): an unreadable ``.idx``, a ``.bin``
that disagrees with it, or token ids outside the tokenizer's vocabulary are refused with one
line naming the file, before any collective.

The datasets are written with megatron-core's ``IndexedDatasetBuilder`` (the writer its GPT
dataset reads back); the references are the token arrays written and their byte counts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

from actcomp_dist.data.check import DataFileError, check_data_files, check_indexed_dataset
from actcomp_dist.training.config import ConfigError, load_run_config, validate_run
from tests.helpers.runs import TINY


def _write(prefix: Path, documents: list[np.ndarray], dtype=np.uint16) -> str:
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=dtype)
    for tokens in documents:
        builder.add_document(torch.from_numpy(tokens.astype(np.int64)), [len(tokens)])
    builder.finalize(str(prefix) + ".idx")
    return str(prefix)


@pytest.fixture
def dataset(tmp_path) -> tuple[str, list[np.ndarray]]:
    rng = np.random.default_rng(0)
    documents = [rng.integers(0, 1000, size=n) for n in (5, 17, 1, 40)]
    documents[2][0] = 1234  # the largest id, in the middle
    return _write(tmp_path / "ds", documents), documents


def test_an_intact_dataset_passes_with_its_token_count_and_largest_id(dataset):
    prefix, documents = dataset
    files = check_indexed_dataset(prefix)
    assert files.num_tokens == sum(len(d) for d in documents) == 63
    assert files.bin_bytes == 63 * 2  # uint16
    assert files.max_token_id == 1234
    assert check_indexed_dataset(prefix, max_scan_bytes=10).max_token_id is None  # not scanned
    assert check_data_files([prefix], vocab_size=1235) == []


def test_a_truncated_or_foreign_bin_is_refused_naming_it(dataset):
    prefix, _ = dataset
    data = Path(prefix + ".bin").read_bytes()
    Path(prefix + ".bin").write_bytes(data[:-2])
    message = f"data.paths: {prefix}.bin holds 124 bytes but ds.idx describes 126 (4 sequences"
    with pytest.raises(DataFileError, match=message.replace("(", r"\(")):
        check_indexed_dataset(prefix)
    Path(prefix + ".bin").write_bytes(data + data)  # another dataset's .bin, longer
    with pytest.raises(DataFileError, match="holds 252 bytes but ds.idx describes 126"):
        check_indexed_dataset(prefix)


@pytest.mark.parametrize(
    "damage",
    [
        lambda b: b"not an index" + b[12:],  # header
        lambda b: b[:20],  # cut inside the counts
        lambda b: b[:-8],  # cut inside the document indices
    ],
)
def test_a_garbage_or_truncated_idx_is_refused_naming_it(dataset, damage):
    prefix, _ = dataset
    idx = Path(prefix + ".idx")
    idx.write_bytes(damage(idx.read_bytes()))
    with pytest.raises(DataFileError, match=f"data.paths: {idx} is not a readable megatron-core"):
        check_indexed_dataset(prefix)


def test_token_ids_outside_the_vocabulary_are_refused(dataset):
    prefix, _ = dataset
    with pytest.raises(DataFileError, match="holds token id 1234, outside the vocabulary of "):
        check_data_files([prefix], vocab_size=1234)


def test_validate_run_checks_the_data_against_the_real_tokenizer(tmp_path, corpus):
    """The test corpus passes with its own tokenizer; a copy with one id beyond
    the vocabulary is refused by validate_run, before any collective."""
    paths = json.loads(corpus[0].split("=", 1)[1])
    config = load_run_config(TINY, [*corpus, f"run_dir={tmp_path / 'run'}"])
    validate_run(config, 1)
    bad = _write(tmp_path / "bad", [np.array([1, 2, 60000])])
    config = load_run_config(
        TINY, [f"data.paths={json.dumps([paths[0], bad])}", corpus[1], f"run_dir={tmp_path}/r"]
    )
    with pytest.raises(ConfigError, match=f"data.paths: {bad}.bin holds token id 60000"):
        validate_run(config, 1)
