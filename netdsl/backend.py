"""Backends: NumPy (the embedded default) and CuPy; the ONLY module that imports cupy."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import NetdslError

GPU_HINT = ('pip install "netdsl[gpu]" installs cupy-cuda12x; for CUDA 13 use `pip install cupy-cuda13x`, '
            "for CUDA 11 `pip install cupy-cuda11x` (match `nvidia-smi`'s CUDA version)")


@dataclass(frozen=True)
class Backend:
    name: str
    xp: object

    def sync(self) -> None:
        if self.name == "gpu":
            self.xp.cuda.Device().synchronize()


CPU = Backend("cpu", np)


def get_backend(device: str) -> Backend:
    if device == "cpu":
        return CPU
    if device != "gpu":
        raise NetdslError("E0801", f"unknown device '{device}'", help="use --device cpu or --device gpu")
    try:
        import cupy
    except ImportError:
        raise NetdslError("E0802", "--device gpu needs CuPy, which is not installed", help=GPU_HINT) from None
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("no device")
    except Exception as e:  # CUDA driver missing or no device: cupy raises its own runtime errors
        raise NetdslError("E0803", f"--device gpu: no usable CUDA device ({e})",
                          help="run on a machine with an NVIDIA GPU and driver, or use --device cpu") from None
    return Backend("gpu", cupy)
