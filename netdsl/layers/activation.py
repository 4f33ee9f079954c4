"""Layers: element-wise activations (ReLU, Sigmoid, TanH) and Dropout."""
from __future__ import annotations

from ..registry import F, Layer, Msg, ShapeError, register


class _Elementwise(Layer):
    in_place = True
    keeps_layout = True

    def shape(self, bottoms):
        return [bottoms[0]]


@register
class ReLU(_Elementwise):
    type = "ReLU"
    messages = {"relu_param": Msg("ReLUParameter", {
        "negative_slope": F(float, 0.0), "engine": F("enum", "DEFAULT", choices=("DEFAULT", "CAFFE", "CUDNN"))})}

    def forward(self, xp, bottoms, params):
        x = bottoms[0]
        mask = x > 0                     # saved before an in-place overwrite
        s = self.p.negative_slope
        y = x * mask if s == 0 else xp.where(mask, x, x * s)
        return [y], mask

    def backward(self, xp, mask, dtops, params, need):
        dy, s = dtops[0], self.p.negative_slope
        return [dy * mask if s == 0 else xp.where(mask, dy, dy * s)], []


@register
class Sigmoid(_Elementwise):
    type = "Sigmoid"

    def forward(self, xp, bottoms, params):
        y = 0.5 * xp.tanh(0.5 * bottoms[0]) + 0.5        # stable for large |x|
        return [y], y

    def backward(self, xp, y, dtops, params, need):
        return [dtops[0] * y * (1 - y)], []


@register
class TanH(_Elementwise):
    type = "TanH"

    def forward(self, xp, bottoms, params):
        y = xp.tanh(bottoms[0])
        return [y], y

    def backward(self, xp, y, dtops, params, need):
        return [dtops[0] * (1 - y * y)], []


@register
class Dropout(_Elementwise):
    """TRAIN: y = x * mask / (1 - p) with mask ~ Bernoulli(1 - p); TEST: identity (Caffe)."""
    type = "Dropout"
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

    def backward(self, xp, mask, dtops, params, need):
        if mask is None:
            return [dtops[0] if self.p.scale_train else dtops[0] * (1 - self.p.dropout_ratio)], []
        return [dtops[0] * mask], []
