"""Thread policy of the CPU path: Numba's threads (the compiled kernels) and OpenBLAS's (the
GEMMs) take turns, never run at once, so both get the cores this process may use; `--threads N`
sets both. The count is applied to OpenBLAS through its C API (numpy's bundled scipy-openblas or a
system libopenblas), found among the libraries already loaded.

Numba runs on its `workqueue` threading layer unless NUMBA_THREADING_LAYER says otherwise: its
idle workers sleep, where the OpenMP layer's spin and take the cores from OpenBLAS between
kernels (measured on a busy 2-core machine: LeNet 2.8x slower per step with OpenMP's 2 threads than
with workqueue's 2; docs/benchmarks.md)."""
from __future__ import annotations

import ctypes
import os


def available_cores() -> int:
    """The cores this process may run on (its affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _openblas():
    """The loaded OpenBLAS's set_num_threads, or None."""
    import numpy  # noqa: F401  (loads its BLAS)
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower()}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for name in ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads", "openblas_set_num_threads64_",
                     "openblas_set_num_threads"):
            fn = getattr(lib, name, None)
            if fn is not None:
                fn.argtypes = [ctypes.c_int]
                return fn
    return None


def set_threads(threads: int | None, compiled: bool) -> tuple[int, int]:
    """Thread counts (BLAS, Numba): `threads` for both when given; else every available core for
    OpenBLAS, whose GEMMs are most of a step and scale, and half of them (at least one) for
    Numba, whose kernels are short at these sizes: on a busy 2-core machine one kernel thread
    beside two BLAS threads was the fastest mix (docs/benchmarks.md)."""
    cores = available_cores()
    blas_n = max(1, threads or cores)
    kernel_n = max(1, threads or cores // 2)
    blas = _openblas()
    if blas is not None:
        blas(blas_n)
    if compiled:
        import numba
        if "NUMBA_THREADING_LAYER" not in os.environ:
            numba.config.THREADING_LAYER = "workqueue"      # before the first parallel kernel starts the pool
        kernel_n = min(kernel_n, numba.config.NUMBA_NUM_THREADS)
        numba.set_num_threads(kernel_n)
    return blas_n, kernel_n
