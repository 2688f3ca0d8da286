"""The chunked output layer + vocab-parallel cross-entropy (actcomp_dist.parallel.cross_entropy).

- Numerics: per-token losses, the input gradient and the output weight's gradient of
  :func:`vocab_parallel_linear_cross_entropy` and of the unchunked head (the logits, then
  :func:`~actcomp_dist.parallel.cross_entropy.vocab_parallel_cross_entropy`) both within a
  derived error bound of a float64 reference, in fp32 and bf16, for chunk sizes that do and do
  not divide the token count, with a loss mask, at TP = 1 and on 2 gloo ranks (each holding
  half the vocabulary). The unchunked head over the TP group it is handed (megatron's, or one
  created apart from megatron's state) equals megatron-core's own
  ``vocab_parallel_cross_entropy`` (over megatron's global group) bit for bit.
- The whole ``LlamaModel`` with ``loss_chunk_tokens`` against the same model without it, at
  TP = 1, TP = 2 and TP = 2 + SP, tied and untied output weights: losses within the bound of
  the log-sum-exp, every gradient as accurate as the unchunked model's against float64.
- Memory: the chunked head saves exactly its input, an fp32 log-sum-exp and an int64 label per
  token; the analytic memory model predicts the model's saved bytes to the byte, per kind.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.distributed as dist

from actcomp_dist import CompressionConfig
from actcomp_dist.ablation.measure import measure_model_forward
from actcomp_dist.memory import saved_activation_bytes
from actcomp_dist.memory_model import ActivationSetting, predict_saved_activations
from actcomp_dist.models import (
    LlamaModel,
    build_llama,
    full_state_dict,
    gather_full,
    get_model_config,
)
from actcomp_dist.parallel import megatron_layers, state
from actcomp_dist.parallel.collectives import copy_to_tensor_parallel_region
from actcomp_dist.parallel.cross_entropy import (
    vocab_parallel_cross_entropy,
    vocab_parallel_linear_cross_entropy,
)
from tests.helpers.distributed import run_distributed
from tests.helpers.llama_reference import reference_logits
from tests.helpers.tolerances import UNIT_ROUNDOFF, assert_as_accurate_as, gamma

SEQ, BATCH, HIDDEN, VOCAB = 12, 2, 32, 256  # N = 24 tokens
# Chunks that divide N (8, 24), do not (5), and exceed it (64: one chunk).
CHUNKS = (5, 8, 24, 64)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
U32 = 2.0**-24  # unit roundoff of fp32 (the GEMMs accumulate and the softmax runs in fp32)


def _unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def _head_inputs(dtype: torch.dtype, seed: int = 0):
    """h [s, b, h], the full weight [V, h], labels [s, b] and the upstream gradient of each
    token's loss (a masked mean: mask / count), all exactly representable in ``dtype``.

    Logits have a standard deviation of ~3 so the softmax is far from uniform."""
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(SEQ, BATCH, HIDDEN, generator=generator).to(dtype)
    weight = (3 * torch.randn(VOCAB, HIDDEN, generator=generator) / HIDDEN**0.5).to(dtype)
    labels = torch.randint(0, VOCAB, (SEQ, BATCH), generator=generator)
    mask = (torch.rand(SEQ, BATCH, generator=generator) > 0.3).float()
    return hidden, weight, labels, mask / mask.sum()


def _reference(hidden, weight, labels, grad):
    """float64 losses [s, b], dh [s, b, h] and dW [V, h] of the same (rounded) inputs."""
    h, w, g = hidden.double().reshape(-1, HIDDEN), weight.double(), grad.double().reshape(-1)
    y = labels.reshape(-1)
    logits = h @ w.T  # [N, V]
    lse = torch.logsumexp(logits, dim=1)
    losses = lse - logits.gather(1, y[:, None]).squeeze(1)
    dlogits = torch.softmax(logits, dim=1)
    dlogits[torch.arange(len(y)), y] -= 1
    dlogits *= g[:, None]
    return {
        "losses": losses.view(SEQ, BATCH),
        "dh": (dlogits @ w).view(SEQ, BATCH, HIDDEN),
        "dW": dlogits.T @ h,
        "_logits": logits,
        "_dlogits": dlogits,
    }


def _error_bounds(hidden, weight, grad, reference, dtype):
    """First-order bounds on |computed - float64| shared by the chunked and unchunked heads.

    With u the unit roundoff of ``dtype`` (= U32 in fp32) and g the upstream gradient:
    - logits z = h W^T: rounded to ``dtype`` (u |z|) after an fp32 sum of length h
      (h U32 sum |h||w|); per token Dz = the largest over the vocabulary;
    - loss = lse(z) - z_y moves by at most 2 Dz, plus the fp32 log-sum-exp: a sum of V
      positive terms (relative V U32) and a few roundings of values up to max |z|;
    - softmax p = exp(z - lse) moves by at most p (e^E - 1), E the loss bound; dz = g (p - 1_y)
      is then rounded to ``dtype`` (u |dz|, and U32 for the fp32 subtraction);
    - dh = dz W: the dz error through |W|, an fp32 sum of length V, and two roundings to
      ``dtype`` (each rank's partial and, at TP > 1, their all-reduced sum);
    - dW = dz^T h: the dz error through |h|, an fp32 sum over N tokens, and two roundings
      (each chunk's partial before the fp32 accumulation, and the final cast).
    """
    u = _unit_roundoff(dtype)
    h, w, g = hidden.double().reshape(-1, HIDDEN), weight.double(), grad.double().reshape(-1)
    logits, dlogits = reference["_logits"], reference["_dlogits"]
    n_tokens, vocab = logits.shape
    dz = (u * logits.abs() + HIDDEN * U32 * (h.abs() @ w.abs().T)).amax(dim=1)  # [N]
    loss = 2 * dz + (vocab + 8) * U32 * (1 + logits.abs().amax(dim=1))
    probs = torch.softmax(logits, dim=1)
    d_dlogits = g.abs()[:, None] * probs * torch.expm1(loss)[:, None]
    d_dlogits += (u + U32) * dlogits.abs()
    dh = d_dlogits @ w.abs() + (vocab * U32 + 2 * u) * (dlogits.abs() @ w.abs())
    dw = d_dlogits.T @ h.abs() + (n_tokens * U32 + 2 * u) * (dlogits.abs().T @ h.abs())
    return {"losses": loss.view(SEQ, BATCH), "dh": dh.view(SEQ, BATCH, HIDDEN), "dW": dw}


def _run_head(chunk_tokens, hidden, weight, labels, grad, group, megatron=False):
    """Losses, dh and this rank's dW of the chunked head (``chunk_tokens``) or, with ``None``,
    of the unchunked one: the logits in the activation dtype, then the vocab-parallel
    cross-entropy over ``group`` on their fp32 copy (what ``LlamaModel.head`` does without
    chunking); ``megatron``: megatron-core's own, over its global TP group, instead."""
    rank, tp = dist.get_rank(group), dist.get_world_size(group)
    local = torch.nn.Parameter(weight.chunk(tp, dim=0)[rank].clone())  # [V/t, h]
    h = hidden.clone().requires_grad_()
    # Identity forward, all-reduce backward: each rank's dh covers only its vocabulary shard.
    h_in = copy_to_tensor_parallel_region(h, group)
    if chunk_tokens is None:
        logits = torch.matmul(h_in, local.t())  # [s, b, V/t]
        if megatron:
            losses = megatron_layers.vocab_parallel_cross_entropy(logits.float(), labels)
        else:
            losses = vocab_parallel_cross_entropy(logits.float(), labels, group)
    else:
        losses = vocab_parallel_linear_cross_entropy(h_in, local, labels, group, chunk_tokens)
    losses.backward(grad)
    return {"losses": losses.detach(), "dh": h.grad, "dW": local.grad}


def _head_cases(rank, world_size):
    """Every (dtype, chunk) case and the unchunked head on this rank; ``rank`` and the TP
    group are the vocabulary shard's. The unchunked head also with megatron-core's function
    (``"megatron"``) and over a TP group of our own (``"own_group"``)."""
    if not state.is_initialized():
        state.initialize_model_parallel(world_size)
    group = state.get_tp_group()
    own_group = dist.new_group(list(range(world_size)))
    results = {}
    for name, dtype in DTYPES.items():
        inputs = _head_inputs(dtype)
        for chunk in (None, *CHUNKS):
            results[name, chunk] = _run_head(chunk, *inputs, group)
        results[name, "megatron"] = _run_head(None, *inputs, group, megatron=True)
        results[name, "own_group"] = _run_head(None, *inputs, own_group)
    return results


def _check_equals_megatron(results):
    """Megatron's steps in megatron's order over the same ranks: the same bits."""
    for rank, per_rank in enumerate(results):
        for name in DTYPES:
            ours = per_rank[name, None]
            for other in ("megatron", "own_group"):
                for key, value in per_rank[name, other].items():
                    assert torch.equal(ours[key], value), (name, other, rank, key)


def _check_against_float64(results, tp):
    for name, dtype in DTYPES.items():
        hidden, weight, labels, grad = _head_inputs(dtype)
        reference = _reference(hidden, weight, labels, grad)
        bounds = _error_bounds(hidden, weight, grad, reference, dtype)
        for rank, per_rank in enumerate(results):
            for chunk in (None, *CHUNKS):
                got = per_rank[name, chunk]
                expected = dict(reference, dW=reference["dW"].chunk(tp, dim=0)[rank])
                bound = dict(bounds, dW=bounds["dW"].chunk(tp, dim=0)[rank])
                for key in ("losses", "dh", "dW"):
                    assert got[key].dtype == (torch.float32 if key == "losses" else dtype)
                    error = (got[key].double() - expected[key]).abs()
                    assert (error <= bound[key]).all(), (
                        f"{name} chunk={chunk} rank={rank} {key}: max error "
                        f"{error.max():.3g}, worst error/bound {(error / bound[key]).max():.3g}"
                    )


def test_chunked_head_matches_float64_at_tp1(single_rank):
    """Chunked and unchunked heads, fp32 and bf16, each within the derived float64 bound."""
    results = [_head_cases(0, 1)]
    _check_against_float64(results, tp=1)
    _check_equals_megatron(results)


@pytest.mark.distributed
def test_chunked_head_matches_float64_at_tp2(tmp_path):
    """The vocabulary split over 2 gloo ranks: each rank's dW rows and the all-reduced dh."""
    results = run_distributed(_head_cases, 2, tmp_path)
    _check_against_float64(results, tp=2)
    _check_equals_megatron(results)


# ----------------------------------------------------------------------------- the whole model

SMALL = get_model_config("tiny", seq_length=32)
MODEL_CASES = {"untied": SMALL, "tied": SMALL.replace(tie_embeddings=True)}
MODEL_CHUNK = 24  # does not divide the 64 tokens of the batch below
MODEL_BATCH = 2


def _model_batch(config):
    generator = torch.Generator().manual_seed(7)
    tokens = torch.randint(
        0, config.vocab_size, (MODEL_BATCH, config.seq_length + 1), generator=generator
    )
    mask = (torch.rand(MODEL_BATCH, config.seq_length, generator=generator) > 0.3).float()
    # Own storages: the memory model counts the token ids as a [b, s] tensor.
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous(), mask


def _model_runs(rank, world_size, sequence_parallel):
    """Per case and chunk setting: per-token losses, the full (gathered) gradients after the
    masked mean loss, and the saved bytes of the forward by kind; per case the initial full
    weights (the same with and without chunking: one seed)."""
    if not state.is_initialized():
        state.initialize_model_parallel(world_size)
    out = {}
    for case, config in MODEL_CASES.items():
        tokens, labels, mask = _model_batch(config)
        for chunk in (None, MODEL_CHUNK):
            model = build_llama(
                config, init_seed=0, sequence_parallel=sequence_parallel, loss_chunk_tokens=chunk
            )
            losses = model(tokens, labels, mask)
            (losses.sum() / mask.sum()).backward()
            out[case, chunk] = {
                "losses": losses.detach(),
                "grads": gather_full(model, {name: p.grad for name, p in model.named_parameters()}),
                "saved": measure_model_forward(model, tokens, labels, mask),
            }
            out[case] = full_state_dict(model)
    return out


def _float64_model_grads(full, config):
    """float64 gradients of the masked mean loss of _model_runs w.r.t. the logical weights."""
    tokens, labels, mask = _model_batch(config)
    leaves = {name: w.double().requires_grad_() for name, w in full.items()}
    logits = reference_logits(leaves, config, tokens)
    losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
    ((losses * mask).sum() / mask.sum()).backward()
    return {name: leaf.grad for name, leaf in leaves.items()}


def _check_model_runs(results, tp, sequence_parallel):
    n_tokens = MODEL_BATCH * SMALL.seq_length
    exact = {
        case: _float64_model_grads(results[0][case], config) for case, config in MODEL_CASES.items()
    }
    for tp_rank, per_rank in enumerate(results):
        for case in MODEL_CASES:
            plain, chunked = per_rank[case, None], per_rank[case, MODEL_CHUNK]
            # Both heads compute the same fp32 log-sum-exp in a different order: each within
            # (V + 8) U32 (1 + max|z|) of the exact value (see _error_bounds), |z| << 1 at init.
            torch.testing.assert_close(
                chunked["losses"], plain["losses"], rtol=0, atol=2 * (SMALL.vocab_size + 8) * U32
            )
            # The heads' dh and dW differ by fp32 rounding, which the two blocks below carry
            # into every gradient: both against float64, the chunked head's as accurate as
            # the unchunked one's (tests/helpers/tolerances.py).
            what = (case, f"tp_rank={tp_rank}")
            assert_as_accurate_as(
                chunked["grads"], plain["grads"], exact[case], torch.float32, what
            )
            # Saved bytes: the model equals the memory model to the byte, per kind.
            setting = ActivationSetting(
                MODEL_BATCH,
                SMALL.seq_length,
                tensor_parallel=tp,
                sequence_parallel=sequence_parallel,
                tp_rank=tp_rank,
            )
            for chunk, measured in ((None, plain["saved"]), (MODEL_CHUNK, chunked["saved"])):
                predicted = predict_saved_activations(
                    SMALL, CompressionConfig(), replace(setting, loss_chunk_tokens=chunk)
                )
                assert {k: v for k, v in predicted.by_kind.items() if v} == measured.by_kind
                assert predicted.total == measured.total
            # Only the head changes: N (4 V/t + 9) bytes of softmax, target mask and targets
            # give way to N 12 of log-sum-exp and labels.
            saved_less = plain["saved"].total - chunked["saved"].total
            assert saved_less == n_tokens * (4 * SMALL.vocab_size // tp + 9) - n_tokens * 12


def test_model_chunked_loss_matches_unchunked_at_tp1(single_rank):
    _check_model_runs([_model_runs(0, 1, False)], tp=1, sequence_parallel=False)


@pytest.mark.distributed
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2_sp"])
def test_model_chunked_loss_matches_unchunked_at_tp2(tmp_path, sequence_parallel):
    results = run_distributed(_model_runs, 2, tmp_path, sequence_parallel, timeout=300)
    _check_model_runs(results, tp=2, sequence_parallel=sequence_parallel)


def test_model_rejects_bad_chunk_size(single_rank):
    for bad in (0, -8, 2.5, True, "1024"):
        with pytest.raises(ValueError, match="loss_chunk_tokens"):
            LlamaModel(SMALL, loss_chunk_tokens=bad)


ZERO3_STEPS, ZERO3_LR = 3, 0.5


def _zero3_runs(rank, world_size):
    """ZERO3_STEPS SGD steps under DeepSpeed ZeRO-3 (DP = 2, parameters partitioned over the
    ranks, the same batch on both) with and without the chunked loss: per-step losses, the
    full gradients (``safe_get_full_grad`` gathers ZeRO-3's partitions) and DeepSpeed's global
    gradient norms; per case the initial full weights. SGD keeps the two runs' difference at
    rounding level (Adam's first step is ~lr sign(g), which would turn rounding in near-zero
    gradient entries into lr-sized differences). Rank 0 returns them."""
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    from actcomp_dist.parallel.deepspeed_mpu import MegatronMPU

    state.initialize_model_parallel(1)
    ds_config = {
        "train_micro_batch_size_per_gpu": MODEL_BATCH,
        "zero_optimization": {"stage": 3},
        "zero_allow_untested_optimizer": True,  # torch's SGD
    }
    out = {}
    for case, config in MODEL_CASES.items():
        tokens, labels, mask = _model_batch(config)
        for chunk in (None, MODEL_CHUNK):
            model = build_llama(config, init_seed=0, loss_chunk_tokens=chunk)
            out[case] = full_state_dict(model)  # the same with and without chunking: one seed
            engine, _, _, _ = deepspeed.initialize(
                model=model,
                optimizer=torch.optim.SGD(model.parameters(), lr=ZERO3_LR),
                config=ds_config,
                mpu=MegatronMPU(),
            )
            run = {"losses": [], "grads": [], "norms": []}
            for _ in range(ZERO3_STEPS):
                loss = engine.module.loss(tokens, labels, mask)
                engine.backward(loss)
                grads = {  # collective: every rank, in the same order
                    name: safe_get_full_grad(param).detach().clone()
                    for name, param in engine.module.named_parameters()
                }
                run["grads"].append(gather_full(engine.module, grads))
                engine.step()
                run["losses"].append(loss.item())
                run["norms"].append(float(engine.get_global_grad_norm()))
            out[case, chunk] = run
    return out if rank == 0 else None


def _float64_sgd(init, config):
    """ZERO3_STEPS SGD steps of _zero3_runs in float64 from the same initial weights:
    per-step losses, gradients and their norms."""
    tokens, labels, mask = _model_batch(config)
    weights = {name: w.double() for name, w in init.items()}
    run = {"losses": [], "grads": [], "norms": []}
    for _ in range(ZERO3_STEPS):
        leaves = {name: w.clone().requires_grad_() for name, w in weights.items()}
        logits = reference_logits(leaves, config, tokens)
        losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
        loss = (losses * mask).sum() / mask.sum()
        loss.backward()
        grads = {name: leaf.grad for name, leaf in leaves.items()}
        run["losses"].append(loss.item())
        run["grads"].append(grads)
        run["norms"].append(torch.stack([g.square().sum() for g in grads.values()]).sum().sqrt())
        weights = {name: w - ZERO3_LR * grads[name] for name, w in weights.items()}
    return run


def _flat(tensors: dict) -> dict[str, torch.Tensor]:
    return {"all": torch.cat([t.flatten().double() for t in tensors.values()])}


@pytest.mark.distributed
def test_chunked_loss_under_deepspeed_zero3(tmp_path):
    """ZeRO-3 partitions the output weight (empty outside a forward): the chunked loss runs in
    the output layer's forward, where the weight (and, tied, the embedding's) is gathered, and
    its backward recomputes the logits after ZeRO-3 has gathered it again. Both runs against
    the same steps in float64: losses within the log-sum-exp bound of each other, the full
    gradients as accurate as the unchunked run's, DeepSpeed's gradient norms within the bound
    their gradients' error and an fp32 sum of squares allow."""
    result = run_distributed(_zero3_runs, 2, tmp_path, timeout=300)[0]
    u32 = UNIT_ROUNDOFF[torch.float32]
    for case, config in MODEL_CASES.items():
        plain, chunked = result[case, None], result[case, MODEL_CHUNK]
        exact = _float64_sgd(result[case], config)
        assert plain["losses"][-1] < plain["losses"][0], case  # the steps do train
        # As in _check_model_runs: the log-sum-exps within 2 (V + 8) U32 of each other.
        torch.testing.assert_close(
            torch.tensor(chunked["losses"]),
            torch.tensor(plain["losses"]),
            rtol=0,
            atol=2 * (SMALL.vocab_size + 8) * U32,
        )
        for step in range(ZERO3_STEPS):
            expected = exact["grads"][step]
            # From step 1 on each run continues from its own rounded weights: the gradient as
            # one vector (tests/distributed/test_llama_model.py test_tp2_matches_tp1 does so).
            pick = (lambda d: d) if step == 0 else _flat
            assert_as_accurate_as(
                pick(chunked["grads"][step]),
                pick(plain["grads"][step]),
                pick(expected),
                torch.float32,
                (case, step),
            )
            # | ||g|| - ||g64|| | <= ||g - g64|| (triangle inequality); DeepSpeed's fp32 sum
            # of count squares and square root add (gamma_(count+1) / 2 + u) ||g||, the float64
            # norm gamma_count(f64) ||g64||.
            exact_norm = exact["norms"][step].item()
            count = sum(g.numel() for g in expected.values())
            for name, run in (("plain", plain), ("chunked", chunked)):
                grads = run["grads"][step]
                change = torch.stack(
                    [(g.double() - expected[n]).square().sum() for n, g in grads.items()]
                )
                own = torch.stack([g.double().square().sum() for g in grads.values()]).sum()
                bound = (
                    change.sum().sqrt().item()
                    + (gamma(count + 1, torch.float32) / 2 + u32) * own.sqrt().item()
                    + gamma(count, torch.float64) * exact_norm
                )
                norm = run["norms"][step]
                assert abs(norm - exact_norm) <= bound, (case, name, step, norm, exact_norm)


# ----------------------------------------------------------------------------- memory


@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("chunk", CHUNKS)
def test_chunked_head_saves_input_lse_and_labels_only(single_rank, dtype, chunk):
    """Exactly h [N, h] in the activation dtype, an fp32 log-sum-exp and an int64 label per
    token, whatever the chunk size; the labels are copied even when they are a view of a larger
    tensor (as the trainer's shifted batch is), so the count does not depend on the caller."""
    hidden, weight, labels, _ = _head_inputs(dtype)
    h = hidden.requires_grad_()
    local = torch.nn.Parameter(weight)
    batch = torch.cat((labels, labels[:1]))  # [s + 1, b]: labels are rows 0..s-1 of it
    group = state.get_tp_group()
    saved = saved_activation_bytes(
        lambda: vocab_parallel_linear_cross_entropy(h, local, batch[:-1], group, chunk).sum()
    )
    n_tokens = SEQ * BATCH
    assert saved == n_tokens * HIDDEN * dtype.itemsize + n_tokens * 4 + n_tokens * 8
    # The unchunked head: h, megatron's fp32 softmax [N, V], target mask and masked targets.
    unchunked = saved_activation_bytes(
        lambda: vocab_parallel_cross_entropy(
            torch.matmul(h, local.t()).float(), batch[:-1].contiguous(), group
        ).sum()
    )
    assert unchunked == n_tokens * HIDDEN * dtype.itemsize + n_tokens * (4 * VOCAB + 1 + 8)


@pytest.mark.parametrize("efficient_ops", [False, True], ids=["naive", "efficient"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_tiny_model_head_bytes(single_rank, dtype, efficient_ops):
    """The tiny config at its own shape (b = 4, s = 128, V = 2048): the memory model's head
    terms, measured, equal the closed forms; the loss's 4.0 MiB become 6 KiB. (The efficient
    block's output layer keeps nothing of its own: its input is the final norm's output,
    which the norm keeps.)"""
    config, b = get_model_config("tiny"), 4
    n_tokens, e = b * config.seq_length, dtype.itemsize
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (b, config.seq_length), generator=generator)
    labels = torch.randint(0, config.vocab_size, (b, config.seq_length), generator=generator)
    mask = torch.ones(b, config.seq_length)
    measured = {}
    for chunk in (None, 1024):
        model = build_llama(
            config, init_seed=0, loss_chunk_tokens=chunk, efficient_ops=efficient_ops
        )
        for param in model.parameters():  # DeepSpeed's bf16 engine casts parameters only
            param.data = param.data.to(dtype)
        measured[chunk] = measure_model_forward(model, tokens, labels, mask).by_kind
        setting = ActivationSetting(
            b,
            config.seq_length,
            dtype_bytes=e,
            efficient_ops=efficient_ops,
            loss_chunk_tokens=chunk,
        )
        predicted = predict_saved_activations(config, CompressionConfig(), setting)
        assert {k: v for k, v in predicted.by_kind.items() if v} == measured[chunk]
    mask_bytes = n_tokens * 4 + 4  # the loss mask and its sum, the same on both paths
    plain, chunked = measured[None], measured[1024]
    own_input = 0 if efficient_ops else n_tokens * config.hidden_size * e
    assert plain.get("output_layer", 0) == own_input
    assert plain["loss"] - mask_bytes == n_tokens * (4 * config.vocab_size + 9) == 4_198_912
    assert chunked["output_layer"] == own_input + n_tokens * 12
    assert chunked["loss"] == mask_bytes
    assert n_tokens * 12 == 6144


def test_autocast_does_not_change_the_chunked_head(single_rank):
    """Backward recomputes the logits, so forward and backward both run in the inputs' dtype:
    under ``torch.autocast(bfloat16)`` the result is bit for bit the fp32 one."""
    hidden, weight, labels, grad = _head_inputs(torch.float32)
    group = state.get_tp_group()
    plain = _run_head(8, hidden, weight, labels, grad, group)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = _run_head(8, hidden, weight, labels, grad, group)
    for key, value in plain.items():
        assert torch.equal(autocast[key], value), key


# ----------------------------------------------------------------------------- errors


def test_function_rejects_mismatched_inputs(single_rank):
    hidden, weight, labels, _ = _head_inputs(torch.float32)
    group = state.get_tp_group()
    cases = [
        ((hidden, weight, labels, group, 0), ValueError, "chunk_tokens=0"),
        ((hidden, weight.bfloat16(), labels, group, 8), TypeError, "one dtype"),
        ((hidden, weight[:, :-1], labels, group, 8), ValueError, "expected \\[V/t, 32\\]"),
        ((hidden, weight, labels[:-1], group, 8), ValueError, "leading shape"),
        ((hidden.transpose(0, 1), weight, labels.t(), group, 8), ValueError, "contiguous"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            vocab_parallel_linear_cross_entropy(*args)
