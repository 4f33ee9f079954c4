"""Box geometry, RPN anchor labelling and proposal generation (py-faster-rcnn semantics)."""
from __future__ import annotations

import numpy as np

# Section numbers (§) refer to /work/shared/reference/rpn_spec.md. Boxes are (x1, y1, x2, y2)
# with inclusive corners: width = x2 - x1 + 1 (the "+1 convention").


def _boxes(x, name: str, min_cols: int = 4, max_cols: int = 4) -> np.ndarray:
    """`x` as a float64 (N, C) array with min_cols <= C <= max_cols, else a ValueError."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 2 or not min_cols <= a.shape[1] <= max_cols:
        want = f"{min_cols}" if min_cols == max_cols else f"{min_cols}..{max_cols}"
        raise ValueError(f"{name} must have shape (N, {want}), got {a.shape}")
    return a


def _im_info(im_info) -> tuple[float, float, float]:
    """(height, width, scale) from a (3,) or (1, 3) im_info blob."""
    a = np.asarray(im_info, dtype=np.float64)
    if a.size != 3:
        raise ValueError(f"im_info must hold 3 values (height, width, scale), got shape {a.shape}")
    h, w, s = a.reshape(3)
    return float(h), float(w), float(s)


def _whctr(boxes: np.ndarray):
    """Widths, heights and the §4 centres x1 + 0.5*w, y1 + 0.5*h of (N, 4) boxes."""
    w = boxes[:, 2] - boxes[:, 0] + 1.0
    h = boxes[:, 3] - boxes[:, 1] + 1.0
    return w, h, boxes[:, 0] + 0.5 * w, boxes[:, 1] + 0.5 * h


# ---------------------------------------------------------------------------------------------
# Anchors (§1, §2)

def _around(cx, cy, ws, hs) -> np.ndarray:
    """Windows of sizes ws x hs centred on (cx, cy), using the +/-0.5*(size-1) rule of §1."""
    return np.stack([cx - 0.5 * (ws - 1), cy - 0.5 * (hs - 1),
                     cx + 0.5 * (ws - 1), cy + 0.5 * (hs - 1)], axis=-1)


def generate_anchors(base_size: int = 16, ratios=(0.5, 1, 2), scales=(8, 16, 32)) -> np.ndarray:
    """The (len(ratios) * len(scales), 4) float64 base anchors, ratio-major (§1).

    Ratio windows are rounded with NumPy's round-half-to-even; scaled windows are not rounded.
    """
    ratios = np.asarray(ratios, dtype=np.float64)
    scales = np.asarray(scales, dtype=np.float64)
    # §1.1: the centre uses 0.5*(w-1) here, so the base window (0, 0, 15, 15) has centre 7.5.
    centre = 0.5 * (base_size - 1)
    area = float(base_size * base_size)
    ws = np.round(np.sqrt(area / ratios))
    hs = np.round(ws * ratios)
    # §1.3: a ratio window placed around the centre has exactly width ws, height hs and the
    # same centre again (all values are half-integers), so scale those directly, unrounded.
    anchors = _around(centre, centre, ws[:, None] * scales, hs[:, None] * scales)
    return anchors.reshape(-1, 4)


def shift_anchors(anchors, height: int, width: int, feat_stride: int) -> np.ndarray:
    """All anchors of an H x W map, shape (H*W*A, 4), ordered (i, j, a) with a fastest (§2)."""
    anchors = _boxes(anchors, "anchors")
    ys, xs = np.meshgrid(np.arange(height) * feat_stride, np.arange(width) * feat_stride,
                         indexing="ij")
    shifts = np.stack([xs, ys, xs, ys], axis=-1).reshape(-1, 1, 4)
    return (shifts + anchors[None, :, :]).reshape(-1, 4)


def _to_blob(per_anchor: np.ndarray, height: int, width: int) -> np.ndarray:
    """(H*W*A, C) rows in (i, j, a) order -> (1, A*C, H, W) with channel a*C + c (§2)."""
    return per_anchor.reshape(1, height, width, -1).transpose(0, 3, 1, 2)


def _from_blob(blob: np.ndarray, cols: int) -> np.ndarray:
    """Inverse of `_to_blob`: (1, A*C, H, W) -> (H*W*A, C) in (i, j, a) order (§2)."""
    return blob.transpose(0, 2, 3, 1).reshape(-1, cols)


# ---------------------------------------------------------------------------------------------
# Geometry (§3.2, §4, §6.3)

def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of broadcastable box arrays (..., 4); +1 convention, no overlap is exactly 0."""
    iw = np.minimum(a[..., 2], b[..., 2]) - np.maximum(a[..., 0], b[..., 0]) + 1.0
    ih = np.minimum(a[..., 3], b[..., 3]) - np.maximum(a[..., 1], b[..., 1]) + 1.0
    inter = np.maximum(iw, 0.0) * np.maximum(ih, 0.0)
    area_a = (a[..., 2] - a[..., 0] + 1.0) * (a[..., 3] - a[..., 1] + 1.0)
    area_b = (b[..., 2] - b[..., 0] + 1.0) * (b[..., 3] - b[..., 1] + 1.0)
    return inter / (area_a + area_b - inter)


def bbox_overlaps(boxes, query) -> np.ndarray:
    """(N, G) float64 IoU matrix between boxes (N, 4) and query (G, 4) (§3.2)."""
    boxes = _boxes(boxes, "boxes")
    query = _boxes(query, "query")
    return _iou(boxes[:, None, :], query[None, :, :])


def bbox_transform(ex_rois, gt_rois) -> np.ndarray:
    """Regression targets (dx, dy, dw, dh), shape (N, 4), mapping ex_rois onto gt_rois (§4).

    Centres are x1 + 0.5*w here (not 0.5*(w-1) as in §1); the offset cancels in dx, dy.
    Targets are not normalised by means/stds.
    """
    ex = _boxes(ex_rois, "ex_rois")
    gt = _boxes(gt_rois, "gt_rois")
    if ex.shape != gt.shape:
        raise ValueError(f"ex_rois {ex.shape} and gt_rois {gt.shape} must have the same shape")
    ew, eh, ecx, ecy = _whctr(ex)
    gw, gh, gcx, gcy = _whctr(gt)
    return np.stack([(gcx - ecx) / ew, (gcy - ecy) / eh, np.log(gw / ew), np.log(gh / eh)],
                    axis=1)


def bbox_transform_inv(boxes, deltas) -> np.ndarray:
    """Apply deltas (N, 4) to boxes (N, 4); returns the predicted (N, 4) boxes (§4).

    Quirk kept from py-faster-rcnn: corners are centre -/+ 0.5*w, so zero deltas return
    (x1, y1, x2 + 1, y2 + 1) -- one pixel wider and taller in the +1 convention -- and
    bbox_transform_inv(E, bbox_transform(E, G)) == G + (0, 0, 1, 1). dw, dh are not clamped.
    """
    boxes = _boxes(boxes, "boxes")
    deltas = _boxes(deltas, "deltas")
    if boxes.shape != deltas.shape:
        raise ValueError(f"boxes {boxes.shape} and deltas {deltas.shape} must have the same shape")
    w, h, cx, cy = _whctr(boxes)
    pcx = deltas[:, 0] * w + cx
    pcy = deltas[:, 1] * h + cy
    pw = np.exp(deltas[:, 2]) * w
    ph = np.exp(deltas[:, 3]) * h
    return np.stack([pcx - 0.5 * pw, pcy - 0.5 * ph, pcx + 0.5 * pw, pcy + 0.5 * ph], axis=1)


def clip_boxes(boxes, im_h: float, im_w: float) -> np.ndarray:
    """A copy of boxes (N, 4) with x clipped to [0, im_w - 1] and y to [0, im_h - 1] (§6.3)."""
    boxes = _boxes(boxes, "boxes")
    hi = np.array([im_w - 1, im_h - 1, im_w - 1, im_h - 1], dtype=np.float64)
    return np.maximum(np.minimum(boxes, hi), 0.0)


# ---------------------------------------------------------------------------------------------
# NMS (§7)

def _score_order(scores: np.ndarray) -> np.ndarray:
    """Indices by descending score; a stable sort on -score so equal scores keep index order.

    py-faster-rcnn reverses an unstable argsort, so its tie order is unspecified (§6.5); ours
    is deterministic: the lower index comes first.
    """
    return np.argsort(-scores, kind="stable")


def nms(boxes, scores, thresh: float, limit: int = 0) -> np.ndarray:
    """Greedy NMS (§7): indices (int64) of kept boxes in descending-score order.

    A box is suppressed by a kept higher-scoring box when their IoU > thresh; IoU == thresh
    is kept. Score ties are broken by lower index first (see `_score_order`). With limit > 0
    it stops once `limit` boxes are kept: the result is the unlimited one's prefix, and the loop
    runs `limit` rounds instead of one per surviving box (thousands for 6000 pre-NMS boxes).
    """
    boxes = _boxes(boxes, "boxes")
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (boxes.shape[0],):
        raise ValueError(f"scores must have shape ({boxes.shape[0]},), got {scores.shape}")
    # Same arithmetic as `_iou`, on contiguous columns with areas computed once: the loop
    # runs up to N times over up to 12000 boxes (§6), so gathers dominate its cost.
    x1, y1, x2, y2 = (np.ascontiguousarray(boxes[:, k]) for k in range(4))
    areas = (x2 - x1 + 1.0) * (y2 - y1 + 1.0)
    order = _score_order(scores)
    keep = []
    while order.size and (limit <= 0 or len(keep) < limit):
        top, rest = order[0], order[1:]
        keep.append(top)
        iw = np.minimum(x2[top], x2[rest]) - np.maximum(x1[top], x1[rest]) + 1.0
        ih = np.minimum(y2[top], y2[rest]) - np.maximum(y1[top], y1[rest]) + 1.0
        inter = np.maximum(iw, 0.0) * np.maximum(ih, 0.0)
        order = rest[inter / (areas[top] + areas[rest] - inter) <= thresh]
    return np.asarray(keep, dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# Anchor labelling (§3)

def _label_anchors(overlaps: np.ndarray, positive_overlap: float, negative_overlap: float,
                   clobber_positives: bool, guard_zero_iou: bool) -> np.ndarray:
    """Labels (1 fg, 0 bg, -1 ignore) of inside anchors from their (N, G) IoU matrix (§3.3-4)."""
    n, g = overlaps.shape
    labels = np.full(n, -1.0, dtype=np.float32)
    max_iou = overlaps.max(axis=1) if g else np.zeros(n)
    # §3.3: every anchor that attains some GT's maximum IoU, ties included.
    gt_max = overlaps.max(axis=0) if n else np.zeros(g)
    is_best = overlaps == gt_max[None, :]
    if guard_zero_iou:
        # §3.4 edge case: a GT overlapping no inside anchor has best IoU 0 and would otherwise
        # make every anchor it does not touch a positive.
        is_best &= gt_max[None, :] > 0
    best = is_best.any(axis=1)
    if not clobber_positives:
        labels[max_iou < negative_overlap] = 0
    labels[best] = 1
    labels[max_iou >= positive_overlap] = 1
    if clobber_positives:
        labels[max_iou < negative_overlap] = 0
    return labels


def _subsample(labels: np.ndarray, rng: np.random.Generator, batch_size: int,
               fg_fraction: float) -> None:
    """Disable random surplus positives, then surplus negatives, in place (§3.5)."""
    def cap(value: float, limit: int) -> None:
        inds = np.flatnonzero(labels == value)
        if inds.size > limit:
            labels[rng.choice(inds, size=inds.size - limit, replace=False)] = -1

    cap(1, int(fg_fraction * batch_size))
    cap(0, batch_size - int(np.sum(labels == 1)))


def _outside_weights(labels: np.ndarray, positive_weight: float) -> np.ndarray:
    """Per-anchor outside weights (§3.8); a label with no examples gets no weight."""
    pos, neg = labels == 1, labels == 0
    weights = np.zeros(labels.shape, dtype=np.float64)
    if positive_weight < 0:
        num_examples = int(np.sum(labels >= 0))
        if num_examples:
            weights[pos | neg] = 1.0 / num_examples
        return weights
    if not 0 < positive_weight < 1:
        raise ValueError(f"positive_weight must be negative or in (0, 1), got {positive_weight}")
    if pos.any():
        weights[pos] = positive_weight / pos.sum()
    if neg.any():
        weights[neg] = (1.0 - positive_weight) / neg.sum()
    return weights


def anchor_targets(height: int, width: int, gt_boxes, im_info, rng: np.random.Generator, *,
                   feat_stride: int = 16, anchors=None, allowed_border: float = 0,
                   positive_overlap: float = 0.7, negative_overlap: float = 0.3,
                   clobber_positives: bool = False, batch_size: int = 256,
                   fg_fraction: float = 0.5, positive_weight: float = -1.0,
                   inside_weight=(1.0, 1.0, 1.0, 1.0), guard_zero_iou: bool = True):
    """RPN training targets for an H x W feature map (AnchorTargetLayer, §3).

    gt_boxes is (G, 5) [x1, y1, x2, y2, class] (a (G, 4) array is accepted too); im_info is
    [height, width, scale]. Returns float32 labels (1, 1, A*H, W) and bbox_targets,
    inside_weights, outside_weights (1, 4A, H, W), laid out as in §2 (label row a*H + i,
    target channel 4a + c). Anchors crossing the image border (widened by allowed_border) get
    label -1 and zero targets and weights.

    guard_zero_iou=True (default) deviates from py-faster-rcnn on purpose: a GT box whose best
    IoU with the inside anchors is 0 makes no anchor positive. With False the original
    behaviour is reproduced: every inside anchor with IoU 0 to that GT becomes positive (§3.4).
    With no GT boxes (G == 0) every inside anchor is a negative (then sampled) with zero targets.
    """
    gt = _boxes(gt_boxes, "gt_boxes", 4, 5)[:, :4]
    im_h, im_w, _ = _im_info(im_info)
    base = generate_anchors() if anchors is None else _boxes(anchors, "anchors")
    all_anchors = shift_anchors(base, height, width, feat_stride)

    # §3.1: the straddle rule; outside anchors are never labelled.
    b = allowed_border
    inside = np.flatnonzero((all_anchors[:, 0] >= -b) & (all_anchors[:, 1] >= -b)
                            & (all_anchors[:, 2] < im_w + b) & (all_anchors[:, 3] < im_h + b))
    ex = all_anchors[inside]
    overlaps = _iou(ex[:, None, :], gt[None, :, :])

    labels = _label_anchors(overlaps, positive_overlap, negative_overlap, clobber_positives,
                            guard_zero_iou)
    _subsample(labels, rng, batch_size, fg_fraction)

    # §3.6: every inside anchor regresses to its argmax GT (first on ties).
    targets = np.zeros_like(ex)
    if gt.shape[0]:
        targets = bbox_transform(ex, gt[overlaps.argmax(axis=1)])
    inside_w = np.zeros_like(ex)
    inside_w[labels == 1] = np.asarray(inside_weight, dtype=np.float64)
    outside_w = np.repeat(_outside_weights(labels, positive_weight)[:, None], 4, axis=1)

    # §3.9: unmap to all H*W*A anchors (-1 labels, 0 elsewhere) and lay out as in §2.
    def unmap(per_inside: np.ndarray, fill: float) -> np.ndarray:
        full = np.full((all_anchors.shape[0], per_inside.shape[1]), fill, dtype=np.float32)
        full[inside] = per_inside
        return np.ascontiguousarray(_to_blob(full, height, width))

    out_labels = unmap(labels[:, None], -1.0).reshape(1, 1, base.shape[0] * height, width)
    return out_labels, unmap(targets, 0.0), unmap(inside_w, 0.0), unmap(outside_w, 0.0)


# ---------------------------------------------------------------------------------------------
# Fast R-CNN training targets (py-faster-rcnn's rpn/proposal_target_layer.py)

def proposal_targets(rois, gt_boxes, num_classes: int, rng: np.random.Generator, *, batch_size: int = 128,
                     fg_fraction: float = 0.25, fg_thresh: float = 0.5, bg_thresh_hi: float = 0.5,
                     bg_thresh_lo: float = 0.1, normalize_targets: bool = True,
                     means=(0.0, 0.0, 0.0, 0.0), stds=(0.1, 0.1, 0.2, 0.2), inside_weight=(1.0, 1.0, 1.0, 1.0)):
    """Sample RoIs for the Fast R-CNN head and give them class labels and box targets
    (ProposalTargetLayer.forward and _sample_rois, step by step).

    The gt boxes (G x 5: x1, y1, x2, y2, class) are appended to the rois (R x 5: 0, x1, y1, x2,
    y2) as candidates. Each candidate takes the class of the gt box it overlaps most (IoU, +1
    convention; the first on ties). Foreground: IoU >= fg_thresh, at most round(fg_fraction *
    batch_size) of them, drawn without replacement; background: bg_thresh_lo <= IoU <
    bg_thresh_hi, the rest of batch_size, drawn the same way, with label 0. The sample is the
    foreground then the background, in draw order. Box targets (bbox_transform to the assigned gt,
    minus means, over stds when normalize_targets: cfg.TRAIN.BBOX_NORMALIZE_TARGETS_PRECOMPUTED)
    go in columns 4c..4c+3 of the sample's class c, with inside weights there; background rows
    are zero. Outside weights are (inside weights > 0).

    Returns float32 rois (S, 5), labels (S,), bbox_targets, bbox_inside_weights and
    bbox_outside_weights (S, 4 num_classes). With no gt box every candidate has IoU 0 (py-faster-rcnn
    fails on the empty argmax instead)."""
    rois = _boxes(rois, "rois", 5, 5)
    gt = _boxes(gt_boxes, "gt_boxes", 5, 5)
    if np.any(rois[:, 0] != 0):
        raise ValueError("ProposalTarget handles one image: every roi's batch index must be 0")
    all_rois = np.vstack([rois, np.hstack([np.zeros((gt.shape[0], 1)), gt[:, :4]])])
    overlaps = _iou(all_rois[:, None, 1:5], gt[None, :, :4])
    gt_assignment = overlaps.argmax(axis=1) if gt.shape[0] else np.zeros(len(all_rois), np.int64)
    max_overlaps = overlaps.max(axis=1) if gt.shape[0] else np.zeros(len(all_rois))

    fg_per_image = int(np.round(fg_fraction * batch_size))
    fg_inds = np.flatnonzero(max_overlaps >= fg_thresh)
    n_fg = min(fg_per_image, fg_inds.size)
    if fg_inds.size:
        fg_inds = rng.choice(fg_inds, size=n_fg, replace=False)
    bg_inds = np.flatnonzero((max_overlaps < bg_thresh_hi) & (max_overlaps >= bg_thresh_lo))
    n_bg = min(batch_size - n_fg, bg_inds.size)
    if bg_inds.size:
        bg_inds = rng.choice(bg_inds, size=n_bg, replace=False)
    keep = np.append(fg_inds, bg_inds).astype(np.int64)

    labels = gt[gt_assignment[keep], 4] if gt.shape[0] else np.zeros(keep.size)
    labels[n_fg:] = 0
    sampled = all_rois[keep]
    targets = np.zeros((keep.size, 4))
    if gt.shape[0] and keep.size:
        targets = bbox_transform(sampled[:, 1:5], gt[gt_assignment[keep], :4])
    if normalize_targets:
        targets = (targets - np.asarray(means, np.float64)) / np.asarray(stds, np.float64)
    targets = targets.astype(np.float32)            # _compute_targets casts before the scatter

    cls = labels.astype(np.int64)
    if np.any(cls < 0) or np.any(cls >= num_classes):
        raise ValueError(f"ProposalTarget: a gt box has class {int(cls.max() if cls.size else 0)}, outside "
                         f"[0, num_classes = {num_classes})")
    bbox_targets = np.zeros((keep.size, 4 * num_classes), np.float32)
    inside = np.zeros_like(bbox_targets)
    for i in np.flatnonzero(cls > 0):
        bbox_targets[i, 4 * cls[i]:4 * cls[i] + 4] = targets[i]
        inside[i, 4 * cls[i]:4 * cls[i] + 4] = inside_weight
    return (sampled.astype(np.float32), labels.astype(np.float32), bbox_targets, inside,
            (inside > 0).astype(np.float32))


# ---------------------------------------------------------------------------------------------
# Proposals (§6)

def proposals(cls_prob, bbox_pred, im_info, *, feat_stride: int = 16, anchors=None,
              pre_nms_top_n: int, post_nms_top_n: int, nms_thresh: float = 0.7,
              min_size: float = 16):
    """Region proposals from RPN outputs (ProposalLayer, §6).

    cls_prob is (1, 2A, H, W) with background channels 0..A-1 and foreground A..2A-1;
    bbox_pred is (1, 4A, H, W). Returns rois (R, 5) float32 [0, x1, y1, x2, y2] and their
    scores (R, 1) float32, in descending score order. A top-N value <= 0 means no limit.
    Equal scores are ordered by lower anchor index (i, j, a) first: a stable sort on -score,
    where py-faster-rcnn's tie order is unspecified. Decoding runs in float64.
    """
    base = generate_anchors() if anchors is None else _boxes(anchors, "anchors")
    a = base.shape[0]
    cls_prob = np.asarray(cls_prob)
    bbox_pred = np.asarray(bbox_pred)
    if cls_prob.ndim != 4 or cls_prob.shape[:2] != (1, 2 * a):
        raise ValueError(f"cls_prob must have shape (1, {2 * a}, H, W), got {cls_prob.shape}")
    height, width = cls_prob.shape[2:]
    if bbox_pred.shape != (1, 4 * a, height, width):
        raise ValueError(f"bbox_pred must have shape (1, {4 * a}, {height}, {width}), "
                         f"got {bbox_pred.shape}")
    im_h, im_w, im_scale = _im_info(im_info)

    # §6.1-3: foreground scores and deltas in (i, j, a) order, decoded and clipped.
    scores = _from_blob(cls_prob[:, a:].astype(np.float64), 1)[:, 0]
    deltas = _from_blob(bbox_pred.astype(np.float64), 4)
    boxes = bbox_transform_inv(shift_anchors(base, height, width, feat_stride), deltas)
    boxes = clip_boxes(boxes, im_h, im_w)

    # §6.4: min size is given at original-image scale; note >=.
    w, h, _, _ = _whctr(boxes)
    keep = np.flatnonzero((w >= min_size * im_scale) & (h >= min_size * im_scale))
    boxes, scores = boxes[keep], scores[keep]

    # §6.5-7: sort, pre-NMS top-N, NMS, post-NMS top-N.
    order = _score_order(scores)
    if pre_nms_top_n > 0:
        order = order[:pre_nms_top_n]
    boxes, scores = boxes[order], scores[order]
    keep = nms(boxes, scores, nms_thresh, limit=post_nms_top_n)
    rois = np.zeros((keep.size, 5), dtype=np.float32)
    rois[:, 1:] = boxes[keep]
    return rois, scores[keep].astype(np.float32)[:, None]


def recall(proposals, gt, iou_thresh: float) -> float:
    """Fraction of gt boxes (G, 4) with IoU >= iou_thresh to at least one of proposals (R, 4).

    For top-K recall pass the first K proposals. With G == 0 the fraction is undefined and
    NaN is returned; average over images by weighting with G.
    """
    props = _boxes(proposals, "proposals")
    gt = _boxes(gt, "gt")
    if gt.shape[0] == 0:
        return float("nan")
    if props.shape[0] == 0:
        return 0.0
    best = bbox_overlaps(gt, props).max(axis=1)
    return float(np.mean(best >= iou_thresh))
