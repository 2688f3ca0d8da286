"""Tokenise text or JSONL files into a megatron-core indexed dataset (PREFIX.bin / PREFIX.idx).

    python tools/preprocess_data.py --input corpus.jsonl notes.txt \\
        --tokenizer data/tokenizer.model --output-prefix data/corpus

Every document is encoded and followed by the tokenizer's end-of-document token. JSONL files
(``.jsonl``/``.json``) hold one document per line under ``--json-key``; other files are UTF-8
text split into documents at blank lines (``actcomp_dist/data/documents.py``). Progress goes to
stderr every few seconds. The output is renamed into place only when complete. Train on it by
giving ``data/corpus`` as a data path.
"""

from __future__ import annotations

import argparse

from actcomp_dist.data.indexed import preprocess_files


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Tokenise text/JSONL into a .bin/.idx dataset.")
    parser.add_argument("--input", nargs="+", required=True, help="text or JSONL files")
    parser.add_argument(
        "--tokenizer", required=True, help="SentencePiece .model or Hugging Face tokenizer.json"
    )
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    parser.add_argument("--json-key", default="text", help="JSONL field holding the text")
    parser.add_argument(
        "--progress-every", type=float, default=5.0, help="seconds between progress lines"
    )
    args = parser.parse_args(argv)
    try:
        stats = preprocess_files(
            args.input,
            args.tokenizer,
            args.output_prefix,
            json_key=args.json_key,
            progress_every_s=args.progress_every,
        )
    except (FileNotFoundError, ValueError) as error:
        parser.exit(1, f"{parser.prog}: error: {error}\n")
    print(
        f"wrote {stats.prefix}.bin/.idx: {stats.num_documents:,} documents, "
        f"{stats.num_tokens:,} tokens"
    )


if __name__ == "__main__":
    main()
