"""Layers: Caffe's element-wise neuron layers beyond ReLU/Sigmoid/TanH (PReLU, ELU, AbsVal, Power,
Exp, Log, BNLL, Threshold, Clip)."""
from __future__ import annotations

import math

import numpy as np

from ..registry import FILLER, F, Msg, ShapeError, filler_record, fmt, register
from .activation import _Elementwise

# Caffe's bnll_layer.cpp: the gradient evaluates exp(min(x, 50)) so e^x / (e^x + 1) never becomes inf / inf
BNLL_THRESHOLD = 50.0


def _base_error(layer, what: str, base: float, allow_one: bool) -> list[ShapeError]:
    """Exp/Log's LayerSetUp CHECKs: base is -1 (meaning e) or > 0 (and != 1 for Log: 1/log(1) is inf)."""
    if base == -1 or (base > 0 and (allow_one or base != 1)):
        return []
    need = "-1 (e) or > 0, not 1" if not allow_one else "-1 (e) or > 0"
    return [ShapeError("E0107", f"{what} '{layer.name}': base must be {need}, got {base}", field="base",
                       help="use `base: -1` for e, or a positive base such as `base: 2` or `base: 10`")]


@register
class PReLU(_Elementwise):
    """y = max(x, 0) + a_c min(x, 0) with a learned slope per channel (axis 1), or one shared slope."""
    type = "PReLU"
    messages = {"prelu_param": Msg("PReLUParameter", {"filler": F(FILLER), "channel_shared": F(bool, False)})}

    def shape(self, bottoms):
        x = bottoms[0]
        if len(x) < 2:
            raise ShapeError("E0221", f"PReLU '{self.name}' needs at least 2 axes (N x C x ...), got {fmt(x)}",
                             involves=(0,), help="the slopes are per channel (axis 1): give it an N x C (x ...) blob, "
                                                 "or use ReLU with `negative_slope`")
        return [x]

    def param_shapes(self, bottoms):
        return [(1,) if self.p.channel_shared else (bottoms[0][1],)]

    def fillers(self):
        # Caffe: an absent filler means constant 0.25, not the FillerParameter default of 0
        return [self.p.filler if self.p.has("filler") else filler_record(type="constant", value=0.25)]

    def _slope(self, a, x):
        return a.reshape((1, -1) + (1,) * (x.ndim - 2))      # per channel; a shared (1,) slope becomes all ones dims

    def forward(self, xp, bottoms, params):
        x = bottoms[0]
        pos = x > 0
        return [xp.where(pos, x, x * self._slope(params[0], x))], (x, pos)

    def backward(self, xp, saved, dtops, params, need):
        x, pos = saved
        dy = dtops[0]
        a = params[0]
        # the slope's gradient is dy x where x <= 0 (Caffe's side of the kink), summed over all but the channel
        axes = None if self.p.channel_shared else tuple(i for i in range(x.ndim) if i != 1)
        da = (dy * xp.minimum(x, 0)).sum(axis=axes).reshape(a.shape)
        dx = xp.where(pos, dy, dy * self._slope(a, x)) if need[0] else None
        return [dx], [da]

    def to_onnx(self, ex, step):
        a, nd = ex.params(step)[0], len(ex.in_shape(step))
        ex.add_node("PRelu", ex.bottoms(step) + [ex.along(a, 1 if a.size > 1 else nd - 1, nd, suffix="slope")], ex.tops(step))


@register
class ELU(_Elementwise):
    """y = x for x > 0, alpha (e^x - 1) otherwise."""
    type = "ELU"
    messages = {"elu_param": Msg("ELUParameter", {"alpha": F(float, 1.0)})}

    def forward(self, xp, bottoms, params):
        x = bottoms[0]
        pos = x > 0
        y = xp.where(pos, x, self.p.alpha * xp.expm1(xp.minimum(x, 0)))   # min: no overflow on the unused side
        return [y], (y, pos)

    def backward(self, xp, saved, dtops, params, need):
        y, pos = saved
        dy = dtops[0]
        # Caffe: dy (alpha + y) on x <= 0, i.e. alpha e^x from the top alone
        return [xp.where(pos, dy, dy * (y + self.p.alpha))], []

    def to_onnx(self, ex, step):
        ex.add_node("Elu", ex.bottoms(step), ex.tops(step), alpha=self.p.alpha)


@register
class AbsVal(_Elementwise):
    """y = |x|; dx = dy sign(x) (0 at x = 0, as caffe_cpu_sign). Caffe refuses it in place."""
    type = "AbsVal"
    v1 = (35, "ABSVAL")
    in_place = False

    def forward(self, xp, bottoms, params):
        x = bottoms[0]
        return [xp.abs(x)], xp.sign(x)

    def backward(self, xp, sign, dtops, params, need):
        return [dtops[0] * sign], []

    def to_onnx(self, ex, step):
        ex.add_node("Abs", ex.bottoms(step), ex.tops(step))


@register
class Power(_Elementwise):
    """y = (shift + scale x)^power, with Caffe's special cases: power * scale == 0 gives a constant
    (1 when power is 0, else shift^power) and no gradient."""
    type = "Power"
    v1 = (26, "POWER")
    messages = {"power_param": Msg("PowerParameter", {
        "power": F(float, 1.0), "scale": F(float, 1.0), "shift": F(float, 0.0)})}

    def _diff_scale(self):
        return self.p.power * self.p.scale

    def forward(self, xp, bottoms, params):
        x, p = bottoms[0], self.p
        if self._diff_scale() == 0:
            with np.errstate(invalid="ignore", divide="ignore"):    # Caffe's pow: NaN/inf where C gives them
                value = 1.0 if p.power == 0 else float(np.power(np.float64(p.shift), p.power))
            return [xp.full(x.shape, value, dtype=x.dtype)], (x, None)
        u = x * p.scale if p.scale != 1 else x
        u = u + p.shift if p.shift != 0 else u
        with np.errstate(invalid="ignore", divide="ignore"):
            y = xp.power(u, p.power) if p.power != 1 else u
        return [y if y is not x else x.copy()], (x, y)

    def backward(self, xp, saved, dtops, params, need):
        x, y = saved
        p, ds, dy = self.p, self._diff_scale(), dtops[0]
        if ds == 0:
            return [xp.zeros_like(x)], []
        if p.power == 1:
            return [dy * ds], []
        if p.power == 2:                            # 2 scale (shift + scale x): no division
            g = x * (ds * p.scale) + ds * p.shift
        else:
            # Caffe: diff_scale y / (shift + scale x); with shift 0 it is power y / x (NaN at x = 0, as Caffe)
            with np.errstate(invalid="ignore", divide="ignore"):
                g = y / x * p.power if p.shift == 0 else y / (x * p.scale + p.shift) * ds
        return [dy * g], []

    def to_onnx(self, ex, step):
        p, x = self.p, ex.bottoms(step)[0]
        if self._diff_scale() == 0:
            with np.errstate(invalid="ignore", divide="ignore"):
                return ex.constant_like(x, 1.0 if p.power == 0 else float(np.power(np.float64(p.shift), p.power)), ex.tops(step))
        ex.chain(step, x, [("Mul", [ex.scalar(p.scale)]) if p.scale != 1 else None,
                           ("Add", [ex.scalar(p.shift)]) if p.shift != 0 else None,
                           ("Pow", [ex.scalar(p.power)]) if p.power != 1 else None])


@register
class Exp(_Elementwise):
    """y = base^(shift + scale x) (base -1 means e), computed as e^shift' e^(ln(base) scale x)."""
    type = "Exp"
    v1 = (38, "EXP")
    messages = {"exp_param": Msg("ExpParameter", {
        "base": F(float, -1.0), "scale": F(float, 1.0), "shift": F(float, 0.0)})}

    def validate(self):
        return _base_error(self, "Exp", self.p.base, allow_one=True)

    def _scales(self):
        p = self.p
        log_base = 1.0 if p.base == -1 else math.log(p.base)
        # BVLC master: the shift's factor is e^shift for base -1 (older Caffe computed (-1)^shift)
        outer = 1.0 if p.shift == 0 else (math.exp(p.shift) if p.base == -1 else p.base ** p.shift)
        return log_base * p.scale, outer

    def forward(self, xp, bottoms, params):
        inner, outer = self._scales()
        x = bottoms[0]
        y = xp.exp(x * inner if inner != 1 else x)
        if outer != 1:
            y *= outer
        return [y], y

    def backward(self, xp, y, dtops, params, need):
        inner, _ = self._scales()
        dx = dtops[0] * y
        return [dx * inner if inner != 1 else dx], []

    def to_onnx(self, ex, step):
        inner, outer = self._scales()
        ex.chain(step, ex.bottoms(step)[0], [("Mul", [ex.scalar(inner)]) if inner != 1 else None, ("Exp", []),
                                             ("Mul", [ex.scalar(outer)]) if outer != 1 else None])


@register
class Log(_Elementwise):
    """y = log_base(shift + scale x) (base -1 means e)."""
    type = "Log"
    messages = {"log_param": Msg("LogParameter", {
        "base": F(float, -1.0), "scale": F(float, 1.0), "shift": F(float, 0.0)})}

    def validate(self):
        return _base_error(self, "Log", self.p.base, allow_one=False)

    def _log_base(self):
        return 1.0 if self.p.base == -1 else math.log(self.p.base)

    def forward(self, xp, bottoms, params):
        x, p = bottoms[0], self.p
        u = x * p.scale if p.scale != 1 else x
        u = u + p.shift if p.shift != 0 else u
        y = xp.log(u)
        base_scale = 1.0 / self._log_base()
        if base_scale != 1:
            y *= base_scale
        return [y], u

    def backward(self, xp, u, dtops, params, need):
        # dx = dy scale / (ln(base) (shift + scale x))
        num = self.p.scale / self._log_base()
        return [dtops[0] * (num / u) if num != 1 else dtops[0] / u], []

    def to_onnx(self, ex, step):
        p, k = self.p, 1.0 / self._log_base()
        ex.chain(step, ex.bottoms(step)[0], [("Mul", [ex.scalar(p.scale)]) if p.scale != 1 else None,
                                             ("Add", [ex.scalar(p.shift)]) if p.shift != 0 else None, ("Log", []),
                                             ("Mul", [ex.scalar(k)]) if k != 1 else None])


@register
class BNLL(_Elementwise):
    """Binomial normal log-likelihood, y = log(1 + e^x), in Caffe's overflow-free split at x > 0."""
    type = "BNLL"
    v1 = (2, "BNLL")

    def forward(self, xp, bottoms, params):
        x = bottoms[0]
        # x > 0: x + log(1 + e^-x); else log(1 + e^x): both are max(x, 0) + log(1 + e^-|x|)
        y = xp.maximum(x, 0) + xp.log1p(xp.exp(-xp.abs(x)))
        return [y], x

    def backward(self, xp, x, dtops, params, need):
        e = xp.exp(xp.minimum(x, BNLL_THRESHOLD))
        return [dtops[0] * (e / (e + 1))], []

    def to_onnx(self, ex, step):
        ex.add_node("Softplus", ex.bottoms(step), ex.tops(step))


@register
class Threshold(_Elementwise):
    """y = 1 if x > threshold else 0. Caffe has no backward: gradients stop here."""
    type = "Threshold"
    v1 = (31, "THRESHOLD")
    no_backward = True
    messages = {"threshold_param": Msg("ThresholdParameter", {"threshold": F(float, 0.0)})}

    def forward(self, xp, bottoms, params):
        x = bottoms[0]
        return [(x > self.p.threshold).astype(x.dtype)], None

    def to_onnx(self, ex, step):
        gt = ex.add_node("Greater", ex.bottoms(step) + [ex.scalar(self.p.threshold)])
        ex.add_node("Cast", [gt], ex.tops(step), to=1)          # 1: FLOAT


@register
class Clip(_Elementwise):
    """y = max(min, min(x, max)); the gradient passes where min <= x <= max (both ends included)."""
    type = "Clip"
    messages = {"clip_param": Msg("ClipParameter", {
        "min": F(float, None, required=True, doc="the lower bound", example="0"),
        "max": F(float, None, required=True, doc="the upper bound", example="6")})}

    def validate(self):
        # a clip_param missing a bound is reported by the schema; an absent clip_param is caught here
        # (Caffe checks required fields only in messages that are set: it would clip to [0, 0])
        if self.p.min is None or self.p.max is None:
            return [ShapeError("E0106", f"Clip '{self.name}' has no bounds: it needs `clip_param {{ min max }}`",
                               field=None, help="add e.g. `clip_param { min: 0 max: 6 }`")]
        return []

    def forward(self, xp, bottoms, params):
        x, lo, hi = bottoms[0], self.p.min, self.p.max
        # max(min, min(x, max)) as Caffe (not clip(): with min > max Caffe gives min everywhere)
        y = xp.maximum(xp.minimum(x, hi), lo)
        return [y], (x >= lo) & (x <= hi)

    def backward(self, xp, inside, dtops, params, need):
        return [dtops[0] * inside], []

    def to_onnx(self, ex, step):
        lo, hi = ex.scalar(self.p.min), ex.scalar(self.p.max)     # max(min, min(x, max)), as Caffe
        ex.chain(step, ex.bottoms(step)[0], [("Min", [hi]), ("Max", [lo])])
