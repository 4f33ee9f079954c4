"""Layers: element-wise activations (ReLU, Sigmoid, TanH, Swish) and Dropout."""
from __future__ import annotations

import math

import numpy as np

from ..gpu.kernel import elementwise
from ..gpu.program import Ref, Unsupported
from ..registry import F, Layer, Msg, ShapeError, register


class _Elementwise(Layer):
    in_place = True
    keeps_layout = True

    def shape(self, bottoms):
        return [bottoms[0]]


@register
class ReLU(_Elementwise):
    type = "ReLU"
    v1 = (18, "RELU")
    messages = {"relu_param": Msg("ReLUParameter", {
        "negative_slope": F(float, 0.0), "engine": F("enum", "DEFAULT", choices=("DEFAULT", "CAFFE", "CUDNN"))})}
    cpu_op = "relu"

    def forward(self, xp, bottoms, params):
        x = bottoms[0]
        mask = x > 0                     # saved before an in-place overwrite
        s = self.p.negative_slope
        y = x * mask if s == 0 else xp.where(mask, x, x * s)
        return [y], mask

    def backward(self, xp, mask, dtops, params, need):
        dy, s = dtops[0], self.p.negative_slope
        return [dy * mask if s == 0 else xp.where(mask, dy, dy * s)], []

    def to_onnx(self, ex, step):
        s = self.p.negative_slope
        ex.add_node("Relu" if s == 0 else "LeakyRelu", ex.bottoms(step), ex.tops(step), **({"alpha": s} if s else {}))

    # -- graph mode (gpu/lower.py) ---------------------------------------------------------
    def epilogue_slope(self):
        return float(self.p.negative_slope)

    def lower_check(self, lw, step):
        if self.p.negative_slope < 0:
            raise Unsupported(f"ReLU '{self.name}': negative_slope < 0")

    def lower_forward(self, lw, i, s):
        if i in lw.fused:
            return
        x, y = s.node.bottoms[0], s.node.tops[0]
        n = math.prod(lw.shape(x))
        lw.emit("relu_fwd", f"{s.layer.name}_fwd", {"CNT": n},
                [lw.val(x), lw.new_value(y), np.float32(s.layer.p.negative_slope)], lw.blocks(n))

    def lower_backward(self, lw, i, s):
        if i in lw.relu_done:
            return
        y = s.node.tops[0]
        if y not in lw.grad or not (s.propagate and s.propagate[0]):
            return
        x = s.node.bottoms[0]
        n = math.prod(lw.shape(x))
        dx, acc = lw.grad_out(x)
        lw.emit("relu_bwd", f"{s.layer.name}_bwd", {"CNT": n, "ACC": int(acc)},
                [Ref("arena", lw.grad[y]), lw.val(y), dx, np.float32(s.layer.p.negative_slope)], lw.blocks(n))


@register
class Sigmoid(_Elementwise):
    type = "Sigmoid"
    v1 = (19, "SIGMOID")

    def forward(self, xp, bottoms, params):
        y = 0.5 * xp.tanh(0.5 * bottoms[0]) + 0.5        # stable for large |x|
        return [y], y

    def backward(self, xp, y, dtops, params, need):
        return [dtops[0] * y * (1 - y)], []

    def to_onnx(self, ex, step):
        ex.add_node("Sigmoid", ex.bottoms(step), ex.tops(step))


@register
class TanH(_Elementwise):
    type = "TanH"
    v1 = (23, "TANH")

    def forward(self, xp, bottoms, params):
        y = xp.tanh(bottoms[0])
        return [y], y

    def backward(self, xp, y, dtops, params, need):
        return [dtops[0] * (1 - y * y)], []

    def to_onnx(self, ex, step):
        ex.add_node("Tanh", ex.bottoms(step), ex.tops(step))


def swish(xp, x, beta):
    """y = x sigmoid(beta x), and the sigmoid (the eager forward and its graph-mode kernel's twin)."""
    sig = 0.5 * xp.tanh(0.5 * beta * x) + 0.5
    return x * sig, sig


def swish_grad(dy, y, sig, beta):
    """dx = dy (beta y + sigmoid(beta x) (1 - beta y))."""
    by = beta * y
    return dy * (by + sig * (1 - by))


SWISH_KERNELS = elementwise("swish", "xv / (1.f + expf(-beta * xv))",
                            "dyv * (beta * yv + (1.f - beta * yv) / (1.f + expf(-beta * xv)))",
                            lambda x, beta: swish(np, x, beta)[0],
                            lambda dy, x, y, beta: swish_grad(dy, y, swish(np, x, beta)[1], beta), params="beta")


@register
class Swish(_Elementwise):
    """Caffe's Swish: y = x sigmoid(beta x)."""
    type = "Swish"
    messages = {"swish_param": Msg("SwishParameter", {"beta": F(float, 1.0)})}

    def forward(self, xp, bottoms, params):
        y, sig = swish(xp, bottoms[0], self.p.beta)
        return [y], (y, sig)

    def backward(self, xp, saved, dtops, params, need):
        y, sig = saved
        return [swish_grad(dtops[0], y, sig, self.p.beta)], []

    def lower_forward(self, lw, i, s):
        lw.elementwise(SWISH_KERNELS, False, s, self.p.beta)

    def to_onnx(self, ex, step):
        x, beta = ex.bottoms(step)[0], self.p.beta
        ex.chain(step, x, [("Mul", [ex.scalar(beta)]) if beta != 1 else None, ("Sigmoid", []), ("Mul", [x])])

    def lower_backward(self, lw, i, s):
        lw.elementwise(SWISH_KERNELS, True, s, self.p.beta)


@register
class Dropout(_Elementwise):
    """TRAIN: y = x * mask / (1 - p) with mask ~ Bernoulli(1 - p); TEST: identity (Caffe)."""
    type = "Dropout"
    v1 = (6, "DROPOUT")
    stateful = True
    messages = {"dropout_param": Msg("DropoutParameter", {
        "dropout_ratio": F(float, 0.5),
        "scale_train": F(bool, True)})}   # caffe-fast-rcnn fork: false scales at TEST instead

    def validate(self):
        r = self.p.dropout_ratio
        if not 0.0 <= r < 1.0:
            return [ShapeError("E0107", f"Dropout '{self.name}': dropout_ratio must be in [0, 1), got {r}",
                               field="dropout_ratio", help="use e.g. `dropout_ratio: 0.5`")]
        return []

    def forward(self, xp, bottoms, params, state):
        x, r = bottoms[0], self.p.dropout_ratio
        if self.phase != "TRAIN":
            return [x if self.p.scale_train else x * (1 - r)], None
        keep = state.uniform(xp, x.shape) >= r       # Caffe: mask = u > threshold
        scale = 1.0 / (1.0 - r) if self.p.scale_train else 1.0
        mask = keep.astype(x.dtype) * x.dtype.type(scale)
        return [x * mask], mask

    def to_onnx(self, ex, step):
        """TEST: identity (times 1 - ratio with the fork's scale_train: false)."""
        r = self.p.dropout_ratio
        ex.chain(step, ex.bottoms(step)[0], [None if self.p.scale_train or r == 0 else ("Mul", [ex.scalar(1 - r)])])

    def backward(self, xp, mask, dtops, params, need):
        if mask is None:
            return [dtops[0] if self.p.scale_train else dtops[0] * (1 - self.p.dropout_ratio)], []
        return [dtops[0] * mask], []
