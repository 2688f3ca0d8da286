r"""Predict per-GPU memory for a run config on a cluster, and the largest micro-batch that fits.

    python tools/memory_plan.py --config configs/llama1b_compact.json --gpus 8 --gpu-memory 80GB
    python tools/memory_plan.py --config configs/llama350m_baseline.json --gpus 1 \
        --gpu-memory 80GB --vocab-size 32000 --micro-batch 64 --seq-lengths 256,1024
    python tools/memory_plan.py --config configs/llama350m_compact.json --gpus 8 \
        --variants none,ac_full,compact:0.125,compact:0.25+ac_selective \
        --set parallel.tensor_parallel=2 --set parallel.sequence_parallel=true
    python tools/memory_plan.py --config configs/llama1b_compact.json --gpus 8 --vocab-size 32000 \
        --seq-lengths 4096 --budget 80GB --max-micro-batch --max-time-ratio 1.10 --json plan.json

Rows are variants in the grammar of tools/ablate.py (``none``, ``ac_selective``, ``ac_full``,
``METHOD:ARG[+ac_...]``, and ``naive`` / ``...+naive`` for the naive block that keeps what plain
autograd keeps; every other row is the memory-efficient block), columns sequence lengths;
``--plugin MODULE`` imports a module that registers more methods (README, "Adding a
compression method"). For each: saved activations per micro-batch
(exact per-layer formulas, validated byte for byte against the real model in
tests/integration/test_memory_plan.py), the predicted peak per GPU (model states under the config's ZeRO
stage and precision + saved activations + a transient estimate + ``--reserve``), whether it
fits in ``--gpu-memory``, and the largest micro-batch that does; for a compressed variant, per
site, what compressing it removes given what the rest of the variant keeps
(:mod:`actcomp_dist.site_effects`), with a warning line for every site that removes nothing.
The model is what the config
trains: its vocabulary is the tokenizer's (``data.tokenizer``; the embedded corpus's
``data.embedded_vocab_size`` when no data is configured) unless ``--vocab-size`` says otherwise
(32000 for the LLaMA tokenizer the published results use).

``--budget GB`` adds each variant's predicted step time over ``none``'s (an estimate from
counted flops and bytes, :mod:`actcomp_dist.cost_model`; ``--calibrate records.json`` fits it
to ``tools/ablate.py``'s measured step times) and, per sequence length, the fastest variant
that fits (``--max-micro-batch``: the one fitting the largest micro-batch within
``--max-time-ratio``). ``--json FILE`` writes everything printed (keys in README, "Choosing a
policy").
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from actcomp_dist.cost_model import (
    DEFAULT_HOST_BANDWIDTH,
    DEFAULT_MEMORY_BANDWIDTH,
    DEFAULT_PEAK_TFLOPS,
)
from actcomp_dist.training.cli import add_override_argument, add_plugin_argument

DEFAULT_VARIANTS = (
    "naive,none,ac_selective,ac_full,compact:0.5,compact:0.25,compact:0.125,"
    "compact:0.25+ac_selective,compact:0.25+ac_full"
)
#: The rows of ``--budget`` when ``--variants`` is not given: every exact policy and the
#: compressed one the published results use.
BUDGET_VARIANTS = (
    "none,ac_selective,ac_full,int8,fp8,compact:0.25,int8+ac_selective,fp8+ac_selective,"
    "compact:0.25+int8,compact:0.25+ac_selective"
)
DEFAULT_SEQ_LENGTHS = "256,512,1024,2048,4096,8192"
_UNITS = {
    "": 10**9,  # a bare number is GB
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(text: str, option: str) -> int:
    """``80GB`` -> 80e9, ``80GiB`` -> 80 * 2**30, ``80`` -> 80 GB."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(
            f"{option} {text!r} is not a size; use e.g. 80GB, 80GiB, 40960MiB (a bare number is GB)"
        )
    return int(float(match.group(1)) * _UNITS[unit])


def _fit_label(plan) -> str:
    if plan.fits:
        return "fits"
    return "OOM" if plan.total > plan.gpu_memory else "host OOM"


def _int_list(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{option} {text!r} must be comma-separated ints") from None
    if not values or any(v < 1 for v in values):
        raise ValueError(f"{option} {text!r} must be comma-separated positive ints")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("--config", required=True, help="JSON run config (see configs/)")
    add_override_argument(parser)
    add_plugin_argument(parser)
    parser.add_argument("--gpus", type=int, default=1, help="GPUs in the job (default 1)")
    parser.add_argument("--gpu-memory", default="80GB", help="memory per GPU (default 80GB)")
    parser.add_argument(
        "--variants",
        default=None,
        help=f"rows (ablate grammar; default {DEFAULT_VARIANTS}, with --budget {BUDGET_VARIANTS})",
    )
    parser.add_argument("--seq-lengths", default=DEFAULT_SEQ_LENGTHS, help="columns")
    parser.add_argument("--micro-batch", type=int, default=None, help="default: the config's")
    parser.add_argument("--zero-stage", type=int, default=None, help="default: the config's")
    parser.add_argument("--precision", default=None, choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--vocab-size", type=int, default=None, help="tokenizer vocabulary")
    parser.add_argument(
        "--reserve",
        default="2GiB",
        help="kept free per GPU for the CUDA context, communication buffers and "
        "fragmentation (default 2GiB)",
    )
    parser.add_argument(
        "--host-memory",
        default="256GB",
        help="pinned host memory per GPU the offload variants may fill (default 256GB: a "
        "DGX H100's 2 TB over its 8 GPUs); a variant whose offloaded activations exceed it "
        "does not fit",
    )
    parser.add_argument(
        "--budget",
        default=None,
        help="memory per GPU the policy must fit (replaces --gpu-memory): prints, per sequence "
        "length, the fastest variant whose predicted peak fits at the micro-batch",
    )
    parser.add_argument(
        "--max-micro-batch",
        action="store_true",
        help="with --budget: choose the variant that fits the largest micro-batch within "
        "--max-time-ratio instead",
    )
    parser.add_argument(
        "--max-time-ratio",
        type=str,
        default="1.10",
        help="with --max-micro-batch: the slowest predicted step time over none's (default 1.10)",
    )
    parser.add_argument(
        "--calibrate",
        default=None,
        help="tools/ablate.py's records.json, measured with this --config: fits the cost "
        "model's factor per kind of extra work to the measured step-time ratios",
    )
    parser.add_argument(
        "--peak-tflops",
        type=str,
        default=str(DEFAULT_PEAK_TFLOPS),
        help=f"cost model: dense bf16 TFLOP/s per GPU (default {DEFAULT_PEAK_TFLOPS:g})",
    )
    parser.add_argument(
        "--mem-bw",
        default=f"{DEFAULT_MEMORY_BANDWIDTH / 1e12:g}TB",
        help="cost model: memory bandwidth per GPU per second (default "
        f"{DEFAULT_MEMORY_BANDWIDTH / 1e12:g}TB)",
    )
    parser.add_argument(
        "--host-bw",
        default=f"{DEFAULT_HOST_BANDWIDTH / 1e9:g}GB",
        help="cost model: host <-> GPU (PCIe) bandwidth per direction per second, for the "
        f"offload policies (default {DEFAULT_HOST_BANDWIDTH / 1e9:g}GB)",
    )
    parser.add_argument("--json", default=None, help="also write everything printed to FILE")
    parser.add_argument(
        "--verbose",
        action="store_true",
        help="keep the libraries' start-up warnings that actcomp_dist/training/quiet.py filters",
    )
    return parser.parse_args(argv)


def _vocab(config, override: int | None) -> tuple[int, str]:
    if override is not None:
        return override, "--vocab-size"
    if config.data.tokenizer and Path(config.data.tokenizer).exists():
        from actcomp_dist.data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(config.data.tokenizer)  # SentencePiece or tokenizer.json
        return tokenizer.vocab_size, f"tokenizer {config.data.tokenizer}"
    if not config.data.paths:
        return (
            config.data.embedded_vocab_size,
            "the embedded corpus's tokenizer (pass --vocab-size 32000 for LLaMA's)",
        )
    raise ValueError("data.tokenizer is not readable here; pass --vocab-size")


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f}"


def _table(title: str, header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" if i == 0 else f"{{:>{w}}}" for i, w in enumerate(widths))
    return ["", title, fmt.format(*header), *[fmt.format(*r) for r in rows]]


def _number(text: str, option: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{option} {text!r} is not a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{option} {text!r} must be a finite number")
    return value


def _ratio_text(ratio: float | None) -> str:
    return "n/a" if ratio is None else f"{ratio:.3f}"


def choose_policy(
    rows: dict[str, dict],
    *,
    max_micro_batch: bool,
    max_time_ratio: float,
) -> dict | None:
    """The ``--budget`` choice among ``rows`` (variant -> ``fits``, ``step_time_ratio``,
    ``max_micro_batch`` at one sequence length): the fastest that fits, or (``max_micro_batch``)
    the one that fits the largest micro-batch within ``max_time_ratio``, ties to the faster;
    ``None`` when none qualifies. Variants without a cost model never qualify."""
    timed = {name: r for name, r in rows.items() if r["step_time_ratio"] is not None}
    if max_micro_batch:
        pool = {
            n: r
            for n, r in timed.items()
            if r["max_micro_batch"] > 0 and r["step_time_ratio"] <= max_time_ratio
        }
        key = lambda n: (-pool[n]["max_micro_batch"], pool[n]["step_time_ratio"])  # noqa: E731
    else:
        pool = {n: r for n, r in timed.items() if r["fits"]}
        key = lambda n: pool[n]["step_time_ratio"]  # noqa: E731
    if not pool:
        return None
    ranked = sorted(pool, key=key)
    best = ranked[0]
    choice = {"variant": best, **pool[best]}
    if max_micro_batch:
        reason = (
            f"largest micro-batch ({pool[best]['max_micro_batch']}) among the "
            f"{len(pool)} variants predicted within {max_time_ratio:g}x of none's step time"
        )
    else:
        faster = sorted(
            (n for n, r in timed.items() if r["step_time_ratio"] < pool[best]["step_time_ratio"]),
            key=lambda n: timed[n]["step_time_ratio"],
        )
        reason = f"fastest of the {len(pool)} variants that fit"
        if faster:
            reason += f"; faster but over the budget: {', '.join(faster)}"
    choice["reason"] = reason
    return choice


def _site_effect_lines(report, variants, seq_lengths, micro_batch, effects_of) -> list[str]:
    """The per-site table of what compression removes (``report["site_effects"]`` filled in
    on the way) and a plain-words warning per site that removes nothing at some length."""
    rows, warnings = [], []
    for variant in variants:
        per_seq = {s: effects_of(variant, s, micro_batch) for s in seq_lengths}
        if not per_seq[seq_lengths[0]]:
            continue  # nothing compressed
        report["site_effects"][variant.name] = {
            str(s): {
                e.site: {
                    "saved_with": e.saved_with,
                    "saved_without": e.saved_without,
                    "removed": e.removed,
                    "all_gather_with": e.all_gather_with,
                    "all_gather_without": e.all_gather_without,
                    "weight_gradient_flops_with": e.weight_gradient_flops_with,
                    "weight_gradient_flops_without": e.weight_gradient_flops_without,
                }
                for e in effects
            }
            for s, effects in per_seq.items()
        }
        last = {e.site: e for e in per_seq[seq_lengths[-1]]}
        for site, effect in last.items():
            removed = [next(e for e in per_seq[s] if e.site == site).removed for s in seq_lengths]
            flops = (
                f"{effect.weight_gradient_flops_with / effect.weight_gradient_flops_without:.2f}x"
                if effect.weight_gradient_flops_with is not None
                else "n/a"
            )
            gather = (
                f"{_gb(effect.all_gather_without)} -> {_gb(effect.all_gather_with)}"
                if effect.all_gather_with is not None
                else "-"
            )
            rows.append([f"{variant.name} {site}"] + [f"{r / 1e9:+.2f}" for r in removed])
            rows[-1] += [flops, gather]
            adds = [s for s, r in zip(seq_lengths, removed, strict=True) if r <= 0]
            if adds:
                where = (
                    "any sequence length"
                    if len(adds) == len(seq_lengths)
                    else "s = " + ", ".join(map(str, adds))
                )
                warnings.append(
                    f"warning: in {variant.name}, compressing {site} removes no saved "
                    f"activations at {where} (its input is kept by a neighbouring op anyway, "
                    f"or not kept at all): leave it out of compression.sites unless its "
                    f"model-state or flop saving is wanted"
                )
    if not rows:
        return []
    header = (
        ["variant, site"]
        + [f"s={s}" for s in seq_lengths]
        + ["wgrad flops", f"bwd all-gather (SP) s={seq_lengths[-1]}"]
    )
    title = (
        f"What compressing each site removes per GPU (GB of saved activations per micro-batch "
        f"of {micro_batch}, without it minus with it, the rest of the variant unchanged; "
        f"negative: it adds); weight-gradient flops over the exact g^T X; backward all-gather "
        f"bytes this GPU contributes, without -> with:"
    )
    return _table(title, header, rows) + warnings


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from actcomp_dist.training.quiet import quiet_third_party

    quiet_third_party(args.verbose)  # before megatron-core and DeepSpeed are imported
    import json

    from actcomp_dist.ablation import VariantError, parse_variants
    from actcomp_dist.cost_model import Device, calibrate, measured_ratios, predict_step_time
    from actcomp_dist.memory_model import (
        largest_micro_batch,
        plan_memory,
        predict_model_states,
    )
    from actcomp_dist.models import check_tensor_parallel, get_model_config
    from actcomp_dist.site_effects import site_effects
    from actcomp_dist.training.config import (
        ConfigError,
        read_raw_config,
        run_config_from_dict,
        with_plugins,
    )
    from actcomp_dist.training.model_states import lr_factors
    from actcomp_dist.training.trainer import padded_vocab_size

    try:
        gpu_memory = parse_size(args.gpu_memory, "--gpu-memory")
        if args.budget is not None:
            gpu_memory = parse_size(args.budget, "--budget")
        reserve = parse_size(args.reserve, "--reserve")
        host_memory = parse_size(args.host_memory, "--host-memory")
        memory_bandwidth = parse_size(args.mem_bw, "--mem-bw")
        host_bandwidth = parse_size(args.host_bw, "--host-bw")
        args.peak_tflops = _number(args.peak_tflops, "--peak-tflops")
        args.max_time_ratio = _number(args.max_time_ratio, "--max-time-ratio")
        if not args.peak_tflops > 0 or memory_bandwidth <= 0 or host_bandwidth <= 0:
            raise ValueError(
                f"--peak-tflops {args.peak_tflops}, --mem-bw {args.mem_bw} and --host-bw "
                f"{args.host_bw} must be positive"
            )
        if not args.max_time_ratio >= 1.0:
            raise ValueError(f"--max-time-ratio {args.max_time_ratio} must be >= 1 (none is 1)")
        if args.max_micro_batch and args.budget is None:
            raise ValueError("--max-micro-batch chooses a policy: it needs --budget GB")
        seq_lengths = _int_list(args.seq_lengths, "--seq-lengths")
        # The config first: it imports the plugins, whose methods the variants may name.
        raw = with_plugins(read_raw_config(args.config, args.overrides), args.plugins)
        config = run_config_from_dict(raw, source=args.config)
        default_variants = DEFAULT_VARIANTS if args.budget is None else BUDGET_VARIANTS
        variants = parse_variants(args.variants or default_variants)
        if args.gpus < 1:
            raise ValueError(f"--gpus {args.gpus} must be >= 1")
        if args.micro_batch is not None and args.micro_batch < 1:
            raise ValueError(f"--micro-batch {args.micro_batch} must be >= 1")
        tp = config.parallel.tensor_parallel
        if args.gpus % tp:
            raise ValueError(f"--gpus {args.gpus} is not divisible by tensor_parallel={tp}")
        vocab, vocab_source = _vocab(config, args.vocab_size)
        overrides = dict(config.model.overrides)
        overrides["vocab_size"] = overrides.get("vocab_size", padded_vocab_size(vocab, tp))
        overrides.pop("seq_length", None)
        model = get_model_config(config.model.name, **overrides)
        check_tensor_parallel(model, tp)
        records = None
        if args.calibrate is not None:
            try:
                records = json.loads(Path(args.calibrate).read_text())
                measured = measured_ratios(records)
            except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
                raise ValueError(
                    f"--calibrate {args.calibrate}: not tools/ablate.py's records.json with a "
                    f"'none' run ({type(err).__name__}: {err})"
                ) from None
    except (ValueError, VariantError, ConfigError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    dp = args.gpus // tp
    micro_batch = args.micro_batch or config.train.micro_batch_size
    precision = args.precision or config.train.precision
    zero = config.deepspeed.get("zero_optimization", {})
    zero_stage = args.zero_stage if args.zero_stage is not None else zero.get("stage", 0)
    bucket = int(zero.get("reduce_bucket_size", 500_000_000))
    dtype_bytes = 4 if precision == "fp32" else 2
    device = Device(args.peak_tflops * 1e12, memory_bandwidth, host_bandwidth)

    def setting_of(variant, seq, batch):
        return variant.activation_setting(
            config.memory,
            batch,
            seq,
            dtype_bytes=dtype_bytes,
            tensor_parallel=tp,
            sequence_parallel=config.parallel.sequence_parallel,
            device_type="cuda",  # the planner sizes GPUs
        )

    factors = lr_factors(config)  # train.lr_scale decides the optimizer's param groups

    def plan(variant, seq, batch):
        return plan_memory(
            model.replace(seq_length=seq),
            variant.compression(config.compression),
            setting_of(variant, seq, batch),
            ac_mode=variant.ac_mode,
            ac_num_layers=config.activation_checkpointing.num_layers,
            precision=precision,
            zero_stage=zero_stage,
            data_parallel=dp,
            gpu_memory=gpu_memory,
            reserve=reserve,
            host_memory=host_memory,
            reduce_bucket_size=bucket,
            lr_factors=factors,
        )

    def step_time(variant, seq, batch):
        # The naive block's extra work (it saves more, recomputes nothing) is not modelled.
        if not variant.efficient_ops:
            return None
        return predict_step_time(
            model,
            variant.compression(config.compression),
            seq_length=seq,
            micro_batch_size=batch,
            ac_mode=variant.ac_mode,
            ac_num_layers=config.activation_checkpointing.num_layers,
            storage=variant.storage,
            block_input=variant.block_input,
            device=device,
        )

    def effects_of(variant, seq, batch):
        return site_effects(
            model.replace(seq_length=seq),
            variant.compression(config.compression),
            setting_of(variant, seq, batch),
            variant.ac_mode,
            config.activation_checkpointing.num_layers,
        )

    factors = None
    if records is not None:
        # The records were measured with this config: its sequence length and micro-batch.
        known = {v.name: v for v in parse_variants(",".join(sorted(measured)))}
        predicted = {
            name: step_time(v, config.data.seq_length, config.train.micro_batch_size)
            for name, v in known.items()
        }
        factors = calibrate(measured, {n: p for n, p in predicted.items() if p is not None})

    def ratio(variant, seq, batch):
        predicted = step_time(variant, seq, batch)
        return None if predicted is None else predicted.ratio(factors)

    first = plan(variants[0], seq_lengths[0], micro_batch)
    lowest_states = min(
        plan(v, seq_lengths[0], micro_batch).states.total + reserve for v in variants
    )
    if args.budget is not None and lowest_states > gpu_memory:
        print(
            f"error: --budget {args.budget} is below the model states plus --reserve of every "
            f"variant (at least {lowest_states / 1e9:.2f} GB per GPU); use more GPUs, a higher "
            "ZeRO stage or a larger budget",
            file=sys.stderr,
        )
        return 2
    report: dict = {
        "config": args.config,
        "model": config.model.name,
        "parameters": first.states.parameters_count,
        "vocab_size": model.vocab_size,
        "gpus": args.gpus,
        "gpu_memory": gpu_memory,
        "tensor_parallel": tp,
        "data_parallel": dp,
        "zero_stage": zero_stage,
        "precision": precision,
        "micro_batch": micro_batch,
        "reserve": reserve,
        "host_memory": host_memory,
        "seq_lengths": seq_lengths,
        "variants": [v.name for v in variants],
        "cost_model": {
            "peak_tflops": args.peak_tflops,
            "memory_bandwidth": memory_bandwidth,
            "host_bandwidth": host_bandwidth,
            "calibration": args.calibrate,
            "factors": factors,
        },
        "model_states": {},
        "saved_activations": {},
        "host_offload": {},
        "peak": {},
        "fits": {},
        "max_micro_batch": {},
        "step_time_ratio": {},
        "site_effects": {},
        "budget_choice": None,
    }
    lines = [
        f"{args.config}: LLaMA {config.model.name}, {first.states.parameters_count:,} parameters "
        f"(vocabulary {model.vocab_size} from {vocab_source})",
        f"cluster: {args.gpus} GPUs x {gpu_memory / 1e9:.0f} GB | TP {tp}"
        f"{' + SP' if config.parallel.sequence_parallel and tp > 1 else ''}, DP {dp} | "
        f"ZeRO-{zero_stage} | {precision} | micro-batch {micro_batch} | reserve "
        f"{reserve / 1e9:.1f} GB per GPU",
    ]
    state_rows, seen = [], set()
    for variant in variants:
        compression = variant.compression(config.compression)
        states = predict_model_states(
            model,
            compression,
            precision=precision,
            zero_stage=zero_stage,
            data_parallel=dp,
            tensor_parallel=tp,
            reduce_bucket_size=bucket,
            lr_factors=factors,
        )
        report["model_states"][variant.name] = {
            "parameters": states.parameters,
            "gradients": states.gradients,
            "optimizer_state": states.optimizer_state,
            "engine_buffers": states.engine_buffers,
            "projection_cache": states.projection_cache,
            "total": states.total,
        }
        key = (compression.method, compression.grad_mode, compression.rank)
        if key in seen:
            continue
        seen.add(key)
        label = "uncompressed" if compression.method == "none" else variant.name.split("+")[0]
        state_rows.append(
            [
                f"{label} ({compression.grad_mode})",
                _gb(states.parameters),
                _gb(states.gradients),
                _gb(states.optimizer_state),
                _gb(states.engine_buffers),
                _gb(states.projection_cache),
                _gb(states.total),
                _gb(states.detail["dp_reduction_bytes"]["compressed"]),
                _gb(states.detail["dp_reduction_bytes"]["ordinary"]),
            ]
        )
    lines += _table(
        "Model states per GPU (GB):",
        [
            "",
            "parameters",
            "gradients",
            "optimizer",
            "DS bucket",
            "P cache",
            "total",
            "| DP grads: m x r",
            "other",
        ],
        state_rows,
    )
    header = ["variant"] + [f"s={s}" for s in seq_lengths]
    activation_rows, peak_rows, batch_rows, time_rows, host_rows = [], [], [], [], []
    for variant in variants:
        name = variant.name
        plans = [plan(variant, s, micro_batch) for s in seq_lengths]
        batches = [
            largest_micro_batch(lambda b, v=variant, s=s: plan(v, s, b)) for s in seq_lengths
        ]
        ratios = [ratio(variant, s, micro_batch) for s in seq_lengths]
        report["saved_activations"][name] = {
            str(s): p.activations.total for s, p in zip(seq_lengths, plans, strict=True)
        }
        report["peak"][name] = {str(s): p.total for s, p in zip(seq_lengths, plans, strict=True)}
        if variant.offloads:
            report["host_offload"][name] = {
                str(s): p.activations.host_total for s, p in zip(seq_lengths, plans, strict=True)
            }
            host_rows.append([name] + [_gb(p.activations.host_total) for p in plans])
        report["fits"][name] = {str(s): p.fits for s, p in zip(seq_lengths, plans, strict=True)}
        report["max_micro_batch"][name] = dict(zip(map(str, seq_lengths), batches, strict=True))
        report["step_time_ratio"][name] = dict(zip(map(str, seq_lengths), ratios, strict=True))
        activation_rows.append([name] + [_gb(p.activations.total) for p in plans])
        peak_rows.append([name] + [f"{_gb(p.total)} {_fit_label(p)}" for p in plans])
        batch_rows.append([name] + [str(b) for b in batches])
        time_rows.append([name] + [_ratio_text(r) for r in ratios])
    lines += _table(
        f"Saved activations per micro-batch per GPU (GB), micro-batch {micro_batch}:",
        header,
        activation_rows,
    )
    if host_rows:
        lines += _table(
            f"Host memory per micro-batch per GPU (GB), offloaded (pinned; not in the peak), "
            f"micro-batch {micro_batch}, vs --host-memory {host_memory / 1e9:g} GB:",
            header,
            host_rows,
        )
    lines += _table(
        f"Predicted peak per GPU (GB) at micro-batch {micro_batch} vs {gpu_memory / 1e9:.0f} GB:",
        header,
        peak_rows,
    )
    lines += _table("Largest micro-batch that fits (0: not even 1):", header, batch_rows)
    calibration = (
        f"calibrated by {args.calibrate}: factors "
        + ", ".join(f"{k} {v:.2f}" for k, v in factors.items())
        if factors is not None
        else "uncalibrated"
    )
    lines += _table(
        f"Predicted step time over none's at micro-batch {micro_batch} (an estimate: "
        f"{args.peak_tflops:g} TFLOP/s, {memory_bandwidth / 1e12:g} TB/s, host link "
        f"{host_bandwidth / 1e9:g} GB/s, {calibration}):",
        header,
        time_rows,
    )
    lines += _site_effect_lines(report, variants, seq_lengths, micro_batch, effects_of)
    if args.budget is not None:
        choices = {}
        for s in seq_lengths:
            rows = {
                v.name: {
                    "fits": report["fits"][v.name][str(s)],
                    "peak": report["peak"][v.name][str(s)],
                    "max_micro_batch": report["max_micro_batch"][v.name][str(s)],
                    "step_time_ratio": report["step_time_ratio"][v.name][str(s)],
                }
                for v in variants
            }
            if args.max_micro_batch:
                # The time at the micro-batch the variant would run.
                for v in variants:
                    best = rows[v.name]["max_micro_batch"]
                    if best:
                        rows[v.name]["step_time_ratio"] = ratio(v, s, best)
            choices[str(s)] = choose_policy(
                rows, max_micro_batch=args.max_micro_batch, max_time_ratio=args.max_time_ratio
            )
        report["budget_choice"] = choices
        goal = (
            f"the largest micro-batch within {args.max_time_ratio:g}x of none's step time"
            if args.max_micro_batch
            else f"the fastest that fits at micro-batch {micro_batch}"
        )
        lines += ["", f"Policy for a {gpu_memory / 1e9:g} GB budget per GPU ({goal}):"]
        for s in seq_lengths:
            c = choices[str(s)]
            if c is None:
                lines.append(f"  s={s}: nothing fits")
                continue
            lines.append(
                f"  s={s}: {c['variant']} (step time {c['step_time_ratio']:.3f}x none, peak "
                f"{_gb(c['peak'])} GB, largest micro-batch {c['max_micro_batch']}): {c['reason']}"
            )
    lines += [
        "",
        "Activations: exact formulas (tests/integration/test_memory_plan.py). Model states: DeepSpeed's "
        "ZeRO accounting at the optimizer step, checked against the bytes of live tensors "
        "(tests/distributed/test_model_states.py); 'DP grads': gradient bytes each rank hands to the "
        "data-parallel reduction per step (subspace m x r gradients, all others). The peak "
        "adds an estimate "
        "of backward's transient (logits and their fp32 gradient, one activation gradient, one "
        "recomputed block under checkpointing) and the reserve; it assumes a flash / "
        "memory-efficient attention kernel (no s x s matrix). Step times: counted flops and "
        "bytes (actcomp_dist/cost_model.py), not measured; n/a: no cost model for the variant.",
    ]
    print("\n".join(lines))
    if args.json is not None:
        report["text"] = "\n".join(lines)
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
