"""``actcomp-pretrain``: the command line of ``launch/pretrain.py`` (see
:mod:`actcomp_dist.training.cli`)."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    from actcomp_dist.training.cli import main as pretrain_main

    return pretrain_main(argv)


if __name__ == "__main__":
    sys.exit(main())
