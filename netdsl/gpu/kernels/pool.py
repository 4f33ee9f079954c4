"""Kernels: Caffe's MAX and AVE pooling, forward and backward (MAX keeps the argmax h*W+w)."""
from __future__ import annotations

import numpy as np

from ..kernel import F32, kernel


def _pool_geom(p):
    return [p[k] for k in ("NC", "H", "W", "KH", "KW", "SH", "SW", "PH", "PW", "OH", "OW")]


def _ave_window(oy, ox, p):
    NC, H, W, KH, KW, SH, SW, PH, PW, OH, OW = _pool_geom(p)
    hs, ws = oy * SH - PH, ox * SW - PW
    he, we = min(hs + KH, H + PH), min(ws + KW, W + PW)
    size = (he - hs) * (we - ws)
    return max(hs, 0), max(ws, 0), min(he, H), min(we, W), size


@kernel("maxpool_fwd", "const float* x, float* y, int* mask",
        "nd_maxpool_fwd", ("NC", "H", "W", "KH", "KW", "SH", "SW", "PH", "PW", "OH", "OW"),
        "x, y, mask", source=r"""
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
""")
def maxpool_fwd(p, x, y, mask):
    NC, H, W, KH, KW, SH, SW, PH, PW, OH, OW = _pool_geom(p)
    xs = x[:NC * H * W].reshape(NC, H * W)
    ys, ms = y[:NC * OH * OW].reshape(NC, OH, OW), mask[:NC * OH * OW].reshape(NC, OH, OW)
    for oy in range(OH):
        for ox in range(OW):
            hs, ws = oy * SH - PH, ox * SW - PW
            he, we = min(hs + KH, H), min(ws + KW, W)
            hs, ws = max(hs, 0), max(ws, 0)
            cells = [h * W + w for h in range(hs, he) for w in range(ws, we)]
            vals = xs[:, cells]
            k = np.argmax(vals, axis=1)                     # the first max, as the strict '>'
            ys[:, oy, ox] = vals[np.arange(NC), k]
            ms[:, oy, ox] = np.asarray(cells)[k]


@kernel("maxpool_bwd", "const float* dy, const int* mask, float* dx",
        "nd_maxpool_bwd", ("NC", "H", "W", "KH", "KW", "SH", "SW", "PH", "PW", "OH", "OW", "ACC"),
        "dy, mask, dx",
        flags=("ACC",), source=r"""
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
""")
def maxpool_bwd(p, dy, mask, dx):
    NC, H, W, KH, KW, SH, SW, PH, PW, OH, OW = _pool_geom(p)
    g = np.zeros((NC, H * W), F32)
    d, m = dy[:NC * OH * OW].reshape(NC, -1), mask[:NC * OH * OW].reshape(NC, -1)
    for j in range(OH * OW):
        np.add.at(g, (np.arange(NC), m[:, j]), d[:, j])
    out = dx[:NC * H * W].reshape(NC, H * W)
    out[...] = out + g if p["ACC"] else g


@kernel("avepool_fwd", "const float* x, float* y",
        "nd_avepool_fwd", ("NC", "H", "W", "KH", "KW", "SH", "SW", "PH", "PW", "OH", "OW"),
        "x, y", source=r"""
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
""")
def avepool_fwd(p, x, y):
    NC, H, W, KH, KW, SH, SW, PH, PW, OH, OW = _pool_geom(p)
    xs = x[:NC * H * W].reshape(NC, H, W)
    ys = y[:NC * OH * OW].reshape(NC, OH, OW)
    for oy in range(OH):
        for ox in range(OW):
            hs, ws, he, we, size = _ave_window(oy, ox, p)
            ys[:, oy, ox] = xs[:, hs:he, ws:we].reshape(NC, -1).sum(axis=1, dtype=F32) / F32(size)


@kernel("avepool_bwd", "const float* dy, float* dx",
        "nd_avepool_bwd", ("NC", "H", "W", "KH", "KW", "SH", "SW", "PH", "PW", "OH", "OW", "ACC"),
        "dy, dx",
        flags=("ACC",), source=r"""
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
""")
def avepool_bwd(p, dy, dx):
    NC, H, W, KH, KW, SH, SW, PH, PW, OH, OW = _pool_geom(p)
    g = np.zeros((NC, H, W), F32)
    d = dy[:NC * OH * OW].reshape(NC, OH, OW)
    for oy in range(OH):
        for ox in range(OW):
            hs, ws, he, we, size = _ave_window(oy, ox, p)
            g[:, hs:he, ws:we] += (d[:, oy, ox] / F32(size))[:, None, None]
    out = dx[:NC * H * W].reshape(NC, H, W)
    out[...] = out + g if p["ACC"] else g
