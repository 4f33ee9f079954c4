"""GPU kernels, each described once: its CUDA template, the compile-time constants and extern "C"
signature codegen specialises it with, and its NumPy twin, which emulate.py runs as the CPU oracle.
Built-in kernels live in gpu/kernels/; a layer type may define its own beside its lowering
(Swish in layers/activation.py). Sources are self-contained (no #include) so that both NVRTC
(CuPy's RawModule) and nvcc compile them."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

F32 = np.float32
FLT_MIN = float(np.finfo(np.float32).tiny)

PRELUDE = r"""
// ----------------------------------------------------------------------------------------------
// netdsl GPU kernel library (netdsl/gpu/kernels/, and layers' own kernels). FP32 throughout; no
// cuDNN, no cuBLAS, so every kernel may run inside CUDA stream capture.
// ----------------------------------------------------------------------------------------------
typedef unsigned char nd_u8;
typedef long long nd_i64;
#define ND_FLT_MIN 1.17549435e-38f
#define ND_FLT_MAX 3.40282347e+38f
#define ND_FOR(e, n) for (int e = blockIdx.x * blockDim.x + threadIdx.x; e < (n); e += gridDim.x * blockDim.x)

// Sum over the block; every thread gets the total. blockDim.x must be a multiple of 32.
__device__ __forceinline__ float nd_block_sum(float v) {
    __shared__ float part[32];
    __shared__ float total;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();                       // earlier readers of `total` are done
    if (lane == 0) part[warp] = v;
    __syncthreads();
    if (warp == 0) {
        v = lane < (int)(blockDim.x >> 5) ? part[lane] : 0.f;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
        if (lane == 0) total = v;
    }
    __syncthreads();
    return total;
}
"""


@dataclass(frozen=True)
class Kernel:
    kind: str                     # the Launch kind
    signature: str                # the extern "C" parameters of a specialisation
    template: str                 # the CUDA template it calls (library kernels: their extern "C" symbol)
    constants: tuple[str, ...]    # compile-time constants, in template-argument order
    call: str                     # the runtime arguments handed to the template
    source: str                   # CUDA source of the template
    twin: Callable                # twin(params, *args): the same semantics on host arrays
    flags: tuple[str, ...] = ()   # the constants that are booleans
    library: bool = False         # an extern "C" kernel launched as is (no specialisation)
    specialise: Callable | None = None   # a custom specialisation (GEMM's tile struct)


KERNELS: dict[str, Kernel] = {}


def kernel(kind: str, signature: str, template: str, constants: tuple, call: str, *, source: str,
           flags: tuple = (), library: bool = False, specialise: Callable | None = None):
    """Decorator on a kernel's NumPy twin: register the kernel's description under `kind`."""
    def register(twin: Callable) -> Callable:
        assert kind not in KERNELS, f"kernel {kind} defined twice"
        KERNELS[kind] = Kernel(kind, signature, template, tuple(constants), call, source, twin, tuple(flags),
                               library, specialise)
        return twin
    return register


def elementwise(kind: str, forward: str, backward: str, twin_forward: Callable, twin_backward: Callable,
                params: str = "") -> tuple[str, str]:
    """Register a pair of element-wise kernels from one-line CUDA expressions: forward computes
    y from `xv`, backward the bottom gradient from `dyv`, `xv` and `yv`; `params` are extra float
    arguments (e.g. "beta"). The twins take (x[, params]) and (dy, x, y[, params]) arrays.
    Returns the two kinds, `<kind>_fwd` and `<kind>_bwd` (see _Lowering.elementwise)."""
    extra = "".join(f", float {p.strip()}" for p in params.split(",") if p.strip())
    names = "".join(f", {p.strip()}" for p in params.split(",") if p.strip())
    fwd, bwd = f"{kind}_fwd", f"{kind}_bwd"

    @kernel(fwd, f"const float* x, float* y{extra}", f"nd_{fwd}", ("CNT",), f"x, y{names}", source=f"""
template <int CNT>
__device__ __forceinline__ void nd_{fwd}(const float* __restrict__ x, float* __restrict__ y{extra}) {{
    ND_FOR(e, CNT) {{ const float xv = x[e]; y[e] = {forward}; }}
}}""")
    def _fwd(p, x, y, *scalars):
        n = p["CNT"]
        y[:n] = twin_forward(x[:n], *[F32(s) for s in scalars]).astype(F32)

    @kernel(bwd, f"const float* dy, const float* x, const float* y, float* dx{extra}", f"nd_{bwd}",
            ("CNT", "ACC"), f"dy, x, y, dx{names}", flags=("ACC",), source=f"""
template <int CNT, bool ACC>
__device__ __forceinline__ void nd_{bwd}(const float* __restrict__ dy, const float* __restrict__ x,
                                         const float* __restrict__ y, float* __restrict__ dx{extra}) {{
    ND_FOR(e, CNT) {{
        const float dyv = dy[e], xv = x[e], yv = y[e], g = {backward};
        dx[e] = ACC ? dx[e] + g : g;
    }}
}}""")
    def _bwd(p, dy, x, y, dx, *scalars):
        n = p["CNT"]
        g = twin_backward(dy[:n], x[:n], y[:n], *[F32(s) for s in scalars]).astype(F32)
        dx[:n] = dx[:n] + g if p["ACC"] else g

    return fwd, bwd


def kernels() -> dict[str, Kernel]:
    """Every kernel: the built-in ones and those the layer types define."""
    from .. import layers  # noqa: F401  (layer files register their own kernels)
    from . import kernels as _builtin  # noqa: F401
    return KERNELS


def symbol(launch) -> str:
    """The symbol to look up in the compiled module."""
    k = kernels()[launch.kind]
    return k.template if k.library else launch.symbol


def specialise(launch) -> str:
    """The extern "C" kernel for one launch (empty for library kernels)."""
    k = kernels()[launch.kind]
    if k.library:
        return ""
    if k.specialise is not None:
        return k.specialise(launch)
    p = launch.params
    targs = ", ".join(("true" if p[n] else "false") if n in k.flags else str(int(p[n])) for n in k.constants)
    return (f"// {launch.note}\n" f'extern "C" __global__ void {launch.symbol}({k.signature}) {{\n'
            f"    {k.template}<{targs}>({k.call});\n}}\n")
