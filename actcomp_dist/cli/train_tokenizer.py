"""Train a SentencePiece tokenizer on text or JSONL files.

    python tools/train_tokenizer.py --input corpus.jsonl notes.txt --vocab-size 32000 \\
        --output data/tokenizer

writes ``data/tokenizer.model`` (what training and preprocess_data.py load) and
``data/tokenizer.vocab`` (pieces and scores, for reading). JSONL files (``.jsonl``/``.json``)
hold one document per line under ``--json-key``; other files are UTF-8 text split into
documents at blank lines. The model choices (BPE, byte fallback, exact round trip) are
explained in ``actcomp_dist/data/tokenizer.py``. Same input and options, same bytes.
"""

from __future__ import annotations

import argparse

from actcomp_dist.data.documents import iter_documents
from actcomp_dist.data.tokenizer import train_tokenizer


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train a SentencePiece tokenizer.")
    parser.add_argument("--input", nargs="+", required=True, help="text or JSONL files")
    parser.add_argument("--vocab-size", type=int, required=True, help="pieces in the vocabulary")
    parser.add_argument("--output", required=True, help="output prefix (writes .model, .vocab)")
    parser.add_argument("--json-key", default="text", help="JSONL field holding the text")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sentence sampler")
    args = parser.parse_args(argv)
    try:
        documents = iter_documents(args.input, json_key=args.json_key)
        model_path = train_tokenizer(documents, args.output, args.vocab_size, seed=args.seed)
    except (FileNotFoundError, ValueError) as error:
        parser.exit(1, f"{parser.prog}: error: {error}\n")
    print(f"wrote {model_path} and {model_path.with_suffix('.vocab')}")


if __name__ == "__main__":
    main()
