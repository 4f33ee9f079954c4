"""Kernels: gather a batch from a GPU-resident uint8 dataset (the MNIST data layer)."""
from __future__ import annotations

from ..kernel import F32, kernel


@kernel("gather", "const nd_u8* images, const nd_u8* labels, const int* seq, const int* counter, "
                  "float mean, float scale, float* x, float* y",
        "nd_gather", ("N", "D", "WIN", "MEAN", "SCALE"),
        "images, labels, seq, counter, mean, scale, x, y",
        flags=("MEAN", "SCALE"), source=r"""
// The batch's image indices are row (counter % WIN) of seq; the host fills rows ahead of replay.
template <int N, int D, int WIN, bool MEAN, bool SCALE>
__device__ __forceinline__ void nd_gather(const nd_u8* __restrict__ images, const nd_u8* __restrict__ labels,
                                          const int* __restrict__ seq, const int* __restrict__ counter,
                                          float mean, float scale, float* __restrict__ x, float* __restrict__ y) {
    const int* idx = seq + (counter[0] % WIN) * N;
    ND_FOR(e, N * D) {
        const int b = e / D, p = e - b * D;
        float v = (float)images[(nd_i64)idx[b] * D + p];
        if (MEAN) v = v - mean;             // Caffe's DataTransformer: subtract, then scale
        if (SCALE) v = v * scale;
        x[e] = v;
    }
    if (y != nullptr) {
        ND_FOR(b, N) y[b] = (float)labels[idx[b]];
    }
}
""")
def gather(p, images, labels, seq, counter, mean, scale, x, y):
    n, d = p["N"], p["D"]
    idx = seq[(int(counter[0]) % p["WIN"]) * n:][:n]
    v = images.reshape(-1, d)[idx].astype(F32)
    if p["MEAN"]:
        v = v - F32(mean)
    if p["SCALE"]:
        v = v * F32(scale)
    x[:n * d] = v.reshape(-1)
    if y is not None:
        y[:n] = labels[idx].astype(F32)
