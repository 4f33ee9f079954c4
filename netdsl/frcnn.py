"""Faster R-CNN's detections from a test net's outputs, as py-faster-rcnn's tools/test_net.py makes
them (lib/fast_rcnn/test.py: im_detect, then test_net's per-class NMS and the per-image cap)."""
from __future__ import annotations

from contextlib import contextmanager

import numpy as np

from . import boxes as box_ops
from .backend import to_host


def detections(rois, cls_prob, bbox_pred, im_info, *, score_thresh: float = 0.05, nms_thresh: float = 0.3,
               max_per_image: int = 100, image_id: int = 0) -> np.ndarray:
    """Rows (image_id, label, score, xmin, ymin, xmax, ymax) in original-image pixels.

    rois (R, 5) are the net's proposals in the scaled image; cls_prob (R, K) the class
    probabilities (class 0 is background); bbox_pred (R, 4K) the per-class box deltas, or None for
    a net without box regression (cfg.TEST.BBOX_REG off: every class takes the roi itself); im_info
    (height, width, scale) of the scaled image. As im_detect: boxes = rois / scale, decoded with
    bbox_transform_inv (the deltas are used as they are: py-faster-rcnn folds the target
    normalisation into bbox_pred's weights when it snapshots) and clipped to the original image
    (height / scale, width / scale). As test_net: for each class j >= 1, the boxes with score >
    score_thresh, NMS at nms_thresh on float32 [box, score] rows; then, when more than
    max_per_image rows remain (max_per_image > 0), only those scoring at least the
    max_per_image-th best score over all classes stay (ties may keep more). Rows come by class,
    each class's by descending score (NMS order); ties are broken by lower index first."""
    rois = np.asarray(rois, np.float64).reshape(-1, 5)
    prob = np.asarray(cls_prob, np.float64).reshape(rois.shape[0], -1)
    h, w, scale = (float(v) for v in np.asarray(im_info, np.float64).reshape(-1)[:3])
    k = prob.shape[1]
    base = rois[:, 1:5] / scale
    if bbox_pred is None:
        pred = np.tile(base, (1, k))
    else:
        deltas = np.asarray(bbox_pred, np.float64).reshape(rois.shape[0], 4 * k)
        pred = box_ops.bbox_transform_inv(np.repeat(base, k, axis=0), deltas.reshape(-1, 4))
        pred = box_ops.clip_boxes(pred, round(h / scale), round(w / scale)).reshape(-1, 4 * k)
    per_class = []
    for j in range(1, k):
        inds = np.flatnonzero(prob[:, j] > score_thresh)
        dets = np.hstack([pred[inds, 4 * j:4 * j + 4], prob[inds, j:j + 1]]).astype(np.float32)
        keep = box_ops.nms(dets[:, :4], dets[:, 4], nms_thresh) if len(dets) else np.zeros(0, np.int64)
        per_class.append((j, dets[keep]))
    scores = np.concatenate([d[:, 4] for _, d in per_class]) if per_class else np.zeros(0)
    if max_per_image > 0 and scores.size > max_per_image:
        cut = np.sort(scores)[-max_per_image]
        per_class = [(j, d[d[:, 4] >= cut]) for j, d in per_class]
    rows = [np.hstack([np.full((len(d), 1), image_id), np.full((len(d), 1), j), d[:, 4:5], d[:, :4]])
            for j, d in per_class]
    return np.vstack(rows).astype(np.float32) if rows else np.zeros((0, 7), np.float32)


# ------------------------------------------------------------------------------ a test net's head

def head(nodes, outputs) -> tuple[str, str, str | None] | None:
    """The blobs (rois, cls_prob, bbox_pred) a py-faster-rcnn-style test net's detections come
    from, by the names the user wrote, or None when the net is not one. `nodes` are a graph's (or
    plan's) nodes in order, `outputs` its output blob versions. The rule, by structure rather than
    by name: rois is the Proposal's top; cls_prob the net output a Softmax computes from the rois
    (through ROIPooling and the fc head); bbox_pred the other net output computed from the rois
    (None when there is none: a head without box regression). py-faster-rcnn's test.prototxt
    names them cls_prob and bbox_pred; a net naming them otherwise works the same."""
    prop = next((n for n in nodes if n.layer.makes_proposals), None)
    if prop is None:
        return None
    seen, found = {prop.tops[0]}, []
    for n in nodes:
        if any(b in seen for b in n.bottoms):
            seen.update(n.tops)
            found += [(n.layer.normalizes_scores, n.layer.spec.tops[i]) for i, t in enumerate(n.tops) if t in outputs]
    probs = [name for softmax, name in found if softmax]
    if not probs:
        return None
    deltas = [name for softmax, name in found if not softmax]
    return prop.layer.spec.tops[0], probs[0], deltas[0] if deltas else None


def net_detections(net, blobs: tuple[str, str, str | None], im_info: str, **kw) -> np.ndarray:
    """`detections` of the last forward of `net`, whose head's blobs are `blobs` (as `head` gives
    them) and whose image sizes are the blob `im_info` (the Proposal's third bottom): one call per
    image of the batch (the rois' first column), rows tagged with the image's index."""
    rois = to_host(net.blobs[blobs[0]]).reshape(-1, 5)
    prob = to_host(net.blobs[blobs[1]]).reshape(rois.shape[0], -1)
    pred = to_host(net.blobs[blobs[2]]).reshape(rois.shape[0], -1) if blobs[2] else None
    info = to_host(net.blobs[im_info]).reshape(-1, 3)
    rows = [detections(rois[rois[:, 0] == i], prob[rois[:, 0] == i], None if pred is None else pred[rois[:, 0] == i],
                       info[int(i)], image_id=int(i), **kw) for i in np.unique(rois[:, 0])]
    return np.vstack(rows) if rows else np.zeros((0, 7), np.float32)


# ---------------------------------------------------- training on normalised box targets (snapshots)

def target_normalisation(net) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(layer, stds, means) for each layer of `net` that learns box deltas from a ProposalTarget's
    normalised targets (normalize_targets, py-faster-rcnn's BBOX_NORMALIZE_TARGETS_PRECOMPUTED):
    the layer making the first bottom of the loss (SmoothL1Loss) that reads ProposalTarget's
    bbox_targets. stds and means are tiled to the layer's 4K outputs."""
    steps, out = net.plan.steps, []
    for s in steps:
        if not s.layer.makes_box_targets or not s.layer.p.normalize_targets:
            continue
        targets = s.node.tops[2]
        for loss in steps:
            if loss.layer.is_loss and targets in loss.node.bottoms[1:2]:
                maker = next((m for m in steps if loss.node.bottoms[0] in m.node.tops and m.params), None)
                if maker is not None and maker.node.name in net.params:
                    k = s.layer.p.num_classes
                    out.append((maker.node.name, np.tile(s.layer.vector("bbox_normalize_stds"), k),
                                np.tile(s.layer.vector("bbox_normalize_means"), k)))
    return out


def _along_outputs(net, v: np.ndarray, param):
    """The per-output vector `v` (4K) as a `net` array broadcasting over `param`'s first axis."""
    return net.xp.asarray(v.reshape(-1, *[1] * (param.data.ndim - 1)), dtype=param.data.dtype)


@contextmanager
def unnormalised(net):
    """py-faster-rcnn's SolverWrapper.snapshot: while inside, the box-delta layers trained on
    normalised targets (`target_normalisation`) hold weights that predict unnormalised deltas
    (W * stds, b * stds + means), so weights saved inside are what a test net decodes directly
    (as py-faster-rcnn's own caffemodels); on leaving, the training weights are restored exactly
    (in place: a captured CUDA graph keeps its buffers)."""
    saved = []
    for name, stds, means in target_normalisation(net):
        ps = net.params[name][:2]
        saved += [(p, p.data.copy()) for p in ps]
        for p in ps:
            p.data *= _along_outputs(net, stds, p)
        if len(ps) > 1:
            ps[1].data += _along_outputs(net, means, ps[1])
    try:
        yield
    finally:
        for p, data in saved:
            p.data[...] = data


def renormalise(net) -> None:
    """The inverse of `unnormalised`, for weights loaded from a snapshot to resume training
    ((b - means) / stds, W / stds; equal to the saved training weights to float rounding)."""
    for name, stds, means in target_normalisation(net):
        ps = net.params[name][:2]
        if len(ps) > 1:
            ps[1].data -= _along_outputs(net, means, ps[1])
        for p in ps:
            p.data /= _along_outputs(net, stds, p)
