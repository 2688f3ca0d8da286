"""The LLaMA model (actcomp_dist.models), each test against a reference.

- Configs: the closed-form parameter count equals the built model's and the published sizes.
- Numerics: RoPE against a float64 complex-rotation reference; grouped-query attention and the
  whole model's logits against a float64 reference LLaMA written from the logical (Hugging
  Face named) weights, which also checks the fused QKV / gate-up layouts and the weight map.
- Training: loss at init against its closed form; the tiny model overfits a batch.
- Weights: logical <-> shard round trips are bit-exact.
- Tensor parallelism (2 gloo ranks): TP=2 and TP=2+SP give the same initial weights, losses,
  gradients and gradient norms over 3 optimizer steps as TP=1, for ``none``, ``compact`` and
  tied embeddings; a config that does not divide by TP fails on every rank.
- float64 replay (TP 1, TP 2, TP 2 + SP): after ``model.double()`` the loss and gradients are
  float64 and as close to the float64 reference as the fp32 model's error scaled by 2^-29.
- megatron-core ``GPTModel`` with the compressed spec, on CPU through test-only shims: ``none``
  is bit-identical to megatron's local spec, ``compact`` changes only the compressed layers'
  weight gradients, and those equal ``LlamaModel``'s (the spec binds the same layer ids).

Single-rank tests run in the pytest process on a one-rank gloo world (module fixture).
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from actcomp_dist import CompressionConfig, find_schedule, projection_seed
from actcomp_dist.memory import saved_activation_bytes
from actcomp_dist.models import (
    LlamaConfig,
    LlamaModel,
    build_llama,
    check_tensor_parallel,
    full_state_dict,
    gather_full,
    get_model_config,
    load_full_weights,
    merge_shards,
    parameter_count,
    shard_full_state_dict,
)
from actcomp_dist.models.llama import RotaryEmbedding, apply_rotary
from actcomp_dist.models.weights import logical_shapes
from actcomp_dist.parallel import state
from tests.helpers.distributed import DistributedError, run_distributed
from tests.helpers.llama_reference import (
    random_full_weights,
    reference_attention,
    reference_logits,
    reference_loss_and_grads,
    reference_rope,
)
from tests.helpers.tolerances import UNIT_ROUNDOFF, assert_as_accurate_as, gamma

TINY = get_model_config("tiny")
# A shorter sequence keeps the multi-rank and reference tests fast; nothing depends on 128.
SMALL = TINY.replace(seq_length=32)


def _tokens(config: LlamaConfig, batch: int, seq: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (batch, seq + 1), generator=generator)


# ----------------------------------------------------------------------------- references


def lift_compact_grads(grads: dict, config: LlamaConfig, compression, epoch: int) -> dict:
    """``compact``'s weight gradients in float64: the exact gradient G of each compressed
    site's logical weights lifted as G P P^T, with P drawn as the seed rule draws it (fp32
    N(0, 1) times fp32 1/sqrt(r) from a generator seeded by projection_seed, block 0)."""
    sites = {
        "qkv": (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), config.hidden_size),
        "fc1": (("mlp.gate_proj", "mlp.up_proj"), config.hidden_size),
        "fc2": (("mlp.down_proj",), config.ffn_hidden_size),
    }
    lifted = dict(grads)
    for layer_id in range(config.num_layers):
        for site, (names, width) in sites.items():
            rank = compression.resolve_rank(width)
            seed = projection_seed(compression.seed, layer_id, site, 0, epoch)
            generator = torch.Generator().manual_seed(seed)
            p = torch.randn(width, rank, generator=generator, dtype=torch.float32)
            p = p.mul_(1.0 / math.sqrt(rank)).double()
            for name in names:
                key = f"model.layers.{layer_id}.{name}.weight"
                lifted[key] = grads[key] @ p @ p.t()
    return lifted


# ----------------------------------------------------------------------------- configs


PUBLISHED_SIZES = {"60m": 58e6, "130m": 134e6, "350m": 368e6, "1b": 1.34e9, "7b": 6.74e9}


def test_parameter_count_matches_published_sizes():
    exact = {name: parameter_count(get_model_config(name)) for name in PUBLISHED_SIZES}
    assert exact == {
        "60m": 58_073_600,
        "130m": 134_105_856,
        "350m": 367_969_280,
        "1b": 1_339_082_752,
        "7b": 6_738_415_616,  # Meta's LLaMA-7B count
    }
    for name, published in PUBLISHED_SIZES.items():
        # The published sizes are rounded to 2-3 significant digits.
        assert abs(exact[name] - published) / published < 0.005, name


@pytest.mark.parametrize("name", ["tiny", "60m"])
def test_parameter_count_equals_built_model(single_rank, name):
    config = get_model_config(name)
    # 60m is built on the meta device: shapes only, no memory or init cost.
    device = torch.device("meta") if name == "60m" else contextlib.nullcontext()
    with device:
        model = LlamaModel(config)
    assert sum(p.numel() for p in model.parameters()) == parameter_count(config)
    tied = config.replace(tie_embeddings=True)
    with torch.device("meta"):
        model = LlamaModel(tied)
    assert sum(p.numel() for p in model.parameters()) == parameter_count(tied)


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(hidden_size=0), "hidden_size"),
        (dict(num_attention_heads=3), "num_attention_heads"),  # 128 % 3
        (dict(num_query_groups=3), "num_query_groups"),  # 4 % 3
        (dict(rope_theta=-1.0), "rope_theta"),
        (dict(params_dtype="int8"), "params_dtype"),
        (dict(tie_embeddings="yes"), "tie_embeddings"),
    ],
)
def test_config_validation_names_the_field(changes, field):
    with pytest.raises(ValueError, match=field):
        TINY.replace(**changes)


def test_config_registry_and_dict_round_trip():
    with pytest.raises(ValueError, match="available"):
        get_model_config("13b")
    assert get_model_config("tiny", seq_length=64).seq_length == 64
    assert LlamaConfig.from_dict(TINY.to_dict()) == TINY
    assert TINY.replace(params_dtype="bfloat16").params_dtype is torch.bfloat16
    with pytest.raises(ValueError, match="hidden_dim"):
        LlamaConfig.from_dict({**TINY.to_dict(), "hidden_dim": 1})


@pytest.mark.parametrize(
    "config, tp, field",
    [
        (TINY, 4, "num_query_groups"),  # 2 groups
        (TINY.replace(num_query_groups=None, num_attention_heads=8), 16, "num_attention_heads"),
        (get_model_config("1b"), 2, "ffn_hidden_size"),  # 5461 is odd
        (TINY.replace(vocab_size=2049), 2, "vocab_size"),
    ],
)
def test_tensor_parallel_divisibility_is_checked(config, tp, field):
    with pytest.raises(ValueError, match=field):
        check_tensor_parallel(config, tp)


# ----------------------------------------------------------------------------- numerics


def test_rope_matches_float64_reference():
    config = TINY
    rotary = RotaryEmbedding(config.head_dim, config.seq_length, config.rope_theta)
    x = torch.randn(
        2, 3, config.seq_length, config.head_dim, generator=torch.Generator().manual_seed(0)
    )
    ours = apply_rotary(x, rotary(config.seq_length))
    # fp32 tables as Hugging Face's: inv_freq = 1 / theta^(2j/d) is within (ln theta + 3) u of
    # exact (the exponent's rounding, amplified by ln theta, a 1-ulp pow, the division), the
    # angle p * inv_freq one rounding more; cos and sin (SLEEF/libm, <= 1 ulp) add 2 u of
    # their argument's image. The rotation x cos - rot(x) sin adds gamma_2 of its terms.
    u, d = UNIT_ROUNDOFF[torch.float32], config.head_dim
    inv_freq = config.rope_theta ** (-2.0 * torch.arange(d // 2, dtype=torch.float64) / d)
    angles = torch.arange(config.seq_length, dtype=torch.float64)[:, None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)  # [s, d]
    table_error = angles * (math.log(config.rope_theta) + 4) * u + 2 * u
    magnitude = x.double().abs() + torch.cat((x[..., d // 2 :], x[..., : d // 2]), -1).abs()
    bound = magnitude * (table_error + gamma(2, torch.float32))
    error = (ours.double() - reference_rope(x, config.rope_theta)).abs()
    assert (error <= bound).all(), (error.max().item(), (error / bound).max().item())
    torch.testing.assert_close(ours[:, :, 0], x[:, :, 0], rtol=0, atol=0)  # position 0: identity


def test_gqa_attention_matches_float64_reference(single_rank):
    config = SMALL
    model = LlamaModel(config)
    full = random_full_weights(config, seed=1)
    load_full_weights(model, full)
    x = torch.randn(
        2, config.seq_length, config.hidden_size, generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        ours = model.layers[0].attention(x.transpose(0, 1), model.rope(config.seq_length))
    p = "model.layers.0.self_attn."
    weights = [full[p + f"{n}_proj.weight"] for n in "qkvo"]
    expected = reference_attention(x, *weights, config)
    # Projections, RoPE, softmax, two token reductions: too nested for an element-wise bound,
    # so both sides against float64: ours as accurate as the reference formula in fp32.
    plain = reference_attention(x, *weights, config, torch.float32)
    assert_as_accurate_as(
        {"out": ours.transpose(0, 1)}, {"out": plain}, {"out": expected}, torch.float32
    )


@pytest.mark.parametrize(
    "config",
    [SMALL, SMALL.replace(num_query_groups=None), SMALL.replace(tie_embeddings=True)],
    ids=["gqa", "mha", "tied"],
)
def test_logits_match_float64_reference_llama(single_rank, config):
    model = LlamaModel(config)
    full = random_full_weights(config, seed=2)
    load_full_weights(model, full)
    tokens = _tokens(config, batch=2, seq=config.seq_length, seed=0)[:, :-1]
    with torch.no_grad():
        logits = model(tokens)
    assert logits.shape == (2, config.seq_length, config.vocab_size)
    # Two blocks and the head: both sides against float64, ours as accurate as the reference
    # forward in fp32 (a wrong layout or weight name errs by O(1), 10^5 times more).
    expected = reference_logits(full, config, tokens)
    plain = reference_logits(full, config, tokens, torch.float32)
    assert_as_accurate_as(
        {"logits": logits}, {"logits": plain}, {"logits": expected}, torch.float32
    )


def test_forward_shapes_and_loss_mask(single_rank):
    model = LlamaModel(SMALL)
    batch = _tokens(SMALL, batch=3, seq=16, seed=0)
    tokens, labels = batch[:, :-1], batch[:, 1:]
    losses = model(tokens, labels)
    assert losses.shape == (3, 16) and losses.dtype == torch.float32
    mask = torch.zeros(3, 16)
    mask[:, :5] = 1.0
    masked = model(tokens, labels, mask)
    torch.testing.assert_close(masked, losses * mask, rtol=0, atol=0)
    # Both sides sum the same positive per-token losses (magnitude = value) in some order
    # and divide by the count: 2 gamma_(n + 1) relative, n = 48 tokens at most.
    rtol = 2 * gamma(3 * 16 + 1, torch.float32)
    expected = losses[:, :5].mean()
    torch.testing.assert_close(model.loss(tokens, labels, mask), expected, rtol=rtol, atol=0)
    torch.testing.assert_close(model.loss(tokens, labels), losses.mean(), rtol=rtol, atol=0)
    with pytest.raises(ValueError, match="seq_length"):
        model(_tokens(SMALL, batch=1, seq=SMALL.seq_length + 1, seed=0))


def test_initial_loss_matches_closed_form(single_rank):
    """At init the final hidden state has RMS 1 (norm weights 1), so each logit is
    N(0, s^2) with s^2 = std^2 * hidden_size, independent of the uniform random target, and
    E[cross-entropy] = E[logsumexp] = ln V + s^2 / 2 (to O(s^4 / V))."""
    model = LlamaModel(TINY)
    batch = _tokens(TINY, batch=8, seq=TINY.seq_length, seed=0)
    with torch.no_grad():
        loss = model.loss(batch[:, :-1], batch[:, 1:]).item()
    variance = TINY.init_method_std**2 * TINY.hidden_size
    expected = math.log(TINY.vocab_size) + variance / 2
    # Per-token losses have std ~ s = 0.23; the mean of 1024 tokens is within ~0.01 (plus the
    # shared output-weight draw); 0.05 is several sigma and far below ln V's 7.6.
    assert abs(loss - expected) < 0.05, (loss, expected)


def test_tiny_model_trains(single_rank):
    """Method ``none`` at TP=1 overfits one batch: the loss falls from ln V ~ 7.6."""
    torch.manual_seed(0)
    model = build_llama(TINY, init_seed=0)
    batch = _tokens(TINY, batch=4, seq=64, seed=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = model.loss(batch[:, :-1], batch[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > 7.0 and losses[-1] < 2.0, losses


def test_compression_sites_layer_ids_and_shared_schedule(single_rank):
    compression = CompressionConfig(method="compact", rank=0.25, sites=("qkv", "proj"))
    model = LlamaModel(SMALL, compression)
    for i, layer in enumerate(model.layers):
        linears = {
            "qkv": layer.attention.qkv,
            "proj": layer.attention.proj,
            "fc1": layer.mlp.fc1,
            "fc2": layer.mlp.fc2,
        }
        for site, linear in linears.items():
            assert (linear.layer_id, linear.site) == (i, site)
            assert linear.schedule is model.compression_schedule
            expected = "compact" if site in compression.sites else "none"
            assert linear.compression.method == expected
    with pytest.raises(ValueError, match="unknown site"):
        LlamaModel(SMALL, compression.replace(sites=("qkv", "q_proj")))


def test_compact_saves_fewer_activation_bytes_in_the_naive_block(single_rank):
    batch = _tokens(SMALL, batch=2, seq=32, seed=0)

    def saved(compression, efficient_ops):
        model = LlamaModel(SMALL, compression, efficient_ops=efficient_ops)
        return saved_activation_bytes(lambda: model.loss(batch[:, :-1], batch[:, 1:]))

    compact = CompressionConfig(method="compact", rank=0.25)
    dense, compressed = saved(CompressionConfig(), False), saved(compact, False)
    # Per block, qkv/fc1 (h -> h/4) and fc2 (f -> f/4) inputs shrink by 4x, 4-byte floats,
    # 64 tokens: 0.75 * (2 h + f) * 64 * 4 bytes. Their other consumers (attention, SwiGLU)
    # save their own tensors, which stay.
    h, f = SMALL.hidden_size, SMALL.ffn_hidden_size
    per_block = (2 * (h - h // 4) + (f - f // 4)) * 64 * 4
    assert dense - compressed == SMALL.num_layers * per_block  # exact storage counts
    # The memory-efficient block keeps those inputs anyway (the norm outputs, [gate | up] from
    # which fc2 recomputes its input): compression adds its Z, (2 h/4 + f/4) per token.
    dense, compressed = saved(CompressionConfig(), True), saved(compact, True)
    z_bytes = (2 * (SMALL.hidden_size // 4) + SMALL.ffn_hidden_size // 4) * 64 * 4
    assert compressed - dense == SMALL.num_layers * z_bytes


def test_blocks_can_be_checkpointed(single_rank):
    """The activation-checkpointing hook: recomputing every block in backward
    (``torch.utils.checkpoint`` over ``model.layers[i](hidden, rope)``) gives bit-identical
    loss and gradients, ``compact`` included (the recompute draws the same projection)."""
    model = LlamaModel(SMALL, CompressionConfig(method="compact", rank=0.25))
    batch = _tokens(SMALL, batch=2, seq=SMALL.seq_length, seed=0)

    def step(checkpointed: bool):
        model.zero_grad()
        tokens, labels = batch[:, :-1], batch[:, 1:]
        hidden, rope = model.embed(tokens), model.rope(tokens.shape[1])
        for layer in model.layers:
            if checkpointed:
                hidden = checkpoint(layer, hidden, rope, use_reentrant=False)
            else:
                hidden = layer(hidden, rope)
        loss = model.head(hidden, labels).mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss, grads = step(checkpointed=False)
    loss_ckpt, grads_ckpt = step(checkpointed=True)
    assert torch.equal(loss, loss_ckpt)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_ckpt, strict=True))


# ----------------------------------------------------------------------------- weights


def test_full_weights_round_trip_is_bit_exact(single_rank):
    model = LlamaModel(SMALL, init_seed=3)
    full = full_state_dict(model)
    assert set(full) == set(logical_shapes(SMALL))
    other = LlamaModel(SMALL, init_seed=4)
    assert not torch.equal(full_state_dict(other)["lm_head.weight"], full["lm_head.weight"])
    load_full_weights(other, full)
    for (name, a), b in zip(model.named_parameters(), other.parameters(), strict=True):
        assert torch.equal(a, b), name
    reloaded = full_state_dict(other)
    assert all(torch.equal(reloaded[name], full[name]) for name in full)


@pytest.mark.parametrize("tp", [2, 4])
def test_shard_merge_round_trip_is_bit_exact(tp):
    config = SMALL.replace(num_query_groups=4, num_attention_heads=8, hidden_size=128)
    full = random_full_weights(config, seed=5)
    shards = [shard_full_state_dict(full, config, rank, tp) for rank in range(tp)]
    merged = merge_shards(shards, config)
    assert set(merged) == set(full)
    assert all(torch.equal(merged[name], full[name]) for name in full)
    # Rank r's QKV shard is [q heads of group g | k_g | v_g] for its own groups g.
    d, per_rank = config.head_dim, config.query_groups // tp
    q = full["model.layers.0.self_attn.q_proj.weight"]
    k = full["model.layers.0.self_attn.k_proj.weight"]
    qkv = shards[1]["layers.0.attention.qkv.weight"]
    group = per_rank  # rank 1's first group
    q_rows = config.heads_per_group * d
    assert torch.equal(qkv[:q_rows], q[group * q_rows : (group + 1) * q_rows])
    assert torch.equal(qkv[q_rows : q_rows + d], k[group * d : (group + 1) * d])
    # Rank r's FC1 shard is [gate rows of r; up rows of r].
    f = config.ffn_hidden_size // tp
    fc1 = shards[1]["layers.0.mlp.fc1.weight"]
    assert torch.equal(fc1[:f], full["model.layers.0.mlp.gate_proj.weight"][f : 2 * f])
    assert torch.equal(fc1[f:], full["model.layers.0.mlp.up_proj.weight"][f : 2 * f])


def test_load_full_weights_rejects_bad_input(single_rank):
    model = LlamaModel(SMALL)
    full = full_state_dict(model)
    missing = {k: v for k, v in full.items() if k != "model.norm.weight"}
    with pytest.raises(ValueError, match="model.norm.weight"):
        load_full_weights(model, missing)
    wrong = {**full, "lm_head.weight": full["lm_head.weight"][:-1]}
    with pytest.raises(ValueError, match="lm_head.weight"):
        load_full_weights(model, wrong)


# ----------------------------------------------------------------------------- TP invariance

TP_CASES = {
    "none": (SMALL, CompressionConfig()),
    # resample_every=2: the 3 steps cross a projection resample.
    "compact": (SMALL, CompressionConfig(method="compact", rank=0.25, resample_every=2)),
    # The output layer borrows the vocab-parallel embedding weight.
    "none_tied": (SMALL.replace(tie_embeddings=True), CompressionConfig()),
}
TP_STEPS = 3


def _tp_training_run(rank, world_size, tp, sequence_parallel):
    """3 SGD steps of the small model on fixed data for each case; rank 0 returns the
    initial full weights, per-step losses, full gradients and their norms, and the final full
    weights."""
    state.initialize_model_parallel(tp)
    batch = _tokens(SMALL, batch=2, seq=SMALL.seq_length, seed=7)
    results = {}
    for case, (config, compression) in TP_CASES.items():
        model = build_llama(config, compression, sequence_parallel=sequence_parallel, init_seed=0)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        model.compression_schedule.attach(optimizer)
        run = {"init": full_state_dict(model), "losses": [], "grad_norms": [], "grads": []}
        for _ in range(TP_STEPS):
            optimizer.zero_grad()
            loss = model.loss(batch[:, :-1], batch[:, 1:])
            loss.backward()
            grads = gather_full(model, {n: p.grad for n, p in model.named_parameters()})
            run["losses"].append(loss.item())
            run["grad_norms"].append(
                math.sqrt(sum(g.double().pow(2).sum() for g in grads.values()))
            )
            run["grads"].append(grads)
            optimizer.step()
        run["final"] = full_state_dict(model)
        results[case] = run
    return results if rank == 0 else None


def _float64_tp_run(init: dict, config: LlamaConfig, compression, batch) -> dict:
    """The TP_STEPS SGD steps of _tp_training_run in float64 from the same initial weights:
    per-step losses, gradients and their norms, the final weights."""
    weights = {name: w.double() for name, w in init.items()}
    run = {"losses": [], "grad_norms": [], "grads": []}
    for step in range(TP_STEPS):
        loss, grads = reference_loss_and_grads(weights, config, batch[:, :-1], batch[:, 1:])
        if compression.method == "compact":  # the schedule advances after each step
            grads = lift_compact_grads(
                grads, config, compression, step // compression.resample_every
            )
        run["losses"].append(loss)
        run["grad_norms"].append(
            torch.stack([g.square().sum() for g in grads.values()]).sum().sqrt()
        )
        run["grads"].append(grads)
        weights = {name: w - 0.1 * grads[name] for name, w in weights.items()}
    run["final"] = weights
    return run


def _flattened(tensors: dict) -> dict[str, torch.Tensor]:
    return {"all": torch.cat([t.flatten().double() for t in tensors.values()])}


def _by_step(values) -> dict[str, torch.Tensor]:
    return {f"step {i}": torch.as_tensor(v, dtype=torch.float64) for i, v in enumerate(values)}


@pytest.fixture(scope="module")
def tp1_reference(tmp_path_factory):
    return run_distributed(_tp_training_run, 1, tmp_path_factory.mktemp("tp1"), 1, False)[0]


@pytest.mark.distributed
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2_sp"])
def test_tp2_matches_tp1(tmp_path, tp1_reference, sequence_parallel):
    results = run_distributed(_tp_training_run, 2, tmp_path, 2, sequence_parallel)[0]
    batch = _tokens(SMALL, batch=2, seq=SMALL.seq_length, seed=7)  # _tp_training_run's
    for case, reference in tp1_reference.items():
        run = results[case]
        assert reference["losses"][-1] < reference["losses"][0], case  # the steps do learn
        # The same seed draws the same full weights at any TP size: bit-identical.
        for name, weight in reference["init"].items():
            assert torch.equal(run["init"][name], weight), (case, name)
        # Otherwise only the float summation order differs (vocab/head/FFN shards summed
        # across ranks), through whole forward and backward passes: both runs against the
        # same 3 steps in float64, TP=2 as accurate as TP=1 (tests/helpers/tolerances.py). After the
        # first step each run continues from its own rounded weights, so its gradients are
        # compared as one vector (a 64-element norm weight's max error is too noisy a
        # statistic for a factor of 2 once the trajectories differ).
        config, compression = TP_CASES[case]
        exact = _float64_tp_run(reference["init"], config, compression, batch)
        assert_as_accurate_as(
            _by_step(run["losses"]),
            _by_step(reference["losses"]),
            _by_step(exact["losses"]),
            torch.float32,
            (case, "losses"),
        )
        for step, grads in enumerate(run["grads"]):
            baseline, expected = reference["grads"][step], exact["grads"][step]
            if step == 0:  # from the same weights: tensor by tensor
                assert_as_accurate_as(grads, baseline, expected, torch.float32, (case, step))
            else:  # each run from its own rounded weights: the whole gradient at once
                flat = [_flattened(d) for d in (grads, baseline, expected)]
                assert_as_accurate_as(*flat, torch.float32, (case, step))
            # A norm moves by at most the norm of the change (triangle inequality): the
            # gradients' own error bounds their norm's, whose float64 sum adds gamma_n(f64).
            count = sum(g.numel() for g in grads.values())
            change = torch.stack(
                [(g.double() - expected[name]).square().sum() for name, g in grads.items()]
            )
            norm, exact_norm = run["grad_norms"][step], exact["grad_norms"][step].item()
            bound = change.sum().sqrt().item() + 2 * gamma(count, torch.float64) * exact_norm
            assert abs(norm - exact_norm) <= bound, (case, step, norm, exact_norm)
        assert_as_accurate_as(
            run["final"], reference["final"], exact["final"], torch.float32, (case, "final")
        )


def _build_bad_config(rank, world_size):
    state.initialize_model_parallel(2)
    LlamaModel(SMALL.replace(num_query_groups=1))


@pytest.mark.distributed
def test_indivisible_config_fails_on_every_rank(tmp_path):
    with pytest.raises(DistributedError) as error:
        run_distributed(_build_bad_config, 2, tmp_path, timeout=60)
    assert set(error.value.failures) == {0, 1}
    assert all("num_query_groups" in failure for failure in error.value.failures.values())


# ----------------------------------------------------------------------------- float64 replay

#: The model's numerical paths: the naive block with the full-logits cross-entropy, the
#: efficient ops (closed-form RMSNorm backward, cached RoPE tables) with the chunked loss,
#: and the output layer borrowing the embedding.
FLOAT64_CASES = {
    "naive": (SMALL, {"efficient_ops": False}),
    "efficient_chunked": (SMALL, {"efficient_ops": True, "loss_chunk_tokens": 16}),
    "tied": (SMALL.replace(tie_embeddings=True), {}),
}


def _float64_replay_run(rank, world_size, tp, sequence_parallel):
    """Each FLOAT64_CASES model's loss and full gradients in fp32, then the same model after
    ``.double()``; rank 0 returns them with the initial full weights."""
    state.initialize_model_parallel(tp)
    batch = _tokens(SMALL, batch=2, seq=SMALL.seq_length, seed=7)
    results = {}
    for case, (config, options) in FLOAT64_CASES.items():
        model = build_llama(config, sequence_parallel=sequence_parallel, init_seed=0, **options)
        run = {"init": full_state_dict(model)}
        for dtype in (torch.float32, torch.float64):
            model.to(dtype)
            model.zero_grad(set_to_none=True)
            loss = model.loss(batch[:, :-1], batch[:, 1:])
            loss.backward()
            grads = gather_full(model, {n: p.grad for n, p in model.named_parameters()})
            run[dtype] = (loss.detach(), grads)
        results[case] = run
    return results if rank == 0 else None


@pytest.mark.distributed
@pytest.mark.parametrize(
    ("tp", "sequence_parallel"), [(1, False), (2, False), (2, True)], ids=["tp1", "tp2", "tp2_sp"]
)
def test_float64_model_replays_the_float64_reference(tmp_path, tp, sequence_parallel):
    """``model.double()`` computes in float64 end to end (norm statistics, RoPE tables, logits,
    both cross-entropies): loss and gradients are float64 and as close to the float64
    reference LLaMA as float64 rounding allows."""
    results = run_distributed(_float64_replay_run, tp, tmp_path, tp, sequence_parallel)[0]
    batch = _tokens(SMALL, batch=2, seq=SMALL.seq_length, seed=7)
    # The float64 model rounds the same operations as the fp32 one with a unit roundoff
    # 2^-29 times smaller, so its error is the fp32 model's scaled by 2^-29 (factor 2 for the
    # reordering, as in assert_as_accurate_as), plus one float64 rounding of the whole. In
    # Frobenius norm over all gradients at once: a 64-element norm weight's max error is too
    # noisy a statistic for a factor of 2 (measured up to 1.5 of it). A single step left in
    # fp32 (the RoPE tables, measured) errs by about the fp32 model's own error, 10^6 - 10^8
    # times this bound. Measured: gradients 0.40 (TP 1) and 0.71 (TP 2, TP 2 + SP) of the
    # bound, losses at most 0.52.
    scale = UNIT_ROUNDOFF[torch.float64] / UNIT_ROUNDOFF[torch.float32]
    eps = torch.finfo(torch.float64).eps
    for case, run in results.items():
        config = FLOAT64_CASES[case][0]
        exact_loss, exact_grads = reference_loss_and_grads(
            run["init"], config, batch[:, :-1], batch[:, 1:]
        )
        loss32, grads32 = run[torch.float32]
        loss64, grads64 = run[torch.float64]
        assert loss64.dtype == torch.float64, case
        assert {g.dtype for g in grads64.values()} == {torch.float64}, case
        assert grads64.keys() == exact_grads.keys(), case
        pairs = {
            "loss": (loss64, loss32, exact_loss),
            "gradients": tuple(_flattened(d)["all"] for d in (grads64, grads32, exact_grads)),
        }
        for name, (ours, fp32, exact) in pairs.items():
            error = (ours - exact).norm().item()
            error32 = (fp32.double() - exact).norm().item()
            bound = 2 * scale * error32 + eps * exact.norm().item()
            assert error <= bound, (case, name, error, error32)


# ----------------------------------------------------------------------------- megatron GPTModel


class _CpuRngTracker:
    """Stands in for megatron's CUDA RNG tracker; the models here have no dropout."""

    def fork(self, name: str = "model-parallel-rng"):
        return contextlib.nullcontext()


@pytest.fixture
def megatron_on_cpu(single_rank, monkeypatch):
    """TEST-ONLY shims that let megatron-core's GPTModel run on the CPU: its RNG tracker and
    ``torch.cuda.current_device()`` (rotary tables, buffers) pointed at the CPU."""
    from megatron.core.tensor_parallel import random as megatron_random

    monkeypatch.setattr(megatron_random, "_CUDA_RNG_STATE_TRACKER", _CpuRngTracker())
    monkeypatch.setattr(megatron_random, "_CUDA_RNG_STATE_TRACKER_INITIALIZED", True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: torch.device("cpu"))


def _gpt_model(config: LlamaConfig, layer_spec, seed: int):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    transformer_config = TransformerConfig(
        num_layers=config.num_layers,
        hidden_size=config.hidden_size,
        ffn_hidden_size=config.ffn_hidden_size,
        num_attention_heads=config.num_attention_heads,
        num_query_groups=config.query_groups,
        init_method_std=config.init_method_std,
        layernorm_epsilon=config.rms_norm_eps,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        use_cpu_initialization=True,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
    )
    torch.manual_seed(seed)  # megatron's CPU initialisation draws from the global RNG
    return GPTModel(
        config=transformer_config,
        transformer_layer_spec=layer_spec,
        vocab_size=config.vocab_size,
        max_sequence_length=config.seq_length,
        position_embedding_type="rope",
        rotary_base=int(config.rope_theta),
        share_embeddings_and_output_weights=False,
    )


def _gpt_step(model, batch):
    """Per-token losses and gradients of one step. megatron's default causal mask is allocated
    on "cuda", so an explicit one is passed (True = masked)."""
    tokens, labels = batch[:, :-1], batch[:, 1:]
    seq = tokens.shape[1]
    positions = torch.arange(seq).expand_as(tokens)
    mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool), diagonal=1)[None, None]
    losses = model(tokens, positions, mask, labels=labels)
    losses.mean().backward()
    return losses.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_gpt_spec_none_is_megatron_local_spec(megatron_on_cpu):
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from actcomp_dist.parallel.spec import get_compressed_gpt_layer_spec

    batch = _tokens(SMALL, batch=2, seq=SMALL.seq_length, seed=0)
    local = _gpt_model(SMALL, get_gpt_layer_local_spec(normalization="RMSNorm"), seed=0)
    ours = _gpt_model(SMALL, get_compressed_gpt_layer_spec(CompressionConfig()), seed=0)
    assert type(ours.decoder.layers[0].mlp.linear_fc2).__name__ == "CompressedRowParallelLinear"
    local_losses, local_grads = _gpt_step(local, batch)
    losses, grads = _gpt_step(ours, batch)
    assert torch.equal(losses, local_losses)
    for name, grad in local_grads.items():
        assert torch.equal(grads[name], grad), name


def test_gpt_spec_compact_matches_llama_model(megatron_on_cpu):
    """With the same weights, megatron's GPTModel with the compressed spec and our LlamaModel
    compute the same loss and gradients, ``compact`` included: the spec gives layer i the
    same layer id (hence the same projections) as ``LlamaModel.layers[i]``. Against megatron's
    uncompressed model, only the compressed weights' gradients change."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    from actcomp_dist.parallel.spec import get_compressed_gpt_layer_spec, gpt_model_parameter_name

    compression = CompressionConfig(method="compact", rank=0.25, seed=11)
    batch = _tokens(SMALL, batch=2, seq=SMALL.seq_length, seed=0)
    gpt = _gpt_model(SMALL, get_compressed_gpt_layer_spec(compression), seed=0)
    schedule = find_schedule(gpt)
    for i, layer in enumerate(gpt.decoder.layers):
        for linear in (layer.self_attention.linear_qkv, layer.mlp.linear_fc1, layer.mlp.linear_fc2):
            assert linear.layer_id == i and linear.schedule is schedule
    llama = LlamaModel(SMALL, compression)
    gpt_parameters = dict(gpt.named_parameters())
    with torch.no_grad():
        for name, parameter in llama.named_parameters():
            parameter.copy_(gpt_parameters[gpt_model_parameter_name(name)])

    gpt_losses, gpt_grads = _gpt_step(gpt, batch)
    llama_losses = llama(batch[:, :-1], batch[:, 1:])
    llama_losses.mean().backward()
    # Same math, different kernels (SDPA vs megatron's baddbmm + softmax, torch's RMSNorm):
    # both against float64 (compact's gradients lifted through the same projections), each
    # as accurate as the other (tests/helpers/tolerances.py).
    full = full_state_dict(llama)
    leaves = {name: w.double().requires_grad_() for name, w in full.items()}
    logits = reference_logits(leaves, SMALL, batch[:, :-1])
    exact_losses = F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none")
    exact_losses.mean().backward()
    exact = lift_compact_grads({n: w.grad for n, w in leaves.items()}, SMALL, compression, 0)
    exact["losses"] = exact_losses.detach()
    ours = gather_full(llama, {name: p.grad for name, p in llama.named_parameters()})
    ours["losses"] = llama_losses.detach()
    theirs = gather_full(
        llama,
        {name: gpt_grads[gpt_model_parameter_name(name)] for name, _ in llama.named_parameters()},
    )
    theirs["losses"] = gpt_losses
    assert_as_accurate_as(ours, theirs, exact, torch.float32, "LlamaModel")
    assert_as_accurate_as(theirs, ours, exact, torch.float32, "GPTModel")

    dense = _gpt_model(SMALL, get_gpt_layer_local_spec(normalization="RMSNorm"), seed=0)
    dense_losses, dense_grads = _gpt_step(dense, batch)
    assert torch.equal(gpt_losses, dense_losses)  # compression never changes the forward
    compressed = ("linear_qkv", "linear_fc1", "linear_fc2")
    for name, grad in dense_grads.items():
        if any(site in name for site in compressed):
            assert not torch.allclose(gpt_grads[name], grad), name
        else:  # dX is exact, so every other gradient is bit-identical
            assert torch.equal(gpt_grads[name], grad), name
