"""LoRA / LoRI adapters (actcomp_dist.adapters), each test against a reference.

- Math: adapter outputs and gradients (x, B, and A for LoRA) against a float64 autograd
  computation of ``W x + s B A x``; LoRA's compressed input against the exact A gradient
  (``compact`` at full rank is an orthogonal change of basis: equal up to rounding).
- LoRI's A: regenerated bit-identically from its seed (never in a state dict or file),
  different across adapter seeds, layers and sites.
- Memory: a LoRI adapter saves exactly ``N * r * itemsize`` bytes per site (``A x``), counted
  with ``saved_tensors_hooks``; LoRA also saves its input (whole, or compressed to N x c).
- Counts: trainable entries equal the closed forms (LoRA ``r (m + n)``, LoRI dense ``m r``,
  LoRI 90% sparse ``round(0.1 * sum m r)``).
- Masks: the global threshold equals ``torch.topk`` over all B; after masked training (AdamW
  with weight decay) B outside the mask is exactly zero; continual learning leaves the
  earlier task's B outside the new mask bit-identical.
- Merging two adapters (concatenation, per-adapter weights) equals running both; exporting the
  merged model to Hugging Face equals our adapted model's logits in ``transformers``.
- Files: save -> load gives bit-identical outputs (sparse, dense-masked and LoRA storage).
- Tensor parallelism (2 gloo ranks, with and without SP): loss and gathered adapter gradients
  as accurate as TP = 1 against the float64 replay of the adapted model; global threshold and
  masks, saved files and per-site saved bytes match TP = 1.
"""

from __future__ import annotations

import math
import os

import pytest
import torch
from torch import nn

from actcomp_dist import CompressionConfig
from actcomp_dist.adapters import (
    AdapterConfig,
    adapter_parameter_count,
    adapter_seed,
    allocate_masks,
    apply_adapters,
    clear_masks,
    compute_masks,
    export_merged_hf,
    generate_A,
    iter_adapters,
    kth_largest,
    load_adapter,
    merge_adapters,
    merged_deltas,
    save_adapter,
    set_adapter_multiplier,
    snapshot_B,
    start_masked_training,
)
from actcomp_dist.adapters.io import _gather_a, gather_rows, pack_bits, unpack_bits
from actcomp_dist.memory import saved_activation_bytes, saved_activation_bytes_by_module
from actcomp_dist.models import build_llama, full_state_dict, get_model_config
from actcomp_dist.models.hf import export_hf, read_hf_config, read_hf_state_dict
from actcomp_dist.parallel import state
from tests.helpers.adapters import randomize_adapters
from tests.helpers.distributed import run_distributed
from tests.helpers.llama_reference import reference_logits
from tests.helpers.tolerances import assert_as_accurate_as, assert_within_rounding

SMALL = get_model_config("tiny", seq_length=32)
SITES = ("qkv", "proj", "fc1", "fc2")
RANK = 4


def _batch(seed: int = 0, batch: int = 2, seq: int = 32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, SMALL.vocab_size, (batch, seq + 1), generator=generator)


def _site_shapes(config=SMALL) -> dict[str, tuple[int, int]]:
    """(m, n) of each adapted site of one block (logical widths)."""
    h, f, d = config.hidden_size, config.ffn_hidden_size, config.head_dim
    qkv = (config.num_attention_heads + 2 * config.query_groups) * d
    return {
        "qkv": (qkv, h),
        "proj": (h, config.num_attention_heads * d),
        "fc1": (2 * f, h),
        "fc2": (h, f),
    }


def _train(model, steps: int, seed: int, lr: float = 1e-2, weight_decay: float = 0.1):
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    losses = []
    batch = _batch(seed)  # one batch per task: fitting it must lower its loss
    for _ in range(steps):
        loss = model.loss(batch[:, :-1], batch[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"method": "dora"}, "registered"),
        ({"rank": 0}, "rank"),
        ({"sparsity": 1.0}, "sparsity"),
        ({"alpha": -1.0}, "alpha"),
        ({"targets": "qkv"}, "targets"),
        ({"input_compression": CompressionConfig(method="compact")}, "lora"),
    ],
)
def test_config_validation_names_the_field(changes, match):
    with pytest.raises(ValueError, match=match):
        AdapterConfig(**changes)


def test_config_dict_round_trip():
    config = AdapterConfig(
        method="lora", rank=8, alpha=16.0, input_compression=CompressionConfig(method="compact")
    )
    assert AdapterConfig.from_dict(config.to_dict()) == config
    assert config.scale == 2.0 and AdapterConfig(rank=32).scale == 2.0  # alpha = 2 r default
    with pytest.raises(ValueError, match="unknown adapter field"):
        AdapterConfig.from_dict({"rnak": 4})


def test_targets_must_match_and_names_are_unique():
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8))
    with pytest.raises(ValueError, match=r"named \['0', '1'\]"):
        apply_adapters(model, AdapterConfig(rank=2, targets=("q_proj",)))
    apply_adapters(model, AdapterConfig(rank=2, targets=("0",)))
    with pytest.raises(ValueError, match="already has an adapter"):
        apply_adapters(model, AdapterConfig(rank=2, targets=("0",)))


# ----------------------------------------------------------------------------- math


def _plain_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 24, bias=True), nn.Tanh(), nn.Linear(24, 8, bias=False))


def _adapted_formula(model, leaves: dict, dtype: torch.dtype):
    """_plain_model with adapters (scale alpha / r = 1.5) on the linears whose B is in
    ``leaves`` (``B0``, ``B2``), written out by hand in ``dtype`` from ``leaves`` (``x``, the
    B's and, for LoRA, ``A0`` / ``A2``; LoRI's frozen A from the model): the output and the
    gradients of sum(out^2) w.r.t. the leaves."""
    ref = {k: v.detach().to(dtype).requires_grad_() for k, v in leaves.items()}

    def linear(index: int, inputs: torch.Tensor) -> torch.Tensor:
        layer = model[index]
        out = inputs @ layer.weight.detach().to(dtype).t()
        if layer.bias is not None:
            out = out + layer.bias.detach().to(dtype)
        if f"B{index}" in ref:
            a = ref.get(f"A{index}", layer.adapters["default"].A.detach().to(dtype))
            out = out + 1.5 * (inputs @ a.t()) @ ref[f"B{index}"].t()
        return out

    out = linear(2, torch.tanh(linear(0, ref["x"])))
    out.pow(2).sum().backward()
    return {"out": out.detach(), **{key: leaf.grad for key, leaf in ref.items()}}


@pytest.mark.parametrize("method", ["lori", "lora"])
def test_adapter_matches_float64_reference(method):
    model = _plain_model()
    apply_adapters(model, AdapterConfig(method=method, rank=RANK, alpha=6.0, targets=("0", "2")))
    randomize_adapters(model)
    x = torch.randn(3, 5, 16, requires_grad=True)
    out = model(x)
    out.pow(2).sum().backward()

    first, second = model[0].adapters["default"], model[2].adapters["default"]
    leaves = {
        "x": x,
        "B0": first.B,
        "B2": second.B,
        **({"A0": first.A, "A2": second.A} if method == "lora" else {}),
    }
    ours = {"out": out.detach(), **{key: leaf.grad for key, leaf in leaves.items()}}
    # The adapted model against the formula written out in fp32, both against it in float64:
    # the same operations up to their order, so as accurate (tests/helpers/tolerances.py).
    assert_as_accurate_as(
        ours,
        _adapted_formula(model, leaves, torch.float32),
        _adapted_formula(model, leaves, torch.float64),
        torch.float32,
        method,
    )
    assert model[0].weight.grad is None  # the base is frozen


def test_lora_compressed_input_gives_the_projected_exact_gradient():
    """With ``compact`` on the adapter input, A's gradient is ``(g B)^T (x P) P^T``: exactly
    the uncompressed gradient times ``P P^T`` (an unbiased estimate, ``E[P P^T] = I``)."""
    grads = {}
    for method in ("none", "compact"):
        model = _plain_model()
        compression = CompressionConfig(method=method, rank=0.25)
        config = AdapterConfig(
            method="lora", rank=RANK, targets=("0",), input_compression=compression
        )
        apply_adapters(model, config)
        randomize_adapters(model)
        x = torch.randn(6, 16)
        model(x).pow(2).sum().backward()
        adapter = model[0].adapters["default"]
        grads[method] = adapter.A.grad.clone()
    compressor = adapter.compressor
    p = compressor.projection(compressor.current_seeds(), x.device, torch.float32)  # [16, 4]
    assert p.shape == (16, 4)
    # Against float64: the exact gradient of the same weights times P P^T; the compressed gradient as accurate as the fp32
    # uncompressed one projected afterwards (the same products in another order).
    leaves = {"x": x, "B0": adapter.B, "A0": adapter.A}
    exact = _adapted_formula(model, leaves, torch.float64)["A0"]
    projector = p.double() @ p.double().t()
    assert_as_accurate_as(
        {"A": grads["compact"]},
        {"A": grads["none"] @ p @ p.t()},
        {"A": exact @ projector},
        torch.float32,
    )


# ----------------------------------------------------------------------------- LoRI's A


def test_lori_A_is_regenerated_identically_and_independent(single_rank):
    def a_matrices(seed: int) -> dict[str, torch.Tensor]:
        model = build_llama(SMALL)
        apply_adapters(model, AdapterConfig(method="lori", rank=RANK, seed=seed))
        assert not any(".A" in key for key in model.state_dict())  # never checkpointed
        return {path: adapter.A.clone() for path, _, adapter in iter_adapters(model)}

    first, again, other_task = a_matrices(seed=1), a_matrices(seed=1), a_matrices(seed=2)
    assert len(first) == SMALL.num_layers * len(SITES)
    assert all(torch.equal(first[p], again[p]) for p in first)
    assert all(not torch.allclose(first[p], other_task[p]) for p in first)
    # Across layers and sites of one adapter: different seeds, different matrices.
    seeds = {adapter_seed(1, layer, site) for layer in range(SMALL.num_layers) for site in SITES}
    assert len(seeds) == SMALL.num_layers * len(SITES)
    qkv0, qkv1 = first["layers.0.attention.qkv"], first["layers.1.attention.qkv"]
    fc1_0 = first["layers.0.mlp.fc1"]  # same shape as qkv's A (input width h)
    assert not torch.allclose(qkv0, qkv1) and not torch.allclose(qkv0, fc1_0)
    # The distribution LoRA initialises A with: U(-1/sqrt(n), 1/sqrt(n)).
    big = generate_A(seed=3, rank=64, in_features=1024)
    assert big.abs().max() <= 1 / math.sqrt(1024)
    assert big.var().item() == pytest.approx(1 / (3 * 1024), rel=0.05)


def test_uncached_A_gives_the_same_results():
    outputs = []
    for cache in (True, False):
        model = _plain_model()
        apply_adapters(model, AdapterConfig(rank=RANK, targets=("0", "2"), cache_A=cache))
        randomize_adapters(model)
        x = torch.randn(4, 16, requires_grad=True)
        out = model(x)
        out.sum().backward()
        outputs.append((out, x.grad, model[0].adapters["default"].B.grad))
    for cached, regenerated in zip(*outputs, strict=True):
        assert torch.equal(cached, regenerated)


# ----------------------------------------------------------------------------- memory


def test_lori_saves_only_Ax_per_site(single_rank):
    """Per adapter module, the bytes saved for backward are exactly Z = A x: N * r * 4."""
    model = build_llama(SMALL)
    apply_adapters(model, AdapterConfig(method="lori", rank=RANK))
    batch = _batch()
    by_module = saved_activation_bytes_by_module(
        model, lambda: model.loss(batch[:, :-1], batch[:, 1:])
    )
    tokens = batch.shape[0] * (batch.shape[1] - 1)
    adapters = {path + ".adapters.default" for path, _, _ in iter_adapters(model)}
    assert len(adapters) == SMALL.num_layers * len(SITES)
    for path in adapters:
        assert by_module[path] == tokens * RANK * 4, path


@pytest.mark.parametrize(
    "method, compression, width",
    [("lori", None, 0), ("lora", None, 16), ("lora", CompressionConfig("compact", rank=4), 4)],
    ids=["lori", "lora", "lora_compact"],
)
def test_saved_bytes_of_an_adapted_frozen_linear(method, compression, width):
    """A frozen nn.Linear saves nothing for its own backward; with the adapter the total is
    N r (LoRI) plus N c for LoRA's input (c = n whole, c = 4 compressed), 4 bytes each."""
    model = nn.Sequential(nn.Linear(16, 24))
    apply_adapters(
        model,
        AdapterConfig(method=method, rank=RANK, targets=("0",), input_compression=compression),
    )
    x = torch.randn(10, 16, requires_grad=True)
    assert saved_activation_bytes(lambda: model(x).sum()) == 10 * (RANK + width) * 4


# ----------------------------------------------------------------------------- counts


def test_trainable_parameter_counts_match_formulas(single_rank):
    shapes = _site_shapes()
    lora = SMALL.num_layers * sum(RANK * (m + n) for m, n in shapes.values())
    lori_dense = SMALL.num_layers * sum(m * RANK for m, _ in shapes.values())

    model = build_llama(SMALL)
    apply_adapters(model, AdapterConfig(method="lora", rank=RANK))
    assert adapter_parameter_count(model) == lora
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == lora

    model = build_llama(SMALL)
    apply_adapters(model, AdapterConfig(method="lori", rank=RANK, sparsity=0.9))
    assert adapter_parameter_count(model) == lori_dense
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == lori_dense
    randomize_adapters(model)
    compute_masks(model)  # the configured 90%
    assert adapter_parameter_count(model) == round(0.1 * lori_dense)


# ----------------------------------------------------------------------------- masks


def test_kth_largest_is_exact():
    values = [torch.tensor([0.0, 3.0, 1.5, 1.5]), torch.tensor([[2.0, 0.25], [7.0, 1.5]])]
    flat = torch.cat([v.flatten() for v in values]).sort(descending=True).values
    for k in range(1, flat.numel() + 1):
        assert kth_largest(values, k) == flat[k - 1].item()
    random = [torch.rand(1000), torch.rand(37, 5).pow(3)]
    flat = torch.cat([v.flatten() for v in random])
    assert kth_largest(random, 123) == torch.topk(flat, 123).values[-1].item()
    with pytest.raises(ValueError, match="non-negative"):
        kth_largest([torch.tensor([-1.0])], 1)


def test_masked_training_keeps_B_zero_outside_the_mask(single_rank):
    torch.manual_seed(0)
    model = build_llama(SMALL)
    apply_adapters(model, AdapterConfig(method="lori", rank=RANK, sparsity=0.9))
    _train(model, steps=3, seed=0)  # dense calibration
    magnitudes = torch.cat([a.B.detach().abs().flatten() for _, _, a in iter_adapters(model)])
    keep = round(0.1 * magnitudes.numel())
    threshold = compute_masks(model)
    assert threshold == torch.topk(magnitudes, keep).values[-1].item()
    assert sum(int(a.mask.sum()) for _, _, a in iter_adapters(model)) == keep
    # One global threshold, not one per matrix (which would keep 10% of each).
    fractions = [a.mask.float().mean().item() for _, _, a in iter_adapters(model)]
    assert max(fractions) - min(fractions) > 0.02

    start_masked_training(model)
    assert all(not a.B.any() for _, _, a in iter_adapters(model))
    losses = _train(model, steps=4, seed=10, weight_decay=0.1)
    for path, _, adapter in iter_adapters(model):
        outside = ~adapter.mask
        assert not adapter.B[outside].any(), path  # the parameter itself, not only its use
        assert not adapter.effective_B()[outside].any(), path
        assert adapter.B[adapter.mask].ne(0).float().mean() > 0.9, path
    assert losses[-1] < losses[0]


def test_continual_learning_changes_B_only_inside_the_new_mask(single_rank):
    torch.manual_seed(0)
    model = build_llama(SMALL)
    apply_adapters(model, AdapterConfig(method="lori", rank=RANK, sparsity=0.8))
    _train(model, steps=2, seed=0)  # task 1 (dense here; any B works)
    previous = snapshot_B(model)

    clear_masks(model)
    _train(model, steps=2, seed=100)  # dense calibration on task 2 ...
    compute_masks(model, relative_to=previous)  # ... its update's magnitude picks the mask
    start_masked_training(model, base=previous)
    assert all(torch.equal(a.effective_B(), previous[p]) for p, _, a in iter_adapters(model))
    _train(model, steps=3, seed=200, weight_decay=0.1)  # task 2

    changed_inside = 0
    for path, _, adapter in iter_adapters(model):
        b = adapter.effective_B().detach()
        outside = ~adapter.mask
        assert torch.equal(b[outside], previous[path][outside]), path
        changed_inside += int(b[adapter.mask].ne(previous[path][adapter.mask]).sum())
    assert changed_inside > 0.9 * sum(int(a.mask.sum()) for _, _, a in iter_adapters(model))


# ----------------------------------------------------------------------------- merging


def test_merging_two_adapters_equals_running_both(single_rank):
    model = build_llama(SMALL, init_seed=1)
    apply_adapters(model, AdapterConfig(method="lori", rank=RANK, seed=1), "task_a")
    apply_adapters(model, AdapterConfig(method="lora", rank=2, seed=2, alpha=3.0), "task_b")
    randomize_adapters(model, "task_a", seed=1)
    randomize_adapters(model, "task_b", seed=2)
    weights = {"task_a": 0.7, "task_b": 0.4}
    for name, weight in weights.items():
        set_adapter_multiplier(model, name, weight)
    tokens = _batch()[:, :-1]
    with torch.no_grad():
        both = model(tokens)
        # Concatenation is the sum of the per-adapter updates.
        concatenated = merged_deltas(model, weights=weights)
        separate = [merged_deltas(model, [n], {n: w}) for n, w in weights.items()]
        for path, delta in concatenated.items():
            torch.testing.assert_close(delta, separate[0][path] + separate[1][path])
        merge_adapters(model, weights=weights)
        merged = model(tokens)
    assert not list(iter_adapters(model))
    # fp32: merged W + dW rounds once per weight instead of adding two GEMM outputs. Against
    # the float64 forward of the merged weights: running both adapters is as accurate as the
    # merged model (a wrong merge would leave the unmerged model far from these weights'
    # logits; tests/helpers/tolerances.py).
    exact = reference_logits(
        {name: w.double() for name, w in full_state_dict(model).items()}, SMALL, tokens
    )
    assert_as_accurate_as({"logits": both}, {"logits": merged}, {"logits": exact}, torch.float32)


def test_export_merged_hf_runs_in_transformers(tmp_path, single_rank):
    transformers = pytest.importorskip("transformers")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from actcomp_dist.models.hf import build_llama_from_hf
    from tests.helpers.hf_models import make_hf_model

    make_hf_model(tmp_path / "hf")
    model = build_llama_from_hf(tmp_path / "hf").eval()
    apply_adapters(model, AdapterConfig(method="lori", rank=RANK, seed=5))
    randomize_adapters(model, seed=5)
    tokens = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model(tokens)
    export_merged_hf(model, tmp_path / "merged", base_directory=tmp_path / "hf")
    assert len(list(iter_adapters(model))) == 8  # the model keeps its adapters
    reference = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        theirs = reference(tokens).logits
    # Against the float64 forward of the exported weights: our unmerged model is as accurate
    # as transformers running them (a wrongly merged or named weight would leave ours far).
    exact = reference_logits(
        {name: w.double() for name, w in read_hf_state_dict(tmp_path / "merged").items()},
        read_hf_config(tmp_path / "merged"),
        tokens,
    )
    assert_as_accurate_as({"logits": ours}, {"logits": theirs}, {"logits": exact}, torch.float32)


# ----------------------------------------------------------------------------- files


def test_pack_bits_round_trip():
    mask = torch.rand(13, 7) > 0.6
    packed = pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(13 * 7 / 8)
    assert torch.equal(unpack_bits(packed, (13, 7)), mask)


@pytest.mark.parametrize("kind", ["lori_sparse", "lori_continual", "lora"])
def test_save_load_round_trip(tmp_path, single_rank, kind):
    method = "lora" if kind == "lora" else "lori"
    config = AdapterConfig(method=method, rank=RANK, seed=9, sparsity=0.9)
    model = build_llama(SMALL, init_seed=2)
    apply_adapters(model, config, "task")
    randomize_adapters(model, seed=3)
    if kind != "lora":
        compute_masks(model, name="task")
        base = snapshot_B(model, "task") if kind == "lori_continual" else None
        start_masked_training(model, "task", base=base)
        _train(model, steps=1, seed=0)
    save_adapter(model, tmp_path / "adapter", "task")
    tokens = _batch()[:, :-1]
    with torch.no_grad():
        expected = model(tokens)

    fresh = build_llama(SMALL, init_seed=2)
    assert load_adapter(fresh, tmp_path / "adapter") == "task"
    with torch.no_grad():
        assert torch.equal(fresh(tokens), expected)
    for (_, _, saved), (_, _, loaded) in zip(
        iter_adapters(model), iter_adapters(fresh), strict=True
    ):
        assert torch.equal(saved.effective_B(), loaded.effective_B())
        if saved.mask is not None:
            assert torch.equal(saved.mask, loaded.mask)

    from safetensors.torch import load_file

    stored = load_file(str(tmp_path / "adapter" / "actcomp_adapter.safetensors"))
    assert any(k.endswith(".A") for k in stored) == (method == "lora")  # LoRI: A never stored
    dense_bytes = SMALL.num_layers * sum(m * RANK * 4 for m, _ in _site_shapes().values())
    stored_bytes = sum(t.numel() * t.element_size() for t in stored.values())
    if kind == "lori_sparse":  # values (10%) + mask bits (1/32 of fp32)
        assert stored_bytes < 0.15 * dense_bytes


def test_masked_state_dict_resumes_into_a_fresh_model(single_rank):
    """What a DeepSpeed checkpoint holds (the module state dict: B, mask, frozen_B; never A)
    loads strictly after ``allocate_masks`` and reproduces the outputs bit for bit."""
    model = build_llama(SMALL, init_seed=2)
    apply_adapters(model, AdapterConfig(method="lori", rank=RANK, seed=4))
    randomize_adapters(model)
    compute_masks(model, 0.5)
    start_masked_training(model, base=snapshot_B(model))
    state_dict = model.state_dict()
    assert not any(key.endswith(".A") for key in state_dict)
    fresh = build_llama(SMALL, init_seed=7)
    apply_adapters(fresh, AdapterConfig(method="lori", rank=RANK, seed=4))
    allocate_masks(fresh, pinned=True)
    fresh.load_state_dict(state_dict, strict=True)
    tokens = _batch()[:, :-1]
    with torch.no_grad():
        assert torch.equal(fresh(tokens), model(tokens))


# ----------------------------------------------------------------------------- TP = 2


def _merged_magnitude(model):
    """``local_tensor`` for export_hf: the merge's terms on absolute values, ``|W| + sum over
    the adapters of |multiplier scale B| |A|`` (merged_deltas' products, this rank's shard)."""
    magnitudes = {}
    for path, _, adapter in iter_adapters(model):
        scaled_b = abs(adapter.multiplier * adapter.config.scale) * adapter.effective_B().abs()
        a = adapter.current_A(adapter.B.device, torch.float32).abs()
        term = (scaled_b.float() @ a.float()).detach()
        magnitudes[f"{path}.weight"] = magnitudes.get(f"{path}.weight", 0) + term

    def magnitude(parameter_name: str, tensor: torch.Tensor) -> torch.Tensor:
        return (tensor.detach().abs().float() + magnitudes.get(parameter_name, 0)).detach()

    return magnitude


def _tp_run(rank, world_size, tp, sequence_parallel, lori_dir, lora_dir, out_dir):
    """Load both adapters (saved at TP = 1) into the TP model; one forward/backward. Returns
    the loss, the gathered adapter gradients, saved bytes per adapter module, trainable
    counts, the global threshold and the gathered masks; writes the LoRI adapter again
    (``out_dir/lori``) and the merged model in Hugging Face layout (``out_dir/merged``)."""
    state.initialize_model_parallel(tp)
    model = build_llama(SMALL, init_seed=0, sequence_parallel=sequence_parallel)
    load_adapter(model, lori_dir, "lori")
    load_adapter(model, lora_dir, "lora")
    batch = _batch(seed=4)
    by_module = {}

    def step():
        loss = model.loss(batch[:, :-1], batch[:, 1:])
        loss.backward()
        by_module["loss"] = loss.detach()

    saved = saved_activation_bytes_by_module(model, step)
    grads = {}
    for path, name, adapter in iter_adapters(model):
        grads[f"{path}.{name}.B"] = gather_rows(adapter.B.grad, adapter.geometry)
        if name == "lora":
            grads[f"{path}.{name}.A"] = _gather_a(adapter.A.grad, adapter.geometry)
    count = adapter_parameter_count(model, "lori")
    threshold = compute_masks(model, 0.75, "lori")
    masks = {
        path: gather_rows(adapter.mask.to(torch.uint8), adapter.geometry)
        for path, _, adapter in iter_adapters(model, "lori")
    }
    save_adapter(model, out_dir / "lori", "lori")
    export_merged_hf(model, out_dir / "merged")
    export_hf(model, out_dir / "merged_magnitude", local_tensor=_merged_magnitude(model))
    lori_saved = {p: saved[p + ".adapters.lori"] for p, _, _ in iter_adapters(model, "lori")}
    return by_module["loss"], grads, lori_saved, count, threshold, masks


def _float64_run(rank, world_size, lori_dir, lora_dir):
    """_tp_run's forward / backward at TP = 1 after ``model.double()``: the float64 loss and
    gathered adapter gradients both TP sizes are held to."""
    state.initialize_model_parallel(1)
    model = build_llama(SMALL, init_seed=0)
    load_adapter(model, lori_dir, "lori")
    load_adapter(model, lora_dir, "lora")
    model.double()
    batch = _batch(seed=4)
    loss = model.loss(batch[:, :-1], batch[:, 1:])
    loss.backward()
    grads = {}
    for path, name, adapter in iter_adapters(model):
        grads[f"{path}.{name}.B"] = adapter.B.grad
        if name == "lora":
            grads[f"{path}.{name}.A"] = adapter.A.grad
    return loss.detach(), grads


@pytest.fixture(scope="module")
def adapter_files(tmp_path_factory, single_rank):
    directory = tmp_path_factory.mktemp("adapters")
    model = build_llama(SMALL)
    apply_adapters(model, AdapterConfig(method="lori", rank=RANK, seed=11), "lori")
    # LoRA with its input compressed (row-parallel sites: K canonical projection blocks).
    compression = CompressionConfig(method="compact", rank=0.5)
    lora = AdapterConfig(method="lora", rank=2, seed=12, input_compression=compression)
    apply_adapters(model, lora, "lora")
    randomize_adapters(model, "lori", seed=1)
    randomize_adapters(model, "lora", seed=2)
    save_adapter(model, directory / "lori", "lori")
    save_adapter(model, directory / "lora", "lora")
    return directory


@pytest.fixture(scope="module")
def float64_adapter_reference(adapter_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("f64")
    files = (adapter_files / "lori", adapter_files / "lora")
    return run_distributed(_float64_run, 1, out, *files)[0]


@pytest.fixture(scope="module")
def tp1_adapter_reference(adapter_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("tp1_out")
    files = (adapter_files / "lori", adapter_files / "lora", out)
    return run_distributed(_tp_run, 1, out, 1, False, *files)[0], out


@pytest.mark.distributed
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2_sp"])
def test_tp2_adapters_match_tp1(
    tmp_path, adapter_files, tp1_adapter_reference, float64_adapter_reference, sequence_parallel
):
    reference, reference_dir = tp1_adapter_reference
    files = (adapter_files / "lori", adapter_files / "lora", tmp_path / "out")
    results = run_distributed(_tp_run, 2, tmp_path, 2, sequence_parallel, *files)
    loss, grads, saved, count, threshold, masks = results[0]
    ref_loss, ref_grads, ref_saved, ref_count, ref_threshold, ref_masks = reference

    # fp32, one forward + backward; only the summation order differs (TP = 2 adds two halves of
    # the row-parallel sums, of the column-parallel input gradients and of the vocabulary's
    # softmax sum). Both sizes against the same model in float64 (its float64 replay): TP = 2
    # as accurate as TP = 1 (tests/helpers/tolerances.py). A wrong shard, a missing reduction
    # or a B at the wrong rows is an error of the order of the gradient itself (0.02-0.05,
    # 10^5 times the bound). The gradients as one vector: per tensor, the max error of a few
    # hundred elements is too noisy a statistic for a factor of 2 (measured up to 2.8 of
    # TP = 1's; the whole vector 0.99, the loss bit-identical at both sizes).
    exact_loss, exact_grads = float64_adapter_reference
    assert exact_loss.dtype == torch.float64
    assert {g.dtype for g in exact_grads.values()} == {torch.float64}
    assert set(grads) == set(ref_grads) == set(exact_grads)
    assert all(grad.abs().max() > 0 for grad in exact_grads.values())
    assert_as_accurate_as(
        {"loss": loss}, {"loss": ref_loss}, {"loss": exact_loss}, torch.float32, "loss"
    )
    flat = [
        {"all": torch.cat([d[key].flatten().double() for key in sorted(exact_grads)])}
        for d in (grads, ref_grads, exact_grads)
    ]
    assert_as_accurate_as(*flat, torch.float32, "gradients")
    assert count == ref_count
    # The same B at both TP sizes, so the exact global threshold and the masks are identical.
    assert threshold == ref_threshold and results[1][4] == ref_threshold
    assert all(torch.equal(masks[p], ref_masks[p]) for p in ref_masks)
    # Saving at TP = 2 writes the same file contents as at TP = 1.
    from safetensors.torch import load_file

    written = load_file(str(tmp_path / "out" / "lori" / "actcomp_adapter.safetensors"))
    expected = load_file(str(reference_dir / "lori" / "actcomp_adapter.safetensors"))
    assert set(written) == set(expected)
    assert all(torch.equal(written[k], expected[k]) for k in expected)
    # Each rank merges its own shard (B_i A or B A_i): the merged export matches TP = 1.
    # Each merged weight is W + [s B_lori | s B_lora] [A_lori; A_lora]: a reduction over the
    # two ranks (RANK + 2), the two scalings of B and the add to W, in some order at each TP
    # size: within the rounding bound of that length (tests/helpers/tolerances.py).
    merged = read_hf_state_dict(tmp_path / "out" / "merged")
    expected = read_hf_state_dict(reference_dir / "merged")
    magnitude = read_hf_state_dict(reference_dir / "merged_magnitude")
    assert set(merged) == set(expected)
    for name, tensor in expected.items():
        assert_within_rounding(merged[name], tensor, magnitude[name], RANK + 2 + 3, msg=name)
    # Saved bytes per LoRI site: Z = A x for this rank's tokens: N r 4 (N / 2 under SP).
    tokens = 2 * 32
    per_site = tokens * RANK * 4 // (2 if sequence_parallel else 1)
    assert all(v == tokens * RANK * 4 for v in ref_saved.values())
    assert all(v == per_site for v in saved.values()), saved
