"""The compiled ops' GEMMs: the loaded OpenBLAS's Fortran sgemm/dgemm called from Numba, each
thread of Numba's pool computing one block of the result while OpenBLAS itself stays
single-threaded. One pool then runs every kernel of a step, GEMMs and element-wise passes alike:
no idle OpenBLAS workers spin on the cores the element-wise kernels need, so those run on every
core too (docs/benchmarks.md). Without an OpenBLAS to call (NumPy built on another BLAS), `gemm`
is NumPy's matmul.

The BLAS's functions are registered with LLVM under fixed names, so kernels cached on disk link to
them again in the next process."""
from __future__ import annotations

import ctypes

import numpy as np

from .threads import GET_THREADS, loaded_openblas

# the Fortran GEMMs' symbols and integer width: NumPy's ILP64 scipy-openblas, an ILP64 system
# OpenBLAS, SciPy's LP64 scipy-openblas, a plain OpenBLAS
_SYMBOLS = (("scipy_{}gemm_64_", np.int64), ("{}gemm_64_", np.int64), ("scipy_{}gemm_", np.int32),
            ("{}gemm_", np.int32))


def _register():
    """The Fortran interface's integer dtype once sgemm, dgemm and OpenBLAS's thread count are
    registered with LLVM as netdsl_sgemm, netdsl_dgemm and netdsl_blas_threads; None without an
    OpenBLAS that has them."""
    import llvmlite.binding as llvm
    for lib in loaded_openblas():
        threads = next((n for n in GET_THREADS if hasattr(lib, n)), None)   # the symbol's name, for LLVM
        for pattern, width in _SYMBOLS:
            theirs = pattern.format("s"), pattern.format("d")
            if threads and all(hasattr(lib, name) for name in theirs):
                for ours, name in zip(("netdsl_sgemm", "netdsl_dgemm", "netdsl_blas_threads"), theirs + (threads,)):
                    llvm.add_symbol(ours, ctypes.cast(getattr(lib, name), ctypes.c_void_p).value)
                return width
    return None


INT = _register()
NATIVE = INT is not None
_INTS = np.zeros(1, INT or np.int64)        # the kernels' template for the interface's integers

from numba import get_num_threads, njit, prange, types  # noqa: E402

_SIG = types.void(*[types.uintp] * 13)      # every Fortran argument is a pointer
_sgemm = types.ExternalFunction("netdsl_sgemm", _SIG)
_dgemm = types.ExternalFunction("netdsl_dgemm", _SIG)
_blas_threads = types.ExternalFunction("netdsl_blas_threads", types.intc())
_MIN_SPLIT = 1 << 18                        # flops below which a GEMM stays on one thread


@njit(inline="always")
def _call(A, a_off, ta, B, b_off, tb, C, c_off, m, n, k, beta, ints):
    """C's block at c_off (m x n, row-major, C's row length) = op(A) op(B) + beta*C, the operands'
    blocks at a_off and b_off (elements). Fortran is column-major, so it computes the transpose:
    C^T = op(B)^T op(A)^T, each stored row-major matrix read as its column-major transpose."""
    d = np.empty(6, ints.dtype)
    d[0], d[1], d[2], d[3], d[4], d[5] = n, m, k, B.shape[-1], A.shape[-1], C.shape[-1]
    t = np.empty(2, np.uint8)
    t[0] = 84 if tb else 78                 # 'T' or 'N'
    t[1] = 84 if ta else 78
    s = np.empty(2, C.dtype)
    s[0], s[1] = 1, beta
    w, p = C.itemsize, d.itemsize
    at, dp, sp = t.ctypes.data, d.ctypes.data, s.ctypes.data
    pa, pb, pc = A.ctypes.data + a_off * w, B.ctypes.data + b_off * w, C.ctypes.data + c_off * w
    if w == 4:
        _sgemm(at, at + 1, dp, dp + p, dp + 2 * p, sp, pb, dp + 3 * p, pa, dp + 4 * p, sp + w, pc, dp + 5 * p)
    else:
        _dgemm(at, at + 1, dp, dp + p, dp + 2 * p, sp, pb, dp + 3 * p, pa, dp + 4 * p, sp + w, pc, dp + 5 * p)
    return d[0] + t[0] + s[0]               # the scratch stays alive until the call returns


@njit(cache=True, parallel=True)
def _gemm2(A, ta, B, tb, C, beta, ints, threads):
    """C (m, n) = op(A) op(B) + beta*C in a block per thread, along C's longer side. In one call
    when OpenBLAS has threads of its own (someone set them: two pools would nest) or the GEMM is
    small."""
    m, n = C.shape
    k = A.shape[0] if ta else A.shape[1]
    parts = threads if _blas_threads() == 1 and 2.0 * m * n * k >= _MIN_SPLIT else 1
    rows = m >= n
    size = m if rows else n
    step = ((size + parts - 1) // parts + 15) // 16 * 16
    for q in prange(parts):
        lo = q * step
        hi = min(size, lo + step)
        if hi > lo:
            if rows:
                _call(A, lo if ta else lo * A.shape[1], ta, B, 0, tb, C, lo * n, hi - lo, n, k, beta, ints)
            else:
                _call(A, 0, ta, B, lo * B.shape[1] if tb else lo, tb, C, lo, m, hi - lo, k, beta, ints)


@njit(cache=True, parallel=True)
def _gemm3(A, ta, B, tb, C, beta, ints, threads):
    """A batch: C[i] = op(A[i]) op(B[i]) + beta*C[i], the images shared out among the threads (all
    in one thread when OpenBLAS has threads of its own); an operand with a batch of 1 is shared."""
    N, m, n = C.shape
    k = A.shape[1] if ta else A.shape[2]
    sa = 0 if A.shape[0] == 1 else A.shape[1] * A.shape[2]
    sb = 0 if B.shape[0] == 1 else B.shape[1] * B.shape[2]
    parts = threads if _blas_threads() == 1 else 1
    step = (N + parts - 1) // parts
    for q in prange(parts):
        for i in range(q * step, min(N, q * step + step)):
            _call(A, i * sa, ta, B, i * sb, tb, C, i * m * n, m, n, k, beta, ints)


def gemm(a, b, out, ta: bool = False, tb: bool = False, beta: float = 0.0):
    """out = op(a) @ op(b) + beta*out, op transposing where ta/tb says; a, b and out C-contiguous,
    2-D, or a batch (3-D, where an operand with a batch of 1 is shared by every image)."""
    if not (a.flags.c_contiguous and b.flags.c_contiguous and out.flags.c_contiguous):
        raise ValueError("gemm needs C-contiguous operands")
    if not NATIVE:
        x = np.swapaxes(a, -1, -2) if ta else a
        y = np.swapaxes(b, -1, -2) if tb else b
        if beta:
            out *= beta
            out += np.matmul(x, y)
        else:
            np.matmul(x, y, out=out)
        return out
    threads = get_num_threads()
    if out.ndim == 2:
        _gemm2(a, ta, b, tb, out, beta, _INTS, threads)
    elif out.shape[0] >= threads:
        _gemm3(a if a.ndim == 3 else a[None], ta, b if b.ndim == 3 else b[None], tb, out, beta, _INTS, threads)
    else:                                   # fewer images than threads: split each image's GEMM
        for i in range(out.shape[0]):
            _gemm2(_image(a, i), ta, _image(b, i), tb, out[i], beta, _INTS, threads)
    return out


def _image(a, i):
    """Image i's operand: a[i] of a batch; a 2-D operand, or a batch of 1, is every image's."""
    return a[i] if a.ndim == 3 and a.shape[0] > 1 else a.reshape(a.shape[-2:])
