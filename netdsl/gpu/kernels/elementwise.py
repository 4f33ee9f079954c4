"""Kernels: ReLU forward and backward, and zeroing a buffer."""
from __future__ import annotations

import numpy as np

from ..kernel import F32, kernel


@kernel("relu_fwd", "const float* x, float* y, float slope",
        "nd_relu_fwd", ("CNT",),
        "x, y, slope", source=r"""
template <int CNT>
__device__ __forceinline__ void nd_relu_fwd(const float* __restrict__ x, float* __restrict__ y, float slope) {
    ND_FOR(e, CNT) { const float v = x[e]; y[e] = v > 0.f ? v : v * slope; }
}
""")
def relu_fwd(p, x, y, slope):
    n = p["CNT"]
    v = x[:n]
    y[:n] = np.where(v > 0, v, v * F32(slope))


@kernel("relu_bwd", "const float* dy, const float* y, float* dx, float slope",
        "nd_relu_bwd", ("CNT", "ACC"),
        "dy, y, dx, slope",
        flags=("ACC",), source=r"""
// The mask comes from the output y: with slope >= 0, y > 0 exactly where x > 0.
template <int CNT, bool ACC>
__device__ __forceinline__ void nd_relu_bwd(const float* __restrict__ dy, const float* __restrict__ y,
                                            float* __restrict__ dx, float slope) {
    ND_FOR(e, CNT) { const float g = y[e] > 0.f ? dy[e] : dy[e] * slope; dx[e] = ACC ? dx[e] + g : g; }
}
""")
def relu_bwd(p, dy, y, dx, slope):
    n = p["CNT"]
    g = np.where(y[:n] > 0, dy[:n], dy[:n] * F32(slope))
    dx[:n] = dx[:n] + g if p["ACC"] else g


@kernel("zero", "float* p",
        "nd_zero", ("CNT",),
        "p", source=r"""
template <int CNT>
__device__ __forceinline__ void nd_zero(float* __restrict__ p) {
    ND_FOR(e, CNT) p[e] = 0.f;
}
""")
def zero(p, buf):
    buf[:p["CNT"]] = 0
