"""SSD's layers (Wei Liu's Caffe fork, weiliu89/caffe, branch `ssd`): Normalize, PriorBox and
DetectionOutput (MultiBoxLoss, the training loss, is in multibox.py). Permute, the fork's fourth
layer type, lives with the tensor layers (tensor.py).

The fork keeps boxes in its `NormalizedBBox` message, whose coordinates, sizes and scores are
proto floats: PriorBox and DetectionOutput compute in float32 where the fork does (and in double
where C++ promotes to double), whatever the net's dtype, so a float32 net gives the fork's numbers."""
from __future__ import annotations

import math

import numpy as np

from ..errors import NetdslError
from ..registry import FILLER, F, Layer, Msg, ShapeError, filler_record, fmt, register

F32 = np.float32
FLT_MAX = float(np.finfo(np.float32).max)
CODE_TYPES = ("CORNER", "CENTER_SIZE", "CORNER_SIZE")


def _host(a) -> np.ndarray:
    return np.asarray(a.get() if hasattr(a, "get") else a)


# =============================================================================================
# Normalize

@register
class Normalize(Layer):
    """L2 normalisation with a learned scale (SSD's conv4_3_norm): y = s * x / sqrt(sum x^2 + eps),
    the sum over C x H x W of each image (`across_spatial: true`, the default) or over the channels
    at each position (`false`). The scale blob is one number (`channel_shared: true`, the default;
    a 0-D blob as in the fork) or one per channel, filled by `scale_filler` (default constant 1).

    Backward: the exact gradient. With `channel_shared: false` the fork's backward multiplies its
    shared-scale formula by s_c, i.e. uses s_k * sum_c x_c dy_c where the derivative has
    sum_c s_c x_c dy_c; the two agree while the channel scales are equal (they start equal)."""
    type = "Normalize"
    keeps_layout = True
    messages = {"norm_param": Msg("NormalizeParameter", {
        "across_spatial": F(bool, True), "scale_filler": F(FILLER), "channel_shared": F(bool, True),
        "eps": F(float, 1e-10)})}

    def shape(self, bottoms):
        x = bottoms[0]
        if not 2 <= len(x) <= 4:
            raise ShapeError("E0221", f"Normalize '{self.name}' needs a 2-D to 4-D N x C [x H [x W]] input, got "
                             f"{len(x)}-D {fmt(x)}", involves=(0,), help="normalise a convolution's output")
        return [x]

    def param_shapes(self, bottoms):
        return [()] if self.p.channel_shared else [(bottoms[0][1],)]

    def fillers(self):
        return [self.p.scale_filler if self.p.has("scale_filler") else filler_record(type="constant", value=1.0)]

    def _axes(self):
        return (1, 2) if self.p.across_spatial else (1,)

    def forward(self, xp, bottoms, params):
        x = bottoms[0]
        x3 = x.reshape(x.shape[0], x.shape[1], -1)
        norm = xp.sqrt((x3 * x3).sum(axis=self._axes(), keepdims=True) + self.p.eps)
        xhat = x3 / norm
        scale = params[0].reshape(1, -1, 1)
        return [(xhat * scale).reshape(x.shape)], (x3, norm, xhat, x.shape)

    def backward(self, xp, saved, dtops, params, need):
        x3, norm, xhat, shape = saved
        dy = dtops[0].reshape(x3.shape)
        scale = params[0].reshape(1, -1, 1)
        if self.p.channel_shared:
            ds = (dy * xhat).sum().reshape(params[0].shape)
        else:
            ds = (dy * xhat).sum(axis=(0, 2)).reshape(params[0].shape)
        dx = None
        if need[0]:
            g = dy * scale
            dot = (x3 * g).sum(axis=self._axes(), keepdims=True)
            dx = ((g - x3 * (dot / (norm * norm))) / norm).reshape(shape)
        return [dx], [ds]

    def to_onnx(self, ex, step):
        """x / Sqrt(ReduceSumSquare + eps) over C x H x W (or C), times the scale."""
        x, nd = ex.bottoms(step)[0], len(ex.in_shape(step))
        axes = list(range(1, nd)) if self.p.across_spatial else [1]
        norm = ex.add_node("Sqrt", [ex.add_node("Add", [ex.reduce("ReduceSumSquare", x, axes), ex.scalar(self.p.eps)])])
        scale = ex.params(step)[0]
        ex.chain(step, ex.add_node("Div", [x, norm]), [("Mul", [ex.along(np.asarray(scale).reshape(-1), 1, nd, suffix="scale")
                                                                  if scale.ndim else ex.const("scale", scale)])])


# =============================================================================================
# PriorBox

@register
class PriorBox(Layer):
    """The default boxes of one feature map, in the fork's order and arithmetic. Top: 1 x 2 x
    (H * W * num_priors * 4), channel 0 the boxes (xmin, ymin, xmax, ymax, normalised by the image
    size), channel 1 each coordinate's variance.

    Aspect ratios: 1 first, then each `aspect_ratio` not within 1e-6 of one already listed, each
    followed by its inverse when `flip` (stored as floats). num_priors = ratios x min sizes + max
    sizes. At each cell, row-major, and each min_size in turn: the min_size square, the
    sqrt(min_size * max_size) square of its paired max_size (if any), then each ratio other than 1:
    width min_size * sqrt(ar), height min_size / sqrt(ar) (max_size only adds its square). As in
    the fork, min_size and max_size are truncated to integers when the boxes are made
    (`int min_size_ = min_sizes_[s]`; OpenCV's importer keeps the fraction), the centre is float
    arithmetic ((w + offset) * step), the corners double, (centre -/+ size / 2) / image size. Image size:
    img_h/img_w or img_size, else the second bottom's H x W; step: step_h/step_w or step, else
    image size / feature map size (float). `clip` clamps the corners to [0, 1]. Variance: one value
    (default 0.1) for all four coordinates, or four. No backward."""
    type = "PriorBox"
    no_backward = True
    n_bottoms = (2, 2)
    bottom_roles = ("the feature map the priors tile", "the image (its height and width)")
    messages = {"prior_box_param": Msg("PriorBoxParameter", {
        "min_size": F(float, repeated=True, example="30"), "max_size": F(float, repeated=True),
        "aspect_ratio": F(float, repeated=True), "flip": F(bool, True), "clip": F(bool, False),
        "variance": F(float, repeated=True), "img_size": F(int, None), "img_h": F(int, None), "img_w": F(int, None),
        "step": F(float, None), "step_h": F(float, None), "step_w": F(float, None), "offset": F(float, 0.5)})}

    def validate(self):
        p, errs = self.p, []

        def bad(field, msg, help, code="E0107"):
            errs.append(ShapeError(code, f"PriorBox '{self.name}': {msg}", field=field if p.has(field) else None, help=help))

        if not p.min_size:
            bad("min_size", "prior_box_param needs at least one min_size", "add `min_size: 30` (pixels)", "E0106")
        elif any(m <= 0 for m in p.min_size):
            bad("min_size", f"min_size must be positive, got {list(p.min_size)}", "give min sizes in pixels, e.g. `min_size: 30`")
        if p.max_size:
            if len(p.max_size) != len(p.min_size):
                bad("max_size", f"{len(p.max_size)} max_size for {len(p.min_size)} min_size: each min_size needs its "
                    "max_size", "give one max_size per min_size, or none")
            elif any(mx <= mn for mn, mx in zip(p.min_size, p.max_size)):
                bad("max_size", "each max_size must be greater than its min_size, got "
                    f"{list(zip(p.min_size, p.max_size))}", "raise max_size above min_size (SSD300: min 30, max 60)")
        if len(p.variance) not in (0, 1, 4):
            bad("variance", f"give 1 or 4 variances, got {len(p.variance)}", "use `variance: 0.1 variance: 0.1 "
                "variance: 0.2 variance: 0.2` (SSD's) or one value")
        elif any(v <= 0 for v in p.variance):
            bad("variance", f"variances must be positive, got {list(p.variance)}", "use 0.1 and 0.2 (SSD's values)")
        for one, pair in (("img_size", ("img_h", "img_w")), ("step", ("step_h", "step_w"))):
            if p.has(pair[0]) or p.has(pair[1]):
                if p.has(one):
                    bad(one, f"give either {one} or {pair[0]}/{pair[1]}, not both", f"remove `{one}`")
                for k in pair:
                    if (getattr(p, k) or 0) <= 0:
                        bad(k, f"{k} must be positive when {pair[0]}/{pair[1]} are given, got {getattr(p, k)}",
                            f"set both {pair[0]} and {pair[1]}")
            elif p.has(one) and getattr(p, one) <= 0:
                bad(one, f"{one} must be positive, got {getattr(p, one)}", f"remove `{one}` or make it positive")
        return errs

    def aspect_ratios(self) -> list:
        """The fork's list: 1, then each new ratio (and its inverse with flip), as floats."""
        ars = [F32(1.0)]
        for ar in self.p.aspect_ratio:
            ar = F32(ar)
            if any(abs(ar - a) < 1e-6 for a in ars):
                continue
            ars.append(ar)
            if self.p.flip:
                ars.append(F32(1.0 / float(ar)))
        return ars

    def num_priors(self) -> int:
        return len(self.aspect_ratios()) * len(self.p.min_size) + len(self.p.max_size)

    def prior_count_note(self) -> str:
        ars = ", ".join(f"{float(a):g}" for a in self.aspect_ratios())
        return (f"{len(self.aspect_ratios())} aspect ratios ({ars}) x {len(self.p.min_size)} min_size + "
                f"{len(self.p.max_size)} max_size = {self.num_priors()}")

    def shape(self, bottoms):
        feat, img = bottoms
        for k, b in enumerate(bottoms):
            if len(b) != 4:
                raise ShapeError("E0221", f"PriorBox '{self.name}' needs a 4-D N x C x H x W {self.bottom_roles[k]}, got "
                                 f"{len(b)}-D {fmt(b)}", involves=(k,),
                                 help="bottom 0: the feature map the box heads read; bottom 1: the data blob")
        h, w = feat[2], feat[3]
        return [(1, 2, None if h is None or w is None else h * w * self.num_priors() * 4)]

    def priors(self, layer_h: int, layer_w: int, img_h: int, img_w: int) -> np.ndarray:
        """The (1, 2, H*W*num_priors*4) float64 top: boxes in double, from float centres."""
        p = self.p
        if p.has("img_h") or p.has("img_w"):
            img_h, img_w = p.img_h, p.img_w
        elif p.has("img_size"):
            img_h = img_w = p.img_size
        if p.has("step_h") or p.has("step_w"):
            step_h, step_w = F32(p.step_h), F32(p.step_w)
        elif p.has("step"):
            step_h = step_w = F32(p.step)
        else:
            step_h, step_w = F32(img_h) / F32(layer_h), F32(img_w) / F32(layer_w)
        cx = (np.arange(layer_w, dtype=F32) + F32(p.offset)) * step_w            # float, as the fork
        cy = (np.arange(layer_h, dtype=F32) + F32(p.offset)) * step_h
        sizes = []                                                               # (width, height) as floats
        ratios = [ar for ar in self.aspect_ratios() if abs(float(ar) - 1.0) >= 1e-6]
        for s, mn in enumerate(p.min_size):
            mn = int(mn)                                                         # the fork's int min_size_
            sizes.append((F32(mn), F32(mn)))
            if p.max_size:
                side = math.sqrt(mn * int(p.max_size[s]))                      # ::sqrt(double)
                sizes.append((F32(side), F32(side)))
            for ar in ratios:
                r = math.sqrt(float(ar))
                sizes.append((F32(mn * r), F32(mn / r)))
        bw = np.array([s[0] for s in sizes], np.float64)
        bh = np.array([s[1] for s in sizes], np.float64)
        x = cx.astype(np.float64)[None, :, None]
        y = cy.astype(np.float64)[:, None, None]
        boxes = np.empty((layer_h, layer_w, len(sizes), 4))
        boxes[..., 0] = (x - bw / 2.0) / img_w
        boxes[..., 1] = (y - bh / 2.0) / img_h
        boxes[..., 2] = (x + bw / 2.0) / img_w
        boxes[..., 3] = (y + bh / 2.0) / img_h
        boxes = boxes.reshape(-1)
        if p.clip:
            boxes = np.minimum(np.maximum(boxes, 0.0), 1.0)
        var = [F32(v) for v in (p.variance or [0.1])]
        variances = np.tile(np.array(var if len(var) == 4 else var * 4, np.float64), boxes.size // 4)
        return np.stack([boxes, variances])[None]

    def forward(self, xp, bottoms, params):
        feat, img = bottoms
        top = self.priors(feat.shape[2], feat.shape[3], img.shape[2], img.shape[3])
        if feat.dtype == np.float32:     # the fork stores the double corners in its Dtype
            top = top.astype(np.float32)
        return [xp.asarray(top, dtype=feat.dtype)], None

    def backward(self, xp, saved, dtops, params, need):
        return [None, None], []

    def to_onnx(self, ex, step):
        """A constant: the priors depend only on the two bottoms' sizes, which the plan fixes."""
        (fh, fw), (ih, iw) = ex.in_shape(step, 0)[2:], ex.in_shape(step, 1)[2:]
        ex.add_node("Identity", [ex.const("priors", self.priors(fh, fw, ih, iw))], ex.tops(step))


# =============================================================================================
# DetectionOutput

NMS_PARAM = Msg("NonMaximumSuppressionParameter", {
    "nms_threshold": F(float, 0.3), "top_k": F(int, None), "eta": F(float, 1.0)})
SAVE_OUTPUT = Msg("SaveOutputParameter", {
    "output_directory": F(str, ""), "output_name_prefix": F(str, ""), "output_format": F(str, ""),
    "label_map_file": F(str, ""), "name_size_file": F(str, ""), "num_test_image": F(int, None),
    "resize_param": F(Msg("ResizeParameter", {}, open=True))})


def decode_boxes(priors: np.ndarray, variances: np.ndarray, loc: np.ndarray, code_type: str,
                 variance_in_target: bool) -> tuple[np.ndarray, np.ndarray]:
    """The fork's DecodeBBox (clip_bbox false) of P predictions: (boxes (P, 4), sizes (P,)),
    float32 as its NormalizedBBox; float arithmetic, and double where C++ promotes (`/ 2.`, exp).
    With the variance encoded in the target the variance factors are 1 (x * 1 is exact)."""
    pri, loc = priors.astype(F32), loc.astype(F32)
    var = np.ones_like(loc) if variance_in_target else variances.astype(F32)
    d = var * loc                                                    # variance[k] * bbox.k (float)
    if code_type == "CORNER":
        out = pri + d
    else:
        pw, ph = pri[:, 2] - pri[:, 0], pri[:, 3] - pri[:, 1]
        if (pw <= 0).any() or (ph <= 0).any():
            k = int(np.flatnonzero((pw <= 0) | (ph <= 0))[0])
            raise NetdslError("E0621", f"DetectionOutput: prior box {k} {pri[k].tolist()} has no area; {code_type} "
                              "decoding divides by its width and height (the fork aborts: CHECK_GT(prior_width, 0))",
                              help="feed the priors of PriorBox layers (concatenated on axis 2)")
        if code_type == "CORNER_SIZE":
            out = pri + d * np.stack([pw, ph, pw, ph], axis=1)
        else:                                                        # CENTER_SIZE
            pcx, pcy = (pri[:, 0] + pri[:, 2]) / F32(2), (pri[:, 1] + pri[:, 3]) / F32(2)
            cx, cy = d[:, 0] * pw + pcx, d[:, 1] * ph + pcy
            w = (np.exp(d[:, 2].astype(np.float64)) * pw).astype(F32)    # ::exp(double), stored as float
            h = (np.exp(d[:, 3].astype(np.float64)) * ph).astype(F32)
            c64, half = np.stack([cx, cy, cx, cy], axis=1).astype(np.float64), np.stack([w, h, w, h], axis=1) / 2.0
            out = (c64 + half * np.array([-1.0, -1.0, 1.0, 1.0])).astype(F32)
    out = out.astype(F32)
    valid = (out[:, 2] >= out[:, 0]) & (out[:, 3] >= out[:, 1])
    sizes = np.where(valid, (out[:, 2] - out[:, 0]) * (out[:, 3] - out[:, 1]), F32(0)).astype(F32)
    return out, sizes


def _overlaps(box, size, boxes, sizes) -> np.ndarray:
    """The fork's JaccardOverlap of one box against many (float32): 0 unless the intersection has
    positive width and height, else inter / (size1 + size2 - inter)."""
    iw = np.minimum(box[2], boxes[:, 2]) - np.maximum(box[0], boxes[:, 0])
    ih = np.minimum(box[3], boxes[:, 3]) - np.maximum(box[1], boxes[:, 1])
    hit = (iw > 0) & (ih > 0)
    inter = np.where(hit, iw * ih, F32(0)).astype(F32)
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = inter / (sizes + size - inter)
    return np.where(hit, iou, F32(0)).astype(F32)


def nms_fast(boxes: np.ndarray, sizes: np.ndarray, scores: np.ndarray, score_threshold: float,
             nms_threshold: float, eta: float, top_k: int) -> list[int]:
    """The fork's ApplyNMSFast: scores > threshold, stable-sorted by descending score (ties keep
    prior order), the first top_k (when top_k > -1), then greedy: a box is kept while its overlap
    with every kept box is <= the adaptive threshold, which becomes threshold * eta after each keep
    while it is above 0.5. Returns the kept prior indices in order."""
    cand = np.flatnonzero(scores > F32(score_threshold))
    cand = cand[np.argsort(-scores[cand], kind="stable")]
    if top_k is not None and -1 < top_k < cand.size:
        cand = cand[:top_k]
    b, s = boxes[cand], sizes[cand]
    worst = np.full(cand.size, -np.inf, dtype=F32)      # each candidate's largest overlap with a kept box
    threshold, keep, pos = F32(nms_threshold), [], 0
    while pos < cand.size:
        ok = np.flatnonzero(worst[pos:] <= threshold)   # those in between overlap a kept box too much
        if not ok.size:
            break
        j = pos + int(ok[0])
        keep.append(int(cand[j]))
        pos = j + 1
        worst[pos:] = np.maximum(worst[pos:], _overlaps(b[j], s[j], b[pos:], s[pos:]))
        if eta < 1 and threshold > 0.5:
            threshold = F32(threshold * F32(eta))
    return keep


def check_heads(layer, bottoms, num_classes: int, loc_classes: int) -> None:
    """E0371 when the box predictions (bottom 0) or class scores (bottom 1) of DetectionOutput or
    MultiBoxLoss do not hold 4 x loc_classes and num_classes values per prior (bottom 2): the mbox
    heads and the PriorBox layers disagree on the number of priors per cell."""
    loc, conf, priors = bottoms[:3]
    if len(priors) != 3 or priors[1] not in (2, None) or (priors[2] is not None and priors[2] % 4):
        raise ShapeError("E0221", f"{layer.type} '{layer.name}': the priors must be 1 x 2 x (P * 4), got {fmt(priors)}",
                         involves=(2,), help="concatenate the PriorBox tops on axis 2 (concat_param { axis: 2 })")
    n_pri = None if priors[2] is None else priors[2] // 4
    c, lc = num_classes, loc_classes
    for k, per, what in ((0, lc * 4, "box"), (1, c, "class score")):
        b = bottoms[k]
        per_image = None if any(d is None for d in b[1:]) else math.prod(b[1:])
        if len(b) < 2 or n_pri is None or per_image is None:
            continue
        if b[1] != per_image or per_image != n_pri * per:
            raise ShapeError("E0371", f"{layer.type} '{layer.name}': {layer.bottom_roles[k]} '{layer.spec.bottoms[k]}' "
                             f"is {fmt(b)}, but {n_pri} priors x {per} {what} values = {n_pri * per} per image are "
                             "needed (N x " f"{n_pri * per})", involves=(k, 2),
                             notes=[f"the priors '{layer.spec.bottoms[2]}' {fmt(priors)} hold {n_pri} boxes"],
                             help="each box head must predict as many boxes per cell as its PriorBox makes "
                                  f"({'4' if k == 0 else 'num_classes'} x num_priors channels), with the heads "
                                  "permuted to N x H x W x C, flattened and concatenated in the PriorBox order")
    if loc[0] is not None and conf[0] is not None and loc[0] != conf[0]:
        raise ShapeError("E0371", f"{layer.type} '{layer.name}': box predictions for {loc[0]} images, class "
                         f"scores for {conf[0]}", involves=(0, 1), help="feed both from the same batch")


# =============================================================================================
# The mbox heads against their PriorBox layers (net level)

_PASS_THROUGH = ("Flatten", "Permute", "Reshape", "Softmax")     # keep a head's values, reorder them


def _trace(g, blob: str, leaf: str, via=()):
    """The `leaf`-type layers whose outputs make `blob`, in concatenation order, through Concat and
    the value-keeping layers; None when anything else is in the way. Each with its path."""
    node = g.producer.get(blob)
    if node is None:
        return None
    if node.layer.type == leaf:
        return [(node, via)]
    if node.layer.type in _PASS_THROUGH or node.layer.type == "Concat":
        found = []
        for b in (node.bottoms if node.layer.type == "Concat" else node.bottoms[:1]):
            sub = _trace(g, b, leaf, (node, *via))
            if sub is None:
                return None
            found += sub
        return found
    return None


def check_mbox_heads(checking) -> None:
    """E0371 at the head itself: each mbox head convolution must have 4 x loc classes (box head)
    or num_classes (class head) times its PriorBox's priors per cell as num_output. The k-th head
    of the loc (conf) concatenation pairs with the k-th PriorBox of the prior concatenation, as
    SSD's CreateMultiBoxHead builds them. The shape rule's coarser E0371 is then dropped."""
    g, c, failed = checking.graph, checking.c, checking.inference.failed
    reported = set()
    for node in g.nodes:
        layer = node.layer
        if not getattr(layer, "reads_mbox_heads", False) or len(node.bottoms) < 3 or layer.p.num_classes is None:
            continue
        priors = _trace(g, node.bottoms[2], "PriorBox")
        found = False
        for k, per, role in ((0, 4 * layer.loc_classes(), "box"), (1, layer.p.num_classes, "class")):
            heads = _trace(g, node.bottoms[k], "Convolution")
            if priors is None or heads is None or len(heads) != len(priors):
                continue
            for (conv, via), (pb, _) in zip(heads, priors):
                want = per * pb.layer.num_priors()
                if conv.layer.p.num_output == want or conv in reported:
                    continue
                reported.add(conv)
                found = True
                path = f" through {', '.join(repr(n.name) for n in via)}" if via else ""
                c.error("E0371", f"Convolution '{conv.name}' (an SSD {role} head) has num_output "
                        f"{conv.layer.p.num_output}, but PriorBox '{pb.name}' makes {pb.layer.num_priors()} priors a "
                        f"cell: {per} x {pb.layer.num_priors()} = {want} are needed", conv.layer.pos("num_output"),
                        notes=[f"PriorBox '{pb.name}' at {pb.layer.spec.pos}: {pb.layer.prior_count_note()}",
                               f"its output reaches {layer.type} '{node.name}' (bottom {k}){path}"],
                        help=f"set `num_output: {want}` ({per} {'box coordinates' if k == 0 else 'class scores'} "
                             "per prior)")
        if found and node in failed and failed[node].code == "E0371":
            c.diagnostics[:] = [d for d in c.diagnostics if d is not failed[node]]


@register
class DetectionOutput(Layer):
    """SSD's detections: decode the box predictions against the priors, per-class NMS, keep the
    best. Bottoms: loc N x (P * L * 4) (L = 1 with share_location, else num_classes), conf
    N x (P * num_classes) (after Softmax, flattened), priors 1 x 2 x (P * 4) (PriorBox tops
    concatenated on axis 2). Top 1 x 1 x K x 7 rows [image_id, label, score, xmin, ymin, xmax,
    ymax], K known only at run time.

    As the fork's CPU Forward: boxes decoded by `code_type` without clipping; for each image and
    each class but background_label_id, ApplyNMSFast (see `nms_fast`); if keep_top_k > -1 and the
    image has more detections, the keep_top_k best scores over all classes (a stable sort: equal
    scores keep label, then NMS order, where the fork's std::sort leaves ties unspecified). Rows
    come image by image, by ascending label, each label's in NMS order (or descending score after
    keep_top_k). When no image has a detection the top is N rows [i, -1, -1, -1, -1, -1, -1].
    Scores and boxes are float32 (the fork's NormalizedBBox). save_output_param and visualize are
    accepted and ignored: netdsl writes no result files. Unlike the fork, background_label_id: -1
    with share_location works (the fork skips decoding the shared boxes and aborts). No backward."""
    type = "DetectionOutput"
    no_backward = True
    makes_detections = True
    reads_mbox_heads = True
    n_bottoms = (3, 4)
    bottom_roles = ("the box predictions (mbox_loc)", "the class scores after Softmax (mbox_conf_flatten)",
                    "the priors (mbox_priorbox)", "the image (visualize only)")
    messages = {"detection_output_param": Msg("DetectionOutputParameter", {
        "num_classes": F(int, None, example="21"), "share_location": F(bool, True), "background_label_id": F(int, 0),
        "nms_param": F(NMS_PARAM), "save_output_param": F(SAVE_OUTPUT),
        "code_type": F("enum", "CORNER", choices=CODE_TYPES), "variance_encoded_in_target": F(bool, False),
        "keep_top_k": F(int, -1), "confidence_threshold": F(float, None), "visualize": F(bool, False),
        "visualize_threshold": F(float, None), "save_file": F(str, "")})}

    def validate(self):
        p, errs = self.p, []
        if p.num_classes is None or p.num_classes <= 0:
            errs.append(ShapeError("E0106" if p.num_classes is None else "E0107",
                                   f"DetectionOutput '{self.name}' needs num_classes (> 0) in detection_output_param",
                                   field="num_classes" if p.has("num_classes") else None,
                                   help="add `num_classes: 21` (20 VOC classes and the background)"))
        nms = p.nms_param
        if nms.nms_threshold < 0:
            errs.append(ShapeError("E0107", f"DetectionOutput '{self.name}': nms_threshold must be >= 0, got "
                                   f"{nms.nms_threshold}", field="nms_param", help="use `nms_threshold: 0.45` (SSD's)"))
        if not 0 < nms.eta <= 1:
            errs.append(ShapeError("E0107", f"DetectionOutput '{self.name}': eta must lie in (0, 1], got {nms.eta}",
                                   field="nms_param", help="use `eta: 1` (no adaptive NMS)"))
        return errs

    @classmethod
    def check_net(cls, checking):
        if checking.once("ssd mbox heads"):
            check_mbox_heads(checking)

    def loc_classes(self) -> int:
        return 1 if self.p.share_location else self.p.num_classes

    def shape(self, bottoms):
        check_heads(self, bottoms, self.p.num_classes, self.loc_classes())
        return [(1, 1, None, 7)]

    def forward(self, xp, bottoms, params):
        p = self.p
        loc, conf, priors = (_host(b) for b in bottoms[:3])
        dtype = bottoms[0].dtype
        n, c, lc = loc.shape[0], p.num_classes, self.loc_classes()
        n_pri = priors.shape[2] // 4
        flat = priors.reshape(-1)
        boxes, variances = flat[:n_pri * 4].reshape(n_pri, 4), flat[n_pri * 4:n_pri * 8].reshape(n_pri, 4)
        loc = loc.reshape(n, n_pri, lc, 4)
        conf = conf.reshape(n, n_pri, c).astype(F32)
        threshold = p.confidence_threshold if p.confidence_threshold is not None else -FLT_MAX
        top_k = p.nms_param.top_k if p.nms_param.top_k is not None else -1
        rows = []
        for i in range(n):
            decoded = {}
            for lab in range(lc):
                key = -1 if p.share_location else lab
                if p.share_location or lab != p.background_label_id:
                    decoded[key] = decode_boxes(boxes, variances, loc[i, :, lab], p.code_type, p.variance_encoded_in_target)
            kept = {}
            for lab in range(c):
                if lab == p.background_label_id:
                    continue
                b, s = decoded[-1 if p.share_location else lab]
                kept[lab] = nms_fast(b, s, conf[i, :, lab], threshold, p.nms_param.nms_threshold, p.nms_param.eta, top_k)
            found = [(conf[i, k, lab], lab, k) for lab in sorted(kept) for k in kept[lab]]
            if p.keep_top_k > -1 and len(found) > p.keep_top_k:
                order = np.argsort(-np.array([f[0] for f in found], F32), kind="stable")[:p.keep_top_k]
                best = [found[j] for j in order]
                found = [f for lab in sorted({f[1] for f in best}) for f in best if f[1] == lab]
            for score, lab, k in found:
                box = decoded[-1 if p.share_location else lab][0][k]
                rows.append([i, lab, score, *box])
        if rows:
            top = np.array(rows, np.float64)
        else:
            top = np.full((n, 7), -1.0)
            top[:, 0] = np.arange(n)
        return [xp.asarray(top.reshape(1, 1, -1, 7), dtype=dtype)], None

    def backward(self, xp, saved, dtops, params, need):
        return [None] * len(self.spec.bottoms), []
