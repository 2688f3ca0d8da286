"""The fused CPU int8 kernels (actcomp_dist/csrc/int8_pack.cpp) against the PyTorch-ops path
of :class:`actcomp_dist.storage.Int8Absmax`: the same codes, scales and dequantised values bit
for bit (the kernel's arithmetic is the ops path's, step by step; see the source's header), on
inputs that reach every branch: group widths 32 and 64 (the unrolled ones) and others, groups
whose absmax spans 2^-130 (below the 2^-100 floor) to 2^100, all-zero and signed-zero groups,
ties of the rounding, non-contiguous inputs. Then what happens without the kernel: ``off``, and
a build that fails, both in a fresh process (the kernel is built once per process)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from actcomp_dist.cpu_kernels import ENV_VAR, int8_ops
from actcomp_dist.storage import Int8Absmax, int8_group

DTYPES = (torch.float32, torch.bfloat16)


def _kernels():
    kernels = int8_ops()
    assert kernels is not None, (
        "the CPU int8 kernel did not build (see the warning above); it needs a C++ compiler, "
        "as DeepSpeed's JIT ops do"
    )
    return kernels


def _spread(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Normal values, each row of the last dimension scaled by 2^e with e in [-130, 100], a
    zero row, a row of signed zeros and a row of exact multiples of 1/2 (rounding ties)."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=generator)
    exponents = torch.randint(-130, 101, (*shape[:-1], 1), generator=generator)
    x = (x * torch.pow(2.0, exponents.double())).float()
    rows = x.view(-1, shape[-1])
    rows[0] = 0.0
    rows[1] = -0.0
    rows[2] = torch.arange(shape[-1]) * 0.5 - shape[-1] / 4
    return x


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("last_dim", [32, 64, 128, 100, 5000])
def test_kernel_pack_and_unpack_equal_the_torch_ops_bit_for_bit(dtype, last_dim):
    kernels = _kernels()
    x = _spread((3, 16, last_dim), seed=last_dim).to(dtype)
    width = int8_group(last_dim)
    codes, scales = kernels.int8_pack(x, width)
    expected_codes, expected_scales = Int8Absmax.pack_with_torch_ops(x, width)
    assert codes.dtype == torch.int8 and codes.shape == expected_codes.shape
    assert torch.equal(codes, expected_codes)
    assert torch.equal(scales, expected_scales)
    for out_dtype in DTYPES:
        like = torch.empty(x.shape, dtype=out_dtype, device="meta")
        restored = kernels.int8_unpack(codes, scales, out_dtype).reshape(x.shape)
        expected = Int8Absmax.unpack_with_torch_ops((codes, scales), like)
        assert restored.dtype == out_dtype
        # Bits, so that NaN-free signed zeros count too.
        view = torch.int32 if out_dtype == torch.float32 else torch.int16
        assert torch.equal(restored.view(view), expected.view(view))


@pytest.mark.parametrize("dtype", DTYPES)
def test_storage_packs_through_the_kernel_and_leaves_the_input(dtype):
    """``Int8Absmax`` on CPU takes the kernel path; a non-contiguous input packs as its
    contiguous copy and is left as it was."""
    _kernels()
    x = _spread((6, 4, 128), seed=3).to(dtype).transpose(0, 1)
    before = x.clone()
    quantizer = Int8Absmax()
    codes, scales = quantizer.pack(x)
    expected_codes, expected_scales = Int8Absmax.pack_with_torch_ops(x.contiguous(), 64)
    assert torch.equal(codes, expected_codes) and torch.equal(scales, expected_scales)
    assert torch.equal(x, before)
    restored = quantizer.unpack((codes, scales), x)
    assert restored.shape == x.shape and restored.dtype == dtype
    like = torch.empty(x.shape, dtype=dtype, device="meta")
    assert torch.equal(restored, Int8Absmax.unpack_with_torch_ops((codes, scales), like))


def test_kernel_refuses_what_it_does_not_serve():
    kernels = _kernels()
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        kernels.int8_pack(torch.ones(4, 64, dtype=torch.float64), 64)
    with pytest.raises(RuntimeError, match="does not divide"):
        kernels.int8_pack(torch.ones(4, 60), 64)
    with pytest.raises(RuntimeError, match="a float32 or bfloat16 result"):
        kernels.int8_unpack(torch.zeros(4, 64, dtype=torch.int8), torch.ones(4, 1), torch.float16)


def test_kernels_trace_without_data():
    """Under ``FakeTensorMode`` (what ``torch.compile`` traces with) the ops give the shapes and
    dtypes of the real results."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    kernels = _kernels()
    real = torch.randn(6, 2, 96).bfloat16()
    real_codes, real_scales = kernels.int8_pack(real, 32)
    with FakeTensorMode() as mode:
        fake = mode.from_tensor(real)
        codes, scales = kernels.int8_pack(fake, 32)
        restored = kernels.int8_unpack(codes, scales, torch.bfloat16)
    assert (codes.shape, codes.dtype) == (real_codes.shape, real_codes.dtype)
    assert (scales.shape, scales.dtype) == (real_scales.shape, real_scales.dtype)
    assert restored.shape == real_codes.shape and restored.dtype == torch.bfloat16


_PROBE = textwrap.dedent(
    """
    import warnings
    import torch
    from actcomp_dist.cpu_kernels import int8_ops
    from actcomp_dist.storage import Int8Absmax
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        kernels = int8_ops()
    x = torch.linspace(-3, 5, 4 * 64).reshape(4, 64).bfloat16()
    codes, scales = Int8Absmax().pack(x)
    same = torch.equal(codes, Int8Absmax.pack_with_torch_ops(x, 64)[0])
    print("kernels", kernels is not None, "same", same)
    for warning in caught:
        print("warning", warning.message)
    """
)


def _probe(tmp_path, **env) -> str:
    environment = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path / "extensions"), **env}
    done = subprocess.run(
        [sys.executable, "-c", _PROBE],
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_off_skips_the_build_and_keeps_the_values(tmp_path):
    out = _probe(tmp_path, **{ENV_VAR: "off"})
    assert "kernels False same True" in out
    assert "warning" not in out
    assert not (tmp_path / "extensions").exists()  # nothing built


def test_a_failed_build_warns_and_falls_back(tmp_path):
    """A compiler that fails (``/bin/false``): one warning naming the kernel and the switch,
    and the ops path packs the same values."""
    out = _probe(tmp_path, CXX="/bin/false", **{ENV_VAR: "auto"})
    assert "kernels False same True" in out
    assert "could not build the CPU int8 kernel int8_pack.cpp" in out
    assert f"Set {ENV_VAR}=off" in out


def test_a_stale_build_lock_is_removed_not_waited_for(tmp_path):
    """A lock file a killed process left in the build directory (older than STALE_LOCK_S):
    removed with a warning, then the kernel builds; torch alone would wait for it forever."""
    from torch.utils.cpp_extension import _get_build_directory

    from actcomp_dist.cpu_kernels import STALE_LOCK_S, _build_name

    extensions = tmp_path / "extensions"
    old_env = os.environ.get("TORCH_EXTENSIONS_DIR")
    os.environ["TORCH_EXTENSIONS_DIR"] = str(extensions)
    try:
        lock = Path(_get_build_directory(_build_name(), verbose=False)) / "lock"
    finally:
        if old_env is None:
            del os.environ["TORCH_EXTENSIONS_DIR"]
        else:
            os.environ["TORCH_EXTENSIONS_DIR"] = old_env
    lock.touch()
    stale = time.time() - STALE_LOCK_S - 60
    os.utime(lock, (stale, stale))
    out = _probe(tmp_path, **{ENV_VAR: "auto"})
    assert "kernels True same True" in out
    assert f"removing {lock}" in out


def test_a_bad_setting_is_refused(tmp_path):
    environment = {**os.environ, ENV_VAR: "yes"}
    done = subprocess.run(
        [sys.executable, "-c", "from actcomp_dist.cpu_kernels import int8_ops; int8_ops()"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0
    assert f"{ENV_VAR}='yes': expected 'auto'" in done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU kernel's switch is checked on CPU")
def test_a_bad_setting_is_a_config_error_at_start_up(monkeypatch):
    """The trainer's start-up check (before any collective, every rank) reads the switch when
    a kind is stored in int8, instead of the first pack inside the first forward."""
    from actcomp_dist.training.config import ConfigError, run_config_from_dict, validate_run

    monkeypatch.setenv(ENV_VAR, "yes")
    validate_run(run_config_from_dict({"memory": {"policy": {"swiglu": "fp8"}}}), 1)  # not read
    config = run_config_from_dict({"memory": {"policy": {"swiglu": "int8"}}})
    with pytest.raises(ConfigError, match=f"memory.policy uses int8 on a CPU: {ENV_VAR}='yes'"):
        validate_run(config, 1)
    monkeypatch.setenv(ENV_VAR, "off")
    validate_run(config, 1)
