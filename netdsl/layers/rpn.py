"""Region proposal layers: AnchorTarget and Proposal (built in, not Python layers), caffe-fast-rcnn's
ROIPooling, and py-faster-rcnn's Python layers mapped onto them for checking."""
from __future__ import annotations

from dataclasses import replace
from functools import cache

import numpy as np

from .. import boxes
from ..errors import Collector
from ..graph import Graph
from ..registry import F, Layer, LayerSpec, Msg, ShapeError, fmt, layer_types, register
from ..schema import defaults

ANCHORS = {
    "feat_stride": F(int, 16, doc="the backbone's total stride in pixels"),
    "base_size": F(int, 16), "scales": F(float, repeated=True), "ratios": F(float, repeated=True),
}
DEFAULT_SCALES, DEFAULT_RATIOS = (8.0, 16.0, 32.0), (0.5, 1.0, 2.0)


class _AnchorLayer(Layer):
    no_backward = True

    @classmethod
    def check_net(cls, checking):
        if checking.once("rpn anchors"):
            check_anchors(checking)

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
    bottom_roles = ("the RPN score map", "gt_boxes", "im_info")
    # The Net hands a stateful layer a generator seeded from (net seed, step, forward count)
    # before every forward, so sampling is reproducible and a resumed run continues the same
    # sequence; anchor_target_param.seed is mixed in so it changes the sampling too.
    stateful = True

    def shape(self, bottoms):
        score, gt, info = bottoms[:3]
        self.check_head(score, 0, 2, "score head")
        if len(gt) != 2 or gt[1] not in (5, None):
            raise ShapeError("E0373", f"AnchorTarget '{self.name}': gt_boxes '{self.spec.bottoms[1]}' must be G x 5 "
                             f"(x1, y1, x2, y2, class), got {fmt(gt)}", involves=(1,), help="feed DigitScenes' gt_boxes")
        a, h, w = self.num_anchors(), score[2], score[3]
        return [(1, 1, None if h is None else a * h, w)] + [(1, 4 * a, h, w)] * 3

    def generator(self, state) -> np.random.Generator:
        return sampling_rng(self.p.seed, state)

    def forward(self, xp, bottoms, params, state):
        p = self.p
        score, gt, info = (np.asarray(b.get() if hasattr(b, "get") else b) for b in bottoms[:3])
        out = boxes.anchor_targets(score.shape[2], score.shape[3], gt, info.reshape(-1), self.generator(state),
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
    makes_proposals = True
    messages = {"proposal_param": Msg("ProposalParameter", {
        **ANCHORS, "pre_nms_top_n": F(int, None), "post_nms_top_n": F(int, None), "nms_thresh": F(float, 0.7),
        "min_size": F(int, 16)})}
    n_bottoms, n_tops = (3, 3), (1, 2)
    bottom_roles = ("the RPN class probabilities", "the RPN box deltas", "im_info")

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
    """caffe-fast-rcnn's ROIPoolingLayer: max pooling of each region of interest (batch index, x1,
    y1, x2, y2 in image pixels, inclusive corners) into pooled_h x pooled_w bins of the feature map.
    Corners are scaled by spatial_scale and rounded (C's round: halves away from zero); an RoI is
    at least 1 x 1 cells; bin (i, j) spans floor(i * roi_h / pooled_h) .. ceil((i + 1) * roi_h /
    pooled_h) from the RoI's corner, clipped to the map; an empty bin gives 0. The first maximum in
    row-major order wins; backward routes each bin's gradient to it, only where it lies inside the
    rounded RoI (Caffe's backward loops, CPU and GPU, visit nothing else). No gradient to the rois."""
    type = "ROIPooling"
    bottom_roles = ("the feature map", "the rois")
    messages = {"roi_pooling_param": Msg("ROIPoolingParameter", {
        "pooled_h": F(int, 0), "pooled_w": F(int, 0), "spatial_scale": F(float, 1.0)})}
    n_bottoms = (2, 2)
    FLT_MAX = float(np.finfo(np.float32).max)      # every bin starts at -FLT_MAX, as in Caffe

    def validate(self):
        return [ShapeError("E0107", f"ROIPooling '{self.name}': `{name}` must be positive, got {getattr(self.p, name)}",
                           field=name if self.p.has(name) else None,
                           help=f"set `{name}` in roi_pooling_param (7 for the VGG16 / ZF Fast R-CNN heads)")
                for name in ("pooled_h", "pooled_w") if getattr(self.p, name) <= 0]

    def shape(self, bottoms):
        x, rois = bottoms
        if len(x) != 4:
            raise ShapeError("E0221", f"ROIPooling '{self.name}' needs a 4-D N x C x H x W feature map, got {fmt(x)}",
                             involves=(0,), help="pool a convolutional feature map")
        if len(rois) != 2 or rois[1] not in (5, None):
            raise ShapeError("E0373", f"ROIPooling '{self.name}': rois must be R x 5, got {fmt(rois)}", involves=(1,),
                             help="feed a Proposal layer's rois")
        return [(rois[0], x[1], self.p.pooled_h, self.p.pooled_w)]

    def _bins(self, xp, dtype, size: int, pooled: int, lo, hi):
        """Caffe's bin edges along one axis, in the net's precision: (start, end), each R x pooled,
        relative to the map and clipped to [0, size]."""
        extent = xp.maximum(hi - lo + 1, 1).astype(dtype)             # malformed RoIs become 1 cell
        step = extent / dtype.type(pooled)
        k = xp.arange(pooled + 1, dtype=dtype)[None, :] * step[:, None]
        start = xp.floor(k[:, :-1]).astype(xp.int64) + lo[:, None]
        end = xp.ceil(k[:, 1:]).astype(xp.int64) + lo[:, None]
        return xp.clip(start, 0, size), xp.clip(end, 0, size)

    def forward(self, xp, bottoms, params):
        x, rois = bottoms
        n, c, h, w = x.shape
        r = rois.reshape(-1, 5)
        nr, dtype = r.shape[0], x.dtype
        batch = r[:, 0].astype(xp.int64)                                 # C's int conversion truncates
        if nr and (int(batch.min()) < 0 or int(batch.max()) >= n):
            raise ValueError(f"ROIPooling '{self.name}': an RoI's batch index is outside [0, {n})")
        scaled = r[:, 1:].astype(dtype) * dtype.type(self.p.spatial_scale)
        whole = xp.trunc(scaled)
        corners = (whole + xp.sign(scaled) * (xp.abs(scaled - whole) >= 0.5)).astype(xp.int64)   # C's round()
        x1, y1, x2, y2 = corners[:, 0], corners[:, 1], corners[:, 2], corners[:, 3]
        hs, he = self._bins(xp, dtype, h, self.p.pooled_h, y1, y2)
        ws, we = self._bins(xp, dtype, w, self.p.pooled_w, x1, x2)
        y = xp.full((nr, c, self.p.pooled_h, self.p.pooled_w), -self.FLT_MAX, dtype)
        arg = xp.full(y.shape, -1, xp.int64)                            # Caffe's argmax: h * W + w, -1 if none
        kh = int((he - hs).max()) if nr else 0
        kw = int((we - ws).max()) if nr else 0
        bi = batch[:, None, None]
        for i in range(kh):                       # offsets within a bin in row-major order: the first max wins
            rows, in_h = xp.minimum(hs + i, h - 1), hs + i < he
            for j in range(kw):
                cols, in_w = xp.minimum(ws + j, w - 1), ws + j < we
                v = xp.moveaxis(x[bi, :, rows[:, :, None], cols[:, None, :]], -1, 1)    # R x C x PH x PW
                better = (in_h[:, :, None] & in_w[:, None, :])[:, None] & (v > y)
                y = xp.where(better, v, y)
                arg = xp.where(better, (rows[:, :, None] * w + cols[:, None, :])[:, None], arg)
        empty = (he <= hs)[:, :, None] | (we <= ws)[:, None, :]
        y = xp.where(empty[:, None], xp.zeros((), dtype), y)
        ah, aw = arg // w, arg % w
        inside = (arg >= 0) & (ah >= y1[:, None, None, None]) & (ah <= y2[:, None, None, None]) & \
            (aw >= x1[:, None, None, None]) & (aw <= x2[:, None, None, None])
        route = (batch[:, None, None, None] * c + xp.arange(c)[None, :, None, None]) * (h * w) + arg
        return [y], (xp.where(inside, route, -1), x.shape, rois.shape)

    def backward(self, xp, saved, dtops, params, need):
        route, x_shape, rois_shape = saved
        if not need[0]:
            return [None, None], []
        dy = dtops[0]
        hit = route >= 0
        dx = xp.bincount(xp.where(hit, route, 0).ravel(), weights=xp.where(hit, dy, 0).ravel(),
                         minlength=int(np.prod(x_shape)))
        return [dx.astype(dy.dtype).reshape(x_shape), None], []


def sampling_rng(seed: int, state) -> np.random.Generator:
    """The sampling generator of one forward: the layer's `seed` param mixed with the Net's
    per-forward stream (seeded from net seed, step and forward count), so runs repeat and a resumed
    run continues the same sequence."""
    return np.random.default_rng([seed, int(state.rng.integers(2 ** 63))])


@register
class ProposalTarget(Layer):
    """py-faster-rcnn's ProposalTargetLayer as a built-in: samples the proposals (plus the gt boxes)
    for the Fast R-CNN head and gives them labels and per-class box targets (boxes.proposal_targets).
    Defaults are py-faster-rcnn's cfg.TRAIN values (BATCH_SIZE 128, FG_FRACTION 0.25, FG_THRESH 0.5,
    BG_THRESH_HI 0.5, BG_THRESH_LO 0.1, BBOX_NORMALIZE_MEANS 0, STDS 0.1 0.1 0.2 0.2,
    BBOX_INSIDE_WEIGHTS 1) with BBOX_NORMALIZE_TARGETS_PRECOMPUTED true, as faster_rcnn_end2end.yml
    sets it (the only training setup that uses this layer)."""
    type = "ProposalTarget"
    makes_box_targets = True
    messages = {"proposal_target_param": Msg("ProposalTargetParameter", {
        "num_classes": F(int, 0, doc="classes including background (21 for PASCAL VOC)"),
        "batch_size": F(int, 128), "fg_fraction": F(float, 0.25), "fg_thresh": F(float, 0.5),
        "bg_thresh_hi": F(float, 0.5), "bg_thresh_lo": F(float, 0.1), "normalize_targets": F(bool, True),
        "bbox_normalize_means": F(float, repeated=True), "bbox_normalize_stds": F(float, repeated=True),
        "bbox_inside_weights": F(float, repeated=True), "seed": F(int, 3)})}
    n_bottoms, n_tops = (2, 2), (5, 5)
    bottom_roles = ("the RPN's rois", "gt_boxes")
    no_backward = True
    stateful = True                 # samples with the Net's per-forward stream, see sampling_rng
    VECTORS = {"bbox_normalize_means": (0.0, 0.0, 0.0, 0.0), "bbox_normalize_stds": (0.1, 0.1, 0.2, 0.2),
               "bbox_inside_weights": (1.0, 1.0, 1.0, 1.0)}

    def validate(self):
        p = self.p
        errs = [ShapeError("E0107", f"ProposalTarget '{self.name}': num_classes must be positive, got {p.num_classes}",
                           field="num_classes" if p.has("num_classes") else None,
                           help="set `num_classes` (the classes including background: 21 for PASCAL VOC)")
                ] if p.num_classes <= 0 else []
        errs += [ShapeError("E0107", f"ProposalTarget '{self.name}': {name} needs 4 values (dx, dy, dw, dh), got "
                            f"{len(getattr(p, name))}", field=name, help=f"write `{name}` four times, or not at all")
                 for name in self.VECTORS if getattr(p, name) and len(getattr(p, name)) != 4]
        if not 0 <= p.bg_thresh_lo <= p.bg_thresh_hi <= 1 or not 0 <= p.fg_fraction <= 1 or p.batch_size <= 0:
            errs.append(ShapeError("E0107", f"ProposalTarget '{self.name}': need 0 <= bg_thresh_lo <= bg_thresh_hi <= 1,"
                                   " 0 <= fg_fraction <= 1 and batch_size > 0", field="bg_thresh_lo",
                                   help="py-faster-rcnn's values: bg_thresh_lo 0.1, bg_thresh_hi 0.5, fg_fraction "
                                        "0.25, batch_size 128"))
        return errs

    def vector(self, name: str):
        return tuple(getattr(self.p, name)) or self.VECTORS[name]

    def shape(self, bottoms):
        rois, gt = bottoms
        for i, (b, what) in enumerate(((rois, "rois (0, x1, y1, x2, y2)"), (gt, "gt_boxes (x1, y1, x2, y2, class)"))):
            if len(b) != 2 or b[1] not in (5, None):
                raise ShapeError("E0373", f"ProposalTarget '{self.name}': '{self.spec.bottoms[i]}' must be N x 5 {what},"
                                 f" got {fmt(b)}", involves=(i,), help="feed a Proposal's rois and the data's gt_boxes")
        k = 4 * self.p.num_classes
        return [(None, 5), (None,), (None, k), (None, k), (None, k)]

    def forward(self, xp, bottoms, params, state):
        p = self.p
        rois, gt = (np.asarray(b.get() if hasattr(b, "get") else b) for b in bottoms)
        out = boxes.proposal_targets(rois, gt, p.num_classes, sampling_rng(p.seed, state), batch_size=p.batch_size,
                                     fg_fraction=p.fg_fraction, fg_thresh=p.fg_thresh, bg_thresh_hi=p.bg_thresh_hi,
                                     bg_thresh_lo=p.bg_thresh_lo, normalize_targets=p.normalize_targets,
                                     means=self.vector("bbox_normalize_means"),
                                     stds=self.vector("bbox_normalize_stds"),
                                     inside_weight=self.vector("bbox_inside_weights"))
        dtype = bottoms[0].dtype
        return [xp.asarray(o.astype(dtype)) for o in out], None

    def backward(self, xp, saved, dtops, params, need):
        return [None, None], []


# ------------------------------------------------------------------ py-faster-rcnn's Python layers
# They run as netdsl's built-in equivalents: netdsl never imports a module a net file names. Each
# reads its param_str as py-faster-rcnn's setup() does (yaml.load, here netdsl.param_str's safe
# subset), only the keys that setup() reads; everything else comes from py-faster-rcnn's cfg
# defaults, which are the built-in layers' defaults.
KNOWN_PYTHON = {
    "rpn.anchor_target_layer.AnchorTargetLayer": "AnchorTarget",
    "rpn.proposal_layer.ProposalLayer": "Proposal",
    "roi_data_layer.layer.RoIDataLayer": "RoIData",
    "rpn.proposal_target_layer.ProposalTargetLayer": "ProposalTarget",
}
# the param_str keys each one's setup() reads: key -> required (setup's layer_params[key] vs .get)
PARAM_KEYS = {
    "AnchorTarget": {"feat_stride": True, "scales": False, "allowed_border": False},
    "Proposal": {"feat_stride": True, "scales": False},
    "ProposalTarget": {"num_classes": True},
    "RoIData": {"num_classes": True},
}


def _number(v, positive: bool = True, integer: bool = False) -> bool:
    ok = isinstance(v, int if integer else (int, float)) and not isinstance(v, bool)
    return ok and (v > 0 if positive else v == v)


def _check_value(key: str, v):
    """The value as the built-in's field wants it, or a reason why py-faster-rcnn's code would fail on it."""
    if key in ("feat_stride", "num_classes"):
        return v if _number(v, integer=True) else f"`{key}` must be a positive integer, got {v!r}"
    if key == "allowed_border":
        return v if _number(v, positive=False) else f"`allowed_border` must be a number, got {v!r}"
    scales = v if isinstance(v, list) else [v]
    if not scales or not all(_number(s) for s in scales):
        return f"`scales` must be a positive number or a list of them, got {v!r}"
    return [float(s) for s in scales]


def python_params(layer: Layer) -> tuple[dict, list, list[ShapeError]]:
    """A known Python layer's param_str: (the values of the keys its setup() reads, the keys it
    ignores, errors)."""
    from ..param_str import ParamStrError, parse
    kind = KNOWN_PYTHON[layer.qualname()]
    who = f"Python layer '{layer.name}' ({layer.qualname()})"
    try:
        opts = parse(layer.p.param_str)
    except ParamStrError as e:
        return {}, [], [ShapeError("E0385", f"{who}: param_str is outside the YAML that netdsl reads: {e.message} (at "
                               f"character {e.offset + 1} of {layer.p.param_str!r})", field="param_str",
                               notes=["py-faster-rcnn reads param_str with yaml.load; netdsl reads the subset its files "
                                      "use (flow mappings, one `key: value` per line, numbers, strings, lists, "
                                      "`!!python/tuple [..]`) and constructs no Python objects"],
                               help="write e.g. `param_str: \"'feat_stride': 16\\n'scales': !!python/tuple [4, 8, "
                                    "16, 32]\"`")]
    if not isinstance(opts, dict):
        opts = {}
    values, errs = {}, []
    for key, required in PARAM_KEYS[kind].items():
        if key not in opts:
            if required:
                errs.append(ShapeError("E0386", f"{who}: param_str has no '{key}', which its setup() reads",
                                       field="param_str", notes=[f"param_str is {layer.p.param_str!r}"],
                                       help=f"add `'{key}': N` to param_str (py-faster-rcnn stops with KeyError)"))
            continue
        v = _check_value(key, opts[key])
        if isinstance(v, str):
            errs.append(ShapeError("E0386", f"{who}: param_str {v}", field="param_str",
                                   help=f"fix '{key}' in param_str, e.g. `'feat_stride': 16`, `'num_classes': 21`, "
                                        "`'scales': !!python/tuple [8, 16, 32]`"))
        else:
            values[key] = v
    return values, sorted(k for k in opts if k not in PARAM_KEYS[kind]), errs


class FromPython:
    """Mixin of a built-in layer standing for a py-faster-rcnn Python layer (see `Python.__new__`):
    its `python` is (the Python layer as written, the param_str values read, the keys ignored)."""
    python: tuple

    @classmethod
    def check_net(cls, checking):
        if checking.once("python layers run"):
            for node in checking.graph.nodes:
                if isinstance(node.layer, FromPython):
                    _warn_mapped(node.layer, checking.c)
        super().check_net(checking)


def _warn_mapped(layer, c: Collector) -> None:
    py, values, ignored = layer.python
    qualname = py.qualname()
    read = ", ".join(f"{k} " + (f"({', '.join(f'{x:g}' for x in v)})" if isinstance(v, list) else f"{v}")
                     for k, v in values.items()) or "nothing"
    c.warning("W0215", f"Python layer '{layer.name}' ({qualname}) runs as netdsl's built-in {layer.type} "
              f"(param_str gives {read}; the rest are py-faster-rcnn's cfg defaults)", py.pos("module"),
              notes=["netdsl never imports Python modules from a net file"],
              help=f'to set the other parameters, write `type: "{layer.type}"` with '
                   f'{next(iter(type(layer).messages))} {{ ... }} (docs/faster_rcnn.md)')
    for key in ignored:
        c.warning("W0216", f"param_str key '{key}' of Python layer '{layer.name}' is not read by py-faster-rcnn's "
                  f"{py.p.layer}: it has no effect", py.pos("param_str"),
                  notes=[f"its setup() reads {', '.join(repr(k) for k in PARAM_KEYS[layer.type])}"],
                  help=f"remove '{key}', or set it in the built-in {layer.type} layer's params")


@cache
def _adapter(builtin: type) -> type:
    return type(builtin.__name__, (FromPython, builtin), {"__doc__": builtin.__doc__})


@register
class Python(Layer):
    """Caffe's Python layer. netdsl never imports the module a net file names: py-faster-rcnn's
    AnchorTargetLayer, ProposalLayer and ProposalTargetLayer are built as the built-in layers
    (W0215), RoIDataLayer is checked (its shapes) but cannot run (it reads the roidb the training
    script builds), and any other module is an error unless --shape gives its tops."""
    type = "Python"
    runnable = False
    shape_from_hints = True
    ROI_DATA_HELP = ('replace py-faster-rcnn\'s RoIDataLayer by `type: "DigitScenes"` (the same 3 tops: data, '
                     'im_info, gt_boxes), or by Input layers fed from Python')
    messages = {"python_param": Msg("PythonParameter", {
        "module": F(str, ""), "layer": F(str, ""), "param_str": F(str, ""), "share_in_parallel": F(bool, False)})}
    n_bottoms, n_tops = (0, None), (0, None)
    LAYOUTS = {3: "data, im_info, gt_boxes (cfg.TRAIN.HAS_RPN)",
               6: "data, rois, labels, bbox_targets, bbox_inside_weights, bbox_outside_weights (Fast R-CNN, BBOX_REG)"}

    def __new__(cls, spec: LayerSpec, phase: str):
        """A runnable py-faster-rcnn layer with a readable param_str is built as the built-in layer,
        its param message made from param_str; anything else is a Python layer (checked only)."""
        layer = super().__new__(cls)
        layer.__init__(spec, phase)
        kind = KNOWN_PYTHON.get(layer.qualname())
        if kind not in ("AnchorTarget", "Proposal", "ProposalTarget"):
            return layer
        values, ignored, errs = python_params(layer)
        if errs:
            return layer                                # validate() reports them
        builtin = layer_types()[kind]
        key, msg = next(iter(builtin.messages.items()))
        rec = defaults(msg)
        pos = layer.pos("param_str")
        for k, v in values.items():
            rec._values[k], rec._pos[k] = v, pos
        record = replace(spec.record, _values={**spec.record._values, key: rec})
        mapped = _adapter(builtin)(replace(spec, type=kind, record=record), phase)
        mapped.python = (layer, values, ignored)
        return mapped

    def qualname(self) -> str:
        return f"{self.p.module}.{self.p.layer}"

    @property
    def run_help(self) -> str:
        if KNOWN_PYTHON.get(self.qualname()) == "RoIData":
            return self.ROI_DATA_HELP
        return "replace it with built-in layers: netdsl never imports Python modules named by a net file"

    def validate(self):
        if self.qualname() not in KNOWN_PYTHON:
            return []
        errs = python_params(self)[2]
        if not errs and KNOWN_PYTHON[self.qualname()] == "RoIData" and len(self.spec.tops) not in self.LAYOUTS:
            errs.append(ShapeError("E0387", f"Python layer '{self.name}' ({self.qualname()}) has "
                                   f"{len(self.spec.tops)} tops; py-faster-rcnn's RoIDataLayer gives 3 or 6",
                                   field="module", notes=[f"{n} tops: {t}" for n, t in self.LAYOUTS.items()],
                                   help="list the tops of one of its two layouts"))
        return errs

    @classmethod
    def check_net(cls, checking):
        inf = checking.inference
        for node in checking.graph.nodes:
            kind = KNOWN_PYTHON.get(node.layer.qualname()) if node.layer.type == "Python" else None
            if kind and node not in inf.failed and all(b in inf.blobs for b in node.bottoms):
                layer = node.layer
                checking.c.warning("W0601", f"Python layer '{layer.name}' ({layer.qualname()}) is checked as netdsl's "
                                   f"built-in {kind}; it cannot run: it reads the roidb py-faster-rcnn's training "
                                   "script builds", layer.pos("module"),
                                   notes=[f"its {len(node.tops)}-top layout: {cls.LAYOUTS[len(node.tops)]}"],
                                   help=cls.ROI_DATA_HELP)

    def shape(self, bottoms):
        if KNOWN_PYTHON.get(self.qualname()) == "RoIData":
            if len(self.spec.tops) == 3:
                return [None, (1, 3), (None, 5)]              # data from --shape: the roidb's scaled image
            k = 4 * python_params(self)[0]["num_classes"]
            return [None, (None, 5), (None,), (None, k), (None, k), (None, k)]
        same = ",".join("?" if d is None else str(d) for d in bottoms[0]) if bottoms else "N,C,H,W"
        flags = " ".join(f"--shape {t}={same}" for t in self.spec.tops)
        raise ShapeError("E0602", f"Python layer '{self.name}' ({self.qualname()}) cannot be checked: netdsl "
                         "does not import or run Python modules named by a net file", field="module", hintable=True,
                         notes=["netdsl knows py-faster-rcnn's layers: "
                                + ", ".join(sorted(KNOWN_PYTHON))],
                         help=(f"give the shapes of its tops, e.g. `{flags}` if it keeps its input's shape, or "
                               "replace it with a built-in layer type") if self.spec.tops else
                              "replace it with a built-in layer type, or remove it")


# ------------------------------------------------------------------------------ RPN anchors
# py-faster-rcnn hard-codes the anchor count A = len(scales) x len(ratios) in three places of a
# prototxt besides the anchor layers' own params: num_output 2A of the score head, 4A of the box
# head, and the Reshape that turns the 2-class softmax view (1 x 2 x A*H x W) back into
# 1 x 2A x H x W (`dim: 0 dim: 18 dim: -1 dim: 0`). Changing the scales breaks all three; each
# layer's own shape rule sees only the first symptom, so this pass walks from every AnchorTarget
# and Proposal input back to the heads and reports every place to edit, with its right number.

def _anchor_layer(layer):
    """(A, "n scales x m ratios", where they are set, kind) for AnchorTarget / Proposal layers,
    built in or py-faster-rcnn's Python layers (built as them)."""
    if layer.type in ("AnchorTarget", "Proposal"):
        how = f"{len(layer.scales())} scales x {len(layer.ratios())} ratios"
        pos = layer.p.pos("scales") or layer.p.pos("ratios") or layer.spec.pos
        return layer.num_anchors(), how, pos, layer.type
    return None


def _who(node, kind: str) -> str:
    if isinstance(node.layer, FromPython):
        return f"Python layer '{node.name}' (py-faster-rcnn's {kind}Layer)"
    return f"{kind} '{node.name}'"


def _anchor_note(reached) -> str:
    """'A = 4 scales x 3 ratios = 12 anchors per cell, set by AnchorTarget 'x' at f:1:2 and ...'"""
    seen = {}
    for r in reached:
        seen.setdefault(r[0].name, r)
    a, how = reached[0][1], reached[0][2]
    who = " and ".join(f"{_who(r[0], r[4])} at {r[3]}" for name, r in seen.items())
    return f"A = {how} = {a} anchors per cell, set by {who}"


def _trace_head(g: Graph, blob: str):
    """Walk back from a blob through Reshapes and layout-keeping layers to the convolution that
    made it: (conv node or None, the nodes passed, nearest first)."""
    chain = []
    node = g.producer.get(blob)
    while node is not None and len(chain) < 32:
        t = node.layer.type
        if t == "Convolution":
            return node, chain
        if t != "Reshape" and not node.layer.keeps_layout or not node.bottoms:
            return None, chain
        chain.append(node)
        node = g.producer.get(node.bottoms[0])
    return None, chain


def _channel_dim(node):
    """(index into reshape_param.shape.dim, value) of the dim that sets a Reshape's axis 1."""
    p = node.layer.p
    dims = list(p.shape.dim)
    k = 1 - p.axis if p.axis >= 0 else None
    if k is None or not 0 <= k < len(dims):
        return None
    return k, dims[k]


def _anchor_disagreement(g: Graph, anchors, c: Collector, failed: dict) -> None:
    """Anchor layers with different A: blame the ones the score head disagrees with."""
    implied = set()
    for node, *_ in anchors:
        conv, _ = _trace_head(g, node.bottoms[0]) if node.bottoms else (None, [])
        if conv is not None and conv.layer.p.num_output and conv.layer.p.num_output % 2 == 0:
            implied.add(conv.layer.p.num_output // 2)
    heads = implied.pop() if len(implied) == 1 else None
    agree = [x for x in anchors if x[1] == heads]
    odd = [x for x in anchors if x[1] != heads] if agree else anchors[1:]
    ref = agree[0] if agree else anchors[0]
    for x in odd:
        if x[1] == ref[1]:
            continue
        others = _who(ref[0], ref[4]) + (" and the RPN heads" if agree else "")
        c.error("E0375", f"{_who(x[0], x[4])} uses {x[1]} anchors per cell, but {others} use {ref[1]}", x[3],
                notes=[f"{_who(y[0], y[4])}: A = {y[2]} = {y[1]} (at {y[3]})" for y in (ref, x)],
                help=f"give {_who(x[0], x[4])} the same scales and ratios as {_who(ref[0], ref[4])} "
                     f"({ref[2]}), or change every anchor layer and the heads together")
        if x[0] in failed and failed[x[0]].code == "E0371":      # the same mismatch, said better
            c.diagnostics[:] = [d for d in c.diagnostics if d is not failed[x[0]]]


def _anchor_places(g: Graph):
    """The anchor layers of a graph, and every place that hard-codes their count A."""
    anchors = []                                   # (node, A, how, pos, kind)
    for node in g.nodes:
        info = _anchor_layer(node.layer)
        if info is not None:
            anchors.append((node, *info))
    # place -> {"kind", "node", "per", "role", "reached": [(anchor node, A, how, pos, kind, target, via)]}
    places: dict = {}

    def add(key, reach, **kw):
        places.setdefault(key, {**kw, "reached": []})["reached"].append(reach)

    for node, a, how, apos, kind in anchors:
        who = _who(node, kind)
        heads = [(node.bottoms[0], 2, "score head", f"{who} (bottom 0)")] if node.bottoms else []
        if kind == "Proposal" and len(node.bottoms) > 1:
            heads.append((node.bottoms[1], 4, "box head", f"{who} (bottom 1)"))
        if kind == "AnchorTarget":
            for top in node.tops[1:2]:                  # the box targets meet the box head in the box loss
                for user in g.consumers.get(top, []):
                    if user.bottoms and user.bottoms[0] != top:
                        heads.append((user.bottoms[0], 4, "box head",
                                      f"{user.layer.type} '{user.name}', next to the box targets of {who}"))
        for blob, per, role, target in heads:
            conv, chain = _trace_head(g, blob)
            if conv is not None:
                add(("conv", conv), (node, a, how, apos, kind, target, chain), kind="conv", node=conv, per=per,
                    role=role)
            if per == 2:
                reshapes = [n for n in chain if n.layer.type == "Reshape"]
                for r in reshapes[0::2]:                # these give the 1 x 2A x H x W layout
                    if _channel_dim(r) is not None:
                        add(("reshape", r), (node, a, how, apos, kind, target, chain[:chain.index(r)]),
                            kind="reshape", node=r, per=2, role=role)
    return anchors, places


def check_anchors(checking) -> None:
    """The RPN pass. The same file's graph in its other phase is walked too: a place to edit that
    only it contains (the Reshape before a TEST-only Proposal) is reported, so one check lists
    every edit."""
    g, c, failed = checking.graph, checking.c, checking.inference.failed
    anchors, places = _anchor_places(g)
    if not anchors:
        return
    if len({x[1] for x in anchors}) > 1:
        _anchor_disagreement(g, anchors, c, failed)
    here = {pl["node"].layer.spec.pos for pl in places.values()}
    reported = _report_places(g, places, c)
    # the errors the shape rules raised for the same mismatch are now explained better: drop them
    stale = [failed[n] for n in reported if n in failed and failed[n].code in ("E0371", "E0341", "E0340",
                                                                               "E0374", "E0360")]
    if stale:
        c.diagnostics[:] = [d for d in c.diagnostics if not any(d is s for s in stale)]
    other = checking.other_phase()
    more = {k: pl for k, pl in _anchor_places(other)[1].items() if pl["node"].layer.spec.pos not in here}
    _report_places(other, more, c, note=f"layer '{{}}' is only in the {other.phase} net (checked here too, so "
                                        "that every place to edit is listed)")


def _report_places(g: Graph, places: dict, c: Collector, note: str | None = None) -> set:
    reported = set()
    for pl in places.values():
        wanted = {pl["per"] * r[1] for r in pl["reached"]}
        if len(wanted) != 1:
            continue                                    # the anchor layers disagree: E0375 says so
        want = wanted.pop()
        a = want // pl["per"]
        node = pl["node"]
        notes = [_anchor_note(pl["reached"])] + ([note.format(node.name)] if note else [])
        for *_, target, via in pl["reached"][:2]:
            notes.append(f"its output reaches {target}"
                         + (f" through {', '.join(repr(n.name) for n in reversed(via))}" if via else ""))
        if pl["kind"] == "conv":
            have = node.layer.p.num_output
            if have == want:
                continue
            what = ("background and foreground scores" if pl["per"] == 2 else "box deltas dx, dy, dw, dh")
            c.error("E0371", f"Convolution '{node.name}' (the RPN {pl['role']}) has num_output {have}, but "
                    f"{pl['per']} x {a} anchors = {want} are needed", node.layer.pos("num_output"), notes=notes,
                    help=f"set `num_output: {want}` ({pl['per']} {what} per anchor)")
        else:
            k, have = _channel_dim(node)
            if have <= 0 or have == want:
                continue
            dims = node.layer.p.shape
            pos = (dims.span("dim", k) if k < dims.count("dim") else None) or node.layer.pos("shape")
            c.error("E0371", f"Reshape '{node.name}' gives the RPN scores {have} channels, but 2 x {a} anchors = "
                    f"{want} are needed", pos,
                    notes=[*notes, "it turns the 2-class softmax view (1 x 2 x A*H x W) back into 1 x 2A x H x W"],
                    help=f"set `dim: {want}` (2 x {a} anchors)")
        reported.add(node)
        for r in pl["reached"]:
            reported.add(r[0])
            reported.update(r[6])
        reported.update(n for r in places.get(("conv", node), {"reached": []})["reached"] for n in r[6])
    return reported
