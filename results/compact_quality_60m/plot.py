"""Validation loss against step for the runs of this folder (README "CompAct at a 60m-shaped
model"): reads RUN/metrics.jsonl of each run named below, writes val_loss.png and results.md.

    python results/compact_quality_60m/plot.py
"""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
RUNS = {  # label -> metrics file (copied from each run directory); seed 1234 unless named
    "none, lr 1e-3 (the baseline recipe)": "none_lr1e-3.metrics.jsonl",
    "none, lr 2.5e-3 (alpha x 1e-2)": "none_lr2.5e-3.metrics.jsonl",
    "none, lr 1e-2 (CompAct's recipe)": "none_lr1e-2.metrics.jsonl",
    "none, lr 1e-2, linears x alpha (split lr)": "none_split_lr.metrics.jsonl",
    "compact r = n/4, lr 1e-2": "compact_0.25.metrics.jsonl",
    "compact r = n/8, lr 1e-2": "compact_0.125.metrics.jsonl",
    "none, lr 1e-3, seed 4321": "none_lr1e-3_seed4321.metrics.jsonl",
    "none, lr 1e-2, linears x alpha, seed 4321": "none_split_lr_seed4321.metrics.jsonl",
    "compact r = n/4, lr 1e-2, seed 4321": "compact_0.25_seed4321.metrics.jsonl",
    "compact r = n/8, lr 1e-2, seed 4321": "compact_0.125_seed4321.metrics.jsonl",
}
SECOND_SEED = {  # drawn dashed, in the colour of the same run at seed 1234
    "none, lr 1e-3, seed 4321": "none, lr 1e-3 (the baseline recipe)",
    "none, lr 1e-2, linears x alpha, seed 4321": "none, lr 1e-2, linears x alpha (split lr)",
    "compact r = n/4, lr 1e-2, seed 4321": "compact r = n/4, lr 1e-2",
    "compact r = n/8, lr 1e-2, seed 4321": "compact r = n/8, lr 1e-2",
}


def main() -> None:
    rows = []
    fig, ax = plt.subplots(figsize=(7.2, 4.8))
    colors = {}
    for label, name in RUNS.items():
        if not (HERE / name).is_file():  # a run not finished: left out, not extrapolated
            continue
        records = [json.loads(line) for line in (HERE / name).read_text().splitlines()]
        val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
        twin = SECOND_SEED.get(label)
        style = {"linestyle": "--", "color": colors.get(twin)} if twin else {}
        (line,) = ax.plot(*zip(*val, strict=True), marker="o", label=label, **style)
        colors.setdefault(label, line.get_color())
        rows.append((label, val))
    ax.set_xlabel("step (2,048 tokens each)")
    ax.set_ylabel("validation loss")
    ax.set_title("60m-shaped LLaMA (4 blocks), fp32, CPU")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(HERE / "val_loss.png", dpi=120)
    steps = [s for s, _ in rows[0][1]]
    lines = ["| run | " + " | ".join(f"step {s}" for s in steps) + " |"]
    lines.append("|---|" + "---:|" * len(steps))
    for label, val in rows:
        lines.append(f"| {label} | " + " | ".join(f"{v:.4f}" for _, v in val) + " |")
    (HERE / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
