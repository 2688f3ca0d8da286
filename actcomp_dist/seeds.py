"""Projection seeds as one pure function, and the step schedule that selects the epoch.

The rule: ``seed = f(base_seed, layer_id, site, block, epoch)`` with
``epoch = optimizer_step // resample_every``. A pure function (not an RNG stream) is what lets
every tensor-parallel and data-parallel rank, a recompute inside activation checkpointing, the
backward pass and the optimizer all rebuild the *same* projection without communicating.

The hash is BLAKE2b over a canonical byte encoding of the tuple, so it is identical across
processes, Python versions and platforms (Python's ``hash()`` is salted per process).

**Agreement check.** The rule only holds if every rank feeds it the same inputs: one rank with
another ``compression.seed``, a layer numbered differently, or a compression schedule that
missed a step would compress with another projection than its peers, and the data-parallel
gradient average would silently mix subspaces. :func:`check_seed_agreement` (the trainer calls
it before every optimizer step, so at start-up after a resume and after every resample) makes
every rank compute, per compressed layer, the seed of canonical block 0 at the current epoch —
a value every rank can compute whatever blocks it holds, and which changes with any of the
inputs above — and per LoRA/LoRI adapter the seed its A is drawn from (A is regenerated on
every rank, never stored or communicated), and compares one 64-bit digest of that table
across all ranks with one all-gather. On a mismatch (every rank sees the same gathered digests, so every rank takes the
same branch) the tables themselves are gathered and every rank raises
:class:`SeedMismatchError` naming the layers and the ranks that differ.
"""

from __future__ import annotations

import contextlib
import hashlib
import struct
from collections.abc import Iterator

import torch
import torch.distributed as dist

_SEED_BITS = 63  # torch.Generator.manual_seed takes a non-negative int64


def projection_seed(base_seed: int, layer_id: int, site: str, block: int, epoch: int) -> int:
    """The seed of projection block ``block`` of ``site`` in layer ``layer_id`` at ``epoch``."""
    payload = struct.pack("<qqqq", base_seed, layer_id, block, epoch) + site.encode("utf-8")
    digest = hashlib.blake2b(payload, digest_size=8, person=b"actcomp-seed").digest()
    return int.from_bytes(digest, "little") & ((1 << _SEED_BITS) - 1)


def call_seed(base_seed: int, layer_id: int, site: str, step: int, call: int) -> int:
    """The seed of a per-call draw (LoRAct's column sample, RSVD's test matrix): call ``call``
    of optimizer step ``step`` (:meth:`CompressionSchedule.next_call`). Hashed apart from
    :func:`projection_seed` (another personalisation), so the two families never collide."""
    payload = struct.pack("<qqqq", base_seed, layer_id, step, call) + site.encode("utf-8")
    digest = hashlib.blake2b(payload, digest_size=8, person=b"actcomp-call").digest()
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

    **Per-call draws.** Methods that draw afresh in every forward call (``lowrank``) take
    ``(step, call)`` from :meth:`next_call`: ``call`` counts the draws of the current step
    over the whole model and restarts at 0 when the step advances, so the draws are a pure
    function of the step and the order of the calls (a resumed run draws what the original
    drew). An activation-checkpoint recompute must replay the counter as it replays the RNG
    state: pass :meth:`checkpoint_context` as ``context_fn`` of non-reentrant
    ``torch.utils.checkpoint`` (the trainer's activation checkpointing does). Without it the
    recompute draws new samples: the gradient is still a valid estimate (the factors backward
    reads come from one draw), but no longer bit-identical to the run without checkpointing.
    """

    def __init__(self, resample_every: int, step: int = 0) -> None:
        if resample_every < 1:
            raise ValueError(f"resample_every must be >= 1, got {resample_every}")
        self.resample_every = resample_every
        self.step = step
        self.calls = 0  # per-call draws taken in this step

    @property
    def epoch(self) -> int:
        return self.step // self.resample_every

    def advance(self, steps: int = 1) -> None:
        self.step += steps
        self.calls = 0

    def next_call(self) -> tuple[int, int]:
        """``(step, call)`` of a new per-call draw; advances the call counter."""
        call = self.calls
        self.calls += 1
        return self.step, call

    def checkpoint_context(self) -> tuple[contextlib.AbstractContextManager, ...]:
        """A ``context_fn`` for non-reentrant ``torch.utils.checkpoint``: the forward context
        records the counter where the checkpointed region starts, the recompute context
        replays the region from there and then puts the counter back."""
        start: list[tuple[int, int]] = []

        @contextlib.contextmanager
        def forward() -> Iterator[None]:
            start.append((self.step, self.calls))
            yield

        @contextlib.contextmanager
        def recompute() -> Iterator[None]:
            now = (self.step, self.calls)
            self.step, self.calls = start[0]
            try:
                yield
            finally:
                self.step, self.calls = now

        return forward(), recompute()

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
        self.calls = 0

    def __repr__(self) -> str:
        return f"CompressionSchedule(step={self.step}, resample_every={self.resample_every})"


class SeedMismatchError(RuntimeError):
    """Ranks that must share a projection computed different seeds for it."""


# The site prefix of an adapter's A in the seed table (the namespace of ``adapter_seed``).
ADAPTER_SITE_PREFIX = "adapter/"


def projection_seed_table(model: torch.nn.Module) -> list[tuple[str, int, str, int, int, int]]:
    """``(module name, layer id, site, base seed, epoch, seed of block 0)`` for every
    compressing layer of ``model`` (an identity compressor has no projection), and for every
    LoRA/LoRI adapter ``(module name, layer id, "adapter/SITE", finetune.adapter.seed, 0, seed
    of A)``: A is regenerated from its seed on every rank (never stored), so the ranks that
    train one B must agree on it as they agree on a projection."""
    from actcomp_dist.adapters.base import LowRankAdapter
    from actcomp_dist.compression.base import Compressor

    table = []
    for name, module in model.named_modules():
        if isinstance(module, Compressor) and not module.is_identity:
            base, epoch = module.config.seed, module.schedule.epoch
            seed = projection_seed(base, module.layer_id, module.site, 0, epoch)
            table.append((name, module.layer_id, module.site, base, epoch, seed))
        elif isinstance(module, LowRankAdapter):
            site = ADAPTER_SITE_PREFIX + module.site
            table.append((name, module.layer_id, site, module.config.seed, 0, module.seed))
    return table


def _digest(table: list[tuple]) -> int:
    payload = repr(table).encode("utf-8")
    digest = hashlib.blake2b(payload, digest_size=8, person=b"actcomp-agree").digest()
    return int.from_bytes(digest, "little", signed=True)  # fits an int64 tensor


def check_seed_agreement(model: torch.nn.Module, step: int, group=None) -> None:
    """Collective over ``group`` (default: every rank): raise :class:`SeedMismatchError` on
    every rank unless all ranks compute the same :func:`projection_seed_table` for ``model``
    (``step``: for the message). One all-gather of one int64 per rank when they agree."""
    table = projection_seed_table(model)
    world = dist.get_world_size(group)
    if world == 1:
        return
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    mine = torch.tensor([_digest(table)], dtype=torch.int64, device=device)
    gathered = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(gathered, mine, group=group)
    if len(set(torch.cat(gathered).tolist())) == 1:  # one device-to-host copy
        return
    tables: list = [None] * world
    dist.all_gather_object(tables, table, group=group)
    raise SeedMismatchError(describe_seed_mismatch(tables, step))


def describe_seed_mismatch(tables: list[list[tuple]], step: int, limit: int = 3) -> str:
    """The message for the ranks' seed ``tables`` (rank order): per disagreeing layer, which
    ranks hold which seed (with its base seed and epoch), the largest group first."""
    rows = {}
    for rank, table in enumerate(tables):
        for name, layer_id, site, base, epoch, seed in table:
            key = (name, layer_id, site)
            rows.setdefault(key, {}).setdefault((seed, base, epoch), []).append(rank)
    # A layer that some rank does not have at all: a differently built model.
    for key in rows:
        present = {r for ranks in rows[key].values() for r in ranks}
        missing = [r for r in range(len(tables)) if r not in present]
        if missing:
            rows[key][("missing", None, None)] = missing
    problems = []
    for (name, layer_id, site), values in rows.items():
        if len(values) == 1:
            continue
        groups = sorted(values.items(), key=lambda item: (-len(item[1]), item[1]))
        described = []
        for (seed, base, epoch), ranks in groups:
            who = f"rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))}"
            if seed == "missing":
                described.append(f"{who}: no such layer")
            else:
                key = (
                    "finetune.adapter.seed"
                    if site.startswith(ADAPTER_SITE_PREFIX)
                    else "compression.seed"
                )
                described.append(f"{who}: seed {seed} ({key} {base}, epoch {epoch})")
        problems.append(f"{name} (layer {layer_id}, site {site}): " + " vs ".join(described))
    shown = "; ".join(problems[:limit])
    if len(problems) > limit:
        shown += f"; and {len(problems) - limit} more layers"
    return (
        f"step {step}: ranks disagree on projection seeds they must share: {shown}; every rank "
        f"must run the same config and code and resume from the same checkpoint"
    )
