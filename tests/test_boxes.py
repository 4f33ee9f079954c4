"""Tests for netdsl.boxes against /work/shared/reference/rpn_spec.md (sections cited as §)."""
import math

import numpy as np
import pytest

from netdsl.boxes import (
    anchor_targets,
    bbox_overlaps,
    bbox_transform,
    bbox_transform_inv,
    clip_boxes,
    generate_anchors,
    nms,
    proposals,
    recall,
    shift_anchors,
)

# §1: the exact table (not the +1 MATLAB values of the original file's comment).
GOLDEN_ANCHORS = [
    [-84, -40, 99, 55], [-176, -88, 191, 103], [-360, -184, 375, 199],
    [-56, -56, 71, 71], [-120, -120, 135, 135], [-248, -248, 263, 263],
    [-36, -80, 51, 95], [-80, -168, 95, 183], [-168, -344, 183, 359],
]

ONE_ANCHOR = np.array([[0, 0, 15, 15]], dtype=np.float64)


def py_iou(a, b):
    """Scalar IoU with the +1 convention, in the same float order as the library."""
    iw = min(a[2], b[2]) - max(a[0], b[0]) + 1.0
    ih = min(a[3], b[3]) - max(a[1], b[1]) + 1.0
    inter = max(iw, 0.0) * max(ih, 0.0)
    area_a = (a[2] - a[0] + 1.0) * (a[3] - a[1] + 1.0)
    area_b = (b[2] - b[0] + 1.0) * (b[3] - b[1] + 1.0)
    return inter / (area_a + area_b - inter)


def flat_labels(labels, a, h, w):
    """(1, 1, A*H, W) labels -> per-anchor labels in (i, j, a) order (§2)."""
    return labels.reshape(1, a, h, w).transpose(0, 2, 3, 1).reshape(-1)


def flat_quads(blob):
    """(1, 4A, H, W) -> (H*W*A, 4) in (i, j, a) order (§2)."""
    return blob.transpose(0, 2, 3, 1).reshape(-1, 4)


# ---------------------------------------------------------------------------------------------
# Anchors

def test_golden_anchor_table():
    anchors = generate_anchors()
    assert anchors.shape == (9, 4)
    np.testing.assert_array_equal(anchors, np.array(GOLDEN_ANCHORS, dtype=np.float64))


def test_generate_anchors_custom_scales_are_ratio_major():
    anchors = generate_anchors(scales=(2, 4))
    assert anchors.shape == (6, 4)
    widths = anchors[:, 2] - anchors[:, 0] + 1
    np.testing.assert_array_equal(widths, [46, 92, 32, 64, 22, 44])   # 23, 16, 11 times 2, 4


def test_shift_order_is_i_j_a():
    base = generate_anchors()
    h, w, stride = 3, 5, 16
    shifted = shift_anchors(base, h, w, stride)
    assert shifted.shape == (h * w * 9, 4)
    for i in range(h):
        for j in range(w):
            for a in range(9):
                expect = base[a] + np.array([j, i, j, i]) * stride
                np.testing.assert_array_equal(shifted[(i * w + j) * 9 + a], expect)


# ---------------------------------------------------------------------------------------------
# Geometry

def test_iou_known_values():
    boxes = np.array([[0, 0, 9, 9]], dtype=float)
    query = np.array([
        [0, 0, 9, 9],        # identical
        [5, 0, 14, 9],       # inter 5x10 = 50, union 150
        [9, 9, 18, 18],      # a single shared pixel: 1 / 199
        [10, 0, 19, 9],      # touching edge, no shared pixel
        [100, 100, 120, 130],
    ], dtype=float)
    got = bbox_overlaps(boxes, query)
    assert got.shape == (1, 5)
    np.testing.assert_array_equal(got[0], [1.0, 50 / 150, 1 / 199, 0.0, 0.0])


def test_iou_shape_and_symmetry():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 50, (7, 4)).astype(float)
    b = rng.integers(0, 50, (3, 4)).astype(float)
    a[:, 2:] += a[:, :2]
    b[:, 2:] += b[:, :2]
    got = bbox_overlaps(a, b)
    assert got.shape == (7, 3)
    np.testing.assert_array_equal(got, bbox_overlaps(b, a).T)
    for n in range(7):
        for g in range(3):
            assert got[n, g] == py_iou(a[n], b[g])


def test_invalid_shapes_raise_value_error():
    with pytest.raises(ValueError, match="shape"):
        bbox_overlaps(np.zeros((3, 3)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="shape"):
        nms(np.zeros((3, 4)), np.zeros(2), 0.5)
    with pytest.raises(ValueError, match="im_info"):
        anchor_targets(2, 2, np.zeros((0, 5)), [10, 10], np.random.default_rng(0))
    with pytest.raises(ValueError, match="cls_prob"):
        proposals(np.zeros((1, 9, 2, 2)), np.zeros((1, 36, 2, 2)), [32, 32, 1],
                  pre_nms_top_n=0, post_nms_top_n=0)


def test_encode_known_value():
    got = bbox_transform([[0, 0, 15, 15]], [[8, 0, 23, 31]])
    np.testing.assert_allclose(got, [[0.5, 0.5, 0.0, math.log(2)]], rtol=0, atol=1e-15)


def test_decode_zero_deltas_quirk():
    boxes = np.array([[0, 0, 15, 15], [10, 20, 40, 29]], dtype=float)
    got = bbox_transform_inv(boxes, np.zeros((2, 4)))
    # §4: one pixel wider and taller in the +1 convention.
    np.testing.assert_array_equal(got, boxes + [0, 0, 1, 1])


def test_encode_decode_round_trip_is_off_by_one():
    rng = np.random.default_rng(2)
    ex = rng.uniform(0, 100, (50, 4))
    gt = rng.uniform(0, 100, (50, 4))
    ex[:, 2:] += ex[:, :2] + 1
    gt[:, 2:] += gt[:, :2] + 1
    back = bbox_transform_inv(ex, bbox_transform(ex, gt))
    np.testing.assert_allclose(back, gt + [0, 0, 1, 1], rtol=0, atol=1e-9)


def test_clip_boxes():
    boxes = np.array([[-5, -3, 50, 40], [3, 4, 5, 6]], dtype=float)
    np.testing.assert_array_equal(clip_boxes(boxes, 30, 45), [[0, 0, 44, 29], [3, 4, 5, 6]])
    assert boxes[0, 0] == -5          # input untouched


# ---------------------------------------------------------------------------------------------
# NMS

def brute_force_nms(boxes, scores, thresh):
    """O(N^2) greedy NMS (§7); ties in score go to the lower index, like the library."""
    order = sorted(range(len(scores)), key=lambda k: (-scores[k], k))
    suppressed = set()
    keep = []
    for pos, i in enumerate(order):
        if i in suppressed:
            continue
        keep.append(i)
        for j in order[pos + 1:]:
            if j not in suppressed and py_iou(boxes[i], boxes[j]) > thresh:
                suppressed.add(j)
    return keep


def random_int_boxes(rng, n, extent=60, size=25):
    """Integer boxes on a small grid, so that equal IoU values (threshold ties) are common."""
    xy = rng.integers(0, extent, (n, 2))
    wh = rng.integers(0, size, (n, 2))
    return np.concatenate([xy, xy + wh], axis=1).astype(float)


@pytest.mark.parametrize("seed", range(25))
def test_nms_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    boxes = random_int_boxes(rng, 60)
    scores = rng.integers(0, 20, 60).astype(float)      # many equal scores
    # A threshold equal to an IoU that occurs in the set exercises "== thresh is kept".
    ious = bbox_overlaps(boxes, boxes)[np.triu_indices(60, 1)]
    candidates = ious[(ious > 0) & (ious < 1)]
    for thresh in (0.3, 0.7, rng.choice(candidates)):
        keep = nms(boxes, scores, thresh)
        assert keep.dtype == np.int64
        assert keep.tolist() == brute_force_nms(boxes, scores, thresh)


def test_nms_exact_threshold_is_kept():
    boxes = np.array([[0, 0, 9, 9], [0, 0, 9, 4], [0, 0, 9, 5]], dtype=float)
    # IoUs with box 0: exactly 50/100 = 0.5, and 60/100 = 0.6.
    assert nms(boxes, np.array([3.0, 2.0, 1.0]), 0.5).tolist() == [0, 1]


def test_nms_ties_lower_index_first_and_empty():
    boxes = np.array([[0, 0, 9, 9]] * 3, dtype=float)
    assert nms(boxes, np.ones(3), 0.7).tolist() == [0]
    assert nms(boxes, np.ones(3), 1.0).tolist() == [0, 1, 2]
    assert nms(np.zeros((0, 4)), np.zeros(0), 0.7).tolist() == []


def test_nms_matches_torchvision():
    # torchvision's IoU uses width = x2 - x1 (no +1): shifting x2, y2 by +1 makes both
    # conventions compute identical IoUs on integer boxes. Scores are distinct because
    # torchvision's tie order is unspecified.
    tv_ops = pytest.importorskip("torchvision.ops")       # first: skipping stays cheap
    torch = pytest.importorskip("torch")
    for seed in range(10):
        rng = np.random.default_rng(seed)
        boxes = random_int_boxes(rng, 200, extent=100)
        scores = rng.permutation(200).astype(float)
        for thresh in (0.3, 0.5, 0.7):
            ours = nms(boxes, scores, thresh)
            theirs = tv_ops.nms(torch.from_numpy(boxes + [0, 0, 1, 1]),
                                torch.from_numpy(scores), thresh)
            assert ours.tolist() == theirs.tolist()


# ---------------------------------------------------------------------------------------------
# Anchor targets (§3); one 16x16 anchor per 16-pixel cell unless stated.

def targets_1(gt, im_info=(64, 64, 1), h=4, w=4, seed=0, **kw):
    return anchor_targets(h, w, np.asarray(gt, dtype=float), np.asarray(im_info, dtype=float),
                          np.random.default_rng(seed), anchors=ONE_ANCHOR, **kw)


def test_output_shapes_and_dtypes():
    out = anchor_targets(5, 7, np.array([[10, 10, 60, 60, 1.0]]), np.array([80, 112, 1.0]),
                         np.random.default_rng(0))
    assert [o.shape for o in out] == [(1, 1, 45, 7)] + [(1, 36, 5, 7)] * 3
    assert all(o.dtype == np.float32 for o in out)


def test_best_anchor_ties_are_all_positive():
    # Anchors (0,0) and (0,1) both have IoU 128/384 = 1/3 with the GT: both are its best.
    labels, _, _, _ = targets_1([[8, 0, 23, 15, 1]])
    expect = np.zeros((4, 4))
    expect[0, 0] = expect[0, 1] = 1
    np.testing.assert_array_equal(labels[0, 0], expect)


def test_middle_iou_is_ignored():
    # Anchor (0,0): IoU 224/416 (best, positive); anchor (0,1): 160/480 = 1/3 -> ignored.
    labels, _, _, _ = targets_1([[2, 0, 25, 15, 1]])
    assert labels[0, 0, 0, 0] == 1
    assert labels[0, 0, 0, 1] == -1
    assert np.sum(labels == 0) == 14


def test_border_anchors_are_ignored_and_allowed_border_widens():
    gt = [[0, 0, 15, 15, 1]]
    labels, targets, inside_w, outside_w = targets_1(gt, im_info=(60, 60, 1))
    # Cells with i == 3 or j == 3 end at 63 >= 60: outside.
    outside = np.zeros((4, 4), dtype=bool)
    outside[3, :] = outside[:, 3] = True
    assert np.all(labels[0, 0][outside] == -1)
    assert np.all(labels[0, 0][~outside] >= 0)
    for blob in (targets, inside_w, outside_w):
        assert np.all(blob[0][:, outside] == 0)
    assert np.any(targets[0][:, ~outside] != 0)      # inside anchors regress to the GT
    labels, _, _, _ = targets_1(gt, im_info=(60, 60, 1), allowed_border=4)
    assert np.all(labels >= 0)


def test_anchor_matches_the_higher_of_two_positive_gts():
    # IoUs with anchor (0,0): 224/256 = 0.875 for GT 0 and 240/256 = 0.9375 for GT 1.
    labels, targets, _, _ = targets_1([[0, 0, 15, 13, 1], [0, 0, 15, 14, 2]])
    assert labels[0, 0, 0, 0] == 1
    assert np.sum(labels == 1) == 1
    np.testing.assert_allclose(targets[0, :, 0, 0], [0, -1 / 32, 0, math.log(15 / 16)],
                               rtol=0, atol=1e-7)


def test_gt_overlapping_no_inside_anchor():
    # GT 1 lies only under border-crossing anchors (x >= 50; inside anchors end at x = 47).
    gt = [[0, 0, 15, 15, 1], [50, 0, 59, 15, 2]]
    inside = np.zeros((4, 4), dtype=bool)
    inside[:3, :3] = True
    guarded, _, _, _ = targets_1(gt, im_info=(60, 60, 1))
    expect = np.where(inside, 0.0, -1.0)
    expect[0, 0] = 1
    np.testing.assert_array_equal(guarded[0, 0], expect)
    # py-faster-rcnn: every inside anchor with IoU 0 to GT 1 "attains" its best IoU of 0.
    raw, targets, _, _ = targets_1(gt, im_info=(60, 60, 1), guard_zero_iou=False)
    np.testing.assert_array_equal(raw[0, 0], np.where(inside, 1.0, -1.0))
    # Their regression target is still their argmax GT (GT 0 on all-zero rows: first index).
    np.testing.assert_allclose(targets[0, :, 0, 1], bbox_transform([[16, 0, 31, 15]],
                                                                   [[0, 0, 15, 15]])[0])


def test_clobber_positives():
    gt = [[0, 0, 3, 3, 1]]                  # best IoU 16/256, below the negative threshold
    labels, _, _, _ = targets_1(gt)
    assert labels[0, 0, 0, 0] == 1
    labels, _, _, _ = targets_1(gt, clobber_positives=True)
    assert labels[0, 0, 0, 0] == 0


def test_layout_of_labels_and_targets():
    # Two anchors per cell; the GT equals anchor a=1 of cell (i=1, j=2).
    anchors = np.array([[0, 0, 15, 15], [0, 0, 31, 31]], dtype=float)
    h, w = 3, 4
    gt = np.array([[32, 16, 63, 47, 1]], dtype=float)
    labels, targets, inside_w, _ = anchor_targets(
        h, w, gt, np.array([100, 100, 1.0]), np.random.default_rng(0), anchors=anchors,
        inside_weight=(1, 2, 3, 4))
    assert labels[0, 0, 1 * h + 1, 2] == 1                    # row a*H + i
    assert np.sum(labels == 1) == 1
    np.testing.assert_array_equal(targets[0, 4:8, 1, 2], 0)    # channels 4a + c
    np.testing.assert_array_equal(inside_w[0, 4:8, 1, 2], [1, 2, 3, 4])
    np.testing.assert_allclose(targets[0, 0:4, 1, 2],
                               bbox_transform([[32, 16, 47, 31]], gt[:, :4])[0], atol=1e-7)


def reference_labels(all_anchors, gt, im_h, im_w, guard):
    """Per-anchor labels by the letter of §3.1-3.4 (no sampling), with plain loops."""
    n_all = len(all_anchors)
    inside = [k for k in range(n_all) if all_anchors[k, 0] >= 0 and all_anchors[k, 1] >= 0
              and all_anchors[k, 2] < im_w and all_anchors[k, 3] < im_h]
    ious = {k: [py_iou(all_anchors[k], g) for g in gt] for k in inside}
    gt_best = [max(ious[k][g] for k in inside) for g in range(len(gt))]
    labels = np.full(n_all, -1.0)
    for k in inside:
        best = max(ious[k])
        if best < 0.3:
            labels[k] = 0
        if any(ious[k][g] == gt_best[g] and (gt_best[g] > 0 or not guard)
               for g in range(len(gt))):
            labels[k] = 1
        if best >= 0.7:
            labels[k] = 1
    return labels


@pytest.mark.parametrize("guard", [True, False])
def test_labels_match_reference_loops(guard):
    rng = np.random.default_rng(5)
    anchors = generate_anchors(scales=(1, 2, 3))
    h, w, im_h, im_w = 9, 11, 140, 170
    xy = rng.uniform(0, 130, (6, 2))
    gt = np.concatenate([xy, xy + rng.uniform(8, 60, (6, 2))], axis=1)
    gt[-1] = [160, 130, 169, 139]                         # likely under no inside anchor
    labels, _, _, _ = anchor_targets(h, w, gt, np.array([im_h, im_w, 1.0]),
                                     np.random.default_rng(0), anchors=anchors,
                                     batch_size=10**6, guard_zero_iou=guard)
    expect = reference_labels(shift_anchors(anchors, h, w, 16), gt, im_h, im_w, guard)
    np.testing.assert_array_equal(flat_labels(labels, 9, h, w), expect)


def many_positive_case(seed, **kw):
    """Default anchors on a 600x800 image, 60 GTs equal to inside scale-8 anchors: about
    270 positives and 2750 negatives before sampling."""
    h, w = 38, 50
    all_anchors = shift_anchors(generate_anchors(), h, w, 16)
    inside = np.flatnonzero((all_anchors[:, :2] >= 0).all(1) & (all_anchors[:, 2] < 800)
                            & (all_anchors[:, 3] < 600))
    small = inside[np.isin(inside % 9, [0, 3, 6])]
    picks = np.random.default_rng(99).choice(small, 60, replace=False)
    gt = np.concatenate([all_anchors[picks], np.ones((60, 1))], axis=1)
    return anchor_targets(h, w, gt, np.array([600, 800, 1.0]), np.random.default_rng(seed), **kw)


def test_sampling_caps_and_outside_weights():
    full, _, _, _ = many_positive_case(0, batch_size=10**6)
    labels, _, inside_w, outside_w = many_positive_case(0)
    assert np.sum(full == 1) > 128 and np.sum(full == 0) > 128
    assert np.sum(labels == 1) == 128 and np.sum(labels == 0) == 128
    # Sampling only disables labels.
    assert np.all((labels == full) | (labels == -1))
    # §3.7-8: inside weights for positives only; outside 1/num_examples for sampled anchors.
    a, h, w = 9, 38, 50
    flat = flat_labels(labels, a, h, w)
    np.testing.assert_array_equal(flat_quads(inside_w), np.repeat((flat == 1)[:, None], 4, 1))
    np.testing.assert_array_equal(flat_quads(outside_w),
                                  np.repeat(np.where(flat >= 0, np.float32(1 / 256), 0)[:, None],
                                            4, 1))


def test_sampling_fills_with_negatives_and_custom_fraction():
    labels, _, _, _ = targets_1([[0, 0, 15, 15, 1]], h=20, w=20, im_info=(320, 320, 1),
                                batch_size=32)
    assert np.sum(labels == 1) == 1 and np.sum(labels == 0) == 31
    labels, _, _, _ = many_positive_case(0, batch_size=64, fg_fraction=0.25)
    assert np.sum(labels == 1) == 16 and np.sum(labels == 0) == 48


def test_positive_weight():
    labels, _, _, outside_w = many_positive_case(0, positive_weight=0.25)
    flat = flat_labels(labels, 9, 38, 50)
    per_anchor = flat_quads(outside_w)[:, 0]
    np.testing.assert_allclose(per_anchor[flat == 1], 0.25 / 128, rtol=1e-6)
    np.testing.assert_allclose(per_anchor[flat == 0], 0.75 / 128, rtol=1e-6)
    assert np.all(per_anchor[flat == -1] == 0)


def test_sampling_is_deterministic_per_seed():
    first = many_positive_case(3)
    again = many_positive_case(3)
    other = many_positive_case(4)
    for x, y in zip(first, again):
        np.testing.assert_array_equal(x, y)
    assert not np.array_equal(first[0], other[0])


def test_no_gt_boxes_gives_sampled_negatives():
    labels, targets, inside_w, outside_w = anchor_targets(
        38, 50, np.zeros((0, 5)), np.array([600, 800, 1.0]), np.random.default_rng(0))
    assert np.sum(labels == 1) == 0 and np.sum(labels == 0) == 256
    assert not targets.any() and not inside_w.any()
    assert np.isclose(outside_w.sum(), 4.0)


# ---------------------------------------------------------------------------------------------
# Proposals (§6); one 16x16 anchor per cell, zero deltas unless stated.

def one_anchor_proposals(fg, im_info, deltas=None, **kw):
    h, w = fg.shape
    cls_prob = np.stack([1 - fg, fg])[None].astype(np.float32)
    bbox_pred = np.zeros((1, 4, h, w), np.float32) if deltas is None else deltas
    kw = {"pre_nms_top_n": 0, "post_nms_top_n": 0, "min_size": 0, "nms_thresh": 1.0} | kw
    return proposals(cls_prob, bbox_pred, np.asarray(im_info, float), anchors=ONE_ANCHOR, **kw)


def test_proposals_clip_order_and_shapes():
    fg = np.array([[0.1, 0.6, 0.3], [0.9, 0.2, 0.5]])
    rois, scores = one_anchor_proposals(fg, (32, 40, 1))
    assert rois.shape == (6, 5) and scores.shape == (6, 1)
    assert rois.dtype == np.float32 and scores.dtype == np.float32
    assert np.all(rois[:, 0] == 0)
    np.testing.assert_array_equal(scores[:, 0], np.sort(fg.ravel())[::-1].astype(np.float32))
    # Cell (1, 0) scores highest: anchor (0, 16, 15, 31) decodes to (0, 16, 16, 32) (§4
    # quirk), and y2 is clipped to 31. Cell (0, 2) ends at x 48 -> clipped to 39.
    np.testing.assert_array_equal(rois[0, 1:], [0, 16, 16, 31])
    np.testing.assert_array_equal(rois[3, 1:], [32, 0, 39, 16])


def test_proposals_min_size_scaled_and_inclusive():
    fg = np.array([[0.1, 0.6, 0.3]])
    # After clipping the j = 2 box spans x 32..39: width 8 == 16 * 0.5, kept (>=).
    rois, _ = one_anchor_proposals(fg, (16, 40, 0.5), min_size=16)
    assert len(rois) == 3
    rois, _ = one_anchor_proposals(fg, (16, 39, 0.5), min_size=16)     # width 7: dropped
    assert rois[:, 1].tolist() == [16, 0]


def test_proposals_equal_scores_keep_anchor_order():
    rois, _ = one_anchor_proposals(np.full((2, 3), 0.5), (64, 64, 1))
    np.testing.assert_array_equal(rois[:, 1:3], [[0, 0], [16, 0], [32, 0],
                                                 [0, 16], [16, 16], [32, 16]])


def test_proposals_use_foreground_channels_and_nms():
    # Two identical anchors per cell: NMS keeps the one with the higher foreground score.
    anchors = np.array([[0, 0, 15, 15], [0, 0, 15, 15]], dtype=float)
    fg = np.array([[[0.2, 0.7]], [[0.8, 0.1]]])                # (a, i, j), H=1, W=2
    cls_prob = np.concatenate([np.full_like(fg, 0.99), fg])[None]   # background ignored
    rois, scores = proposals(cls_prob, np.zeros((1, 8, 1, 2)), np.array([16, 32, 1.0]),
                             anchors=anchors, pre_nms_top_n=0, post_nms_top_n=0, min_size=0)
    np.testing.assert_allclose(scores[:, 0], [0.8, 0.7])
    np.testing.assert_array_equal(rois[:, 1], [0, 16])


def test_proposals_top_n():
    rng = np.random.default_rng(7)
    h, w = 10, 12
    cls_prob = rng.random((1, 18, h, w)).astype(np.float32)
    bbox_pred = (rng.standard_normal((1, 36, h, w)) * 0.2).astype(np.float32)
    im_info = np.array([160, 192, 1.0])
    everything, all_scores = proposals(cls_prob, bbox_pred, im_info, pre_nms_top_n=0,
                                       post_nms_top_n=0, nms_thresh=1.0)
    unlimited, _ = proposals(cls_prob, bbox_pred, im_info, pre_nms_top_n=0, post_nms_top_n=0)
    limited, scores = proposals(cls_prob, bbox_pred, im_info, pre_nms_top_n=50,
                                post_nms_top_n=0)
    top10, _ = proposals(cls_prob, bbox_pred, im_info, pre_nms_top_n=50, post_nms_top_n=10)
    assert len(unlimited) < len(everything)                   # NMS removed some boxes
    assert len(limited) <= 50 and np.all(scores[:, 0] >= all_scores[49, 0])
    assert np.all(np.diff(scores[:, 0]) <= 0)
    np.testing.assert_array_equal(top10, limited[:10])


# ---------------------------------------------------------------------------------------------
# Recall

def test_recall():
    gt = np.array([[0, 0, 9, 9], [100, 100, 109, 109]], dtype=float)
    props = np.array([[100, 100, 109, 104], [0, 0, 9, 9]], dtype=float)   # IoU 0.5 and 1
    assert recall(props, gt, 0.5) == 1.0
    assert recall(props, gt, 0.6) == 0.5
    assert recall(props[:1], gt, 0.6) == 0.0
    assert recall(np.zeros((0, 4)), gt, 0.5) == 0.0
    assert math.isnan(recall(props, np.zeros((0, 4)), 0.5))
