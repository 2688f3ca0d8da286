"""``actcomp-finetune``: the command line of ``launch/finetune.py`` (see
:mod:`actcomp_dist.training.finetune`)."""

from __future__ import annotations

import sys

DESCRIPTION = "Fine-tune a LLaMA model (full + compressed activations, LoRA, LoRI)."


def main(argv: list[str] | None = None) -> int:
    from actcomp_dist.training.cli import main as run_main
    from actcomp_dist.training.finetune import FinetuneRunConfig, run_finetuning

    return run_main(
        argv, config_class=FinetuneRunConfig, run=run_finetuning, description=DESCRIPTION
    )


if __name__ == "__main__":
    sys.exit(main())
