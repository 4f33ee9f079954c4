"""Kernels: im2col / col2im (columns [n][c*KH*KW][oh*OW]) and bias gradients."""
from __future__ import annotations

import numpy as np

from ..kernel import F32, kernel


def _geom(p):
    return [p[k] for k in ("N", "C", "H", "W", "KH", "KW", "SH", "SW", "PH", "PW", "DH", "DW", "OH", "OW")]


@kernel("im2col", "const float* x, float* col",
        "nd_im2col", ("N", "C", "H", "W", "KH", "KW", "SH", "SW", "PH", "PW", "DH", "DW", "OH", "OW"),
        "x, col", source=r"""
template <int N, int C, int H, int W, int KH, int KW, int SH, int SW, int PH, int PW, int DH, int DW, int OH, int OW>
__device__ __forceinline__ void nd_im2col(const float* __restrict__ x, float* __restrict__ col) {
    constexpr int P = OH * OW, K = C * KH * KW;
    ND_FOR(e, N * K * P) {
        const int p = e % P, t = e / P, k = t % K, n = t / K;
        const int ox = p % OW, oy = p / OW, kx = k % KW, ky = (k / KW) % KH, c = k / (KW * KH);
        const int iy = oy * SH - PH + ky * DH, ix = ox * SW - PW + kx * DW;
        col[e] = (iy >= 0 && iy < H && ix >= 0 && ix < W) ? x[((n * C + c) * H + iy) * W + ix] : 0.f;
    }
}
""")
def im2col(p, x, col):
    N, C, H, W, KH, KW, SH, SW, PH, PW, DH, DW, OH, OW = _geom(p)
    img = np.zeros((N, C, H + 2 * PH + DH * KH + SH * OH, W + 2 * PW + DW * KW + SW * OW), F32)
    img[:, :, PH:PH + H, PW:PW + W] = x[:N * C * H * W].reshape(N, C, H, W)
    out = col[:N * C * KH * KW * OH * OW].reshape(N, C, KH, KW, OH, OW)
    for ky in range(KH):
        for kx in range(KW):
            out[:, :, ky, kx] = img[:, :, ky * DH:ky * DH + SH * OH:SH, kx * DW:kx * DW + SW * OW:SW]


@kernel("col2im", "const float* col, float* dx",
        "nd_col2im", ("N", "C", "H", "W", "KH", "KW", "SH", "SW", "PH", "PW", "DH", "DW", "OH", "OW", "ACC"),
        "col, dx",
        flags=("ACC",), source=r"""
// Gather form of col2im: each image element sums the column entries that read it (no atomics).
template <int N, int C, int H, int W, int KH, int KW, int SH, int SW, int PH, int PW, int DH, int DW, int OH, int OW, bool ACC>
__device__ __forceinline__ void nd_col2im(const float* __restrict__ col, float* __restrict__ dx) {
    constexpr int P = OH * OW, K = C * KH * KW;
    ND_FOR(e, N * C * H * W) {
        const int ix = e % W, iy = (e / W) % H, c = (e / (W * H)) % C, n = e / (W * H * C);
        float s = 0.f;
        for (int ky = 0; ky < KH; ++ky) {
            const int yy = iy + PH - ky * DH;
            if (yy < 0 || yy % SH) continue;
            const int oy = yy / SH;
            if (oy >= OH) continue;
            for (int kx = 0; kx < KW; ++kx) {
                const int xx = ix + PW - kx * DW;
                if (xx < 0 || xx % SW) continue;
                const int ox = xx / SW;
                if (ox >= OW) continue;
                s += col[(n * K + (c * KH + ky) * KW + kx) * P + oy * OW + ox];
            }
        }
        dx[e] = ACC ? dx[e] + s : s;
    }
}
""")
def col2im(p, col, dx):
    N, C, H, W, KH, KW, SH, SW, PH, PW, DH, DW, OH, OW = _geom(p)
    img = np.zeros((N, C, H + 2 * PH + DH * KH + SH * OH, W + 2 * PW + DW * KW + SW * OW), F32)
    c = col[:N * C * KH * KW * OH * OW].reshape(N, C, KH, KW, OH, OW)
    for ky in range(KH):
        for kx in range(KW):
            img[:, :, ky * DH:ky * DH + SH * OH:SH, kx * DW:kx * DW + SW * OW:SW] += c[:, :, ky, kx]
    out = dx[:N * C * H * W].reshape(N, C, H, W)
    g = img[:, :, PH:PH + H, PW:PW + W]
    out[...] = out + g if p["ACC"] else g


@kernel("bias_grad", "const float* dy, float* db",
        "nd_bias_grad", ("N", "M", "P", "ACC"),
        "dy, db",
        flags=("ACC",), source=r"""
// db[m] (+)= sum over n, p of dy[n][m][p]: one block per m, a fixed order (no atomics). Used only
// when the bias gradient cannot ride in the weight-gradient GEMM (a frozen weight).
template <int N, int M, int P, bool ACC>
__device__ __forceinline__ void nd_bias_grad(const float* __restrict__ dy, float* __restrict__ db) {
    const int m = blockIdx.x;
    float acc = 0.f;
    for (int e = threadIdx.x; e < N * P; e += blockDim.x) {
        const int n = e / P, p = e % P;
        acc += dy[(n * M + m) * P + p];
    }
    acc = nd_block_sum(acc);
    if (threadIdx.x == 0) db[m] = ACC ? db[m] + acc : acc;
}
""")
def bias_grad(p, dy, db):
    N, M, P = p["N"], p["M"], p["P"]
    s = dy[:N * M * P].reshape(N, M, P).sum(axis=(0, 2), dtype=np.float64).astype(F32)
    db[:M] = db[:M] + s if p["ACC"] else s


@kernel("col_sum", "const float* dy, float* db",
        "nd_col_sum", ("N", "M", "ACC"),
        "dy, db",
        flags=("ACC",), source=r"""
// db[j] (+)= sum over n of dy[n][j] (an InnerProduct's bias): one thread per column, in order.
template <int N, int M, bool ACC>
__device__ __forceinline__ void nd_col_sum(const float* __restrict__ dy, float* __restrict__ db) {
    ND_FOR(j, M) {
        float s = 0.f;
        for (int n = 0; n < N; ++n) s += dy[n * M + j];
        db[j] = ACC ? db[j] + s : s;
    }
}
""")
def col_sum(p, dy, db):
    N, M = p["N"], p["M"]
    s = dy[:N * M].reshape(N, M).sum(axis=0, dtype=np.float64).astype(F32)
    db[:M] = db[:M] + s if p["ACC"] else s
