"""Layers: Softmax, the losses (SoftmaxWithLoss, SigmoidCrossEntropyLoss, EuclideanLoss,
SmoothL1Loss, InfogainLoss, HingeLoss, MultinomialLogisticLoss, ContrastiveLoss), Accuracy, and
MultiLabelDecode (netdsl: class probabilities to a multi-label prediction)."""
from __future__ import annotations

import math

import numpy as np

from .. import kernels
from ..gpu.program import Ref, Unsupported
from ..registry import LOSS, F, Layer, Msg, ShapeError, canonical_axis, count, fmt, register

SOFTMAX = Msg("SoftmaxParameter", {"axis": F(int, 1),
                                   "engine": F("enum", "DEFAULT", choices=("DEFAULT", "CAFFE", "CUDNN"))})
FLT_MIN = float(np.finfo(np.float32).tiny)


def _label_count_error(layer, what: str, pred: tuple, axis: int, labels: tuple, need: int, have: int):
    outer, inner = count(pred, 0, axis), count(pred, axis + 1)
    p, lab = layer.spec.bottoms[0], layer.spec.bottoms[1]
    notes = [(f"the classes are on axis {axis} of '{p}' ({pred[axis]} classes), so it holds {outer} (the axes "
              f"before {axis}) x {inner} (the axes after) = {need} {what}, each needing one label"),
             f"'{lab}' ({fmt(labels)}) holds {have} label{'s' if have != 1 else ''}"]
    if pred and labels and pred[0] is not None and labels[0] is not None and pred[0] != labels[0]:
        help = (f"the batch sizes differ ({pred[0]} vs {labels[0]}): read the scores and the labels from the same "
                "batch (the same data layer, or equal batch_size)")
    else:
        help = (f"give one label per prediction: {need} labels, e.g. a blob of shape "
                f"{fmt(tuple(pred[:axis]) + tuple(pred[axis + 1:]))}, or set `axis` to where the classes are")
    return ShapeError("E0360", f"{layer.type} '{layer.name}': {have} labels for {need} {what}",
                      involves=(0, 1), notes=notes, help=help)


def normalization(p, default: str) -> str:
    """Caffe's loss normalisation mode of a loss_param: `normalization`, else the deprecated bool
    `normalize` (VALID or BATCH_SIZE), else the layer type's default."""
    if p.normalization is not None:
        return p.normalization
    if p.normalize is not None:        # deprecated bool, honoured only when normalization is unset
        return "VALID" if p.normalize else "BATCH_SIZE"
    return default


def soft_labels(scores: tuple, labels: tuple, axis: int) -> bool:
    """Whether SoftmaxWithLoss's labels are distributions (netdsl): a label blob of exactly the
    scores' shape, with more than one class (one class: a class index and a distribution agree)."""
    return tuple(labels) == tuple(scores) and scores[axis] != 1


SOFT_LABEL_TOLERANCE = 1e-3   # |sum - 1| allowed per soft-label row (float32 sums of 1/k and the like)


def distribution_rows(xp, layer, labels, axis: int):
    """Soft labels as (predictions, C) rows, each a distribution over the classes on `axis`: no
    negative entry, summing to 1. Anything else is an error at run time naming the prediction."""
    from ..errors import NetdslError
    c = labels.shape[axis]
    rows = xp.moveaxis(labels, axis, -1).reshape(-1, c)
    sums = rows.sum(axis=1)
    bad = (xp.abs(sums - 1) > SOFT_LABEL_TOLERANCE) | (rows < 0).any(axis=1) | ~xp.isfinite(sums)
    if bool(bad.any()):
        k = int(xp.argmax(bad))
        index = tuple(int(i) for i in np.unravel_index(k, labels.shape[:axis] + labels.shape[axis + 1:]))
        row = [float(v) for v in rows[k][:8]]
        shown = ", ".join(f"{v:g}" for v in row) + (", ..." if c > 8 else "")
        what = "has a negative entry" if bool((rows[k] < 0).any()) else f"sums to {float(sums[k]):g}"
        raise NetdslError("E0661", f"{layer.type} '{layer.name}': the soft label of sample {index[0]}"
                          + (f" (position {index})" if len(index) > 1 else "")
                          + f" {what}: [{shown}]",
                          notes=[f"'{layer.spec.bottoms[1]}' has the scores' shape, so each of its rows over the "
                                 f"{c} classes on axis {axis} is read as a distribution (a soft label)"],
                          help="make each row non-negative and sum to 1 (e.g. 1/k for each of k tags), or give "
                               "class indices: one label per prediction")
    return rows


def normalizer(mode: str, outer: int, inner: int, valid: int) -> float:
    """Caffe's GetNormalizer: what the summed loss is divided by."""
    n = {"FULL": outer * inner, "VALID": valid, "BATCH_SIZE": outer, "NONE": 1}[mode]
    return max(1.0, float(n))        # Caffe clamps the normaliser at 1


def class_labels(xp, layer, labels, classes: int):
    """Labels as class indices: whole numbers in [0, classes), or the layer's ignore_label. Anything
    else is an error at run time (a label -1 would silently pick the last class, 2.7 would be 2)."""
    from ..errors import NetdslError
    lab = labels.reshape(-1)
    try:
        ignore = layer.p.ignore_label
    except AttributeError:
        ignore = None
    bad = (lab != xp.floor(lab)) | (lab < 0) | (lab >= classes)
    if ignore is not None:
        bad &= lab != ignore
    if bool(bad.any()):
        k = int(xp.argmax(bad))
        raise NetdslError("E0621", f"{layer.type} '{layer.name}': label {float(lab[k]):g} (position {k} of "
                          f"'{layer.spec.bottoms[1]}') is not a class in [0, {classes})",
                          help="labels are whole class indices" + (f", or {ignore} (ignore_label)" if ignore is not None
                                                                    else "; set loss_param { ignore_label: -1 } to skip some"))
    return lab.astype(xp.int64)


GPU_NORM = {"FULL": 0, "BATCH_SIZE": 0, "VALID": 1, "NONE": 2}   # the softmax_loss kernel's NORM (N x C inputs)


def _lower_check_nc(layer, lw, step):
    """Graph mode's loss and accuracy kernels take N x C scores (classes on axis 1) and one top."""
    x = lw.shape(step.node.bottoms[0])
    if (layer.p.axis % len(x)) != 1 or math.prod(x[2:]) != 1 or len(step.node.tops) != 1:
        raise Unsupported(f"{layer.type} '{layer.name}': only N x C inputs (axis 1) and one top")


@register
class Softmax(Layer):
    type = "Softmax"
    v1 = (20, "SOFTMAX")
    messages = {"softmax_param": SOFTMAX}
    in_place = True
    keeps_layout = True
    normalizes_scores = True

    def shape(self, bottoms):
        canonical_axis(self.p.axis, len(bottoms[0]))
        return [bottoms[0]]

    def forward(self, xp, bottoms, params):
        y = kernels.softmax(xp, bottoms[0], self.p.axis % bottoms[0].ndim)
        return [y], y

    def backward(self, xp, y, dtops, params, need):
        dy = dtops[0]
        ax = self.p.axis % y.ndim
        return [y * (dy - (dy * y).sum(axis=ax, keepdims=True))], []

    def to_onnx(self, ex, step):
        ex.add_node("Softmax", ex.bottoms(step), ex.tops(step), axis=self.p.axis % len(ex.in_shape(step)))


class _Loss(Layer):
    is_loss = True
    n_bottoms = (2, 2)
    n_tops = (1, 1)


@register
class SoftmaxWithLoss(_Loss):
    """Caffe's SoftmaxWithLoss; netdsl also takes soft labels: a label blob of the scores' shape holds
    a distribution per prediction (Mahajan et al. 2018: 1/k for each of an image's k tags), and the
    loss is -sum_c label_c log p_c, normalised as Caffe's modes do with every prediction valid."""
    type = "SoftmaxWithLoss"
    default_loss = True
    v1 = (21, "SOFTMAX_LOSS")
    bottom_roles = ("the scores", "the labels")
    messages = {"softmax_param": SOFTMAX, "loss_param": LOSS}
    n_tops = (1, 2)
    cpu_op = "softmax_loss"

    def shape(self, bottoms):
        x, labels = bottoms
        ax = canonical_axis(self.p.axis, len(x))
        if soft_labels(x, labels, ax):
            if self.p.ignore_label is not None:
                raise ShapeError("E0660", f"SoftmaxWithLoss '{self.name}': ignore_label applies to class-index labels, "
                                 f"but '{self.spec.bottoms[1]}' {fmt(labels)} has the scores' shape: soft labels",
                                 field="ignore_label", involves=(0, 1),
                                 help="remove ignore_label (every soft-label row counts), or give one class index "
                                      "per prediction")
            return [()] + ([x] if len(self.spec.tops) == 2 else [])
        outer, inner, have = count(x, 0, ax), count(x, ax + 1), count(labels)
        need = None if outer is None or inner is None else outer * inner
        if need is not None and have is not None and need != have:
            raise _label_count_error(self, "predictions", x, ax, labels, need, have)
        return [()] + ([x] if len(self.spec.tops) == 2 else [])

    def forward(self, xp, bottoms, params):
        x, labels = bottoms
        ax = self.p.axis % x.ndim
        outer, c = int(np.prod(x.shape[:ax])), x.shape[ax]
        prob = kernels.softmax(xp, x, ax)
        p2 = xp.moveaxis(prob, ax, -1).reshape(-1, c)       # (outer*inner, C)
        if soft_labels(x.shape, labels.shape, ax):
            return self._forward_soft(xp, x, labels, prob, p2, ax)
        lab = class_labels(xp, self, labels, c)
        valid = lab != self.p.ignore_label if self.p.ignore_label is not None else xp.ones(lab.shape, bool)
        safe = xp.where(valid, lab, 0)
        picked = p2[xp.arange(p2.shape[0]), safe]
        nll = -xp.log(xp.maximum(picked, FLT_MIN)) * valid
        norm = normalizer(normalization(self.p, "VALID"), outer, p2.shape[0] // outer, int(valid.sum()))
        loss = nll.sum() / norm
        tops = [loss.astype(x.dtype).reshape(())]
        if len(self.spec.tops) == 2:
            tops.append(prob)
        return tops, (prob, safe, valid, norm, ax)

    def _forward_soft(self, xp, x, labels, prob, p2, ax):
        """Soft labels (netdsl): loss = -sum_c label_c log p_c per prediction, every prediction valid."""
        lab = distribution_rows(xp, self, labels, ax)
        nll = -(lab * xp.log(xp.maximum(p2, FLT_MIN))).sum(axis=1)
        outer = math.prod(x.shape[:ax])
        norm = normalizer(normalization(self.p, "VALID"), outer, p2.shape[0] // outer, p2.shape[0])
        tops = [(nll.sum() / norm).astype(x.dtype).reshape(())]
        if len(self.spec.tops) == 2:
            tops.append(prob)
        return tops, (prob, lab, None, norm, ax)

    def backward(self, xp, saved, dtops, params, need):
        prob, safe, valid, norm, ax = saved
        c = prob.shape[ax]
        g = xp.moveaxis(prob, ax, -1).reshape(-1, c).copy()
        if valid is None:                  # soft labels: d/dx = p * sum(label) - label (sum(label) = 1)
            lab = safe
            g = g * lab.sum(axis=1, keepdims=True) - lab
            g *= dtops[0] / norm
            moved = xp.moveaxis(prob, ax, -1).shape
            return [xp.ascontiguousarray(xp.moveaxis(g.reshape(moved), -1, ax)), None], []
        g[xp.arange(g.shape[0]), safe] -= 1
        g *= (valid * (dtops[0] / norm)).astype(g.dtype)[:, None]
        moved = xp.moveaxis(prob, ax, -1).shape
        return [xp.ascontiguousarray(xp.moveaxis(g.reshape(moved), -1, ax)), None], []

    # -- graph mode (gpu/lower.py) ---------------------------------------------------------
    def lower_check(self, lw, step):
        _lower_check_nc(self, lw, step)
        x, label = (lw.shape(b) for b in step.node.bottoms)
        if soft_labels(x, label, self.p.axis % len(x)):
            raise Unsupported(f"SoftmaxWithLoss '{self.name}': soft labels (the graph-mode kernel takes class indices)")

    def lower_forward(self, lw, i, s):
        L = s.layer
        x, label = s.node.bottoms
        n, c = lw.shape(x)[0], lw.shape(x)[1]
        top = s.node.tops[0]
        grad = lw.train and s.need_backward and bool(s.propagate) and s.propagate[0]
        dx, acc = lw.grad_out(x) if grad else (None, False)
        ignore = L.p.ignore_label
        w = s.loss_weights[0] if s.loss_weights else 1.0
        to_hist = lw.train
        if not lw.train:
            if top not in lw.scalar_outputs:
                return
            accum = Ref(f"acc:{lw.name}", offset=lw.scalar_outputs.index(top), count=1)
            lw.outputs.append(top)
        else:
            accum = None
        params = dict(N=n, C=c, GRAD=int(grad), ACC_GRAD=int(acc), HAS_IGNORE=int(ignore is not None),
                      NORM=GPU_NORM[normalization(L.p, "VALID")], TO_HISTORY=int(to_hist), ADD=int(lw.losses_seen > 0))
        if lw.train:
            lw.losses_seen += 1
        lw.emit("softmax_loss", f"{L.name}", params,
                [lw.val(x), lw.val(label), dx, Ref("loss_hist", count=lw.window) if to_hist else None,
                 accum, Ref("counters", offset=lw.COUNTER_TRAIN, count=1) if to_hist else None,
                 np.int32(lw.window), np.int32(ignore if ignore is not None else -1), np.float32(w)],
                (1, 1, 1), note=f"softmax loss{' and its gradient' if grad else ''}")

    def lower_backward(self, lw, i, s):
        """Nothing: the forward kernel wrote the gradient."""


@register
class SigmoidCrossEntropyLoss(_Loss):
    type = "SigmoidCrossEntropyLoss"
    v1 = (27, "SIGMOID_CROSS_ENTROPY_LOSS")
    bottom_roles = ("the scores", "the targets")
    messages = {"loss_param": LOSS}

    def shape(self, bottoms):
        x, t = bottoms
        if count(x) is not None and count(t) is not None and count(x) != count(t):
            raise ShapeError("E0360", f"SigmoidCrossEntropyLoss '{self.name}': {count(t)} targets for "
                             f"{count(x)} inputs", involves=(0, 1),
                             notes=[f"input '{self.spec.bottoms[0]}' is {fmt(x)}", f"targets '{self.spec.bottoms[1]}' "
                                    f"is {fmt(t)}"], help="give one target per input value")
        return [()]

    def forward(self, xp, bottoms, params):
        x, t = bottoms
        t = t.reshape(x.shape).astype(x.dtype)
        valid = (t != self.p.ignore_label) if self.p.ignore_label is not None else xp.ones(x.shape, bool)
        pos = (x >= 0).astype(x.dtype)
        # log(1 + e^-|x|) form: never overflows
        loss_el = -(x * (t - pos) - xp.log1p(xp.exp(x - 2 * x * pos)))
        outer = x.shape[0]
        norm = normalizer(normalization(self.p, "BATCH_SIZE"), outer, x.size // outer, int(valid.sum()))
        loss = (loss_el * valid).sum() / norm
        return [loss.astype(x.dtype).reshape(())], (x, t, valid, norm)

    def backward(self, xp, saved, dtops, params, need):
        x, t, valid, norm = saved
        sig = 0.5 * xp.tanh(0.5 * x) + 0.5
        return [(sig - t) * valid * (dtops[0] / norm), None], []


@register
class EuclideanLoss(_Loss):
    type = "EuclideanLoss"
    v1 = (7, "EUCLIDEAN_LOSS")
    bottom_roles = ("the predictions", "the targets")

    def shape(self, bottoms):
        a, b = bottoms
        if count(a, 1) is not None and count(b, 1) is not None and count(a, 1) != count(b, 1) or \
                (a[0] is not None and b[0] is not None and a[0] != b[0]):
            raise ShapeError("E0360", f"EuclideanLoss '{self.name}': operands {fmt(a)} and {fmt(b)} differ",
                             involves=(0, 1), help="both bottoms need the same batch size and values per sample")
        return [()]

    def forward(self, xp, bottoms, params):
        a, b = bottoms
        diff = a - b.reshape(a.shape)
        n = a.shape[0]
        return [((diff * diff).sum() / (2 * n)).astype(a.dtype).reshape(())], (diff, n, b.shape)

    def backward(self, xp, saved, dtops, params, need):
        diff, n, bshape = saved
        g = diff * (dtops[0] / n)
        return [g, (-g).reshape(bshape)], []


@register
class SmoothL1Loss(_Loss):
    """caffe-fast-rcnn's SmoothL1Loss: sum(w_out * f(w_in * (x - t))) / N, f the smooth L1 with sigma."""
    type = "SmoothL1Loss"
    cpu_op = "smooth_l1_loss"
    bottom_roles = ("the predictions", "the targets", "the inside weights", "the outside weights")
    messages = {"smooth_l1_loss_param": Msg("SmoothL1LossParameter", {"sigma": F(float, 1.0)})}
    n_bottoms = (2, 4)

    def validate(self):
        if len(self.spec.bottoms) == 3:
            return [ShapeError("E0202", f"SmoothL1Loss '{self.name}' has 3 bottoms; it takes 2 (prediction, "
                               "target) or 4 (and inside and outside weights)",
                               help="add the outside weights as a 4th bottom, or drop the inside weights")]
        return []

    def shape(self, bottoms):
        x = bottoms[0]
        for i, s in enumerate(bottoms[1:], 1):
            if count(s) is not None and count(x) is not None and count(s) != count(x):
                role = ("target", "inside weights", "outside weights")[i - 1]
                raise ShapeError("E0360", f"SmoothL1Loss '{self.name}': {role} '{self.spec.bottoms[i]}' "
                                 f"{fmt(s)} does not match prediction '{self.spec.bottoms[0]}' {fmt(x)}",
                                 involves=(0, i), help=f"make the {role} {fmt(x)}: for an RPN, the box head "
                                                       "needs 4 x anchors outputs")
        return [()]

    def forward(self, xp, bottoms, params):
        x = bottoms[0]
        t = bottoms[1].reshape(x.shape)
        d = x - t
        if len(bottoms) == 4:
            d = d * bottoms[2].reshape(x.shape)
        s2 = self.p.sigma ** 2
        ad = xp.abs(d)
        small = ad < 1.0 / s2
        f = xp.where(small, 0.5 * s2 * d * d, ad - 0.5 / s2)
        if len(bottoms) == 4:
            f = f * bottoms[3].reshape(x.shape)
        n = x.shape[0]
        return [(f.sum() / n).astype(x.dtype).reshape(())], (d, small, n, bottoms)

    def backward(self, xp, saved, dtops, params, need):
        d, small, n, bottoms = saved
        s2 = self.p.sigma ** 2
        g = xp.where(small, s2 * d, xp.sign(d)) * (dtops[0] / n)
        if len(bottoms) == 4:
            g = g * bottoms[2].reshape(d.shape) * bottoms[3].reshape(d.shape)
        return [g, (-g).reshape(bottoms[1].shape)] + [None] * (len(bottoms) - 2), []


# ------------------------------------------------------------------ BVLC's other losses
KLOG_THRESHOLD = 1e-20       # Caffe's kLOG_THRESHOLD (loss_layer.hpp): the floor under a probability before its log


def _one_label_per_sample(layer, x: tuple, labels: tuple) -> None:
    """Caffe's (N, dim) losses (HingeLoss, MultinomialLogisticLoss): num = x.shape[0] samples,
    dim = count / num scores each, and one label per sample."""
    n, have = x[0] if x else None, count(labels)
    if n is not None and have is not None and n != have:
        flat = (n, count(x, 1))
        raise _label_count_error(layer, "samples", flat, 1, labels, n, have)


@register
class InfogainLoss(_Loss):
    """BVLC's InfogainLoss (the version with its own softmax): loss = -sum_l H[label, l] log(prob_l),
    prob = softmax(scores) on `axis`, normalised like SoftmaxWithLoss. H is the third bottom."""
    type = "InfogainLoss"
    v1 = (13, "INFOGAIN_LOSS")
    bottom_roles = ("the scores", "the labels", "the infogain matrix H (C x C)")
    messages = {"infogain_loss_param": Msg("InfogainLossParameter", {"source": F(str, ""), "axis": F(int, 1)}),
                "loss_param": LOSS}
    n_bottoms = (2, 3)
    n_tops = (1, 2)

    def validate(self):
        errs = []
        if self.p.source:
            errs.append(ShapeError(
                "E0109", f"InfogainLoss '{self.name}': reading the infogain matrix H from `source` "
                f"(\"{self.p.source}\") is not supported yet", field="source",
                notes=["Caffe reads H from a binaryproto file when the layer is set up; netdsl's layers read no "
                       "files, so H comes as a bottom"],
                help="remove `source` and pass H as a third bottom: an Input top fed with "
                     "netdsl.weights.read_blobproto(source)"))
        elif len(self.spec.bottoms) == 2:
            errs.append(ShapeError(
                "E0202", f"InfogainLoss '{self.name}' has 2 bottoms and no infogain matrix", field=None,
                help="pass H as a third bottom (a C x C blob); Caffe's `source` file is not supported yet"))
        if self.p.normalize is not None:
            errs.append(ShapeError(
                "E0108", f"InfogainLoss '{self.name}': the deprecated `normalize` is refused by Caffe's "
                "InfogainLoss", field="normalize",
                help=f"use `normalization: {'VALID' if self.p.normalize else 'BATCH_SIZE'}` instead"))
        return errs

    def shape(self, bottoms):
        x, labels = bottoms[0], bottoms[1]
        ax = canonical_axis(self.p.axis, len(x))
        outer, inner, have = count(x, 0, ax), count(x, ax + 1), count(labels)
        need = None if outer is None or inner is None else outer * inner
        if need is not None and have is not None and need != have:
            raise _label_count_error(self, "predictions", x, ax, labels, need, have)
        c = x[ax]
        if len(bottoms) == 3 and c is not None and count(bottoms[2]) not in (None, c * c):
            raise ShapeError("E0360", f"InfogainLoss '{self.name}': H '{self.spec.bottoms[2]}' {fmt(bottoms[2])} "
                             f"holds {count(bottoms[2])} values, but {c} classes need a {c} x {c} matrix",
                             involves=(0, 2), notes=[f"the classes are on axis {ax} of '{self.spec.bottoms[0]}' "
                                                     f"{fmt(x)}"],
                             help=f"give H as a {c} x {c} blob (row = true label, column = predicted class)")
        return [()] + ([x] if len(self.spec.tops) == 2 else [])

    def forward(self, xp, bottoms, params):
        x, labels, h = bottoms
        ax = self.p.axis % x.ndim
        c = x.shape[ax]
        outer = math.prod(x.shape[:ax])
        prob = kernels.softmax(xp, x, ax)
        p2 = xp.moveaxis(prob, ax, -1).reshape(-1, c)            # (outer*inner, C)
        lab = class_labels(xp, self, labels, c)
        valid = lab != self.p.ignore_label if self.p.ignore_label is not None else xp.ones(lab.shape, bool)
        rows = h.reshape(c, c).astype(x.dtype)[xp.where(valid, lab, 0)]   # H[label, :] per prediction
        nll = -(rows * xp.log(xp.maximum(p2, KLOG_THRESHOLD))).sum(axis=1) * valid
        norm = normalizer(normalization(self.p, "VALID"), outer, p2.shape[0] // outer, int(valid.sum()))
        tops = [(nll.sum() / norm).astype(x.dtype).reshape(())]
        if len(self.spec.tops) == 2:
            tops.append(prob)
        return tops, (prob, rows, valid, norm, ax)

    def backward(self, xp, saved, dtops, params, need):
        """Caffe's gradient: prob * sum_l H[label, l] - H[label, :] (the clamp does not enter it)."""
        prob, rows, valid, norm, ax = saved
        c = prob.shape[ax]
        moved = xp.moveaxis(prob, ax, -1)
        g = moved.reshape(-1, c) * rows.sum(axis=1, keepdims=True) - rows
        g *= (valid * (dtops[0] / norm)).astype(g.dtype)[:, None]
        return [xp.ascontiguousarray(xp.moveaxis(g.reshape(moved.shape), -1, ax)), None, None], []


@register
class HingeLoss(_Loss):
    """BVLC's one-vs-all hinge loss: t = -1 for the true class, +1 for the others;
    L1 sum(max(0, 1 + t x)) / N, L2 sum(max(0, 1 + t x)^2) / N."""
    type = "HingeLoss"
    v1 = (28, "HINGE_LOSS")
    bottom_roles = ("the scores", "the labels")
    messages = {"hinge_loss_param": Msg("HingeLossParameter", {"norm": F("enum", "L1", choices=("L1", "L2"))})}

    def shape(self, bottoms):
        _one_label_per_sample(self, *bottoms)
        return [()]

    def forward(self, xp, bottoms, params):
        x, labels = bottoms
        n = x.shape[0]
        x2 = x.reshape(n, -1)
        lab = class_labels(xp, self, labels, x2.shape[1])
        t = xp.where(xp.arange(x2.shape[1])[None, :] == lab[:, None], -1, 1).astype(x.dtype)
        m = xp.maximum(1 + t * x2, 0)                 # Caffe's bottom_diff after forward
        loss = (m.sum() if self.p.norm == "L1" else (m * m).sum()) / n
        return [loss.astype(x.dtype).reshape(())], (t * m, n, x.shape)

    def backward(self, xp, saved, dtops, params, need):
        g, n, shape = saved                          # t * max(0, 1 + t x)
        if self.p.norm == "L1":
            g = xp.sign(g) * (dtops[0] / n)          # caffe_cpu_sign: 0 where the margin is met
        else:
            g = g * (2 * dtops[0] / n)
        return [g.reshape(shape), None], []


@register
class MultinomialLogisticLoss(_Loss):
    """BVLC's MultinomialLogisticLoss: probabilities in (no softmax),
    loss = -sum log(max(p[label], kLOG_THRESHOLD)) / N."""
    type = "MultinomialLogisticLoss"
    v1 = (16, "MULTINOMIAL_LOGISTIC_LOSS")
    bottom_roles = ("the probabilities", "the labels")

    def shape(self, bottoms):
        _one_label_per_sample(self, *bottoms)
        return [()]

    def forward(self, xp, bottoms, params):
        p, labels = bottoms
        n = p.shape[0]
        p2 = p.reshape(n, -1)
        lab = class_labels(xp, self, labels, p2.shape[1])
        picked = xp.maximum(p2[xp.arange(n), lab], KLOG_THRESHOLD)
        loss = -xp.log(picked).sum() / n
        return [loss.astype(p.dtype).reshape(())], (picked, lab, p.shape)

    def backward(self, xp, saved, dtops, params, need):
        picked, lab, shape = saved
        n = shape[0]
        g = xp.zeros((n, math.prod(shape[1:])), picked.dtype)
        g[xp.arange(n), lab] = -(dtops[0] / n) / picked      # Caffe: scale / max(p, threshold)
        return [g.reshape(shape), None], []


@register
class ContrastiveLoss(_Loss):
    """BVLC's ContrastiveLoss on pairs (a, b) with similarity y: d = ||a - b||, loss =
    sum(y d^2 + (1 - y) max(margin - d, 0)^2) / 2N (legacy_version: max(margin - d^2, 0))."""
    type = "ContrastiveLoss"
    v1 = (37, "CONTRASTIVE_LOSS")
    bottom_roles = ("the first features (N x C)", "the second features (N x C)", "the similarity labels (N)")
    messages = {"contrastive_loss_param": Msg("ContrastiveLossParameter", {
        "margin": F(float, 1.0), "legacy_version": F(bool, False)})}
    n_bottoms = (3, 3)

    def shape(self, bottoms):
        a, b, y = bottoms
        for i, s in ((0, a), (1, b)):
            if len(s) < 2 or any(d not in (1, None) for d in s[2:]):
                raise ShapeError("E0221", f"ContrastiveLoss '{self.name}': features '{self.spec.bottoms[i]}' must be "
                                 f"N x C (or N x C x 1 x 1), got {fmt(s)}", involves=(i,),
                                 help="flatten them first (an InnerProduct or a Flatten layer)")
        if (a[0] is not None and b[0] is not None and a[0] != b[0]) or \
                (a[1] is not None and b[1] is not None and a[1] != b[1]):
            raise ShapeError("E0360", f"ContrastiveLoss '{self.name}': the pair's features differ: "
                             f"{fmt(a)} and {fmt(b)}", involves=(0, 1),
                             help="both bottoms need the same batch size and feature count (the two branches "
                                  "of a siamese net)")
        if a[0] is not None and count(y) is not None and count(y) != a[0]:
            raise ShapeError("E0360", f"ContrastiveLoss '{self.name}': {count(y)} similarity labels for "
                             f"{a[0]} pairs", involves=(0, 2), help=f"give one 0/1 label per pair: a blob of shape "
                                                                     f"{a[0]}")
        return [()]

    def forward(self, xp, bottoms, params):
        a, b, y = bottoms
        n, margin = a.shape[0], self.p.margin
        d = (a - b.reshape(a.shape)).reshape(n, -1)
        dist_sq = (d * d).sum(axis=1)
        similar = y.reshape(-1).astype(xp.int64) != 0            # Caffe's static_cast<int>(y)
        if self.p.legacy_version:
            far = xp.maximum(margin - dist_sq, 0)
        else:
            far = xp.maximum(margin - xp.sqrt(dist_sq), 0) ** 2
        loss = xp.where(similar, dist_sq, far).sum() / n / 2
        return [loss.astype(a.dtype).reshape(())], (d, dist_sq, similar, a.shape, b.shape)

    def backward(self, xp, saved, dtops, params, need):
        """Caffe's gradient; without legacy_version it divides by d + 1e-4 (not d), as Caffe does."""
        d, dist_sq, similar, ashape, bshape = saved
        margin = self.p.margin
        if self.p.legacy_version:
            far = xp.where(margin - dist_sq > 0, -1, 0).astype(d.dtype)
        else:
            dist = xp.sqrt(dist_sq)
            mdist = margin - dist
            far = xp.where(mdist > 0, -mdist / (dist + 1e-4), 0).astype(d.dtype)
        coef = xp.where(similar, 1, far).astype(d.dtype) * (dtops[0] / d.shape[0])
        g = coef[:, None] * d
        return [g.reshape(ashape), (-g).reshape(bshape), None], []


@register
class Accuracy(Layer):
    type = "Accuracy"
    v1 = (1, "ACCURACY")
    bottom_roles = ("the scores", "the labels")
    messages = {"accuracy_param": Msg("AccuracyParameter", {"top_k": F(int, 1), "axis": F(int, 1),
                                                            "ignore_label": F(int, None)})}
    n_bottoms, n_tops = (2, 2), (1, 2)
    no_backward = True
    is_sink = True

    def shape(self, bottoms):
        x, labels = bottoms
        ax = canonical_axis(self.p.axis, len(x))
        outer, inner = count(x, 0, ax), count(x, ax + 1)
        need = None if outer is None or inner is None else outer * inner
        if need is not None and count(labels) is not None and need != count(labels):
            raise _label_count_error(self, "predictions", x, ax, labels, need, count(labels))
        if x[ax] is not None and self.p.top_k > x[ax]:
            raise ShapeError("E0361", f"Accuracy '{self.name}': top_k {self.p.top_k} exceeds the {x[ax]} classes",
                             field="top_k", involves=(0,), help=f"use `top_k: {x[ax]}` or less")
        return [()] + ([(x[ax],)] if len(self.spec.tops) == 2 else [])

    def forward(self, xp, bottoms, params):
        x, labels = bottoms
        ax = self.p.axis % x.ndim
        c = x.shape[ax]
        s = xp.moveaxis(x, ax, -1).reshape(-1, c)
        lab = class_labels(xp, self, labels, c)
        valid = lab != self.p.ignore_label if self.p.ignore_label is not None else xp.ones(lab.shape, bool)
        safe = xp.where(valid, lab, 0)
        true_score = s[xp.arange(s.shape[0]), safe][:, None]
        # Caffe: correct iff fewer than top_k other classes score >= the true class (ties count against)
        better = (s >= true_score).sum(axis=1) - 1
        correct = (better < self.p.top_k) & valid
        n = int(valid.sum())
        acc = xp.asarray(float(correct.sum()) / n if n else 0.0, dtype=x.dtype)
        tops = [acc.reshape(())]
        if len(self.spec.tops) == 2:
            per = xp.zeros(c, dtype=x.dtype)
            for k in range(c):
                sel = valid & (lab == k)
                m = int(sel.sum())
                per[k] = float((correct & sel).sum()) / m if m else 0.0
            tops.append(per)
        return tops, None

    # -- graph mode (gpu/lower.py) ---------------------------------------------------------
    lower_check = _lower_check_nc

    def lower_forward(self, lw, i, s):
        if lw.train:
            return                            # the train loop reports only the loss
        L = s.layer
        x, label = s.node.bottoms
        top = s.node.tops[0]
        if top not in lw.scalar_outputs:
            return
        n, c = lw.shape(x)[0], lw.shape(x)[1]
        ignore = L.p.ignore_label
        lw.outputs.append(top)
        lw.emit("accuracy", L.name, dict(N=n, C=c, TOPK=L.p.top_k, HAS_IGNORE=int(ignore is not None)),
                [lw.val(x), lw.val(label), Ref(f"acc:{lw.name}", offset=lw.scalar_outputs.index(top), count=1),
                 np.int32(ignore if ignore is not None else -1)], (1, 1, 1))


def decode_tags(xp, probs, mode: str, threshold: float, top_k: int):
    """(M, C) class probabilities -> (M, C) multi-hot predictions.

    CUMULATIVE: the classes in descending probability (ties: the lower index first), taken while the
    sum of those taken before is below `threshold`, so at least one. No fixed threshold on p fits
    softmax outputs, where a lone tag scores about 1 and each of two tags about 0.5; the cumulative
    rule takes one tag from [0.97, 0.02, ...] and two from [0.5, 0.48, ...] at threshold 0.95.
    TOP_K: the `top_k` most probable classes. THRESHOLD: every class with p >= threshold (sigmoid
    outputs, one independent probability per class)."""
    if mode == "THRESHOLD":
        return (probs >= threshold).astype(probs.dtype)
    m, c = probs.shape
    order = xp.argsort(-probs, axis=1, kind="stable")
    if mode == "TOP_K":
        keep = xp.broadcast_to(xp.arange(c) < top_k, (m, c))
    else:
        ranked = xp.take_along_axis(probs, order, axis=1)
        before = xp.cumsum(ranked, axis=1) - ranked       # the mass of the classes ranked above
        keep = before < threshold
        keep[:, 0] = True
    out = xp.zeros(probs.shape, probs.dtype)
    out[xp.arange(m)[:, None], order] = keep.astype(probs.dtype)
    return out


@register
class MultiLabelDecode(Layer):
    """netdsl: class probabilities (from Softmax or Sigmoid) -> a multi-hot prediction of the same
    shape, by the cumulative rule (default), top-k or a fixed threshold (see decode_tags). A second
    bottom, the ground truth (soft or multi-hot labels, a tag wherever > 0), is read only by
    `netdsl test`, which scores the predictions with per-sample F1, precision, recall and mAP."""
    type = "MultiLabelDecode"
    bottom_roles = ("the class probabilities", "the ground-truth labels (read by `netdsl test`)")
    messages = {"multilabel_decode_param": Msg("MultiLabelDecodeParameter", {
        "mode": F("enum", "CUMULATIVE", choices=("CUMULATIVE", "TOP_K", "THRESHOLD")),
        "threshold": F(float, 0.95, doc="CUMULATIVE: the probability mass to cover; THRESHOLD: the least p"),
        "top_k": F(int, 1), "axis": F(int, 1)})}
    n_bottoms, n_tops = (1, 2), (1, 1)
    no_backward = True
    is_sink = True
    decodes_tags = True

    def validate(self):
        p = self.p
        if p.mode != "TOP_K" and not 0 < p.threshold <= 1:
            return [ShapeError("E0107", f"MultiLabelDecode '{self.name}': threshold {p.threshold:g} is outside (0, 1]",
                               field="threshold", help="e.g. `threshold: 0.95` (CUMULATIVE) or `threshold: 0.5` "
                                                       "(THRESHOLD)")]
        if p.mode == "TOP_K" and p.top_k < 1:
            return [ShapeError("E0107", f"MultiLabelDecode '{self.name}': top_k must be at least 1, got {p.top_k}",
                               field="top_k", help="e.g. `top_k: 2`")]
        return []

    def shape(self, bottoms):
        x = bottoms[0]
        ax = canonical_axis(self.p.axis, len(x))
        if len(bottoms) == 2 and count(bottoms[1]) is not None and count(x) is not None and \
                tuple(bottoms[1]) != tuple(x):
            raise ShapeError("E0360", f"MultiLabelDecode '{self.name}': labels '{self.spec.bottoms[1]}' "
                             f"{fmt(bottoms[1])} do not have the probabilities' shape {fmt(x)}", involves=(0, 1),
                             help="give one label per class per sample: soft labels or a multi-hot blob of the "
                                  "probabilities' shape")
        if self.p.mode == "TOP_K" and x[ax] is not None and self.p.top_k > x[ax]:
            raise ShapeError("E0361", f"MultiLabelDecode '{self.name}': top_k {self.p.top_k} exceeds the {x[ax]} "
                             "classes", field="top_k", involves=(0,), help=f"use `top_k: {x[ax]}` or less")
        return [x]

    def forward(self, xp, bottoms, params):
        x = bottoms[0]
        ax = self.p.axis % x.ndim
        rows = xp.moveaxis(x, ax, -1)
        pred = decode_tags(xp, rows.reshape(-1, x.shape[ax]), self.p.mode, self.p.threshold, self.p.top_k)
        return [xp.ascontiguousarray(xp.moveaxis(pred.reshape(rows.shape), -1, ax))], None
