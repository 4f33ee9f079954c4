"""Kernels: Caffe's SGD update with the learning rate computed on the device from its iteration
counter, and the counter's advance."""
from __future__ import annotations

import math

import numpy as np

from ..kernel import F32, kernel

SOLVER_SOURCE = r"""
// Caffe's GetLearningRate from the device's iteration counter (policies as in netdsl/solver.py).
__device__ double nd_learning_rate(int policy, int it, double base, double gamma, double power, int stepsize,
                                   int max_iter, const int* __restrict__ steps, int nsteps) {
    switch (policy) {
    case 0: return base;                                                      // fixed
    case 1: return base * pow(gamma, (double)(it / stepsize));                // step
    case 2: return base * pow(gamma, (double)it);                             // exp
    case 3: return base * pow(1.0 + gamma * (double)it, -power);              // inv
    case 4: {                                                                 // multistep
        int count = 0, reached = -1;
        for (int q = 0; q < nsteps; ++q) {
            reached = steps[q] > reached + 1 ? steps[q] : reached + 1;
            if (reached > it) break;
            ++count;
        }
        return base * pow(gamma, (double)count);
    }
    case 5: {                                                                 // poly
        const double f = 1.0 - (double)it / (double)max_iter;
        return base * pow(f > 0.0 ? f : 0.0, power);
    }
    default: return base * 0.5 * (1.0 + tanh(0.5 * gamma * (double)(it - stepsize)));   // sigmoid
    }
}

// Caffe's SGD ApplyUpdate for every learnable param (blockIdx.y = param), in the eager order:
// diff = grad + decay*w (L2) or decay*sign(w) (L1); diff *= local_rate;
// h = momentum*h + diff; grad = h; w -= h. Rounded op by op (no FMA) like the eager solver.
extern "C" __global__ void nd_sgd_update(float* __restrict__ w, float* __restrict__ g, float* __restrict__ h,
                                         const nd_i64* __restrict__ ptab_i, const double* __restrict__ ptab_f,
                                         const int* __restrict__ counter, const int* __restrict__ steps,
                                         int policy, double base, double gamma, double power, int stepsize,
                                         int max_iter, int nsteps, float momentum, double weight_decay, int l1) {
    const nd_i64 off = ptab_i[2 * blockIdx.y], cnt = ptab_i[2 * blockIdx.y + 1];
    if ((nd_i64)blockIdx.x * blockDim.x >= cnt) return;
    __shared__ float s_rate[2];
    if (threadIdx.x == 0) {                // the lr once per block, in double as the host computes it
        const double rate = nd_learning_rate(policy, counter[0], base, gamma, power, stepsize, max_iter, steps, nsteps);
        s_rate[0] = (float)(rate * ptab_f[2 * blockIdx.y]);
        s_rate[1] = (float)(weight_decay * ptab_f[2 * blockIdx.y + 1]);
    }
    __syncthreads();
    const float local_rate = s_rate[0], local_decay = s_rate[1];
    for (nd_i64 e = (nd_i64)blockIdx.x * blockDim.x + threadIdx.x; e < cnt; e += (nd_i64)gridDim.x * blockDim.x) {
        const nd_i64 o = off + e;
        const float wv = w[o];
        float d = g[o];
        if (local_decay != 0.f) {
            const float r = l1 ? (wv > 0.f ? local_decay : (wv < 0.f ? -local_decay : 0.f)) : __fmul_rn(wv, local_decay);
            d = __fadd_rn(d, r);
        }
        d = __fmul_rn(d, local_rate);
        const float hv = __fadd_rn(__fmul_rn(h[o], momentum), d);
        h[o] = hv;
        g[o] = hv;
        w[o] = __fsub_rn(wv, hv);
    }
}

extern "C" __global__ void nd_advance(int* counter, int slot) {
    if (blockIdx.x == 0 && threadIdx.x == 0) counter[slot] += 1;
}
"""


def device_learning_rate(policy: int, it: int, base, gamma, power, stepsize, max_iter, steps) -> float:
    """nd_learning_rate, line for line."""
    if policy == 0:
        return base
    if policy == 1:
        return base * math.pow(gamma, it // stepsize)
    if policy == 2:
        return base * math.pow(gamma, it)
    if policy == 3:
        return base * math.pow(1.0 + gamma * it, -power)
    if policy == 4:
        count, reached = 0, -1
        for v in steps:
            reached = max(int(v), reached + 1)
            if reached > it:
                break
            count += 1
        return base * math.pow(gamma, count)
    if policy == 5:
        return base * math.pow(max(0.0, 1.0 - it / max_iter), power)
    return base * 0.5 * (1.0 + math.tanh(0.5 * gamma * (it - stepsize)))


@kernel("sgd", "", "nd_sgd_update", (), "", library=True, source=SOLVER_SOURCE)
def sgd(p, w, g, h, ptab_i, ptab_f, counter, steps, policy, base, gamma, power, stepsize, max_iter, nsteps,
        momentum, weight_decay, l1):
    rate = device_learning_rate(int(policy), int(counter[0]), float(base), float(gamma), float(power),
                                int(stepsize), int(max_iter), steps[:int(nsteps)])
    for q in range(len(ptab_i) // 2):
        off, cnt = int(ptab_i[2 * q]), int(ptab_i[2 * q + 1])
        local_rate = F32(rate * float(ptab_f[2 * q]))
        local_decay = F32(float(weight_decay) * float(ptab_f[2 * q + 1]))
        wv, d = w[off:off + cnt], g[off:off + cnt].copy()
        if local_decay != 0:
            d = d + (np.sign(wv).astype(F32) * local_decay if l1 else wv * local_decay)
        d = d * local_rate
        hv = h[off:off + cnt] * F32(momentum) + d
        h[off:off + cnt] = hv
        g[off:off + cnt] = hv
        w[off:off + cnt] = wv - hv


@kernel("advance", "", "nd_advance", (), "", library=True, source="")
def advance(p, counter, slot):
    counter[int(slot)] += 1
