"""Progress output: one human-readable line per logging interval on rank 0, the same values
as JSON lines in ``RUN_DIR/metrics.jsonl``, and TensorBoard scalars and Weights & Biases
records when enabled (``logging.tensorboard``, ``logging.wandb``).

A logged record covers the interval since the previous one: ``loss`` is the mean of the
interval's step losses (``interval_steps`` of them), ``step_time_s`` the mean step time and
``tokens_per_s`` the interval's tokens over its time, so a sparse log still shows the trend
instead of one noisy step. ``time`` is the Unix time the record was written, ``elapsed_s`` the
seconds since this process started training, ``tokens`` the tokens trained on so far (the run's,
resumed steps included). Memory is named by what it is: ``peak_rss_bytes`` (the process's peak
resident set, on a CPU) or ``allocated_bytes`` / ``reserved_bytes`` / ``peak_allocated_bytes``
(the CUDA caching allocator); ``peak_bytes`` is the peak of either, for tools that compare runs.

On resume, records after the checkpoint's step (written by the interrupted run, about to be
recomputed) are dropped from ``metrics.jsonl``, TensorBoard purges its events after that step
(``purge_step``), and the W&B run is continued under its id (kept in ``RUN_DIR/wandb_run_id``),
rewound to that step where W&B can rewind (online mode).

``metrics.jsonl`` is strict JSON (RFC 8259 has no NaN or Infinity, and strict parsers reject
Python's bare ``NaN``): a non-finite value is written as ``null`` and its key listed in
``"nonfinite"``, e.g. ``{"step": 7, "loss": null, ..., "nonfinite": ["loss", "grad_norm"]}``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

WANDB_RUN_ID_FILE = "wandb_run_id"


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


def format_duration(seconds: float) -> str:
    """``H:MM:SS`` (``D days, H:MM:SS`` past a day)."""
    seconds = max(0, int(round(seconds)))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    text = f"{hours}:{rest // 60:02d}:{rest % 60:02d}"
    return f"{days} days, {text}" if days else text


class MetricsLogger:
    """``resume_step``: the run continues from a checkpoint at that step: records up to it are
    kept, later ones (written after the checkpoint by the interrupted run, and about to be
    recomputed) are dropped, so every step appears once. ``None``: a new run.
    ``total_steps``: the run's ``train.steps``, for the progress line. ``wandb``: the
    ``logging.wandb`` section (``project``, ``name``, ``mode``) or ``None``; ``config``: the
    resolved run config, recorded with a new W&B run."""

    def __init__(
        self,
        run_dir: Path,
        enabled: bool,
        tensorboard: bool = False,
        resume_step: int | None = None,
        total_steps: int | None = None,
        wandb: dict[str, Any] | None = None,
        config: dict[str, Any] | None = None,
    ):
        self.enabled = enabled
        self.total_steps = total_steps
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = None
        self._tb = None
        self._wandb = None
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
            # Installed: checked with the config (training/config.py, logging.tensorboard).
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: events at or after it, left by the interrupted run, are discarded.
            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=purge)
        if wandb is not None:
            self._wandb = _init_wandb(Path(run_dir), wandb, resume_step, config)

    @property
    def wandb_url(self) -> str | None:
        """The W&B run's page (``None`` without W&B, or offline)."""
        return None if self._wandb is None else getattr(self._wandb, "url", None)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._file.write(json.dumps(strict_record(record), allow_nan=False) + "\n")
        self._file.flush()
        scalars = {
            key: value
            for key, value in record.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step"
        }
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, record["step"])
        if self._wandb is not None:
            self._wandb.log(scalars, step=record["step"])
        print(self.format(record, self.total_steps), flush=True)
        for warning in record.get("warnings", []):
            print(f"warning: {warning}", flush=True)

    @staticmethod
    def format(record: dict[str, Any], total_steps: int | None = None) -> str:
        """The progress line of one record: where the run is, how fast, and what it holds."""
        step = record["step"]
        parts = [f"step {step}/{total_steps}" if total_steps else f"step {step}"]
        if "elapsed_s" in record:
            timing = f"elapsed {format_duration(record['elapsed_s'])}"
            if record.get("eta_s") is not None:
                timing += f", eta {format_duration(record['eta_s'])}"
            parts.append(timing)
        if "loss" in record:
            loss = f"loss {_number(record['loss'], '.4f')}"
            if record.get("interval_steps", 1) > 1:
                loss += f" (mean of {record['interval_steps']} steps)"
            parts.append(loss)
        if "val_loss" in record:
            parts.append(f"val_loss {_number(record['val_loss'], '.4f')}")
        if "lr" in record:
            parts.append(f"lr {record['lr']:.2e}")
        if record.get("grad_norm") is not None:
            parts.append(f"grad_norm {_number(record['grad_norm'], '.3f')}")
        if "tokens_per_s" in record:
            parts.append(f"{record['tokens_per_s']:.0f} tok/s")
        if "step_time_s" in record:
            parts.append(f"{record['step_time_s'] * 1000:.0f} ms/step")
        if record.get("mfu") is not None:
            parts.append(f"MFU {100 * record['mfu']:.1f}%")
        if "saved_activation_bytes" in record:
            parts.append(f"saved act {format_bytes(record['saved_activation_bytes'])}")
        if "allocated_bytes" in record:
            parts.append(
                f"GPU mem allocated {format_bytes(record['allocated_bytes'])}, reserved "
                f"{format_bytes(record['reserved_bytes'])}, peak allocated "
                f"{format_bytes(record['peak_allocated_bytes'])}"
            )
        elif "peak_rss_bytes" in record:
            parts.append(f"peak RSS {format_bytes(record['peak_rss_bytes'])}")
        if record.get("skipped"):
            parts.append(f"step skipped ({record.get('skipped_steps', '?')} so far)")
        return " | ".join(parts)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _number(value: float | None, spec: str) -> str:
    return "nan" if value is None else format(value, spec)


def _init_wandb(
    run_dir: Path, section: dict[str, Any], resume_step: int | None, config: dict | None
):
    """Start (or, on resume, continue) the W&B run of ``run_dir``.

    The run's id is kept in ``RUN_DIR/wandb_run_id`` so a resumed run continues the same W&B
    run. Online, W&B rewinds it to the checkpoint's step (``resume_from``: the steps the
    interrupted run logged after its checkpoint are replaced, as in metrics.jsonl); offline it
    cannot rewind, and a step W&B already holds keeps its first values.
    """
    import wandb  # installed: checked with the config (logging.wandb)

    id_file = run_dir / WANDB_RUN_ID_FILE
    known_id = id_file.read_text().strip() if id_file.is_file() else None
    kwargs: dict[str, Any] = {
        "project": section.get("project"),
        "name": section.get("name"),
        "mode": section.get("mode", "online"),
        "dir": str(run_dir),
        "config": config,
    }
    if resume_step is not None and known_id:
        if kwargs["mode"] == "online":
            kwargs["resume_from"] = f"{known_id}?_step={resume_step}"
        else:
            kwargs.update(id=known_id, resume="allow")
    run = wandb.init(**kwargs)  # a new run gets a new id from W&B
    id_file.write_text(run.id + "\n")
    return run


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
