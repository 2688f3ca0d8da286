"""``python tools/train_tokenizer.py`` = ``actcomp-train-tokenizer``: see :mod:`actcomp_dist.cli.train_tokenizer`."""

import sys

from actcomp_dist.cli.train_tokenizer import main

if __name__ == "__main__":
    sys.exit(main())
