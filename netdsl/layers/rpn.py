"""Region proposal layers: AnchorTarget and Proposal (built in, not Python layers), ROIPooling
(checked only), and py-faster-rcnn's Python layers mapped onto them for checking."""
from __future__ import annotations

import ast

import numpy as np

from .. import boxes
from ..registry import F, Layer, Msg, ShapeError, fmt, register

ANCHORS = {
    "feat_stride": F(int, 16, doc="the backbone's total stride in pixels"),
    "base_size": F(int, 16), "scales": F(float, repeated=True), "ratios": F(float, repeated=True),
}
DEFAULT_SCALES, DEFAULT_RATIOS = (8.0, 16.0, 32.0), (0.5, 1.0, 2.0)


class _AnchorLayer(Layer):
    no_backward = True

    def scales(self):
        return tuple(self.p.scales) or DEFAULT_SCALES

    def ratios(self):
        return tuple(self.p.ratios) or DEFAULT_RATIOS

    def num_anchors(self) -> int:
        return len(self.scales()) * len(self.ratios())

    def anchors(self) -> np.ndarray:
        return boxes.generate_anchors(self.p.base_size, self.ratios(), self.scales())

    def anchor_note(self) -> str:
        return (f"A = {len(self.scales())} scales x {len(self.ratios())} ratios = {self.num_anchors()} anchors per "
                f"cell ({self.type} '{self.name}')")

    def check_head(self, shape, i: int, per_anchor: int, head: str):
        """The score head must have 2A channels and the box head 4A."""
        a = self.num_anchors()
        c = shape[1] if len(shape) == 4 else None
        if len(shape) != 4:
            raise ShapeError("E0370", f"{self.type} '{self.name}': '{self.spec.bottoms[i]}' must be 1 x {per_anchor}A"
                             f" x H x W, got {fmt(shape)}", involves=(i,), help="feed the RPN head's 4-D output")
        if c is not None and c != per_anchor * a:
            raise ShapeError("E0371", f"{self.type} '{self.name}': {head} '{self.spec.bottoms[i]}' has {c} channels "
                             f"but {per_anchor} x {a} anchors = {per_anchor * a} are needed",
                             involves=(i,), notes=[self.anchor_note()],
                             help=f"set num_output: {per_anchor * a} on the {head} convolution (and Reshape dims "
                                  f"around the softmax to {2 * a}), or change scales/ratios to give "
                                  f"{c // per_anchor if c % per_anchor == 0 else '?'} anchors")
        if shape[0] not in (1, None):
            raise ShapeError("E0372", f"{self.type} '{self.name}' handles one image per batch, got batch {shape[0]}",
                             involves=(i,), help="use batch size 1 for detection nets (as py-faster-rcnn does)")


@register
class AnchorTarget(_AnchorLayer):
    """Labels anchors (1 fg, 0 bg, -1 ignore) and computes box targets and weights (rpn_spec 3)."""
    type = "AnchorTarget"
    messages = {"anchor_target_param": Msg("AnchorTargetParameter", {
        **ANCHORS, "allowed_border": F(int, 0), "positive_overlap": F(float, 0.7),
        "negative_overlap": F(float, 0.3), "clobber_positives": F(bool, False), "batch_size": F(int, 256),
        "fg_fraction": F(float, 0.5), "positive_weight": F(float, -1.0), "seed": F(int, 3)})}
    n_bottoms, n_tops = (3, 4), (4, 4)
    # The executor hands a random layer a generator seeded from (net seed, step, forward count)
    # before every forward, so sampling is reproducible and a resumed run continues the same
    # sequence; anchor_target_param.seed is mixed in so it changes the sampling too.
    random = True

    def shape(self, bottoms):
        score, gt, info = bottoms[:3]
        self.check_head(score, 0, 2, "score head")
        if len(gt) != 2 or gt[1] not in (5, None):
            raise ShapeError("E0373", f"AnchorTarget '{self.name}': gt_boxes '{self.spec.bottoms[1]}' must be G x 5 "
                             f"(x1, y1, x2, y2, class), got {fmt(gt)}", involves=(1,), help="feed DigitScenes' gt_boxes")
        a, h, w = self.num_anchors(), score[2], score[3]
        return [(1, 1, None if h is None else a * h, w)] + [(1, 4 * a, h, w)] * 3

    def generator(self) -> np.random.Generator:
        """The sampling generator of this forward: anchor_target_param.seed mixed with the
        executor's per-forward stream (only the seed when run outside an executor)."""
        base = getattr(self, "rng", None)
        draw = int(base.integers(2 ** 63)) if base is not None else 0
        return np.random.default_rng([self.p.seed, draw])

    def forward(self, xp, bottoms, params):
        p = self.p
        score, gt, info = (np.asarray(b.get() if hasattr(b, "get") else b) for b in bottoms[:3])
        out = boxes.anchor_targets(score.shape[2], score.shape[3], gt, info.reshape(-1), self.generator(),
                                   feat_stride=p.feat_stride, anchors=self.anchors(), allowed_border=p.allowed_border,
                                   positive_overlap=p.positive_overlap, negative_overlap=p.negative_overlap,
                                   clobber_positives=p.clobber_positives, batch_size=p.batch_size,
                                   fg_fraction=p.fg_fraction, positive_weight=p.positive_weight)
        return [xp.asarray(o) for o in out], None

    def backward(self, xp, saved, dtops, params, need):
        return [None] * len(self.spec.bottoms), []


PROPOSAL_DEFAULTS = {"TRAIN": (12000, 2000), "TEST": (6000, 300)}


@register
class Proposal(_AnchorLayer):
    """Decodes anchors with the box head, clips, filters, NMS (rpn_spec 6): rois R x 5 [, scores R x 1]."""
    type = "Proposal"
    messages = {"proposal_param": Msg("ProposalParameter", {
        **ANCHORS, "pre_nms_top_n": F(int, None), "post_nms_top_n": F(int, None), "nms_thresh": F(float, 0.7),
        "min_size": F(int, 16)})}
    n_bottoms, n_tops = (3, 3), (1, 2)

    def top_n(self):
        pre, post = PROPOSAL_DEFAULTS["TRAIN" if self.phase == "TRAIN" else "TEST"]
        p = self.p
        return (pre if p.pre_nms_top_n is None else p.pre_nms_top_n,
                post if p.post_nms_top_n is None else p.post_nms_top_n)

    def shape(self, bottoms):
        prob, deltas, info = bottoms
        self.check_head(prob, 0, 2, "score head")
        self.check_head(deltas, 1, 4, "box head")
        if prob[2:] != deltas[2:] and None not in prob[2:] + deltas[2:]:
            raise ShapeError("E0374", f"Proposal '{self.name}': scores {fmt(prob)} and box deltas {fmt(deltas)} "
                             "cover different feature maps", involves=(0, 1),
                             help="both heads must run on the same feature map")
        return [(None, 5), (None, 1)][: len(self.spec.tops)]       # the box count depends on the data

    def forward(self, xp, bottoms, params):
        p = self.p
        prob, deltas, info = (np.asarray(b.get() if hasattr(b, "get") else b) for b in bottoms)
        pre, post = self.top_n()
        rois, scores = boxes.proposals(prob, deltas, info.reshape(-1), feat_stride=p.feat_stride,
                                       anchors=self.anchors(), pre_nms_top_n=pre, post_nms_top_n=post,
                                       nms_thresh=p.nms_thresh, min_size=p.min_size)
        return [xp.asarray(rois), xp.asarray(scores)][: len(self.spec.tops)], None

    def backward(self, xp, saved, dtops, params, need):
        return [None] * 3, []


@register
class ROIPooling(Layer):
    """caffe-fast-rcnn's ROIPooling: checked (shape rule) so Fast R-CNN files check; not runnable."""
    type = "ROIPooling"
    runnable = False
    messages = {"roi_pooling_param": Msg("ROIPoolingParameter", {
        "pooled_h": F(int, 0), "pooled_w": F(int, 0), "spatial_scale": F(float, 1.0)})}
    n_bottoms = (2, 2)

    def shape(self, bottoms):
        x, rois = bottoms
        if len(rois) != 2 or rois[1] not in (5, None):
            raise ShapeError("E0373", f"ROIPooling '{self.name}': rois must be R x 5, got {fmt(rois)}", involves=(1,),
                             help="feed a Proposal layer's rois")
        return [(rois[0], x[1], self.p.pooled_h, self.p.pooled_w)]


# py-faster-rcnn's Python layers, checked as netdsl's built-in equivalents (never imported)
KNOWN_PYTHON = {
    "rpn.anchor_target_layer.AnchorTargetLayer": "AnchorTarget",
    "rpn.proposal_layer.ProposalLayer": "Proposal",
    "roi_data_layer.layer.RoIDataLayer": "RoIData",
    "rpn.proposal_target_layer.ProposalTargetLayer": "ProposalTarget",
}


@register
class Python(Layer):
    """Recognised, never executed: netdsl does not import arbitrary modules named by a net file."""
    type = "Python"
    runnable = False
    messages = {"python_param": Msg("PythonParameter", {
        "module": F(str, ""), "layer": F(str, ""), "param_str": F(str, ""), "share_in_parallel": F(bool, False)})}
    n_bottoms, n_tops = (0, None), (0, None)

    def qualname(self) -> str:
        return f"{self.p.module}.{self.p.layer}"

    def options(self) -> dict:
        try:
            v = ast.literal_eval("{" + self.p.param_str + "}") if self.p.param_str.strip() else {}
            return v if isinstance(v, dict) else {}
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):   # not a dict literal
            return {}

    def anchor_scales(self) -> tuple:
        """py-faster-rcnn's anchor layers take `'scales': (8, 16, 32)` in param_str; ratios are fixed."""
        s = self.options().get("scales", DEFAULT_SCALES)
        return tuple(s) if isinstance(s, (list, tuple)) else (s,)

    def num_anchors(self) -> int:
        return len(self.anchor_scales()) * len(DEFAULT_RATIOS)

    def anchor_note(self) -> str:
        n = len(self.anchor_scales())
        return (f"A = {n} scales x {len(DEFAULT_RATIOS)} ratios = {self.num_anchors()} anchors per cell (Python layer "
                f"'{self.name}', {self.qualname()})")

    def shape(self, bottoms):
        kind = KNOWN_PYTHON.get(self.qualname())
        opts = self.options()
        if kind == "AnchorTarget" or kind == "Proposal":
            if not bottoms:
                raise ShapeError("E0202", f"Python layer '{self.name}' ({self.qualname()}) reads the RPN scores as "
                                 "its first bottom, but has no bottoms", field="module",
                                 help="give it the bottoms of py-faster-rcnn's layer (scores first)")
            a = self.num_anchors()
            score = bottoms[0]
            if len(score) == 4 and score[1] is not None and score[1] != 2 * a:
                raise ShapeError("E0371", f"Python layer '{self.name}' ({self.qualname()}): score input "
                                 f"'{self.spec.bottoms[0]}' has {score[1]} channels but 2 x {a} anchors = {2 * a} "
                                 "are needed", involves=(0,), notes=[self.anchor_note()],
                                 help=f"set num_output: {2 * a} on the score head")
            h, w = (score[2], score[3]) if len(score) == 4 else (None, None)
            if kind == "AnchorTarget":
                return [(1, 1, None if h is None else a * h, w)] + [(1, 4 * a, h, w)] * 3
            return [(None, 5), (None, 1)][: len(self.spec.tops)]
        if kind == "RoIData":
            return [None, (1, 3), (None, 5)][: len(self.spec.tops)]
        if kind == "ProposalTarget":
            k = opts.get("num_classes", 21)
            k = k if isinstance(k, int) and k > 0 else 21
            return [(None, 5), (None,), (None, 4 * k), (None, 4 * k), (None, 4 * k)][: len(self.spec.tops)]
        same = ",".join("?" if d is None else str(d) for d in bottoms[0]) if bottoms else "N,C,H,W"
        flags = " ".join(f"--shape {t}={same}" for t in self.spec.tops)
        raise ShapeError("E0602", f"Python layer '{self.name}' ({self.qualname()}) cannot be checked: netdsl "
                         "does not import or run Python modules named by a net file", field="module",
                         notes=["netdsl knows py-faster-rcnn's layers: "
                                + ", ".join(sorted(KNOWN_PYTHON))],
                         help=(f"give the shapes of its tops, e.g. `{flags}` if it keeps its input's shape, or "
                               "replace it with a built-in layer type") if self.spec.tops else
                              "replace it with a built-in layer type, or remove it")
