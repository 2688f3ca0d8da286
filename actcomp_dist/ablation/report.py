"""Turn ablation records into ``results.csv``, ``results.md`` and the two pictures.

Per variant (over its repeats):

- memory numbers come from the first repeat (they are exact counts; the report flags a variant
  whose repeats disagree);
- ``step_time_s`` / ``tokens_per_s``: the median over repeats of each run's median after
  warm-up (over the steps where the trainer did not measure: ``timed_steps`` of each record),
  with the min and max;
- ratios against ``none`` are formed *per repeat* (both runs in the same session) and then
  summarised by their median, min and max: that is the spread the table shows;
- ``step_cpu_s``: the same for the process's CPU seconds per step (``time.process_time``;
  on a CPU shared with other jobs the wall time also counts the time they held the cores,
  the CPU time does not), with its per-repeat ratios against ``none``;
- ``final_loss`` is the last step's training loss, ``final_loss_avg`` the mean over the last
  10% of steps, ``val_loss`` the validation loss at the last step (all from the first repeat;
  the training is deterministic, and ``loss_spread`` says by how much repeats differed).
"""

from __future__ import annotations

import csv
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from actcomp_dist.memory_model import LAYER_KINDS, MODEL_KINDS
from actcomp_dist.training.metrics import format_bytes

PEAK_CATEGORIES = ("parameters", "gradients", "optimizer_state", "activations", "temporaries")
KINDS = LAYER_KINDS + MODEL_KINDS

CSV_COLUMNS = [
    "variant",
    "method",
    "argument",
    "ac_mode",
    "grad_mode",
    "saved_activation_bytes",
    "saved_ratio",
    "saved_bytes_per_layer",
    "per_layer_ratio",
    "predicted_saved_activation_bytes",
    "peak_bytes",
    "peak_ratio",
    *[f"peak_{c}" for c in PEAK_CATEGORIES],
    "step_time_s",
    "step_time_min_s",
    "step_time_max_s",
    "step_time_ratio",
    "step_time_ratio_min",
    "step_time_ratio_max",
    "step_cpu_s",
    "step_cpu_ratio",
    "step_cpu_ratio_min",
    "step_cpu_ratio_max",
    "tokens_per_s",
    "final_loss",
    "final_loss_avg",
    "val_loss",
    "val_loss_ratio",
    "loss_spread",
    "repeats",
    *[f"saved_{k}" for k in KINDS],
]


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def aggregate(records: list[dict[str, Any]], variants: list[str]) -> list[dict[str, Any]]:
    """One row per variant (in ``variants`` order); ratios against ``none`` (or, without it,
    against the first variant: the row's ``reference`` says which)."""
    by_variant: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        by_variant[record["variant"]].append(record)
    for runs in by_variant.values():
        runs.sort(key=lambda r: r["repeat"])
    reference = "none" if "none" in by_variant else variants[0]
    ref_runs = {r["repeat"]: r for r in by_variant[reference]}
    ref_first = by_variant[reference][0]
    ref_per_layer = sum(ref_first["saved_per_layer"]) / ref_first["num_layers"]
    rows = []
    for name in variants:
        runs = by_variant[name]
        first = runs[0]
        per_layer = sum(first["saved_per_layer"]) / first["num_layers"]
        times = [r["step_time_s"] for r in runs]
        time_ratios = [
            r["step_time_s"] / ref_runs[r["repeat"]]["step_time_s"]
            for r in runs
            if r["repeat"] in ref_runs
        ]
        cpu_ratios = [
            r["step_cpu_s"] / ref_runs[r["repeat"]]["step_cpu_s"]
            for r in runs
            if r["repeat"] in ref_runs
            and r.get("step_cpu_s")
            and ref_runs[r["repeat"]].get("step_cpu_s")
        ]
        cpu_times = [r["step_cpu_s"] for r in runs if r.get("step_cpu_s")]
        finals = [r["final_loss"] for r in runs]
        tail = max(1, len(first["losses"]) // 10)
        peak = {
            c: statistics.median(r["peak_by_category"].get(c, 0) for r in runs)
            for c in PEAK_CATEGORIES
        }
        row = {
            "variant": name,
            "reference": reference,
            "method": first["method"],
            "argument": first["argument"],
            "ac_mode": first["ac_mode"],
            "grad_mode": first["grad_mode"],
            "saved_activation_bytes": first["saved_activation_bytes"],
            "saved_ratio": _ratio(
                first["saved_activation_bytes"], ref_first["saved_activation_bytes"]
            ),
            "saved_bytes_per_layer": per_layer,
            "per_layer_ratio": _ratio(per_layer, ref_per_layer),
            "predicted_saved_activation_bytes": first["predicted_saved_activation_bytes"],
            "peak_bytes": statistics.median(r["peak_bytes"] for r in runs),
            "step_time_s": statistics.median(times),
            "step_time_min_s": min(times),
            "step_time_max_s": max(times),
            "step_time_ratio": statistics.median(time_ratios) if time_ratios else None,
            "step_time_ratio_min": min(time_ratios) if time_ratios else None,
            "step_time_ratio_max": max(time_ratios) if time_ratios else None,
            "step_cpu_s": statistics.median(cpu_times) if cpu_times else None,
            "step_cpu_ratio": statistics.median(cpu_ratios) if cpu_ratios else None,
            "step_cpu_ratio_min": min(cpu_ratios) if cpu_ratios else None,
            "step_cpu_ratio_max": max(cpu_ratios) if cpu_ratios else None,
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
            "final_loss": first["final_loss"],
            "final_loss_avg": statistics.fmean(first["losses"][-tail:]),
            "val_loss": first["val_loss"],
            "loss_spread": max(finals) - min(finals),
            "repeats": len(runs),
            "saved_consistent": len({r["saved_activation_bytes"] for r in runs}) == 1,
            "remeasured_equal": all(
                r["saved_activation_bytes"] == r["saved_activation_bytes_remeasured"] for r in runs
            ),
            "losses": first["losses"],
            "val_losses": first["val_losses"],
            "time_ratios": time_ratios,
            "saved_by_kind": first["saved_by_kind"],
        }
        row["peak_ratio"] = None  # filled below, once the reference row exists
        for category, value in peak.items():
            row[f"peak_{category}"] = value
        for kind in KINDS:
            row[f"saved_{kind}"] = first["saved_by_kind"].get(kind, 0)
        rows.append(row)
    ref_row = next(r for r in rows if r["variant"] == reference)
    for row in rows:
        row["peak_ratio"] = _ratio(row["peak_bytes"], ref_row["peak_bytes"])
        row["val_loss_ratio"] = _ratio(row["val_loss"], ref_row["val_loss"])
    return rows


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _csv_value(row.get(k)) for k in CSV_COLUMNS})


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else value


def _x(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}x"


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def write_markdown(rows: list[dict[str, Any]], meta: dict[str, Any], path: Path) -> None:
    reference = rows[0]["reference"]
    repeats = max(r["repeats"] for r in rows)
    lines = [
        f"# Ablation: {meta['title']}",
        "",
        *[f"- {line}" for line in meta["setup"]],
        f"- Repeats: {repeats} per variant, run back to back (odd repeats in reverse order); "
        f"step time is the median over the steps after {meta['warmup_steps']} warm-up steps "
        "that did not count saved tensors or model states (the trainer measures on its first "
        "two, logged, evaluated and last steps); ratios are "
        f"taken within each repeat against `{reference}`, shown as median [min-max] over "
        f"repeats. CPU time: the training process's CPU seconds per step (median after "
        f"warm-up; on a shared CPU the wall time also counts other jobs' share of the cores).",
        "",
        f"| variant | saved act. / micro-batch | x {reference} | per block x {reference} | "
        f"predicted (planner) | peak | x {reference} | step time ms [min-max] | "
        f"x {reference} [min-max] | CPU time x {reference} [min-max] | tokens/s | "
        f"final train loss | val loss | val x {reference} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        spread = (
            f"{_x(r['step_time_ratio'])} [{_x(r['step_time_ratio_min'])}-"
            f"{_x(r['step_time_ratio_max'])}]"
            if r["step_time_ratio"] is not None
            else "-"
        )
        cpu_spread = (
            f"{_x(r['step_cpu_ratio'])} [{_x(r['step_cpu_ratio_min'])}-"
            f"{_x(r['step_cpu_ratio_max'])}]"
            if r["step_cpu_ratio"] is not None
            else "-"
        )
        predicted = format_bytes(r["predicted_saved_activation_bytes"])
        if r["predicted_saved_activation_bytes"] == r["saved_activation_bytes"]:
            predicted += " (exact)"
        lines.append(
            f"| `{r['variant']}` | {format_bytes(r['saved_activation_bytes'])} | "
            f"{_x(r['saved_ratio'])} | {_x(r['per_layer_ratio'])} | {predicted} | "
            f"{format_bytes(r['peak_bytes'])} | {_x(r['peak_ratio'])} | "
            f"{_ms(r['step_time_s'])} [{_ms(r['step_time_min_s'])}-{_ms(r['step_time_max_s'])}] | "
            f"{spread} | {cpu_spread} | {r['tokens_per_s']:.0f} | {_loss(r['final_loss'])} | "
            f"{_loss(r['val_loss'])} | {_x(r['val_loss_ratio'], 3)} |"
        )
    lines += [
        "",
        "Saved activations are exact byte counts of one micro-batch's saved tensors "
        "(`saved_tensors_hooks`, storages de-duplicated, parameters excluded; per rank). "
        f"Peak is {meta['peak_source']}. "
        "'per block' counts only what the decoder blocks save (the embedding, final norm, "
        "output layer and loss are excluded).",
        "",
        "## Saved activations by layer kind (whole model, one micro-batch)",
        "",
    ]
    kinds = [k for k in KINDS if any(r[f"saved_{k}"] for r in rows)]
    lines.append("| variant | " + " | ".join(kinds) + " |")
    lines.append("|---|" + "---:|" * len(kinds))
    for r in rows:
        cells = " | ".join(format_bytes(r[f"saved_{k}"]) for k in kinds)
        lines.append(f"| `{r['variant']}` | {cells} |")
    lines += [
        "",
        "## Peak memory by category (MemTracker, at the peak of one optimizer step)",
        "",
        "| variant | " + " | ".join(PEAK_CATEGORIES) + " | total |",
        "|---|" + "---:|" * (len(PEAK_CATEGORIES) + 1),
    ]
    for r in rows:
        cells = " | ".join(format_bytes(r[f"peak_{c}"]) for c in PEAK_CATEGORIES)
        lines.append(f"| `{r['variant']}` | {cells} | {format_bytes(r['peak_bytes'])} |")
    warnings = [
        f"`{r['variant']}`: saved bytes differ between repeats"
        for r in rows
        if not r["saved_consistent"]
    ] + [
        f"`{r['variant']}`: the re-measured saved bytes differ from the trainer's count"
        for r in rows
        if not r["remeasured_equal"]
    ]
    same = identical_loss_groups(rows)
    if same:
        groups = "; ".join(" = ".join(f"`{v}`" for v in group) for group in same)
        lines += [
            "",
            f"Identical training-loss curves (bit for bit; checkpointing recomputes exactly): "
            f"{groups}.",
        ]
    if warnings:
        lines += ["", "## Warnings", "", *[f"- {w}" for w in warnings]]
    lines += [
        "",
        "![memory vs step time](memory_vs_step_time.png)",
        "",
        "![loss curves](loss_curves.png)",
        "",
        "Reproduce:",
        "",
        "```",
        meta["command"],
        "```",
        "",
    ]
    path.write_text("\n".join(lines))


def identical_loss_groups(rows: list[dict[str, Any]]) -> list[list[str]]:
    """Variants whose loss curves are exactly equal (e.g. a checkpointing mode and no
    checkpointing), grouped in table order; singletons are left out."""
    groups: dict[tuple, list[str]] = {}
    for r in rows:
        groups.setdefault(tuple(r["losses"]), []).append(r["variant"])
    return [g for g in groups.values() if len(g) > 1]


_MARKERS = {"none": "o", "selective": "s", "full": "^"}


def _pareto(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats in both coordinates (lower is better), by x."""
    front = []
    for x, y in sorted(points):
        if not front or y < front[-1][1]:
            front.append((x, y))
    return front


def _variant_colors(rows: list[dict[str, Any]]) -> dict[str, Any]:
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("tab10" if len(rows) <= 10 else "tab20")
    return {r["variant"]: cmap(i % cmap.N) for i, r in enumerate(rows)}


def plot_memory_vs_time(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    reference = rows[0]["reference"]
    colors = _variant_colors(rows)
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.6))
    panels = (
        # Per decoder block: what the policies act on (the embedding, final norm, output
        # layer and loss keep the same bytes under every variant).
        ("per_layer_ratio", f"saved activations per decoder block (x {reference})"),
        ("peak_ratio", f"peak memory of a training step (x {reference})"),
    )
    for ax, (key, ylabel) in zip(axes, panels, strict=True):
        points = []
        for r in rows:
            x, y = r["step_time_ratio"], r[key]
            if x is None or y is None:
                continue
            points.append((x, y))
            ax.errorbar(
                x,
                y,
                xerr=[[x - r["step_time_ratio_min"]], [r["step_time_ratio_max"] - x]],
                fmt=_MARKERS.get(r["ac_mode"], "o"),
                color=colors[r["variant"]],
                markersize=9,
                capsize=3,
                alpha=0.9,
                label=r["variant"],
            )
        front = _pareto(points)
        if len(front) > 1:
            ax.plot(*zip(*front, strict=True), "--", color="#888888", lw=1, zorder=0)
        ax.axvline(1.0, color="#cccccc", lw=0.8, zorder=0)
        ax.set_xlabel(f"step time (x {reference}); bars: min-max over repeats")
        ax.set_ylabel(ylabel)
        ax.set_ylim(0, 1.08 * max([1.0] + [y for _, y in points]))
        ax.grid(alpha=0.3)
    axes[0].set_title("saved bytes per block vs step time (dashed: Pareto front)", fontsize=10)
    axes[1].set_title("peak memory vs step time (dashed: Pareto front)", fontsize=10)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(
        handles,
        labels,
        loc="lower center",
        ncol=min(len(labels), 5),
        fontsize=9,
        frameon=False,
        title="marker: o no checkpointing, s selective, ^ full",
        title_fontsize=8,
    )
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.16, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_loss_curves(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = _variant_colors(rows)
    styles = {"none": "-", "selective": "--", "full": ":"}
    fig, axes = plt.subplots(1, 2, figsize=(13, 5.2))
    steps = len(rows[0]["losses"])
    window = max(1, steps // 20)
    with_validation = all(len(r["val_losses"]) >= 3 for r in rows)
    for r in rows:
        color, style = colors[r["variant"]], styles.get(r["ac_mode"], "-")
        xs = list(range(1, len(r["losses"]) + 1))
        axes[0].plot(
            xs, _smooth(r["losses"], window), style, color=color, lw=1.4, label=r["variant"]
        )
        if with_validation:
            vx, vy = zip(*r["val_losses"], strict=True)
            axes[1].plot(vx, vy, style, marker="o", color=color, lw=1.2, ms=4)
        else:
            axes[1].plot(xs, _smooth(r["losses"], 2 * window), style, color=color, lw=1.4)
    axes[0].set_title(f"training loss (moving average over {window} steps)", fontsize=10)
    if with_validation:
        axes[1].set_title("validation loss", fontsize=10)
        values = [v for r in rows for _, v in r["val_losses"][1:]]
        start = rows[0]["val_losses"][1][0]
    else:
        axes[1].set_title(f"second half (moving average over {2 * window} steps)", fontsize=10)
        start = steps // 2
        values = [v for r in rows for v in _smooth(r["losses"], 2 * window)[start:]]
    values = [v for v in values if math.isfinite(v)]
    if values:
        pad = 0.08 * (max(values) - min(values) or 1.0)
        axes[1].set_xlim(start - max(1, steps // 50), steps + max(1, steps // 50))
        axes[1].set_ylim(min(values) - pad, max(values) + pad)
    for ax in axes:
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, ncol=2)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary_lines(rows: list[dict[str, Any]]) -> list[str]:
    """A short console table: the headline numbers of every variant."""
    reference = rows[0]["reference"]
    width = max(len(r["variant"]) for r in rows)
    lines = [
        f"{'variant':<{width}}  saved act.  x {reference:<5} step ms   x {reference:<5} val loss"
    ]
    for r in rows:
        lines.append(
            f"{r['variant']:<{width}}  {format_bytes(r['saved_activation_bytes']):>10}  "
            f"{_x(r['saved_ratio']):<7} {_ms(r['step_time_s']):>7}   "
            f"{_x(r['step_time_ratio']):<7} {_loss(r['val_loss'])}"
        )
    return lines


def write_report(
    records: list[dict[str, Any]], variants: list[str], meta: dict[str, Any], out: Path
) -> list[dict[str, Any]]:
    """Write results.csv, results.md, memory_vs_step_time.png and loss_curves.png into
    ``out``; returns the aggregated rows."""
    rows = aggregate(records, variants)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, out / "results.csv")
    write_markdown(rows, meta, out / "results.md")
    try:
        import matplotlib  # noqa: F401  (optional: the `plot` extra)
    except ImportError:
        print(
            "matplotlib is not installed (pip install 'actcomp_dist[plot]'): wrote results.csv "
            "and results.md, no plots",
            file=sys.stderr,
        )
        return rows
    plot_memory_vs_time(rows, out / "memory_vs_step_time.png", meta["title"])
    plot_loss_curves(rows, out / "loss_curves.png", meta["title"])
    return rows
