"""Prompt/response data for fine-tuning: JSONL rows -> masked samples -> a resumable dataset.

A row is ``{"prompt": ..., "response": ...}`` (the loss is on the response and EOS tokens
only, unless ``loss_on="all"``) or ``{"text": ...}`` (loss everywhere); other keys are
ignored. :func:`synthetic_rows` generates a task instead (``reverse_words``: the prompt's words
in reverse order; ``sort_words``: in alphabetical order) for the tiny configs and the tests.

Samples: ``tokens = [BOS] + tok(template(prompt)) + tok(response) + [EOS]``; inputs
``tokens[:-1]``, labels ``tokens[1:]``, ``loss_mask[i] = 1`` iff label ``i`` is a response (or
EOS) token. A row longer than ``seq_length + 1`` loses prompt tokens from the left first, then
response tokens from the right; one with no trained token left is dropped. Shorter ones are
padded (EOS id, ``loss_mask`` 0).

Sample ``i`` of :class:`PromptResponseDataset` is row ``perm_e[i mod n]`` of epoch
``e = i // n`` (a fresh seeded permutation per epoch), so the data position is the number of
samples consumed, as in pretraining, and resuming is exact.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

SYNTHETIC_TASKS = ("reverse_words", "sort_words")
LOSS_ON = ("response", "all")


class JsonlError(ValueError):
    """A bad JSONL row (the message names the file and line) or no usable sample."""


_WORDS = (
    "apple river stone cloud green table music light paper garden window silver "
    "orange forest summer winter yellow bridge market doctor"
).split()


def synthetic_rows(task: str, count: int, seed: int) -> list[dict[str, str]]:
    """``count`` prompt/response rows of a generated task (deterministic in ``seed``)."""
    if task not in SYNTHETIC_TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; known: {list(SYNTHETIC_TASKS)}")
    # Each task names itself in the prompt ("reverse:", "sort:"), so that one model (merged
    # adapters) can tell the tasks apart from the input, as distinct real tasks can.
    verb, answer = ("reverse", lambda w: w[::-1]) if task == "reverse_words" else ("sort", sorted)
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 5))]
        rows.append(
            {"prompt": f"{verb}: " + " ".join(words) + "\n", "response": " ".join(answer(words))}
        )
    return rows


def read_jsonl(path: str | Path) -> list[dict[str, str]]:
    """Rows of a JSONL file: ``{"prompt", "response"}`` or ``{"text"}`` (strings); a bad row
    raises :class:`JsonlError` naming the file and line."""
    rows = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise JsonlError(f"{where}: not valid JSON: {err}") from None
            if not isinstance(row, dict):
                raise JsonlError(f"{where}: a row must be a JSON object")
            if "prompt" in row or "response" in row:
                keys = ("prompt", "response")
            elif "text" in row:
                keys = ("text",)
            else:
                raise JsonlError(
                    f"{where}: a row needs 'prompt' and 'response', or 'text'; got keys "
                    f"{sorted(row)}"
                )
            for key in keys:
                if not isinstance(row.get(key), str):
                    raise JsonlError(f"{where}: {key!r} must be a string, got {row.get(key)!r}")
            rows.append({k: row[k] for k in keys})
    return rows


def encode_row(
    row: dict[str, str],
    tokenizer,
    seq_length: int,
    *,
    prompt_template: str = "{prompt}",
    loss_on: str = "response",
    append_eos: bool = True,
) -> dict[str, np.ndarray] | None:
    """One sample (``tokens``, ``labels`` int64 and ``loss_mask`` float32, each
    ``[seq_length]``) of a row, or ``None`` if no trained token is left after truncation."""
    bos = [tokenizer.bos] if getattr(tokenizer, "bos", None) is not None else []
    eos = [tokenizer.eod] if append_eos else []
    if "text" in row:
        head, body = bos, tokenizer.encode(row["text"]) + eos
        head_trained = True
    else:
        head = bos + tokenizer.encode(prompt_template.format(prompt=row["prompt"]))
        body = tokenizer.encode(row["response"]) + eos
        head_trained = loss_on == "all"
    budget = seq_length + 1
    if len(head) + len(body) > budget:
        # The prompt loses tokens from the left (keeping BOS), then the response from the right.
        keep_head = max(budget - len(body), min(len(bos), budget))
        if keep_head < len(head):
            head = head[: len(bos)] + head[len(head) - (keep_head - len(bos)) :]
        body = body[: budget - len(head)]
    tokens = head + body
    trained = [head_trained] * len(head) + [True] * len(body)
    mask = np.asarray(trained[1:], dtype=np.float32)
    if len(tokens) < 2 or not mask.any():
        return None
    pad = seq_length + 1 - len(tokens)
    ids = np.asarray(tokens + [tokenizer.eod] * pad, dtype=np.int64)
    return {
        "tokens": ids[:-1].copy(),
        "labels": ids[1:].copy(),
        "loss_mask": np.concatenate([mask, np.zeros(pad, dtype=np.float32)]),
    }


def encode_rows(
    rows: Iterable[dict[str, str]],
    tokenizer,
    seq_length: int,
    *,
    prompt_template: str = "{prompt}",
    loss_on: str = "response",
    append_eos: bool = True,
) -> tuple[list[dict[str, np.ndarray]], int]:
    """``(samples, dropped)``: :func:`encode_row` of each row, and how many had no trained
    token left."""
    samples, dropped = [], 0
    for row in rows:
        sample = encode_row(
            row,
            tokenizer,
            seq_length,
            prompt_template=prompt_template,
            loss_on=loss_on,
            append_eos=append_eos,
        )
        if sample is None:
            dropped += 1
        else:
            samples.append(sample)
    return samples, dropped


class PromptResponseDataset(Dataset):
    """``num_samples`` samples cycling over ``samples`` (one seeded permutation per epoch when
    ``shuffle``); items are dicts of tensors, like the pretraining datasets'."""

    def __init__(
        self, samples: list[dict[str, np.ndarray]], num_samples: int, seed: int, shuffle: bool
    ) -> None:
        if not samples:
            raise JsonlError("no fine-tuning sample is left (every row was empty or dropped)")
        self.samples, self.num_samples, self.seed, self.shuffle = (
            samples,
            num_samples,
            seed,
            shuffle,
        )
        self._orders: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return self.num_samples

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            n = len(self.samples)
            rng = np.random.default_rng([self.seed, epoch])
            self._orders[epoch] = rng.permutation(n) if self.shuffle else np.arange(n)
        return self._orders[epoch]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.num_samples:
            raise IndexError(index)
        epoch, position = divmod(index, len(self.samples))
        sample = self.samples[int(self._order(epoch)[position])]
        return {key: torch.from_numpy(value) for key, value in sample.items()}
