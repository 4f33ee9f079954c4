"""Thread policy of the CPU path: Numba's threads (the compiled kernels) and OpenBLAS's (the
GEMMs) take turns, never run at once, so both get the cores this process may use; `--threads N`
sets both. The count is applied to OpenBLAS through its C API (numpy's bundled scipy-openblas or a
system libopenblas), found among the libraries already loaded."""
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


def set_threads(threads: int | None, compiled: bool) -> int:
    """Use `threads` (default: every available core) for OpenBLAS and, when `compiled`, Numba.
    Returns the count used."""
    n = max(1, threads or available_cores())
    blas = _openblas()
    if blas is not None:
        blas(n)
    if compiled:
        import numba
        numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    return n
