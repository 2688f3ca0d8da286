"""``memory.policy`` ``offload`` (host memory) and ``compress`` (the linear sites), on CPU.

References:

- **offload packer**: :class:`actcomp_dist.storage.HostOffload` on a CPU tensor is a real copy
  into new memory (no pinning: the source is already in host memory) and back: bit for bit
  the input, 0 device bytes by its ``saved_bytes``, a zero-element tensor remembering the
  device. The CUDA path (pinned memory, side stream, ``record_stream``) runs in
  tests/gpu/test_gpu.py.
- **offload model**: the LLaMA model with every kind offloaded computes the same loss and
  gradients as ``keep``, bit for bit (a copy, not an encoding: every backward op reads the
  same values; the attention re-runs the same SDPA forward on the same q, k, v). The memory
  model's device bytes plus its ``host_offload`` bytes equal the measured saved bytes (on a
  CPU both live in one memory; the split is measured by device on a GPU).
- **the policy stays refused without CUDA**: the run config (exit 2 path) and tools/ablate.py.
- **compress**: ``memory.policy.<site>: compress`` resolves into ``compression.sites``;
  contradictions with an explicit list and ``compression.method: none`` are refused with one
  line naming the field; ``fc2: compress`` builds the model of ``compression.sites: [fc2]``.
"""

from __future__ import annotations

import pytest
import torch

from actcomp_dist import CompressionConfig
from actcomp_dist.ablation.measure import measure_model_forward
from actcomp_dist.ablation.variants import VariantError, check_variants_run_here, parse_variants
from actcomp_dist.memory_model import ActivationSetting, predict_saved_activations
from actcomp_dist.models import build_llama, get_model_config
from actcomp_dist.storage import HostOffload, StoragePolicy, storage_for
from actcomp_dist.training.activation_checkpointing import apply_activation_checkpointing
from actcomp_dist.training.config import ConfigError, run_config_from_dict, validate_run

CUDA = torch.cuda.is_available()


# ----------------------------------------------------------------------------- the packer


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_offload_packer_round_trip_is_a_bitwise_copy(dtype):
    packer = storage_for("offload")
    assert isinstance(packer, HostOffload) and StoragePolicy(norm="offload").quantizer("norm")
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(6, 4, 16, generator=generator).to(dtype)
    x = base.permute(1, 0, 2)  # not contiguous, as q after RoPE is
    host, anchor = packer.pack(x)
    assert host.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()  # a real copy
    assert anchor.numel() == 0 and anchor.device == x.device and anchor.dtype == x.dtype
    like = torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")
    restored = packer.unpack((host, anchor), like)
    assert restored.dtype == dtype and restored.shape == x.shape
    assert torch.equal(restored, x)
    assert restored.stride() == x.stride()  # the layout keep would hand to backward
    assert restored.untyped_storage().data_ptr() != host.untyped_storage().data_ptr()
    assert packer.saved_bytes(x.numel(), x.shape[-1]) == 0
    policy = StoragePolicy(swiglu="offload")
    assert policy.saved_bytes("swiglu", x.numel(), x.shape[-1], 2) == 0
    assert policy.host_bytes("swiglu", x.numel(), 2) == 2 * x.numel()
    assert policy.host_bytes("norm", x.numel(), 2) == 0
    assert policy.offloaded == ("swiglu",)


# ----------------------------------------------------------------------------- the model

ALL_OFFLOADED = {"norm": "offload", "attention": "offload", "swiglu": "offload"}


def _loss_and_grads(config, storage, compression=None, mode="none", num_layers=None):
    torch.manual_seed(0)
    model = build_llama(config, compression, init_seed=0, storage_policy=storage)
    apply_activation_checkpointing(model, mode, num_layers)
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, config.vocab_size, (2, 33), generator=generator)
    loss = model.loss(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(
    "policy, mode",
    [(ALL_OFFLOADED, "none"), ({"block_input": "offload"}, "full"), (ALL_OFFLOADED, "sublayer")],
    ids=["norm+attention+swiglu", "block_input+ac_full", "norm+ac_sublayer"],
)
def test_offloaded_model_equals_keep_bit_for_bit(single_rank, policy, mode):
    config = get_model_config("tiny", seq_length=32)
    loss_keep, grads_keep = _loss_and_grads(config, None, mode=mode)
    loss, grads = _loss_and_grads(config, StoragePolicy.from_mapping(policy), mode=mode)
    assert torch.equal(loss, loss_keep)
    for name, grad in grads_keep.items():
        assert torch.equal(grads[name], grad), name


# name: (compression, checkpointing mode, checkpointed layers, memory.policy)
OFFLOAD_CASES = {
    "all": (CompressionConfig(), "none", None, ALL_OFFLOADED),
    "attention": (CompressionConfig(), "none", None, {"attention": "offload"}),
    "all+ac_selective": (CompressionConfig(), "selective", None, ALL_OFFLOADED),
    "compact_all_sites+all": (
        CompressionConfig(method="compact", rank=0.25, sites=("qkv", "proj", "fc1", "fc2")),
        "none",
        None,
        ALL_OFFLOADED,
    ),
    "norm+recompute_swiglu": (
        CompressionConfig(),
        "none",
        None,
        {"norm": "offload", "swiglu": "recompute", "attention": "offload"},
    ),
    "block_input+ac_full_1layer": (
        CompressionConfig(),
        "full",
        1,
        {"block_input": "offload", "swiglu": "offload"},
    ),
    "norm+ac_sublayer": (CompressionConfig(), "sublayer", None, {"norm": "offload"}),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", list(OFFLOAD_CASES))
def test_offload_prediction_device_plus_host_equals_measured(single_rank, case, dtype):
    """On a CPU the host copies are CPU tensors like the rest: the measured bytes of every
    kind are the predicted device bytes plus the predicted host bytes, to the byte. The
    device bytes alone are what the 8-bit structure keeps with a packed size of 0 (the
    int8 / fp8 cases of tests/integration/test_memory_plan.py check that structure)."""
    compression, mode, num_layers, policy = OFFLOAD_CASES[case]
    config = get_model_config("tiny", seq_length=32)
    storage = StoragePolicy.from_mapping(policy)
    model = build_llama(config, compression, init_seed=0, storage_policy=storage)
    for param in model.parameters():  # as DeepSpeed's bf16 engine: parameters only
        param.data = param.data.to(dtype)
    apply_activation_checkpointing(model, mode, num_layers)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (2, 32), generator=generator)
    labels = torch.randint(0, config.vocab_size, (2, 32), generator=generator)
    measured = measure_model_forward(model, tokens, labels, torch.ones(2, 32))
    setting = ActivationSetting(2, 32, dtype_bytes=torch.finfo(dtype).bits // 8, storage=storage)
    predicted = predict_saved_activations(config, compression, setting, mode, num_layers)
    assert predicted.host_total > 0
    kinds = set(measured.by_kind) | set(predicted.by_kind) | set(predicted.host_offload)
    for kind in kinds:
        expected = predicted.by_kind.get(kind, 0) + predicted.host_offload.get(kind, 0)
        assert measured.by_kind.get(kind, 0) == expected, kind
    assert measured.total == predicted.total + predicted.host_total
    # Exactly the offloaded tensors, whole: what keep would hold of them on the device.
    e, n = setting.dtype_bytes, setting.tokens
    if case == "all":
        h, d = config.hidden_size, config.head_dim
        qkvo = (2 * config.num_attention_heads + 2 * config.query_groups) * d
        per_block = n * (2 * h + qkvo + 2 * config.ffn_hidden_size) * e
        assert predicted.host_total == config.num_layers * per_block


# ----------------------------------------------------------------------------- refusals


@pytest.mark.skipif(CUDA, reason="the refusal is for machines without CUDA")
def test_offload_is_refused_without_cuda():
    config = run_config_from_dict({"memory": {"policy": {"attention": "offload"}}})
    with pytest.raises(ConfigError) as error:
        validate_run(config, 1)
    assert str(error.value).startswith(
        "memory.policy.attention='offload' needs a CUDA device (it keeps the tensor in pinned "
        "host memory"
    )
    assert "valid on a CPU: ['keep', 'int8', 'fp8', 'recompute']" in str(error.value)
    with pytest.raises(VariantError, match=r"\['offload', 'ac_full_offload'\] keep activations"):
        check_variants_run_here(parse_variants("none,offload,ac_full_offload"))
    check_variants_run_here(parse_variants("none,int8,ac_full_int8"))  # no error


def test_offload_variants():
    variants = {v.name: v for v in parse_variants("offload,compact:0.25+offload,ac_full_offload")}
    assert variants["offload"].storage_changes == ALL_OFFLOADED
    assert variants["compact:0.25+offload"].method == "compact"
    assert variants["ac_full_offload"].storage_changes == {"block_input": "offload"}
    assert variants["ac_full_offload"].ac_mode == "full"
    assert all(v.offloads for v in variants.values())
    assert not parse_variants("int8")[0].offloads


# ----------------------------------------------------------------------------- compress


def _sites(raw):
    return run_config_from_dict(raw).compression.sites


def test_compress_policy_resolves_into_compression_sites():
    compact = {"method": "compact", "rank": 0.25}
    # No explicit sites: the sites set to compress replace the default list...
    assert _sites({"compression": compact, "memory": {"policy": {"fc2": "compress"}}}) == ("fc2",)
    assert _sites(
        {"compression": compact, "memory": {"policy": {"proj": "compress", "qkv": "compress"}}}
    ) == ("qkv", "proj")
    # ... and without any, 'keep' removes a site from it.
    assert _sites({"compression": compact, "memory": {"policy": {"qkv": "keep"}}}) == (
        "fc1",
        "fc2",
    )
    assert _sites({"compression": compact}) == ("qkv", "fc1", "fc2")
    # An explicit list the policies agree with.
    explicit = {**compact, "sites": ["qkv", "fc2"]}
    agree = {"qkv": "compress", "fc1": "keep"}
    assert _sites({"compression": explicit, "memory": {"policy": agree}}) == ("qkv", "fc2")


@pytest.mark.parametrize(
    "raw, message",
    [
        (
            {"memory": {"policy": {"fc2": "compress"}}},
            "memory.policy.fc2='compress' compresses the site with compression.method, which "
            "is 'none'; set compression.method to a compression method or the policy to 'keep'",
        ),
        (
            {
                "compression": {"method": "compact", "sites": ["qkv"]},
                "memory": {"policy": {"fc2": "compress"}},
            },
            "memory.policy.fc2='compress' contradicts compression.sites=['qkv']",
        ),
        (
            {
                "compression": {"method": "compact", "sites": ["qkv"]},
                "memory": {"policy": {"qkv": "keep"}},
            },
            "memory.policy.qkv='keep' contradicts compression.sites=['qkv']",
        ),
        ({"memory": {"policy": {"norm": "compress"}}}, "memory.policy.norm='compress' is not"),
    ],
    ids=["method_none", "compress_outside_list", "keep_inside_list", "not_a_linear_site"],
)
def test_compress_policy_refusals(raw, message):
    with pytest.raises(ConfigError) as error:
        run_config_from_dict(raw)
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_model_refuses_compress_policy_the_compression_does_not_serve(single_rank):
    with pytest.raises(ValueError, match=r"memory.policy.fc2='compress' but the compression"):
        build_llama("tiny", CompressionConfig(), storage_policy=StoragePolicy(fc2="compress"))


def test_fc2_compress_policy_builds_the_model_of_compression_sites_fc2(single_rank):
    """Same saved bytes (by kind and block) and bit-identical loss and gradients."""
    raw = {"compression": {"method": "compact", "rank": 0.25}}
    by_policy = run_config_from_dict({**raw, "memory": {"policy": {"fc2": "compress"}}})
    by_sites = run_config_from_dict({"compression": {**raw["compression"], "sites": ["fc2"]}})
    assert by_policy.compression == by_sites.compression
    config = get_model_config("tiny", seq_length=32)
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (2, 33), generator=generator)
    results = []
    for run in (by_policy, by_sites):
        model = build_llama(
            config,
            run.compression,
            init_seed=0,
            storage_policy=run.memory.storage_policy,
        )
        saved = measure_model_forward(model, tokens[:, :-1], tokens[:, 1:], torch.ones(2, 32))
        loss = model.loss(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results.append((saved, loss.detach(), grads))
    (saved_a, loss_a, grads_a), (saved_b, loss_b, grads_b) = results
    assert saved_a.by_kind == saved_b.by_kind and saved_a.per_layer == saved_b.per_layer
    assert saved_a.by_kind["fc2"] > 0 and saved_a.by_kind.get("qkv", 0) == 0
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(grads_a[n], grads_b[n]) for n in grads_b)


def test_uncompressed_variant_drops_the_compress_policies_it_cannot_serve():
    """A ``none`` variant of a config that compresses through ``memory.policy`` runs it
    uncompressed (``compress`` with method ``none`` would be refused); a compressing variant
    keeps the policy, so its sites stay the config's."""
    raw = {
        "compression": {"method": "compact", "rank": 0.25},
        "memory": {"policy": {"fc2": "compress", "swiglu": "int8"}},
    }
    none, compact = parse_variants("none,compact:0.125")
    applied = none.apply(raw)
    assert applied["memory"]["policy"] == {"swiglu": "int8"}
    assert run_config_from_dict(applied).compression.method == "none"
    assert run_config_from_dict(compact.apply(raw)).compression.sites == ("fc2",)
    assert raw["memory"]["policy"]["fc2"] == "compress"  # the base config is not changed
