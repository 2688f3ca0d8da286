"""Progress output: one human-readable line per logging interval on rank 0, the same values
as JSON lines in ``RUN_DIR/metrics.jsonl``, and TensorBoard scalars when it is installed and
enabled."""

from __future__ import annotations

import json
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
    def __init__(
        self, run_dir: Path, enabled: bool, tensorboard: bool = False, append: bool = False
    ):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = None
        self._tb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a" if append else "w")  # noqa: SIM115  (closed in close())
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
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
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
        return " | ".join(parts)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
