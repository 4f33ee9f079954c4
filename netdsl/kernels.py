"""Kernels: xp-generic math shared by layers (out sizes, im2col/col2im, conv, pooling, LRN, softmax).

Every function takes `xp` (numpy or cupy) and uses only APIs both have. Arrays are NCHW.
"""
from __future__ import annotations

from typing import Any, NamedTuple

# Convolutions whose output has at least this many pixels per image use the "batched" layout
# (one batched matmul whose result is already NCHW); smaller ones use the "gemm" layout (one big
# GEMM over the whole batch). Measured on LeNet and CIFAR-10 quick shapes.
BATCHED_MIN_PIXELS = 512

# Elements per slab when moving the batch axis to the front (see _batch_first).
_SLAB = 1 << 16


# ---------------------------------------------------------------------------------------------
# Output sizes

def conv_out_size(in_: int, k: int, s: int = 1, p: int = 0, d: int = 1) -> int:
    """Caffe convolution rounds down: every window lies inside the padded input."""
    return (in_ + 2 * p - (d * (k - 1) + 1)) // s + 1


def deconv_out_size(in_: int, k: int, s: int = 1, p: int = 0, d: int = 1) -> int:
    """The input size of the convolution whose backward pass this deconvolution is."""
    return s * (in_ - 1) + d * (k - 1) + 1 - 2 * p


def pool_out_size(in_: int, k: int, s: int = 1, p: int = 0, ceil: bool = True, padded: bool | None = None) -> int:
    """Caffe pooling rounds up by default, so the last window may hang over the input's end.
    `padded`: whether the layer pads at all (either axis); Caffe corrects both axes then."""
    span = in_ + 2 * p - k
    out = (-(-span // s) if ceil else span // s) + 1
    if (p > 0 if padded is None else padded) and (out - 1) * s >= in_ + p:
        out -= 1          # but the last window must start inside the input or its leading pad
    return out


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _span(start: int, count: int, step: int) -> slice:
    """The slice of `count` positions `step` apart beginning at `start`."""
    return slice(start, start + step * (count - 1) + 1, step)


# ---------------------------------------------------------------------------------------------
# im2col / col2im
#
# Columns come in two layouts, both grouped so that group g's rows are contiguous:
#   "gemm":    (g, C/g*kh*kw, OH*OW*N). The batch is the fastest axis, so each window copies
#              runs of OW*N values and one GEMM covers the whole batch; best for small images.
#   "batched": (N, g, C/g*kh*kw, OH*OW). One batched matmul yields NCHW directly, with no
#              transposes of the output or of dy; best when OH*OW is large.
# With `ones` a row of ones follows each group's rows, so the bias rides along in the GEMM as an
# extra weight column and its gradient comes out of the weight-gradient GEMM for free.

class ConvGeom(NamedTuple):
    """Convolution geometry: image side (h, w) and column side (oh, ow)."""
    kh: int
    kw: int
    sh: int
    sw: int
    ph: int
    pw: int
    dh: int
    dw: int
    group: int
    h: int
    w: int
    oh: int
    ow: int
    layout: str                # "gemm" | "batched"


def conv_geom(h, w, kh, kw, sh=1, sw=1, ph=0, pw=0, dh=1, dw=1, group=1, layout=None) -> ConvGeom:
    """Geometry of a convolution over an h x w image; picks the layout unless given."""
    oh, ow = conv_out_size(h, kh, sh, ph, dh), conv_out_size(w, kw, sw, pw, dw)
    if layout is None:
        layout = "batched" if oh * ow >= BATCHED_MIN_PIXELS else "gemm"
    return ConvGeom(kh, kw, sh, sw, ph, pw, dh, dw, group, h, w, oh, ow, layout)


def im2col(xp, x, kh, kw, sh=1, sw=1, ph=0, pw=0, dh=1, dw=1, layout=None):
    """Columns of x (N, C, H, W): (C*kh*kw, OH*OW*N) for "gemm", (N, C*kh*kw, OH*OW) for "batched"."""
    H, W = x.shape[2:]
    g = conv_geom(H, W, kh, kw, sh, sw, ph, pw, dh, dw, layout=layout)
    cols = _im2col(xp, x, g)
    return cols[0] if g.layout == "gemm" else cols[:, 0]


def col2im(xp, cols, x_shape, kh, kw, sh=1, sw=1, ph=0, pw=0, dh=1, dw=1, layout=None):
    """Adjoint of im2col: sums every column entry back into its image position."""
    C, H, W = x_shape[1:]
    g = conv_geom(H, W, kh, kw, sh, sw, ph, pw, dh, dw, layout=layout)
    by_offset = cols.reshape(cols.shape[:-2] + (C, kh * kw, cols.shape[-1])).swapaxes(-3, -2)
    return _col2im(xp, by_offset, x_shape, g)


def _batch_first(xp, a):
    """(..., N) -> contiguous (N, ...), copied a slab of the leading axis at a time: a single
    transpose of a large array misses the cache on nearly every element it reads."""
    out = xp.empty((a.shape[-1],) + a.shape[:-1], a.dtype)
    step = max(1, _SLAB // a[0].size)
    for s in range(0, a.shape[0], step):
        out[:, s:s + step] = xp.moveaxis(a[s:s + step], -1, 0)
    return out


def _image(xp, x, g: ConvGeom):
    """x padded, in the layout's axis order: contiguous (C, Hp, Wp, N) for gemm, NCHW for batched."""
    N, C, H, W = x.shape
    img = x.transpose(1, 2, 3, 0) if g.layout == "gemm" else x
    if not (g.ph or g.pw):
        return xp.ascontiguousarray(img)
    if g.layout == "gemm":
        out = xp.zeros((C, H + 2 * g.ph, W + 2 * g.pw, N), x.dtype)
        out[:, g.ph:g.ph + H, g.pw:g.pw + W] = img
    else:
        out = xp.zeros((N, C, H + 2 * g.ph, W + 2 * g.pw), x.dtype)
        out[:, :, g.ph:g.ph + H, g.pw:g.pw + W] = img
    return out


def _windows(xp, img, g: ConvGeom):
    """A strided view of every window of img, shaped like the columns before flattening.

    gemm (g, C/g, kh, kw, OH, OW, N); batched (N, g, C/g, kh, kw, OH, OW).
    """
    if g.layout == "gemm":
        sc, sy, sx, sn = img.strides
        C, N = img.shape[0], img.shape[3]
        shape = (g.group, C // g.group, g.kh, g.kw, g.oh, g.ow, N)
        strides = (C // g.group * sc, sc, g.dh * sy, g.dw * sx, g.sh * sy, g.sw * sx, sn)
    else:
        sn, sc, sy, sx = img.strides
        N, C = img.shape[:2]
        shape = (N, g.group, C // g.group, g.kh, g.kw, g.oh, g.ow)
        strides = (sn, C // g.group * sc, sc, g.dh * sy, g.dw * sx, g.sh * sy, g.sw * sx)
    return xp.lib.stride_tricks.as_strided(img, shape, strides)


def _im2col(xp, x, g: ConvGeom, ones: bool = False):
    """Grouped columns of x, with a row of ones per group when `ones`."""
    N, C = x.shape[:2]
    k = C // g.group * g.kh * g.kw
    if g.layout == "gemm":
        cols = xp.empty((g.group, k + ones, g.oh * g.ow * N), x.dtype)
    else:
        cols = xp.empty((N, g.group, k + ones, g.oh * g.ow), x.dtype)
    if ones:
        cols[..., k, :] = 1
    windows = _windows(xp, _image(xp, x, g), g)
    cols[..., :k, :].reshape(windows.shape)[...] = windows    # splits axes only: a view
    return cols


def _col2im(xp, dcols, x_shape, g: ConvGeom):
    """Image gradient (N, C, H, W) from column gradients whose rows are ordered (i, j, c), not
    im2col's (c, i, j): then each kernel offset's block is contiguous, which makes this loop of
    strided adds markedly faster. gemm (g, kh*kw*C/g, P); batched (N, g, kh*kw*C/g, OH*OW)."""
    N, C = x_shape[:2]
    G, hp, wp = g.group, g.h + 2 * g.ph, g.w + 2 * g.pw
    if g.layout == "gemm":
        d = dcols.reshape(G, g.kh, g.kw, C // G, g.oh, g.ow, N)
        img = xp.zeros((G, C // G, hp, wp, N), dcols.dtype)
        lead = (slice(None),) * 2
    else:
        d = dcols.reshape(N, G, g.kh, g.kw, C // G, g.oh, g.ow)
        img = xp.zeros((N, G, C // G, hp, wp), dcols.dtype)
        lead = (slice(None),) * 3
    for i in range(g.kh):
        for j in range(g.kw):
            rows, cs = _span(i * g.dh, g.oh, g.sh), _span(j * g.dw, g.ow, g.sw)
            img[lead + (rows, cs)] += d[lead[:-1] + (i, j)]
    if g.layout == "gemm":
        return _batch_first(xp, img.reshape(C, hp, wp, N)[:, g.ph:g.ph + g.h, g.pw:g.pw + g.w])
    return xp.ascontiguousarray(img.reshape(N, C, hp, wp)[:, :, g.ph:g.ph + g.h, g.pw:g.pw + g.w])


# ---------------------------------------------------------------------------------------------
# The three GEMMs of a convolution, in either layout. "Rows" are the output-channel side, laid
# out to multiply the columns: gemm (g, M/g, OH*OW*N), batched (N, g, M/g, OH*OW).

def _grouped_weights(xp, W, b, group: int):
    """(M, C/g, kh, kw) and bias (M,) or None -> (g, M/g, C/g*kh*kw [+1])."""
    Wg = W.reshape(group, W.shape[0] // group, -1)
    if b is None:
        return Wg
    return xp.concatenate([Wg, b.reshape(group, -1, 1).astype(W.dtype)], axis=2)


def _rows(xp, a, g: ConvGeom):
    """An NCHW array on the output side -> rows (a contiguous copy for gemm, a view for batched)."""
    N, M = a.shape[:2]
    if g.layout == "gemm":
        t = xp.ascontiguousarray(a.reshape(N, M * g.oh * g.ow).T)
        return t.reshape(g.group, M // g.group, g.oh * g.ow * N)
    return a.reshape(N, g.group, M // g.group, g.oh * g.ow)


def _rows_to_nchw(xp, r, N: int, g: ConvGeom):
    """Inverse of _rows: a GEMM result -> contiguous (N, M, OH, OW)."""
    if g.layout == "gemm":
        return _batch_first(xp, r.reshape(-1, g.oh, g.ow, N))
    return r.reshape(N, -1, g.oh, g.ow)


def _apply(xp, W, b, cols, N: int, g: ConvGeom):
    """W * cols (+ b when cols carry the ones row) as one (batched) matmul -> NCHW."""
    return _rows_to_nchw(xp, xp.matmul(_grouped_weights(xp, W, b, g.group), cols), N, g)


def _apply_transposed(xp, W, rows, g: ConvGeom):
    """W^T * rows: the column gradients, rows ordered (i, j, c) for _col2im."""
    M, Cg, kh, kw = W.shape
    Wt = W.reshape(g.group, M // g.group, Cg, kh, kw).transpose(0, 3, 4, 2, 1)
    return xp.matmul(Wt.reshape(g.group, kh * kw * Cg, M // g.group), rows)


def _weight_grad(xp, rows, cols, W_shape, g: ConvGeom):
    """rows * cols^T summed over batch and pixels -> (dW, db or None if cols lack the ones row)."""
    k = W_shape[1] * W_shape[2] * W_shape[3]
    if g.layout == "gemm":
        # cols @ rows^T runs faster in OpenBLAS than rows @ cols^T for these skinny shapes.
        grad = xp.matmul(cols, rows.swapaxes(-1, -2)).swapaxes(-1, -2)
    else:
        grad = xp.matmul(rows, cols.swapaxes(-1, -2)).sum(axis=0)
    db = grad[..., k].reshape(-1) if grad.shape[-1] > k else None
    return xp.ascontiguousarray(grad[..., :k]).reshape(W_shape), db


# ---------------------------------------------------------------------------------------------
# Convolution

class ConvCache(NamedTuple):
    cols: Any                  # grouped im2col(x) in geom.layout, with the ones row if bias
    geom: ConvGeom
    x_shape: tuple


def conv2d_forward(xp, x, W, b=None, stride=1, pad=0, dilation=1, group=1):
    """Caffe Convolution. x (N, C, H, W), W (M, C/group, kh, kw), b (M,) or None."""
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(pad), _pair(dilation)
    g = conv_geom(x.shape[2], x.shape[3], W.shape[2], W.shape[3], sh, sw, ph, pw, dh, dw, group)
    cols = _im2col(xp, x, g, ones=b is not None)
    return _apply(xp, W, b, cols, x.shape[0], g), ConvCache(cols, g, tuple(x.shape))


def conv2d_backward(xp, dy, cache: ConvCache, W, need_dx: bool = True):
    """-> (dx or None, dW, db or None: None when forward had no bias)."""
    g = cache.geom
    rows = _rows(xp, dy, g)
    dW, db = _weight_grad(xp, rows, cache.cols, W.shape, g)
    dx = _col2im(xp, _apply_transposed(xp, W, rows, g), cache.x_shape, g) if need_dx else None
    return dx, dW, db


# ---------------------------------------------------------------------------------------------
# Deconvolution: the forward pass is a convolution's data gradient, the backward pass its forward.
# Its input x plays the convolution's output side, its output y the convolution's image side.

class DeconvCache(NamedTuple):
    x: Any
    geom: ConvGeom             # of the equivalent convolution (image = y, columns = x)
    bias: bool


def deconv2d_forward(xp, x, W, b=None, stride=1, pad=0, dilation=1, group=1):
    """Caffe Deconvolution. x (N, C, H, W), W (C, M/group, kh, kw), b (M,) or None."""
    (sh, sw), (ph, pw), (dh, dw) = _pair(stride), _pair(pad), _pair(dilation)
    N, H, Wd = x.shape[0], x.shape[2], x.shape[3]
    kh, kw = W.shape[2:]
    oh, ow = deconv_out_size(H, kh, sh, ph, dh), deconv_out_size(Wd, kw, sw, pw, dw)
    g = conv_geom(oh, ow, kh, kw, sh, sw, ph, pw, dh, dw, group)
    M = W.shape[1] * group
    dcols = _apply_transposed(xp, W, _rows(xp, x, g), g)
    y = _col2im(xp, dcols, (N, M, oh, ow), g)
    if b is not None:
        y += b.reshape(1, -1, 1, 1)
    return y, DeconvCache(x, g, b is not None)


def deconv2d_backward(xp, dy, cache: DeconvCache, W, need_dx: bool = True):
    """-> (dx or None, dW, db or None) for deconv2d_forward's cache."""
    g = cache.geom
    cols = _im2col(xp, dy, g)
    dW, _ = _weight_grad(xp, _rows(xp, cache.x, g), cols, W.shape, g)
    db = dy.sum(axis=(0, 2, 3)) if cache.bias else None
    dx = _apply(xp, W, None, cols, dy.shape[0], g) if need_dx else None
    return dx, dW, db


# ---------------------------------------------------------------------------------------------
# Pooling

class PoolGeom(NamedTuple):
    kh: int
    kw: int
    sh: int
    sw: int
    ph: int
    pw: int
    h: int
    w: int
    oh: int
    ow: int


class PoolCache(NamedTuple):
    mode: str                  # "max" | "ave"
    path: str                  # "pairs" (2x2 stride 2), "global" or "windows"
    geom: PoolGeom
    x_shape: tuple
    dtype: Any
    route: Any                 # max: where each top's gradient goes (see the path's forward)


def pool2d_forward(xp, x, mode, kh=1, kw=1, sh=1, sw=1, ph=0, pw=0, ceil=True, global_=False):
    """Caffe Pooling, MAX or AVE. Global pooling covers the whole image (stride 1, no pad)."""
    H, W = x.shape[2:]
    if global_:
        kh, kw, sh, sw, ph, pw = H, W, 1, 1, 0, 0
    g = PoolGeom(kh, kw, sh, sw, ph, pw, H, W,
                 pool_out_size(H, kh, sh, ph, ceil, ph or pw), pool_out_size(W, kw, sw, pw, ceil, ph or pw))
    if g.oh == 1 and g.ow == 1 and (kh, kw, ph, pw) == (H, W, 0, 0):
        path = "global"
    elif (kh, kw, sh, sw, ph, pw) == (2, 2, 2, 2, 0, 0) and H % 2 == 0 and W % 2 == 0:
        path = "pairs"
    else:
        path = "windows"
    y, route = _POOL_FORWARD[mode, path](xp, x, g)
    return y, PoolCache(mode, path, g, tuple(x.shape), x.dtype, route)


def pool2d_backward(xp, dy, cache: PoolCache):
    """-> dx for pool2d_forward's cache."""
    return _POOL_BACKWARD[cache.mode, cache.path](xp, dy, cache)


def pool2d_mask(xp, cache: PoolCache):
    """Caffe's optional MAX mask top: each max's flat index h*W + w in its input plane."""
    if cache.mode != "max":
        raise ValueError("only MAX pooling has a mask")
    g = cache.geom
    k = cache.route                              # the max's offset inside its window
    if cache.path == "pairs":
        N, C = cache.x_shape[:2]
        windows = cache.route.reshape(N, C, g.oh, 2, g.ow, 2).transpose(0, 1, 2, 4, 3, 5)
        k = windows.reshape(N, C, g.oh, g.ow, 4).argmax(axis=-1)
    elif cache.path == "global":
        k = k[:, :, None, None]
    h = xp.arange(g.oh)[:, None] * g.sh - g.ph + k // g.kw
    w = xp.arange(g.ow)[None, :] * g.sw - g.pw + k % g.kw
    return (h * g.w + w).astype(cache.dtype)


# 2x2 stride 2 without padding: a reshape puts each window's two rows side by side.

def _repeat_pairs(xp, a):
    """(..., n) float32 -> (..., 2n) with every value twice; one pass via 64-bit words."""
    if a.dtype == xp.float32:
        words = xp.ascontiguousarray(a).view(xp.uint32).astype(xp.uint64)
        return (words * xp.uint64(0x100000001)).view(xp.float32)
    return xp.repeat(a, 2, axis=-1)


def _first_of_pairs(xp, hit):
    """Keep only the first True of each 2x2 window of hit (..., 2, W): row-major order."""
    words = hit.view(xp.uint16)                  # one word per horizontal pair, low byte first
    first = words & ~(words << xp.uint16(8))     # drop the right one when the left one is set
    first[..., 1, :] *= first[..., 0, :] == 0    # drop the bottom row when the top row has one
    return first.view(xp.bool_)


def _max_pairs(xp, x, g):
    N, C = x.shape[:2]
    rows = x.reshape(N, C, g.oh, 2, g.w)
    v = xp.fmax(rows[:, :, :, 0], rows[:, :, :, 1])          # fmax skips NaN like Caffe's '>'
    y = xp.fmax(v[..., 0::2], v[..., 1::2])
    hit = rows == _repeat_pairs(xp, y)[:, :, :, None, :]
    if int(xp.count_nonzero(hit)) != y.size:                 # ties: Caffe takes the first max
        hit = _first_of_pairs(xp, hit)
    return y, hit


def _upsample2(xp, a):
    """(N, C, h, w) -> (N, C, 2h, 2w), every value copied into its 2x2 window."""
    return xp.repeat(_repeat_pairs(xp, a), 2, axis=2)


def _max_pairs_backward(xp, dy, cache):
    dx = _upsample2(xp, dy)
    dx *= cache.route.reshape(cache.x_shape)
    return dx


def _ave_pairs(xp, x, g):
    N, C = x.shape[:2]
    rows = x.reshape(N, C, g.oh, 2, g.w)
    v = rows[:, :, :, 0] + rows[:, :, :, 1]
    y = v[..., 0::2] + v[..., 1::2]
    y *= 0.25
    return y, None


def _ave_pairs_backward(xp, dy, cache):
    return _upsample2(xp, dy * 0.25)


# Global pooling: one window over the whole image.

def _max_global(xp, x, g):
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    arg = flat.argmax(axis=-1)                   # first max in row-major order, as Caffe
    return flat.max(axis=-1)[:, :, None, None], arg


def _max_global_backward(xp, dy, cache):
    N, C, H, W = cache.x_shape
    onehot = xp.arange(H * W) == cache.route[:, :, None]
    return (onehot * dy.reshape(N, C, 1)).astype(dy.dtype).reshape(cache.x_shape)


def _ave_global(xp, x, g):
    return x.mean(axis=(2, 3), keepdims=True), None


def _ave_global_backward(xp, dy, cache):
    H, W = cache.x_shape[2:]
    return xp.broadcast_to(dy / (H * W), cache.x_shape).copy()


# Any window: loop over the kernel offsets, each a strided slice of the padded input.

def _pool_offsets(g: PoolGeom):
    for i in range(g.kh):
        for j in range(g.kw):
            yield i * g.kw + j, _span(i, g.oh, g.sh), _span(j, g.ow, g.sw)


def _pool_padded_shape(x_shape, g: PoolGeom) -> tuple:
    """x's shape with its pad, extended to cover ceil-mode windows that hang over the end."""
    N, C, H, W = x_shape
    return (N, C, max((g.oh - 1) * g.sh + g.kh, H + g.ph), max((g.ow - 1) * g.sw + g.kw, W + g.pw))


def _pool_padded(xp, x, g: PoolGeom, fill):
    shape = _pool_padded_shape(x.shape, g)
    if shape == x.shape:
        return x
    out = xp.full(shape, fill, x.dtype)
    out[:, :, g.ph:g.ph + g.h, g.pw:g.pw + g.w] = x
    return out


def _unpadded(xp, dxp, g: PoolGeom):
    return xp.ascontiguousarray(dxp[:, :, g.ph:g.ph + g.h, g.pw:g.pw + g.w])


def _max_windows(xp, x, g):
    src = _pool_padded(xp, x, g, -xp.inf)       # pad cells never win: they are -inf
    shape = x.shape[:2] + (g.oh, g.ow)
    y = xp.full(shape, -xp.inf, x.dtype)
    arg = xp.zeros(shape, xp.uint8 if g.kh * g.kw <= 256 else xp.int32)
    better = xp.empty(shape, xp.bool_)
    for k, rows, cols in _pool_offsets(g):
        v = src[:, :, rows, cols]
        xp.greater(v, y, out=better)          # strict: the first max in row-major order wins
        xp.fmax(y, v, out=y)
        xp.copyto(arg, k, where=better, casting="unsafe")
    return y, arg


def _max_windows_backward(xp, dy, cache):
    g = cache.geom
    dxp = xp.zeros(_pool_padded_shape(cache.x_shape, g), dy.dtype)
    for k, rows, cols in _pool_offsets(g):
        dxp[:, :, rows, cols] += dy * (cache.route == k)
    return _unpadded(xp, dxp, g)


def _ave_divisor(xp, g: PoolGeom, dtype):
    """Caffe's pool_size: counts pad cells, but clips the window at the input's end plus pad."""
    def sizes(out, s, p, k, n):
        start = xp.arange(out) * s - p
        return xp.minimum(start + k, n + p) - start
    hs = sizes(g.oh, g.sh, g.ph, g.kh, g.h)
    ws = sizes(g.ow, g.sw, g.pw, g.kw, g.w)
    return (hs[:, None] * ws[None, :]).astype(dtype)


def _ave_windows(xp, x, g):
    src = _pool_padded(xp, x, g, 0)
    y = xp.zeros(x.shape[:2] + (g.oh, g.ow), x.dtype)
    for _, rows, cols in _pool_offsets(g):
        y += src[:, :, rows, cols]
    y /= _ave_divisor(xp, g, x.dtype)
    return y, None


def _ave_windows_backward(xp, dy, cache):
    g = cache.geom
    share = dy / _ave_divisor(xp, g, dy.dtype)
    dxp = xp.zeros(_pool_padded_shape(cache.x_shape, g), dy.dtype)
    for _, rows, cols in _pool_offsets(g):
        dxp[:, :, rows, cols] += share
    return _unpadded(xp, dxp, g)


_POOL_FORWARD = {
    ("max", "pairs"): _max_pairs, ("ave", "pairs"): _ave_pairs,
    ("max", "global"): _max_global, ("ave", "global"): _ave_global,
    ("max", "windows"): _max_windows, ("ave", "windows"): _ave_windows,
}
_POOL_BACKWARD = {
    ("max", "pairs"): _max_pairs_backward, ("ave", "pairs"): _ave_pairs_backward,
    ("max", "global"): _max_global_backward, ("ave", "global"): _ave_global_backward,
    ("max", "windows"): _max_windows_backward, ("ave", "windows"): _ave_windows_backward,
}


# ---------------------------------------------------------------------------------------------
# Local response normalisation

class LRNCache(NamedTuple):
    x: Any
    y: Any
    scale: Any                 # the base that is raised to -beta
    region: str
    size: int
    alpha: float
    beta: float
    pool: Any                  # WITHIN_CHANNEL: the average pooling's cache


def _channel_window_sum(xp, a, n: int):
    """Sum over a window of n channels centred on each channel, zero beyond the ends."""
    N, C, H, W = a.shape
    half = (n - 1) // 2
    padded = xp.zeros((N, C + n - 1, H, W), a.dtype)
    padded[:, half:half + C] = a
    out = padded[:, 0:C].copy()
    for c in range(1, n):
        out += padded[:, c:c + C]
    return out


def lrn_forward(xp, x, size=5, alpha=1.0, beta=0.75, k=1.0, region="ACROSS_CHANNELS"):
    """Caffe LRN. ACROSS: x*(k + alpha/n*sum x^2)^-beta; WITHIN: x*(1 + alpha*avgpool(x^2))^-beta."""
    if region == "ACROSS_CHANNELS":
        scale = _channel_window_sum(xp, x * x, size)
        scale *= alpha / size
        scale += k
        pool = None
    else:
        # Caffe builds this from layers: Power(x^2), AVE Pooling (pad (n-1)/2), Power(1+alpha*s).
        half = (size - 1) // 2
        avg, pool = pool2d_forward(xp, x * x, "ave", size, size, 1, 1, half, half)
        scale = avg * alpha
        scale += 1
    y = x * scale ** -beta
    return y, LRNCache(x, y, scale, region, size, alpha, beta, pool)


def lrn_backward(xp, dy, cache: LRNCache):
    """-> dx. With s the scale: dx = dy*s^-beta - 2*alpha*beta*x * window^T(dy*y/s) [/n across]."""
    c = cache
    t = dy * c.y / c.scale
    if c.region == "ACROSS_CHANNELS":
        spread = _channel_window_sum(xp, t, c.size)       # the window is symmetric
        coeff = 2 * c.alpha * c.beta / c.size
    else:
        spread = pool2d_backward(xp, t, c.pool)
        coeff = 2 * c.alpha * c.beta
    return dy * c.scale ** -c.beta - coeff * c.x * spread


# ---------------------------------------------------------------------------------------------
# Softmax

def softmax(xp, x, axis=1):
    """Numerically stable softmax: shifting by the max keeps exp from overflowing."""
    e = xp.exp(x - x.max(axis=axis, keepdims=True))
    e /= e.sum(axis=axis, keepdims=True)
    return e


def log_softmax(xp, x, axis=1):
    z = x - x.max(axis=axis, keepdims=True)
    return z - xp.log(xp.exp(z).sum(axis=axis, keepdims=True))
