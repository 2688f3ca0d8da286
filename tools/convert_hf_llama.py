"""``python tools/convert_hf_llama.py`` = ``actcomp-convert-hf``: see :mod:`actcomp_dist.cli.convert_hf`."""

import sys

from actcomp_dist.cli.convert_hf import main

if __name__ == "__main__":
    sys.exit(main())
