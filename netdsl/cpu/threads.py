"""Thread policy of the CPU path: one pool of threads per process, as many as the cores it may
use, or `--threads N`.

With the compiled kernels that pool is Numba's, and it runs the GEMMs too (blas.py: each thread
calls a single-threaded OpenBLAS on its block of the result), so no second pool's idle workers
spin on the cores between kernels. Numba's OpenMP threading layer comes first where it loads (a
parallel region starts in ~2 us; its workers spin briefly when idle, which only our own kernels
could mind), its `workqueue` layer otherwise (~20 us), unless NUMBA_THREADING_LAYER says which.
With the NumPy kernels the pool is OpenBLAS's. OpenBLAS's count is set through its C API (NumPy's
bundled scipy-openblas or a system libopenblas), found among the libraries already loaded."""
from __future__ import annotations

import ctypes
import os


def available_cores() -> int:
    """The cores this process may run on (its affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def loaded_openblas() -> list[ctypes.CDLL]:
    """The OpenBLAS libraries this process has loaded (importing NumPy loads its own)."""
    import numpy  # noqa: F401
    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "openblas" in line.lower()}
    except OSError:
        return []
    libs = []
    for path in sorted(paths):
        try:
            libs.append(ctypes.CDLL(path))
        except OSError:
            continue
    return libs


SET_THREADS = ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads", "openblas_set_num_threads64_",
               "openblas_set_num_threads")
GET_THREADS = ("scipy_openblas_get_num_threads64_", "scipy_openblas_get_num_threads", "openblas_get_num_threads64_",
               "openblas_get_num_threads")


def _function(lib, names):
    """The first of `names` that `lib` exports, or None."""
    return next((getattr(lib, n) for n in names if hasattr(lib, n)), None)


def openblas_threads() -> int | None:
    """The first loaded OpenBLAS's thread count (None: no OpenBLAS)."""
    fn = next((f for f in (_function(lib, GET_THREADS) for lib in loaded_openblas()) if f is not None), None)
    return None if fn is None else int(fn())


def set_openblas_threads(n: int) -> bool:
    """Every loaded OpenBLAS's thread count set to n; False when none was found."""
    found = False
    for lib in loaded_openblas():
        fn = _function(lib, SET_THREADS)
        if fn is not None:
            fn.argtypes = [ctypes.c_int]
            fn(n)
            found = True
    return found


def set_threads(threads: int | None, compiled: bool) -> tuple[int, int]:
    """Thread counts (BLAS, Numba): with compiled kernels whose GEMMs run in Numba's pool (blas.py),
    1 for OpenBLAS and `threads` or every available core for Numba; otherwise that many for
    OpenBLAS (and for Numba, when compiled kernels must leave the GEMMs to OpenBLAS)."""
    n = max(1, threads or available_cores())
    if not compiled:
        set_openblas_threads(n)
        return n, 0
    import numba
    if "NUMBA_THREADING_LAYER" not in os.environ:   # before the first parallel kernel starts the pool
        numba.config.THREADING_LAYER_PRIORITY = ["omp", "workqueue", "tbb"]
    from .blas import NATIVE
    n = min(n, numba.config.NUMBA_NUM_THREADS)
    set_openblas_threads(1 if NATIVE else n)
    numba.set_num_threads(n)
    return (1 if NATIVE else n), n
