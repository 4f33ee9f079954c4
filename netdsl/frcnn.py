"""Faster R-CNN's detections from a test net's outputs, as py-faster-rcnn's tools/test_net.py makes
them (lib/fast_rcnn/test.py: im_detect, then test_net's per-class NMS and the per-image cap)."""
from __future__ import annotations

import numpy as np

from . import boxes as box_ops


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
