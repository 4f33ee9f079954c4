"""Kernel: GEMM, C[b] = op(A[b]) op(B[b]) (+C) (+bias) (activation), FP32 SIMT with deterministic
split-K; its specialisation bakes every size, stride and the tiling into a struct."""
from __future__ import annotations

import math

import numpy as np

from ..kernel import F32, kernel

CONSTANTS = ("TA", "TB", "M", "N", "K", "R", "LDA", "LDB", "LDC", "SA", "SB", "SC", "RA", "RB",
             "BETA", "BIAS", "ACT", "BM", "BN", "BK", "SPLITS", "KCHUNK")


def specialise(launch) -> str:
    p, sym = launch.params, launch.symbol
    consts = ", ".join(f"{k} = {int(p[k])}" for k in CONSTANTS)
    return (f"// {launch.note}\n" f"struct {sym}_g {{ static constexpr int {consts}; }};\n"
            f'extern "C" __global__ void __launch_bounds__(256) {sym}(const float* A, const float* B, float* C, '
            f"float* bias, const float* aux, float* ws, unsigned* sems, float slope) {{\n"
            f"    nd_gemm<{sym}_g>(A, B, C, bias, aux, ws, sems, slope);\n}}\n")


def _view(buf, offset: int, shape, strides):
    """A bounds-checked strided view of a flat array (strides in elements)."""
    last = offset + sum((n - 1) * s for n, s in zip(shape, strides))
    assert 0 <= offset and last < len(buf), f"strided access [{offset}, {last}] outside {len(buf)} elements"
    return np.lib.stride_tricks.as_strided(buf[offset:], shape, [s * buf.itemsize for s in strides])


# ------------------------------------------------------------------------------------- kernels


@kernel("gemm", "", "nd_gemm", CONSTANTS, "", specialise=specialise, source=r"""
// op(A) is M x KT and op(B) KT x N, where the reduction KT = R*K runs over R "reduction batches"
// (e.g. images, for a weight gradient) of K each: element (i, r*K+k) of op(A) is
// A[r*RA + (TA ? k*LDA + i : i*LDA + k)]. blockIdx.z = batch * SPLITS + split: a split-K
// GEMM writes partial tiles to ws and the last block of each tile (a ticket in sems, which it
// resets) sums them in a fixed order, so the result is deterministic. The next k-tile is fetched
// into registers while the current one is multiplied from shared memory.
// BIAS: 0 none, 1 per row (bias[i]), 2 per column (bias[j]), 3 bias gradient: op(B) gets a column
//       of ones (j == N) whose result, the row sums of op(A), goes to bias[i] (BETA applies).
// ACT: 0 none, 1 ReLU (negative slope), 2 ReLU backward mask (aux > 0, aux laid out as C).
template <class G>
__device__ __forceinline__ void nd_gemm_fetch(const float* __restrict__ A, const float* __restrict__ B,
                                              int i0, int j0, int k0, int kend,
                                              float (&ra)[G::BM * G::BK / 256], float (&rb)[G::BK * G::BN / 256]) {
    constexpr int BM = G::BM, BN = G::BN, BK = G::BK;
#pragma unroll
    for (int q = 0; q < BM * BK / 256; ++q) {
        const int e = threadIdx.x + q * 256;
        const int i = G::TA ? e % BM : e / BK;            // threads run along A's contiguous axis
        const int k = G::TA ? e / BM : e % BK;
        const int gi = i0 + i, gk = k0 + k;
        float v = 0.f;
        if (gi < G::M && gk < kend) {
            const int r = gk / G::K, kk = gk - r * G::K;
            v = A[(nd_i64)r * G::RA + (G::TA ? (nd_i64)kk * G::LDA + gi : (nd_i64)gi * G::LDA + kk)];
        }
        ra[q] = v;
    }
#pragma unroll
    for (int q = 0; q < BK * BN / 256; ++q) {
        const int e = threadIdx.x + q * 256;
        const int j = G::TB ? e / BK : e % BN;
        const int k = G::TB ? e % BK : e / BN;
        const int gj = j0 + j, gk = k0 + k;
        float v = 0.f;
        if (gj < G::N && gk < kend) {
            const int r = gk / G::K, kk = gk - r * G::K;
            v = B[(nd_i64)r * G::RB + (G::TB ? (nd_i64)gj * G::LDB + kk : (nd_i64)kk * G::LDB + gj)];
        } else if (G::BIAS == 3 && gj == G::N && gk < kend) {
            v = 1.f;
        }
        rb[q] = v;
    }
}

template <class G>
__device__ __forceinline__ void nd_gemm(const float* __restrict__ A, const float* __restrict__ B, float* C,
                                        float* bias, const float* __restrict__ aux,
                                        float* __restrict__ ws, unsigned* __restrict__ sems, float slope) {
    constexpr int BM = G::BM, BN = G::BN, BK = G::BK, TM = BM / 16, TN = BN / 16;
    constexpr int KT = G::R * G::K;
    constexpr int NE = G::BIAS == 3 ? G::N + 1 : G::N;   // columns, with the ones column
    __shared__ float As[BK][BM + 1];
    __shared__ float Bs[BK][BN + 1];
    __shared__ unsigned s_last;
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    const int j0 = blockIdx.x * BN, i0 = blockIdx.y * BM;
    const int b = blockIdx.z / G::SPLITS, s = blockIdx.z % G::SPLITS;
    A += (nd_i64)b * G::SA;
    B += (nd_i64)b * G::SB;
    C += (nd_i64)b * G::SC;
    const int kbeg = s * G::KCHUNK;
    const int kend = kbeg + G::KCHUNK < KT ? kbeg + G::KCHUNK : KT;
    float acc[TM][TN];
#pragma unroll
    for (int m = 0; m < TM; ++m)
#pragma unroll
        for (int n = 0; n < TN; ++n) acc[m][n] = 0.f;

    float ra[BM * BK / 256], rb[BK * BN / 256];
    nd_gemm_fetch<G>(A, B, i0, j0, kbeg, kend, ra, rb);
    for (int k0 = kbeg; k0 < kend; k0 += BK) {
#pragma unroll
        for (int q = 0; q < BM * BK / 256; ++q) {
            const int e = tid + q * 256;
            As[G::TA ? e / BM : e % BK][G::TA ? e % BM : e / BK] = ra[q];
        }
#pragma unroll
        for (int q = 0; q < BK * BN / 256; ++q) {
            const int e = tid + q * 256;
            Bs[G::TB ? e % BK : e / BN][G::TB ? e / BK : e % BN] = rb[q];
        }
        __syncthreads();
        if (k0 + BK < kend) nd_gemm_fetch<G>(A, B, i0, j0, k0 + BK, kend, ra, rb);   // in flight meanwhile
#pragma unroll
        for (int k = 0; k < BK; ++k) {
            float a[TM], bb[TN];
#pragma unroll
            for (int m = 0; m < TM; ++m) a[m] = As[k][ty + 16 * m];
#pragma unroll
            for (int n = 0; n < TN; ++n) bb[n] = Bs[k][tx + 16 * n];
#pragma unroll
            for (int m = 0; m < TM; ++m)
#pragma unroll
                for (int n = 0; n < TN; ++n) acc[m][n] = fmaf(a[m], bb[n], acc[m][n]);
        }
        __syncthreads();
    }

    if (G::SPLITS > 1) {
        const int tiles = gridDim.x * gridDim.y, tile = blockIdx.y * gridDim.x + blockIdx.x;
        float* part = ws + (nd_i64)(b * tiles + tile) * G::SPLITS * (BM * BN);
#pragma unroll
        for (int m = 0; m < TM; ++m)
#pragma unroll
            for (int n = 0; n < TN; ++n) part[s * (BM * BN) + (ty + 16 * m) * BN + tx + 16 * n] = acc[m][n];
        __threadfence();
        __syncthreads();
        if (tid == 0) s_last = atomicAdd(sems + b * tiles + tile, 1u) == (unsigned)(G::SPLITS - 1);
        __syncthreads();
        if (!s_last) return;
        __threadfence();
#pragma unroll
        for (int m = 0; m < TM; ++m)
#pragma unroll
            for (int n = 0; n < TN; ++n) {
                const float* p = part + (ty + 16 * m) * BN + tx + 16 * n;
                float v = 0.f;
#pragma unroll 8
                for (int q = 0; q < G::SPLITS; ++q) v += __ldcg(p + q * (BM * BN));
                acc[m][n] = v;
            }
        if (tid == 0) sems[b * tiles + tile] = 0u;      // ready for the next launch (and replay)
    }

#pragma unroll
    for (int m = 0; m < TM; ++m) {
        const int gi = i0 + ty + 16 * m;
        if (gi >= G::M) continue;
#pragma unroll
        for (int n = 0; n < TN; ++n) {
            const int gj = j0 + tx + 16 * n;
            if (gj >= NE) continue;
            float v = acc[m][n];
            if (G::BIAS == 3 && gj == G::N) {             // the bias gradient column
                bias[gi] = G::BETA ? bias[gi] + v : v;
                continue;
            }
            const nd_i64 o = (nd_i64)gi * G::LDC + gj;
            if (G::BETA) v += C[o];
            if (G::BIAS == 1) v += bias[gi];
            if (G::BIAS == 2) v += bias[gj];
            if (G::ACT == 1) v = v > 0.f ? v : v * slope;
            if (G::ACT == 2) v = aux[(nd_i64)b * G::SC + o] > 0.f ? v : v * slope;
            C[o] = v;
        }
    }
}
""")
def gemm(p, A, B, C, bias, aux, ws, sems, slope):
    M, N, K, R = p["M"], p["N"], p["K"], p["R"]
    if p["SPLITS"] > 1:      # the partial tiles must fit the workspace, the tickets the semaphores
        tiles = math.ceil(M / p["BM"]) * math.ceil((N + (p["BIAS"] == 3)) / p["BN"])
        assert len(ws) >= p["BATCH"] * tiles * p["SPLITS"] * p["BM"] * p["BN"]
        assert len(sems) >= p["BATCH"] * tiles
    for b in range(p["BATCH"]):
        a = _view(A, b * p["SA"], (R, M, K), (p["RA"], 1 if p["TA"] else p["LDA"], p["LDA"] if p["TA"] else 1))
        bb = _view(B, b * p["SB"], (R, K, N), (p["RB"], 1 if p["TB"] else p["LDB"], p["LDB"] if p["TB"] else 1))
        acc = np.einsum("rik,rkj->ij", a.astype(np.float64), bb.astype(np.float64)).astype(F32)
        if p["BIAS"] == 3:                       # the ones column: row sums of op(A) -> bias
            rows = a.astype(np.float64).sum(axis=(0, 2)).astype(F32)
            bias[:M] = bias[:M] + rows if p["BETA"] else rows
        c = _view(C, b * p["SC"], (M, N), (p["LDC"], 1))
        v = acc + c if p["BETA"] else acc
        if p["BIAS"] == 1:
            v = v + bias[:M, None]
        elif p["BIAS"] == 2:
            v = v + bias[None, :N]
        if p["ACT"] == 1:
            v = np.where(v > 0, v, v * F32(slope))
        elif p["ACT"] == 2:
            m = _view(aux, b * p["SC"], (M, N), (p["LDC"], 1))
            v = np.where(m > 0, v, v * F32(slope))
        c[...] = v
