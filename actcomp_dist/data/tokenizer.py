"""Tokenizers: SentencePiece (training one on text) and Hugging Face ``tokenizer.json``.

:func:`load_tokenizer` opens either kind from a path (``data.tokenizer``,
``tools/preprocess_data.py --tokenizer``): a SentencePiece ``.model`` (LLaMA 1/2, the tokenizer
:func:`train_tokenizer` writes) or a Hugging Face ``tokenizer.json`` (LLaMA 3, Mistral, Qwen, ...;
read with the ``tokenizers`` package), or a directory holding one of them. Both wrappers offer
the same small interface: ``vocab_size``, ``bos``, ``eod``, ``encode``, ``encode_batch``,
``decode`` and ``unique_identifiers``.

Training choices, all made so that ``decode(encode(text)) == text`` for any text:

- A BPE model (the LLaMA tokenizer family) with digits split and **byte fallback**: a character
  outside the vocabulary becomes its UTF-8 bytes, never ``<unk>``.
- **Identity normalisation**, whitespace kept as is and **no dummy prefix**: no NFKC folding, no
  collapsing of spaces, so indentation (code and doc examples) survives. Without a dummy prefix a
  word at the start of a document and one after a newline are tokenised alike in training and
  in encoding.
- ``"\\n"`` is a user-defined piece. Training sentences are paragraphs (blank-line separated,
  inner newlines kept) rather than lines, so the model learns words as they follow a newline.
- Special ids: ``<unk>`` = 0, ``<s>`` = 1, ``</s>`` = 2. ``</s>`` is the end-of-document token
  (``eod``) the indexed dataset appends to every document. There is no pad token, so
  megatron-core's GPT dataset never mistakes a real token for padding.
- **Deterministic files**: SentencePiece stores its trainer options, the output path and the
  thread count among them, in the ``.model`` file. The model is therefore written through
  ``model_writer`` (no path inside) with a fixed default thread count (the thread count does not
  change the learned pieces, only those stored bytes), and the sentence sampler is seeded: the
  same input gives a byte-identical ``.model``.

:class:`SentencePieceTokenizer` is duck-typed to what megatron-core's ``GPTDatasetConfig`` and
``GPTDataset`` read from a tokenizer: ``vocab_size``, ``eod`` and ``unique_identifiers`` (hashed
into the dataset's index-cache key, so a different tokenizer never reuses stale indices).
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import sentencepiece as spm

HF_TOKENIZER_FILE = "tokenizer.json"
SENTENCEPIECE_FILE = "tokenizer.model"
# Hugging Face tokenizers name their special tokens freely; without a tokenizer_config.json
# beside the file, the first of these present in the vocabulary is taken.
_EOD_NAMES = ("<|end_of_text|>", "<|endoftext|>", "</s>", "<|im_end|>", "<eos>")
_BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>")

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
NEWLINE_PIECE = "\n"
# Sentences longer than this are split: SentencePiece silently skips longer ones, and very long
# sentences slow its trainer down for no gain in the learned merges.
MAX_SENTENCE_BYTES = 1 << 16
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")


class SentencePieceTokenizer:
    """A trained SentencePiece model with the ids the data pipeline needs.

    Args:
        model_path: a ``.model`` file written by :func:`train_tokenizer` (or any SentencePiece
            model whose end-of-sentence piece ends documents).
    """

    def __init__(self, model_path: str | Path) -> None:
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise FileNotFoundError(f"tokenizer model not found: {self.model_path}")
        model_bytes = self.model_path.read_bytes()
        self._processor = spm.SentencePieceProcessor(model_proto=model_bytes)
        if self._processor.eos_id() < 0:
            raise ValueError(
                f"tokenizer {self.model_path} has no end-of-sentence piece to end documents with"
            )
        self.unique_identifiers = {
            "class": type(self).__name__,
            "model_sha256": hashlib.sha256(model_bytes).hexdigest(),
        }

    @property
    def vocab_size(self) -> int:
        return self._processor.vocab_size()

    @property
    def bos(self) -> int | None:
        """Beginning-of-sentence id (SentencePiece's ``<s>``), ``None`` if the model has none."""
        bos = self._processor.bos_id()
        return bos if bos >= 0 else None

    @property
    def eod(self) -> int:
        """End-of-document id, appended to every document (SentencePiece's ``</s>``)."""
        return self._processor.eos_id()

    def encode(self, text: str) -> list[int]:
        return self._processor.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode several texts at once (SentencePiece spreads them over its threads)."""
        return self._processor.encode(list(texts))

    def decode(self, ids: Iterable[int]) -> str:
        return self._processor.decode([int(token) for token in ids])


class HuggingFaceTokenizer:
    """A Hugging Face ``tokenizer.json`` with the ids the data pipeline needs.

    The end-of-document and beginning-of-sequence tokens are the ``eos_token`` and ``bos_token``
    of a ``tokenizer_config.json`` beside the file when there is one, else the first of the
    usual names present in the vocabulary. Text is encoded without the tokenizer's own special
    tokens: the pipeline adds ``eod`` after each document (and ``bos`` where fine-tuning asks).
    """

    def __init__(self, path: str | Path) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ImportError(
                f"{path} is a Hugging Face tokenizer; reading it needs the `tokenizers` package "
                f"(pip install tokenizers)"
            ) from None
        self.model_path = Path(path)
        data = self.model_path.read_bytes()
        try:
            self._tokenizer = Tokenizer.from_str(data.decode("utf-8"))
        except Exception as err:  # the tokenizers library raises its own exception types
            raise ValueError(
                f"{path} is not a readable Hugging Face tokenizer.json: {err}"
            ) from None
        special = _special_tokens(self.model_path.parent / "tokenizer_config.json")
        self._eod = self._token_id(special.get("eos_token"), _EOD_NAMES)
        if self._eod is None:
            raise ValueError(
                f"tokenizer {path} has no end-of-text token (looked for eos_token in "
                f"tokenizer_config.json and for {list(_EOD_NAMES)})"
            )
        self._bos = self._token_id(special.get("bos_token"), _BOS_NAMES)
        self.unique_identifiers = {
            "class": type(self).__name__,
            "model_sha256": hashlib.sha256(data).hexdigest(),
        }

    def _token_id(self, configured: str | None, names: Sequence[str]) -> int | None:
        for name in (configured,) if configured else names:
            token = self._tokenizer.token_to_id(name)
            if token is not None:
                return token
        return None

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def bos(self) -> int | None:
        return self._bos

    @property
    def eod(self) -> int:
        return self._eod

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [e.ids for e in encodings]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tokenizer.decode([int(token) for token in ids], skip_special_tokens=False)


def _special_tokens(config_path: Path) -> dict[str, str]:
    """``bos_token`` / ``eos_token`` of a ``tokenizer_config.json`` (plain or AddedToken form)."""
    import json

    if not config_path.is_file():
        return {}
    config = json.loads(config_path.read_text())
    out = {}
    for key in ("bos_token", "eos_token"):
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            out[key] = value
    return out


Tokenizer = SentencePieceTokenizer | HuggingFaceTokenizer


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A SentencePiece ``.model``, a Hugging Face ``tokenizer.json``, or a directory holding one
    of them (``tokenizer.json`` first). Raises ``FileNotFoundError`` / ``ValueError`` naming the
    path and what would work."""
    path = Path(path)
    if path.is_dir():
        for name in (HF_TOKENIZER_FILE, SENTENCEPIECE_FILE):
            if (path / name).is_file():
                return load_tokenizer(path / name)
        raise FileNotFoundError(
            f"tokenizer directory {path} holds neither {HF_TOKENIZER_FILE} nor {SENTENCEPIECE_FILE}"
        )
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer not found: {path}")
    with path.open("rb") as stream:
        head = stream.read(64).lstrip()
    if head.startswith(b"{"):
        return HuggingFaceTokenizer(path)
    try:
        return SentencePieceTokenizer(path)
    except RuntimeError:  # SentencePiece's parse error
        raise ValueError(
            f"tokenizer {path} is neither a SentencePiece .model nor a Hugging Face tokenizer.json"
        ) from None


def train_tokenizer(
    documents: Iterable[str],
    output_prefix: str | Path,
    vocab_size: int,
    *,
    seed: int = 0,
    num_threads: int = 4,
    input_sentence_size: int = 2_000_000,
) -> Path:
    """Train a SentencePiece BPE model on ``documents``; write ``PREFIX.model``/``PREFIX.vocab``.

    Args:
        documents: the training text, one string per document (see :mod:`.documents`).
        output_prefix: where to write; parent directories are created.
        vocab_size: number of pieces, special and byte-fallback pieces included (so at least
            ~300; SentencePiece reports the bound for a corpus that is too small or too large).
        seed: seeds SentencePiece's sentence sampler.
        num_threads: trainer threads. Stored in the ``.model`` file, so part of its bytes.
        input_sentence_size: at most this many paragraphs are sampled for training (0: all).

    Returns:
        the path of the ``.model`` file.
    """
    if not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
    output_prefix = Path(output_prefix)
    feed = _SentenceFeed(_training_sentences(documents))
    model = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(feed),
            model_writer=model,
            model_type="bpe",
            vocab_size=vocab_size,
            character_coverage=0.9995,
            byte_fallback=True,
            split_digits=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            user_defined_symbols=[NEWLINE_PIECE],
            unk_id=UNK_ID,
            bos_id=BOS_ID,
            eos_id=EOS_ID,
            pad_id=-1,
            max_sentence_length=MAX_SENTENCE_BYTES,
            input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True,
            num_threads=num_threads,
            minloglevel=2,
        )
    except RuntimeError as error:
        if feed.error is not None:
            raise feed.error from None
        if feed.count == 0:
            raise ValueError("no text to train the tokenizer on: every document is empty") from None
        raise ValueError(
            f"SentencePiece could not train a {vocab_size}-piece vocabulary: {error}"
        ) from None
    output_prefix.parent.mkdir(parents=True, exist_ok=True)
    model_path = output_prefix.with_name(output_prefix.name + ".model")
    model_path.write_bytes(model.getvalue())
    _write_vocab(model.getvalue(), output_prefix.with_name(output_prefix.name + ".vocab"))
    return model_path


class _SentenceFeed:
    """Feeds sentences to SentencePiece's C++ trainer and remembers the Python side of it.

    The trainer turns an exception raised while reading the input (a missing key in a JSONL
    line, say) into a ``RuntimeError`` with the traceback in its text; keeping the original lets
    the caller see the clear error instead.
    """

    def __init__(self, sentences: Iterable[str]) -> None:
        self._sentences = sentences
        self.count = 0
        self.error: Exception | None = None

    def __iter__(self) -> Iterator[str]:
        try:
            for sentence in self._sentences:
                self.count += 1
                yield sentence
        except Exception as error:
            self.error = error
            raise


def _training_sentences(documents: Iterable[str]) -> Iterator[str]:
    """Paragraphs of every document; an over-long paragraph is cut into lines, then slices."""
    for document in documents:
        for paragraph in _PARAGRAPH_BREAK.split(document):
            if not paragraph.strip():
                continue
            if len(paragraph.encode("utf-8")) <= MAX_SENTENCE_BYTES:
                yield paragraph
                continue
            # A character is at most 4 UTF-8 bytes, so slices of this many characters fit.
            step = MAX_SENTENCE_BYTES // 4
            for line in paragraph.split("\n"):
                for start in range(0, len(line), step):
                    yield line[start : start + step]


def _write_vocab(model_bytes: bytes, vocab_path: Path) -> None:
    """Write ``piece<TAB>score`` per line, as SentencePiece's own ``.vocab`` (for reading)."""
    processor = spm.SentencePieceProcessor(model_proto=model_bytes)
    with open(vocab_path, "w", encoding="utf-8", newline="\n") as stream:
        for token in range(processor.vocab_size()):
            stream.write(f"{processor.id_to_piece(token)}\t{processor.get_score(token):g}\n")
