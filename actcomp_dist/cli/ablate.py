r"""Compare compressed activations with activation checkpointing: memory, speed and loss.

    python tools/ablate.py --config configs/tiny_compact.json --steps 200 --out results/ablation \
        --variants none,ac_selective,ac_full,compact:0.5,compact:0.25,compact:0.125,compact:0.25+ac_full,lowrank:0.125,subtoken:32
    for s in 128 512 2048; do                                                 # a sequence sweep
        python tools/ablate.py --config configs/tiny_compact.json --steps 50 --out results/seq$s \
            --variants none,ac_full,compact:0.25 --set data.seq_length=$s
    done
    python tools/ablate.py ... --nproc 2 --repeats 3                          # 2 ranks each, 3 repeats

Variants (comma-separated): ``none``, ``ac_selective``, ``ac_full``, or ``METHOD:ARG`` with an
optional ``+ac_selective`` / ``+ac_full``: ``compact:RANK``, ``lowrank:RANK`` (RANK a ratio of
the input width such as 0.25, or an absolute rank such as 64) and ``subtoken:GROUPS``, and the methods of ``--plugin MODULE`` (repeatable; added to the config's
``plugins`` list, so every run imports it). A variant changes only the compression method and
its option (rank, groups, ...) and the checkpointing mode of the config; see
actcomp_dist/ablation/variants.py for the full grammar.

Every variant trains the same model on the same data from the same initialisation with the real
training code (``Trainer``; ``--nproc N`` runs it on N ranks with the ``deepspeed`` launcher),
``--repeats`` times, back to back. Writes into ``--out``: ``results.csv``, ``results.md``,
``memory_vs_step_time.png``, ``loss_curves.png``, ``records.json`` (every run, with curves),
``meta.json`` (the set-up the report describes) and ``runs/VARIANT/repeatK/`` (config and
metrics.jsonl of each run). ``--report-only`` redraws the report from those two JSON files.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from actcomp_dist.training.cli import add_override_argument, add_plugin_argument

DEFAULT_VARIANTS = (
    "none,ac_selective,ac_full,compact:0.5,compact:0.25,compact:0.125,compact:0.25+ac_full,"
    "lowrank:0.125,subtoken:32"
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--config", required=True, help="base JSON run config (see configs/)")
    parser.add_argument(
        "--variants",
        default=DEFAULT_VARIANTS,
        help=f"comma-separated (default: {DEFAULT_VARIANTS})",
    )
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps per run")
    parser.add_argument("--out", required=True, help="output directory")
    add_override_argument(parser)
    add_plugin_argument(parser)
    parser.add_argument("--nproc", type=int, default=1, help="ranks per run (deepspeed launcher)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per variant, for the spread")
    parser.add_argument(
        "--warmup-steps",
        type=int,
        default=None,
        help="steps left out of the step-time median (default: min(5, steps // 4))",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: redo the tables and pictures from OUT/records.json and "
        "OUT/meta.json of an earlier run",
    )
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="keep the libraries' start-up warnings that actcomp_dist/training/quiet.py filters",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from actcomp_dist.training.quiet import quiet_third_party

    quiet_third_party(args.verbose)  # before megatron-core and DeepSpeed are imported
    from actcomp_dist.ablation import VariantError, parse_variants
    from actcomp_dist.ablation.orchestrate import (
        AblationError,
        AblationPlan,
        describe,
        run_ablation,
    )
    from actcomp_dist.ablation.report import summary_lines, write_report
    from actcomp_dist.ablation.variants import check_variants_run_here
    from actcomp_dist.training.config import (
        ConfigError,
        import_plugins,
        read_raw_config,
        with_plugins,
    )

    command = "python tools/ablate.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    out = Path(args.out)
    try:
        # Plugins first: the variants may name the methods they register.
        raw = with_plugins(read_raw_config(args.config, args.overrides), args.plugins)
        import_plugins(raw.get("plugins", []), f"{args.config}: plugins")
        variants = parse_variants(args.variants)
        if args.report_only:
            records = json.loads((out / "records.json").read_text())
            meta = json.loads((out / "meta.json").read_text())
            names = [v.name for v in variants]
            missing = sorted(set(names) - {r["variant"] for r in records})
            if missing:
                raise ValueError(f"{out / 'records.json'} has no runs of {missing}")
        else:
            check_variants_run_here(variants)
            plan = AblationPlan(
                config_path=Path(args.config),
                variants=variants,
                steps=args.steps,
                out=out,
                overrides=args.overrides,
                plugins=args.plugins,
                nproc=args.nproc,
                repeats=args.repeats,
                warmup_steps=args.warmup_steps,
            )
            records = run_ablation(plan)
            meta = describe(plan, records, command)
            (out / "records.json").write_text(json.dumps(records, indent=1))
            (out / "meta.json").write_text(json.dumps(meta, indent=1))
    except (VariantError, ConfigError, ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except AblationError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    rows = write_report(records, [v.name for v in variants], meta, out)
    print()
    for line in summary_lines(rows):
        print(line)
    written = ("results.csv", "results.md", "memory_vs_step_time.png", "loss_curves.png")
    print(f"wrote {', '.join(str(out / name) for name in written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
