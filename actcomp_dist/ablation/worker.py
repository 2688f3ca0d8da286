"""One ablation run on every rank the ``deepspeed`` launcher starts (``tools/ablate.py
--nproc N``): reads a resolved run config (JSON), trains and measures it with
:func:`actcomp_dist.ablation.runner.train_and_measure`, and rank 0 writes the record.

    deepspeed --num_gpus 2 actcomp_dist/ablation/worker.py --config RUN.json --out RECORD.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", required=True, help="resolved run config (JSON)")
    parser.add_argument("--out", required=True, help="where rank 0 writes the record (JSON)")
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument(
        "--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)

    from actcomp_dist.ablation.runner import train_and_measure
    from actcomp_dist.training.config import run_config_from_dict

    raw = json.loads(Path(args.config).read_text())
    config = run_config_from_dict(raw, source=args.config)
    record = train_and_measure(config, args.warmup_steps)
    if record is not None:
        Path(args.out).write_text(json.dumps(record))
    return 0


if __name__ == "__main__":
    sys.exit(main())
