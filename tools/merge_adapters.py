"""``python tools/merge_adapters.py`` = ``actcomp-merge-adapters``: see :mod:`actcomp_dist.cli.merge_adapters`."""

import sys

from actcomp_dist.cli.merge_adapters import main

if __name__ == "__main__":
    sys.exit(main())
