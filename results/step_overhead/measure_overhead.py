"""What the trainer's per-step measurements cost: one variant's trainer (the ablation's run
config of ``configs/tiny_compact.json``), then optimizer steps through
:func:`~actcomp_dist.training.step.train_step` with the saved-tensor counter on or off and the
model-state probe on or off, the four settings alternated step by step in one process so that
load drift hits all four alike. Prints and writes (``--out``) the process CPU seconds per step of
each setting (median and quartiles over the rounds) and each setting's ratio to the bare step.

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python results/step_overhead/measure_overhead.py \\
        --variant int8@norm/swiglu --rounds 40 --out results/step_overhead/int8_norm_swiglu.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from actcomp_dist.ablation.orchestrate import AblationPlan, prepare_runs
from actcomp_dist.ablation.variants import parse_variant
from actcomp_dist.training.step import train_step
from actcomp_dist.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[2]
SETTINGS = {  # name: (count saved tensors, measure model states)
    "bare": (False, False),
    "counter": (True, False),
    "probe": (False, True),
    "both": (True, True),
}


def _quartiles(values: list[float]) -> list[float]:
    q = statistics.quantiles(values, n=4)
    return [q[0], statistics.median(values), q[2]]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", required=True)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="overhead_"))
    steps = (args.warmup + args.rounds) * len(SETTINGS) + 1
    plan = AblationPlan(
        config_path=ROOT / "configs" / "tiny_compact.json",
        variants=[parse_variant(args.variant)],
        steps=steps,
        out=work,
        overrides=["deepspeed.zero_optimization.reduce_bucket_size=5000000"],
    )
    (run,) = prepare_runs(plan, log=lambda line: None)
    trainer = Trainer(run.config)
    data = iter(trainer.loader)
    times: dict[str, list[float]] = {name: [] for name in SETTINGS}
    try:
        for round_index in range(args.warmup + args.rounds):
            # Rotate the order each round: no setting always follows the same one.
            names = list(SETTINGS)
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                count, probe = SETTINGS[name]
                trainer.model_states.reset()
                trainer.model_states.active = probe
                start = time.process_time()
                train_step(
                    trainer.engine,
                    data,
                    trainer.schedule,
                    device=trainer.device,
                    dp_group=trainer.ctx.dp_group,
                    merger=trainer.merger,
                    count_saved_activations=count,
                    after_last_backward=trainer.model_states.measure,
                )
                if round_index >= args.warmup:
                    times[name].append(time.process_time() - start)
    finally:
        trainer.close()
    bare = times["bare"]
    out = {
        "variant": args.variant,
        "rounds": args.rounds,
        "load_average": list(os.getloadavg()),
        "cpu_s": {name: _quartiles(t) for name, t in times.items()},
        # Per round (same neighbourhood in time): setting / bare.
        "ratio_to_bare": {
            name: _quartiles([a / b for a, b in zip(t, bare, strict=True)])
            for name, t in times.items()
        },
    }
    args.out.write_text(json.dumps(out, indent=1))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
