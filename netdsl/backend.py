"""Backends: NumPy (the embedded default) and CuPy; the ONLY module that imports cupy."""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from .errors import NetdslError

GPU_HINT = ('pip install "netdsl[gpu]" (CuPy for CUDA 12: cupy-cuda12x); with a CUDA 13 driver use '
            "`pip install cupy-cuda13x` instead. Pick the wheel matching the CUDA version `nvidia-smi` shows; "
            "netdsl needs no cuDNN")


@dataclass(frozen=True)
class Backend:
    name: str
    xp: object

    def sync(self) -> None:
        if self.name == "gpu":
            self.xp.cuda.Device().synchronize()


CPU = Backend("cpu", np)
_GPU: Backend | None = None
_ALLOCATOR_TUNED = False


def tune_host_allocator() -> None:
    """Keep freed NumPy temporaries in the process (glibc malloc). By default glibc returns every
    freed block over 128 KiB to the OS, so each training step's temporaries come back as fresh
    pages: ~5,000 page faults per LeNet step and 1.5x slower steps (benchmarks/kernels_cpu.py).
    Raising the mmap threshold to 32 MiB and disabling trimming removes them; the cost is that
    the process keeps its peak heap instead of returning it."""
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return
    _ALLOCATOR_TUNED = True
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
        libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)
    except (OSError, AttributeError):      # not glibc (macOS, musl): nothing to tune
        pass


def release_free_heap() -> None:
    """Give the heap's free pages back to the OS once (glibc malloc_trim): after a net's data
    sources open, what decompressing them freed (MNIST's gunzip: ~50 MiB) would otherwise stay
    resident, since tune_host_allocator disables trimming."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):      # not glibc: its allocator decides
        pass


def to_host(a) -> np.ndarray:
    """A blob (pycaffe-style `.data`) or array, NumPy or CuPy, as a host NumPy array."""
    a = getattr(a, "data", a)
    return a.get() if hasattr(a, "get") else np.asarray(a)


def get_backend(device: str) -> Backend:
    if device == "cpu":
        return CPU
    if device != "gpu":
        raise NetdslError("E0801", f"unknown device '{device}'", help="use --device cpu or --device gpu")
    return _gpu()


def _gpu() -> Backend:
    global _GPU
    if _GPU is not None:
        return _GPU
    # FP32 means FP32: CuPy reads CUPY_TF32 once, at import (its default is already off).
    os.environ.setdefault("CUPY_TF32", "0")
    try:
        import cupy
    except ImportError:
        raise NetdslError("E0802", "--device gpu needs CuPy, which is not installed", help=GPU_HINT) from None
    except Exception as e:  # a CuPy wheel for the wrong CUDA fails at import with its own errors
        raise NetdslError("E0802", f"--device gpu: CuPy failed to load ({type(e).__name__}: {e})",
                          help=GPU_HINT) from None
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("no device")
    except Exception as e:  # CUDA driver missing or no device: cupy raises its own runtime errors
        raise NetdslError("E0803", f"--device gpu: no usable CUDA device ({e})",
                          help="run on a machine with an NVIDIA GPU and driver, or use --device cpu") from None
    _GPU = Backend("gpu", cupy)
    return _GPU


def cuda_available() -> bool:
    """True when `get_backend("gpu")` would succeed (the GPU tests skip otherwise)."""
    try:
        _gpu()
    except NetdslError:
        return False
    return True
