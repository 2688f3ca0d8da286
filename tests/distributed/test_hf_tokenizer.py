"""Hugging Face ``tokenizer.json`` next to SentencePiece: loading, ids, round trip, the data
pipeline and a pretraining run with it.

The tokenizer is trained here with the ``tokenizers`` package (byte-level BPE, the Llama-3 /
GPT family's kind) on the standard library's docstrings, with Llama-3's special token names;
nothing is downloaded. References: the text itself (round trip), the ids of the special tokens
in the file, and a SentencePiece tokenizer through the same interface.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from actcomp_dist.data.corpus import stdlib_docstring_documents
from actcomp_dist.data.tokenizer import HuggingFaceTokenizer, load_tokenizer

tokenizers = pytest.importorskip("tokenizers")

SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>"]


@pytest.fixture(scope="module")
def documents() -> list[str]:
    return [text for _, text in stdlib_docstring_documents(max_bytes=150_000)]


@pytest.fixture(scope="module")
def hf_tokenizer_file(tmp_path_factory, documents) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(documents, trainer)
    path = tmp_path_factory.mktemp("hf_tok") / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def test_load_tokenizer_opens_a_tokenizer_json_file_or_directory(hf_tokenizer_file):
    for path in (hf_tokenizer_file, hf_tokenizer_file.parent):
        tok = load_tokenizer(path)
        assert isinstance(tok, HuggingFaceTokenizer)
        assert tok.bos == 0 and tok.eod == 1  # the special tokens come first in the file
        assert tok.vocab_size == 700


def test_round_trip_and_no_special_tokens_added(hf_tokenizer_file, documents):
    tok = load_tokenizer(hf_tokenizer_file)
    texts = [*documents[:20], "  indented\n\tcode = {'a': 1}  # ünïcödé €"]
    for text, ids in zip(texts, tok.encode_batch(texts), strict=True):
        assert ids == tok.encode(text)
        assert tok.eod not in ids and tok.bos not in ids
        assert tok.decode(ids) == text


def test_tokenizer_config_names_the_special_tokens(hf_tokenizer_file, tmp_path):
    directory = tmp_path / "with_config"
    directory.mkdir()
    (directory / "tokenizer.json").write_bytes(hf_tokenizer_file.read_bytes())
    config = {"bos_token": "<|end_of_text|>", "eos_token": {"content": "<|begin_of_text|>"}}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(directory)
    assert (tok.bos, tok.eod) == (1, 0)


def test_bad_tokenizer_files_say_what_would_work(tmp_path):
    garbage = tmp_path / "tok.bin"
    garbage.write_bytes(b"\x00\x01 not a tokenizer")
    with pytest.raises(ValueError, match="neither a SentencePiece .model nor a Hugging Face"):
        load_tokenizer(garbage)
    broken = tmp_path / "tokenizer.json"
    broken.write_text('{"version": "1.0", "model": 3}')
    with pytest.raises(ValueError, match="not a readable Hugging Face tokenizer.json"):
        load_tokenizer(broken)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(FileNotFoundError, match="holds neither tokenizer.json nor"):
        load_tokenizer(tmp_path / "empty_dir")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_tokenizer(tmp_path / "missing.json")


def _pretrain_rank(rank: int, world_size: int, raw: dict) -> list[dict]:
    from actcomp_dist.training.config import run_config_from_dict
    from actcomp_dist.training.trainer import run_pretraining

    return run_pretraining(run_config_from_dict(raw)).history


@pytest.mark.slow
@pytest.mark.distributed
def test_preprocess_and_pretrain_with_a_tokenizer_json(hf_tokenizer_file, documents, tmp_path):
    import math
    from collections import Counter

    from actcomp_dist.data.indexed import write_indexed_dataset
    from actcomp_dist.models import get_model_config
    from actcomp_dist.training.config import apply_overrides
    from tests.helpers.distributed import run_distributed

    tok = load_tokenizer(hf_tokenizer_file)
    prefix = tmp_path / "corpus"
    stats = write_indexed_dataset(documents, tok, str(prefix))
    assert stats.num_documents == len(documents)
    root = Path(__file__).resolve().parents[2]
    raw = apply_overrides(
        json.loads((root / "configs" / "tiny_baseline.json").read_text()),
        [
            f"run_dir={tmp_path / 'run'}",
            f"data.paths={json.dumps([str(prefix)])}",
            f"data.tokenizer={hf_tokenizer_file}",
            "train.steps=3",
            "train.eval_interval=0",
            "checkpoint.at_end=false",
        ],
    )
    (history,) = run_distributed(_pretrain_rank, 1, tmp_path, raw, timeout=180)
    assert [r["step"] for r in history] == [1, 2, 3]
    # An untrained model predicts nearly uniformly over the (padded) vocabulary of V = 768. Its
    # logit of token v is z_v = h . w_v, h the final norm's output (weight 1 at init, so
    # |h|^2 <= H) and w_v ~ N(0, sigma^2) (untied output layer, independent of h): z_v ~ N(0, s^2)
    # with s = sqrt(H) sigma. A token's loss minus log V is log(mean_v exp z_v) - z_label:
    # - log(mean_v exp z_v) lies between mean_v z_v ~ N(0, s^2 / V) (Jensen) and, in expectation,
    #   log E exp z = s^2 / 2;
    # - the batch mean of z_label = sum_v w_v . (sum of the h whose label is v) / N is Gaussian
    #   with variance <= s^2 sum_v n_v^2 / N^2 <= s^2 p_max, p_max the largest share of one
    #   token among the labels (taken from the whole corpus, eod included).
    # Four standard deviations of each plus the mean; the bound is below half of log(2048 / 768),
    # so the check tells the padded 768-row head from the config's embedded_vocab_size 2048.
    config = get_model_config("tiny")
    s = math.sqrt(config.hidden_size) * config.init_method_std
    counts = Counter(i for ids in tok.encode_batch(documents) for i in ids)
    counts[tok.eod] += len(documents)
    p_max = max(counts.values()) / sum(counts.values())
    bound = s**2 / 2 + 4 * s * (math.sqrt(p_max) + 1 / math.sqrt(768))
    assert bound < math.log(2048 / 768) / 2, (bound, p_max)
    assert abs(history[0]["loss"] - math.log(768)) <= bound, (history[0], bound, p_max)
