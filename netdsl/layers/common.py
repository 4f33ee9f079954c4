"""Layers: Caffe's remaining common layers (Bias, Embed, Tile, Reduction, ArgMax, MVN, SPP, Filter,
BatchReindex, Parameter, Im2col)."""
from __future__ import annotations

import math

from .. import kernels
from ..errors import NetdslError
from ..registry import BLOB_SHAPE, FILLER, F, Layer, Msg, ShapeError, canonical_axis, count, fmt, register, spatial
from .conv import CONV


def _positive(layer, name: str, v, example: int) -> list[ShapeError]:
    """A count Caffe CHECKs to be > 0 and gives no default (absent reads as 0)."""
    if v is None:
        return [ShapeError("E0106", f"{layer.type} '{layer.name}' has no `{name}`", field=None,
                           help=f"add `{name}: {example}`")]
    if v <= 0:
        return [ShapeError("E0107", f"{layer.type} '{layer.name}': `{name}` must be positive, got {v}",
                           field=name, help=f"set `{name}` to 1 or more")]
    return []


def _indices(xp, v, n: int, layer, what: str, integral: bool):
    """The int indices a float bottom holds; Caffe CHECKs 0 <= i < n (a bad one would read out of
    bounds), and for Embed only in debug builds that each is whole: netdsl always checks."""
    flat = v.reshape(-1)
    bad = (flat < 0) | (flat >= n) | (flat != flat)
    if integral:
        bad |= flat != xp.floor(flat)
    if bool(bad.any()):
        first = float(flat[int(xp.argmax(bad.astype(xp.int8)))])
        raise NetdslError("E0621", f"{layer.type} '{layer.name}': {what} holds {first:g}, not "
                          f"{'an integer ' if integral else 'a value '}in [0, {n})",
                          help=f"feed {what} with {'whole numbers' if integral else 'values'} from 0 to {n - 1}")
    return flat.astype(xp.int64)      # truncation, as Caffe's static_cast<int>


def _scatter_rows(xp, idx, rows, n: int):
    """out[idx[m]] += rows[m] for repeated idx (no np.add.at: bincount exists in NumPy and CuPy).
    bincount sums in float64, then the result returns to rows' dtype."""
    w = math.prod(rows.shape[1:])
    flat = (idx[:, None] * w + xp.arange(w)[None, :]).reshape(-1)
    out = xp.bincount(flat, weights=rows.reshape(-1), minlength=n * w)
    return out.reshape((n,) + tuple(rows.shape[1:])).astype(rows.dtype, copy=False)


# ---------------------------------------------------------------------------------------------
# Bias

@register
class Bias(Layer):
    """y = x + b, b broadcast over x.shape[axis:axis+len(b)]; b a param or a 2nd bottom."""
    type = "Bias"
    in_place = True
    keeps_layout = True
    n_bottoms = (1, 2)
    bottom_roles = ("the input", "the bias")
    messages = {"bias_param": Msg("BiasParameter", {"axis": F(int, 1), "num_axes": F(int, 1), "filler": F(FILLER)})}

    def validate(self):
        if self.p.num_axes < -1:
            return [ShapeError("E0107", f"Bias '{self.name}': `num_axes` must be >= -1, got {self.p.num_axes}",
                               field="num_axes", help="use -1 (to the last axis), 0 (a scalar) or a count of axes")]
        return []

    def _span(self, x, nb: int | None):
        """(first axis, number of axes) the bias covers; nb: the 2nd bottom's rank, else None."""
        if nb == 0:
            return 0, 0          # Caffe: a scalar bias applies from axis 0, whatever `axis` says
        ax = canonical_axis(self.p.axis, len(x))
        n = nb if nb is not None else (len(x) - ax if self.p.num_axes == -1 else self.p.num_axes)
        if ax + n > len(x):
            raise ShapeError("E0220", f"Bias '{self.name}': axis {ax} + {n} bias axes exceed the input's "
                             f"{len(x)} axes", field="num_axes" if nb is None else "axis", involves=(0,),
                             help="reduce num_axes" if nb is None else "use a smaller axis or a lower-rank bias")
        return ax, n

    def shape(self, bottoms):
        x = bottoms[0]
        if len(bottoms) == 2:
            b = bottoms[1]
            ax, n = self._span(x, len(b))
            if any(p is not None and q is not None and p != q for p, q in zip(x[ax:ax + n], b)):
                raise ShapeError("E0322", f"Bias '{self.name}': the bias {fmt(b)} does not match the input "
                                 f"{fmt(x)} from axis {ax}", involves=(0, 1),
                                 help=f"give a bias of shape {fmt(x[ax:ax + n])}")
        else:
            self._span(x, None)
        return [x]

    def param_shapes(self, bottoms):
        if len(bottoms) == 2:
            return []
        x = bottoms[0]
        ax, n = self._span(x, None)
        return [tuple(x[ax:ax + n])]

    def fillers(self):
        return [] if len(self.spec.bottoms) == 2 else [self.p.filler]

    def _dims(self, x, b):
        ax, n = self._span(x.shape, b.ndim)
        return math.prod(x.shape[:ax]), b.size, math.prod(x.shape[ax + n:])

    def forward(self, xp, bottoms, params):
        x = bottoms[0]
        b = bottoms[1] if len(bottoms) == 2 else params[0]
        outer, nb, inner = self._dims(x, b)
        y = (x.reshape(outer, nb, inner) + b.reshape(1, nb, 1)).reshape(x.shape)
        return [y], (x.shape, b.shape, (outer, nb, inner))

    def backward(self, xp, saved, dtops, params, need):
        x_shape, b_shape, dims = saved
        dy = dtops[0]
        db = dy.reshape(dims).sum(axis=(0, 2)).reshape(b_shape)
        if len(self.spec.bottoms) == 2:
            return [dy, db], []
        return [dy], [db]

    def to_onnx(self, ex, step):
        x = ex.in_shape(step)
        if len(step.node.bottoms) == 2:
            ax, _ = self._span(x, len(ex.in_shape(step, 1)))
            b = ex.along(ex.bottoms(step)[1], ax, len(x), len(ex.in_shape(step, 1)))
        else:
            b = ex.along(ex.params(step)[0], self._span(x, None)[0], len(x))
        ex.add_node("Add", [ex.bottoms(step)[0], b], ex.tops(step))


# ---------------------------------------------------------------------------------------------
# Embed

@register
class Embed(Layer):
    """A lookup table: each index i in the bottom becomes row i of W (input_dim x num_output), plus b."""
    type = "Embed"
    bottom_roles = ("the indices",)
    messages = {"embed_param": Msg("EmbedParameter", {
        "num_output": F(int, None, doc="the embedding size", example="64"),
        "input_dim": F(int, None, doc="the vocabulary size: indices lie in [0, input_dim)", example="1000"),
        "bias_term": F(bool, True), "weight_filler": F(FILLER), "bias_filler": F(FILLER)})}

    def validate(self):
        return _positive(self, "num_output", self.p.num_output, 64) + _positive(self, "input_dim", self.p.input_dim, 1000)

    def shape(self, bottoms):
        return [tuple(bottoms[0]) + (self.p.num_output,)]

    def param_shapes(self, bottoms):
        n = self.p.num_output
        return [(self.p.input_dim, n)] + ([(n,)] if self.p.bias_term else [])

    def fillers(self):
        return [self.p.weight_filler] + ([self.p.bias_filler] if self.p.bias_term else [])

    def forward(self, xp, bottoms, params):
        x = bottoms[0]
        idx = _indices(xp, x, self.p.input_dim, self, "the indices", integral=True)
        y = params[0][idx]
        if self.p.bias_term:
            y = y + params[1]
        return [y.reshape(tuple(x.shape) + (self.p.num_output,))], idx

    def backward(self, xp, idx, dtops, params, need):
        # Caffe refuses to propagate to the indices; netdsl gives them no gradient
        rows = dtops[0].reshape(idx.shape[0], self.p.num_output)
        dw = _scatter_rows(xp, idx, rows, self.p.input_dim)
        return [None], [dw] + ([rows.sum(axis=0)] if self.p.bias_term else [])


# ---------------------------------------------------------------------------------------------
# Tile, Reduction, ArgMax

@register
class Tile(Layer):
    """Repeats the block x.shape[axis:] `tiles` times (numpy.tile along axis)."""
    type = "Tile"
    messages = {"tile_param": Msg("TileParameter", {"axis": F(int, 1),
                                                    "tiles": F(int, None, doc="the number of copies", example="2")})}

    def validate(self):
        return _positive(self, "tiles", self.p.tiles, 2)

    def shape(self, bottoms):
        x = bottoms[0]
        ax = canonical_axis(self.p.axis, len(x))
        return [x[:ax] + (None if x[ax] is None else x[ax] * self.p.tiles,) + x[ax + 1:]]

    def _dims(self, shape):
        ax = self.p.axis % len(shape)
        return math.prod(shape[:ax]), math.prod(shape[ax:])

    def forward(self, xp, bottoms, params):
        x = bottoms[0]
        outer, inner = self._dims(x.shape)
        y = xp.broadcast_to(x.reshape(outer, 1, inner), (outer, self.p.tiles, inner))
        shape = list(x.shape)
        shape[self.p.axis % x.ndim] *= self.p.tiles
        return [xp.ascontiguousarray(y).reshape(shape)], x.shape

    def backward(self, xp, x_shape, dtops, params, need):
        outer, inner = self._dims(x_shape)
        return [dtops[0].reshape(outer, self.p.tiles, inner).sum(axis=1).reshape(x_shape)], []

    def to_onnx(self, ex, step):
        nd = len(ex.in_shape(step))
        reps = [self.p.tiles if i == self.p.axis % nd else 1 for i in range(nd)]
        ex.add_node("Tile", ex.bottoms(step) + [ex.ints(reps)], ex.tops(step))


@register
class Reduction(Layer):
    """Reduces all axes from `axis` on: SUM, ASUM (sum |x|), SUMSQ or MEAN, times coeff."""
    type = "Reduction"
    messages = {"reduction_param": Msg("ReductionParameter", {
        "operation": F("enum", "SUM", choices=("SUM", "ASUM", "SUMSQ", "MEAN")),
        "axis": F(int, 0), "coeff": F(float, 1.0)})}

    def shape(self, bottoms):
        x = bottoms[0]
        return [tuple(x[:canonical_axis(self.p.axis, len(x))])]

    def _coeff(self, dim: int) -> float:
        return self.p.coeff / dim if self.p.operation == "MEAN" else self.p.coeff

    def forward(self, xp, bottoms, params):
        x = bottoms[0]
        ax = self.p.axis % x.ndim
        num, dim = math.prod(x.shape[:ax]), math.prod(x.shape[ax:])
        xr = x.reshape(num, dim)
        op = self.p.operation
        y = (xp.abs(xr) if op == "ASUM" else xr * xr if op == "SUMSQ" else xr).sum(axis=1)
        c = self._coeff(dim)
        if c != 1:
            y *= c
        return [y.reshape(x.shape[:ax])], (x if op in ("ASUM", "SUMSQ") else None, x.shape, num, dim)

    def backward(self, xp, saved, dtops, params, need):
        x, shape, num, dim = saved
        g = dtops[0].reshape(num, 1) * self._coeff(dim)
        op = self.p.operation
        if op == "ASUM":
            dx = xp.sign(x.reshape(num, dim)) * g            # sign(0) = 0, as caffe_cpu_sign
        elif op == "SUMSQ":
            dx = x.reshape(num, dim) * (2 * g)
        else:
            dx = xp.broadcast_to(g, (num, dim))
        return [xp.ascontiguousarray(dx).reshape(shape)], []


@register
class ArgMax(Layer):
    """The top_k indices (or values) along `axis`, or over each sample's flattened dims."""
    type = "ArgMax"
    v1 = (30, "ARGMAX")
    no_backward = True
    messages = {"argmax_param": Msg("ArgMaxParameter", {
        "out_max_val": F(bool, False), "top_k": F(int, 1), "axis": F(int, None)})}

    def validate(self):
        if self.p.top_k < 1:
            return [ShapeError("E0107", f"ArgMax '{self.name}': `top_k` must be at least 1, got {self.p.top_k}",
                               field="top_k", help="set `top_k: 1` or more")]
        return []

    def shape(self, bottoms):
        x, k = bottoms[0], self.p.top_k
        if self.p.axis is not None:
            ax = canonical_axis(self.p.axis, len(x))
            dim, what = x[ax], f"axis {ax}"
        else:
            dim, what = count(x, 1), "each sample's flattened dims"
        if dim is not None and k > dim:
            raise ShapeError("E0361", f"ArgMax '{self.name}': top_k {k} exceeds the {dim} values of {what} "
                             f"({fmt(x)})", field="top_k", involves=(0,), help=f"use `top_k: {dim}` or less")
        if self.p.axis is not None:
            return [x[:ax] + (k,) + x[ax + 1:]]
        # Caffe: at least 3 axes, (N, 1 or 2 with out_max_val, top_k, 1, ...)
        top = [1] * max(len(x), 3)
        top[0], top[1], top[2] = x[0], 2 if self.p.out_max_val else 1, k
        return [tuple(top)]

    def _top_k(self, xp, a):
        """Indices of the k largest along the last axis; equal values go to the larger index first
        (Caffe's partial_sort of (value, index) pairs with std::greater)."""
        n = a.shape[-1]
        order = xp.argsort(-a[..., ::-1], axis=-1, kind="stable")[..., :self.p.top_k]
        idx = (n - 1) - order
        return idx, xp.take_along_axis(a, idx, axis=-1)

    def forward(self, xp, bottoms, params):
        x = bottoms[0]
        (top,) = self.shape([tuple(x.shape)])
        if self.p.axis is not None:
            ax = self.p.axis % x.ndim
            idx, val = self._top_k(xp, xp.moveaxis(x, ax, -1))
            y = xp.moveaxis(val if self.p.out_max_val else idx.astype(x.dtype), -1, ax)
        else:
            idx, val = self._top_k(xp, x.reshape(x.shape[0], -1))
            y = idx.astype(x.dtype)
            if self.p.out_max_val:      # per sample: the k indices, then the k values
                y = xp.concatenate([y, val], axis=1)
        return [xp.ascontiguousarray(y).reshape(top)], None


# ---------------------------------------------------------------------------------------------
# MVN

@register
class MVN(Layer):
    """Mean-variance normalisation per (sample, channel), or per sample with across_channels:
    y = (x - mean) / (std + eps), std the biased standard deviation (eps added to it, not to var)."""
    type = "MVN"
    v1 = (34, "MVN")
    messages = {"mvn_param": Msg("MVNParameter", {
        "normalize_variance": F(bool, True), "across_channels": F(bool, False), "eps": F(float, 1e-9)})}

    def shape(self, bottoms):
        x = bottoms[0]
        if not 1 <= len(x) <= 4:
            raise ShapeError("E0221", f"MVN '{self.name}' reads its input as N x C x H x W (at most 4-D), got "
                             f"{len(x)}-D {fmt(x)}", involves=(0,), help="reshape the input to 4-D first")
        # Caffe reshapes the top to (num, channels, height, width): a 2-D input gives N x C x 1 x 1
        return [tuple(x) + (1,) * (4 - len(x))]

    def _rows(self, x):
        n, c = x.shape[0], (x.shape[1] if x.ndim > 1 else 1)
        num = n if self.p.across_channels else n * c
        return x.reshape(num, -1)

    def forward(self, xp, bottoms, params):
        x = bottoms[0]
        xr = self._rows(x)
        d = xr - xr.mean(axis=1, keepdims=True)
        top = tuple(x.shape) + (1,) * (4 - x.ndim)
        if not self.p.normalize_variance:
            return [d.reshape(top)], x.shape
        sd = xp.sqrt((d * d).mean(axis=1, keepdims=True)) + self.p.eps
        y = d / sd
        return [y.reshape(top)], (x.shape, y, sd)

    def backward(self, xp, saved, dtops, params, need):
        if not self.p.normalize_variance:
            x_shape = saved
            g = self._rows(dtops[0].reshape(x_shape))
            return [(g - g.mean(axis=1, keepdims=True)).reshape(x_shape)], []
        x_shape, y, sd = saved
        g = self._rows(dtops[0].reshape(x_shape))
        # Caffe's formula: (dy - mean(dy) - y mean(y dy)) / (std + eps); exact when eps = 0
        dim = g.shape[1]
        t = y * (y * g).sum(axis=1, keepdims=True) + g.sum(axis=1, keepdims=True)
        return [((g - t / dim) / sd).reshape(x_shape)], []


# ---------------------------------------------------------------------------------------------
# SPP

@register
class SPP(Layer):
    """Spatial pyramid pooling: level l pools the map into 2^l x 2^l bins with Caffe's Pooling
    (kernel ceil(in / bins), stride = kernel, pad ceil(remainder / 2)); the levels are flattened
    and concatenated. With pyramid_height 1 the single level is not flattened (N x C x 1 x 1)."""
    type = "SPP"
    sets_size = True
    messages = {"spp_param": Msg("SPPParameter", {
        "pyramid_height": F(int, None, doc="the number of pyramid levels", example="3"),
        "pool": F("enum", "MAX", choices=("MAX", "AVE", "STOCHASTIC")),
        "engine": F("enum", "DEFAULT", choices=("DEFAULT", "CAFFE", "CUDNN"))})}

    def validate(self):
        errs = _positive(self, "pyramid_height", self.p.pyramid_height, 3)
        if self.p.pool == "STOCHASTIC":
            errs.append(ShapeError("E0109", f"SPP '{self.name}': STOCHASTIC pooling is not supported", field="pool",
                                   help="use `pool: MAX` or `pool: AVE`"))
        return errs

    @staticmethod
    def level(n: int, bins: int) -> tuple[int, int]:
        """(kernel, pad) on one axis of size n for `bins` bins (Caffe's GetPoolingParam)."""
        k = -(-n // bins)
        return k, (k * bins - n + 1) // 2

    def _levels(self, h, w):
        """Per level: (kh, kw, ph, pw, oh, ow); None sizes where the input's are unknown."""
        out = []
        for lv in range(self.p.pyramid_height):
            bins = 2 ** lv
            if h is None or w is None:
                out.append((None, None, None, None, bins, bins))
                continue
            (kh, ph), (kw, pw) = self.level(h, bins), self.level(w, bins)
            for axis, n, k, p in (("height", h, kh, ph), ("width", w, kw, pw)):
                if p >= k:
                    raise ShapeError("E0402", f"SPP '{self.name}': level {lv} ({bins} x {bins} bins) over the "
                                     f"{axis} {n} needs pad {p} >= kernel {k}, which Caffe's Pooling rejects",
                                     field="pyramid_height", involves=(0,),
                                     notes=[f"kernel = ceil({n} / {bins}) = {k}, pad = ({k}*{bins} - {n} + 1) / 2 = {p}"],
                                     help=f"use `pyramid_height: {lv}` or less, or a larger input")
            padded = bool(ph or pw)
            out.append((kh, kw, ph, pw, kernels.pool_out_size(h, kh, kh, ph, True, padded),
                        kernels.pool_out_size(w, kw, kw, pw, True, padded)))
        return out

    def shape(self, bottoms):
        x = bottoms[0]
        if len(x) != 4:
            raise ShapeError("E0221", f"SPP '{self.name}' needs a 4-D N x C x H x W input, got {len(x)}-D {fmt(x)}",
                             involves=(0,), help="pool a convolution's output")
        if (x[2] is not None and x[2] <= 0) or (x[3] is not None and x[3] <= 0):
            raise ShapeError("E0401", f"SPP '{self.name}': the input {fmt(x)} is empty", involves=(0,),
                             help="feed a map of at least 1 x 1")
        levels = self._levels(x[2], x[3])
        if len(levels) == 1:
            return [(x[0], x[1], levels[0][4], levels[0][5])]
        per_channel = sum(oh * ow for *_, oh, ow in levels)
        return [(x[0], None if x[1] is None else x[1] * per_channel)]

    def forward(self, xp, bottoms, params):
        x = bottoms[0]
        mode = self.p.pool.lower()
        ys, caches = [], []
        for kh, kw, ph, pw, _, _ in self._levels(*x.shape[2:]):
            y, cache = kernels.pool2d_forward(xp, x, mode, kh, kw, kh, kw, ph, pw, ceil=True)
            ys.append(y)
            caches.append(cache)
        if len(ys) == 1:
            return ys, caches
        return [xp.concatenate([y.reshape(x.shape[0], -1) for y in ys], axis=1)], caches

    def backward(self, xp, caches, dtops, params, need):
        dy = dtops[0]
        if len(caches) == 1:
            return [kernels.pool2d_backward(xp, dy, caches[0])], []
        dx, start = None, 0
        for c in caches:
            n, ch = c.x_shape[:2]
            size = ch * c.geom.oh * c.geom.ow
            part = xp.ascontiguousarray(dy[:, start:start + size]).reshape(n, ch, c.geom.oh, c.geom.ow)
            start += size
            g = kernels.pool2d_backward(xp, part, c)
            dx = g if dx is None else dx + g
        return [dx], []


# ---------------------------------------------------------------------------------------------
# Filter, BatchReindex

@register
class Filter(Layer):
    """Keeps the items (first-axis rows) whose selector is nonzero: bottoms are the blobs to filter
    and then the selector (N, 1, ...); one top per filtered blob, its first dim data-dependent."""
    type = "Filter"
    n_bottoms = (2, None)
    n_tops = (1, None)
    arity_note = "Filter takes the blobs to filter and then the selector"

    def validate(self):
        nb, nt = len(self.spec.bottoms), len(self.spec.tops)
        if nt != nb - 1:
            return [ShapeError("E0202", f"Filter '{self.name}' has {nt} tops for {nb - 1} filtered bottoms",
                               notes=["the last bottom is the selector; every other bottom gets one top"],
                               help=f"give {nb - 1} top{'s' if nb != 2 else ''}")]
        return []

    def shape(self, bottoms):
        sel, last = bottoms[-1], len(bottoms) - 1
        if not sel or any(d is not None and d != 1 for d in sel[1:]):
            raise ShapeError("E0221", f"Filter '{self.name}': the selector {fmt(sel)} must be N or N x 1 x ... x 1",
                             involves=(last,), help="feed one selector value per item")
        for i, b in enumerate(bottoms[:-1]):
            if not b or (b[0] is not None and sel[0] is not None and b[0] != sel[0]):
                raise ShapeError("E0221", f"Filter '{self.name}': '{self.spec.bottoms[i]}' {fmt(b)} and the selector "
                                 f"{fmt(sel)} differ in their first dim", involves=(i, last),
                                 help="filter blobs with one item per selector value")
        return [(None,) + tuple(b[1:]) for b in bottoms[:-1]]

    def forward(self, xp, bottoms, params):
        keep = xp.nonzero(bottoms[-1].reshape(-1))[0]
        return [b[keep] for b in bottoms[:-1]], (keep, [b.shape for b in bottoms[:-1]])

    def backward(self, xp, saved, dtops, params, need):
        keep, shapes = saved
        out = []
        for dy, shape, want in zip(dtops, shapes, need):
            if not want:
                out.append(None)
                continue
            dx = xp.zeros(shape, dy.dtype)
            dx[keep] = dy               # the kept rows are distinct: plain assignment is exact
            out.append(dx)
        return out + [None], []         # never a gradient to the selector


@register
class BatchReindex(Layer):
    """top = data[permut]: items picked (and repeated) by index; gradients of repeats accumulate."""
    type = "BatchReindex"
    n_bottoms = (2, 2)
    bottom_roles = ("the data", "the indices (a 1-D blob)")

    def shape(self, bottoms):
        x, perm = bottoms
        if len(perm) != 1 or not x:
            raise ShapeError("E0221", f"BatchReindex '{self.name}': the indices must be 1-D and the data at least "
                             f"1-D, got {fmt(perm)} and {fmt(x)}", involves=(0, 1),
                             help="feed the indices as a blob of shape K")
        return [(perm[0],) + tuple(x[1:])]

    def forward(self, xp, bottoms, params):
        x, perm = bottoms
        idx = _indices(xp, perm, x.shape[0], self, "the indices", integral=False)
        return [x[idx]], (idx, x.shape)

    def backward(self, xp, saved, dtops, params, need):
        idx, shape = saved
        dy = dtops[0]
        return [_scatter_rows(xp, idx, dy.reshape(dy.shape[0], -1), shape[0]).reshape(shape), None], []


# ---------------------------------------------------------------------------------------------
# Parameter, Im2col

@register
class Parameter(Layer):
    """A learnable blob as a top (no bottoms); its gradient is the top's."""
    type = "Parameter"
    n_bottoms = (0, 0)
    messages = {"parameter_param": Msg("ParameterParameter", {"shape": F(BLOB_SHAPE)})}

    def validate(self):
        dims = self.p.shape.dim
        bad = next((i for i, d in enumerate(dims) if d < 0), None)
        if bad is not None:
            return [ShapeError("E0107", f"Parameter '{self.name}': dim {dims[bad]} is negative", field="shape.dim",
                               index=bad, help="give each dim as 0 or more")]
        return []

    def shape(self, bottoms):
        return [tuple(self.p.shape.dim)]

    def param_shapes(self, bottoms):
        return [tuple(self.p.shape.dim)]

    def fillers(self):
        return [None]          # Caffe fills nothing: a new blob is zeros

    def forward(self, xp, bottoms, params):
        return [params[0].copy()], None     # Caffe shares the blob; a copy keeps the param safe from writers

    def backward(self, xp, saved, dtops, params, need):
        return [], [dtops[0]]


@register
class Im2col(Layer):
    """The convolution's column matrix as a blob: N x (C*kh*kw) x OH x OW, rows ordered (c, i, j)."""
    type = "Im2col"
    v1 = (11, "IM2COL")
    messages = {"convolution_param": CONV}
    sets_size = True

    def geometry(self):
        p = self.p
        return (spatial(p, "kernel_size", None, "kernel_h", "kernel_w"), spatial(p, "stride", 1), spatial(p, "pad", 0),
                spatial(p, "dilation", 1))

    def validate(self):
        p, errs = self.p, []
        (kh, kw), st, pad, dil = self.geometry()
        if kh is None or kw is None:
            errs.append(ShapeError("E0106", f"Im2col '{self.name}' has no kernel size",
                                   help="add `kernel_size: 3` (or kernel_h and kernel_w) to convolution_param"))
        for name, v in (("kernel_size", kh), ("kernel_size", kw), ("stride", st[0]), ("stride", st[1]),
                        ("dilation", dil[0]), ("dilation", dil[1])):
            if v is not None and v <= 0:
                errs.append(ShapeError("E0107", f"Im2col '{self.name}': `{name}` must be positive, got {v}",
                                       field=name, help=f"set `{name}` to 1 or more"))
        if min(pad) < 0:
            errs.append(ShapeError("E0107", f"Im2col '{self.name}': `pad` must be >= 0, got {min(pad)}", field="pad",
                                   help="set `pad: 0` or more"))
        for name in ("kernel_size", "stride", "pad", "dilation"):
            if len(getattr(p, name)) > 2:
                errs.append(ShapeError("E0108", f"Im2col '{self.name}': `{name}` is given {len(getattr(p, name))} "
                                       "times; netdsl unrolls 2-D maps", field=name,
                                       help=f"give `{name}` once (square) or twice (h, w)"))
        if p.axis != 1:
            errs.append(ShapeError("E0108", f"Im2col '{self.name}': only axis 1 (NCHW) is supported", field="axis",
                                   help="remove `axis`"))
        return errs

    def shape(self, bottoms):
        x = bottoms[0]
        if len(x) != 4:
            raise ShapeError("E0221", f"Im2col '{self.name}' needs a 4-D N x C x H x W input, got {len(x)}-D {fmt(x)}",
                             involves=(0,), help="unroll a convolution's input or output")
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.geometry()
        out = []
        for axis, n, k, s, p, d in (("height", x[2], kh, sh, ph, dh), ("width", x[3], kw, sw, pw, dw)):
            o = None if n is None else kernels.conv_out_size(n, k, s, p, d)
            if o is not None and o <= 0:
                ext = d * (k - 1) + 1
                raise ShapeError("E0401", f"Im2col '{self.name}' output {axis} is {o}: the kernel ({ext}) is larger "
                                 f"than the padded input ({n} + 2*{p} = {n + 2 * p})", field="kernel_size",
                                 involves=(0,), notes=[f"out = floor(({n} + 2*{p} - {ext}) / {s}) + 1 = {o}"],
                                 help=f"use a kernel of at most {n + 2 * p}, or add padding")
            out.append(o)
        return [(x[0], None if x[1] is None else x[1] * kh * kw, out[0], out[1])]

    def forward(self, xp, bottoms, params):
        x = bottoms[0]
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.geometry()
        cols = kernels.im2col(xp, x, kh, kw, sh, sw, ph, pw, dh, dw, layout="batched")   # (N, C*kh*kw, OH*OW)
        (top,) = self.shape([tuple(x.shape)])
        return [cols.reshape(top)], x.shape

    def backward(self, xp, x_shape, dtops, params, need):
        dy = dtops[0]
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.geometry()
        cols = dy.reshape(dy.shape[0], dy.shape[1], -1)
        return [kernels.col2im(xp, cols, x_shape, kh, kw, sh, sw, ph, pw, dh, dw, layout="batched")], []
