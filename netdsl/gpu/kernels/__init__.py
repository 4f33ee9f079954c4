"""The built-in GPU kernels: importing this package registers them (see gpu/kernel.py)."""
from . import conv, data, elementwise, gemm, loss, pool, solver  # noqa: F401
