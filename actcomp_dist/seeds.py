"""Projection seeds as one pure function, and the step schedule that selects the epoch.

The rule: ``seed = f(base_seed, layer_id, site, block, epoch)`` with
``epoch = optimizer_step // resample_every``. A pure function (not an RNG stream) is what lets
every tensor-parallel and data-parallel rank, a recompute inside activation checkpointing, the
backward pass and the optimizer all rebuild the *same* projection without communicating.

The hash is BLAKE2b over a canonical byte encoding of the tuple, so it is identical across
processes, Python versions and platforms (Python's ``hash()`` is salted per process).
"""

from __future__ import annotations

import hashlib
import struct

import torch

_SEED_BITS = 63  # torch.Generator.manual_seed takes a non-negative int64


def projection_seed(base_seed: int, layer_id: int, site: str, block: int, epoch: int) -> int:
    """The seed of projection block ``block`` of ``site`` in layer ``layer_id`` at ``epoch``."""
    payload = struct.pack("<qqqq", base_seed, layer_id, block, epoch) + site.encode("utf-8")
    digest = hashlib.blake2b(payload, digest_size=8, person=b"actcomp-seed").digest()
    return int.from_bytes(digest, "little") & ((1 << _SEED_BITS) - 1)


def seeded_generator(seed: int, device: torch.device) -> torch.Generator:
    """A fresh generator on ``device``; never the global RNG (dropout streams stay untouched)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


class CompressionSchedule:
    """The optimizer-step counter shared by every compressed layer of one model.

    Layers read :attr:`epoch` in forward (and store the resulting seed in the autograd context),
    so every micro-batch of an optimizer step uses the same projection. Call :meth:`advance`
    exactly once per optimizer step — :meth:`attach` does it with an optimizer post-step hook;
    the training loop does it explicitly at gradient-accumulation boundaries.
    """

    def __init__(self, resample_every: int, step: int = 0) -> None:
        if resample_every < 1:
            raise ValueError(f"resample_every must be >= 1, got {resample_every}")
        self.resample_every = resample_every
        self.step = step

    @property
    def epoch(self) -> int:
        return self.step // self.resample_every

    def advance(self, steps: int = 1) -> None:
        self.step += steps

    def attach(self, optimizer: torch.optim.Optimizer):
        """Advance after every ``optimizer.step()``; returns the removable hook handle."""
        return optimizer.register_step_post_hook(lambda *_: self.advance())

    def state_dict(self) -> dict[str, int]:
        return {"step": self.step, "resample_every": self.resample_every}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["resample_every"] != self.resample_every:
            raise ValueError(
                f"checkpoint schedule has resample_every={state['resample_every']}, "
                f"this model has {self.resample_every}"
            )
        self.step = int(state["step"])

    def __repr__(self) -> str:
        return f"CompressionSchedule(step={self.step}, resample_every={self.resample_every})"
