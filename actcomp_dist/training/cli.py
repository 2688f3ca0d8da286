"""Command line of the launchers (``launch/pretrain.py``, ``launch/finetune.py``):
``--config FILE [--deepspeed_config FILE] [--set key.path=value ...]``, and their exit status
(:func:`exit_status`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from actcomp_dist.seeds import SeedMismatchError
from actcomp_dist.training.checkpoint import CheckpointError
from actcomp_dist.training.config import ConfigError, load_run_config
from actcomp_dist.training.distributed import launch_info
from actcomp_dist.training.guard import NONFINITE_EXIT_CODE, NonFiniteError
from actcomp_dist.training.quiet import quiet_third_party

# Ranks computed different projection seeds (actcomp_dist/seeds.py); 4 is the hung-rank
# watchdog's (actcomp_dist/training/watchdog.py).
SEED_MISMATCH_EXIT_CODE = 5

PRETRAIN_DESCRIPTION = (
    "Pretrain a LLaMA model with compressed activations (DeepSpeed + Megatron-core TP)."
)


def add_override_argument(parser: argparse.ArgumentParser) -> None:
    """``--set KEY.PATH=VALUE`` (repeatable), the same in every tool that reads a run config."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override a config value; VALUE is parsed as JSON when it parses, else a string",
    )


def add_plugin_argument(parser: argparse.ArgumentParser) -> None:
    """``--plugin MODULE`` (repeatable): added to the config's ``plugins`` list, the same in
    every tool that reads a run config and a variant list (modules are imported before either
    is checked, and the runs a tool starts import them too)."""
    parser.add_argument(
        "--plugin",
        dest="plugins",
        action="append",
        default=[],
        metavar="MODULE",
        help="import MODULE (on PYTHONPATH) before reading the config and the variants, e.g. "
        "a module that registers a compression method; added to the config's plugins list",
    )


def parse_args(
    argv: list[str] | None = None, description: str = PRETRAIN_DESCRIPTION
) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", required=True, help="JSON run config (see configs/)")
    parser.add_argument(
        "--deepspeed_config",
        "--deepspeed-config",
        default=None,
        metavar="FILE",
        help="a DeepSpeed JSON config used as the run config's deepspeed section (keys set in "
        "both must agree; 'auto' for the batch sizes, clipping and precision, which come from "
        "train.*)",
    )
    # DeepSpeed's add_config_arguments pairs --deepspeed_config with a --deepspeed switch;
    # accepted so that command lines written for it work (DeepSpeed is always used here).
    parser.add_argument("--deepspeed", action="store_true", help=argparse.SUPPRESS)
    add_override_argument(parser)
    # Added by the deepspeed launcher; the rank layout is read from the environment.
    parser.add_argument(
        "--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS
    )
    return parser.parse_args(argv)


def load_config(args: argparse.Namespace, config_class: type | None = None):
    """The run config the command line names (``config_class``, default ``RunConfig``): the
    file, then ``--deepspeed_config``, then each ``--set`` override; the config's plugins are
    imported first, so their methods validate. Then the third-party log filters it asks for:
    megatron-core and DeepSpeed print at import, so they go before the trainer loads."""
    config = load_run_config(
        args.config,
        args.overrides,
        config_class=config_class,
        deepspeed_file=args.deepspeed_config,
    )
    quiet_third_party(config.logging.verbose)
    return config


def exit_status(train: Callable[[], Any]) -> int:
    """Run ``train`` (load a config, build a run, train it; returns a
    :class:`~actcomp_dist.training.trainer.TrainResult`) under the launchers' error contract
    and return the process's exit status: 0 done or preempted, 2 a user error (config, data,
    checkpoint: one line on every rank's stderr, raised before any collective, so nothing is
    written and nothing hangs), 3 training stopped on a non-finite loss or gradient norm
    (:mod:`actcomp_dist.training.guard`), 4 a rank stopped progressing (the watchdog,
    :mod:`actcomp_dist.training.watchdog`, ends the process itself), 5 the ranks disagree on
    projection seeds (:func:`actcomp_dist.seeds.check_seed_agreement`)."""
    try:
        result = train()
    except (ConfigError, CheckpointError, FileNotFoundError) as err:
        info = launch_info()
        print(f"error (rank {info.rank}/{info.world_size}): {err}", file=sys.stderr, flush=True)
        return 2
    except NonFiniteError as err:
        info = launch_info()
        print(f"stopped (rank {info.rank}/{info.world_size}): {err}", file=sys.stderr, flush=True)
        return NONFINITE_EXIT_CODE
    except SeedMismatchError as err:
        info = launch_info()
        print(f"stopped (rank {info.rank}/{info.world_size}): {err}", file=sys.stderr, flush=True)
        return SEED_MISMATCH_EXIT_CODE
    if result.preempted and launch_info().rank == 0:  # every rank knows; one says it
        print(
            f"stopped at step {result.steps_done} on a preemption signal; resume with "
            f"checkpoint.resume=latest",
            flush=True,
        )
    return 0


def main(
    argv: list[str] | None = None,
    *,
    config_class: type | None = None,
    run: Callable[[Any], Any] | None = None,
    description: str = PRETRAIN_DESCRIPTION,
) -> int:
    """``launch/pretrain.py`` as a function: parse ``argv``, load the config
    (``config_class``, default ``RunConfig``) and ``run`` it (default
    :func:`~actcomp_dist.training.trainer.run_pretraining`) under :func:`exit_status`."""
    args = parse_args(argv, description)

    def load_and_run():
        config = load_config(args, config_class)
        if run is not None:
            return run(config)
        # megatron-core and DeepSpeed print at import: the trainer comes after the filters.
        from actcomp_dist.training.trainer import run_pretraining

        return run_pretraining(config)

    return exit_status(load_and_run)
