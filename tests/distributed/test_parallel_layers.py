"""TP invariance of the compressed Megatron layers (2 gloo ranks).

Each case builds the layer at TP=2 (with and without sequence parallelism) and the same layer
at TP=1 (on a one-rank group) from the same full weights, runs the same input and upstream
gradient through both, and compares output, input gradient and the rank's weight-gradient
shard. Both layouts compute the same sums in another order, so each element may differ by the
rounding bound of its reduction (tests/helpers/tolerances.py): ``2 gamma_k`` times the magnitude of its
terms, evaluated in float64 on absolute values through the TP=1 layer's own compression matrix
(a linear compressor applied to the identity gives it). ``none`` against Megatron's own layer
is exact.

The cases come from ``list_compressors()``: each method at r = n/4 (groups 8), its ``subspace``
mode where it supports one, and an absolute rank with the second value of each of its
choice-valued options. What a method can promise depends on where its basis comes from
(``basis_is_shared``):

- a seeded or frozen basis, the same on every rank (``compact``, ``subtoken``): the weight
  gradient is the same at every TP size for any input, up to the rounding bound above;
- a basis computed from each rank's own data (``lowrank``): a column-parallel layer without SP
  sees the same data on every rank, but a row-parallel shard factorises its own features and an
  SP rank its own tokens, so on a general input TP changes the approximation (bounded in
  ``test_lowrank_error_within_single_device_bound``). Its weight gradient agrees across TP
  sizes only when the input's rank is at most every shard's rank (each basis then spans the row
  space and the gradient is exact). Such methods get a rank-5 input here, and their weight
  gradient (not linear in x, so the identity trick gives no magnitude) is compared at TP=1 and
  TP=2 with the float64 exact ``g^T x`` (tolerance: ``_data_dependent_rtol``).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from actcomp_dist.compression import get_compressor_class, list_compressors
from actcomp_dist.subspace import is_subspace_parameter
from tests.helpers.distributed import run_distributed
from tests.helpers.tolerances import UNIT_ROUNDOFF, assert_within_rounding, gamma

SEQ, BATCH, IN, OUT = 8, 2, 64, 48


def _megatron_config(tp: int, sequence_parallel: bool):
    from megatron.core import ModelParallelConfig

    return ModelParallelConfig(
        tensor_model_parallel_size=tp,
        sequence_parallel=sequence_parallel,
        use_cpu_initialization=True,
        perform_initialization=True,
        params_dtype=torch.float32,
    )


def _init(weight):
    return torch.nn.init.normal_(weight, std=0.02)


def _build(kind, tp_group, tp, sequence_parallel, compression, megatron=False):
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from actcomp_dist.parallel import CompressedColumnParallelLinear, CompressedRowParallelLinear

    common = dict(
        config=_megatron_config(tp, sequence_parallel and tp > 1),
        init_method=_init,
        bias=True,
        tp_group=tp_group,
    )
    extra = {} if megatron else dict(compression=compression, layer_id=1, site=kind)
    if kind == "column":
        cls = ColumnParallelLinear if megatron else CompressedColumnParallelLinear
        return cls(IN, OUT, gather_output=False, **common, **extra)
    cls = RowParallelLinear if megatron else CompressedRowParallelLinear
    return cls(IN, OUT, input_is_parallel=True, skip_bias_add=False, **common, **extra)


def _load_full(layer, kind, full_w, full_b, rank, tp):
    with torch.no_grad():
        if kind == "column":
            layer.weight.copy_(full_w.chunk(tp, dim=0)[rank])
            layer.bias.copy_(full_b.chunk(tp, dim=0)[rank])
        else:
            layer.weight.copy_(full_w.chunk(tp, dim=1)[rank])
            layer.bias.copy_(full_b)


def _shard_inputs(kind, x, g, rank, tp, sequence_parallel):
    """The TP=2 layer's input and upstream gradient, cut from the full ones."""
    if kind == "column":
        x_local = x.chunk(tp, dim=0)[rank] if sequence_parallel else x
        g_local = g.chunk(tp, dim=-1)[rank]
    else:
        x_local = x.chunk(tp, dim=-1)[rank]
        g_local = g.chunk(tp, dim=0)[rank] if sequence_parallel else g
    return x_local.clone().requires_grad_(True), g_local


def _run(layer, x, g):
    out, _ = layer(x)
    out.backward(g)
    return out.detach(), x.grad


def _weight_grad(layer):
    w = layer.weight
    return w.subspace.grad if is_subspace_parameter(w) and w.subspace.grad is not None else w.grad


def _magnitudes(ref, x, g, subspace):
    """Element-wise magnitudes (float64, absolute values) of the TP=1 layer's output, input
    gradient, weight gradient and bias gradient: the scale of each one's rounding error."""
    w, b = ref.weight.detach().double().abs(), ref.bias.detach().double().abs()  # [m, n], [m]
    x2 = x.detach().double().abs().reshape(-1, IN)  # [N, n]
    g2 = g.double().abs().reshape(-1, OUT)  # [N, m]
    compressor = ref.compressor
    if not compressor.basis_is_shared:
        # Not linear in x, so no compression matrix: the float64 exact gradient (signed) instead,
        # which the test compares both layouts with (the method is exact on their input).
        dw = g.double().reshape(-1, OUT).t() @ x.detach().double().reshape(-1, IN)  # [m, n]
    elif compressor.is_identity:
        dw = g2.t() @ x2  # [m, n]
    else:
        # The compressors in this matrix are linear in x: compressing the identity gives the
        # compression matrix C [n, c], lifting the identity gives the lift matrix [c, n].
        packed = compressor.compress(torch.eye(IN, dtype=torch.float64))
        dw = g2.t() @ (x2 @ packed.tokens.abs())  # [m, c]
        if not subspace:
            width = packed.tokens.shape[1]
            lift = compressor.lift(
                torch.eye(width, dtype=torch.float64), packed.basis, packed.seeds
            )
            dw = dw @ lift.abs()  # [m, n]
    return {
        "out": (x2 @ w.t() + b).reshape(SEQ, BATCH, OUT),
        "dx": (g2 @ w).reshape(SEQ, BATCH, IN),
        "dw": dw,
        "db": g2.sum(0),
    }


def _data_dependent_rtol(x, compression, sequence_parallel) -> float:
    """Relative (Frobenius) tolerance of a data-dependent method's weight gradient against the
    float64 exact one, on an input of rank <= every shard's rank. Each layout reconstructs its
    data as ``L Q^T = X Q Q^T``: the rounding of the contractions over tokens, basis and width
    (``gamma_(N+k+n)``) plus the part of X's row space a float32 orthonormalisation of
    ``Y = X^T X[:, S]`` misses, ``u cond(Y)`` with ``cond(Y) <= cond(X)^2`` over the nonzero
    singular values of every piece a layout factorises (the whole input at TP=1, each
    feature shard of a row-parallel layer, each sequence shard under SP); twice that for the
    two sides. (Observed: about 3e-7.)

    "Nonzero" is measured against float32's own noise: the input is a float32 rounding (one
    or two roundings, the product and the offset) of an exactly low-rank matrix, so it is that
    matrix plus E with ``|E_ij| <= 2 u |x_ij|``; by Weyl's inequality the singular values the
    rounding adds are at most ``||E||_2 <= ||E||_F <= 2 u ||X||_F``, and those are cut."""
    u = UNIT_ROUNDOFF[torch.float32]
    x2 = x.double().reshape(-1, IN)  # [N, n]
    pieces = [x2, *x2.chunk(2, dim=1)]
    if sequence_parallel:
        pieces += list(x.double().chunk(2, dim=0))
    cond = 0.0
    for piece in pieces:
        piece = piece.reshape(-1, piece.shape[-1])
        singular = torch.linalg.svdvals(piece)
        nonzero = singular[singular > 2 * u * piece.norm()]
        cond = max(cond, (nonzero[0] / nonzero[-1]).item())
    k = compression.resolve_rank(IN)
    return 2 * (gamma(SEQ * BATCH + k + IN, torch.float32) + UNIT_ROUNDOFF[torch.float32] * cond**2)


def _tp_invariance_rank(rank, world, kind, sequence_parallel, cfg_dict):
    from actcomp_dist import CompressionConfig
    from actcomp_dist.parallel import state

    state.initialize_model_parallel(tensor_parallel_size=world)
    tp_group = state.get_tp_group()
    singles = [dist.new_group([r]) for r in range(world)]
    compression = CompressionConfig.from_dict(cfg_dict)

    torch.manual_seed(0)
    full_w = torch.randn(OUT, IN) * 0.1
    full_b = torch.randn(OUT) * 0.1
    data_dependent = not get_compressor_class(compression.method).basis_is_shared
    if data_dependent:  # rank 4, plus the offset 5: below every shard's rank (docstring)
        x = (torch.randn(SEQ * BATCH, 4) @ torch.randn(4, IN)).reshape(SEQ, BATCH, IN)
    else:
        x = torch.randn(SEQ, BATCH, IN)
    x = x + 0.5  # offset: a non-zero mean sub-token for subtoken
    g = torch.randn(SEQ, BATCH, OUT)

    ref = _build(kind, singles[rank], 1, False, compression)
    _load_full(ref, kind, full_w, full_b, 0, 1)
    ref_x = x.clone().requires_grad_(True)
    ref_out, ref_dx = _run(ref, ref_x, g)
    magnitude = _magnitudes(ref, x, g, compression.grad_mode == "subspace")

    layer = _build(kind, tp_group, world, sequence_parallel, compression)
    _load_full(layer, kind, full_w, full_b, rank, world)
    x_local, g_local = _shard_inputs(kind, x, g, rank, world, sequence_parallel)
    out, dx = _run(layer, x_local, g_local)

    # The dimension along which each TP=1 result is split over the ranks (None: replicated).
    if kind == "column":
        split = {"out": -1, "dx": 0 if sequence_parallel else None, "dw": 0, "db": 0}
    else:
        split = {"out": 0 if sequence_parallel else None, "dx": -1, "dw": 1, "db": None}
        if layer.compressor.layout.partial_sum and compression.grad_mode == "subspace":
            split["dw"] = None  # a dense row shard's G_hat [m, r] is the same on every rank

    def part(name, t):
        return t if split[name] is None else t.chunk(world, dim=split[name])[rank]

    gb = layer.bias.grad
    if kind == "row" and sequence_parallel:
        # Megatron leaves a sequence-parallel bias gradient partial: the trainer all-reduces it.
        dist.all_reduce(gb, group=tp_group)
    return {
        "dw_rtol": _data_dependent_rtol(x, compression, sequence_parallel) if data_dependent else 0,
        "out": (out, part("out", ref_out), part("out", magnitude["out"])),
        "dx": (dx, part("dx", ref_dx), part("dx", magnitude["dx"])),
        "dw": (_weight_grad(layer), part("dw", _weight_grad(ref)), part("dw", magnitude["dw"])),
        "db": (gb, part("db", ref.bias.grad), part("db", magnitude["db"])),
    }


def _method_cases() -> dict[str, dict]:
    """Every registered method at r = n/4 (groups 8), its ``subspace`` mode where supported,
    and an absolute rank with the second value of each of its choice-valued options."""
    cases = {}
    for name in list_compressors():
        cls = get_compressor_class(name)
        base = {"method": name, "rank": 0.25, "groups": 8, "seed": 7}
        cases[name] = base
        if cls.supports_subspace:
            cases[f"{name}_subspace"] = {**base, "grad_mode": "subspace"}
        if cls.choices:
            others = {option: values[1] for option, values in cls.choices.items()}
            cases["_".join([name, *others.values(), "int_rank"])] = {**base, **others, "rank": 16}
    return cases


METHODS = _method_cases()


@pytest.mark.distributed
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2sp"])
@pytest.mark.parametrize("kind", ["column", "row"])
@pytest.mark.parametrize("method", list(METHODS))
def test_tp2_matches_tp1(tmp_path, method, kind, sequence_parallel):
    results = run_distributed(
        _tp_invariance_rank, 2, tmp_path, kind, sequence_parallel, METHODS[method]
    )
    data_dependent = not get_compressor_class(METHODS[method]["method"]).basis_is_shared
    # Every reduction in these layers is bounded by this length: the input width (output),
    # the output width (input gradient), the tokens plus the compressed and input widths
    # (compress, contract over tokens, lift), the bias.
    length = IN + OUT + SEQ * BATCH + IN + 1
    for rank, checks in enumerate(results):
        rtol = checks.pop("dw_rtol")
        for name, (got, expected, magnitude) in checks.items():
            if name == "dw" and data_dependent:
                for layout, value in (("tp2", got), ("tp1", expected)):
                    error = ((value.double() - magnitude).norm() / magnitude.norm()).item()
                    assert error < rtol, (rank, layout, error, rtol)
                continue
            assert_within_rounding(got, expected, magnitude, length, msg=f"rank {rank} {name}")


def _megatron_equal_rank(rank, world, kind):
    from actcomp_dist import CompressionConfig
    from actcomp_dist.parallel import state

    state.initialize_model_parallel(tensor_parallel_size=world)
    tp_group = state.get_tp_group()
    torch.manual_seed(0)
    ours = _build(kind, tp_group, world, False, CompressionConfig(method="none"))
    torch.manual_seed(0)
    theirs = _build(kind, tp_group, world, False, None, megatron=True)
    torch.manual_seed(1)
    in_width = IN if kind == "column" else IN // world
    out_width = OUT // world if kind == "column" else OUT
    x = torch.randn(SEQ, BATCH, in_width)
    g = torch.randn(SEQ, BATCH, out_width)
    results = []
    for layer in (ours, theirs):
        xi = x.clone().requires_grad_(True)
        out, dx = _run(layer, xi, g)
        results.append((out, dx, layer.weight.grad, layer.bias.grad, layer.weight.detach()))
    return results


@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["column", "row"])
def test_none_equals_megatron_exactly(tmp_path, kind):
    for ours, theirs in run_distributed(_megatron_equal_rank, 2, tmp_path, kind):
        for a, b in zip(ours, theirs, strict=True):
            assert torch.equal(a, b)


def _lowrank_rank(rank, world, kind, low_rank_input):
    from actcomp_dist import CompressionConfig
    from actcomp_dist.parallel import state

    state.initialize_model_parallel(tensor_parallel_size=world)
    tp_group = state.get_tp_group()
    singles = [dist.new_group([r]) for r in range(world)]
    compression = CompressionConfig(method="lowrank", rank=0.5, seed=3)
    torch.manual_seed(0)
    full_w = torch.randn(OUT, IN) * 0.1
    full_b = torch.zeros(OUT)
    if low_rank_input:
        x = (torch.randn(SEQ * BATCH, 4) @ torch.randn(4, IN)).reshape(SEQ, BATCH, IN)
    else:
        x = torch.randn(SEQ, BATCH, IN)
    g = torch.randn(SEQ, BATCH, OUT)
    exact = torch.einsum("sbm,sbn->mn", g.double(), x.double())  # of the float32 inputs
    errors = {}
    for tp, group in ((1, singles[rank]), (world, tp_group)):
        layer = _build(kind, group, tp, False, compression)
        r = rank if tp > 1 else 0
        _load_full(layer, kind, full_w, full_b, r, tp)
        x_local, g_local = _shard_inputs(kind, x, g, r, tp, False)
        _run(layer, x_local, g_local)
        exp = exact.chunk(tp, dim=0 if kind == "column" else 1)[r]
        errors[tp] = ((layer.weight.grad.double() - exp).norm() / exp.norm()).item()
    return errors, _data_dependent_rtol(x, compression, sequence_parallel=False)


@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["column", "row"])
def test_lowrank_exact_on_low_rank_input_at_every_tp(tmp_path, kind):
    # A rank-4 input: every layout's basis spans its row space, so the only error is float32
    # rounding, against the float64 g^T x within _data_dependent_rtol's derived bound.
    for errors, rtol in run_distributed(_lowrank_rank, 2, tmp_path, kind, True):
        assert errors[1] <= rtol and errors[2] <= rtol, (errors, rtol)


@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["column", "row"])
def test_lowrank_error_within_single_device_bound(tmp_path, kind):
    # Bound: the error of the best rank-k approximation of X's row space (k = n/2) — the
    # sampled basis cannot beat it, and on a Gaussian input it is far from 1.
    torch.manual_seed(0)
    for errors, _ in run_distributed(_lowrank_rank, 2, tmp_path, kind, False):
        assert 0 < errors[1] < 1.0 and 0 < errors[2] < 1.0, errors


def _comm_rank(rank, world, method):
    from actcomp_dist import CompressionConfig
    from actcomp_dist.parallel import state

    state.initialize_model_parallel(tensor_parallel_size=world)
    layer = _build(
        "column", state.get_tp_group(), world, True, CompressionConfig(method=method, rank=0.25)
    )
    x = torch.randn(SEQ // world, BATCH, IN, requires_grad=True)
    out, _ = layer(x)
    out.sum().backward()
    return layer.comm["forward"].nbytes["all_gather"], layer.comm["backward"].nbytes["all_gather"]


@pytest.mark.distributed
def test_sequence_parallel_all_gather_bytes_shrink_by_r_over_n(tmp_path):
    (fwd_none, bwd_none), _ = run_distributed(_comm_rank, 2, tmp_path, "none")
    (fwd_compact, bwd_compact), _ = run_distributed(_comm_rank, 2, tmp_path, "compact")
    itemsize = 4
    assert fwd_none == fwd_compact == SEQ // 2 * BATCH * IN * itemsize
    assert bwd_none == SEQ // 2 * BATCH * IN * itemsize
    assert bwd_compact * IN == bwd_none * (IN // 4)


def test_frozen_weight_saves_no_input(single_rank):
    """Adapters on a frozen base: the base layer's backward needs only W for dX."""
    from actcomp_dist import CompressionConfig
    from actcomp_dist.memory import saved_activation_bytes
    from actcomp_dist.parallel import state

    torch.manual_seed(0)
    layer = _build("column", state.get_tp_group(), 1, False, CompressionConfig(method="compact"))
    x = torch.randn(SEQ, BATCH, IN, requires_grad=True)
    g = torch.randn(SEQ, BATCH, OUT)
    _, dx_trained = _run(layer, x, g)
    layer.weight.requires_grad_(False)
    x.grad = None
    assert saved_activation_bytes(lambda: layer(x)) == 0
    _, dx_frozen = _run(layer, x, g)
    assert torch.equal(dx_frozen, dx_trained)


@pytest.mark.parametrize("grad_mode", ["lift", "subspace"])
@pytest.mark.parametrize("projection", ["gaussian", "sparse"])
def test_row_parallel_dense_tp1_equals_compressed_linear_exactly(
    single_rank, grad_mode, projection
):
    """At TP=1 the dense row-parallel layer is the single-device ``CompressedLinear``: the
    same P (same seed, layer and site), the same GEMMs, so every result is bit-identical.
    Without a bias: ``CompressedLinear`` adds it inside its GEMM, Megatron's row-parallel
    layer after the output reduction (an equally exact but differently rounded sum)."""
    from actcomp_dist import CompressedLinear, CompressionConfig
    from actcomp_dist.parallel import CompressedRowParallelLinear, state

    compression = CompressionConfig(
        method="compact", rank=0.25, seed=7, grad_mode=grad_mode, projection=projection
    )
    assert compression.row_parallel_projection == "dense"  # the default
    torch.manual_seed(0)
    row = CompressedRowParallelLinear(
        IN,
        OUT,
        config=_megatron_config(1, False),
        init_method=_init,
        bias=False,
        input_is_parallel=True,
        skip_bias_add=False,
        tp_group=state.get_tp_group(),
        compression=compression,
        layer_id=1,
        site="fc2",
    )
    single = CompressedLinear(IN, OUT, bias=False, compression=compression, layer_id=1, site="fc2")
    with torch.no_grad():
        single.weight.copy_(row.weight)
    x = torch.randn(SEQ, BATCH, IN)
    g = torch.randn(SEQ, BATCH, OUT)
    results = []
    for layer in (row, single):
        xi = x.clone().requires_grad_(True)
        out = layer(xi)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(g)
        results.append((out.detach(), xi.grad, _weight_grad(layer)))
    assert torch.equal(
        row.compressor.projection(row.compressor.current_seeds(), x.device, x.dtype),
        single.compressor.projection(single.compressor.current_seeds(), x.device, x.dtype),
    )
    for name, a, b in zip(("out", "dx", "dw"), *results, strict=True):
        assert torch.equal(a, b), name


def _row_comm_rank(rank, world, sequence_parallel, projection):
    from actcomp_dist import CompressionConfig
    from actcomp_dist.layers import compression_disabled
    from actcomp_dist.parallel import state

    state.initialize_model_parallel(tensor_parallel_size=world)
    compression = CompressionConfig(method="compact", rank=0.25, row_parallel_projection=projection)
    layer = _build("row", state.get_tp_group(), world, sequence_parallel, compression)
    x = torch.randn(SEQ, BATCH, IN // world, requires_grad=True)
    out, _ = layer(x)
    out.sum().backward()
    comm = {phase: (dict(c.nbytes), dict(c.calls)) for phase, c in layer.comm.items()}
    # Switched off (the trainer's uncompressed measurement), the layer reduces its output
    # alone, also on the recompute path of an ``input_fn`` (FC2's SwiGLU; here a negation,
    # exact): each element is the same two-term sum, so the output is bit-identical.
    with compression_disabled(layer):
        for input_fn in (None, torch.neg):
            plain, _ = layer(x, input_fn=input_fn)
            assert torch.equal(plain, out if input_fn is None else -out)
    return comm


@pytest.mark.distributed
@pytest.mark.parametrize("projection", ["dense", "block"])
@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2sp"])
def test_row_parallel_communication_per_phase(tmp_path, sequence_parallel, projection):
    """``dense``: ``Z`` [N, r] travels in the collective that sums the output [N, m], one call
    each way, (m + r)/m of Megatron's bytes. ``block``: Megatron's collectives alone. Forward
    collectives count in ``comm["forward"]``, their backward adjoints in ``comm["backward"]``."""
    tokens, rank_r, itemsize = SEQ * BATCH, IN // 4, 4
    width = (OUT + (rank_r if projection == "dense" else 0)) * itemsize
    zero = dict.fromkeys(("all_gather", "reduce_scatter", "all_reduce"), 0)
    if sequence_parallel:
        forward = {**zero, "reduce_scatter": tokens * width}
        backward = {**zero, "all_gather": tokens // 2 * width}
    else:
        forward, backward = {**zero, "all_reduce": tokens * width}, zero
    for comm in run_distributed(_row_comm_rank, 2, tmp_path, sequence_parallel, projection):
        assert comm["forward"] == (forward, {k: int(v > 0) for k, v in forward.items()})
        assert comm["backward"] == (backward, {k: int(v > 0) for k, v in backward.items()})
