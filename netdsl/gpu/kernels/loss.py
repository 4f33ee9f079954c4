"""Kernels: SoftmaxWithLoss (loss and, with GRAD, its gradient in one kernel) and Accuracy."""
from __future__ import annotations

import numpy as np

from ..kernel import F32, FLT_MIN, kernel


@kernel("softmax_loss", "const float* x, const float* label, float* dx, float* hist, double* accum, "
                        "const int* counter, int cap, int ignore_label, float loss_weight",
        "nd_softmax_loss", ("N", "C", "GRAD", "ACC_GRAD", "HAS_IGNORE", "NORM", "TO_HISTORY", "ADD"),
        "x, label, dx, hist, accum, counter, cap, ignore_label, loss_weight",
        flags=("GRAD", "ACC_GRAD", "HAS_IGNORE", "TO_HISTORY", "ADD"), source=r"""
// One block. NORM: 0 = N (FULL, BATCH_SIZE), 1 = VALID, 2 = NONE. The loss goes to
// dst[counter % cap] (the train loss history; weighted) or is added to a float64 accumulator.
template <int N, int C, bool GRAD, bool ACC_GRAD, bool HAS_IGNORE, int NORM, bool TO_HISTORY, bool ADD>
__device__ __forceinline__ void nd_softmax_loss(const float* __restrict__ x, const float* __restrict__ label,
                                                float* __restrict__ dx, float* __restrict__ hist,
                                                double* __restrict__ accum, const int* __restrict__ counter,
                                                int cap, int ignore_label, float loss_weight) {
    float valid = (float)N;
    if (HAS_IGNORE) {
        float c = 0.f;
        for (int r = threadIdx.x; r < N; r += blockDim.x) c += (int)label[r] != ignore_label ? 1.f : 0.f;
        valid = nd_block_sum(c);
    }
    const float norm = NORM == 1 ? (valid > 1.f ? valid : 1.f) : (NORM == 2 ? 1.f : (float)(N > 1 ? N : 1));
    const float gscale = loss_weight / norm;
    float lsum = 0.f;
    for (int r = threadIdx.x; r < N; r += blockDim.x) {
        const float* xr = x + r * C;
        float mx = xr[0];
        for (int c = 1; c < C; ++c) mx = fmaxf(mx, xr[c]);
        float se = 0.f;
        for (int c = 0; c < C; ++c) se += expf(xr[c] - mx);
        const int lab = (int)label[r];
        const bool ok = !HAS_IGNORE || lab != ignore_label;
        const int safe = ok ? lab : 0;
        const float p = expf(xr[safe] - mx) / se;
        if (ok) lsum += -logf(p > ND_FLT_MIN ? p : ND_FLT_MIN);
        if (GRAD) {
            for (int c = 0; c < C; ++c) {
                const float g = ok ? (expf(xr[c] - mx) / se - (c == safe ? 1.f : 0.f)) * gscale : 0.f;
                dx[r * C + c] = ACC_GRAD ? dx[r * C + c] + g : g;
            }
        }
    }
    lsum = nd_block_sum(lsum);
    if (threadIdx.x == 0) {
        const float loss = lsum / norm;
        if (TO_HISTORY) {
            float* d = hist + counter[0] % cap;
            *d = ADD ? *d + loss * loss_weight : loss * loss_weight;
        } else {
            accum[0] += (double)loss;
        }
    }
}
""")
def softmax_loss(p, x, label, dx, hist, accum, counter, cap, ignore, weight):
    N, C = p["N"], p["C"]
    xs = x[:N * C].reshape(N, C).astype(np.float64)
    lab = label[:N].astype(np.int64)
    ok = lab != ignore if p["HAS_IGNORE"] else np.ones(N, bool)
    safe = np.where(ok, lab, 0)
    e = np.exp(xs - xs.max(axis=1, keepdims=True))
    prob = e / e.sum(axis=1, keepdims=True)
    valid = float(ok.sum())
    norm = {0: max(1.0, float(N)), 1: max(1.0, valid), 2: 1.0}[p["NORM"]]
    loss = float((-np.log(np.maximum(prob[np.arange(N), safe], FLT_MIN)) * ok).sum()) / norm
    if p["GRAD"]:
        g = prob.copy()
        g[np.arange(N), safe] -= 1
        g *= (ok * (float(weight) / norm))[:, None]
        out = dx[:N * C].reshape(N, C)
        out[...] = out + g.astype(F32) if p["ACC_GRAD"] else g.astype(F32)
    if p["TO_HISTORY"]:
        slot = int(counter[0]) % int(cap)
        v = F32(loss) * F32(weight)
        hist[slot] = hist[slot] + v if p["ADD"] else v
    else:
        accum[0] += float(F32(loss))


@kernel("accuracy", "const float* x, const float* label, double* accum, int ignore_label",
        "nd_accuracy", ("N", "C", "TOPK", "HAS_IGNORE"),
        "x, label, accum, ignore_label",
        flags=("HAS_IGNORE",), source=r"""
template <int N, int C, int TOPK, bool HAS_IGNORE>
__device__ __forceinline__ void nd_accuracy(const float* __restrict__ x, const float* __restrict__ label,
                                            double* __restrict__ accum, int ignore_label) {
    float correct = 0.f, valid = 0.f;
    for (int r = threadIdx.x; r < N; r += blockDim.x) {
        const int lab = (int)label[r];
        if (HAS_IGNORE && lab == ignore_label) continue;
        valid += 1.f;
        const float t = x[r * C + lab];
        int better = -1;
        for (int c = 0; c < C; ++c) better += x[r * C + c] >= t ? 1 : 0;
        if (better < TOPK) correct += 1.f;
    }
    correct = nd_block_sum(correct);
    valid = nd_block_sum(valid);
    if (threadIdx.x == 0) accum[0] += (double)(valid > 0.f ? correct / valid : 0.f);
}
""")
def accuracy(p, x, label, accum, ignore):
    N, C = p["N"], p["C"]
    xs = x[:N * C].reshape(N, C)
    lab = label[:N].astype(np.int64)
    ok = lab != ignore if p["HAS_IGNORE"] else np.ones(N, bool)
    safe = np.where(ok, lab, 0)
    better = (xs >= xs[np.arange(N), safe][:, None]).sum(axis=1) - 1
    correct = float(((better < p["TOPK"]) & ok).sum())
    valid = float(ok.sum())
    accum[0] += float(F32(correct / valid)) if valid else 0.0
