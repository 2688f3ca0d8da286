"""Deterministic English-like text for the tokenizer and data-pipeline tests."""

from __future__ import annotations

import random

WORDS = (
    "the of and to in is that for it as with was on be by this are at from or an which "
    "model data layer memory gradient token training activation compress project rank "
    "sequence parallel tensor batch step optimizer weight matrix random seed vector value "
    "function return number string list file system process thread read write error time"
).split()
#: A SentencePiece vocabulary size that a few dozen generated documents fill.
VOCAB_SIZE = 512


def generated_documents(count: int, seed: int) -> list[str]:
    """Deterministic English-like documents of one to three paragraphs."""
    rng = random.Random(seed)
    documents = []
    for _ in range(count):
        paragraphs = []
        for _ in range(rng.randint(1, 3)):
            sentences = []
            for _ in range(rng.randint(1, 4)):
                words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12)))
                sentences.append(words.capitalize() + ".")
            paragraphs.append(" ".join(sentences))
        documents.append("\n\n".join(paragraphs))
    return documents
