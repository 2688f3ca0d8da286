"""The tokenizer, special-token ids and generation config of a Hugging Face export.

A model directory that ``transformers`` can use end to end needs, beside ``config.json`` and
the weights: the tokenizer files, the special-token ids in ``config.json`` and a
``generation_config.json`` (``generate`` reads its stop and pad ids from there). This module
writes them for the two tokenizer kinds a run can train with (:mod:`actcomp_dist.data.tokenizer`):

Hugging Face ``tokenizer.json``
    Copied as is, with the ``tokenizer_config.json`` found beside it, or else a written one
    naming ``PreTrainedTokenizerFast`` and the bos / eos tokens the run used.

SentencePiece ``.model``
    Copied as ``tokenizer.model`` with a ``tokenizer_config.json`` naming ``LlamaTokenizer``;
    ``transformers`` builds its fast tokenizer from it on load (with the ``sentencepiece`` and
    ``protobuf`` packages, no network). Our tokenizers are trained without SentencePiece's dummy
    prefix (:func:`~actcomp_dist.data.tokenizer.train_tokenizer`), while ``LlamaTokenizer``
    prepends a space by default, so the config sets ``add_prefix_space: false`` (and
    ``legacy: false``); with it, ``transformers`` encodes text to exactly our ids (a test checks
    a corpus). We do not convert to ``tokenizer.json`` here: that conversion is
    ``transformers``' own code (``convert_slow_tokenizer``), which this package does not import
    for exports; shipping the exact ``.model`` keeps the export byte-for-byte the run's
    tokenizer and leaves the conversion to the loader.

Special ids: ``bos_token_id`` = the tokenizer's beginning-of-sequence id (``None`` if it has
none), ``eos_token_id`` = its end-of-document id (what ends every training document and every
fine-tuning response), ``pad_token_id`` = the same end-of-document id, as fine-tuning pads its
samples with it. The tokenizer config does not add bos / eos on its own (``add_bos_token`` /
``add_eos_token`` false): ``tokenizer(text)`` gives the text's ids, as our ``encode`` does.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from actcomp_dist.data.tokenizer import HuggingFaceTokenizer, load_tokenizer

GENERATION_CONFIG = "generation_config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"


def special_token_ids(tokenizer_path: str | Path) -> dict[str, int | None]:
    """``{"bos_token_id", "eos_token_id", "pad_token_id"}`` of a tokenizer (see the module
    docstring), for ``config.json`` and ``generation_config.json``."""
    tokenizer = load_tokenizer(tokenizer_path)
    return {
        "bos_token_id": tokenizer.bos,
        "eos_token_id": tokenizer.eod,
        "pad_token_id": tokenizer.eod,
    }


def _token_names(tokenizer, ids: dict[str, int | None]) -> dict[str, str]:
    """The strings of the special tokens (what ``tokenizer_config.json`` names)."""
    if isinstance(tokenizer, HuggingFaceTokenizer):
        from tokenizers import Tokenizer

        lookup = Tokenizer.from_file(str(tokenizer.model_path)).id_to_token
    else:
        import sentencepiece as spm

        processor = spm.SentencePieceProcessor(model_file=str(tokenizer.model_path))
        lookup = processor.id_to_piece
        unk = processor.unk_id()
    names = {
        key.removesuffix("_id"): lookup(token) for key, token in ids.items() if token is not None
    }
    if not isinstance(tokenizer, HuggingFaceTokenizer) and unk >= 0:
        names["unk_token"] = lookup(unk)
    return names


def write_tokenizer_files(
    directory: str | Path, tokenizer_path: str | Path, *, model_max_length: int
) -> dict[str, int | None]:
    """Write the tokenizer files and ``generation_config.json`` of ``tokenizer_path`` (a
    SentencePiece ``.model``, a ``tokenizer.json`` or a directory holding one) into the export
    ``directory``; returns the special ids (:func:`special_token_ids`) for ``config.json``."""
    directory = Path(directory)
    tokenizer = load_tokenizer(tokenizer_path)
    ids = special_token_ids(tokenizer.model_path)
    source = Path(tokenizer.model_path)
    config: dict[str, Any] = {
        **_token_names(tokenizer, ids),
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
    }
    if isinstance(tokenizer, HuggingFaceTokenizer):
        shutil.copyfile(source, directory / "tokenizer.json")
        beside = source.parent / TOKENIZER_CONFIG
        if beside.is_file():
            # The original's settings (chat template, added tokens, ...) win over ours.
            config.update(json.loads(beside.read_text()))
            if (source.parent / SPECIAL_TOKENS_MAP).is_file():
                shutil.copyfile(source.parent / SPECIAL_TOKENS_MAP, directory / SPECIAL_TOKENS_MAP)
        else:
            config["tokenizer_class"] = "PreTrainedTokenizerFast"
    else:
        shutil.copyfile(source, directory / "tokenizer.model")
        config.update(
            tokenizer_class="LlamaTokenizer",
            add_prefix_space=False,
            legacy=False,
            add_bos_token=False,
            add_eos_token=False,
        )
    (directory / TOKENIZER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    write_generation_config(directory, ids)
    return ids


def write_generation_config(directory: str | Path, ids: dict[str, int | None]) -> None:
    """``generation_config.json`` with the special ids (greedy decoding, transformers'
    default)."""
    config = {key: value for key, value in ids.items() if value is not None}
    (Path(directory) / GENERATION_CONFIG).write_text(
        json.dumps(config, indent=2, sort_keys=True) + "\n"
    )
