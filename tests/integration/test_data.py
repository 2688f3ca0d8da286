"""Tests of the data pipeline: actcomp_dist.data and tools/{train_tokenizer,preprocess_data}.py.

References: the tokenizer's own encoding of each document (indexed datasets), the token stream
rebuilt from the documents in megatron-core's document order (GPT samples), an uninterrupted
iteration (resumed data position), a second independent build (determinism), the in-process
library result (the command-line tools), a single-process build (the 2-rank gloo run).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import runpy
import subprocess
import sys
import sysconfig
import threading
import time
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset

from actcomp_dist.data import corpus
from actcomp_dist.data.corpus import ensure_embedded_corpus
from actcomp_dist.data.datasets import build_gpt_datasets
from actcomp_dist.data.documents import iter_documents
from actcomp_dist.data.indexed import preprocess_files, write_indexed_dataset
from actcomp_dist.data.sampler import PretrainingSampler, build_data_loader
from actcomp_dist.data.tokenizer import SentencePieceTokenizer, train_tokenizer
from tests.helpers.distributed import run_distributed
from tests.helpers.documents import VOCAB_SIZE, generated_documents

REPO_ROOT = Path(__file__).resolve().parents[2]
SEQ_LENGTH = 32
NUM_DOCUMENTS = 400
# Small embedded corpus for tests: ~40 modules, enough for a 512-piece vocabulary, < 1 s.
SMALL_CORPUS = {"vocab_size": VOCAB_SIZE, "max_bytes": 100_000}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def documents() -> list[str]:
    return generated_documents(NUM_DOCUMENTS, seed=0)


@pytest.fixture(scope="module")
def tokenizer_model(tmp_path_factory: pytest.TempPathFactory, documents: list[str]) -> Path:
    return train_tokenizer(documents, tmp_path_factory.mktemp("tokenizer") / "tok", VOCAB_SIZE)


@pytest.fixture(scope="module")
def tokenizer(tokenizer_model: Path) -> SentencePieceTokenizer:
    return SentencePieceTokenizer(tokenizer_model)


@pytest.fixture(scope="module")
def data_prefix(tmp_path_factory: pytest.TempPathFactory, documents: list[str], tokenizer) -> str:
    prefix = tmp_path_factory.mktemp("indexed") / "documents"
    write_indexed_dataset(documents, tokenizer, prefix)
    return str(prefix)


def gpt_datasets(prefix: str, tokenizer, cache_dir: Path, **overrides):
    options = {
        "seq_length": SEQ_LENGTH,
        "seed": 1234,
        "split": "80,20,0",
        "train_samples": 200,
        "valid_samples": 20,
        "cache_dir": cache_dir,
    }
    options.update(overrides)
    return build_gpt_datasets([prefix], tokenizer, **options)


# ---------------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip(tokenizer: SentencePieceTokenizer) -> None:
    texts = [
        "The model returns a gradient for every layer.",
        "  indented\n\tline with a tab\n\nnew paragraph  ",
        "Unseen characters: é, ß, 中文, 🙂 and digits 12345.",
        "windows\r\nline",
        "",
    ]
    for text in texts:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.encode_batch(texts) == [tokenizer.encode(text) for text in texts]
    # Frequent training words were merged into single pieces, a newline is one piece.
    assert len(tokenizer.encode(" gradient")) == 1
    assert len(tokenizer.encode("\n")) == 1
    assert tokenizer.vocab_size == VOCAB_SIZE
    assert tokenizer.eod == 2


def test_tokenizer_training_is_deterministic(tmp_path: Path, documents: list[str]) -> None:
    first = train_tokenizer(documents, tmp_path / "a" / "tok", VOCAB_SIZE)
    second = train_tokenizer(documents, tmp_path / "b" / "tok", VOCAB_SIZE)
    assert first.read_bytes() == second.read_bytes()
    assert (tmp_path / "a" / "tok.vocab").read_bytes() == (
        tmp_path / "b" / "tok.vocab"
    ).read_bytes()


def test_tokenizer_errors(tmp_path: Path, documents: list[str]) -> None:
    with pytest.raises(ValueError, match="vocabulary"):
        train_tokenizer(documents[:3], tmp_path / "tok", 100_000)
    with pytest.raises(ValueError, match="no text"):
        train_tokenizer(["", "  \n"], tmp_path / "tok", VOCAB_SIZE)
    with pytest.raises(FileNotFoundError, match="missing.model"):
        SentencePieceTokenizer(tmp_path / "missing.model")
    assert not (tmp_path / "tok.model").exists()


# ---------------------------------------------------------------------- documents, indexed data


def test_preprocess_jsonl_and_text(tmp_path: Path, tokenizer, tokenizer_model: Path) -> None:
    jsonl_documents = ["First document.\nWith two lines.", "Second: é 🙂", "  third\tone"]
    jsonl = tmp_path / "docs.jsonl"
    records = [json.dumps({"text": text, "id": i}) for i, text in enumerate(jsonl_documents)]
    records.insert(1, "")  # a blank line is skipped
    records.append(json.dumps({"text": "   "}))  # so is an empty document
    jsonl.write_text("\n".join(records) + "\n", encoding="utf-8")
    text_documents = ["A paragraph\n  spanning two lines.", "Another one.", "Last one."]
    text_file = tmp_path / "notes.txt"
    text_file.write_text(
        "\n\n" + text_documents[0] + "\n\n\n" + text_documents[1] + "\n \t\n" + text_documents[2],
        encoding="utf-8",
    )
    expected = jsonl_documents + text_documents

    stats = preprocess_files([jsonl, text_file], tokenizer_model, tmp_path / "out" / "data")

    dataset = IndexedDataset(str(tmp_path / "out" / "data"))
    assert len(dataset) == len(expected) == stats.num_documents
    for index, document in enumerate(expected):
        assert dataset[index].tolist() == tokenizer.encode(document) + [tokenizer.eod]
    assert list(dataset.document_indices) == list(range(len(expected) + 1))
    assert stats.num_tokens == int(dataset.sequence_lengths.sum())
    assert dataset[0].dtype == np.uint16


def test_preprocess_errors_leave_existing_output(tmp_path: Path, tokenizer_model: Path) -> None:
    good = tmp_path / "good.txt"
    good.write_text("Some text.\n", encoding="utf-8")
    prefix = tmp_path / "data"
    preprocess_files([good], tokenizer_model, prefix)
    before = {suffix: sha256(Path(f"{prefix}.{suffix}")) for suffix in ("bin", "idx")}

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"content": "no text key"}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: .*'text'"):
        preprocess_files([good, bad], tokenizer_model, prefix)
    with pytest.raises(FileNotFoundError, match="absent.txt"):
        preprocess_files([good, tmp_path / "absent.txt"], tokenizer_model, prefix)
    with pytest.raises(FileNotFoundError, match="absent.model"):
        preprocess_files([good], tmp_path / "absent.model", prefix)

    after = {suffix: sha256(Path(f"{prefix}.{suffix}")) for suffix in ("bin", "idx")}
    assert after == before
    assert sorted(path.name for path in tmp_path.iterdir()) == [
        "bad.jsonl",
        "data.bin",
        "data.idx",
        "good.txt",
    ]


# -------------------------------------------------------------------------------- GPT datasets


def test_gpt_samples_are_windows_of_the_document_stream(
    tmp_path: Path, data_prefix: str, tokenizer
) -> None:
    train_samples = 1500  # more than one epoch of the train split
    train, valid = gpt_datasets(data_prefix, tokenizer, tmp_path, train_samples=train_samples)
    documents = IndexedDataset(data_prefix)
    for dataset in (train, valid):
        stream = np.concatenate([documents[int(d)] for d in dataset.document_index])
        # The shuffle is a permutation of the samples, every document appears as often.
        assert sorted(dataset.shuffle_index.tolist()) == list(range(len(dataset)))
        counts = np.bincount(dataset.document_index)[dataset.indices]
        assert counts.min() == counts.max() >= 1
        for index in range(0, len(dataset), 7):
            sample = dataset[index]
            assert sample["tokens"].shape == sample["labels"].shape == (SEQ_LENGTH,)
            assert torch.equal(sample["tokens"][1:], sample["labels"][:-1])
            assert torch.equal(sample["loss_mask"], torch.ones(SEQ_LENGTH))
            start = int(dataset.shuffle_index[index]) * SEQ_LENGTH
            window = torch.from_numpy(stream[start : start + SEQ_LENGTH + 1].astype(np.int64))
            assert torch.equal(torch.cat([sample["tokens"], sample["labels"][-1:]]), window)
    assert len(train) >= train_samples
    assert np.bincount(train.document_index)[train.indices].min() >= 2


def test_train_and_valid_are_disjoint_splits(tmp_path: Path, data_prefix: str, tokenizer) -> None:
    train, valid = gpt_datasets(data_prefix, tokenizer, tmp_path)
    train_documents, valid_documents = set(train.indices.tolist()), set(valid.indices.tolist())
    assert not train_documents & valid_documents
    assert train_documents | valid_documents == set(range(NUM_DOCUMENTS))
    assert len(valid_documents) == NUM_DOCUMENTS // 5
    assert set(train.document_index.tolist()) == train_documents
    assert set(valid.document_index.tolist()) == valid_documents


def test_seed_fixes_the_order(tmp_path: Path, data_prefix: str, tokenizer) -> None:
    def first_samples(seed: int, cache: str) -> list[torch.Tensor]:
        train, _ = gpt_datasets(data_prefix, tokenizer, tmp_path / cache, seed=seed)
        return [train[index]["tokens"] for index in range(16)]

    reference = first_samples(1, "a")
    same = first_samples(1, "b")  # a separate cache: rebuilt, not loaded
    other = first_samples(2, "c")
    assert all(torch.equal(x, y) for x, y in zip(reference, same, strict=True))
    assert sum(torch.equal(x, y) for x, y in zip(reference, other, strict=True)) < 4


def test_blend_of_two_prefixes_without_torch_distributed(
    tmp_path: Path, data_prefix: str, tokenizer
) -> None:
    train, valid = build_gpt_datasets(
        [data_prefix, data_prefix + ".bin"],
        tokenizer,
        seq_length=SEQ_LENGTH,
        seed=5,
        split="90,10,0",
        train_samples=400,
        valid_samples=40,
        cache_dir=tmp_path,
    )
    assert len(train) == 400 and len(valid) == 40
    # Equal token counts, so equal weights: the blend alternates, within one sample.
    shares = np.bincount([int(train[index]["dataset_id"]) for index in range(len(train))])
    assert abs(int(shares[0]) - int(shares[1])) <= 1


def test_dataset_errors(tmp_path: Path, data_prefix: str, tokenizer) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere.idx|nowhere.bin"):
        gpt_datasets(str(tmp_path / "nowhere"), tokenizer, tmp_path)
    with pytest.raises(ValueError, match="validation split .* no documents"):
        gpt_datasets(data_prefix, tokenizer, tmp_path, split="99.9,0.1,0")
    with pytest.raises(ValueError, match="split must be"):
        gpt_datasets(data_prefix, tokenizer, tmp_path, split="train=98")
    train, valid = gpt_datasets(data_prefix, tokenizer, tmp_path, split="100,0,0")
    assert valid is None and len(train) >= 200


# ------------------------------------------------------------------------ data position/sampler


def test_sampler_resume_and_data_parallel_ranks() -> None:
    total, micro_batch, dp_size = 203, 4, 3
    step = micro_batch * dp_size
    full = [list(PretrainingSampler(total, 0, micro_batch, rank, dp_size)) for rank in range(3)]
    for rank in range(dp_size):
        assert len(full[rank]) == total // step
        for index, batch in enumerate(full[rank]):  # closed form
            first = index * step + rank * micro_batch
            assert batch == list(range(first, first + micro_batch))
        for consumed_steps in (1, 5, total // step):
            resumed = PretrainingSampler(total, consumed_steps * step, micro_batch, rank, dp_size)
            assert list(resumed) == full[rank][consumed_steps:]
    # Ranks are disjoint and, step by step, cover the global order without gaps.
    for index in range(total // step):
        step_samples = sorted(sample for rank in range(3) for sample in full[rank][index])
        assert step_samples == list(range(index * step, (index + 1) * step))
    # The position counts global samples: resuming on one rank continues the same order.
    single = PretrainingSampler(total, 5 * step, micro_batch * dp_size, 0, 1)
    assert next(iter(single)) == [s for rank in range(3) for s in full[rank][5]]
    with pytest.raises(ValueError, match="dp_rank"):
        PretrainingSampler(total, 0, micro_batch, 3, dp_size)
    with pytest.raises(ValueError, match="beyond"):
        PretrainingSampler(total, total + 1, micro_batch, 0, dp_size)


def test_data_loader_resumes_at_the_same_batch(tmp_path: Path, data_prefix: str, tokenizer) -> None:
    train, _ = gpt_datasets(data_prefix, tokenizer, tmp_path)
    micro_batch, dp_size = 2, 2
    for rank in range(dp_size):
        loader = build_data_loader(
            train, micro_batch_size=micro_batch, consumed_samples=0, dp_rank=rank, dp_size=dp_size
        )
        uninterrupted = [batch["tokens"] for batch in loader]
        resumed_loader = build_data_loader(
            train, micro_batch_size=micro_batch, consumed_samples=12, dp_rank=rank, dp_size=2
        )
        resumed = [batch["tokens"] for batch in resumed_loader]
        assert uninterrupted[0].shape == (micro_batch, SEQ_LENGTH)
        assert len(resumed) == len(uninterrupted) - 3
        assert all(torch.equal(x, y) for x, y in zip(resumed, uninterrupted[3:], strict=True))
        expected_first = torch.stack([train[12 + rank * micro_batch + i]["tokens"] for i in (0, 1)])
        assert torch.equal(resumed[0], expected_first)


# ---------------------------------------------------------------------------- embedded corpus


def test_embedded_corpus_is_cached_and_deterministic(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built = ensure_embedded_corpus(tmp_path / "a", **SMALL_CORPUS)
    files = sorted(path.name for path in built.directory.iterdir())
    assert files == [
        "corpus.bin",
        "corpus.idx",
        "corpus.jsonl",
        "manifest.json",
        "tokenizer.model",
        "tokenizer.vocab",
    ]
    mtimes = {name: (built.directory / name).stat().st_mtime_ns for name in files}

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the cached corpus was rebuilt")

    with monkeypatch.context() as patch:
        patch.setattr(corpus, "_build_corpus_directory", no_rebuild)
        assert ensure_embedded_corpus(tmp_path / "a", **SMALL_CORPUS) == built
    assert {name: (built.directory / name).stat().st_mtime_ns for name in files} == mtimes

    again = ensure_embedded_corpus(tmp_path / "b", **SMALL_CORPUS)
    for name in files:
        assert sha256(again.directory / name) == sha256(built.directory / name), name

    # Content: real docstrings of the named modules, tokenised document by document.
    records = [json.loads(line) for line in (built.directory / "corpus.jsonl").open()]
    tokenizer = SentencePieceTokenizer(built.tokenizer_model)
    dataset = IndexedDataset(built.data_prefix)
    assert len(dataset) == len(records) == built.num_documents
    for index, record in enumerate(records):
        assert dataset[index].tolist() == tokenizer.encode(record["text"]) + [tokenizer.eod]
    checked = 0
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for record in records:
        module_path = stdlib.joinpath(*record["module"].split("."))
        source = module_path.with_suffix(".py")
        if not source.is_file():
            source = module_path / "__init__.py"
        module_docstring = ast.get_docstring(ast.parse(source.read_bytes()))
        if module_docstring:
            assert record["text"].startswith(module_docstring)
            checked += 1
    assert checked >= 5
    assert built.num_tokens == int(dataset.sequence_lengths.sum())
    assert sum(len(r["text"].encode()) for r in records) >= SMALL_CORPUS["max_bytes"]


@pytest.mark.slow
def test_default_embedded_corpus_has_thousands_of_sequences(tmp_path: Path) -> None:
    built = ensure_embedded_corpus(tmp_path)
    tokenizer = SentencePieceTokenizer(built.tokenizer_model)
    assert tokenizer.vocab_size == corpus.DEFAULT_VOCAB_SIZE
    assert built.num_tokens // (128 + 1) >= 2000
    text = "Return a new list containing all items from the iterable in ascending order."
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert len(tokenizer.encode(text)) <= 20  # English words are single pieces


# ---------------------------------------------------------------------------------------- tools


def run_tool(script: str, *args: str | Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools" / script), *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        cwd=REPO_ROOT,
    )


def test_tools_match_the_library(tmp_path: Path) -> None:
    documents = generated_documents(60, seed=7)
    text_file = tmp_path / "a.txt"
    text_file.write_text("\n\n".join(documents[:30]), encoding="utf-8")
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text("".join(json.dumps({"text": d}) + "\n" for d in documents[30:]))
    inputs = [text_file, jsonl]

    result = run_tool(
        "train_tokenizer.py",
        "--input",
        *inputs,
        "--vocab-size",
        320,
        "--output",
        tmp_path / "tool" / "tok",
    )
    assert result.returncode == 0, result.stderr
    reference_model = train_tokenizer(iter_documents(inputs), tmp_path / "lib" / "tok", 320)
    assert (tmp_path / "tool" / "tok.model").read_bytes() == reference_model.read_bytes()
    assert (tmp_path / "tool" / "tok.vocab").read_bytes() == (
        tmp_path / "lib" / "tok.vocab"
    ).read_bytes()

    result = run_tool(
        "preprocess_data.py",
        "--input",
        *inputs,
        "--tokenizer",
        reference_model,
        "--output-prefix",
        tmp_path / "tool" / "data",
    )
    assert result.returncode == 0, result.stderr
    assert "docs/s" in result.stderr
    preprocess_files(inputs, reference_model, tmp_path / "lib" / "data")
    for suffix in ("bin", "idx"):
        assert sha256(tmp_path / "tool" / f"data.{suffix}") == sha256(
            tmp_path / "lib" / f"data.{suffix}"
        )


@pytest.mark.parametrize("script", ["train_tokenizer.py", "preprocess_data.py"])
def test_tools_report_user_errors_in_one_line(
    tmp_path: Path, tokenizer_model: Path, script: str, capsys: pytest.CaptureFixture
) -> None:
    main = runpy.run_path(str(REPO_ROOT / "tools" / script))["main"]
    argv = ["--input", str(tmp_path / "missing.jsonl")]
    if script == "train_tokenizer.py":
        argv += ["--vocab-size", "320", "--output", str(tmp_path / "tok")]
    else:
        argv += ["--tokenizer", str(tokenizer_model), "--output-prefix", str(tmp_path / "data")]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 1
    error = capsys.readouterr().err
    assert error.endswith(f": error: input file not found: {argv[1]}\n")
    assert error.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------- several processes


def _embedded_gpt_batches(cache_dir: Path, rank: int, dp_size: int) -> list[list[list[int]]]:
    built = ensure_embedded_corpus(cache_dir, **SMALL_CORPUS)
    tokenizer = SentencePieceTokenizer(built.tokenizer_model)
    train, _ = build_gpt_datasets(
        [built.data_prefix],
        tokenizer,
        seq_length=64,
        seed=3,
        split="90,10,0",
        train_samples=64,
        valid_samples=8,
        cache_dir=cache_dir / "index",
    )
    loader = build_data_loader(
        train, micro_batch_size=2, consumed_samples=4, dp_rank=rank, dp_size=dp_size
    )
    return [batch["tokens"].tolist() for batch in islice(loader, 3)]


def _build_concurrently(rank: int, world_size: int, workdir: Path) -> dict:
    """One rank: count its builds of the embedded corpus, read its first batches."""
    builds = []
    original = corpus._build_corpus_directory

    def counting_build(*args, **kwargs):
        builds.append(rank)
        return original(*args, **kwargs)

    corpus._build_corpus_directory = counting_build
    torch.distributed.barrier()  # start together
    batches = _embedded_gpt_batches(workdir / "cache", rank, world_size)
    directory = ensure_embedded_corpus(workdir / "cache", **SMALL_CORPUS).directory
    hashes = {path.name: sha256(path) for path in sorted(directory.iterdir())}
    return {"builds": len(builds), "hashes": hashes, "batches": batches}


@pytest.mark.distributed
def test_two_gloo_ranks_build_the_embedded_corpus_once(tmp_path: Path) -> None:
    results = run_distributed(_build_concurrently, 2, tmp_path, tmp_path, timeout=120)

    assert sum(result["builds"] for result in results) == 1
    reference_dir = ensure_embedded_corpus(tmp_path / "reference", **SMALL_CORPUS).directory
    reference_hashes = {path.name: sha256(path) for path in sorted(reference_dir.iterdir())}
    assert results[0]["hashes"] == results[1]["hashes"] == reference_hashes
    for rank, result in enumerate(results):
        assert result["batches"] == _embedded_gpt_batches(tmp_path / "reference", rank, 2)
    assert results[0]["batches"] != results[1]["batches"]
    assert not [path for path in (tmp_path / "cache").iterdir() if ".building-" in path.name]


def test_concurrent_builders_without_torch_distributed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a process group the lock files alone serialise the builders.

    ``flock`` excludes other open files, so two threads contend exactly like two processes.
    """
    builds = []
    original = corpus._build_corpus_directory

    def slow_counting_build(*args, **kwargs):
        builds.append(1)
        time.sleep(0.5)  # the other thread arrives while this one builds
        return original(*args, **kwargs)

    monkeypatch.setattr(corpus, "_build_corpus_directory", slow_counting_build)
    results: list = [None, None]

    def rank(index: int) -> None:
        results[index] = _embedded_gpt_batches(tmp_path / "cache", index, 2)

    threads = [threading.Thread(target=rank, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads)
    assert len(builds) == 1
    monkeypatch.undo()
    for index in range(2):
        assert results[index] == _embedded_gpt_batches(tmp_path / "reference", index, 2)
