"""Fused CPU kernels for the 8-bit storages: the ``int8`` pack and unpack in one pass each.

Why: :class:`actcomp_dist.storage.Int8Absmax` written with PyTorch ops runs about ten ops per
pack (a float copy of a bf16 input, two reductions, the scale arithmetic, the multiply, the
rounding, the cast) and three per unpack. On a CPU each op costs a few microseconds of its own
and one pass over the tensor, so at small shapes the 8-bit storage costs more than the memory it
frees is worth: tiny model, bf16, 8-bit attention and SwiGLU, alternating training steps
(``tools/storage_cost.py``): 1.05-1.08x the step time of the exact block, of which 1.015x
remained when packing was made free. :file:`csrc/int8_pack.cpp` reads the tensor twice per pack
(the group's absmax, then the codes) and once per unpack, with the same values bit for bit
(its header gives the arithmetic; ``tests/unit/test_cpu_kernels.py`` checks it against the ops
path).

How it is built: :func:`torch.utils.cpp_extension.load` compiles the source on first use in a
process (about 10 s on 2 cores, once per machine: the library is cached under
``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``; ``make`` keeps it in the
venv, as DeepSpeed's JIT ops) with ``-O3 -march=native -ffp-contract=off``. The library's name
carries a digest of the CPU model, its feature flags and the source's path, so a cache shared
by unlike machines (a cluster's home directory) never loads a library built for another
instruction set, and two checkouts never rebuild each other's. Ranks that start together wait
on torch's file lock while one builds.

Where it is used: CPU tensors of float32 or bfloat16. CUDA, float16, float64 and the ``fp8``
storage keep the PyTorch ops. When the build fails (no compiler, a toolchain torch rejects) the
storage warns once per process and keeps the PyTorch ops: the same values, slower.
``ACTCOMP_CPU_KERNELS=off`` skips the build (the ops path, no compiler needed); ``auto`` (the
default) builds it.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import time
import warnings
from pathlib import Path
from typing import Any

import torch

#: The environment variable that turns the kernels off (``off``) or on (``auto``, default).
ENV_VAR = "ACTCOMP_CPU_KERNELS"
SOURCE = Path(__file__).parent / "csrc" / "int8_pack.cpp"
COMPILE_FLAGS = ("-O3", "-march=native", "-ffp-contract=off")
#: Age in seconds past which a build lock is taken for one a killed process left.
STALE_LOCK_S = 600.0
#: Dtypes the kernels take (a bf16 or fp32 tensor packs; unpack writes either).
DTYPES = (torch.float32, torch.bfloat16)


def _build_name() -> str:
    """The library's name: a digest of what ``-march=native`` depends on (the architecture,
    the CPU model and its feature flags: Linux's /proc/cpuinfo, elsewhere
    ``platform.processor()``) and of the source's path. torch rebuilds a library in place
    when the same name is loaded from another path, so two checkouts sharing a cache (a
    benchmark clone beside a working tree) would rebuild it for each other in turn, under
    processes that have it loaded."""
    parts = [platform.machine(), platform.processor(), *COMPILE_FLAGS, str(SOURCE.resolve())]
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as cpuinfo:
            for line in cpuinfo:
                key = line.split(":", 1)[0].strip()
                if key in ("model name", "flags", "Features", "CPU part", "CPU implementer"):
                    parts.append(line.strip())
                if not line.strip():  # the first processor's block is enough
                    break
    except OSError:
        pass
    digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]
    return f"actcomp_int8_pack_{digest}"


def setting() -> str:
    """``ACTCOMP_CPU_KERNELS``: ``auto`` (unset) or ``off``; another value raises ValueError
    (the trainer checks it at start-up, with the run config, when a kind is stored in int8)."""
    value = os.environ.get(ENV_VAR, "auto")
    if value not in ("auto", "off"):
        raise ValueError(f"{ENV_VAR}={value!r}: expected 'auto' (build the CPU kernels) or 'off'")
    return value


@functools.cache
def int8_ops() -> Any | None:
    """``torch.ops.actcomp_dist`` (``int8_pack``, ``int8_unpack``), built on the first call in a
    process; ``None`` when ``ACTCOMP_CPU_KERNELS=off`` or when the build fails (with a warning
    naming the error)."""
    if setting() == "off":
        return None
    from torch.utils.cpp_extension import load

    name = _build_name()
    _remove_stale_lock(name)
    try:
        load(
            name=name,
            sources=[str(SOURCE)],
            extra_cflags=list(COMPILE_FLAGS),
            is_python_module=False,
            verbose=False,
        )
    except Exception as error:  # any build or load failure: the ops path still works
        reason = str(error).strip().splitlines()[-1:] or [type(error).__name__]
        warnings.warn(
            f"actcomp_dist: could not build the CPU int8 kernel {SOURCE.name} ({reason[0]}); "
            f"the int8 storage uses PyTorch ops instead (same values, slower). "
            f"Set {ENV_VAR}=off to skip the build.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    _register_fake_kernels()
    return torch.ops.actcomp_dist


def _remove_stale_lock(name: str) -> None:
    """torch's build holds a lock file in the build directory, also while it loads a library
    already built, and a process that finds the file waits for it to go, without a limit. A
    process killed in that window (SIGKILL: no ``finally``) leaves the file, and every later
    run would hang at its first int8 pack. A build takes seconds; a lock older than
    :data:`STALE_LOCK_S` is removed, with a warning."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        lock = Path(_get_build_directory(name, verbose=False)) / "lock"
        age = time.time() - lock.stat().st_mtime
    except (ImportError, OSError):  # no lock (the usual case), or torch moved the helper
        return
    if age > STALE_LOCK_S:
        warnings.warn(
            f"actcomp_dist: removing {lock}, left {age:.0f} s ago by a build or load of the "
            f"CPU int8 kernel that did not finish (a killed process)",
            RuntimeWarning,
            stacklevel=3,
        )
        lock.unlink(missing_ok=True)


def _register_fake_kernels() -> None:
    """Shapes and dtypes of the ops' results for tensors without data (``FakeTensorMode``, as
    ``torch.compile`` traces), so that tracing a model that packs on CPU does not stop here."""

    @torch.library.register_fake("actcomp_dist::int8_pack")
    def _int8_pack(x: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        groups = x.numel() // width
        codes = x.new_empty((groups, width), dtype=torch.int8)
        return codes, x.new_empty((groups, 1), dtype=torch.float32)

    @torch.library.register_fake("actcomp_dist::int8_unpack")
    def _int8_unpack(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype):
        return codes.new_empty(codes.shape, dtype=dtype)


def int8_ops_for(x: torch.Tensor, dtype: torch.dtype | None = None) -> Any | None:
    """:func:`int8_ops` where they serve ``x`` (a CPU tensor; for packing of dtype
    :data:`DTYPES`, for unpacking into ``dtype`` among them), else ``None``."""
    if x.device.type != "cpu" or (dtype if dtype is not None else x.dtype) not in DTYPES:
        return None
    return int8_ops()
