"""``python tools/ablate.py`` = ``actcomp-ablate``: see :mod:`actcomp_dist.cli.ablate`."""

import sys

from actcomp_dist.cli.ablate import main

if __name__ == "__main__":
    sys.exit(main())
