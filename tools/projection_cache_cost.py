r"""What regenerating compact's projection P costs per training step (the ``cache_projection``
default: regenerate when that costs under 2% of the step).

    python tools/projection_cache_cost.py --model tiny --micro-batch 4 --seq-length 128
    python tools/projection_cache_cost.py --model 60m --layers 2 --micro-batch 4 --seq-length 256

One process (gloo, TP=1), ``compact`` lift at r = n/4 on qkv, fc1, fc2, AdamW. Two models from
the same initialisation, one with ``cache_projection=true`` and one with ``false``, take
alternating steps (forward, backward, optimizer step) on the same batch, so drift of a shared
machine hits both alike; the report gives the median step time of each, and separately the time
to draw every layer's P once times the draws a step makes without the cache (forward and
backward: two per layer), over the cached step time. On a shared machine the A/B step times
drift by several percent between runs; the draw time is the regeneration cost itself (on a small
model the profile adds some Python overhead per call that it leaves out).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from actcomp_dist.cli.single_process import (
    add_model_shape_arguments,
    model_config_from_args,
    one_rank_world,
)


def _step(model, optimizer, batch) -> float:
    start = time.perf_counter()
    model.loss(*batch).mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_shape_arguments(parser)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rank", type=float, default=0.25)
    args = parser.parse_args(argv)
    with one_rank_world():
        _report(args)
    return 0


def _report(args) -> None:
    from actcomp_dist.config import CompressionConfig
    from actcomp_dist.models import build_llama

    config = model_config_from_args(args)
    models, optimizers = {}, {}
    for cache in (True, False):
        compression = CompressionConfig(method="compact", rank=args.rank, cache_projection=cache)
        models[cache] = build_llama(config, compression, init_seed=0)
        optimizers[cache] = torch.optim.AdamW(models[cache].parameters(), lr=1e-4)
    generator = torch.Generator().manual_seed(0)
    shape = (args.micro_batch, args.seq_length)
    tokens = torch.randint(0, config.vocab_size, shape, generator=generator)
    batch = (tokens, torch.roll(tokens, -1, 1), torch.ones(shape))
    times = {True: [], False: []}
    for step in range(args.steps + 2):
        for cache in (True, False) if step % 2 else (False, True):
            elapsed = _step(models[cache], optimizers[cache], batch)
            if step >= 2:  # warm-up: allocator, Adam state
                times[cache].append(elapsed)
    compressors = [
        m.compressor for m in models[False].modules() if getattr(m, "compressor", None) is not None
    ]
    compressors = [c for c in compressors if hasattr(c, "projection")]
    draws = []
    for _ in range(args.steps):
        start = time.perf_counter()
        for c in compressors:
            c.projection(c.current_seeds(), torch.device("cpu"), torch.float32)
        draws.append(time.perf_counter() - start)
    cached, uncached = (statistics.median(times[c]) for c in (True, False))
    regenerate = 2 * statistics.median(draws)
    print(
        f"{args.model} ({config.num_layers} layers), micro-batch {args.micro_batch} x "
        f"{args.seq_length}, compact r={args.rank}, {len(compressors)} compressed layers: "
        f"step {cached * 1e3:.1f} ms cached, {uncached * 1e3:.1f} ms regenerated "
        f"({100 * (uncached / cached - 1):+.1f}%); drawing every P twice {regenerate * 1e3:.2f} "
        f"ms = {100 * regenerate / cached:.2f}% of the cached step"
    )


if __name__ == "__main__":
    raise SystemExit(main())
