"""``python tools/preprocess_data.py`` = ``actcomp-preprocess-data``: see :mod:`actcomp_dist.cli.preprocess_data`."""

import sys

from actcomp_dist.cli.preprocess_data import main

if __name__ == "__main__":
    sys.exit(main())
