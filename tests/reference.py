"""Naive references for the tests: Caffe's CPU loops written out in float64, with every output
size computed here from Caffe's formulas (never from the code under test)."""
from __future__ import annotations

import itertools

import numpy as np

from netdsl import gradient_check


def conv_ref(x, W, b, stride, pad, dil, group):
    N, Cin, H, Wd = x.shape
    M, Cg, kh, kw = W.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, pad, dil
    oh = (H + 2 * ph - (dh * (kh - 1) + 1)) // sh + 1
    ow = (Wd + 2 * pw - (dw * (kw - 1) + 1)) // sw + 1
    Mg = M // group
    y = np.zeros((N, M, oh, ow))
    for n, m, r, c in itertools.product(range(N), range(M), range(oh), range(ow)):
        gi = m // Mg
        acc = 0.0 if b is None else b[m]
        for ci, i, j in itertools.product(range(Cg), range(kh), range(kw)):
            h, w = r * sh - ph + i * dh, c * sw - pw + j * dw
            if 0 <= h < H and 0 <= w < Wd:
                acc += x[n, gi * Cg + ci, h, w] * W[m, ci, i, j]
        y[n, m, r, c] = acc
    return y


def deconv_ref(x, W, b, stride, pad, dil, group):
    N, Cin, H, Wd = x.shape
    _, Mg, kh, kw = W.shape
    (sh, sw), (ph, pw), (dh, dw) = stride, pad, dil
    oh = sh * (H - 1) + dh * (kh - 1) + 1 - 2 * ph
    ow = sw * (Wd - 1) + dw * (kw - 1) + 1 - 2 * pw
    Cg = Cin // group
    y = np.zeros((N, Mg * group, oh, ow))
    for n, c, r, q in itertools.product(range(N), range(Cin), range(H), range(Wd)):
        gi = c // Cg
        for m, i, j in itertools.product(range(Mg), range(kh), range(kw)):
            h, w = r * sh - ph + i * dh, q * sw - pw + j * dw
            if 0 <= h < oh and 0 <= w < ow:
                y[n, gi * Mg + m, h, w] += x[n, c, r, q] * W[c, m, i, j]
    if b is not None:
        y += b.reshape(1, -1, 1, 1)
    return y


def caffe_pool_out(n, k, s, p, ceil, any_pad):
    o = (-(-(n + 2 * p - k) // s) if ceil else (n + 2 * p - k) // s) + 1
    if any_pad and (o - 1) * s >= n + p:     # Caffe: `if (pad_h_ || pad_w_)`, for both axes
        o -= 1
    return o


def pool_ref(x, mode, kh, kw, sh, sw, ph, pw, ceil=True):
    """Caffe's PoolingLayer::Forward_cpu; also the MAX mask as flat h*W+w (-1 if empty)."""
    N, Cc, H, W = x.shape
    oh = caffe_pool_out(H, kh, sh, ph, ceil, ph or pw)
    ow = caffe_pool_out(W, kw, sw, pw, ceil, ph or pw)
    y = np.zeros((N, Cc, oh, ow))
    mask = -np.ones((N, Cc, oh, ow), int)
    for n, c, r, q in itertools.product(range(N), range(Cc), range(oh), range(ow)):
        hs, ws = r * sh - ph, q * sw - pw
        he, we = min(hs + kh, H + ph), min(ws + kw, W + pw)
        pool_size = (he - hs) * (we - ws)
        hs, ws, he, we = max(hs, 0), max(ws, 0), min(he, H), min(we, W)
        if mode.upper() == "MAX":
            best = -np.finfo(np.float32).max
            for h, w in itertools.product(range(hs, he), range(ws, we)):
                if x[n, c, h, w] > best:
                    best, mask[n, c, r, q] = x[n, c, h, w], h * W + w
            y[n, c, r, q] = best
        else:
            y[n, c, r, q] = x[n, c, hs:he, ws:we].sum() / pool_size
    return y, mask


def max_pool_backward_ref(dy, mask, x_shape):
    dx = np.zeros(x_shape)
    N, C = x_shape[:2]
    for n, c in itertools.product(range(N), range(C)):
        for r, q in np.ndindex(*dy.shape[2:]):
            dx[n, c].flat[mask[n, c, r, q]] += dy[n, c, r, q]
    return dx


def lrn_across_ref(x, n, alpha, beta, k):
    C = x.shape[1]
    y = np.zeros_like(x)
    for c in range(C):
        lo, hi = max(0, c - (n - 1) // 2), min(C, c + (n - 1) // 2 + 1)
        s = k + alpha / n * (x[:, lo:hi] ** 2).sum(axis=1)
        y[:, c] = x[:, c] * s ** -beta
    return y


def lrn_within_ref(x, n, alpha, beta):
    half = (n - 1) // 2
    avg, _ = pool_ref(x * x, "ave", n, n, 1, 1, half, half)
    return x * (1 + alpha * avg) ** -beta


def numeric_grad(loss, arr: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Central differences of the scalar loss() with respect to every element of arr (in place):
    netdsl.gradient_check's, itself checked against closed forms in tests/test_gradcheck.py."""
    return gradient_check.numeric_grad(loss, arr, eps)
