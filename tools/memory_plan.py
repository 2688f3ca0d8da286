"""``python tools/memory_plan.py`` = ``actcomp-memory-plan``: see :mod:`actcomp_dist.cli.memory_plan`."""

import sys

from actcomp_dist.cli.memory_plan import main

if __name__ == "__main__":
    sys.exit(main())
