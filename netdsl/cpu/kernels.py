"""Compiled CPU kernels (Numba): the element-wise passes around the GEMMs, each one loop over
preallocated buffers. The GEMMs are OpenBLAS's, called by blas.py. The NumPy layers (netdsl/kernels.py
and the layer files) are the reference: tests/test_cpu.py compares every kernel with them.

Columns use one layout: (C*kh*kw, N*OH*OW), image-major, so one GEMM covers the batch and its
result (M, N*OH*OW) turns into NCHW by copying runs of OH*OW values (fused with the bias and ReLU).
`cache=True` keeps the machine code on disk (a warm start loads it instead of compiling);
`parallel=True` only where the work per call is large enough to pay for waking the threads.
"""
from __future__ import annotations

import math

import numpy as np
from numba import njit, prange
from numba import uintp as _u

# Indices are unsigned (_u) wherever they are computed: Numba wraps a negative signed index around
# (a select on every access), which keeps LLVM from vectorising the loops and costs im2col and
# col2im 2.5-4x (docs/benchmarks.md). Those kernels index their C-contiguous arrays flat.

# -------------------------------------------------------------------------------------------
# Convolution, in NumPy's two column layouts (netdsl/kernels.py, chosen by the same rule):
#   "gemm"    (C*kh*kw, OH*OW*N), the batch fastest: one GEMM for the whole batch, runs of N
#             values per window position; for small images.
#   "batched" (N, C*kh*kw, OH*OW): one GEMM per image whose result is already NCHW; for large ones.
# The GEMM's epilogue (bias, and a ReLU fused by lowering) and dy's way back to rows (with the
# bias gradient) are one pass each.


@njit(inline="always")
def _valid_x(j, kw, sw, pw, dw, ow, W):
    """The output columns xo whose input column xo*sw - pw + j*dw lies inside [0, W)."""
    off = j * dw - pw
    lo = 0 if off >= 0 else (-off + sw - 1) // sw
    hi = 0 if W - off <= 0 else min(ow, (W - off + sw - 1) // sw)
    return off, lo, max(lo, hi)


@njit(cache=True, parallel=True)
def im2col_gemm(x, cols, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow):
    """x (N, C, H, W) -> cols (C*kh*kw, oh*ow*N); zero where a window reads the padding. Each
    channel's plane is first turned batch-last (H, W, N), so every window position copies one
    contiguous run of N values."""
    N, C, H, W = x.shape
    for c in prange(C):
        plane = np.empty((H, W, N), x.dtype)
        for n in range(N):
            for iy in range(H):
                for ix in range(W):
                    plane[iy, ix, n] = x[n, c, iy, ix]
        for r in range(c * kh * kw, (c + 1) * kh * kw):
            i, j = r // kw % kh, r % kw
            for y in range(oh):
                iy = y * sh - ph + i * dh
                for xo in range(ow):
                    ix = xo * sw - pw + j * dw
                    base = (y * ow + xo) * N
                    inside = 0 <= iy < H and 0 <= ix < W
                    for n in range(N):
                        cols[r, base + n] = plane[iy, ix, n] if inside else 0


@njit(cache=True, parallel=True)
def col2im_gemm(dcols, dx, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow):
    """The adjoint of im2col_gemm: dx (N, C, H, W) = every column entry summed into its pixel,
    accumulated per channel in a batch-last plane (contiguous runs of N), then written NCHW."""
    N, C, H, W = dx.shape
    for c in prange(C):
        plane = np.zeros((H, W, N), dx.dtype)
        for r in range(c * kh * kw, (c + 1) * kh * kw):
            i, j = r // kw % kh, r % kw
            for y in range(oh):
                iy = y * sh - ph + i * dh
                if iy < 0 or iy >= H:
                    continue
                for xo in range(ow):
                    ix = xo * sw - pw + j * dw
                    if 0 <= ix < W:
                        base = (y * ow + xo) * N
                        for n in range(N):
                            plane[iy, ix, n] += dcols[r, base + n]
        for n in range(N):
            for iy in range(H):
                for ix in range(W):
                    dx[n, c, iy, ix] = plane[iy, ix, n]


def batch_block(n: int, stride_bytes: int) -> int:
    """How many images the two kernels below move at once between the GEMM's rows and NCHW. All
    n, unless an image's stride is a multiple of 4 KiB: then the n cache lines of a pixel's run
    fall in one L1 set and evict each other (cifar10_quick's 32x16x16 float32 blobs: 3.5x slower),
    so 8 at a time, the L1's ways."""
    return 8 if n > 8 and stride_bytes % 4096 == 0 else n


@njit(cache=True, parallel=True)
def gemm_epilogue(rows, bias, y, relu, slope, nblock):
    """GEMM result rows (M, P*N) -> y (N, M, P) + bias (M,) (empty: none), then ReLU if `relu`;
    `nblock` images at a time (batch_block)."""
    N, M, P = y.shape
    rf, yf = rows.reshape(-1), y.reshape(-1)
    has_bias = bias.shape[0] > 0
    for m in prange(M):
        b = bias[m] if has_bias else rf[0] * 0
        for n0 in range(0, N, nblock):
            for p in range(P):
                src = _u(m * P * N + p * N)
                for n in range(_u(n0), _u(min(N, n0 + nblock))):
                    v = rf[src + n] + b
                    if relu and not v > 0:
                        v = v * slope
                    yf[(n * _u(M) + _u(m)) * _u(P) + _u(p)] = v


@njit(cache=True, parallel=True, fastmath={"reassoc"})
def gemm_rows(dy, rows, db, nblock):
    """dy (N, M, P) -> rows (M, P*N), and db (M,) = dy summed over the batch and pixels (db
    empty: no bias); `nblock` images at a time (batch_block)."""
    N, M, P = dy.shape
    yf, rf = dy.reshape(-1), rows.reshape(-1)
    has_bias = db.shape[0] > 0
    for m in prange(M):
        acc = 0.0
        for n0 in range(0, N, nblock):
            for p in range(P):
                d = _u(m * P * N + p * N)
                for n in range(_u(n0), _u(min(N, n0 + nblock))):
                    v = yf[(n * _u(M) + _u(m)) * _u(P) + _u(p)]
                    rf[d + n] = v
                    acc += v
        if has_bias:
            db[m] = acc


@njit(cache=True, parallel=True)
def im2col_batched(x, cols, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow):
    """x (N, C, H, W) -> cols (N, C*kh*kw [+ rows left alone, e.g. the bias's ones], oh*ow)."""
    N, C, H, W = x.shape
    R, P = cols.shape[1], cols.shape[2]
    xf, cf = x.reshape(-1), cols.reshape(-1)
    for nc in prange(N * C):
        n, c = nc // C, nc % C
        for i in range(kh):
            for j in range(kw):
                off, lo, hi = _valid_x(j, kw, sw, pw, dw, ow, W)
                for y in range(oh):
                    iy = y * sh - ph + i * dh
                    d = _u((n * R + (c * kh + i) * kw + j) * P + y * ow)
                    if iy < 0 or iy >= H:
                        lo_, hi_ = ow, ow
                    else:
                        lo_, hi_ = lo, hi
                        src = _u((nc * H + iy) * W + off)
                        if sw == 1:
                            for xo in range(_u(lo), _u(hi)):
                                cf[d + xo] = xf[src + xo]
                        else:
                            for xo in range(_u(lo), _u(hi)):
                                cf[d + xo] = xf[src + xo * _u(sw)]
                    for xo in range(_u(lo_)):
                        cf[d + xo] = 0
                    for xo in range(_u(hi_), _u(ow)):
                        cf[d + xo] = 0


@njit(cache=True, parallel=True)
def col2im_batched(dcols, dx, kh, kw, sh, sw, ph, pw, dh, dw, oh, ow):
    """The adjoint of im2col_batched: each (image, channel) plane sums its kh*kw rows."""
    N, C, H, W = dx.shape
    R, P = dcols.shape[1], dcols.shape[2]
    cf, xf = dcols.reshape(-1), dx.reshape(-1)
    for nc in prange(N * C):
        n, c = nc // C, nc % C
        base = _u(nc * H * W)
        for k in range(_u(H * W)):
            xf[base + k] = 0
        for r in range(c * kh * kw, (c + 1) * kh * kw):
            i, j = r // kw % kh, r % kw
            off, lo, hi = _valid_x(j, kw, sw, pw, dw, ow, W)
            for y in range(oh):
                iy = y * sh - ph + i * dh
                if 0 <= iy < H:
                    src, d = _u((n * R + r) * P + y * ow), _u((nc * H + iy) * W + off)
                    if sw == 1:
                        for xo in range(_u(lo), _u(hi)):
                            xf[d + xo] += cf[src + xo]
                    else:
                        for xo in range(_u(lo), _u(hi)):
                            xf[d + xo * _u(sw)] += cf[src + xo]


@njit(cache=True, parallel=True)
def bias_act_nmp(y, bias, relu, slope):
    """In place on y (N, M, P): + bias (M,) (empty: none), then ReLU if `relu`."""
    N, M, P = y.shape
    yf = y.reshape(-1)
    has_bias = bias.shape[0] > 0
    for nm in prange(N * M):
        b = bias[nm % M] if has_bias else yf[0] * 0
        base = _u(nm * P)
        for p in range(_u(P)):
            v = yf[base + p] + b
            if relu and not v > 0:
                v = v * slope
            yf[base + p] = v


# -------------------------------------------------------------------------------------------
# InnerProduct's epilogue, ReLU


@njit(cache=True, parallel=True)
def bias_act(y, bias, relu, slope):
    """In place on y (B, M): + bias (M,) (empty: none), then ReLU if `relu`."""
    B, M = y.shape
    has_bias = bias.shape[0] > 0
    for b in prange(B):
        for m in range(M):
            v = y[b, m] + (bias[m] if has_bias else 0)
            if relu and not v > 0:
                v = v * slope
            y[b, m] = v


@njit(cache=True)
def column_sums(dy, out):
    """out (M,) = dy (B, M) summed over B."""
    B, M = dy.shape
    for m in range(M):
        out[m] = 0
    for b in range(B):
        for m in range(M):
            out[m] += dy[b, m]


@njit(cache=True, parallel=True)
def relu_forward(x, y, slope):
    """Flat arrays: y = x where x > 0, else x*slope (NaN stays NaN, as x*mask does)."""
    for k in prange(x.shape[0]):
        v = x[k]
        y[k] = v if v > 0 else v * slope


@njit(cache=True, parallel=True)
def relu_backward(dy, y, dx, slope):
    """Flat arrays: dx = dy where the output y > 0 (for slope >= 0 exactly where x > 0)."""
    for k in prange(dy.shape[0]):
        dx[k] = dy[k] if y[k] > 0 else dy[k] * slope


# -------------------------------------------------------------------------------------------
# Pooling on planes (N*C, H, W), Caffe's geometry: a window starts at o*s - pad and is clipped
# to the input (MAX) or to the input plus its pad (AVE's divisor); MAX keeps the first maximum in
# row-major order and its flat index h*W + w for backward.


@njit(cache=True, parallel=True)
def max_pool_forward(x, y, arg, kh, kw, sh, sw, ph, pw):
    """y = each window's max; arg = where (the window's top-left cell if nothing beats -inf, -1
    when that cell is padding or past the plane: ceil mode's last window can start there)."""
    Q, H, W = x.shape
    OH, OW = y.shape[1], y.shape[2]
    xf, yf, af = x.reshape(-1), y.reshape(-1), arg.reshape(-1)
    for q in prange(Q):
        for oy in range(OH):
            hs = oy * sh - ph
            for ox in range(OW):
                ws = ox * sw - pw
                best = -np.inf
                at = hs * W + ws if 0 <= hs < H and 0 <= ws < W else -1
                for iy in range(max(hs, 0), min(hs + kh, H)):
                    row = _u((q * H + iy) * W)
                    for ix in range(max(ws, 0), min(ws + kw, W)):
                        v = xf[row + _u(ix)]
                        if v > best:
                            best, at = v, iy * W + ix
                o = _u((q * OH + oy) * OW + ox)
                yf[o] = best
                af[o] = at


@njit(cache=True, parallel=True)
def max_pool_2x2(x, y, arg):
    """max_pool_forward for 2x2 windows, stride 2, no pad, even H and W (every window inside)."""
    W, OH = x.shape[2], y.shape[1]
    for row in prange(y.shape[0] * OH):
        q, iy = row // OH, 2 * (row % OH)
        for ox in range(y.shape[2]):
            ix = 2 * ox
            best, at = x[q, iy, ix], iy * W + ix
            if not best > -np.inf:                 # NaN or -inf: the first cell above -inf wins
                best = -np.inf
            for k, v in enumerate((x[q, iy, ix + 1], x[q, iy + 1, ix], x[q, iy + 1, ix + 1])):
                if v > best:
                    best, at = v, (iy + (k > 0)) * W + ix + (k != 1)
            y[q, iy // 2, ox] = best
            arg[q, iy // 2, ox] = at


@njit(cache=True, parallel=True)
def max_pool_backward(dy, arg, dx):
    """Flat planes: dy and arg (planes, OH*OW), dx (planes, H*W)."""
    for q in prange(dx.shape[0]):
        dx[q] = 0
        for k in range(dy.shape[1]):
            if arg[q, k] >= 0:
                dx[q, arg[q, k]] += dy[q, k]


@njit(inline="always")
def _ave_window(oy, ox, kh, kw, sh, sw, ph, pw, H, W):
    """Caffe's AVE window of output (oy, ox): its rows and columns inside the input, and its
    divisor, the window's size clipped to the input plus its pad (pad cells count, cells past
    it do not)."""
    hs, ws = oy * sh - ph, ox * sw - pw
    he, we = min(hs + kh, H + ph), min(ws + kw, W + pw)
    return max(hs, 0), min(he, H), max(ws, 0), min(we, W), (he - hs) * (we - ws)


@njit(cache=True, parallel=True)
def ave_pool(x, y, kh, kw, sh, sw, ph, pw, backward):
    """Forward: y = each window's mean (x the input). Backward: x += each window's share of y
    (x the input's gradient, y the output's), x zeroed first."""
    Q, H, W = x.shape
    OH, OW = y.shape[1], y.shape[2]
    xf, yf = x.reshape(-1), y.reshape(-1)
    for q in prange(Q):
        if backward:
            for k in range(_u(q * H * W), _u((q + 1) * H * W)):
                xf[k] = 0
        for oy in range(OH):
            for ox in range(OW):
                h0, h1, w0, w1, size = _ave_window(oy, ox, kh, kw, sh, sw, ph, pw, H, W)
                o = _u((q * OH + oy) * OW + ox)
                if backward:
                    share = yf[o] / size
                    for iy in range(h0, h1):
                        row = _u((q * H + iy) * W)
                        for ix in range(_u(w0), _u(w1)):
                            xf[row + ix] += share
                else:
                    acc = 0.0
                    for iy in range(h0, h1):
                        row = _u((q * H + iy) * W)
                        for ix in range(_u(w0), _u(w1)):
                            acc += xf[row + ix]
                    yf[o] = acc / size


# -------------------------------------------------------------------------------------------
# Softmax loss: x (outer, C, inner), labels (outer*inner,) int64 class indices or ignore_label


@njit(cache=True, parallel=True)
def softmax_loss_forward(x, labels, prob, ignore, has_ignore, flt_min):
    """prob = softmax over C; returns (sum of -log p[label] over valid positions, valid count)."""
    outer, C, inner = x.shape
    total = 0.0
    valid = 0
    for q in prange(outer * inner):
        o, i = q // inner, q % inner
        top = x[o, 0, i]
        for c in range(1, C):
            top = max(top, x[o, c, i])
        s = 0.0
        for c in range(C):
            e = math.exp(x[o, c, i] - top)
            prob[o, c, i] = e
            s += e
        for c in range(C):
            prob[o, c, i] = prob[o, c, i] / s
        lab = labels[q]
        if not (has_ignore and lab == ignore):
            total += -math.log(max(prob[o, lab, i], flt_min))
            valid += 1
    return total, valid


@njit(cache=True)
def softmax_loss_backward(prob, labels, dx, ignore, has_ignore, scale):
    """dx = (prob - onehot(label)) * scale, zero at ignored positions."""
    outer, C, inner = prob.shape
    for o in range(outer):
        for i in range(inner):
            lab = labels[o * inner + i]
            if has_ignore and lab == ignore:
                for c in range(C):
                    dx[o, c, i] = 0
                continue
            for c in range(C):
                dx[o, c, i] = prob[o, c, i] * scale
            dx[o, lab, i] = (prob[o, lab, i] - 1) * scale


@njit(cache=True, parallel=True)
def smooth_l1_forward(x, t, w_in, w_out, g, s2):
    """caffe-fast-rcnn's SmoothL1Loss over flat arrays: returns sum(w_out * f(w_in * (x - t))), f
    the smooth L1 with sigma^2 = s2, and leaves in g each element's gradient factor (f' times
    w_in * w_out); w_in and w_out empty: no weights."""
    weighted = w_in.shape[0] > 0
    total = 0.0
    for k in prange(x.shape[0]):
        d = x[k] - t[k]
        if weighted:
            d = d * w_in[k]
        small = abs(d) < 1.0 / s2
        f = 0.5 * s2 * d * d if small else abs(d) - 0.5 / s2
        gk = s2 * d if small else np.sign(d)
        if weighted:
            f = f * w_out[k]
            gk = gk * w_in[k] * w_out[k]
        total += f
        g[k] = gk
    return total


@njit(cache=True, parallel=True)
def scaled(g, scale, out):
    """Flat arrays: out = g * scale."""
    for k in prange(g.shape[0]):
        out[k] = g[k] * scale


# -------------------------------------------------------------------------------------------
# The solver update over one flat buffer: every param a segment [start, end) with its own rate
# (lr*lr_mult; Adam's times its bias correction), decay added to the gradient (weight_decay *
# decay_mult) and shrink added to the update (AdamW's decoupled decay, else 0). One kernel per
# rule, each Caffe's ComputeUpdateValue (solver.py) in one pass: the gradient, weight and history
# read once, the weight, history and update written once (the update stays in g, as Caffe leaves
# it in the diff). Scalars come in the arrays' dtype, so float32 stays float32 and vectorises.


@njit(inline="always")
def _grad(wk, gk, gscale, decay, l1):
    """The regularised gradient of one element, and what the decay multiplies (w or sign(w))."""
    reg = np.sign(wk) if l1 else wk
    return gk * gscale + decay * reg, reg


# Each rule is a loop over a contiguous slice of one param (which LLVM vectorises: indexing the
# flat buffers by segment bounds instead ran 7x slower); its driver runs the slices `chunks` lists
# (rows: start, end, param index; update.chunks cuts them) in one parallel loop.

@njit(cache=True)
def _sgd(w, g, h, rate, decay, gscale, l1, momentum, more, back):
    for k in range(w.shape[0]):
        wk = w[k]
        d, _ = _grad(wk, g[k], gscale, decay, l1)
        old = h[k]
        v = momentum * old + rate * d
        h[k] = v
        u = more * v - back * old
        g[k] = u
        w[k] = wk - u


@njit(cache=True, parallel=True)
def sgd(w, g, h, chunks, rates, decays, shrinks, gscale, l1, momentum, more, back):
    """SGD (more 1, back 0) and Nesterov (more 1 + momentum, back momentum):
    v = momentum*v + rate*d; update = more*v_new - back*v_old."""
    for c in prange(chunks.shape[0]):
        a, b, s = chunks[c, 0], chunks[c, 1], chunks[c, 2]
        _sgd(w[a:b], g[a:b], h[a:b], rates[s], decays[s], gscale, l1, momentum, more, back)


@njit(cache=True)
def _rms(w, g, h, rate, decay, gscale, l1, hold, keep, delta):
    for k in range(w.shape[0]):
        wk = w[k]
        d, _ = _grad(wk, g[k], gscale, decay, l1)
        v = hold * h[k] + keep * (d * d)
        h[k] = v
        u = rate * d / (np.sqrt(v) + delta)
        g[k] = u
        w[k] = wk - u


@njit(cache=True, parallel=True)
def rms(w, g, h, chunks, rates, decays, shrinks, gscale, l1, hold, keep, delta):
    """AdaGrad (hold 1, keep 1) and RMSProp (hold rms_decay, keep 1 - rms_decay):
    h = hold*h + keep*d^2; update = rate*d / (sqrt(h) + delta)."""
    for c in prange(chunks.shape[0]):
        a, b, s = chunks[c, 0], chunks[c, 1], chunks[c, 2]
        _rms(w[a:b], g[a:b], h[a:b], rates[s], decays[s], gscale, l1, hold, keep, delta)


@njit(cache=True)
def _adadelta(w, g, h, h1, rate, decay, gscale, l1, momentum, keep, delta):
    for k in range(w.shape[0]):
        wk = w[k]
        d, _ = _grad(wk, g[k], gscale, decay, l1)
        sq = momentum * h[k] + keep * (d * d)
        h[k] = sq
        d = d * np.sqrt((h1[k] + delta) / (sq + delta))
        h1[k] = momentum * h1[k] + keep * (d * d)
        u = rate * d
        g[k] = u
        w[k] = wk - u


@njit(cache=True, parallel=True)
def adadelta(w, g, h, h1, chunks, rates, decays, shrinks, gscale, l1, momentum, keep, delta):
    """h: squared gradients, h1: squared updates (lr-free); keep = 1 - momentum."""
    for c in prange(chunks.shape[0]):
        a, b, s = chunks[c, 0], chunks[c, 1], chunks[c, 2]
        _adadelta(w[a:b], g[a:b], h[a:b], h1[a:b], rates[s], decays[s], gscale, l1, momentum, keep, delta)


@njit(cache=True)
def _adam(w, g, h, h1, rate, decay, shrink, gscale, l1, beta1, keep1, beta2, keep2, delta):
    for k in range(w.shape[0]):
        wk = w[k]
        d, reg = _grad(wk, g[k], gscale, decay, l1)
        m = beta1 * h[k] + keep1 * d
        v = beta2 * h1[k] + keep2 * (d * d)
        h[k] = m
        h1[k] = v
        u = rate * m / (np.sqrt(v) + delta) + shrink * reg
        g[k] = u
        w[k] = wk - u


@njit(cache=True, parallel=True)
def adam(w, g, h, h1, chunks, rates, decays, shrinks, gscale, l1, beta1, keep1, beta2, keep2, delta):
    """Adam and AdamW (shrinks: the decoupled decay); keep1 = 1 - beta1, keep2 = 1 - beta2."""
    for c in prange(chunks.shape[0]):
        a, b, s = chunks[c, 0], chunks[c, 1], chunks[c, 2]
        _adam(w[a:b], g[a:b], h[a:b], h1[a:b], rates[s], decays[s], shrinks[s], gscale, l1, beta1, keep1, beta2,
              keep2, delta)
