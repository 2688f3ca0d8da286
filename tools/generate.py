"""``python tools/generate.py`` = ``actcomp-generate``: see :mod:`actcomp_dist.cli.generate`."""

import sys

from actcomp_dist.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
