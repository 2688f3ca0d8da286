"""Progress output: one human-readable line per logging interval on rank 0, the same values
as JSON lines in ``RUN_DIR/metrics.jsonl``, and TensorBoard scalars when it is installed and
enabled.

``metrics.jsonl`` is strict JSON (RFC 8259 has no NaN or Infinity, and strict parsers reject
Python's bare ``NaN``): a non-finite value is written as ``null`` and its key listed in
``"nonfinite"``, e.g. ``{"step": 7, "loss": null, ..., "nonfinite": ["loss", "grad_norm"]}``.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


class MetricsLogger:
    """``resume_step``: the run continues from a checkpoint at that step: records up to it are
    kept, later ones (written after the checkpoint by the interrupted run, and about to be
    recomputed) are dropped, so every step appears once. ``None``: a new run."""

    def __init__(
        self,
        run_dir: Path,
        enabled: bool,
        tensorboard: bool = False,
        resume_step: int | None = None,
    ):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = None
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.is_file():
            kept = [
                line
                for line in self.path.read_text().splitlines()
                if _step(line) is not None and _step(line) <= resume_step
            ]
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(self.path)
        mode = "w" if resume_step is None else "a"
        self._file = open(self.path, mode)  # noqa: SIM115  (closed in close())
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                print(
                    "tensorboard is not installed; logging to metrics.jsonl only", file=sys.stderr
                )
            else:
                self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(strict_record(record), allow_nan=False) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    if key != "step":
                        self._tb.add_scalar(key, value, record["step"])
        print(self.format(record), flush=True)

    @staticmethod
    def format(record: dict[str, Any]) -> str:
        parts = [f"step {record['step']:>6}"]
        if "loss" in record:
            parts.append(f"loss {record['loss']:.4f}")
        if "val_loss" in record:
            parts.append(f"val_loss {record['val_loss']:.4f}")
        if "lr" in record:
            parts.append(f"lr {record['lr']:.2e}")
        if "grad_norm" in record and record["grad_norm"] is not None:
            parts.append(f"grad_norm {record['grad_norm']:.3f}")
        if "tokens_per_s" in record:
            parts.append(f"{record['tokens_per_s']:.0f} tok/s")
        if "step_time_s" in record:
            parts.append(f"{record['step_time_s'] * 1000:.0f} ms/step")
        if "saved_activation_bytes" in record:
            parts.append(f"saved act {format_bytes(record['saved_activation_bytes'])}")
        if "peak_bytes" in record:
            parts.append(f"peak {format_bytes(record['peak_bytes'])}")
        if record.get("skipped"):
            parts.append(f"step skipped ({record.get('skipped_steps', '?')} so far)")
        return " | ".join(parts)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def strict_record(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with each non-finite float replaced by ``None`` and listed in
    ``"nonfinite"`` (absent when every value is finite)."""
    nonfinite = [
        key
        for key, value in record.items()
        if isinstance(value, float) and not math.isfinite(value)
    ]
    if not nonfinite:
        return record
    out = {key: (None if key in nonfinite else value) for key, value in record.items()}
    out["nonfinite"] = nonfinite
    return out


def _step(line: str) -> int | None:
    """The step of one metrics.jsonl line; ``None`` for a line cut short by a crash."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None
