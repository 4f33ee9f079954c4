"""Layers: LRN, BatchNorm (Caffe's moving-average statistics) and Scale."""
from __future__ import annotations

import numpy as np

from .. import kernels
from ..registry import FILLER, F, Layer, Msg, ShapeError, canonical_axis, filler_record, fmt, register


@register
class LRN(Layer):
    type = "LRN"
    v1 = (15, "LRN")
    messages = {"lrn_param": Msg("LRNParameter", {
        "local_size": F(int, 5), "alpha": F(float, 1.0), "beta": F(float, 0.75), "k": F(float, 1.0),
        "norm_region": F("enum", "ACROSS_CHANNELS", choices=("ACROSS_CHANNELS", "WITHIN_CHANNEL")),
        "engine": F("enum", "DEFAULT", choices=("DEFAULT", "CAFFE", "CUDNN"))})}

    def validate(self):
        n = self.p.local_size
        if n <= 0 or n % 2 == 0:
            return [ShapeError("E0107", f"LRN '{self.name}': local_size must be a positive odd number, got {n}",
                               field="local_size", help=f"use `local_size: {max(n + 1 - n % 2, 1) if n > 0 else 5}`")]
        return []

    def shape(self, bottoms):
        x = bottoms[0]
        if len(x) != 4:
            raise ShapeError("E0221", f"LRN '{self.name}' needs a 4-D input, got {fmt(x)}", involves=(0,),
                             help="apply LRN to a convolution's output")
        return [x]

    def macs(self, bottoms, tops):
        n, c, h, w = tops[0]
        return n * c * h * w * self.p.local_size * (self.p.local_size if self.p.norm_region == "WITHIN_CHANNEL" else 1)

    def forward(self, xp, bottoms, params):
        p = self.p
        y, cache = kernels.lrn_forward(xp, bottoms[0], p.local_size, p.alpha, p.beta, p.k,
                                       p.norm_region)
        return [y], cache

    def backward(self, xp, cache, dtops, params, need):
        return [kernels.lrn_backward(xp, dtops[0], cache)], []

    def to_onnx(self, ex, step):
        """ACROSS_CHANNELS: ONNX LRN (the same alpha/size convention); WITHIN_CHANNEL: Caffe's own
        construction, x (1 + alpha avgpool(x^2))^-beta (its padded windows always hold size^2 cells)."""
        p, x = self.p, ex.bottoms(step)[0]
        if p.norm_region == "ACROSS_CHANNELS":
            return ex.add_node("LRN", [x], ex.tops(step), alpha=p.alpha, beta=p.beta, bias=p.k, size=p.local_size)
        n, h = p.local_size, (p.local_size - 1) // 2
        avg = ex.add_node("AveragePool", [ex.add_node("Mul", [x, x])], kernel_shape=[n, n], pads=[h] * 4, count_include_pad=1)
        ex.chain(step, avg, [("Mul", [ex.scalar(p.alpha)]), ("Add", [ex.scalar(1.0)]), ("Pow", [ex.scalar(-p.beta)]),
                             ("Mul", [x])])


@register
class BatchNorm(Layer):
    """Normalises each channel; no affine part (follow it with Scale, as Caffe does).
    Its three blobs are statistics (mean sum, variance sum, scale factor), never learned."""
    type = "BatchNorm"
    in_place = True
    keeps_layout = True
    frozen_params = True
    messages = {"batch_norm_param": Msg("BatchNormParameter", {
        "use_global_stats": F(bool, None), "moving_average_fraction": F(float, 0.999), "eps": F(float, 1e-5)})}

    def global_stats(self) -> bool:
        g = self.p.use_global_stats
        return self.phase == "TEST" if g is None else g

    def shape(self, bottoms):
        x = bottoms[0]
        if len(x) < 2:
            raise ShapeError("E0221", f"BatchNorm '{self.name}' needs at least N x C, got {fmt(x)}", involves=(0,),
                             help="normalise a 2-D or 4-D blob")
        return [x]

    def param_shapes(self, bottoms):
        c = bottoms[0][1]
        return [(c,), (c,), (1,)]

    def forward(self, xp, bottoms, params):
        x = bottoms[0]
        mean_sum, var_sum, factor = params
        axes = (0,) + tuple(range(2, x.ndim))
        bshape = (1, x.shape[1]) + (1,) * (x.ndim - 2)
        if self.global_stats():
            f = float(factor[0])
            scale = 0.0 if f == 0 else 1.0 / f
            mean, var = mean_sum * scale, var_sum * scale
        else:
            mean = x.mean(axis=axes)
            var = ((x - mean.reshape(bshape)) ** 2).mean(axis=axes)
            m = x.size // x.shape[1]
            maf = self.p.moving_average_fraction
            factor *= maf
            factor += 1
            mean_sum *= maf
            mean_sum += mean
            var_sum *= maf
            var_sum += var * (m / (m - 1) if m > 1 else 1.0)
        inv_std = 1.0 / xp.sqrt(var + self.p.eps)
        y = (x - mean.reshape(bshape)) * inv_std.reshape(bshape)
        return [y.astype(x.dtype, copy=False)], (y, inv_std.reshape(bshape), axes)

    def backward(self, xp, saved, dtops, params, need):
        y, inv_std, axes = saved
        dy = dtops[0]
        if self.global_stats():
            return [dy * inv_std], []
        dx = (dy - dy.mean(axis=axes, keepdims=True) - y * (dy * y).mean(axis=axes, keepdims=True)) * inv_std
        return [dx], []

    def _stats(self, params):
        mean_sum, var_sum, factor = params
        f = float(factor[0])
        return mean_sum * (0.0 if f == 0 else 1.0 / f), var_sum * (0.0 if f == 0 else 1.0 / f)

    def onnx_affine(self, ex, step):
        """(mul, add) per channel, for --fold-batchnorm (None: batch statistics)."""
        if not self.global_stats():
            return None
        mean, var = self._stats([np.asarray(a, np.float64) for a in ex.params(step)])
        inv = 1.0 / np.sqrt(var + self.p.eps)
        return inv, -mean * inv

    def to_onnx(self, ex, step):
        if not self.global_stats():
            raise ex.unsupported(step, "use_global_stats: false normalises by batch statistics")
        mean, var = self._stats(ex.params(step))
        c = mean.shape[0]
        ex.add_node("BatchNormalization", ex.bottoms(step) + [ex.const("scale", np.ones(c)), ex.const("bias", np.zeros(c)),
                    ex.const("mean", mean), ex.const("var", var)], ex.tops(step), epsilon=self.p.eps)


@register
class Scale(Layer):
    type = "Scale"
    in_place = True
    keeps_layout = True
    n_bottoms = (1, 2)
    messages = {"scale_param": Msg("ScaleParameter", {
        "axis": F(int, 1), "num_axes": F(int, 1), "filler": F(FILLER), "bias_term": F(bool, False),
        "bias_filler": F(FILLER)})}

    def _span(self, x):
        ax = canonical_axis(self.p.axis, len(x))
        end = len(x) if self.p.num_axes == -1 else ax + self.p.num_axes
        if end > len(x):
            raise ShapeError("E0220", f"Scale '{self.name}': axis {ax} + num_axes {self.p.num_axes} exceeds the "
                             f"input's {len(x)} axes", field="num_axes", involves=(0,), help="reduce num_axes")
        return ax, end

    def shape(self, bottoms):
        x = bottoms[0]
        ax, end = self._span(x)
        if len(bottoms) == 2:
            s = bottoms[1]
            ax = canonical_axis(self.p.axis, len(x))
            if tuple(x[ax:ax + len(s)]) != tuple(s):
                raise ShapeError("E0322", f"Scale '{self.name}': the scale {fmt(s)} does not match the input "
                                 f"{fmt(x)} from axis {ax}", involves=(0, 1),
                                 help=f"give a scale of shape {fmt(x[ax:ax + len(s)])}")
        return [x]

    def param_shapes(self, bottoms):
        x = bottoms[0]
        if len(bottoms) == 2:
            return [tuple(bottoms[1])] if self.p.bias_term else []
        ax, end = self._span(x)
        w = tuple(x[ax:end])
        return [w] + ([w] if self.p.bias_term else [])

    def fillers(self):
        ones = self.p.filler if self.p.has("filler") else filler_record(type="constant", value=1.0)
        if len(self.spec.bottoms) == 2:
            return [self.p.bias_filler] if self.p.bias_term else []
        return [ones] + ([self.p.bias_filler] if self.p.bias_term else [])

    def _bshape(self, x, s):
        ax = self.p.axis % x.ndim
        return (1,) * ax + tuple(s.shape) + (1,) * (x.ndim - ax - s.ndim)

    def forward(self, xp, bottoms, params):
        x = bottoms[0]
        if len(bottoms) == 2:
            s, bias = bottoms[1], (params[0] if self.p.bias_term else None)
        else:
            s, bias = params[0], (params[1] if self.p.bias_term else None)
        bs = self._bshape(x, s)
        y = x * s.reshape(bs)
        if bias is not None:
            y += bias.reshape(bs)
        return [y], (x, s, bs)

    def backward(self, xp, saved, dtops, params, need):
        x, s, bs = saved
        dy = dtops[0]
        axes = tuple(i for i, d in enumerate(bs) if d == 1)
        ds = (dy * x).sum(axis=axes).reshape(s.shape)
        dx = dy * s.reshape(bs)
        db = dy.sum(axis=axes).reshape(s.shape) if self.p.bias_term else None
        if len(self.spec.bottoms) == 2:
            return [dx, ds], ([db] if db is not None else [])
        return [dx], [ds] + ([db] if db is not None else [])

    def onnx_affine(self, ex, step):
        """(mul, add) per channel, for --fold-batchnorm (None unless one param over axis 1)."""
        s, *b = ex.params(step)
        if len(self.spec.bottoms) == 2 or self.p.axis % len(ex.in_shape(step)) != 1 or s.ndim != 1:
            return None
        return s, (b[0] if b else 0.0)

    def to_onnx(self, ex, step):
        x, nd, ax = ex.bottoms(step)[0], len(ex.in_shape(step)), self.p.axis % len(ex.in_shape(step))
        params = ex.params(step)
        if len(step.node.bottoms) == 2:
            s = ex.along(ex.bottoms(step)[1], ax, nd, len(ex.in_shape(step, 1)))
        else:
            s, params = ex.along(params[0], ax, nd, suffix="scale"), params[1:]
        y = ex.add_node("Mul", [x, s], None if params else ex.tops(step))
        if params:
            ex.add_node("Add", [y, ex.along(params[0], ax, nd, suffix="bias")], ex.tops(step))
