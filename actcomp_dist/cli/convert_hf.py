"""Convert LLaMA weights between a Hugging Face directory and our tensor-parallel shards.

    # Hugging Face (config.json + safetensors, sharded or not) -> per-TP-rank shards
    actcomp-convert-hf to-tp /models/llama-2-7b-hf /ckpt/llama7b_tp8 --tp 8

    # our shards, or a training run (ZeRO 0-3), -> Hugging Face layout
    actcomp-convert-hf to-tp ... ; actcomp-convert-hf to-hf \
        /ckpt/llama7b_tp8 /models/llama7b-out --base /models/llama-2-7b-hf
    actcomp-convert-hf to-hf runs/x out_hf --dtype bfloat16     # newest step
    actcomp-convert-hf to-hf runs/x/checkpoints/step_0000100 out_hf

(``python tools/convert_hf_llama.py`` is the same command.)

A training run does not need ``to-tp``: the fine-tuning launcher loads a Hugging Face directory
directly, each rank reading only its own slices (:func:`actcomp_dist.models.hf.build_llama_from_hf`).
``to-tp`` pre-shards once for runs that restart often. Everything here runs on one CPU process
(no process group); the conversion is renaming, fusing and slicing, so HF -> TP -> HF gives
back the same bytes.

``to-hf`` from a run accepts the run directory, its ``checkpoints/`` folder or one
``step_NNNNNNN`` checkpoint; for the first two it converts the newest *complete* step (the one
with its ``COMPLETE`` marker; an interrupted save is never read). The model config comes from
that step's ``trainer.json``. ZeRO-3 checkpoints (parameters partitioned over the ranks) are
consolidated with DeepSpeed's own ``zero_to_fp32`` reader (fp32 masters; tensor parallelism 1).
``--model-config``: for a bare DeepSpeed checkpoint without ``trainer.json``, a JSON file with the
:class:`~actcomp_dist.models.LlamaConfig` fields, or a ``trainer.json`` whose ``model_config``
entry holds them.

The export of a run carries the tokenizer the run trained with, its special-token ids and a
``generation_config.json`` (:mod:`actcomp_dist.models.hf_tokenizer`), so ``AutoTokenizer`` and
``AutoModelForCausalLM(...).generate`` work on the output directory. The tokenizer is the run's
``data.tokenizer`` or, without one, the embedded corpus's under the run directory; when the
checkpoint recorded the tokenizer's SHA-256, a file that no longer matches it is refused.
``--tokenizer PATH`` names it explicitly (needed for a to-tp directory or a bare DeepSpeed
checkpoint; ``--base`` copies the base model's tokenizer files instead).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from actcomp_dist.models import LlamaConfig, merge_shards
from actcomp_dist.models.hf import (
    DEFAULT_MAX_SHARD_BYTES,
    TP_CONFIG_NAME,
    config_to_hf,
    copy_companion_files,
    read_deepspeed_shards,
    read_hf_config,
    read_hf_rank_state_dict,
    read_tp_shards,
    save_hf_checkpoint,
    write_tp_shards,
)
from actcomp_dist.models.hf_tokenizer import special_token_ids, write_tokenizer_files
from actcomp_dist.models.weights import weight_layout

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def to_tp(args: argparse.Namespace) -> None:
    config = read_hf_config(args.source, params_dtype=args.dtype)
    shards = []
    for rank in range(args.tp):
        shard = read_hf_rank_state_dict(args.source, config, rank, args.tp)
        shards.append({n: t.to(config.params_dtype) for n, t in shard.items()})
    write_tp_shards(args.output, config, shards)
    print(f"wrote {args.tp} shards of {args.source} to {args.output}")


def _model_config(path: Path) -> LlamaConfig:
    values = json.loads(path.read_text())
    return LlamaConfig.from_dict(values.get("model_config", values))


def resolve_checkpoint(source: Path) -> Path:
    """A run directory, its ``checkpoints/`` folder or one step -> the step to convert: the
    newest complete one. Anything else is returned as given (a bare DeepSpeed directory)."""
    from actcomp_dist.training.checkpoint import MARKER, complete_checkpoints

    if (source / MARKER).is_file():
        return source
    candidates = [source / "checkpoints", source]
    run_config = source / "config.json"
    if run_config.is_file():  # a run directory whose checkpoint.dir points elsewhere
        configured = json.loads(run_config.read_text()).get("checkpoint", {}).get("dir")
        if configured:
            candidates.insert(0, Path(configured))
    for directory in candidates:
        found = complete_checkpoints(directory)
        if found:
            return found[-1]
    if any(d.is_dir() and any(d.glob("step_*")) for d in candidates):
        raise ValueError(
            f"{source} holds no complete checkpoint (no step_*/{MARKER}: every save was "
            f"interrupted); nothing to convert"
        )
    return source


def _read_zero3_shards(checkpoint: Path, config: LlamaConfig) -> list[dict[str, torch.Tensor]]:
    """The consolidated fp32 parameters of a ZeRO-3 step (DeepSpeed's zero_to_fp32 reads
    ``checkpoint/<its tag>``, the tag being the step's name)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=checkpoint.name)
    names = [e.parameter for e in weight_layout(config)]
    missing = [n for n in names if n not in state]
    if missing:
        raise ValueError(f"{checkpoint} lacks {missing[:4]}: not a checkpoint of this model config")
    return [{n: state[n] for n in names}]


def run_tokenizer(checkpoint: Path, state: dict) -> Path:
    """The tokenizer a run trained with, from a checkpoint's ``trainer.json`` ``state``: its
    ``data.tokenizer``, or the embedded corpus's under the run directory. Raises
    ``ValueError`` naming ``--tokenizer`` when it is gone or differs from the one recorded."""
    from actcomp_dist.data.corpus import embedded_corpus_directory
    from actcomp_dist.data.tokenizer import HF_TOKENIZER_FILE, SENTENCEPIECE_FILE
    from actcomp_dist.training.checkpoint import file_sha256

    data = state["config"].get("data", {})
    if data.get("tokenizer"):
        path = Path(data["tokenizer"])
        if path.is_dir():  # a directory holding one (load_tokenizer's order)
            path = next(
                (path / n for n in (HF_TOKENIZER_FILE, SENTENCEPIECE_FILE) if (path / n).is_file()),
                path / SENTENCEPIECE_FILE,
            )
        where = f"data.tokenizer={data['tokenizer']!r}"
    else:
        # The run directory as configured, or the one this checkpoint sits in (moved runs).
        run_dirs = [Path(state["config"]["run_dir"]), checkpoint.parent.parent]
        vocab = data.get("embedded_vocab_size", 2048)
        found = [
            embedded_corpus_directory(d / "data", vocab_size=vocab) / "tokenizer.model"
            for d in run_dirs
        ]
        path = next((f for f in found if f.is_file()), None)
        where = f"the embedded corpus's tokenizer (looked for {found[0]})"
    if path is None or not path.is_file():
        raise ValueError(
            f"{checkpoint}: the run's tokenizer is not there ({where}); pass --tokenizer PATH "
            f"(the .model or tokenizer.json it trained with)"
        )
    recorded = state.get("fingerprint", {}).get("fingerprint.tokenizer")
    if recorded is not None and file_sha256(path) != recorded:
        raise ValueError(
            f"{checkpoint}: tokenizer {path} changed since the run (SHA-256 differs from the "
            f"one in trainer.json); pass --tokenizer PATH with the file it trained with"
        )
    return path


def read_run_checkpoint(
    source: Path, model_config: Path | None = None
) -> tuple[LlamaConfig, list[dict[str, torch.Tensor]], Path, dict | None]:
    """``(model config, every TP rank's parameters, the step read, its trainer.json or None)``
    of a run directory, its ``checkpoints/`` folder, one step or a bare DeepSpeed checkpoint
    (``model_config``: the :class:`LlamaConfig` JSON of the latter)."""
    source = resolve_checkpoint(source)
    trainer_json = source / "trainer.json"
    model_config = model_config or trainer_json
    if not model_config.is_file():
        raise ValueError(
            f"{source} is neither a to-tp directory nor a checkpoint of a run (no "
            f"trainer.json); for a bare DeepSpeed checkpoint pass --model-config"
        )
    config = _model_config(model_config)
    state = json.loads(trainer_json.read_text()) if trainer_json.is_file() else None
    run = state["config"] if state else {}
    stage = run.get("deepspeed", {}).get("zero_optimization", {}).get("stage", 0)
    if stage == 3:
        tp = run.get("parallel", {}).get("tensor_parallel", 1)
        if tp != 1:
            raise ValueError(
                f"{source}: ZeRO-3 at parallel.tensor_parallel={tp} cannot be consolidated "
                f"(DeepSpeed's zero_to_fp32 reads one model-parallel rank); train with ZeRO "
                f"1-2 at TP > 1, or ZeRO-3 at TP 1"
            )
        shards = _read_zero3_shards(source, config)
    else:
        shards = read_deepspeed_shards(source, config)
    return config, shards, source, state


def to_hf(args: argparse.Namespace) -> None:
    source = Path(args.source)
    tokenizer = Path(args.tokenizer) if args.tokenizer else None
    if (source / TP_CONFIG_NAME).is_file():
        config, shards = read_tp_shards(source)
    else:
        model_config = Path(args.model_config) if args.model_config else None
        config, shards, source, state = read_run_checkpoint(source, model_config)
        if tokenizer is None and state is not None and not args.base:
            tokenizer = run_tokenizer(source, state)
        print(f"converting {source}")
    dtype = _DTYPES[args.dtype] if args.dtype else config.params_dtype
    full = merge_shards(shards, config)
    base = None
    if args.base:
        base = json.loads((Path(args.base) / "config.json").read_text())
    hf_config = config_to_hf(config, dtype=dtype, base=base)
    if tokenizer is not None:
        hf_config.update(special_token_ids(tokenizer))
    save_hf_checkpoint(
        args.output,
        {name: t.to(dtype) for name, t in full.items()},
        hf_config,
        max_shard_bytes=args.max_shard_bytes,
    )
    copy_companion_files(args.base, args.output)
    if tokenizer is not None:
        write_tokenizer_files(args.output, tokenizer, model_max_length=config.seq_length)
    print(
        f"wrote {source} ({len(shards)} TP shards) to {args.output} as Hugging Face LLaMA"
        + (f" with tokenizer {tokenizer}" if tokenizer is not None else " (no tokenizer)")
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    tp = commands.add_parser("to-tp", help="Hugging Face directory -> per-TP-rank shards")
    tp.add_argument("source", help="Hugging Face LLaMA directory")
    tp.add_argument("output")
    tp.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    tp.add_argument("--dtype", choices=sorted(_DTYPES), help="cast (default: the checkpoint's)")
    tp.set_defaults(run=to_tp)
    hf = commands.add_parser("to-hf", help="our shards or a DeepSpeed checkpoint -> Hugging Face")
    hf.add_argument(
        "source",
        help="a to-tp directory, a run directory, its checkpoints/ folder or one step",
    )
    hf.add_argument("output")
    hf.add_argument("--model-config", help="LlamaConfig JSON (DeepSpeed checkpoints)")
    hf.add_argument(
        "--base",
        help="Hugging Face directory whose other config fields and tokenizer files to keep",
    )
    hf.add_argument(
        "--tokenizer",
        help="the tokenizer to ship (.model or tokenizer.json; default: the run's)",
    )
    hf.add_argument("--dtype", choices=sorted(_DTYPES), help="cast (default: the model's)")
    hf.add_argument("--max-shard-bytes", type=int, default=DEFAULT_MAX_SHARD_BYTES)
    hf.set_defaults(run=to_hf)
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
