"""GPU kernel library: the CUDA C templates that codegen specialises per plan (shapes baked in).

Self-contained (no #include) so that both NVRTC (CuPy's RawModule) and nvcc compile it. Every
template here has a NumPy twin in emulate.py with the same semantics; tests run both.
"""

CUDA_LIBRARY = r"""
// ----------------------------------------------------------------------------------------------
// netdsl GPU kernel library (netdsl/gpu/library.py). FP32 throughout; no cuDNN, no cuBLAS, so
// every kernel may run inside CUDA stream capture.
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

// ---- data: gather a batch from a GPU-resident uint8 dataset -----------------------------------
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

// ---- convolution helpers: im2col / col2im (columns [n][c*KH*KW][oh*OW]) ------------------------
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

// ---- GEMM: C[b] = op(A[b]) op(B[b]) (+C) (+bias) (activation), FP32 SIMT, 256 threads --------
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

// ---- pooling (Caffe's kernels; MAX keeps the argmax h*W+w for backward) ------------------------
template <int NC, int H, int W, int KH, int KW, int SH, int SW, int PH, int PW, int OH, int OW>
__device__ __forceinline__ void nd_maxpool_fwd(const float* __restrict__ x, float* __restrict__ y, int* __restrict__ mask) {
    ND_FOR(e, NC * OH * OW) {
        const int ox = e % OW, oy = (e / OW) % OH, nc = e / (OW * OH);
        int hs = oy * SH - PH, ws = ox * SW - PW;
        const int he = hs + KH < H ? hs + KH : H, we = ws + KW < W ? ws + KW : W;
        hs = hs > 0 ? hs : 0;
        ws = ws > 0 ? ws : 0;
        const float* xp = x + nc * H * W;
        float m = -ND_FLT_MAX;
        int arg = -1;
        for (int h = hs; h < he; ++h)
            for (int w = ws; w < we; ++w) {
                const float v = xp[h * W + w];
                if (v > m) { m = v; arg = h * W + w; }      // strict: the first max wins
            }
        y[e] = m;
        mask[e] = arg;
    }
}

template <int NC, int H, int W, int KH, int KW, int SH, int SW, int PH, int PW, int OH, int OW, bool ACC>
__device__ __forceinline__ void nd_maxpool_bwd(const float* __restrict__ dy, const int* __restrict__ mask, float* __restrict__ dx) {
    ND_FOR(e, NC * H * W) {
        const int w = e % W, h = (e / W) % H, nc = e / (W * H);
        const int phs = (h + PH < KH) ? 0 : (h + PH - KH) / SH + 1;
        const int phe = (h + PH) / SH + 1 < OH ? (h + PH) / SH + 1 : OH;
        const int pws = (w + PW < KW) ? 0 : (w + PW - KW) / SW + 1;
        const int pwe = (w + PW) / SW + 1 < OW ? (w + PW) / SW + 1 : OW;
        const int at = h * W + w, base = nc * OH * OW;
        float g = 0.f;
        for (int ph = phs; ph < phe; ++ph)
            for (int pw = pws; pw < pwe; ++pw)
                if (mask[base + ph * OW + pw] == at) g += dy[base + ph * OW + pw];
        dx[e] = ACC ? dx[e] + g : g;
    }
}

template <int NC, int H, int W, int KH, int KW, int SH, int SW, int PH, int PW, int OH, int OW>
__device__ __forceinline__ void nd_avepool_fwd(const float* __restrict__ x, float* __restrict__ y) {
    ND_FOR(e, NC * OH * OW) {
        const int ox = e % OW, oy = (e / OW) % OH, nc = e / (OW * OH);
        int hs = oy * SH - PH, ws = ox * SW - PW;
        int he = hs + KH < H + PH ? hs + KH : H + PH, we = ws + KW < W + PW ? ws + KW : W + PW;
        const float size = (float)((he - hs) * (we - ws));   // counts pad cells, as Caffe
        hs = hs > 0 ? hs : 0;
        ws = ws > 0 ? ws : 0;
        he = he < H ? he : H;
        we = we < W ? we : W;
        const float* xp = x + nc * H * W;
        float s = 0.f;
        for (int h = hs; h < he; ++h)
            for (int w = ws; w < we; ++w) s += xp[h * W + w];
        y[e] = s / size;
    }
}

template <int NC, int H, int W, int KH, int KW, int SH, int SW, int PH, int PW, int OH, int OW, bool ACC>
__device__ __forceinline__ void nd_avepool_bwd(const float* __restrict__ dy, float* __restrict__ dx) {
    ND_FOR(e, NC * H * W) {
        const int w = e % W, h = (e / W) % H, nc = e / (W * H);
        const int phs = (h + PH < KH) ? 0 : (h + PH - KH) / SH + 1;
        const int phe = (h + PH) / SH + 1 < OH ? (h + PH) / SH + 1 : OH;
        const int pws = (w + PW < KW) ? 0 : (w + PW - KW) / SW + 1;
        const int pwe = (w + PW) / SW + 1 < OW ? (w + PW) / SW + 1 : OW;
        const float* d = dy + nc * OH * OW;
        float g = 0.f;
        for (int ph = phs; ph < phe; ++ph)
            for (int pw = pws; pw < pwe; ++pw) {
                const int hs = ph * SH - PH, ws = pw * SW - PW;
                const int he = hs + KH < H + PH ? hs + KH : H + PH, we = ws + KW < W + PW ? ws + KW : W + PW;
                g += d[ph * OW + pw] / (float)((he - hs) * (we - ws));
            }
        dx[e] = ACC ? dx[e] + g : g;
    }
}

// ---- bias gradients ---------------------------------------------------------------------------
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

// db[j] (+)= sum over n of dy[n][j] (an InnerProduct's bias): one thread per column, in order.
template <int N, int M, bool ACC>
__device__ __forceinline__ void nd_col_sum(const float* __restrict__ dy, float* __restrict__ db) {
    ND_FOR(j, M) {
        float s = 0.f;
        for (int n = 0; n < N; ++n) s += dy[n * M + j];
        db[j] = ACC ? db[j] + s : s;
    }
}

// ---- element-wise -----------------------------------------------------------------------------
template <int CNT>
__device__ __forceinline__ void nd_relu_fwd(const float* __restrict__ x, float* __restrict__ y, float slope) {
    ND_FOR(e, CNT) { const float v = x[e]; y[e] = v > 0.f ? v : v * slope; }
}

// The mask comes from the output y: with slope >= 0, y > 0 exactly where x > 0.
template <int CNT, bool ACC>
__device__ __forceinline__ void nd_relu_bwd(const float* __restrict__ dy, const float* __restrict__ y,
                                            float* __restrict__ dx, float slope) {
    ND_FOR(e, CNT) { const float g = y[e] > 0.f ? dy[e] : dy[e] * slope; dx[e] = ACC ? dx[e] + g : g; }
}

template <int CNT>
__device__ __forceinline__ void nd_zero(float* __restrict__ p) {
    ND_FOR(e, CNT) p[e] = 0.f;
}

// ---- SoftmaxWithLoss (forward and, with GRAD, its backward in the same kernel) ----------------
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

// ---- Accuracy (top_k, Caffe's ties count against), added to a float64 accumulator ---------------
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

// ---- solver -----------------------------------------------------------------------------------
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
