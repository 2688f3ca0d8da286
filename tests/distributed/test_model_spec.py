"""What the LLaMA model is handed instead of what it looks up (actcomp_dist.models.llama).

- Layer spec: a model built with recording subclasses of the column- and row-parallel linears
  constructs them at exactly the column sites (``qkv``, ``fc1``) and row sites (``proj``,
  ``fc2``) of every block, and computes the same loss and gradients, bit for bit, as the
  default model (the subclasses change nothing but the class, so the computation is the same).
- Parallel context (2 gloo ranks, TP = 2 with sequence parallelism): a model built from an
  explicit :class:`~actcomp_dist.parallel.state.ParallelContext` over process groups of its
  own, *before* megatron-core's parallel state exists, equals the default model built from the
  global state bit for bit (the same ranks, shards and collectives, so the same operations in
  the same order), with the chunked loss and with the unchunked one (logits, then the
  vocab-parallel cross-entropy over the model's group); a model loaded from a Hugging Face
  directory (``build_llama_from_hf(..., parallel=)``) takes the context the same way and, the
  round trip being bit-exact, equals the model it was exported from bit for bit.
- Module kinds: every module a saved tensor is charged to maps to a kind of the memory model
  (:mod:`actcomp_dist.models.kinds`), for the efficient and the naive block.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from actcomp_dist import CompressionConfig
from actcomp_dist.memory import SavedTensorCounter
from actcomp_dist.memory_model import LAYER_KINDS, MODEL_KINDS
from actcomp_dist.models import LlamaLayerSpec, LlamaModel, build_llama, get_model_config
from actcomp_dist.models.hf import build_llama_from_hf, export_hf
from actcomp_dist.models.kinds import module_kind
from actcomp_dist.parallel import CompressedColumnParallelLinear, CompressedRowParallelLinear, state
from actcomp_dist.parallel.state import ParallelContext
from tests.helpers.distributed import run_distributed

SMALL = get_model_config("tiny").replace(seq_length=32)
COMPACT = CompressionConfig(method="compact", rank=0.25)


class RecordingColumn(CompressedColumnParallelLinear):
    """The default column-parallel linear, recording the (layer_id, site) it was built for."""

    built: list[tuple[int, str]] = []

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        RecordingColumn.built.append((self.layer_id, self.site))


class RecordingRow(CompressedRowParallelLinear):
    """The default row-parallel linear, recording the (layer_id, site) it was built for."""

    built: list[tuple[int, str]] = []

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        RecordingRow.built.append((self.layer_id, self.site))


def _batch(seed: int = 3) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, SMALL.vocab_size, (2, SMALL.seq_length + 1), generator=generator)


def _loss_and_grads(model: LlamaModel, batch: torch.Tensor):
    loss = model.loss(batch[:, :-1], batch[:, 1:])
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


def test_layer_spec_builds_every_site_and_changes_nothing_else(single_rank):
    RecordingColumn.built.clear()
    RecordingRow.built.clear()
    spec = LlamaLayerSpec(column_linear=RecordingColumn, row_linear=RecordingRow)
    custom = LlamaModel(SMALL, COMPACT, spec=spec)
    default = LlamaModel(SMALL, COMPACT)
    layers = range(SMALL.num_layers)
    assert RecordingColumn.built == [(i, site) for i in layers for site in ("qkv", "fc1")]
    assert RecordingRow.built == [(i, site) for i in layers for site in ("proj", "fc2")]
    for custom_layer, default_layer in zip(custom.layers, default.layers, strict=True):
        assert type(custom_layer.attention.qkv) is RecordingColumn
        assert type(custom_layer.mlp.fc1) is RecordingColumn
        assert type(custom_layer.attention.proj) is RecordingRow
        assert type(custom_layer.mlp.fc2) is RecordingRow
        assert type(default_layer.attention.qkv) is CompressedColumnParallelLinear
        assert type(default_layer.mlp.fc2) is CompressedRowParallelLinear
    assert custom.spec is spec and default.spec == LlamaLayerSpec()

    batch = _batch()
    custom_loss, custom_grads = _loss_and_grads(custom, batch)
    default_loss, default_grads = _loss_and_grads(default, batch)
    # Same weights (one init generator, drawn in the same order), same operations: exact.
    assert torch.equal(custom_loss, default_loss)
    assert custom_grads.keys() == default_grads.keys()
    for name, grad in custom_grads.items():
        assert torch.equal(grad, default_grads[name]), name


@pytest.mark.parametrize("efficient_ops", [True, False])
def test_every_saved_tensor_is_charged_to_a_memory_model_kind(single_rank, efficient_ops):
    """The measurement charges each saved tensor to the innermost module whose forward saved
    it (the model itself, ``""``, for the loss); every such module maps to a kind the planner
    predicts."""
    model = LlamaModel(SMALL, COMPACT, efficient_ops=efficient_ops)
    batch = _batch()
    with torch.enable_grad(), SavedTensorCounter(track_modules=model) as counter:
        model.loss(batch[:, :-1], batch[:, 1:])
    kinds = {module_kind(name) for name in counter.by_module}
    assert kinds <= set(LAYER_KINDS) | set(MODEL_KINDS), sorted(counter.by_module)
    # The compressed sites keep their projected inputs (other kinds may keep 0 bytes).
    assert set(COMPACT.sites) <= kinds


def _context_run(rank: int, world_size: int, directory) -> dict:
    """Loss and gradients at TP = 2 + SP, chunked loss and not: first from an explicit context
    over groups created here (no megatron-core state exists yet), then from the global state;
    returns both per loss."""
    tp_group = dist.new_group(list(range(world_size)))
    dp_groups = [dist.new_group([r]) for r in range(world_size)]
    parallel = ParallelContext(
        tp_group=tp_group,
        tp_rank=rank,
        tp_size=world_size,
        dp_group=dp_groups[rank],
        dp_rank=0,
        dp_size=1,
        device=torch.device("cpu"),
    )
    assert not state.is_initialized()
    batch = _batch()
    results = {}
    for chunk in LOSS_CHUNKS:
        options = dict(sequence_parallel=True, init_seed=0, loss_chunk_tokens=chunk)
        explicit = build_llama(SMALL, COMPACT, parallel=parallel, **options)
        assert explicit.tp_group is tp_group and explicit.parallel is parallel
        results["explicit", chunk] = _loss_and_grads(explicit, batch)
    export_hf(explicit, directory)  # the unchunked model, built last; backward changed no weight
    from_hf = build_llama_from_hf(
        directory, COMPACT, sequence_parallel=True, seq_length=SMALL.seq_length, parallel=parallel
    )
    assert from_hf.tp_group is tp_group and from_hf.parallel is parallel
    results["from_hf", None] = _loss_and_grads(from_hf, batch)
    assert not state.is_initialized()  # neither loss nor loading needed megatron's state

    state.initialize_model_parallel(world_size)
    for chunk in LOSS_CHUNKS:
        options = dict(sequence_parallel=True, init_seed=0, loss_chunk_tokens=chunk)
        default = build_llama(SMALL, COMPACT, **options)
        assert default.tp_group is state.get_tp_group() is not tp_group
        results["default", chunk] = _loss_and_grads(default, batch)
    return results


#: The chunked loss (16 tokens a chunk) and the unchunked one (logits kept).
LOSS_CHUNKS = (16, None)


def test_explicit_parallel_context_equals_the_global_state(tmp_path):
    for result in run_distributed(_context_run, 2, tmp_path, tmp_path / "hf"):
        from_hf_loss, from_hf_grads = result["from_hf", None]
        assert torch.equal(from_hf_loss, result["explicit", None][0])
        for name, grad in from_hf_grads.items():
            assert torch.equal(grad, result["explicit", None][1][name]), ("from_hf", name)
        for chunk in LOSS_CHUNKS:
            explicit_loss, explicit_grads = result["explicit", chunk]
            default_loss, default_grads = result["default", chunk]
            # The same shards and the same collectives in the same order: bit for bit.
            assert torch.equal(explicit_loss, default_loss), chunk
            assert explicit_grads.keys() == default_grads.keys()
            for name, grad in explicit_grads.items():
                assert torch.equal(grad, default_grads[name]), (chunk, name)
